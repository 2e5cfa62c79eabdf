#include "lckv/config.h"

#include "lckv/files.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>

#include "lckv/json_fields.h"

namespace lckv {

using nlohmann::json;

std::vector<LayerType> parse_layer_types(const std::string& text, int num_layers) {
  std::vector<std::string> entries;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, '_')) entries.push_back(item);
  if (!text.empty() && text.back() == '_') entries.push_back("");
  if (static_cast<int>(entries.size()) != num_layers) {
    throw ConfigError("layer_types '" + text + "' has " + std::to_string(entries.size()) +
                      " entries, expected num_hidden_layers = " + std::to_string(num_layers));
  }
  std::vector<LayerType> types;
  for (int i = 0; i < num_layers; ++i) {
    const std::string& e = entries[i];
    const std::string where = "layer_types entry " + std::to_string(i) + " ('" + e + "')";
    if (e.empty()) throw ConfigError(where + " is empty, expected a layer index");
    size_t digits = 0;
    while (digits < e.size() && std::isdigit(static_cast<unsigned char>(e[digits]))) ++digits;
    if (digits == 0) throw ConfigError(where + " is not an integer layer index");
    LayerType t;
    const std::string suffix = e.substr(digits);
    if (suffix == "s") {
      t.sliding = true;
    } else if (!suffix.empty()) {
      throw ConfigError(where + " has unknown suffix '" + suffix + "', expected none or 's' (sliding window)");
    }
    if (digits > 9) throw ConfigError(where + " is out of range [0, " + std::to_string(num_layers) + ")");
    t.target = std::stoi(e.substr(0, digits));
    if (t.target >= num_layers) {
      throw ConfigError(where + " is out of range [0, " + std::to_string(num_layers) + ")");
    }
    types.push_back(t);
  }
  return types;
}

std::string format_layer_types(const std::vector<LayerType>& types) {
  std::string s;
  for (size_t i = 0; i < types.size(); ++i) {
    if (i) s += "_";
    s += std::to_string(types[i].target);
    if (types[i].sliding) s += "s";
  }
  return s;
}

namespace {

// Field errors read "config field 'x' has value ..., expected ..."; from_file prefixes the path.
constexpr const char* kWhere = "config";

template <typename T>
T get_required(const json& j, const char* key) {
  return json_fields::get_required<T, ConfigError>(j, key, kWhere);
}

template <typename T>
void get_optional(const json& j, const char* key, T& out) {
  json_fields::get_optional<T, ConfigError>(j, key, out, kWhere);
}

// A field of a nested object (rope_parameters), named "parent.key" in messages; true when present and not null.
template <typename T>
bool get_optional_in(const json& obj, const std::string& parent, const char* key, T& out) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return false;
  out = json_fields::get<T, ConfigError>(*it, parent + "." + key, kWhere);
  return true;
}

// bos/eos may be a list in newer HF configs; the first entry is the one we use, all must be ids.
void get_token_id(const json& j, const char* key, int64_t& out) {
  const auto it = j.find(key);
  if (it == j.end() || !it->is_array()) return get_optional(j, key, out);
  if (it->empty()) {
    throw ConfigError(std::string("config field '") + key +
                      "' is an empty list, expected a token id or a list of them");
  }
  for (std::size_t i = 0; i < it->size(); ++i) {
    const std::string field = std::string(key) + "[" + std::to_string(i) + "]";
    const int64_t id = json_fields::get<int64_t, ConfigError>((*it)[i], field, kWhere);
    if (i == 0) out = id;
  }
}

// a * b and a + b in int64, false on overflow.
bool mul(int64_t a, int64_t b, int64_t& out) { return !__builtin_mul_overflow(a, b, &out); }
bool add(int64_t a, int64_t b, int64_t& out) { return !__builtin_add_overflow(a, b, &out); }

