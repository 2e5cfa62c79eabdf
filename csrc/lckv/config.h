// LCKVConfig: a Hugging Face LlamaConfig plus the LCKV fields (docs/design.md §1, §5), and the facts
// derived from `layer_types` that the model and the cache need: which layers compute KV, which
// attend top, and the iteration plan (cyclic segments). Torch-free so tools can read configs cheaply.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace lckv {

// Every configuration error is reported with this type; messages name the field and the value.
struct ConfigError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// One entry of `layer_types`: the layer whose KVs this layer's queries read, and whether it
// uses a sliding window of `sliding_window` keys (the "s" suffix).
struct LayerType {
  int target = 0;
  bool sliding = false;
  bool operator==(const LayerType& o) const { return target == o.target && sliding == o.sliding; }
};

// Parses "0_6_6s_7" into per-layer entries; throws ConfigError naming the bad entry.
std::vector<LayerType> parse_layer_types(const std::string& text, int num_layers);
std::string format_layer_types(const std::vector<LayerType>& types);

// A contiguous range of layers [first, last]. A cyclic segment starts at a layer that attends
// top and is extended until no layer inside attends beyond `last`; it runs m + b times.
struct Segment {
  int first = 0;
  int last = 0;
  bool cyclic = false;
  // Layers in this segment whose KVs are read by a layer below them (the "top targets"): their
  // KVs start as zeros and carry over from one iteration to the next.
  std::vector<int> top_targets;
  // The last layer whose output matters to the next iteration: in every iteration but the last,
  // layers above it need not run, and this layer only needs its K/V projection.
  int last_top_target() const { return top_targets.empty() ? last : top_targets.back(); }
};

struct IterationPlan {
  std::vector<Segment> segments;
};

// A RoPE scaling of a Hugging Face config (`rope_scaling` in transformers 4, `rope_parameters` in 5), computed as
// transformers' modeling_rope_utils does. No scaling ("default") is no RopeScaling at all. from_json resolves
// transformers' defaults into these fields, so a config written back means the same without them.
struct RopeScaling {
  std::string type;  // "linear", "llama3" or "yarn"
  double factor = 1.0;
  // llama3
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  // llama3 and yarn; from_json defaults it to max_position_embeddings, as transformers 5 does.
  double original_max_position_embeddings = 8192;
  // yarn: cos and sin are multiplied by attention_factor (resolved from `attention_factor`, or `mscale` /
  // `mscale_all_dim`, or 0.1 ln(factor) + 1); the ramp between interpolated and extrapolated frequencies runs over
  // the dimensions that rotate between beta_slow and beta_fast times over original_max_position_embeddings.
  double attention_factor = 1.0;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  bool truncate = true;

  bool operator==(const RopeScaling& o) const {
    return type == o.type && factor == o.factor && low_freq_factor == o.low_freq_factor &&
           high_freq_factor == o.high_freq_factor &&
           original_max_position_embeddings == o.original_max_position_embeddings &&
           attention_factor == o.attention_factor && beta_fast == o.beta_fast && beta_slow == o.beta_slow &&
           truncate == o.truncate;
  }
  bool operator!=(const RopeScaling& o) const { return !(*this == o); }
};

// Bounds that validate() enforces besides the field's own rules, so that a config either describes a
// model that can be built and run or is refused before anything is allocated:
//   forward_passes (m) <= kMaxPasses, backward_passes (b) <= kMaxPasses: m + b iterations at least as
//     many as the tokens already give the exact result (docs/design.md §1, the sequential definition), so more
//     only cost time; the bound keeps a forward finite and m + b within an int.
//   num_hidden_layers <= kMaxLayers: every layer is several torch modules (the deepest published
//     models have < 200 layers).
//   parameter_count() <= kMaxParameters (2^40, 4 TiB in float32), counted in int64 with overflow
//     checks; the error gives the count and its bytes in float32.
constexpr int kMaxPasses = 1'000'000;
constexpr int kMaxLayers = 100'000;
constexpr int64_t kMaxParameters = int64_t{1} << 40;

// How to_json writes a config: kAuto is the mapping of docs/design.md §5 (a plain Llama as transformers' Llama, any
// other model in the reference's LCKV format); kLCKV is the LCKV format for every model (lckv.hf.LCKVLlamaConfig, whose
// model_type is "lckv-llama" whatever its layer_types).
enum class ConfigFormat { kAuto, kLCKV };

struct LCKVConfig {
  // LlamaConfig fields. The shape fields have no default: a config without them is rejected.
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;  // defaults to num_attention_heads
  int64_t head_dim = 0;         // defaults to hidden_size / num_attention_heads
  std::string hidden_act = "silu";
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::optional<RopeScaling> rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
  double initializer_range = 0.02;
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;
  std::optional<int64_t> pad_token_id;
  std::string torch_dtype = "float32";
  std::string model_type = "lckv-llama";

  // LCKV fields (docs/design.md §5). Defaults are the reference implementation's.
  std::vector<LayerType> layer_types;  // defaults to identity
  int forward_passes = 7;
  int backward_passes = 2;
  int64_t sliding_window = 4096;
  bool use_sequential = false;
  bool force_nodiag = false;

  // Reads a config.json object; throws ConfigError naming the field on a missing or bad value.
  static LCKVConfig from_json(const nlohmann::json& j);
  static LCKVConfig from_file(const std::string& path);
  // Parses config.json text; `path` names the file it came from in messages ("" for none). Nesting
  // deeper than json_fields::kMaxDepth and numbers beyond double (1e999) are refused by field.
  static LCKVConfig from_json_text(const std::string& text, const std::string& path = "");
  // The config.json we write (docs/design.md §5): a plain Llama (is_identity: no sliding layers, no force_nodiag) as transformers' Llama, without the
  // LCKV fields (they mean nothing there, and reading it back gives their defaults); any other model in the reference's
  // LCKV format with an auto_map. from_json reads both back.
  nlohmann::json to_json(ConfigFormat format = ConfigFormat::kAuto) const;
  void save(const std::string& path) const;  // atomically (temp file + rename)

  // Checks every invariant of the fields; from_json calls it, code that edits a config should too.
  void validate() const;

  // Derived facts.
  int target(int layer) const { return layer_types.at(layer).target; }
  bool layer_computes_kv(int layer) const;
  bool layer_attends_top(int layer) const { return target(layer) > layer; }
  // The diagonal is masked when the target's KV of the current token does not exist yet.
  bool layer_masks_diagonal(int layer) const { return layer_attends_top(layer) || force_nodiag; }
  int64_t layer_window(int layer) const { return layer_types.at(layer).sliding ? sliding_window : 0; }
  std::vector<int> kv_layers() const;
  IterationPlan iteration_plan() const;
  bool is_identity() const;  // a standard Llama, transformers' LlamaForCausalLM (no sliding window, no force_nodiag)
  // Parameters of the model (embeddings, layers, K/V projections of the KV layers, final norm, LM
  // head unless tied); validates first.
  int64_t parameter_count() const;

 private:
  void check_layer_types_size() const;  // ConfigError unless layer_types has num_hidden_layers entries
};

// Matmul FLOPs per token of one training step (forward + backward, backward = 2x forward) as the
// iteration plan runs it with m no-grad and b grad iterations: the cost model that the
// train-step benchmark compares measured time ratios with.
double training_flops_per_token(const LCKVConfig& c, int64_t seq_len, int forward_passes, int backward_passes);

}  // namespace lckv
