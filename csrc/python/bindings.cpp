// lckv._C: the C++ library bound for Python. The model is bound with torch::python::bind_module,
// so the Python class is a torch.nn.Module whose parameters, forward and backward are the C++
// ones; python/lckv adds the PyTorch conventions (state_dict, from_pretrained, ...) on top.
#include <torch/extension.h>
#include <torch/python.h>

#include <pybind11/functional.h>
#include <pybind11/stl.h>

#include "lckv/autocast.h"
#include "lckv/config.h"
#include "lckv/data/dataset.h"
#include "lckv/data/prepare.h"
#include "lckv/data/tokenizer.h"
#include "lckv/generate/generate.h"
#include "lckv/io/checkpoint.h"
#include "lckv/io/safetensors.h"
#include "lckv/model/lckv_model.h"
#include "lckv/ops/condensed_attention.h"
#include "lckv/ops/fused_ops.h"
#include "lckv/train/trainer.h"

namespace py = pybind11;
using namespace lckv;

namespace {

using ModelPtr = std::shared_ptr<LCKVForCausalLMImpl>;

LCKVConfig config_from_json_text(const std::string& text) { return LCKVConfig::from_json_text(text); }

// A batch of token windows as an int64 tensor [rows, seq_len + 1].
torch::Tensor batch_tensor(const data::Batch& b) {
  return torch::from_blob(const_cast<int32_t*>(b.tokens.data()), {b.rows, b.cols}, torch::kInt).to(torch::kLong);
}

data::LoaderOptions loader_options(int64_t seq_len, int64_t batch_size, uint64_t seed, int rank, int world_size) {
  data::LoaderOptions o;
  o.seq_len = seq_len;
  o.batch_size = batch_size;
  o.seed = seed;
  o.rank = rank;
  o.world_size = world_size;
  return o;
}

// `steps` training steps (forward, backward, torch::optim::AdamW) on one batch entirely in C++:
// the baseline that scripts/bench_python_overhead.py compares the Python training loop with.
std::vector<double> cpp_train_steps(const ModelPtr& model, const torch::Tensor& input_ids, const torch::Tensor& labels,
                                    int steps, double lr, double weight_decay, bool bf16_autocast) {
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(lr).weight_decay(weight_decay));
  std::vector<double> losses;
  for (int s = 0; s < steps; ++s) {
    opt.zero_grad();
    torch::Tensor loss;
    {
      AutocastScope autocast(torch::kCPU, torch::kBFloat16, bf16_autocast);
      loss = model->forward(input_ids, labels).loss;
    }
    loss.backward();
    opt.step();
    losses.push_back(loss.item<double>());
  }
  return losses;
}

py::tuple generate_py(const ModelPtr& model, const std::vector<std::vector<int64_t>>& prompts, const GenerationConfig& config) {
  LCKVForCausalLM holder(model);
  GenerationResult r;
  {
    py::gil_scoped_release no_gil;
    r = generate(holder, prompts, config);
  }
  const GenerationStats& s = r.stats;
  py::dict stats(py::arg("batch") = s.batch, py::arg("prompt_tokens") = s.prompt_tokens,
                 py::arg("padded_prompt_length") = s.padded_prompt_length, py::arg("steps") = s.steps,
                 py::arg("new_tokens") = s.new_tokens, py::arg("prefill_seconds") = s.prefill_seconds,
                 py::arg("decode_seconds") = s.decode_seconds, py::arg("cache_bytes") = s.cache_bytes,
                 py::arg("cache_capacity") = s.cache_capacity, py::arg("evicted") = s.evicted);
  return py::make_tuple(r.tokens, r.logits.defined() ? py::cast(r.logits) : py::none(), stats);
}