// The parameter count of the model `c` describes (as lckv_model.cpp builds it), false on int64
// overflow. kv_layers: how many layers have K/V projections.
bool count_parameters(const LCKVConfig& c, int64_t kv_layers, int64_t& total) {
  const int64_t H = c.hidden_size, I = c.intermediate_size, L = c.num_hidden_layers;
  int64_t q_width, kv_width, x;
  if (!mul(c.num_attention_heads, c.head_dim, q_width)) return false;
  if (!mul(c.num_key_value_heads, c.head_dim, kv_width)) return false;
  int64_t layer = 0, kv = 0;
  // q_proj and o_proj, the MLP's three projections, two norms; biases when configured.
  if (!mul(H, q_width, x) || !mul(x, 2, x) || !add(layer, x, layer)) return false;
  if (!mul(H, I, x) || !mul(x, 3, x) || !add(layer, x, layer) || !mul(H, 2, x) || !add(layer, x, layer)) return false;
  if (c.attention_bias && (!add(layer, q_width, layer) || !add(layer, H, layer))) return false;
  if (c.mlp_bias && (!mul(I, 2, x) || !add(layer, x, layer) || !add(layer, H, layer))) return false;
  // k_proj and v_proj of the layers that compute KVs.
  if (!mul(H, kv_width, kv) || !mul(kv, 2, kv)) return false;
  if (c.attention_bias && (!mul(kv_width, 2, x) || !add(kv, x, kv))) return false;
  int64_t embed, layers, kvs;
  if (!mul(c.vocab_size, H, embed) || !mul(layer, L, layers) || !mul(kv, kv_layers, kvs)) return false;
  total = H;  // the final norm
  return add(total, embed, total) && (c.tie_word_embeddings || add(total, embed, total)) &&
         add(total, layers, total) && add(total, kvs, total);
}

// Refuses a model that could not be allocated before anything is: the rule is kMaxParameters.
void check_size(const LCKVConfig& c, int64_t kv_layers) {
  int64_t n = 0;
  const bool fits = count_parameters(c, kv_layers, n);
  if (fits && n <= kMaxParameters) return;
  const std::string shape = " (vocab_size " + std::to_string(c.vocab_size) + ", hidden_size " +
                            std::to_string(c.hidden_size) + ", intermediate_size " +
                            std::to_string(c.intermediate_size) + ", num_hidden_layers " +
                            std::to_string(c.num_hidden_layers) + ", head_dim " + std::to_string(c.head_dim) + ")";
  const std::string limit = ", more than the limit of 2^40 = " + std::to_string(kMaxParameters) +
                            " parameters (4 TiB in float32) that a config may describe";
  if (!fits) throw ConfigError("config describes a model of more than 2^63 parameters" + shape + limit);
  int64_t bytes = 0;
  const std::string byte_text = mul(n, 4, bytes) ? std::to_string(bytes) + " bytes" : "more than 2^63 bytes";
  throw ConfigError("config describes a model of " + std::to_string(n) + " parameters (" + byte_text +
                    " in float32)" + shape + limit);
}

// ---- Hugging Face configs as transformers 4 and 5 write them (docs/design.md §5.1, "Importing Hugging Face configs")

std::string number(double v) { return json(v).dump(); }

bool present(const json& j, const char* key) {
  const auto it = j.find(key);
  return it != j.end() && !it->is_null();
}

// partial_rotary_factor (top level or in a rope dict) rotates only part of each head; Llama rotates all of it.
void check_partial_rotary_factor(const json& obj, const std::string& field, const char* key) {
  double f = 1.0;
  const bool found = field.empty() ? json_fields::get_optional<double, ConfigError>(obj, key, f, kWhere)
                                   : get_optional_in(obj, field, key, f);
  if (found && f != 1.0) {
    const std::string name = field.empty() ? key : field + "." + key;
    throw ConfigError("config field '" + name + "' = " + number(f) +
                      " is not supported: a Llama rotates whole heads (expected 1 or no field)");
  }
}

// One rope dict: its own rope_theta, if it has one, and its scaling (none for "default").
struct RopeDict {
  std::string field;  // "rope_scaling" or "rope_parameters"
  std::optional<double> theta;
  std::optional<RopeScaling> scaling;
  bool states_original = false;  // the dict has its own original_max_position_embeddings
};

// The parameters each supported rope_type takes besides rope_type / type / rope_theta / partial_rotary_factor.
const std::vector<std::pair<std::string, std::vector<std::string>>>& rope_type_keys() {
  static const std::vector<std::pair<std::string, std::vector<std::string>>> keys = {
      {"default", {}},
      {"linear", {"factor"}},
      {"llama3", {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}},
      {"yarn",
       {"factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
        "mscale_all_dim", "truncate"}},
  };
  return keys;
}

