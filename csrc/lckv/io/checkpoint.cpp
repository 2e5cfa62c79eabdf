#include "lckv/io/checkpoint.h"

#include "lckv/dtype.h"
#include "lckv/files.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>
#include <sentencepiece_processor.h>

#include "lckv/io/safetensors.h"

namespace lckv::io {

namespace fs = std::filesystem;

std::vector<std::pair<std::string, torch::Tensor>> hf_state_dict(LCKVForCausalLM& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : model->named_parameters()) out.emplace_back(item.key(), item.value());
  return out;
}

namespace {

// Tensors that HF checkpoints may carry but that are not parameters here.
bool ignorable(const std::string& name) { return name.find("rotary_emb.inv_freq") != std::string::npos; }

bool is_weight_dtype(torch::ScalarType t) {
  for (const FloatDtype& d : kFloatDtypes) {
    if (d.type == t) return true;
  }
  return false;
}

// A weight is a float tensor of finite values: integer bytes would be reinterpreted by the dtype
// conversion, and a NaN or inf weight turns every output into NaN (greedy decoding then emits token 0).
void check_weight(const std::string& source, const std::string& name, const torch::Tensor& t) {
  if (!is_weight_dtype(t.scalar_type())) {
    throw FormatError(source + ": tensor '" + name + "' has dtype " + safetensors_dtype_name(t.scalar_type()) +
                      ", expected a float dtype (F64, F32, F16 or BF16)");
  }
  const torch::Tensor bad = torch::isfinite(t).logical_not_().flatten();
  const int64_t count = bad.sum().item<int64_t>();
  if (count > 0) {
    const int64_t first = bad.nonzero()[0][0].item<int64_t>();
    throw FormatError(source + ": tensor '" + name + "' has " + std::to_string(count) +
                      " non-finite values (NaN or inf), the first at flat index " + std::to_string(first) + " (" +
                      c10::str(t.flatten()[first].item<double>()) + ")");
  }
}

void check_weights(const std::string& source, const std::map<std::string, torch::Tensor>& tensors) {
  for (const auto& [name, t] : tensors) check_weight(source, name, t);
}

void copy_state(LCKVForCausalLM& model, const std::map<std::string, torch::Tensor>& tensors, const std::string& source,
                bool checked) {
  torch::NoGradGuard no_grad;
  const bool tied = model->config.tie_word_embeddings;
  if (tied && tensors.count("lm_head.weight")) {
    throw FormatError(source + ": tensor 'lm_head.weight' is present, but config.json sets tie_word_embeddings: true "
                      "(the output layer is the embedding); set it to false to use this lm_head.weight");
  }
  std::set<std::string> used;
  for (auto& [name, param] : hf_state_dict(model)) {
    auto it = tensors.find(name);
    if (it == tensors.end()) {
      throw FormatError(source + ": tensor '" + name + "' is missing" +
                        (name == "lm_head.weight" ? " (config.json sets tie_word_embeddings: false; a checkpoint without "
                                                    "lm_head.weight needs tie_word_embeddings: true)"
                                                  : ""));
    }
    if (it->second.sizes() != param.sizes()) {
      throw FormatError(source + ": tensor '" + name + "' has shape " + c10::str(it->second.sizes()) + ", expected " +
                        c10::str(param.sizes()) + " from config.json");
    }
    if (!checked) check_weight(source, name, it->second);
    param.copy_(it->second);
    used.insert(name);
  }
  for (const auto& [name, t] : tensors) {
    if (!used.count(name) && !ignorable(name)) {
      throw FormatError(source + ": tensor '" + name + "' is not a parameter of this model (does config.json's layer_types match the checkpoint?)");
    }
  }
}

// The file the index names as `shard` (for `tensor`), which must lie inside the checkpoint directory:
// a relative path without '..' whose real path (symlinks resolved) is still under the directory's.
fs::path shard_path(const fs::path& index, const fs::path& dir, const std::string& shard, const std::string& tensor) {
  const std::string where = index.string() + ": weight_map assigns tensor '" + tensor + "' to shard '" + shard + "'";
  const fs::path rel(shard);
  if (shard.empty()) throw FormatError(where + ", an empty path");
  if (rel.has_root_path()) throw FormatError(where + ", an absolute path; shards must lie inside the checkpoint directory");
  for (const auto& part : rel) {
    if (part == "..") throw FormatError(where + ", a path with '..'; shards must lie inside the checkpoint directory");
  }
  const fs::path full = dir / rel;
  std::error_code ec;
  const fs::path real = fs::canonical(full, ec);
  if (ec) throw FormatError(where + ", which cannot be opened: " + ec.message());
  const fs::path real_dir = fs::canonical(dir, ec);
  if (ec) throw FormatError("cannot resolve checkpoint directory '" + dir.string() + "': " + ec.message());
  if (std::mismatch(real_dir.begin(), real_dir.end(), real.begin(), real.end()).first != real_dir.end()) {
    throw FormatError(where + ", which resolves to '" + real.string() + "', outside the checkpoint directory '" +
                      real_dir.string() + "'");
  }
  if (!fs::is_regular_file(real, ec)) throw FormatError(where + ", which is not a regular file");
  return full;
}

std::map<std::string, torch::Tensor> load_sharded(const fs::path& dir, const fs::path& index) {
  std::ifstream in(index);
  if (!in) throw FormatError("cannot open '" + index.string() + "'");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {  // parse_error, or out_of_range for a number such as 1e999
    throw FormatError(index.string() + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.is_object() || !j.contains("weight_map") || !j["weight_map"].is_object()) {
    throw FormatError(index.string() + ": field 'weight_map' is missing or not an object of tensor name -> shard file");
  }
  // shard -> the tensors the map assigns to it
  std::map<std::string, std::vector<std::string>> assigned;
  std::map<std::string, std::string> shard_of;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) {
    if (!it.value().is_string()) {
      throw FormatError(index.string() + ": weight_map entry '" + it.key() + "' is not a shard file name (a string)");
    }
    assigned[it.value().get<std::string>()].push_back(it.key());
    shard_of[it.key()] = it.value().get<std::string>();
  }
  // Each shard is read once; the map is honoured exactly: a shard holds the tensors the map assigns to it
  // and no others, so no tensor can come from two shards.
  std::map<std::string, torch::Tensor> all;
  std::map<std::string, std::string> found_in;
  for (const auto& [shard, names] : assigned) {
    const fs::path path = shard_path(index, dir, shard, names.front());
    const auto tensors = load_safetensors(path.string());
    for (const auto& [name, t] : tensors) {
      if (auto f = found_in.find(name); f != found_in.end()) {
        throw FormatError(path.string() + ": tensor '" + name + "' is also in shard '" + f->second + "' (" +
                          index.string() + " lists both shards)");
      }
      found_in[name] = shard;
      const auto m = shard_of.find(name);
      if (m == shard_of.end()) {
        throw FormatError(path.string() + ": tensor '" + name + "' is not in the weight_map of " + index.string());
      }
      if (m->second != shard) {
        throw FormatError(path.string() + ": tensor '" + name + "' is in this shard, but the weight_map of " +
                          index.string() + " assigns it to shard '" + m->second + "'");
      }
      check_weight(path.string(), name, t);
      all.emplace(name, t);
    }
  }
  for (const auto& [name, shard] : shard_of) {
    if (!found_in.count(name)) {
      throw FormatError(index.string() + ": weight_map assigns tensor '" + name + "' to shard '" + shard +
                        "', which does not hold it (" + (dir / shard).string() + ")");
    }
  }
  return all;
}

// The file whose tensors load_directory_tensors reads, to name in errors.
fs::path weights_file(const std::string& dir) {
  const fs::path single = fs::path(dir) / "model.safetensors";
  return fs::exists(single) ? single : fs::path(dir) / "model.safetensors.index.json";
}

}  // namespace

