#include "lckv/train/checkpoint.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "lckv/data/tokenizer.h"
#include "lckv/files.h"
#include "lckv/io/checkpoint.h"
#include "lckv/io/safetensors.h"
#include "lckv/json_fields.h"

namespace lckv::train {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string checkpoint_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%06lld", static_cast<long long>(step));
  return buf;
}

torch::Tensor cpu_rng_state() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get_state();
}

void set_cpu_rng_state(const torch::Tensor& state) {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  gen.set_state(state);
}

namespace {

std::string to_hex(const torch::Tensor& bytes) {
  const torch::Tensor b = bytes.contiguous();
  const auto* p = b.data_ptr<uint8_t>();
  static const char* digits = "0123456789abcdef";
  std::string s;
  s.reserve(2 * b.numel());
  for (int64_t i = 0; i < b.numel(); ++i) {
    s.push_back(digits[p[i] >> 4]);
    s.push_back(digits[p[i] & 15]);
  }
  return s;
}

torch::Tensor from_hex(const std::string& s, const std::string& source) {
  if (s.size() % 2) throw TrainError(source + ": field 'rng_cpu' has an odd number of hex digits");
  torch::Tensor b = torch::empty({static_cast<int64_t>(s.size() / 2)}, torch::kUInt8);
  auto* p = b.data_ptr<uint8_t>();
  auto digit = [&](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    throw TrainError(source + ": field 'rng_cpu' holds a non-hex character");
  };
  for (std::size_t i = 0; i < s.size() / 2; ++i) p[i] = static_cast<uint8_t>(digit(s[2 * i]) << 4 | digit(s[2 * i + 1]));
  return b;
}

std::vector<fs::path> checkpoints_in(const fs::path& out) {
  std::vector<fs::path> found;
  for (const auto& entry : fs::directory_iterator(out)) {
    const std::string n = entry.path().filename().string();
    if (entry.is_directory() && n.rfind("step_", 0) == 0) found.push_back(entry.path());
  }
  std::sort(found.begin(), found.end());
  return found;
}

}  // namespace

std::string save_checkpoint(const std::string& out_dir, LCKVForCausalLM& model, Optimizer& optimizer,
                            const TrainerState& state, int keep, const std::string& tokenizer) {
  const fs::path out(out_dir);
  const std::string name = checkpoint_name(state.step);
  const fs::path tmp = out / (".tmp_" + name);
  const fs::path final_dir = out / name;
  const std::optional<std::string> previous = latest_checkpoint(out_dir);
  try {
    fs::remove_all(tmp);
    io::save_pretrained(model, tmp.string(), torch::kFloat);
    optimizer.save((tmp / "optimizer.pt").string());
    const json j = {{"format", "lckv-train-state"},
                    {"version", 1},
                    {"step", state.step},
                    {"total_steps", state.total_steps},
                    {"tokens_seen", state.tokens_seen},
                    {"elapsed_s", state.elapsed_s},
                    {"loader", state.loader},
                    {"rng_cpu", to_hex(state.rng_cpu)},
                    {"optimizer", state.optimizer},
                    {"options", state.options}};
    write_file_atomically(tmp / "trainer_state.json", j.dump(2) + "\n");
    if (!tokenizer.empty()) {
      data::copy_tokenizer(tokenizer, tmp.string());
      io::write_hf_tokenizer_config(tmp.string());  // so transformers' AutoTokenizer / pipeline load it too
    }
    sync_directory(tmp);
    // A checkpoint of the same step (a run resumed and stopped again at once) is replaced only
    // after the new one is complete.
    remove_all_atomically(final_dir);
    fs::rename(tmp, final_dir);
    sync_directory(out);
    write_file_atomically(out / "latest", name + "\n");
  } catch (const std::exception& e) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw TrainError("cannot save checkpoint '" + final_dir.string() + "': " + e.what() +
                     (previous ? "; the last complete checkpoint '" + *previous + "' and '" + (out / "latest").string() +
                                     "' are kept"
                               : std::string("; no earlier checkpoint exists")));
  }
  const std::vector<fs::path> all = checkpoints_in(out);
  for (std::size_t i = 0; i + static_cast<std::size_t>(keep) < all.size(); ++i) {
    if (all[i] != final_dir) remove_all_atomically(all[i]);
  }
  return final_dir.string();
}