// Reads a rope dict named `field` as transformers 5 standardizes and computes it (modeling_rope_utils): the type from
// "rope_type" or its old name "type"; a parameter the type requires that is missing, or a key the type does not take,
// is an error; original_max_position_embeddings defaults to max_position_embeddings; yarn's attention factor and
// betas are resolved here. dynamic (NTK) is refused: transformers recomputes its frequencies from the longest
// sequence seen so far, a state that cached decoding cannot reproduce.
RopeDict read_rope_dict(const json& d, const std::string& field, int64_t max_position_embeddings) {
  if (!d.is_object()) {
    throw ConfigError("config field '" + field + "' has value " + json_fields::describe(d) + ", expected an object");
  }
  std::string type, old_type;
  const bool has_type = get_optional_in(d, field, "rope_type", type);
  const bool has_old_type = get_optional_in(d, field, "type", old_type);
  if (has_type && has_old_type && type != old_type) {
    throw ConfigError("config field '" + field + "' has rope_type '" + type + "' and type '" + old_type +
                      "', which disagree");
  }
  if (!has_type) type = has_old_type ? old_type : "default";
  const std::string supported = "supported: default, linear, llama3, yarn";
  if (type == "dynamic") {
    throw ConfigError("config field '" + field + "' has rope_type 'dynamic' (dynamic NTK scaling), which is not " +
                      "supported: transformers recomputes its frequencies from the longest sequence it has seen, a " +
                      "state that cached decoding cannot reproduce (" + supported + ")");
  }
  const auto& all = rope_type_keys();
  const auto known = std::find_if(all.begin(), all.end(), [&](const auto& k) { return k.first == type; });
  if (known == all.end()) {
    throw ConfigError("config field '" + field + "' has rope_type '" + type + "', which is not supported (" +
                      supported + ")");
  }
  for (auto it = d.begin(); it != d.end(); ++it) {
    const std::string& key = it.key();
    if (it->is_null() || key == "rope_type" || key == "type" || key == "rope_theta" || key == "partial_rotary_factor") {
      continue;
    }
    if (std::find(known->second.begin(), known->second.end(), key) == known->second.end()) {
      std::string takes;
      for (const std::string& k : known->second) takes += (takes.empty() ? "" : ", ") + k;
      throw ConfigError("config field '" + field + "." + key + "' is not a parameter of rope_type '" + type +
                        "' (it takes " + (takes.empty() ? "none besides rope_theta" : takes) + ")");
    }
  }
  check_partial_rotary_factor(d, field, "partial_rotary_factor");
  RopeDict r;
  r.field = field;
  double theta = 0;
  if (get_optional_in(d, field, "rope_theta", theta)) r.theta = theta;
  if (type == "default") return r;

  RopeScaling s;
  s.type = type;
  auto required = [&](const char* key, double& out) {
    if (!get_optional_in(d, field, key, out)) {
      throw ConfigError("config field '" + field + "' has rope_type '" + type + "' but no '" + key + "'");
    }
  };
  required("factor", s.factor);
  if (type == "llama3") {
    required("low_freq_factor", s.low_freq_factor);
    required("high_freq_factor", s.high_freq_factor);
  }
  if (type == "llama3" || type == "yarn") {
    s.original_max_position_embeddings = static_cast<double>(max_position_embeddings);
    r.states_original =
        get_optional_in(d, field, "original_max_position_embeddings", s.original_max_position_embeddings);
  }
  if (type == "yarn") {
    // transformers reads `beta_fast or 32`, `beta_slow or 1`, `mscale and mscale_all_dim`: 0 counts as absent.
    double v = 0;
    if (get_optional_in(d, field, "beta_fast", v) && v != 0) s.beta_fast = v;
    v = 0;
    if (get_optional_in(d, field, "beta_slow", v) && v != 0) s.beta_slow = v;
    const auto truncate = d.find("truncate");
    if (truncate != d.end()) s.truncate = json_fields::get<bool, ConfigError>(*truncate, field + ".truncate", kWhere);
    double mscale = 0, mscale_all_dim = 0;
    get_optional_in(d, field, "mscale", mscale);
    get_optional_in(d, field, "mscale_all_dim", mscale_all_dim);
    auto get_mscale = [](double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; };
    if (!get_optional_in(d, field, "attention_factor", s.attention_factor)) {
      s.attention_factor = mscale != 0 && mscale_all_dim != 0
                               ? get_mscale(s.factor, mscale) / get_mscale(s.factor, mscale_all_dim)
                               : get_mscale(s.factor, 1.0);
    }
  }
  r.scaling = s;
  return r;
}

