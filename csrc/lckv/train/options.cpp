#include "lckv/train/options.h"

#include <CLI/CLI.hpp>

#include <cmath>
#include <limits>
#include <set>

#include "lckv/dtype.h"
#include "lckv/json_fields.h"

namespace lckv::train {

using json = nlohmann::json;

const std::vector<OptionField>& option_fields() {
  using O = TrainOptions;
  static const std::vector<OptionField> fields = {
      {"model_config", &O::model_config,
       "Model config.json (e.g. configs/quickstart-lckv-w2.json); its vocab_size must equal the data's or be replaced "
       "by it (a note says so)"},
      {"init_from", &O::init_from,
       "Start from this checkpoint's weights (a checkpoint directory, a run directory or its latest; e.g. one written "
       "by lckv-convert) with a fresh optimizer and schedule at step 0: fine-tuning. The model config is the "
       "checkpoint's; a model_config given too must equal it", true},
      {"data", &O::data, "Directory written by lckv-prepare (meta.json, shards, tokenizer.model)", true},
      {"out", &O::out, "Output directory for checkpoints, metrics.jsonl and train.json (locked while the run lives)"},
      {"seq_len", &O::seq_len, "Tokens per training sequence (T)", true},
      {"batch_size", &O::batch_size, "Sequences per micro-batch", true},
      {"grad_accum", &O::grad_accum, "Micro-batches accumulated per optimizer step", true},
      {"max_steps", &O::max_steps, "Optimizer steps to train (ignored when max_tokens is set)", true},
      {"max_tokens", &O::max_tokens, "Token budget: train ceil(tokens / tokens per step) steps (0: use max_steps)", true},
      {"lr", &O::lr, "Peak learning rate", true},
      {"min_lr_ratio", &O::min_lr_ratio, "The cosine schedule ends at lr x this", true},
      {"warmup_steps", &O::warmup_steps, "Linear warmup steps (from lr / warmup_steps to lr)", true},
      {"weight_decay", &O::weight_decay, "AdamW weight decay of the 2-D weights (norms and biases: none)", true},
      {"beta1", &O::beta1, "AdamW beta1", true},
      {"beta2", &O::beta2, "AdamW beta2", true},
      {"adam_eps", &O::adam_eps, "AdamW epsilon", true},
      {"grad_clip", &O::grad_clip, "Clip the global gradient norm to this (0: no clipping)", true},
      {"seed", &O::seed, "Seed of the weight initialisation and the data order", true},
      {"threads", &O::threads, "Torch intra-op threads"},
      {"dtype", &O::dtype,
       "auto: bf16 where the device computes it natively (CUDA; CPUs with AMX or avx512_bf16), else fp32 (on resume: "
       "the checkpoint's); bf16: fp32 weights with bf16 autocast; fp32: plain fp32",
       true},
      {"device", &O::device, "cpu or cuda[:N]"},
      {"eval_every", &O::eval_every, "Validate every this many steps (0: only at the end)"},
      {"eval_batches", &O::eval_batches, "Validation batches per evaluation (0: the whole validation split)"},
      {"save_every", &O::save_every, "Checkpoint every this many steps (0: only at the end)"},
      {"keep_checkpoints", &O::keep_checkpoints, "Newest checkpoints to keep"},
      {"log_every", &O::log_every, "Progress line and metrics record every this many steps (the record holds the "
                                   "interval's mean loss)"},
      {"resume", &O::resume, "Continue the run in out from its latest checkpoint (same options give the same losses)"},
      {"allow_changes", &O::allow_changes,
       "With resume: options that change the result (batch size, lr, schedule, dtype, seed, data, ...) which may "
       "differ from the checkpoint's; any other such change is refused"},
      {"metrics", &O::metrics, "Metrics JSONL file (default <out>/metrics.jsonl)"},
      {"prompt", &O::prompt, "After training, greedy-generate a continuation of this text (checked at start-up)"},
      {"generate_tokens", &O::generate_tokens, "Tokens to generate from prompt"},
      {"shard_optimizer", &O::shard_optimizer,
       "Data-parallel runs: each rank keeps and updates only its 1/N slice of the AdamW state (ZeRO-1/2: "
       "reduce-scatter of the gradients, all-gather of the parameters); checkpoints hold the full state as without"},
      {"dist_timeout_s", &O::dist_timeout_s,
       "Data-parallel runs: seconds any rank waits for the others (start-up, each collective) before it stops with an "
       "error naming what it waited for"},
      {"bucket_mb", &O::bucket_mb,
       "Data-parallel runs: MiB of gradients per all-reduce bucket (reduced as soon as the backward completes one)"},
  };
  return fields;
}

std::string flag_name(const OptionField& field) {
  std::string flag = std::string("--") + field.name;
  for (char& c : flag) {
    if (c == '_') c = '-';
  }
  return flag;
}

namespace {

template <class T>
constexpr const char* kind_of() {
  if constexpr (std::is_same_v<T, std::string>) return "string";
  else if constexpr (std::is_same_v<T, bool>) return "bool";
  else if constexpr (std::is_same_v<T, std::vector<std::string>>) return "list";
  else if constexpr (std::is_integral_v<T>) return "int";
  else return "float";
}

// The value of a JSON field as T, or nothing with the reason (json_fields' rules: a fraction for an
// integer, an integer beyond T's range, a string for a number, ... are refused).
template <class T>
std::optional<T> exact_value(const json& v, std::string& why) {
  if constexpr (std::is_same_v<T, std::vector<std::string>>) {
    why = "expected a list of option names";
    if (!v.is_array()) return std::nullopt;
    T out;
    for (const json& e : v) {
      if (!e.is_string()) return std::nullopt;
      out.push_back(e.get<std::string>());
    }
    why.clear();
    return out;
  } else {
    why = json_fields::mismatch<T>(v);
    if (!why.empty()) return std::nullopt;
    return v.get<T>();
  }
}

// A value for an error message, cut short (a run file may hold anything).
std::string shown(const json& v) { return json_fields::describe(v); }

}  // namespace

std::string kind_name(const OptionField& field) {
  return std::visit([](auto member) { return std::string(kind_of<std::decay_t<decltype(TrainOptions{}.*member)>>()); },
                    field.member);
}

TrainOptions TrainOptions::from_json(const json& j, const std::string& source) {
  if (!j.is_object()) throw TrainError(source + ": expected a JSON object of options, got " + shown(j));
  TrainOptions o;
  std::set<std::string> known;
  for (const OptionField& f : option_fields()) {
    known.insert(f.name);
    const auto it = j.find(f.name);
    if (it == j.end()) continue;
    std::visit(
        [&](auto member) {
          using T = std::decay_t<decltype(o.*member)>;
          std::string why;
          const std::optional<T> value = exact_value<T>(*it, why);
          if (!value) throw TrainError(source + ": field '" + f.name + "': " + why + ", got " + shown(*it));
          o.*member = *value;
        },
        f.member);
  }
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!known.count(it.key())) throw TrainError(source + ": unknown field '" + it.key() + "'");
  }
  return o;
}

