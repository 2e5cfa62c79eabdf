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
#include "lckv/io/convert.h"
#include "lckv/io/safetensors.h"
#include "lckv/model/lckv_model.h"
#include "lckv/ops/condensed_attention.h"
#include "lckv/ops/fused_ops.h"
#include "lckv/ops/sdpa_attention.h"
#include "lckv/files.h"
#include "lckv/json_fields.h"
#include "lckv/train/evaluate.h"
#include "lckv/train/trainer.h"

namespace py = pybind11;
using namespace lckv;

namespace {

using ModelPtr = std::shared_ptr<LCKVForCausalLMImpl>;

LCKVConfig config_from_json_text(const std::string& text) { return LCKVConfig::from_json_text(text); }

data::LoaderOptions loader_options(int64_t seq_len, int64_t batch_size, uint64_t seed, int rank, int world_size) {
  data::LoaderOptions o;
  o.seq_len = seq_len;
  o.batch_size = batch_size;
  o.seed = seed;
  o.rank = rank;
  o.world_size = world_size;
  return o;
}

// The trainer's optimizer seam filled by a Python object with the methods kind(), set_lr(lr),
// zero_grad(), step(), save(path), load(path, device) (lckv.train.TorchOptimizer adapts any
// torch.optim optimizer). The trainer runs without the GIL; each call takes it.
class PyOptimizer : public train::Optimizer {
 public:
  explicit PyOptimizer(py::object impl) : impl_(std::move(impl)) {}
  ~PyOptimizer() override {
    py::gil_scoped_acquire gil;
    impl_ = py::object();
  }
  std::string kind() const override {
    py::gil_scoped_acquire gil;
    return impl_.attr("kind")().cast<std::string>();
  }
  void set_lr(double lr) override { call("set_lr", lr); }
  void zero_grad() override { call("zero_grad"); }
  void step() override { call("step"); }
  void save(const std::string& path) override { call("save", path); }
  void load(const std::string& path, torch::Device device) override { call("load", path, device.str()); }

