#include "lckv/train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <limits>
#include <set>
#include <sstream>

#include "lckv/autocast.h"
#include "lckv/io/checkpoint.h"
#include "lckv/io/safetensors.h"

namespace lckv::train {

namespace fs = std::filesystem;
using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Options

namespace {

// One list of the run-file fields, used by from_json and to_json alike.
template <class Options, class F>
void for_each_field(Options& o, F&& f) {
  f("model_config", o.model_config);
  f("data", o.data);
  f("out", o.out);
  f("seq_len", o.seq_len);
  f("batch_size", o.batch_size);
  f("grad_accum", o.grad_accum);
  f("max_steps", o.max_steps);
  f("max_tokens", o.max_tokens);
  f("lr", o.lr);
  f("min_lr_ratio", o.min_lr_ratio);
  f("warmup_steps", o.warmup_steps);
  f("weight_decay", o.weight_decay);
  f("beta1", o.beta1);
  f("beta2", o.beta2);
  f("adam_eps", o.adam_eps);
  f("grad_clip", o.grad_clip);
  f("seed", o.seed);
  f("threads", o.threads);
  f("dtype", o.dtype);
  f("device", o.device);
  f("eval_every", o.eval_every);
  f("eval_batches", o.eval_batches);
  f("save_every", o.save_every);
  f("keep_checkpoints", o.keep_checkpoints);
  f("log_every", o.log_every);
  f("resume", o.resume);
  f("metrics", o.metrics);
  f("prompt", o.prompt);
  f("generate_tokens", o.generate_tokens);
}

template <class T>
const char* kind_name() {
  if constexpr (std::is_same_v<T, std::string>) return "a string";
  else if constexpr (std::is_same_v<T, bool>) return "true or false";
  else if constexpr (std::is_integral_v<T>) return "an integer";
  else return "a number";
}

// Writes `text` to `path` through a temporary file in the same directory and a rename.
void write_file_atomically(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out << text;
    out.flush();
    if (!out) throw TrainError("cannot write '" + tmp.string() + "'");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) throw TrainError("cannot rename '" + tmp.string() + "' to '" + path.string() + "': " + ec.message());
}

json read_json_file(const fs::path& path, const std::string& what) {
  std::ifstream in(path);
  if (!in) throw TrainError("cannot open " + what + " '" + path.string() + "'");
  try {
    return json::parse(in);
  } catch (const json::parse_error& e) {
    throw TrainError(what + " '" + path.string() + "' is not valid JSON (" + e.what() + ")");
  }
}

}  // namespace

TrainOptions TrainOptions::from_json(const json& j) {
  if (!j.is_object()) throw TrainError("run file: expected a JSON object of options, got " + j.dump());
  TrainOptions o;
  std::set<std::string> known;
  for_each_field(o, [&](const char* key, auto& field) {
    known.insert(key);
    const auto it = j.find(key);
    if (it == j.end()) return;
    using T = std::decay_t<decltype(field)>;
    const bool ok = std::is_same_v<T, std::string> ? it->is_string()
                    : std::is_same_v<T, bool>      ? it->is_boolean()
                    : std::is_integral_v<T>        ? it->is_number_integer()
                                                   : it->is_number();
    if (!ok) throw TrainError(std::string("run file field '") + key + "': expected " + kind_name<T>() + ", got " + it->dump());
    it->get_to(field);
  });
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (!known.count(it.key())) throw TrainError("run file: unknown field '" + it.key() + "'");
  }
  return o;
}

TrainOptions TrainOptions::from_file(const std::string& path) {
  try {
    return from_json(read_json_file(path, "run file"));
  } catch (const TrainError& e) {
    const std::string msg = e.what();
    throw TrainError(msg.rfind("run file", 0) == 0 ? "'" + path + "': " + msg : msg);
  }
}

json TrainOptions::to_json() const {
  json j = json::object();
  for_each_field(*this, [&](const char* key, const auto& field) { j[key] = field; });
  return j;
}