TrainOptions TrainOptions::from_file(const std::string& path) {
  return from_json(json_fields::parse_file<TrainError>(path, "run file"), "run file '" + path + "'");
}

json TrainOptions::to_json() const {
  json j = json::object();
  for (const OptionField& f : option_fields()) {
    std::visit([&](auto member) { j[f.name] = this->*member; }, f.member);
  }
  return j;
}

void TrainOptions::validate() const {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw TrainError("option " + what);
  };
  need(!model_config.empty() || !init_from.empty(),
       "model_config (--model-config) is required: a model config.json such as configs/tiny-lckv-w2.json (or "
       "init_from, a checkpoint to start from)");
  need(!data.empty(), "data (--data) is required: a directory written by lckv-prepare");
  need(!out.empty(), "out (--out) is required: the run's output directory");
  need(seq_len > 0, "seq_len must be positive, got " + std::to_string(seq_len));
  need(batch_size > 0, "batch_size must be positive, got " + std::to_string(batch_size));
  need(grad_accum > 0, "grad_accum must be positive, got " + std::to_string(grad_accum));
  // tokens per step and the token budget stay far from int64 overflow.
  need(seq_len <= (int64_t{1} << 24) && batch_size <= (int64_t{1} << 24) && grad_accum <= (1 << 20),
       "seq_len, batch_size or grad_accum is beyond any supported size (at most 2^24, 2^24, 2^20)");
  need(max_steps > 0 || max_tokens > 0, "max_steps or max_tokens must be positive");
  need(max_steps >= 0 && max_steps <= (int64_t{1} << 40), "max_steps must be in [0, 2^40], got " + std::to_string(max_steps));
  need(max_tokens >= 0 && max_tokens <= (int64_t{1} << 60), "max_tokens must be in [0, 2^60], got " + std::to_string(max_tokens));
  need(std::isfinite(lr) && lr > 0, "lr must be a positive number");
  need(min_lr_ratio >= 0 && min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]");
  need(warmup_steps >= 0, "warmup_steps must be >= 0");
  need(weight_decay >= 0, "weight_decay must be >= 0");
  need(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "beta1 and beta2 must be in [0, 1)");
  need(adam_eps > 0, "adam_eps must be positive");
  need(grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)");
  need(threads > 0 && threads <= 4096, "threads must be in [1, 4096], got " + std::to_string(threads));
  need(is_compute_dtype_name(dtype), compute_dtype_error("dtype", dtype));
  need(device == "cpu" || device.rfind("cuda", 0) == 0, "device must be \"cpu\" or \"cuda[:N]\", got \"" + device + "\"");
  need(eval_every >= 0 && eval_batches >= 0 && save_every >= 0, "eval_every, eval_batches and save_every must be >= 0");
  need(keep_checkpoints > 0, "keep_checkpoints must be positive");
  need(log_every > 0, "log_every must be positive");
  need(std::isfinite(dist_timeout_s) && dist_timeout_s >= 1 && dist_timeout_s <= 86400,
       "dist_timeout_s must be in [1, 86400] seconds, got " + std::to_string(dist_timeout_s));
  need(std::isfinite(bucket_mb) && bucket_mb > 0 && bucket_mb <= 65536, "bucket_mb must be in (0, 65536]");
  need(generate_tokens >= 0 && generate_tokens <= (int64_t{1} << 30), "generate_tokens must be in [0, 2^30]");
  for (const std::string& name : allow_changes) {
    bool ok = false;
    for (const OptionField& f : option_fields()) ok = ok || (f.changes_result && name == f.name);
    need(ok, "allow_changes: '" + name + "' is not an option whose change is refused on resume");
  }
}

void add_cli_options(CLI::App& app, TrainOptions& o) {
  for (const OptionField& f : option_fields()) {
    const std::string flag = flag_name(f);
    std::visit(
        [&](auto member) {
          using T = std::decay_t<decltype(o.*member)>;
          if constexpr (std::is_same_v<T, bool>) {
            app.add_flag(flag + ",!--no-" + flag.substr(2), o.*member, f.help);
          } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
            app.add_option(flag, o.*member, f.help)->delimiter(',')->capture_default_str();
          } else {
            app.add_option(flag, o.*member, f.help)->capture_default_str();
          }
        },
        f.member);
  }
}

std::vector<std::string> changed_fields(const json& before, const json& after, bool changes_result_only) {
  std::vector<std::string> out;
  for (const OptionField& f : option_fields()) {
    if (changes_result_only && !f.changes_result) continue;
    const auto a = before.find(f.name), b = after.find(f.name);
    const json old_value = a == before.end() ? json() : *a, new_value = b == after.end() ? json() : *b;
    if (old_value != new_value) out.push_back(std::string(f.name) + ": " + shown(old_value) + " -> " + shown(new_value));
  }
  return out;
}

}  // namespace lckv::train
