#include "lckv/io/checkpoint.h"

#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

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
bool ignorable(const std::string& name, bool tied) {
  return name.find("rotary_emb.inv_freq") != std::string::npos || (tied && name == "lm_head.weight");
}
}  // namespace

void load_state(LCKVForCausalLM& model, const std::map<std::string, torch::Tensor>& tensors, const std::string& source) {
  torch::NoGradGuard no_grad;
  std::set<std::string> used;
  for (auto& [name, param] : hf_state_dict(model)) {
    auto it = tensors.find(name);
    if (it == tensors.end()) throw FormatError(source + ": tensor '" + name + "' is missing");
    if (it->second.sizes() != param.sizes()) {
      throw FormatError(source + ": tensor '" + name + "' has shape " + c10::str(it->second.sizes()) + ", expected " +
                        c10::str(param.sizes()) + " from config.json");
    }
    param.copy_(it->second);
    used.insert(name);
  }
  for (const auto& [name, t] : tensors) {
    if (!used.count(name) && !ignorable(name, model->config.tie_word_embeddings)) {
      throw FormatError(source + ": tensor '" + name + "' is not a parameter of this model (does config.json's layer_types match the checkpoint?)");
    }
  }
}

std::map<std::string, torch::Tensor> load_directory_tensors(const std::string& dir) {
  const fs::path single = fs::path(dir) / "model.safetensors";
  const fs::path index = fs::path(dir) / "model.safetensors.index.json";
  if (fs::exists(single)) return load_safetensors(single.string());
  if (!fs::exists(index)) {
    throw FormatError("'" + dir + "' has neither model.safetensors nor model.safetensors.index.json: not a checkpoint directory");
  }
  std::ifstream in(index);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::parse_error& e) {
    throw FormatError(index.string() + ": not valid JSON (" + e.what() + ")");
  }
  if (!j.contains("weight_map") || !j["weight_map"].is_object()) {
    throw FormatError(index.string() + ": field 'weight_map' is missing");
  }
  std::set<std::string> shards;
  for (auto it = j["weight_map"].begin(); it != j["weight_map"].end(); ++it) shards.insert(it.value().get<std::string>());
  std::map<std::string, torch::Tensor> all;
  for (const auto& shard : shards) {
    for (auto& [name, t] : load_safetensors((fs::path(dir) / shard).string())) all.emplace(name, t);
  }
  return all;
}

LCKVForCausalLM load_pretrained(const std::string& dir, torch::ScalarType dtype) {
  const fs::path config_path = fs::path(dir) / "config.json";
  if (!fs::exists(config_path)) throw FormatError("'" + dir + "' has no config.json: not a checkpoint directory");
  LCKVForCausalLM model(LCKVConfig::from_file(config_path.string()));
  model->to(dtype);
  load_state(model, load_directory_tensors(dir), dir);
  return model;
}

void save_pretrained(LCKVForCausalLM& model, const std::string& dir, torch::ScalarType dtype) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) throw FormatError("cannot create checkpoint directory '" + dir + "': " + ec.message());
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (auto& [name, p] : hf_state_dict(model)) tensors.emplace_back(name, p.detach().to(dtype));
  save_safetensors((fs::path(dir) / "model.safetensors").string(), tensors, {{"format", "pt"}});
  LCKVConfig c = model->config;
  c.torch_dtype = dtype == torch::kBFloat16 ? "bfloat16" : dtype == torch::kHalf ? "float16" : dtype == torch::kDouble ? "float64" : "float32";
  c.save((fs::path(dir) / "config.json").string());
}

}  // namespace lckv::io