void TrainOptions::validate() const {
  auto need = [](bool ok, const std::string& what) {
    if (!ok) throw TrainError("option " + what);
  };
  need(!model_config.empty(), "model_config (--model-config) is required: a model config.json such as configs/tiny-lckv-w2.json");
  need(!data.empty(), "data (--data) is required: a directory written by lckv-prepare");
  need(!out.empty(), "out (--out) is required: the run's output directory");
  need(seq_len > 0, "seq_len must be positive, got " + std::to_string(seq_len));
  need(batch_size > 0, "batch_size must be positive, got " + std::to_string(batch_size));
  need(grad_accum > 0, "grad_accum must be positive, got " + std::to_string(grad_accum));
  need(max_steps > 0 || max_tokens > 0, "max_steps or max_tokens must be positive");
  need(max_tokens >= 0, "max_tokens must be >= 0, got " + std::to_string(max_tokens));
  need(std::isfinite(lr) && lr > 0, "lr must be a positive number");
  need(min_lr_ratio >= 0 && min_lr_ratio <= 1, "min_lr_ratio must be in [0, 1]");
  need(warmup_steps >= 0, "warmup_steps must be >= 0");
  need(weight_decay >= 0, "weight_decay must be >= 0");
  need(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1, "beta1 and beta2 must be in [0, 1)");
  need(adam_eps > 0, "adam_eps must be positive");
  need(grad_clip >= 0, "grad_clip must be >= 0 (0 disables clipping)");
  need(threads > 0, "threads must be positive, got " + std::to_string(threads));
  need(dtype == "bf16" || dtype == "fp32", "dtype must be \"bf16\" or \"fp32\", got \"" + dtype + "\"");
  need(device == "cpu" || device.rfind("cuda", 0) == 0, "device must be \"cpu\" or \"cuda[:N]\", got \"" + device + "\"");
  need(eval_every >= 0 && eval_batches >= 0 && save_every >= 0, "eval_every, eval_batches and save_every must be >= 0");
  need(keep_checkpoints > 0, "keep_checkpoints must be positive");
  need(log_every > 0, "log_every must be positive");
  need(generate_tokens >= 0, "generate_tokens must be >= 0");
}

// ---------------------------------------------------------------------------------------------
// Schedule and parameter groups

double learning_rate(const TrainOptions& o, int64_t step, int64_t total_steps) {
  if (step < o.warmup_steps) return o.lr * static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  const int64_t decay_steps = total_steps - o.warmup_steps;
  if (decay_steps <= 1) return o.lr;
  const double progress = std::clamp(static_cast<double>(step - o.warmup_steps) / static_cast<double>(decay_steps - 1), 0.0, 1.0);
  const double min_lr = o.lr * o.min_lr_ratio;
  return min_lr + 0.5 * (1.0 + std::cos(M_PI * progress)) * (o.lr - min_lr);
}

ParamGroups weight_decay_groups(LCKVForCausalLM& model) {
  ParamGroups g;
  for (auto& [name, p] : io::hf_state_dict(model)) (p.dim() >= 2 ? g.decay : g.no_decay).emplace_back(name, p);
  return g;
}

// ---------------------------------------------------------------------------------------------
// Stop signals

namespace {
volatile std::sig_atomic_t g_stop_signal = 0;
extern "C" void on_stop_signal(int sig) { g_stop_signal = sig; }
}  // namespace

void install_stop_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND;  // a second signal ends the process at once
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
}

int requested_stop_signal() { return g_stop_signal; }
void clear_stop_request() { g_stop_signal = 0; }

// ---------------------------------------------------------------------------------------------
// Trainer

namespace {

std::string checkpoint_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%06lld", static_cast<long long>(step));
  return buf;
}

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