train::TrainOptions train_options_from_json_text(const std::string& text) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw train::TrainError(std::string("run options are not valid JSON: ") + e.what());
  }
  return train::TrainOptions::from_json(j);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "LCKV (Layer-Condensed KV Cache) C++ library";
  m.attr("__torch_version__") = LCKV_TORCH_VERSION;

  py::register_exception<ConfigError>(m, "ConfigError", PyExc_ValueError);
  py::register_exception<io::FormatError>(m, "CheckpointError", PyExc_ValueError);

  // ---- config
  py::class_<LCKVConfig>(m, "LCKVConfig")
      .def(py::init(&config_from_json_text), py::arg("json_text"),
           "Parses a config.json text (Hugging Face LlamaConfig fields + LCKV fields); raises ConfigError.")
      .def("to_json", [](const LCKVConfig& c) { return c.to_json().dump(2); })
      .def("save", &LCKVConfig::save, py::arg("path"), "Writes config.json atomically.")
      .def("validate", &LCKVConfig::validate)
      .def("kv_layers", &LCKVConfig::kv_layers)
      .def("is_identity", &LCKVConfig::is_identity)
      .def("parameter_count", &LCKVConfig::parameter_count, "Parameters of the model it describes; validates first.")
      .def("segments",
           [](const LCKVConfig& c) {
             py::list out;
             for (const Segment& s : c.iteration_plan().segments) {
               out.append(py::dict(py::arg("first") = s.first, py::arg("last") = s.last, py::arg("cyclic") = s.cyclic,
                                   py::arg("top_targets") = s.top_targets));
             }
             return out;
           },
           "The iteration plan: segments with first/last layer, cyclic flag and top targets.")
      .def_property(
          "layer_types", [](const LCKVConfig& c) { return format_layer_types(c.layer_types); },
          [](LCKVConfig& c, const std::string& s) { c.layer_types = parse_layer_types(s, c.num_hidden_layers); })
      .def_readwrite("vocab_size", &LCKVConfig::vocab_size)
      .def_readwrite("hidden_size", &LCKVConfig::hidden_size)
      .def_readwrite("intermediate_size", &LCKVConfig::intermediate_size)
      .def_property(
          "num_hidden_layers", [](const LCKVConfig& c) { return c.num_hidden_layers; },
          [](LCKVConfig& c, int n) {
            // A plain Llama stays one at the new depth; other layer_types must be set again afterwards.
            if (n < 1 || n > kMaxLayers) {
              throw ConfigError("num_hidden_layers = " + std::to_string(n) + ", expected 1 to " +
                                std::to_string(kMaxLayers));
            }
            bool identity = c.layer_types.size() == static_cast<size_t>(c.num_hidden_layers);
            for (size_t i = 0; identity && i < c.layer_types.size(); ++i) {
              identity = c.layer_types[i] == LayerType{static_cast<int>(i), false};
            }
            c.num_hidden_layers = n;
            if (identity) {
              c.layer_types.clear();
              for (int i = 0; i < n; ++i) c.layer_types.push_back({i, false});
            }
          })
      .def_readwrite("num_attention_heads", &LCKVConfig::num_attention_heads)
      .def_readwrite("num_key_value_heads", &LCKVConfig::num_key_value_heads)
      .def_readwrite("head_dim", &LCKVConfig::head_dim)
      .def_readwrite("max_position_embeddings", &LCKVConfig::max_position_embeddings)
      .def_readwrite("rms_norm_eps", &LCKVConfig::rms_norm_eps)
      .def_readwrite("rope_theta", &LCKVConfig::rope_theta)
      .def_readwrite("tie_word_embeddings", &LCKVConfig::tie_word_embeddings)
      .def_readwrite("initializer_range", &LCKVConfig::initializer_range)
      .def_readwrite("bos_token_id", &LCKVConfig::bos_token_id)
      .def_readwrite("eos_token_id", &LCKVConfig::eos_token_id)
      .def_readwrite("torch_dtype", &LCKVConfig::torch_dtype)
      .def_readwrite("forward_passes", &LCKVConfig::forward_passes)
      .def_readwrite("backward_passes", &LCKVConfig::backward_passes)
      .def_readwrite("sliding_window", &LCKVConfig::sliding_window)
      .def_readwrite("use_sequential", &LCKVConfig::use_sequential)
      .def_readwrite("force_nodiag", &LCKVConfig::force_nodiag);

  // ---- model
  torch::python::bind_module<LCKVForCausalLMImpl, /*force_enable=*/true>(m, "_LCKVForCausalLM")
      .def(py::init<const LCKVConfig&>(), py::arg("config"))
      .def_property_readonly("_config", [](const LCKVForCausalLMImpl& self) { return self.config; })
      .def(
          "_forward",
          [](LCKVForCausalLMImpl& self, const torch::Tensor& input_ids, const std::optional<torch::Tensor>& labels,
             std::optional<int> forward_passes, std::optional<int> backward_passes, bool sequential,
             const IterationObserver& observer) {
            const torch::Tensor lab = labels.value_or(torch::Tensor());
            CausalLMOutput out;
            if (sequential) {
              out = self.forward_sequential(input_ids, lab);
            } else {
              IterationOptions counts = self.default_iterations();
              counts.forward_passes = forward_passes.value_or(counts.forward_passes);
              counts.backward_passes = backward_passes.value_or(counts.backward_passes);
              counts.observer = observer;
              out = self.forward(input_ids, lab, counts);
            }
            return std::make_pair(out.logits,
                                  out.loss.defined() ? std::optional<torch::Tensor>(out.loss) : std::nullopt);
          },
          py::arg("input_ids"), py::arg("labels"), py::arg("forward_passes"), py::arg("backward_passes"),
          py::arg("sequential"), py::arg("observer"), py::call_guard<py::gil_scoped_release>())
      .def("_init_weights",
           [](const ModelPtr& self) {
             LCKVForCausalLM holder(self);
             init_weights(holder);
           })
      .def("_hf_state_dict",
           [](const ModelPtr& self) {
             LCKVForCausalLM holder(self);
             return io::hf_state_dict(holder);
           })
      .def(
          "_load_state",
          [](const ModelPtr& self, const std::map<std::string, torch::Tensor>& tensors, const std::string& source) {
            LCKVForCausalLM holder(self);
            io::load_state(holder, tensors, source);
          },
          py::arg("tensors"), py::arg("source"))
      .def(
          "_save_pretrained",
          [](const ModelPtr& self, const std::string& dir, torch::ScalarType dtype) {
            LCKVForCausalLM holder(self);
            io::save_pretrained(holder, dir, dtype);
          },
          py::arg("directory"), py::arg("dtype"), py::call_guard<py::gil_scoped_release>())
      .def_static(
          "_load_pretrained",
          [](const std::string& dir, torch::ScalarType dtype) { return io::load_pretrained(dir, dtype).ptr(); },
          py::arg("directory"), py::arg("dtype"), py::call_guard<py::gil_scoped_release>())
      .def(
          "_generate",
          [](const ModelPtr& self, const std::vector<std::vector<int64_t>>& prompts, int64_t max_new_tokens,
             bool do_sample, double temperature, int64_t top_k, double top_p, double repetition_penalty, uint64_t seed,
             const std::vector<int64_t>& stop_tokens, const std::string& prefill, int64_t prefill_chunk,
             int64_t cache_capacity, std::optional<std::pair<int64_t, int64_t>> streaming, bool return_logits) {
            GenerationConfig c;
            c.max_new_tokens = max_new_tokens;
            c.sampling = {do_sample, temperature, top_k, top_p, repetition_penalty};
            c.seed = seed;
            c.stop_tokens = stop_tokens;
            c.prefill = parse_prefill_mode(prefill);
            c.prefill_chunk = prefill_chunk;
            c.cache_capacity = cache_capacity;
            if (streaming) c.streaming = StreamingOptions{streaming->first, streaming->second};
            c.return_logits = return_logits;
            return generate_py(self, prompts, c);
          },
          py::arg("prompts"), py::arg("max_new_tokens"), py::arg("do_sample"), py::arg("temperature"), py::arg("top_k"),
          py::arg("top_p"), py::arg("repetition_penalty"), py::arg("seed"), py::arg("stop_tokens"), py::arg("prefill"),
          py::arg("prefill_chunk"), py::arg("cache_capacity"), py::arg("streaming"), py::arg("return_logits"))
      .def("_weight_decay_groups",
           [](const ModelPtr& self) {
             LCKVForCausalLM holder(self);
             train::ParamGroups g = train::weight_decay_groups(holder);
             return std::make_pair(g.decay, g.no_decay);
           })
      .def("_cpp_train_steps", &cpp_train_steps, py::arg("input_ids"), py::arg("labels"), py::arg("steps"),
           py::arg("lr"), py::arg("weight_decay"), py::arg("bf16_autocast"), py::call_guard<py::gil_scoped_release>());

  // ---- ops
  m.def(
      "condensed_attention",
      [](const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, bool strict, int64_t window,
         int64_t q_offset, double scale) {
        ops::AttentionParams p;
        p.mask = {strict, window, q_offset};
        p.scale = scale;
        return ops::condensed_attention(q, k, v, p);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("strict"), py::arg("window"), py::arg("q_offset"),
      py::arg("scale"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "rms_norm",
      [](const torch::Tensor& x, const torch::Tensor& weight, double eps, std::optional<at::ScalarType> out_dtype) {
        return ops::rms_norm(x, weight, eps,
                             out_dtype.value_or(torch::promote_types(x.scalar_type(), weight.scalar_type())));
      },
      py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("out_dtype"), py::call_guard<py::gil_scoped_release>());
  m.def("apply_rotary", &ops::apply_rotary, py::arg("x"), py::arg("cos"), py::arg("sin"),
        py::call_guard<py::gil_scoped_release>());
  m.def("residual_add", &ops::residual_add, py::arg("h"), py::arg("branch"),
        py::call_guard<py::gil_scoped_release>());
  m.def("swiglu", &ops::swiglu, py::arg("gate"), py::arg("up"), py::call_guard<py::gil_scoped_release>());
  m.def("cross_entropy", &ops::cross_entropy, py::arg("logits"), py::arg("targets"), py::arg("ignore_index"),
        py::call_guard<py::gil_scoped_release>());
  m.def("fused_cpu_capability", &ops::fused_cpu_capability);

  m.def("lm_loss", &lm_loss, py::arg("logits"), py::arg("targets"),
        "Mean cross-entropy of logits [B, T, V] against next-token targets [B, T] (-100 ignored).");

  // ---- training: lckv-train's run options, schedule and parameter groups
  py::register_exception<train::TrainError>(m, "TrainError", PyExc_ValueError);
  m.def(
      "train_options",
      [](const std::string& json_text, bool validate) {
        train::TrainOptions o = train_options_from_json_text(json_text);
        if (validate) o.validate();
        return o.to_json().dump();
      },
      py::arg("json_text"), py::arg("validate"),
      "lckv-train's run options: the given fields over the defaults, checked; raises TrainError naming the field.");
  m.def(
      "learning_rate",
      [](const std::string& options_json, int64_t step, int64_t total_steps) {
        return train::learning_rate(train_options_from_json_text(options_json), step, total_steps);
      },
      py::arg("options_json"), py::arg("step"), py::arg("total_steps"));

  // ---- data: the tokenizer and the loaders over lckv-prepare's shards
  py::class_<data::Tokenizer>(m, "Tokenizer")
      .def_static("load", &data::Tokenizer::load, py::arg("path"))
      .def("encode", [](const data::Tokenizer& t, const std::string& text) { return t.encode(text); }, py::arg("text"))
      .def("decode", &data::Tokenizer::decode, py::arg("ids"))
      .def_property_readonly("vocab_size", &data::Tokenizer::vocab_size)
      .def_property_readonly("bos_id", &data::Tokenizer::bos_id)
      .def_property_readonly("eos_id", &data::Tokenizer::eos_id);

  m.def(
      "read_prepared",
      [](const std::string& dir) {
        data::PreparedData d = data::read_prepared(dir);
        return py::dict(py::arg("tokenizer") = d.tokenizer, py::arg("vocab_size") = d.vocab_size,
                        py::arg("eos_id") = d.eos_id, py::arg("train_shards") = d.train_shards,
                        py::arg("val_shards") = d.val_shards);
      },
      py::arg("data_dir"), "What a trainer needs from an lckv-prepare output directory (its meta.json).");

  m.def(
      "prepare_corpus",
      [](const std::vector<std::string>& inputs, const std::string& out_dir, const std::string& tokenizer,
         int vocab_size, double val_fraction, int64_t shard_tokens, int threads) {
        data::PrepareOptions o;
        o.inputs = inputs;
        o.out_dir = out_dir;
        o.tokenizer = tokenizer;
        o.train_tokenizer = tokenizer.empty();
        o.vocab_size = vocab_size;
        o.val_fraction = val_fraction;
        o.shard_tokens = shard_tokens;
        o.threads = threads;
        py::gil_scoped_release no_gil;
        return data::prepare_corpus(o).dump();
      },
      py::arg("inputs"), py::arg("out_dir"), py::arg("tokenizer") = "", py::arg("vocab_size") = 4096,
      py::arg("val_fraction") = 0.01, py::arg("shard_tokens") = 100'000'000, py::arg("threads") = 1,
      "lckv-prepare: text files -> tokenizer (trained when `tokenizer` is empty) + token shards; returns meta.json.");

  py::class_<data::TrainLoader>(m, "TrainLoader")
      .def(py::init([](const std::vector<std::string>& shards, int64_t seq_len, int64_t batch_size, uint64_t seed,
                       int rank, int world_size) {
             return std::make_unique<data::TrainLoader>(shards,
                                                        loader_options(seq_len, batch_size, seed, rank, world_size));
           }),
           py::arg("shards"), py::arg("seq_len"), py::arg("batch_size"), py::arg("seed") = 0, py::arg("rank") = 0,
           py::arg("world_size") = 1)
      .def("next", [](data::TrainLoader& l) { return batch_tensor(l.next()); },
           "The next batch of windows, int64 [batch, seq_len + 1].")
      .def("state", [](const data::TrainLoader& l) { return nlohmann::json(l.state()).dump(); })
      .def("restore", [](data::TrainLoader& l, const std::string& state) {
        l.restore(nlohmann::json::parse(state).get<data::LoaderState>());
      });

  py::class_<data::SequentialLoader>(m, "SequentialLoader")
      .def(py::init([](const std::vector<std::string>& shards, int64_t seq_len, int64_t batch_size, int rank,
                       int world_size) {
             return std::make_unique<data::SequentialLoader>(shards,
                                                             loader_options(seq_len, batch_size, 0, rank, world_size));
           }),
           py::arg("shards"), py::arg("seq_len"), py::arg("batch_size"), py::arg("rank") = 0, py::arg("world_size") = 1)
      .def("next",
           [](data::SequentialLoader& l) -> std::optional<torch::Tensor> {
             auto b = l.next();
             if (!b) return std::nullopt;
             return batch_tensor(*b);
           })
      .def("reset", &data::SequentialLoader::reset)
      .def("num_windows", &data::SequentialLoader::num_windows);
}