void load_state(LCKVForCausalLM& model, const std::map<std::string, torch::Tensor>& tensors, const std::string& source) {
  copy_state(model, tensors, source, /*checked=*/false);
}

std::map<std::string, torch::Tensor> load_directory_tensors(const std::string& dir) {
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(single)) {
    auto tensors = load_safetensors(single.string());
    check_weights(single.string(), tensors);
    return tensors;
  }
  if (!fs::exists(index)) {
    throw FormatError("'" + dir + "' has neither model.safetensors nor model.safetensors.index.json: not a checkpoint directory");
  }
  return load_sharded(fs::path(dir), index);
}

std::optional<std::string> latest_in_run(const std::string& run_dir) {
  const fs::path latest = fs::path(run_dir) / "latest";
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(latest, ec))) return std::nullopt;
  if (fs::is_directory(latest, ec)) return latest.string();  // a symlink to the checkpoint
  std::ifstream in(latest);
  std::string name;
  if (!in || !std::getline(in, name)) throw FormatError("cannot read '" + latest.string() + "'");
  while (!name.empty() && (name.back() == '\r' || name.back() == ' ')) name.pop_back();
  const fs::path rel(name);
  const bool escapes = std::any_of(rel.begin(), rel.end(), [](const fs::path& part) { return part == ".."; });
  if (name.empty() || rel.has_root_path() || escapes) {
    throw FormatError("'" + latest.string() + "' names '" + name +
                      "', expected the name of a checkpoint directory inside '" + run_dir + "'");
  }
  return (fs::path(run_dir) / rel).string();
}