// [rows, T + 1] token windows to int64 on `device`.
torch::Tensor batch_tensor(data::Batch& b, torch::Device device) {
  return torch::from_blob(b.tokens.data(), {b.rows, b.cols}, torch::kInt).to(device, torch::kLong);
}

std::string format_duration(double seconds) {
  const auto s = static_cast<int64_t>(std::max(0.0, seconds));
  std::ostringstream out;
  if (s >= 3600) out << s / 3600 << "h" << std::setw(2) << std::setfill('0') << (s % 3600) / 60 << "m";
  else if (s >= 60) out << s / 60 << "m" << std::setw(2) << std::setfill('0') << s % 60 << "s";
  else out << s << "s";
  return out.str();
}

}  // namespace

Trainer::Trainer(const TrainOptions& options, std::ostream* log) : options_(options), log_(log) {
  options_.validate();
  torch::set_num_threads(options_.threads);
  try {
    device_ = torch::Device(options_.device);
  } catch (const c10::Error&) {
    throw TrainError("option device: cannot parse \"" + options_.device + "\" (expected cpu or cuda[:N])");
  }
  if (device_.is_cuda() && !torch::cuda::is_available()) {
    throw TrainError("option device \"" + options_.device + "\": this LibTorch has no CUDA or sees no GPU");
  }

  // Inputs first: data, model config, checkpoint. Nothing under `out` is touched until all pass.
  data_ = data::read_prepared(options_.data);
  if (data_.train_shards.empty()) throw TrainError("'" + options_.data + "/meta.json' lists no training shards");
  LCKVConfig config = LCKVConfig::from_file(options_.model_config);
  if (config.vocab_size != data_.vocab_size) {
    if (log_) {
      *log_ << "note: vocab_size " << config.vocab_size << " of " << options_.model_config << " replaced by the data's "
            << data_.vocab_size << " (" << options_.data << "/meta.json)\n";
    }
    config.vocab_size = data_.vocab_size;
  }
  if (options_.seq_len > config.max_position_embeddings) {
    throw TrainError("option seq_len " + std::to_string(options_.seq_len) + " exceeds max_position_embeddings " +
                     std::to_string(config.max_position_embeddings) + " of " + options_.model_config);
  }
  config.validate();

  data::LoaderOptions lo;
  lo.seq_len = options_.seq_len;
  lo.batch_size = options_.batch_size;
  lo.seed = options_.seed;
  train_loader_ = std::make_unique<data::TrainLoader>(data_.train_shards, lo);
  auto check_vocab = [&](int64_t shard_vocab, const std::vector<std::string>& shards, const char* split) {
    if (shard_vocab > config.vocab_size) {
      throw TrainError(std::string("the ") + split + " shards (" + shards.front() + ", ...) hold token ids up to " +
                       std::to_string(shard_vocab - 1) + " (their vocab_size is " + std::to_string(shard_vocab) +
                       ") but the model's vocab_size is " + std::to_string(config.vocab_size) + " (from " +
                       options_.data + "/meta.json): were they written with another tokenizer?");
    }
  };
  check_vocab(train_loader_->vocab_size(), data_.train_shards, "training");
  if (!data_.val_shards.empty()) {
    val_loader_ = std::make_unique<data::SequentialLoader>(data_.val_shards, lo);
    check_vocab(val_loader_->vocab_size(), data_.val_shards, "validation");
  }
  total_steps_ = options_.max_tokens > 0 ? (options_.max_tokens + tokens_per_step() - 1) / tokens_per_step() : options_.max_steps;

  torch::manual_seed(options_.seed);
  model_ = LCKVForCausalLM(config);
  init_weights(model_);
  model_->to(device_);
  const ParamGroups groups = weight_decay_groups(model_);
  auto adamw = [&](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(torch::optim::AdamWOptions(options_.lr)
                                                            .betas({options_.beta1, options_.beta2})
                                                            .eps(options_.adam_eps)
                                                            .weight_decay(wd));
  };
  auto tensors = [](const std::vector<std::pair<std::string, torch::Tensor>>& named) {
    std::vector<torch::Tensor> out;
    for (const auto& [name, t] : named) out.push_back(t);
    return out;
  };
  std::vector<torch::optim::OptimizerParamGroup> param_groups;
  param_groups.emplace_back(tensors(groups.decay), adamw(options_.weight_decay));
  param_groups.emplace_back(tensors(groups.no_decay), adamw(0.0));
  optimizer_ = std::make_unique<torch::optim::AdamW>(param_groups, *adamw(options_.weight_decay));

  const fs::path out(options_.out);
  const fs::path latest = out / "latest";
  if (options_.resume) {
    std::ifstream in(latest);
    std::string name;
    if (!in || !std::getline(in, name) || name.empty()) {
      throw TrainError("resume: '" + latest.string() + "' not found: '" + options_.out + "' holds no checkpoint to continue");
    }
    load_checkpoint((out / name).string());
  } else if (fs::exists(latest)) {
    throw TrainError("'" + options_.out + "' already holds a run (see '" + latest.string() +
                     "'): pass --resume to continue it, or choose another --out");
  }

  // Outputs.
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec || !fs::is_directory(out)) {
    throw TrainError("cannot create output directory '" + options_.out + "': " +
                     (ec ? ec.message() : std::string("a file of that name exists")));
  }
  write_file_atomically(out / "train.json", options_.to_json().dump(2) + "\n");
  metrics_path_ = options_.metrics.empty() ? (out / "metrics.jsonl").string() : options_.metrics;
  // A resumed run continues the metrics file from its checkpoint: records of steps after it
  // (written before the interruption) are dropped so the file reads as one run.
  std::string kept;
  if (options_.resume) {
    std::ifstream in(metrics_path_);
    for (std::string line; std::getline(in, line);) {
      const json rec = json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (rec.is_object() && rec.value("step", int64_t{0}) <= step_) kept += line + "\n";
    }
  }
  write_file_atomically(metrics_path_, kept);
}

