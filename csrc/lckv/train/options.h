// The options of a training run (TrainOptions) and the one table that describes them: the JSON run
// file's fields, lckv-train's flags (the field name with '-' for '_') and python -m lckv.train's
// flags all come from option_fields(), with the help text written once, there.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

namespace CLI {
class App;
}

namespace lckv::train {

// Bad options, data, checkpoints or a diverged run. Messages name the file, field, value or step.
struct TrainError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Every setting of a run; the defaults are the values below. The meaning of each field is its help
// text in option_fields() (options.cpp).
struct TrainOptions {
  std::string model_config;
  std::string init_from;
  std::string data;
  std::string out;

  int64_t seq_len = 256;
  int64_t batch_size = 16;
  int grad_accum = 1;
  int64_t max_steps = 1000;
  int64_t max_tokens = 0;

  double lr = 1e-3;
  double min_lr_ratio = 0.1;
  int64_t warmup_steps = 100;
  double weight_decay = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double adam_eps = 1e-8;
  double grad_clip = 1.0;

  uint64_t seed = 1234;
  int threads = 2;
  std::string dtype = "auto";  // resolved to "bf16" or "fp32" by the Trainer (resolve_compute_dtype)
  std::string device = "cpu";

  int64_t eval_every = 200;
  int64_t eval_batches = 0;
  int64_t save_every = 500;
  int keep_checkpoints = 2;
  int64_t log_every = 10;
  bool resume = false;
  std::vector<std::string> allow_changes;
  std::string metrics;

  std::string prompt;
  int64_t generate_tokens = 64;

  // Data parallelism (under torchrun's variables; distributed.h).
  bool shard_optimizer = false;
  double dist_timeout_s = 300;
  double bucket_mb = 25;

  // Fields over the defaults. Throws TrainError naming `source` and the field on an unknown field, a
  // mistyped value, a non-integer or out-of-range integer.
  static TrainOptions from_json(const nlohmann::json& j, const std::string& source = "run file");
  static TrainOptions from_file(const std::string& path);  // a JSON run file
  nlohmann::json to_json() const;
  void validate() const;  // every range check; also checks that model_config, data, out are set

  bool bf16() const { return dtype == "bf16"; }
  int64_t tokens_per_step() const { return seq_len * batch_size * grad_accum; }
};

using OptionMember =
    std::variant<std::string TrainOptions::*, bool TrainOptions::*, int TrainOptions::*, int64_t TrainOptions::*,
                 uint64_t TrainOptions::*, double TrainOptions::*, std::vector<std::string> TrainOptions::*>;

// One row of the option table.
struct OptionField {
  const char* name;  // run-file field; the flag is "--" + name with '-' for '_'
  OptionMember member;
  const char* help;
  // Whether changing it on --resume changes what the run computes (refused unless listed in allow_changes).
  bool changes_result = false;
};
const std::vector<OptionField>& option_fields();
std::string flag_name(const OptionField& field);  // "--seq-len"
// "string", "bool", "int" or "float" (lists are "list": several values, comma-separated on a command line).
std::string kind_name(const OptionField& field);

// Adds one CLI11 option per field to `app`, writing into `o`, whose current values are the defaults.
void add_cli_options(CLI::App& app, TrainOptions& o);

// The fields whose values differ between two option sets, as "name: old -> new" (resume reports them).
std::vector<std::string> changed_fields(const nlohmann::json& before, const nlohmann::json& after,
                                        bool changes_result_only);

}  // namespace lckv::train
