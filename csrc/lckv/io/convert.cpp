#include "lckv/io/convert.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <filesystem>
#include <regex>
#include <set>

#include <unistd.h>

#include "lckv/data/tokenizer.h"
#include "lckv/dtype.h"
#include "lckv/files.h"
#include "lckv/io/checkpoint.h"

namespace lckv::io {

namespace fs = std::filesystem;

KVInit parse_kv_init(const std::string& name) {
  if (name == "average") return KVInit::kAverage;
  if (name == "copy") return KVInit::kCopy;
  if (name == "random") return KVInit::kRandom;
  throw ConfigError("kv_init: unknown initialisation \"" + name + "\" (expected average, copy or random)");
}

std::string to_string(KVInit init) {
  switch (init) {
    case KVInit::kAverage: return "average";
    case KVInit::kCopy: return "copy";
    default: return "random";
  }
}

LCKVConfig converted_config(const LCKVConfig& source, const ConvertOptions& options, const std::string& source_name) {
  LCKVConfig c = source;
  if (options.layer_types) {
    const std::string& text = *options.layer_types;
    const int64_t entries = text.empty() ? 0 : std::count(text.begin(), text.end(), '_') + 1;
    if (entries != source.num_hidden_layers) {
      throw ConfigError("layer_types \"" + text + "\" has " + std::to_string(entries) + " entries but the source " +
                        source_name + " has " + std::to_string(source.num_hidden_layers) +
                        " layers (num_hidden_layers): give one entry per layer");
    }
    c.layer_types = parse_layer_types(text, source.num_hidden_layers);
  }
  if (options.forward_passes) c.forward_passes = *options.forward_passes;
  if (options.backward_passes) c.backward_passes = *options.backward_passes;
  if (options.sliding_window) c.sliding_window = *options.sliding_window;
  c.validate();
  return c;
}

namespace {

// "model.layers.<i>.self_attn.<k|v>_proj.<weight|bias>"
const std::regex kKVName(R"(model\.layers\.(\d+)\.self_attn\.([kv]_proj\.(?:weight|bias)))");

std::string kv_name(int layer, const std::string& part) {
  return "model.layers." + std::to_string(layer) + ".self_attn." + part;
}

// Tensors that HF checkpoints may carry but that are not parameters (as load_state ignores them).
bool ignorable(const std::string& name) { return name.find("rotary_emb.inv_freq") != std::string::npos; }

}  // namespace

std::vector<TensorToWrite> convert_tensors(const LCKVConfig& src, const std::map<std::string, torch::Tensor>& source,
                                           const LCKVConfig& dst, KVInit kv_init, uint64_t seed,
                                           torch::ScalarType dtype, const std::string& source_name) {
  float_dtype(dtype);  // refuses a non-float dtype
  if (src.num_hidden_layers != dst.num_hidden_layers) {
    throw ConfigError("conversion keeps the number of layers: the source " + source_name + " has " +
                      std::to_string(src.num_hidden_layers) + ", the target " + std::to_string(dst.num_hidden_layers));
  }
  std::vector<std::string> parts = {"k_proj.weight", "v_proj.weight"};
  if (src.attention_bias) {
    parts.push_back("k_proj.bias");
    parts.push_back("v_proj.bias");
  }
  const int64_t kv_width = src.num_key_value_heads * src.head_dim;
  std::vector<TensorToWrite> out;
  auto pass_through = [&](const std::string& name, const torch::Tensor& t) {
    out.push_back({name, dtype, t.sizes().vec(), [t, dtype] { return t.to(dtype); }});
  };
  std::set<std::string> kv_found;
  for (const auto& [name, t] : source) {
    std::smatch m;
    if (!std::regex_match(name, m, kKVName)) {
      if (!ignorable(name)) pass_through(name, t);
      continue;
    }
    const int layer = std::stoi(m[1].str());
    const std::string part = m[2].str();
    const std::string where = source_name + ": tensor '" + name + "'";
    if (layer >= src.num_hidden_layers || !src.layer_computes_kv(layer)) {
      throw FormatError(where + ": layer " + std::to_string(layer) + " computes no KV in its config.json (layer_types " +
                        format_layer_types(src.layer_types) + ")");
    }
    if (std::find(parts.begin(), parts.end(), part) == parts.end()) {
      throw FormatError(where + " is present, but config.json sets attention_bias: false");
    }
    const std::vector<int64_t> expected = part.find("weight") != std::string::npos
                                              ? std::vector<int64_t>{kv_width, src.hidden_size}
                                              : std::vector<int64_t>{kv_width};
    if (t.sizes() != at::IntArrayRef(expected)) {
      throw FormatError(where + " has shape " + c10::str(t.sizes()) + ", expected " +
                        c10::str(at::IntArrayRef(expected)) + " from config.json");
    }
    kv_found.insert(name);
  }
  for (int layer : src.kv_layers()) {
    for (const std::string& part : parts) {
      if (!kv_found.count(kv_name(layer, part))) {
        throw FormatError(source_name + ": tensor '" + kv_name(layer, part) + "' is missing (layer " +
                          std::to_string(layer) + " computes KV in its config.json)");
      }
    }
  }

  // The layer whose source K/V projections each new KV layer starts from (copy), or which it averages.
  auto used_by = [&](int layer) { return src.layer_computes_kv(layer) ? layer : src.target(layer); };
  for (int j : dst.kv_layers()) {
    std::vector<int> from;
    if (kv_init == KVInit::kCopy) {
      from.push_back(used_by(j));
    } else if (kv_init == KVInit::kAverage) {
      for (int i = 0; i < dst.num_hidden_layers; ++i) {
        if (dst.target(i) == j) from.push_back(src.target(i));
      }
    }
    for (size_t p = 0; p < parts.size(); ++p) {
      const std::string& part = parts[p];
      const std::string name = kv_name(j, part);
      const std::vector<int64_t> shape = source.at(kv_name(src.kv_layers().front(), part)).sizes().vec();
      if (kv_init == KVInit::kRandom) {
        // One generator per tensor, seeded by (seed, layer, part): the values do not depend on the order
        // tensors are produced in.
        const uint64_t tensor_seed = seed * 1000003 + static_cast<uint64_t>(j) * 4 + p;
        const double init_std = dst.initializer_range;
        out.push_back({name, dtype, shape, [name, shape, init_std, tensor_seed, dtype] {
                         torch::Tensor t = torch::empty(shape, torch::kFloat);
                         init_parameter(name, t, init_std, at::make_generator<at::CPUGeneratorImpl>(tensor_seed));
                         return t.to(dtype);
                       }});
        continue;
      }
      std::vector<torch::Tensor> terms;
      for (int i : from) terms.push_back(source.at(kv_name(i, part)));
      const bool one_source = std::all_of(from.begin(), from.end(), [&](int i) { return i == from.front(); });
      out.push_back({name, dtype, shape, [terms, one_source, dtype] {
                       // The mean of copies of one tensor is that tensor, exactly (no rounding through fp64).
                       if (one_source) return terms.front().to(dtype);
                       torch::Tensor sum = torch::zeros(terms.front().sizes(), torch::kDouble);
                       for (const torch::Tensor& t : terms) sum.add_(t.to(torch::kDouble));
                       return sum.div_(static_cast<double>(terms.size())).to(dtype);
                     }});
    }
  }

  int64_t values = 0;
  for (const TensorToWrite& t : out) values += c10::multiply_integers(t.shape);
  if (values != dst.parameter_count()) {
    throw FormatError(source_name + ": its tensors give the converted model " + std::to_string(values) +
                      " values, but the converted config describes " + std::to_string(dst.parameter_count()) +
                      " parameters: the source's tensors do not match its config.json");
  }
  return out;
}

namespace {

struct Source {
  std::string dir;  // the resolved checkpoint directory
  LCKVConfig config;
  std::map<std::string, torch::Tensor> tensors;  // views of the memory-mapped files
  std::string weights;                           // the weights file, named in errors
};

Source read_source(const std::string& path) {
  Source s;
  s.dir = resolve_checkpoint_dir(path);
  const fs::path config_path = fs::path(s.dir) / "config.json";
  if (!fs::exists(config_path)) throw FormatError("'" + s.dir + "' has no config.json: not a checkpoint directory");
  s.config = LCKVConfig::from_file(config_path.string());
  s.tensors = load_directory_tensors(s.dir);
  s.weights = fs::exists(fs::path(s.dir) / "model.safetensors") ? (fs::path(s.dir) / "model.safetensors").string()
                                                                 : (fs::path(s.dir) / "model.safetensors.index.json").string();
  return s;
}

// The source's tokenizer, if it has one, under its standard name (data::copy_tokenizer checks that it loads), plus
// the tokenizer_config.json transformers needs for a SentencePiece model.
void copy_tokenizer_if_any(const fs::path& from, const fs::path& to) {
  std::error_code ec;
  if (!fs::exists(from / "tokenizer.model", ec) && !fs::exists(from / "tokenizer.json", ec)) return;
  data::copy_tokenizer(data::find_tokenizer(from.string()), to.string());
  write_hf_tokenizer_config(to.string());
}

}  // namespace

LCKVConfig convert_checkpoint(const std::string& source, const std::string& out, const ConvertOptions& options,
                              std::optional<torch::ScalarType> dtype, bool overwrite, bool to_hf) {
  const fs::path target(out);
  std::error_code ec;
  if (fs::exists(target, ec) && !overwrite) {
    throw FormatError("output '" + out + "' already exists: choose another directory or pass --overwrite");
  }
  Source s = read_source(source);
  const std::string source_name = "'" + s.dir + "'";
  const LCKVConfig config = converted_config(s.config, options, source_name);
  const torch::ScalarType out_dtype = dtype ? *dtype : parse_float_dtype(s.config.torch_dtype, s.dir + "/config.json: torch_dtype");
  const std::vector<TensorToWrite> tensors =
      convert_tensors(s.config, s.tensors, config, options.kv_init, options.seed, out_dtype, s.weights);

  // Assembled in a hidden sibling of `out` (same filesystem), renamed into place when complete.
  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  fs::create_directories(parent, ec);
  const fs::path tmp = parent / (".tmp_convert_" + target.filename().string() + "_" + std::to_string(getpid()));
  fs::remove_all(tmp, ec);
  try {
    fs::create_directories(tmp);
    if (to_hf) {
      LCKVForCausalLM model(config);
      std::map<std::string, torch::Tensor> values;
      for (const TensorToWrite& t : tensors) values.emplace(t.name, t.produce());
      model->to(out_dtype);
      load_state(model, values, s.weights);
      values.clear();
      save_pretrained(model, tmp.string(), out_dtype);
    } else {
      save_safetensors((tmp / "model.safetensors").string(), tensors, {{"format", "pt"}});
      LCKVConfig written = config;
      written.torch_dtype = float_dtype(out_dtype).hf;
      written.save((tmp / "config.json").string());
    }
    copy_tokenizer_if_any(s.dir, tmp);
    sync_directory(tmp);
    if (overwrite) remove_all_atomically(target);
    fs::rename(tmp, target);
    sync_directory(parent);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  return config;
}

LCKVForCausalLM load_converted(const std::string& source, const ConvertOptions& options, torch::ScalarType dtype) {
  Source s = read_source(source);
  const LCKVConfig config = converted_config(s.config, options, "'" + s.dir + "'");
  LCKVForCausalLM model(config);
  model->to(dtype);
  std::map<std::string, torch::Tensor> values;
  for (const TensorToWrite& t : convert_tensors(s.config, s.tensors, config, options.kv_init, options.seed, dtype,
                                                s.weights)) {
    values.emplace(t.name, t.produce());
  }
  load_state(model, values, s.weights);
  return model;
}

}  // namespace lckv::io