int64_t Trainer::tokens_per_step() const { return options_.seq_len * options_.batch_size * options_.grad_accum; }

void fused_adamw_step(torch::optim::AdamW& opt) {
  torch::NoGradGuard no_grad;
  for (auto& group : opt.param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
    std::vector<torch::optim::AdamWParamState*> states;
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      auto& slot = opt.state()[p.unsafeGetTensorImpl()];
      if (!slot) {
        auto st = std::make_unique<torch::optim::AdamWParamState>();
        st->step(0);
        st->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        st->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        slot = std::move(st);
      }
      auto& st = static_cast<torch::optim::AdamWParamState&>(*slot);
      st.step(st.step() + 1);  // the fused kernel takes the already-incremented step, as in PyTorch
      params.push_back(p);
      grads.push_back(p.grad());
      exp_avgs.push_back(st.exp_avg());
      exp_avg_sqs.push_back(st.exp_avg_sq());
      steps.push_back(torch::full({}, static_cast<double>(st.step()), p.options().dtype(torch::kFloat)));
    }
    if (params.empty()) continue;
    at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps, o.lr(),
                      std::get<0>(o.betas()), std::get<1>(o.betas()), o.weight_decay(), o.eps(),
                      /*amsgrad=*/false, /*maximize=*/false);
  }
}