std::optional<std::string> latest_checkpoint(const std::string& out) {
  const fs::path latest = fs::path(out) / "latest";
  std::ifstream in(latest);
  std::string name;
  if (!in || !std::getline(in, name) || name.empty()) return std::nullopt;
  if (name.find('/') != std::string::npos || name.rfind("step_", 0) != 0) {
    throw TrainError("'" + latest.string() + "' names '" + name + "', not a checkpoint directory step_NNNNNN");
  }
  return (fs::path(out) / name).string();
}

void remove_stale_temporaries(const std::string& out) {
  std::error_code ec;
  if (!fs::is_directory(out, ec)) return;
  for (const auto& entry : fs::directory_iterator(out)) {
    const std::string n = entry.path().filename().string();
    if (n.rfind(".tmp_step_", 0) == 0 || n.rfind(".trash_", 0) == 0) fs::remove_all(entry.path(), ec);
  }
}

TrainerState load_checkpoint(const std::string& dir, LCKVForCausalLM& model, Optimizer& optimizer,
                             torch::Device device) {
  const fs::path d(dir);
  auto fail = [&](const std::string& why) { return TrainError("cannot resume from '" + dir + "': " + why); };
  for (const char* file : {"config.json", "model.safetensors", "optimizer.pt", "trainer_state.json"}) {
    if (!fs::exists(d / file)) throw fail(std::string("it has no ") + file);
  }
  // The checkpoint's model must be the one this run builds.
  json saved, current = model->config.to_json();
  try {
    saved = LCKVConfig::from_file((d / "config.json").string()).to_json();
  } catch (const ConfigError& e) {
    throw fail(e.what());
  }
  saved.erase("torch_dtype");
  current.erase("torch_dtype");
  std::string differences;
  for (auto it = current.begin(); it != current.end(); ++it) {
    const auto other = saved.find(it.key());
    if (other == saved.end() || *other != it.value()) {
      differences += std::string(differences.empty() ? "" : ", ") + it.key() + " " +
                     (other == saved.end() ? std::string("(missing)") : other->dump()) + " vs " + it.value().dump();
    }
  }
  if (!differences.empty()) {
    throw fail("its config.json does not match this run's model (model_config, vocab_size from the data): " +
               differences + " (checkpoint vs this run)");
  }

  const fs::path state_path = d / "trainer_state.json";
  TrainerState s;
  try {
    const json j = json_fields::parse_file<TrainError>(state_path.string(), "trainer state");
    s.step = j.at("step").get<int64_t>();
    s.total_steps = j.at("total_steps").get<int64_t>();
    s.tokens_seen = j.at("tokens_seen").get<int64_t>();
    s.elapsed_s = j.at("elapsed_s").get<double>();
    s.loader = j.at("loader").get<data::LoaderState>();
    s.rng_cpu = from_hex(j.at("rng_cpu").get<std::string>(), state_path.string());
    s.optimizer = j.value("optimizer", std::string("adamw"));  // version-1 files written before the field existed
    s.options = j.at("options");
    if (s.step < 0 || s.tokens_seen < 0 || !s.options.is_object()) throw TrainError("a field is out of range");
  } catch (const TrainError& e) {
    throw fail(state_path.string() + ": " + e.what());
  } catch (const std::exception& e) {
    throw fail(state_path.string() + " is not a valid trainer state (" + e.what() + ")");
  }
  if (s.optimizer != optimizer.kind()) {
    throw fail("its optimizer.pt was written by optimizer '" + s.optimizer + "' but this run uses '" +
               optimizer.kind() + "'");
  }
  const std::string weights = (d / "model.safetensors").string();
  try {
    io::load_state(model, io::load_safetensors(weights), weights);
  } catch (const std::exception& e) {
    throw fail(e.what());
  }
  try {
    optimizer.load((d / "optimizer.pt").string(), device);
  } catch (const std::exception& e) {
    throw fail(e.what());
  }
  return s;
}

}  // namespace lckv::train