// rope_parameters: one rope dict. transformers 5 also nests it per attention kind for the models that give each kind
// its own RoPE ({"full_attention": {...}, "sliding_attention": {...}}); its Llama reads only the flat keys (with none,
// the default RoPE), so for a Llama that form is refused rather than read one way or the other.
RopeDict read_rope_parameters(const json& p, int64_t max_position_embeddings) {
  if (!p.is_object()) {
    throw ConfigError("config field 'rope_parameters' has value " + json_fields::describe(p) + ", expected an object");
  }
  for (const char* kind : {"full_attention", "sliding_attention"}) {
    if (p.contains(kind)) {
      throw ConfigError(std::string("config field 'rope_parameters' is nested by attention kind (key '") + kind +
                        "'), which is not supported: transformers' Llama reads only a flat rope_parameters (and would "
                        "use the default RoPE here); write one flat dict");
    }
  }
  return read_rope_dict(p, "rope_parameters", max_position_embeddings);
}

std::string describe_scaling(const std::optional<RopeScaling>& s) {
  return s ? "rope_type '" + s->type + "', factor " + number(s->factor) : "rope_type 'default'";
}

// rope_theta and rope_scaling from the top-level fields (transformers 4) and rope_scaling / rope_parameters
// (transformers 5 reads rope_scaling first). Every rope_theta stated, and the one each rope dict without its own
// takes (the top-level one, else 10000), must agree, and so must the scalings: a conflict is an error, never a choice.
void read_rope(const json& j, LCKVConfig& c) {
  check_partial_rotary_factor(j, "", "partial_rotary_factor");
  std::optional<double> top_theta;
  double theta = 0;
  if (json_fields::get_optional<double, ConfigError>(j, "rope_theta", theta, kWhere)) top_theta = theta;
  std::vector<RopeDict> dicts;
  const int64_t max_pos = c.max_position_embeddings;
  if (present(j, "rope_scaling")) dicts.push_back(read_rope_dict(j["rope_scaling"], "rope_scaling", max_pos));
  if (present(j, "rope_parameters")) dicts.push_back(read_rope_parameters(j["rope_parameters"], max_pos));
  // transformers 5 (5.24) does not read a top-level original_max_position_embeddings for a Llama: the rope dict's own,
  // else max_position_embeddings, counts. A top-level one that says otherwise is ambiguous.
  double original = 0;
  if (json_fields::get_optional<double, ConfigError>(j, "original_max_position_embeddings", original, kWhere)) {
    for (const RopeDict& d : dicts) {
      if (!d.scaling || d.scaling->type == "linear") continue;
      if (d.scaling->original_max_position_embeddings == original) continue;
      throw ConfigError("config field 'original_max_position_embeddings' = " + number(original) + " conflicts with " +
                        (d.states_original ? "'" + d.field + ".original_max_position_embeddings' = "
                                           : "the max_position_embeddings = ") +
                        number(d.scaling->original_max_position_embeddings) + " that transformers uses for '" +
                        d.field + "'");
    }
  }
  std::vector<std::pair<std::string, double>> thetas;  // (the field stating it, as messages say it; value)
  if (top_theta) thetas.emplace_back("'rope_theta' = " + number(*top_theta), *top_theta);
  for (const RopeDict& d : dicts) {
    if (d.theta) thetas.emplace_back("'" + d.field + ".rope_theta' = " + number(*d.theta), *d.theta);
    else if (!top_theta) thetas.emplace_back("'" + d.field + "' without rope_theta (so the default 10000)", 10000.0);
  }
  for (const auto& t : thetas) {
    if (t.second != thetas.front().second) {
      throw ConfigError("config field " + t.first + " conflicts with " + thetas.front().first);
    }
  }
  if (!thetas.empty()) c.rope_theta = thetas.front().second;
  for (const RopeDict& d : dicts) {
    if (d.scaling != dicts.front().scaling) {
      throw ConfigError("config fields '" + dicts.front().field + "' (" + describe_scaling(dicts.front().scaling) +
                        ") and '" + d.field + "' (" + describe_scaling(d.scaling) + ") describe different RoPE " +
                        "scalings; keep one");
    }
  }
  if (!dicts.empty()) c.rope_scaling = dicts.front().scaling;
}

// transformers 5's layer_types: one attention kind per layer. A Llama's layers attend to their own KVs, so
// "full_attention" is identity and "sliding_attention" identity with the `s` suffix (a window of sliding_window).
std::vector<LayerType> read_attention_kinds(const json& kinds, const json& j, int num_layers) {
  if (static_cast<int64_t>(kinds.size()) != num_layers) {
    throw ConfigError("config field 'layer_types' is a list of " + std::to_string(kinds.size()) +
                      " attention kinds, expected num_hidden_layers = " + std::to_string(num_layers) + " entries");
  }
  std::vector<LayerType> types;
  for (int i = 0; i < num_layers; ++i) {
    const std::string field = "layer_types[" + std::to_string(i) + "]";
    const std::string kind = json_fields::get<std::string, ConfigError>(kinds[i], field, kWhere);
    if (kind != "full_attention" && kind != "sliding_attention") {
      throw ConfigError("config field '" + field + "' = '" + kind +
                        "' is not supported: a Llama layer is \"full_attention\" or \"sliding_attention\"");
    }
    types.push_back({i, kind == "sliding_attention"});
    if (types.back().sliding && !present(j, "sliding_window")) {
      throw ConfigError("config field '" + field + "' is \"sliding_attention\" but 'sliding_window' is missing");
    }
  }
  return types;
}