StepStats Trainer::train_step() {
  const auto t0 = std::chrono::steady_clock::now();
  StepStats s;
  s.lr = learning_rate(options_, step_, total_steps_);
  for (auto& group : optimizer_->param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(s.lr);
  model_->train();
  optimizer_->zero_grad();
  const bool bf16 = options_.dtype == "bf16";
  auto not_finite = [&](const std::string& what, double value) {
    return TrainError("step " + std::to_string(step_ + 1) + ": " + what + " is " + std::to_string(value) +
                      "; stopping without applying this step. The last good checkpoint is " +
                      (last_checkpoint_.empty() ? std::string("none (no checkpoint was saved yet)") : "'" + last_checkpoint_ + "'") +
                      ". A lower --lr, more --warmup-steps or --grad-clip may help.");
  };
  double loss_sum = 0;
  for (int micro = 0; micro < options_.grad_accum; ++micro) {
    data::Batch batch = train_loader_->next();
    const torch::Tensor tokens = batch_tensor(batch, device_);
    const torch::Tensor inputs = tokens.narrow(1, 0, options_.seq_len);
    const torch::Tensor targets = tokens.narrow(1, 1, options_.seq_len);
    torch::Tensor loss;
    {
      AutocastScope autocast(device_.type(), at::kBFloat16, bf16);
      loss = lm_loss(model_->lm_logits(model_->model->forward(inputs, model_->default_iterations())), targets);
    }
    const double value = loss.item<double>();
    if (!std::isfinite(value)) throw not_finite("the training loss", value);
    (loss / options_.grad_accum).backward();
    loss_sum += value;
  }
  // The global norm over both groups (clipping with an infinite bound only measures it).
  s.grad_norm = torch::nn::utils::clip_grad_norm_(
      model_->parameters(), options_.grad_clip > 0 ? options_.grad_clip : std::numeric_limits<double>::infinity());
  if (!std::isfinite(s.grad_norm)) throw not_finite("the gradient norm", s.grad_norm);
  fused_adamw_step(*optimizer_);
  ++step_;
  tokens_seen_ += tokens_per_step();
  s.step = step_;
  s.loss = loss_sum / options_.grad_accum;
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s;
}

EvalStats Trainer::evaluate() {
  TORCH_CHECK(val_loader_, "evaluate: '", options_.data, "' has no validation split");
  torch::NoGradGuard no_grad;
  model_->eval();
  val_loader_->reset();
  double loss_sum = 0;
  int64_t batches = 0;
  EvalStats e;
  while (auto batch = val_loader_->next()) {
    if (options_.eval_batches > 0 && batches == options_.eval_batches) break;
    const torch::Tensor tokens = batch_tensor(*batch, device_);
    torch::Tensor loss;
    {
      AutocastScope autocast(device_.type(), at::kBFloat16, options_.dtype == "bf16");
      loss = lm_loss(model_->lm_logits(model_->model->forward(tokens.narrow(1, 0, options_.seq_len), model_->default_iterations())),
                     tokens.narrow(1, 1, options_.seq_len));
    }
    const int64_t n = batch->rows * options_.seq_len;
    loss_sum += loss.item<double>() * static_cast<double>(n);
    e.tokens += n;
    ++batches;
  }
  model_->train();
  e.loss = loss_sum / static_cast<double>(e.tokens);
  e.ppl = std::exp(e.loss);
  return e;
}

std::string Trainer::save_checkpoint() {
  const fs::path out(options_.out);
  const std::string name = checkpoint_name(step_);
  const fs::path tmp = out / (".tmp_" + name);
  const fs::path final_dir = out / name;
  fs::remove_all(tmp);
  io::save_pretrained(model_, tmp.string(), torch::kFloat);
  torch::save(*optimizer_, (tmp / "optimizer.pt").string());
  const json state = {{"format", "lckv-train-state"},
                      {"version", 1},
                      {"step", step_},
                      {"total_steps", total_steps_},
                      {"tokens_seen", tokens_seen_},
                      {"elapsed_s", elapsed_s_},
                      {"loader", train_loader_->state()},
                      {"rng_cpu", to_hex(cpu_rng_state())},
                      {"options", options_.to_json()}};
  write_file_atomically(tmp / "trainer_state.json", state.dump(2) + "\n");
  // Replace a checkpoint of the same step (a run resumed and stopped again at once) only
  // after the new one is complete.
  const fs::path old = out / (".old_" + name);
  fs::remove_all(old);
  if (fs::exists(final_dir)) fs::rename(final_dir, old);
  fs::rename(tmp, final_dir);
  write_file_atomically(out / "latest", name + "\n");
  fs::remove_all(old);
  last_checkpoint_ = final_dir.string();

  std::vector<fs::path> checkpoints;
  for (const auto& entry : fs::directory_iterator(out)) {
    const std::string n = entry.path().filename().string();
    if (entry.is_directory() && n.rfind("step_", 0) == 0) checkpoints.push_back(entry.path());
  }
  std::sort(checkpoints.begin(), checkpoints.end());
  for (std::size_t i = 0; i + options_.keep_checkpoints < checkpoints.size(); ++i) {
    if (checkpoints[i] != final_dir) fs::remove_all(checkpoints[i]);
  }
  return last_checkpoint_;
}

void Trainer::load_checkpoint(const std::string& dir) {
  const fs::path d(dir);
  for (const char* file : {"config.json", "model.safetensors", "optimizer.pt", "trainer_state.json"}) {
    if (!fs::exists(d / file)) throw TrainError("cannot resume from '" + dir + "': it has no " + file);
  }
  // The checkpoint's model must be the one this run builds.
  json saved, current = model_->config.to_json();
  try {
    saved = LCKVConfig::from_file((d / "config.json").string()).to_json();
  } catch (const ConfigError& e) {
    throw TrainError("cannot resume from '" + dir + "': " + e.what());
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
    throw TrainError("cannot resume from '" + dir + "': its config.json does not match this run's model (" +
                     options_.model_config + ", vocab_size from the data): " + differences +
                     " (checkpoint vs this run)");
  }
  const std::string weights = (d / "model.safetensors").string();
  try {
    io::load_state(model_, io::load_safetensors(weights), weights);
  } catch (const io::FormatError& e) {
    throw TrainError("cannot resume from '" + dir + "': " + e.what());
  }
  const fs::path state_path = d / "trainer_state.json";
  const json state = read_json_file(state_path, "trainer state");
  try {
    step_ = state.at("step").get<int64_t>();
    tokens_seen_ = state.at("tokens_seen").get<int64_t>();
    elapsed_s_ = state.at("elapsed_s").get<double>();
    train_loader_->restore(state.at("loader").get<data::LoaderState>());
    set_cpu_rng_state(from_hex(state.at("rng_cpu").get<std::string>(), state_path.string()));
  } catch (const json::exception& e) {
    throw TrainError("cannot resume from '" + dir + "': " + state_path.string() + ": " + e.what());
  } catch (const TrainError&) {
    throw;
  } catch (const std::exception& e) {
    throw TrainError("cannot resume from '" + dir + "': " + e.what());
  }
  try {
    torch::load(*optimizer_, (d / "optimizer.pt").string(), device_);
  } catch (const c10::Error& e) {
    throw TrainError("cannot resume from '" + dir + "': optimizer.pt is unreadable (" + e.what_without_backtrace() + ")");
  }
  last_checkpoint_ = dir;
  if (log_) *log_ << "resuming from " << dir << " at step " << step_ << "\n";
}

void Trainer::log_metrics(const json& record) {
  std::ofstream out(metrics_path_, std::ios::app);
  out << record.dump() << "\n";
  out.flush();
  if (!out) throw TrainError("cannot append to metrics file '" + metrics_path_ + "'");
}

RunResult Trainer::run(const std::function<void(const StepStats&)>& after_step) {
  using clock = std::chrono::steady_clock;
  RunResult result;
  const auto session_start = clock::now();
  const int64_t session_first_step = step_;
  const double elapsed_before = elapsed_s_;
  int64_t params = 0;
  for (const auto& p : model_->parameters()) params += p.numel();
  const auto& c = model_->config;
  log_metrics({{"type", "run"}, {"step", step_}, {"model_config", options_.model_config},
               {"layer_types", format_layer_types(c.layer_types)}, {"forward_passes", c.forward_passes},
               {"backward_passes", c.backward_passes}, {"params", params}, {"tokens_per_step", tokens_per_step()},
               {"total_steps", total_steps_}, {"threads", options_.threads}, {"dtype", options_.dtype},
               {"device", options_.device}});
  if (log_) {
    *log_ << "model " << options_.model_config << ": " << params << " parameters, layer_types "
          << format_layer_types(c.layer_types) << ", m=" << c.forward_passes << " b=" << c.backward_passes << "\n"
          << "training steps " << step_ << " -> " << total_steps_ << ", " << tokens_per_step() << " tokens/step, "
          << options_.dtype << " on " << options_.device << " with " << options_.threads << " threads\n";
  }
  auto run_eval = [&] {
    if (!val_loader_) return;
    const EvalStats e = evaluate();
    result.final_eval = e;
    log_metrics({{"type", "eval"}, {"step", step_}, {"val_loss", e.loss}, {"val_ppl", e.ppl}, {"tokens", tokens_seen_},
                 {"elapsed_s", elapsed_s_}});
    if (log_) *log_ << "step " << step_ << " | val loss " << std::fixed << std::setprecision(4) << e.loss << " | val ppl "
                    << std::setprecision(2) << e.ppl << std::defaultfloat << "\n";
  };

  double interval_loss = 0, interval_seconds = 0;
  int64_t interval_steps = 0;
  while (step_ < total_steps_) {
    const StepStats s = train_step();
    elapsed_s_ = elapsed_before + std::chrono::duration<double>(clock::now() - session_start).count();
    if (after_step) after_step(s);
    interval_loss += s.loss;
    interval_seconds += s.seconds;
    ++interval_steps;
    const bool last = step_ == total_steps_;
    const int stop = requested_stop_signal();
    if (step_ % options_.log_every == 0 || last || stop) {
      const double tokens_per_s = static_cast<double>(interval_steps * tokens_per_step()) / interval_seconds;
      const double session_s = std::chrono::duration<double>(clock::now() - session_start).count();
      const double eta = session_s / static_cast<double>(step_ - session_first_step) * static_cast<double>(total_steps_ - step_);
      const double loss = interval_loss / static_cast<double>(interval_steps);
      log_metrics({{"type", "train"}, {"step", step_}, {"loss", loss}, {"lr", s.lr}, {"grad_norm", s.grad_norm},
                   {"tokens", tokens_seen_}, {"tokens_per_s", tokens_per_s}, {"elapsed_s", elapsed_s_}});
      if (log_) {
        *log_ << "step " << step_ << "/" << total_steps_ << " | loss " << std::fixed << std::setprecision(4) << loss
              << " | lr " << std::scientific << std::setprecision(2) << s.lr << " | grad norm " << std::fixed
              << std::setprecision(2) << s.grad_norm << " | " << std::setprecision(0) << tokens_per_s << " tok/s | ETA "
              << format_duration(eta) << std::defaultfloat << std::endl;
      }
      interval_loss = interval_seconds = 0;
      interval_steps = 0;
    }
    if ((options_.eval_every > 0 && step_ % options_.eval_every == 0) || last) run_eval();
    if ((options_.save_every > 0 && step_ % options_.save_every == 0) || last || stop) {
      save_checkpoint();
      if (log_) *log_ << "saved " << last_checkpoint_ << "\n";
    }
    if (stop) {
      result.stop_signal = stop;
      if (log_) {
        *log_ << "stopped by signal " << stop << " after step " << step_ << "; continue with --resume (checkpoint "
              << last_checkpoint_ << ")\n";
      }
      break;
    }
  }
  if (step_ == total_steps_ && step_ == session_first_step) run_eval();  // resumed a finished run
  result.step = step_;
  result.last_checkpoint = last_checkpoint_;
  return result;
}

}  // namespace lckv::train