std::string resolve_checkpoint_dir(const std::string& path) {
  const fs::path p(path);
  std::error_code ec;
  if (fs::is_directory(p, ec)) {
    if (fs::exists(p / "config.json", ec)) return path;
    if (const std::optional<std::string> latest = latest_in_run(path)) {
      if (!fs::exists(fs::path(*latest) / "config.json", ec)) {
        throw FormatError("'" + (p / "latest").string() + "' names '" + *latest +
                          "', which is not a checkpoint directory (no config.json)");
      }
      return *latest;
    }
    throw FormatError("'" + path + "' has no config.json: not a checkpoint directory, nor a run directory of "
                      "lckv-train (looked for '" + (p / "config.json").string() + "' and '" + (p / "latest").string() +
                      "')");
  }
  if (fs::is_regular_file(p, ec) && p.filename() == "latest") {
    const std::string run_dir = p.has_parent_path() ? p.parent_path().string() : std::string(".");
    return resolve_checkpoint_dir(*latest_in_run(run_dir));
  }
  if (!fs::exists(p, ec)) {
    throw FormatError("'" + path + "' does not exist: not a checkpoint directory (with config.json), a run "
                      "directory of lckv-train or its 'latest' file");
  }
  throw FormatError("'" + path + "' is not a checkpoint directory, a run directory or its 'latest' file");
}

LCKVForCausalLM load_pretrained(const std::string& path, torch::ScalarType dtype) {
  const std::string dir = resolve_checkpoint_dir(path);
  const fs::path config_path = fs::path(dir) / "config.json";
  if (!fs::exists(config_path)) throw FormatError("'" + dir + "' has no config.json: not a checkpoint directory");
  LCKVForCausalLM model(LCKVConfig::from_file(config_path.string()));
  model->to(dtype);
  copy_state(model, load_directory_tensors(dir), weights_file(dir).string(), /*checked=*/true);
  return model;
}

void write_hf_tokenizer_config(const std::string& dir) {
  const fs::path model_path = fs::path(dir) / "tokenizer.model";
  if (!fs::exists(model_path)) return;
  // The special tokens by their pieces in this model (transformers' defaults "<s>", "</s>" are Llama's, not every
  // model's), read with SentencePiece itself; lckv-generate's default prompt format (BOS, no EOS) is the one written.
  sentencepiece::SentencePieceProcessor sp;
  const auto status = sp.Load(model_path.string());
  if (!status.ok()) {
    throw FormatError(model_path.string() + ": not a SentencePiece model (" + status.ToString() +
                      "), so no tokenizer_config.json for transformers can be written");
  }
  nlohmann::json j = {{"tokenizer_class", "LlamaTokenizer"}, {"add_bos_token", sp.bos_id() >= 0},
                      {"add_eos_token", false}, {"clean_up_tokenization_spaces", false}};
  const std::pair<const char*, int> specials[] = {
      {"bos_token", sp.bos_id()}, {"eos_token", sp.eos_id()}, {"unk_token", sp.unk_id()}, {"pad_token", sp.pad_id()}};
  for (const auto& [field, id] : specials) j[field] = id >= 0 ? nlohmann::json(sp.IdToPiece(id)) : nlohmann::json();
  try {
    write_file_atomically(fs::path(dir) / "tokenizer_config.json", j.dump(2) + "\n");
  } catch (const FileError& e) {
    throw FormatError(e.what());
  }
}

void save_pretrained(LCKVForCausalLM& model, const std::string& dir, torch::ScalarType dtype) {
  if (!is_weight_dtype(dtype)) {
    throw FormatError("save_pretrained into '" + dir + "': dtype torch." + c10::getDtypeNames(dtype).first +
                      " is not a weight dtype; expected float32, float64, float16 or bfloat16");
  }
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw FormatError("cannot create checkpoint directory '" + dir + "': " + ec.message());
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (auto& [name, p] : hf_state_dict(model)) tensors.emplace_back(name, p.detach().to(dtype));
  save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  LCKVConfig c = model->config;
  c.torch_dtype = float_dtype(dtype).hf;
  c.save((fs::path(dir) / "config.json").string());
  // config.json's auto_map names lckv_hf.py (an LCKV model's, docs/design.md §5): transformers imports it with
  // trust_remote_code=True, and it takes the classes from the installed lckv package.
  if (!c.is_identity()) {
    try {
      write_file_atomically(fs::path(dir) / kHfRemoteCodeFile, kHfRemoteCode);
    } catch (const FileError& e) {
      throw FormatError(e.what());
    }
  }
  write_hf_tokenizer_config(dir);
}

}  // namespace lckv::io