// Fields of Hugging Face configs that would change the model if we ignored them.
void check_unsupported_hf_fields(const json& j) {
  double dropout = 0;
  if (json_fields::get_optional<double, ConfigError>(j, "attention_dropout", dropout, kWhere) && dropout != 0) {
    throw ConfigError("config field 'attention_dropout' = " + number(dropout) +
                      " is not supported: LCKV trains without attention dropout (expected 0)");
  }
  int64_t tp = 1;
  // transformers 4 splits the projections into pretraining_tp slices and sums them: the same products.
  if (json_fields::get_optional<int64_t, ConfigError>(j, "pretraining_tp", tp, kWhere) && tp < 1) {
    throw ConfigError("config field 'pretraining_tp' = " + std::to_string(tp) + ", expected a positive number");
  }
  if (present(j, "quantization_config")) {
    throw ConfigError("config field 'quantization_config' is present: quantized checkpoints are not supported");
  }
}

}  // namespace

LCKVConfig LCKVConfig::from_json(const json& j) {
  if (!j.is_object()) throw ConfigError("config must be a JSON object, got " + json_fields::describe(j));
  LCKVConfig c;
  c.vocab_size = get_required<int64_t>(j, "vocab_size");
  c.hidden_size = get_required<int64_t>(j, "hidden_size");
  c.intermediate_size = get_required<int64_t>(j, "intermediate_size");
  c.num_hidden_layers = get_required<int>(j, "num_hidden_layers");
  c.num_attention_heads = get_required<int>(j, "num_attention_heads");
  c.num_key_value_heads = c.num_attention_heads;
  get_optional(j, "num_key_value_heads", c.num_key_value_heads);
  get_optional(j, "head_dim", c.head_dim);
  get_optional(j, "hidden_act", c.hidden_act);
  get_optional(j, "max_position_embeddings", c.max_position_embeddings);
  get_optional(j, "rms_norm_eps", c.rms_norm_eps);
  get_optional(j, "tie_word_embeddings", c.tie_word_embeddings);
  get_optional(j, "attention_bias", c.attention_bias);
  get_optional(j, "mlp_bias", c.mlp_bias);
  get_optional(j, "initializer_range", c.initializer_range);
  get_token_id(j, "bos_token_id", c.bos_token_id);
  get_token_id(j, "eos_token_id", c.eos_token_id);
  int64_t pad = 0;
  if (json_fields::get_optional<int64_t, ConfigError>(j, "pad_token_id", pad, kWhere)) c.pad_token_id = pad;
  get_optional(j, "torch_dtype", c.torch_dtype);
  get_optional(j, "model_type", c.model_type);
  get_optional(j, "forward_passes", c.forward_passes);
  get_optional(j, "backward_passes", c.backward_passes);
  get_optional(j, "sliding_window", c.sliding_window);
  get_optional(j, "use_sequential", c.use_sequential);
  get_optional(j, "force_nodiag", c.force_nodiag);

  // transformers 5 writes `dtype`, transformers 4 `torch_dtype`.
  std::string dtype;
  if (json_fields::get_optional<std::string, ConfigError>(j, "dtype", dtype, kWhere)) {
    if (present(j, "torch_dtype") && dtype != c.torch_dtype) {
      throw ConfigError("config field 'dtype' = '" + dtype + "' conflicts with 'torch_dtype' = '" + c.torch_dtype +
                        "'");
    }
    c.torch_dtype = dtype;
  }
  read_rope(j, c);
  check_unsupported_hf_fields(j);

  if (c.num_hidden_layers <= 0 || c.num_hidden_layers > kMaxLayers) {
    throw ConfigError("config field 'num_hidden_layers' = " + std::to_string(c.num_hidden_layers) +
                      ", expected a positive number <= " + std::to_string(kMaxLayers));
  }
  const auto lt_it = j.find("layer_types");
  if (lt_it != j.end() && !lt_it->is_null()) {
    if (lt_it->is_array()) {
      c.layer_types = read_attention_kinds(*lt_it, j, c.num_hidden_layers);
    } else if (lt_it->is_string()) {
      c.layer_types = parse_layer_types(lt_it->get<std::string>(), c.num_hidden_layers);
    } else {
      throw ConfigError("config field 'layer_types' must be a string like \"0_6_6_7\" or a list of attention kinds "
                        "(\"full_attention\", \"sliding_attention\"), got " + json_fields::describe(*lt_it));
    }
  } else {
    for (int i = 0; i < c.num_hidden_layers; ++i) c.layer_types.push_back({i, false});
  }
  if (c.head_dim == 0 && c.num_attention_heads > 0) {
    if (c.hidden_size % c.num_attention_heads != 0) {
      throw ConfigError("hidden_size = " + std::to_string(c.hidden_size) + " is not divisible by num_attention_heads = " +
                        std::to_string(c.num_attention_heads) + " and no head_dim is given");
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  c.validate();
  return c;
}

LCKVConfig LCKVConfig::from_json_text(const std::string& text, const std::string& path) {
  const json j = json_fields::parse<ConfigError>(text, path.empty() ? "config" : "config file '" + path + "'");
  if (path.empty()) return from_json(j);
  try {
    return from_json(j);
  } catch (const ConfigError& e) {
    throw ConfigError(path + ": " + e.what());
  }
}

LCKVConfig LCKVConfig::from_file(const std::string& path) {
  std::string error;
  const std::string text = json_fields::detail::read_file(path, "config file '" + path + "'", error);
  if (!error.empty()) throw ConfigError(error);
  return from_json_text(text, path);
}

// The one mapping between our layer_types and transformers' (docs/design.md §5, "The layer_types field and
// transformers"): a plain Llama is written as transformers' own Llama directory (no layer_types: transformers 5 has a
// field of that name, a list of attention kinds, and validates it), everything else in the reference's LCKV format
// (model_type "lckv-llama", layer_types a string) with an auto_map to lckv's transformers classes.
json LCKVConfig::to_json(ConfigFormat format) const {
  // A config whose layer_types no longer fit num_hidden_layers (being edited) is written as it stands.
  const bool plain =
      format == ConfigFormat::kAuto && static_cast<int>(layer_types.size()) == num_hidden_layers && is_identity();
  json j;
  j["architectures"] = {plain ? "LlamaForCausalLM" : "LCKVLlamaForCausalLM"};
  j["model_type"] = plain ? "llama" : "lckv-llama";
  if (!plain) {
    j["auto_map"] = {{"AutoConfig", "lckv_hf.LCKVLlamaConfig"},
                     {"AutoModelForCausalLM", "lckv_hf.LCKVLlamaForCausalLM"}};
  }
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_key_value_heads;
  j["head_dim"] = head_dim;
  j["hidden_act"] = hidden_act;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  // rope_theta and rope_scaling as transformers 4 and the reference write them; a plain Llama also gets
  // transformers 5's rope_parameters (the same values), which transformers 5 reads without a deprecation warning.
  j["rope_theta"] = rope_theta;
  json rs = nullptr;
  if (rope_scaling) {
    rs = {{"rope_type", rope_scaling->type}, {"factor", rope_scaling->factor}};
    if (rope_scaling->type == "llama3") {
      rs["low_freq_factor"] = rope_scaling->low_freq_factor;
      rs["high_freq_factor"] = rope_scaling->high_freq_factor;
    }
    if (rope_scaling->type == "llama3" || rope_scaling->type == "yarn") {
      // a token count: transformers 5 warns unless it is written as an integer
      const double original = rope_scaling->original_max_position_embeddings;
      if (original == std::floor(original) && std::abs(original) < 9e15) {
        rs["original_max_position_embeddings"] = static_cast<int64_t>(original);
      } else {
        rs["original_max_position_embeddings"] = original;
      }
    }
    if (rope_scaling->type == "yarn") {
      // The resolved values (from_json already turned mscale/mscale_all_dim into attention_factor), so a reload
      // computes the same frequencies and scale.
      rs["attention_factor"] = rope_scaling->attention_factor;
      rs["beta_fast"] = rope_scaling->beta_fast;
      rs["beta_slow"] = rope_scaling->beta_slow;
      rs["truncate"] = rope_scaling->truncate;
    }
  }
  j["rope_scaling"] = rs;
  if (plain) {
    json rp = rs.is_null() ? json{{"rope_type", "default"}} : rs;
    rp["rope_theta"] = rope_theta;
    j["rope_parameters"] = rp;
  }
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["attention_bias"] = attention_bias;
  j["mlp_bias"] = mlp_bias;
  j["initializer_range"] = initializer_range;
  j["bos_token_id"] = bos_token_id;
  j["eos_token_id"] = eos_token_id;
  if (pad_token_id) j["pad_token_id"] = *pad_token_id;
  // transformers 5 writes "dtype"; transformers 4 (before 4.56) and the reference read "torch_dtype".
  if (plain) j["dtype"] = torch_dtype;
  j["torch_dtype"] = torch_dtype;
  if (plain) return j;  // the LCKV fields below mean nothing for a plain Llama and transformers would keep them as junk
  j["layer_types"] = format_layer_types(layer_types);
  j["forward_passes"] = forward_passes;
  j["backward_passes"] = backward_passes;
  j["sliding_window"] = sliding_window;
  j["use_sequential"] = use_sequential;
  j["force_nodiag"] = force_nodiag;
  return j;
}

void LCKVConfig::save(const std::string& path) const {
  try {
    write_file_atomically(path, to_json().dump(2) + "\n");
  } catch (const FileError& e) {
    throw ConfigError(std::string("config file: ") + e.what());
  }
}

void LCKVConfig::validate() const {
  auto positive = [](const char* field, int64_t v) {
    if (v <= 0) throw ConfigError(std::string("config field '") + field + "' = " + std::to_string(v) +
                                  ", expected a positive number");
  };
  positive("vocab_size", vocab_size);
  positive("hidden_size", hidden_size);
  positive("intermediate_size", intermediate_size);
  positive("num_hidden_layers", num_hidden_layers);
  positive("num_attention_heads", num_attention_heads);
  positive("num_key_value_heads", num_key_value_heads);
  positive("head_dim", head_dim);
  positive("sliding_window", sliding_window);
  if (num_attention_heads % num_key_value_heads != 0) {
    throw ConfigError("num_attention_heads = " + std::to_string(num_attention_heads) +
                      " is not divisible by num_key_value_heads = " + std::to_string(num_key_value_heads));
  }
  if (head_dim % 2 != 0) {
    throw ConfigError("head_dim = " + std::to_string(head_dim) + " must be even for rotary embeddings");
  }
  if (hidden_act != "silu") {
    throw ConfigError("config field 'hidden_act' = '" + hidden_act + "' is not supported, expected 'silu'");
  }
  positive("max_position_embeddings", max_position_embeddings);
  if (num_hidden_layers > kMaxLayers) {
    throw ConfigError("config field 'num_hidden_layers' = " + std::to_string(num_hidden_layers) + ", expected <= " +
                      std::to_string(kMaxLayers));
  }
  if (forward_passes < 0 || forward_passes > kMaxPasses) {
    throw ConfigError("config field 'forward_passes' = " + std::to_string(forward_passes) + ", expected >= 0 and <= " +
                      std::to_string(kMaxPasses));
  }
  if (backward_passes < 1 || backward_passes > kMaxPasses) {
    throw ConfigError("config field 'backward_passes' = " + std::to_string(backward_passes) +
                      ", expected >= 1 and <= " + std::to_string(kMaxPasses));
  }
  if (!(rms_norm_eps > 0)) throw ConfigError("config field 'rms_norm_eps' must be positive");
  if (!(rope_theta > 0)) throw ConfigError("config field 'rope_theta' must be positive");
  if (rope_scaling) {
    const RopeScaling& s = *rope_scaling;
    if (s.type != "linear" && s.type != "llama3" && s.type != "yarn") {
      throw ConfigError("config field 'rope_scaling' has rope_type '" + s.type +
                        "', supported: 'linear', 'llama3', 'yarn'");
    }
    auto positive_rope = [](const char* field, double v) {
      if (!(v > 0)) {
        throw ConfigError(std::string("config field 'rope_scaling.") + field + "' = " + json(v).dump() +
                          ", expected a positive number");
      }
    };
    positive_rope("factor", s.factor);
    if (s.type == "llama3") {
      positive_rope("low_freq_factor", s.low_freq_factor);
      // The smoothing divides by high - low; transformers calls high <= low invalid.
      if (!(s.high_freq_factor > s.low_freq_factor)) {
        throw ConfigError("config field 'rope_scaling.high_freq_factor' = " + json(s.high_freq_factor).dump() +
                          ", expected more than low_freq_factor = " + json(s.low_freq_factor).dump());
      }
    }
    if (s.type == "llama3" || s.type == "yarn") {
      positive_rope("original_max_position_embeddings", s.original_max_position_embeddings);
    }
    if (s.type == "yarn") {
      positive_rope("attention_factor", s.attention_factor);
      positive_rope("beta_slow", s.beta_slow);
      if (!(s.beta_fast >= s.beta_slow)) {
        throw ConfigError("config field 'rope_scaling.beta_fast' = " + json(s.beta_fast).dump() +
                          ", expected at least beta_slow = " + json(s.beta_slow).dump());
      }
    }
  }
  if (model_type != "llama" && model_type != "lckv-llama") {
    throw ConfigError("config field 'model_type' = '" + model_type +
                      "' is not supported: expected 'llama' (a Hugging Face Llama) or 'lckv-llama' (an LCKV model)");
  }
  check_layer_types_size();
  for (int i = 0; i < num_hidden_layers; ++i) {
    if (layer_types[i].target < 0 || layer_types[i].target >= num_hidden_layers) {
      throw ConfigError("layer_types entry " + std::to_string(i) + " = " + std::to_string(layer_types[i].target) +
                        " is out of range [0, " + std::to_string(num_hidden_layers) + ")");
    }
  }
  check_size(*this, static_cast<int64_t>(kv_layers().size()));
}

int64_t LCKVConfig::parameter_count() const {
  validate();
  int64_t n = 0;
  count_parameters(*this, static_cast<int64_t>(kv_layers().size()), n);
  return n;
}

bool LCKVConfig::layer_computes_kv(int layer) const {
  return std::any_of(layer_types.begin(), layer_types.end(), [&](const LayerType& t) { return t.target == layer; });
}

std::vector<int> LCKVConfig::kv_layers() const {
  std::set<int> s;
  for (const auto& t : layer_types) s.insert(t.target);
  return {s.begin(), s.end()};
}

void LCKVConfig::check_layer_types_size() const {
  if (static_cast<int64_t>(layer_types.size()) != num_hidden_layers) {
    throw ConfigError("layer_types has " + std::to_string(layer_types.size()) +
                      " entries, expected num_hidden_layers = " + std::to_string(num_hidden_layers) +
                      " (after changing num_hidden_layers, set layer_types too)");
  }
}

IterationPlan LCKVConfig::iteration_plan() const {
  check_layer_types_size();
  IterationPlan plan;
  int i = 0;
  while (i < num_hidden_layers) {
    Segment seg;
    seg.first = i;
    if (layer_attends_top(i)) {
      seg.cyclic = true;
      int last = target(i);
      for (int j = i; j <= last; ++j) last = std::max(last, target(j));
      seg.last = last;
      std::set<int> tops;
      for (int j = seg.first; j <= seg.last; ++j) {
        if (target(j) > j) tops.insert(target(j));
      }
      seg.top_targets.assign(tops.begin(), tops.end());
    } else {
      seg.last = i;
    }
    plan.segments.push_back(seg);
    i = seg.last + 1;
  }
  return plan;
}

bool LCKVConfig::is_identity() const {
  check_layer_types_size();
  for (int i = 0; i < num_hidden_layers; ++i) {
    if (layer_types[i].target != i || layer_types[i].sliding) return false;
  }
  return !force_nodiag;
}

double training_flops_per_token(const LCKVConfig& c, int64_t seq_len, int m, int b) {
  const double H = c.hidden_size, D = c.head_dim, Hq = c.num_attention_heads, Hkv = c.num_key_value_heads;
  const double kv_proj = 2 * 2 * H * Hkv * D;
  auto layer_forward = [&](int l) {
    // Keys seen on average: (T + 1) / 2 under a causal mask, at most the window.
    double keys = (seq_len + 1) / 2.0;
    if (c.layer_window(l) > 0) keys = std::min<double>(keys, c.layer_window(l));
    const double attn = 2 * 2 * Hq * D * keys;
    return 2 * H * Hq * D * 2 /* q, o */ + (c.layer_computes_kv(l) ? kv_proj : 0) + attn +
           3 * 2 * H * c.intermediate_size;
  };
  double flops = 3 * 2 * H * c.vocab_size;  // LM head
  for (const Segment& seg : c.iteration_plan().segments) {
    double full = 0;
    for (int l = seg.first; l <= seg.last; ++l) full += layer_forward(l);
    if (!seg.cyclic) {
      flops += 3 * full;
      continue;
    }
    double partial = kv_proj;  // an iteration before the last: up to the last top target's K/V
    for (int l = seg.first; l < seg.last_top_target(); ++l) partial += layer_forward(l);
    flops += m * partial + 3 * (b - 1) * partial + 3 * full;
  }
  return flops;
}

}  // namespace lckv