 private:
  template <class... Args>
  void call(const char* method, Args&&... args) {
    py::gil_scoped_acquire gil;
    impl_.attr(method)(std::forward<Args>(args)...);
  }
  py::object impl_;
};

// Binds every field of the option table as a read/write attribute of the TrainOptions class.
void bind_option_fields(py::class_<train::TrainOptions>& cls) {
  for (const train::OptionField& f : train::option_fields()) {
    std::visit(
        [&](auto member) {
          using T = std::decay_t<decltype(train::TrainOptions{}.*member)>;
          cls.def_property(
              f.name, [member](const train::TrainOptions& o) { return o.*member; },
              [member](train::TrainOptions& o, const T& v) { o.*member = v; }, f.help);
        },
        f.member);
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "LCKV (Layer-Condensed KV Cache) C++ library";
  m.attr("__torch_version__") = LCKV_TORCH_VERSION;

  py::register_exception<ConfigError>(m, "ConfigError", PyExc_ValueError);
  py::register_exception<io::FormatError>(m, "CheckpointError", PyExc_ValueError);
  py::class_<io::ConvertOptions>(m, "ConvertOptions", "Options of lckv-convert (lckv::io::ConvertOptions).")
      .def(py::init([](std::optional<std::string> layer_types, std::optional<int> forward_passes,
                       std::optional<int> backward_passes, std::optional<int64_t> sliding_window,
                       const std::string& kv_init, uint64_t seed) {
             io::ConvertOptions o;
             o.layer_types = layer_types;
             o.forward_passes = forward_passes;
             o.backward_passes = backward_passes;
             o.sliding_window = sliding_window;
             o.kv_init = io::parse_kv_init(kv_init);
             o.seed = seed;
             return o;
           }),
           py::arg("layer_types") = py::none(), py::arg("forward_passes") = py::none(),
           py::arg("backward_passes") = py::none(), py::arg("sliding_window") = py::none(),
           py::arg("kv_init") = "average", py::arg("seed") = 0);
  m.def(
      "convert_checkpoint",
      [](const std::string& source, const std::string& out, const io::ConvertOptions& options,
         std::optional<torch::ScalarType> dtype, bool overwrite, bool to_hf) {
        return io::convert_checkpoint(source, out, options, dtype, overwrite, to_hf);
      },
      py::arg("source"), py::arg("out"), py::arg("options"), py::arg("dtype") = py::none(),
      py::arg("overwrite") = false, py::arg("to_hf") = false, py::call_guard<py::gil_scoped_release>(),
      "lckv-convert: writes the converted checkpoint directory `out` atomically; returns its config.");

  // ---- config
  py::class_<LCKVConfig>(m, "LCKVConfig")
      .def(py::init(&config_from_json_text), py::arg("json_text"),
           "Parses a config.json text (Hugging Face LlamaConfig fields + LCKV fields); raises ConfigError.")
      .def("to_json",
           [](const LCKVConfig& c, const std::string& format) {
             if (format != "auto" && format != "lckv") {
               throw ConfigError("to_json(format='" + format + "'): expected 'auto' (config.json as written) or 'lckv'");
             }
             return c.to_json(format == "lckv" ? ConfigFormat::kLCKV : ConfigFormat::kAuto).dump(2);
           },
           py::arg("format") = "auto",
           "config.json text: 'auto' writes a plain Llama as transformers' Llama (docs/design.md §5), 'lckv' always "
           "the LCKV format.")
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
             const IterationObserver& observer, double tolerance, bool output_hidden_states) {
            const torch::Tensor lab = labels.value_or(torch::Tensor());
            // output_hidden_states: transformers' tuple (embeddings, layer outputs, final normed), one
            // list per index of the chunks it was reported for (the sequential forward: one per token).
            const size_t entries = output_hidden_states ? self.config.num_hidden_layers + 1 : 0;
            std::vector<std::vector<torch::Tensor>> chunks(entries);
            HiddenStateObserver record;
            if (output_hidden_states) record = [&chunks](int i, const torch::Tensor& h) { chunks[i].push_back(h); };
            CausalLMOutput out;
            if (sequential) {
              out = self.forward_sequential(input_ids, lab, record);
            } else {
              IterationOptions counts = self.default_iterations();
              counts.forward_passes = forward_passes.value_or(counts.forward_passes);
              counts.backward_passes = backward_passes.value_or(counts.backward_passes);
              counts.observer = observer;
              counts.tolerance = tolerance;
              counts.hidden_states = record;
              out = self.forward(input_ids, lab, counts);
            }
            std::optional<std::vector<torch::Tensor>> hidden;
            if (output_hidden_states) {
              hidden.emplace();
              for (auto& c : chunks) hidden->push_back(c.size() == 1 ? c.front() : torch::cat(c, 1));
            }
            return std::make_tuple(out.logits,
                                   out.loss.defined() ? std::optional<torch::Tensor>(out.loss) : std::nullopt,
                                   std::move(hidden));
          },
          py::arg("input_ids"), py::arg("labels"), py::arg("forward_passes"), py::arg("backward_passes"),
          py::arg("sequential"), py::arg("observer"), py::arg("tolerance") = 0.0,
          py::arg("output_hidden_states") = false, py::call_guard<py::gil_scoped_release>())
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
          "_load_converted",
          [](const std::string& dir, torch::ScalarType dtype, const io::ConvertOptions& options) {
            return io::load_converted(dir, options, dtype).ptr();
          },
          py::arg("directory"), py::arg("dtype"), py::arg("options"), py::call_guard<py::gil_scoped_release>())
      .def_static(
          "_load_pretrained",
          [](const std::string& dir, torch::ScalarType dtype) { return io::load_pretrained(dir, dtype).ptr(); },
          py::arg("directory"), py::arg("dtype"), py::call_guard<py::gil_scoped_release>())
      .def(
          "_generate",
          [](const ModelPtr& self, const std::vector<std::vector<int64_t>>& prompts, const GenerationConfig& config,
             const std::optional<py::function>& on_tokens) {
            LCKVForCausalLM holder(self);
            // on_tokens(tokens: list[int], active: list[bool]) -> bool, after every step (a TokenCallback):
            // how Python stops generation on stop strings. Called with the GIL taken.
            TokenCallback callback;
            if (on_tokens) {
              callback = [&on_tokens](const torch::Tensor& tokens, const std::vector<bool>& active) {
                py::gil_scoped_acquire gil;
                std::vector<int64_t> ids(tokens.data_ptr<int64_t>(), tokens.data_ptr<int64_t>() + tokens.numel());
                return (*on_tokens)(ids, active).cast<bool>();
              };
            }
            py::gil_scoped_release no_gil;
            return generate(holder, prompts, config, callback);
          },
          py::arg("prompts"), py::arg("config"), py::arg("on_tokens") = std::nullopt)
      .def("_weight_decay_groups", [](const ModelPtr& self) {
        LCKVForCausalLM holder(self);
        train::ParamGroups g = train::weight_decay_groups(holder);
        return std::make_pair(g.decay, g.no_decay);
      });

  // ---- generation: the C++ structs, so the field lists live in C++ only
  py::class_<SamplingConfig>(m, "SamplingConfig", "Next-token selection (Hugging Face's processors and order).")
      .def(py::init<>())
      .def_readwrite("do_sample", &SamplingConfig::do_sample)
      .def_readwrite("temperature", &SamplingConfig::temperature)
      .def_readwrite("top_k", &SamplingConfig::top_k)
      .def_readwrite("top_p", &SamplingConfig::top_p)
      .def_readwrite("repetition_penalty", &SamplingConfig::repetition_penalty)
      .def("validate", &SamplingConfig::validate);
  py::class_<StreamingOptions>(m, "StreamingOptions", "StreamingLLM: sink tokens kept, slots evicted at once.")
      .def(py::init([](int64_t sink_tokens, int64_t evict_block) { return StreamingOptions{sink_tokens, evict_block}; }),
           py::arg("sink_tokens") = 4, py::arg("evict_block") = 1)
      .def_readwrite("sink_tokens", &StreamingOptions::sink_tokens)
      .def_readwrite("evict_block", &StreamingOptions::evict_block);
  py::class_<GenerationConfig>(m, "GenerationConfig", "lckv::GenerationConfig (csrc/lckv/generate/generate.h).")
      .def(py::init<>())
      .def_readwrite("max_new_tokens", &GenerationConfig::max_new_tokens)
      .def_readwrite("sampling", &GenerationConfig::sampling)
      .def_readwrite("seed", &GenerationConfig::seed)
      .def_readwrite("stop_tokens", &GenerationConfig::stop_tokens)
      .def_property(
          "prefill", [](const GenerationConfig& c) { return to_string(c.prefill); },
          [](GenerationConfig& c, const std::string& name) { c.prefill = parse_prefill_mode(name); },
          "\"iterative\" (the config's m + b iterations) or \"exact\" (the sequential definition)")
      .def_readwrite("prefill_chunk", &GenerationConfig::prefill_chunk)
      .def_readwrite("cache_capacity", &GenerationConfig::cache_capacity)
      .def_readwrite("streaming", &GenerationConfig::streaming)
      .def_readwrite("vocab_limit", &GenerationConfig::vocab_limit)
      .def_readwrite("return_logits", &GenerationConfig::return_logits)
      .def_property(
          "decode_step", [](const GenerationConfig& c) { return to_string(c.decode_step); },
          [](GenerationConfig& c, const std::string& name) { c.decode_step = parse_decode_step(name); },
          "\"dynamic\" (attention over the written slots), \"static\" (fixed shapes over the whole cache) or "
          "\"cuda_graph\" (the static step captured in a CUDA graph; CUDA models)")
      .def("validate", &GenerationConfig::validate);
  py::class_<GenerationStats>(m, "GenerationStats")
      .def_readonly("batch", &GenerationStats::batch)
      .def_readonly("prompt_tokens", &GenerationStats::prompt_tokens)
      .def_readonly("padded_prompt_length", &GenerationStats::padded_prompt_length)
      .def_readonly("steps", &GenerationStats::steps)
      .def_readonly("new_tokens", &GenerationStats::new_tokens)
      .def_readonly("prefill_seconds", &GenerationStats::prefill_seconds)
      .def_readonly("decode_seconds", &GenerationStats::decode_seconds)
      .def_readonly("cache_bytes", &GenerationStats::cache_bytes)
      .def_readonly("cache_capacity", &GenerationStats::cache_capacity)
      .def_readonly("evicted", &GenerationStats::evicted)
      .def("__getitem__", [](py::object self, const std::string& key) { return self.attr(key.c_str()); })
      .def("__repr__", [](const GenerationStats& s) {
        return "GenerationStats(batch=" + std::to_string(s.batch) + ", new_tokens=" + std::to_string(s.new_tokens) +
               ", prefill_seconds=" + std::to_string(s.prefill_seconds) +
               ", decode_seconds=" + std::to_string(s.decode_seconds) + ")";
      });
  py::class_<GenerationResult>(m, "GenerationResult")
      .def_readonly("tokens", &GenerationResult::tokens)
      .def_property_readonly("logits",
                             [](const GenerationResult& r) { return r.logits.defined() ? py::cast(r.logits) : py::none(); })
      .def_readonly("stats", &GenerationResult::stats);

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
  m.def(
      "residual_add_rms_norm",
      [](const torch::Tensor& h, const torch::Tensor& branch, const torch::Tensor& weight, double eps,
         std::optional<at::ScalarType> out_dtype) {
        const auto sum_dtype = torch::promote_types(h.scalar_type(), branch.scalar_type());
        return ops::residual_add_rms_norm(h, branch, weight, eps,
                                          out_dtype.value_or(torch::promote_types(sum_dtype, weight.scalar_type())));
      },
      py::arg("h"), py::arg("branch"), py::arg("weight"), py::arg("eps"), py::arg("out_dtype"),
      py::call_guard<py::gil_scoped_release>());
  m.def("swiglu", &ops::swiglu, py::arg("gate"), py::arg("up"), py::call_guard<py::gil_scoped_release>());
  m.def("linear", [](const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
          return ops::linear(x, w, b.value_or(at::Tensor()));
        }, py::arg("x"), py::arg("weight"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("cross_entropy", &ops::cross_entropy, py::arg("logits"), py::arg("targets"), py::arg("ignore_index"),
        py::call_guard<py::gil_scoped_release>());
  m.def("fused_cpu_capability", &ops::fused_cpu_capability);
  m.def(
      "set_attention_backend",
      [](const std::string& name) { ops::set_attention_backend(ops::parse_attention_backend(name)); },
      py::arg("name"), "auto | lckv | sdpa (overrides LCKV_ATTENTION_BACKEND).");
  m.def("attention_backend", [] { return ops::to_string(ops::attention_backend()); });


  // ---- training: the C++ trainer behind lckv-train (python -m lckv.train drives it)
  auto& train_error = py::register_exception<train::TrainError>(m, "TrainError", PyExc_ValueError);
  py::register_exception<train::DistributedError>(m, "DistributedError", train_error.ptr());
  py::register_exception<FileError>(m, "FileError", PyExc_OSError);
  py::class_<train::TrainOptions> options(m, "TrainOptions",
                                          "lckv-train's run options; the fields are those of option_fields().");
  options.def(py::init<>())
      .def_static(
          "from_json",
          [](const std::string& text, const std::string& source) {
            return train::TrainOptions::from_json(json_fields::parse<train::TrainError>(text, source), source);
          },
          py::arg("json_text"), py::arg("source") = "run options")
      .def_static("from_file", &train::TrainOptions::from_file, py::arg("path"))
      .def("to_json", [](const train::TrainOptions& o) { return o.to_json().dump(); })
      .def("validate", &train::TrainOptions::validate);
  bind_option_fields(options);
  m.def(
      "train_option_fields",
      [] {
        const nlohmann::json defaults = train::TrainOptions{}.to_json();
        py::list out;
        for (const train::OptionField& f : train::option_fields()) {
          out.append(py::dict(py::arg("name") = f.name, py::arg("flag") = train::flag_name(f),
                              py::arg("kind") = train::kind_name(f), py::arg("default") = defaults.at(f.name).dump(),
                              py::arg("help") = f.help, py::arg("changes_result") = f.changes_result));
        }
        return out;
      },
      "The option table: name, flag, kind (string/bool/int/float/list), default (JSON), help, changes_result.");
  m.def("learning_rate", &train::learning_rate, py::arg("options"), py::arg("step"), py::arg("total_steps"));

  py::class_<train::StepStats>(m, "StepStats")
      .def_readonly("step", &train::StepStats::step)
      .def_readonly("loss", &train::StepStats::loss)
      .def_readonly("lr", &train::StepStats::lr)
      .def_readonly("grad_norm", &train::StepStats::grad_norm)
      .def_readonly("seconds", &train::StepStats::seconds);
  py::class_<train::EvalStats>(m, "EvalStats")
      .def_readonly("loss", &train::EvalStats::loss)
      .def_readonly("ppl", &train::EvalStats::ppl)
      .def_readonly("tokens", &train::EvalStats::tokens);
  py::class_<train::RunResult>(m, "RunResult")
      .def_readonly("step", &train::RunResult::step)
      .def_readonly("stop_signal", &train::RunResult::stop_signal)
      .def_readonly("final_eval", &train::RunResult::final_eval)
      .def_readonly("last_checkpoint", &train::RunResult::last_checkpoint)
      .def_readonly("sample", &train::RunResult::sample);

  py::class_<train::Trainer>(m, "Trainer")
      .def(py::init([](const train::TrainOptions& options, bool log, py::object make_optimizer) {
             train::OptimizerFactory factory;
             if (!make_optimizer.is_none()) {
               factory = [make_optimizer](LCKVForCausalLM& model, const train::TrainOptions&) {
                 py::gil_scoped_acquire gil;
                 return std::unique_ptr<train::Optimizer>(new PyOptimizer(make_optimizer(model.ptr())));
               };
             }
             py::gil_scoped_release no_gil;  // the factory takes it back
             return std::make_unique<train::Trainer>(options, log ? &std::cerr : nullptr, factory);
           }),
           py::arg("options"), py::arg("log") = true, py::arg("make_optimizer") = py::none(),
           "make_optimizer(cpp_model) -> an object with kind/set_lr/zero_grad/step/save/load (or None: fused AdamW).")
      .def("train_step", &train::Trainer::train_step, py::call_guard<py::gil_scoped_release>())
      .def("evaluate", &train::Trainer::evaluate, py::call_guard<py::gil_scoped_release>())
      .def("save_checkpoint", &train::Trainer::save_checkpoint, py::call_guard<py::gil_scoped_release>())
      .def("generate_sample", &train::Trainer::generate_sample, py::arg("prompt"), py::arg("tokens"),
           py::call_guard<py::gil_scoped_release>())
      .def("run", &train::Trainer::run, py::arg("after_step") = std::function<void(const train::StepStats&)>{},
           py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("step", &train::Trainer::step)
      .def_property_readonly("total_steps", &train::Trainer::total_steps)
      .def_property_readonly("tokens_per_step", &train::Trainer::tokens_per_step)
      .def_property_readonly("options", &train::Trainer::options)
      .def_property_readonly("rank", &train::Trainer::rank)
      .def_property_readonly("world_size", &train::Trainer::world_size)
      .def_property_readonly("bytes_reduced_per_step", &train::Trainer::bytes_reduced_per_step)
      .def_property_readonly("optimizer_state_bytes", &train::Trainer::optimizer_state_bytes)
      .def_property_readonly("last_checkpoint", &train::Trainer::last_checkpoint)
      .def_property_readonly("_cpp_model", [](train::Trainer& t) { return t.model().ptr(); });
  m.def(
      "evaluate_windows",
      [](const ModelPtr& model, const std::vector<std::string>& shards, int64_t seq_len, int64_t batch_size,
         int64_t max_batches, bool bf16, bool exact) {
        LCKVForCausalLM holder(model);
        data::SequentialLoader loader(shards, loader_options(seq_len, batch_size, 0, 0, 1));
        if (loader.vocab_size() > holder->config.vocab_size) {
          throw train::TrainError("the shards (" + shards.front() + ", ...) hold token ids up to " +
                                  std::to_string(loader.vocab_size() - 1) + " but the model's vocab_size is " +
                                  std::to_string(holder->config.vocab_size));
        }
        train::WindowEval w;
        w.seq_len = seq_len;
        w.max_batches = max_batches;
        w.bf16 = bf16;
        const torch::Device device = holder->parameters().front().device();
        if (exact) w.iterations = train::exact_iterations(seq_len, bf16, holder->parameters().front().scalar_type());
        py::gil_scoped_release no_gil;
        const auto [sum, tokens] = train::loss_sum(holder, loader, w, device);
        return train::eval_stats(sum, tokens);
      },
      py::arg("model"), py::arg("shards"), py::arg("seq_len"), py::arg("batch_size"), py::arg("max_batches"),
      py::arg("bf16"), py::arg("exact"),
      "lckv-eval's computation: the next-token loss over the windows of token shards, as validation computes it.");
  m.def("sliding_windows",
        [](int64_t tokens, int64_t context, int64_t stride) {
          std::vector<std::tuple<int64_t, int64_t, int64_t>> out;
          for (const auto& w : train::sliding_windows(0, tokens, context, stride)) {
            out.emplace_back(w.begin, w.end, w.scored);
          }
          return out;
        },
        py::arg("tokens"), py::arg("context"), py::arg("stride"),
        "lckv-eval's windows of a document of `tokens` ids: (begin, end, scored) (csrc/lckv/train/evaluate.h).");
  m.def("checkpoint_tokenizer", &train::checkpoint_tokenizer, py::arg("checkpoint_dir"));
  m.def("eval_stats", &train::eval_stats, py::arg("loss_sum"), py::arg("tokens"));
  m.def("tokenize_documents",
        [](const std::vector<std::string>& files, bool jsonl, const std::string& text_field,
           const std::string& tokenizer, const ModelPtr& model) {
          return train::tokenize_documents(files, jsonl, text_field, tokenizer, model->config);
        },
        py::arg("files"), py::arg("jsonl"), py::arg("text_field"), py::arg("tokenizer"), py::arg("model"),
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "text_loss_sum",
      [](const ModelPtr& model, const std::vector<std::vector<int64_t>>& documents, int64_t context, int64_t stride,
         int64_t batch_size, bool bf16, bool exact, std::optional<int64_t> sink_tokens,
         const std::optional<py::function>& progress) {
        LCKVForCausalLM holder(model);
        train::TextEval t;
        t.context = context;
        t.stride = stride;
        t.batch_size = batch_size;
        t.bf16 = bf16;
        const torch::Tensor weight = holder->parameters().front();
        if (exact) t.iterations = train::exact_iterations(context, bf16, weight.scalar_type());
        if (sink_tokens) t.streaming = StreamingOptions{*sink_tokens, 1};
        if (progress) {
          t.progress = [&progress](int64_t done, int64_t total) {
            py::gil_scoped_acquire gil;
            (*progress)(done, total);
          };
        }
        py::gil_scoped_release no_gil;
        const train::TextLossSum r = train::text_loss_sum(holder, documents, t, weight.device());
        return std::make_tuple(r.sum, r.tokens, r.windows);
      },
      py::arg("model"), py::arg("documents"), py::arg("context"), py::arg("stride"), py::arg("batch_size"),
      py::arg("bf16"), py::arg("exact"), py::arg("sink_tokens") = std::nullopt, py::arg("progress") = std::nullopt,
      "lckv-eval's text scoring: (loss sum, predictions scored, windows) over documents of token ids.");
  m.def("native_bf16", [](const std::string& device) { return native_bf16(c10::Device(device)); },
        py::arg("device") = "cpu",
        "Whether bf16 matmuls run natively on device (CUDA; a CPU with AMX-BF16 or AVX512-BF16)");
  m.def("resolve_compute_dtype",
        [](const std::string& name, const std::string& device) {
          return resolve_compute_dtype(name, c10::Device(device));
        },
        py::arg("name"), py::arg("device") = "cpu",
        "A compute-dtype option: 'auto' -> 'bf16' where native_bf16(device), else 'fp32'; 'bf16'/'fp32' unchanged");
  m.def("compute_dtype_names", [] { return compute_dtype_names(); },
        "The values of every compute-dtype option: auto, bf16, fp32");
  m.def("convergence_tolerance", &convergence_tolerance, py::arg("dtype"),
        "The KV convergence tolerance exact prefill uses for a compute dtype.");
  m.def("install_stop_handlers", &train::install_stop_handlers,
        "SIGINT/SIGTERM make Trainer.run save a checkpoint and return (as lckv-train does).");
  m.def("clear_stop_request", &train::clear_stop_request);
  m.def("training_flops_per_token", &training_flops_per_token, py::arg("config"), py::arg("seq_len"),
        py::arg("forward_passes"), py::arg("backward_passes"),
        "Matmul FLOPs per token of one training step as the iteration plan runs it (config.h).");

  // ---- data: the tokenizer and the loaders over lckv-prepare's shards
  py::class_<data::Tokenizer>(m, "Tokenizer")
      .def_static("load", &data::Tokenizer::load, py::arg("path"))
      .def("encode", [](const data::Tokenizer& t, const std::string& text) { return t.encode(text); }, py::arg("text"))
      .def("decode", &data::Tokenizer::decode, py::arg("ids"))
      .def_property_readonly("vocab_size", &data::Tokenizer::vocab_size)
      .def_property_readonly("bos_id", &data::Tokenizer::bos_id)
      .def_property_readonly("eos_id", &data::Tokenizer::eos_id)
      .def_property_readonly("path", &data::Tokenizer::path)
      .def_property_readonly("kind", &data::Tokenizer::kind);
  m.def("find_tokenizer", &data::find_tokenizer, py::arg("dir"),
        "The tokenizer file in a checkpoint or data directory: tokenizer.model, else tokenizer.json.");
  m.def("copy_tokenizer", &data::copy_tokenizer, py::arg("from_dir_or_file"), py::arg("to_dir"),
        "Copies a tokenizer into to_dir as tokenizer.model or tokenizer.json (atomically); returns the copy's path.");

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
      .def("next", [](data::TrainLoader& l) { return train::batch_tensor(l.next()); },
           "The next batch of windows, int64 [batch, seq_len + 1].")
      .def("state", [](const data::TrainLoader& l) { return nlohmann::json(l.state()).dump(); })
      .def("restore", [](data::TrainLoader& l, const std::string& state) {
        l.restore(json_fields::parse(state, "loader state").get<data::LoaderState>());
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
             return train::batch_tensor(*b);
           })
      .def("reset", &data::SequentialLoader::reset)
      .def("num_windows", &data::SequentialLoader::num_windows);
}
