#include "lckv/train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <limits>
#include <sstream>

#include "lckv/autocast.h"
#include "lckv/data/tokenizer.h"
#include "lckv/generate/generate.h"

namespace lckv::train {

namespace fs = std::filesystem;
using json = nlohmann::json;

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

torch::Tensor batch_tensor(const data::Batch& b, torch::Device device) {
  return torch::from_blob(const_cast<int32_t*>(b.tokens.data()), {b.rows, b.cols}, torch::kInt).to(device, torch::kLong);
}

namespace {

std::string format_duration(double seconds) {
  const auto s = static_cast<int64_t>(std::max(0.0, seconds));
  std::ostringstream out;
  if (s >= 3600) out << s / 3600 << "h" << std::setw(2) << std::setfill('0') << (s % 3600) / 60 << "m";
  else if (s >= 60) out << s / 60 << "m" << std::setw(2) << std::setfill('0') << s % 60 << "s";
  else out << s << "s";
  return out.str();
}

}  // namespace

Trainer::Trainer(const TrainOptions& options, std::ostream* log, const OptimizerFactory& make_optimizer)
    : options_(options), log_(log) {
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

  // Inputs first: data, model config, tokenizer, checkpoint. Nothing under `out` is written until
  // they pass (but the lock, taken before the checkpoint is read).
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
  total_steps_ = options_.max_tokens > 0 ? (options_.max_tokens + tokens_per_step() - 1) / tokens_per_step()
                                         : options_.max_steps;
  if (!options_.prompt.empty() && options_.generate_tokens > 0) {
    try {
      const data::Tokenizer tokenizer = data::Tokenizer::load(data_.tokenizer);
      check_tokenizer_vocab(config, tokenizer.vocab_size(), data_.tokenizer);
    } catch (const std::exception& e) {
      throw TrainError(std::string("option prompt: the sample after training needs the data's tokenizer: ") + e.what());
    }
  }

  torch::manual_seed(options_.seed);
  model_ = LCKVForCausalLM(config);
  init_weights(model_);
  model_->to(device_);
  optimizer_ = make_optimizer ? make_optimizer(model_, options_) : std::make_unique<FusedAdamW>(model_, options_);
  if (!optimizer_) throw TrainError("the optimizer factory returned no optimizer");

  const fs::path out(options_.out);
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec || !fs::is_directory(out)) {
    throw TrainError("cannot create output directory '" + options_.out + "': " +
                     (ec ? ec.message() : std::string("a file of that name exists")));
  }
  try {
    out_lock_ = std::make_unique<FileLock>(out / ".lock", "output directory '" + options_.out + "'");
  } catch (const FileError& e) {
    throw TrainError(std::string(e.what()) + ": two runs cannot share an output directory");
  }
  const std::optional<std::string> latest = latest_checkpoint(options_.out);
  if (options_.resume) {
    if (!latest) {
      throw TrainError("resume: '" + (out / "latest").string() + "' not found: '" + options_.out +
                       "' holds no checkpoint to continue");
    }
    resume_from(*latest);
  } else if (latest || fs::exists(out / "latest")) {
    throw TrainError("'" + options_.out + "' already holds a run (see '" + (out / "latest").string() +
                     "'): pass --resume to continue it, or choose another --out");
  }

  // Outputs.
  remove_stale_temporaries(options_.out);
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

void Trainer::resume_from(const std::string& dir) {
  const TrainerState s = load_checkpoint(dir, model_, *optimizer_, device_);
  // Every changed option is reported; those that change the result must be allowed by name.
  const json now = options_.to_json();
  std::vector<std::string> refused;
  for (const std::string& change : changed_fields(s.options, now, /*changes_result_only=*/true)) {
    const std::string name = change.substr(0, change.find(':'));
    if (std::find(options_.allow_changes.begin(), options_.allow_changes.end(), name) == options_.allow_changes.end()) {
      refused.push_back(change);
    }
  }
  if (!refused.empty()) {
    std::string list;
    for (const std::string& r : refused) list += (list.empty() ? "" : "; ") + r;
    throw TrainError("cannot resume from '" + dir + "' with changed options that change the result (" + list +
                     "): use the checkpoint's values, or allow them with --allow-changes " +
                     refused.front().substr(0, refused.front().find(':')) + ",...");
  }
  if (log_) {
    for (const std::string& change : changed_fields(s.options, now, /*changes_result_only=*/false)) {
      if (change.rfind("resume:", 0) != 0 && change.rfind("allow_changes:", 0) != 0) {
        *log_ << "note: resuming with a changed option: " << change << "\n";
      }
    }
  }
  if (total_steps_ <= s.step) {
    throw TrainError("nothing to train: the checkpoint '" + dir + "' is at step " + std::to_string(s.step) +
                     " and this run ends at step " + std::to_string(total_steps_) +
                     " (max_steps / max_tokens); raise --max-steps (with --allow-changes max_steps) to continue");
  }
  step_ = s.step;
  tokens_seen_ = s.tokens_seen;
  elapsed_s_ = s.elapsed_s;
  try {
    train_loader_->restore(s.loader);
  } catch (const std::exception& e) {
    throw TrainError("cannot resume from '" + dir + "': its data-loader position does not fit this run's data (" +
                     e.what() + ")");
  }
  set_cpu_rng_state(s.rng_cpu);
  last_checkpoint_ = dir;
  if (log_) *log_ << "resuming from " << dir << " at step " << step_ << "\n";
}

torch::Tensor Trainer::batch_loss(const data::Batch& batch) {
  const torch::Tensor tokens = batch_tensor(batch, device_);
  AutocastScope autocast(device_.type(), at::kBFloat16, options_.bf16());
  return model_->next_token_loss(tokens.narrow(1, 0, options_.seq_len), tokens.narrow(1, 1, options_.seq_len));
}

StepStats Trainer::train_step() {
  const auto t0 = std::chrono::steady_clock::now();
  StepStats s;
  s.lr = learning_rate(options_, step_, total_steps_);
  optimizer_->set_lr(s.lr);
  model_->train();
  optimizer_->zero_grad();
  auto not_finite = [&](const std::string& what, double value) {
    return TrainError("step " + std::to_string(step_ + 1) + ": " + what + " is " + std::to_string(value) +
                      "; stopping without applying this step. The last good checkpoint is " +
                      (last_checkpoint_.empty() ? std::string("none (no checkpoint was saved yet)") : "'" + last_checkpoint_ + "'") +
                      ". A lower --lr, more --warmup-steps or --grad-clip may help.");
  };
  double loss_sum = 0;
  for (int micro = 0; micro < options_.grad_accum; ++micro) {
    const torch::Tensor loss = batch_loss(train_loader_->next());
    const double value = loss.item<double>();
    if (!std::isfinite(value)) throw not_finite("the training loss", value);
    (loss / options_.grad_accum).backward();
    loss_sum += value;
  }
  // The global norm over both groups (clipping with an infinite bound only measures it).
  s.grad_norm = torch::nn::utils::clip_grad_norm_(
      model_->parameters(), options_.grad_clip > 0 ? options_.grad_clip : std::numeric_limits<double>::infinity());
  if (!std::isfinite(s.grad_norm)) throw not_finite("the gradient norm", s.grad_norm);
  optimizer_->step();
  ++step_;
  tokens_seen_ += tokens_per_step();
  s.step = step_;
  s.loss = loss_sum / options_.grad_accum;
  s.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return s;
}

EvalStats Trainer::evaluate() {
  if (!val_loader_) throw TrainError("evaluate: '" + options_.data + "' has no validation split");
  torch::NoGradGuard no_grad;
  model_->eval();
  val_loader_->reset();
  double loss_sum = 0;
  int64_t batches = 0;
  EvalStats e;
  while (auto batch = val_loader_->next()) {
    if (options_.eval_batches > 0 && batches == options_.eval_batches) break;
    const int64_t n = batch->rows * options_.seq_len;
    loss_sum += batch_loss(*batch).item<double>() * static_cast<double>(n);
    e.tokens += n;
    ++batches;
  }
  model_->train();
  e.loss = loss_sum / static_cast<double>(e.tokens);
  e.ppl = std::exp(e.loss);
  return e;
}

std::string Trainer::save_checkpoint() {
  TrainerState s;
  s.step = step_;
  s.total_steps = total_steps_;
  s.tokens_seen = tokens_seen_;
  s.elapsed_s = elapsed_s_;
  s.loader = train_loader_->state();
  s.rng_cpu = cpu_rng_state();
  s.optimizer = optimizer_->kind();
  s.options = options_.to_json();
  last_checkpoint_ = train::save_checkpoint(options_.out, model_, *optimizer_, s, options_.keep_checkpoints);
  return last_checkpoint_;
}

std::string Trainer::generate_sample(const std::string& prompt_text, int64_t tokens) {
  const data::Tokenizer tokenizer = data::Tokenizer::load(data_.tokenizer);
  // In the shards every document follows an EOS, so an EOS in front makes the prompt a document start.
  std::vector<int32_t> text = tokenizer.encode(prompt_text);
  std::vector<int64_t> prompt(text.begin(), text.end());
  if (tokenizer.eos_id() >= 0) prompt.insert(prompt.begin(), tokenizer.eos_id());
  GenerationConfig g;  // greedy, with the condensed KV cache
  g.max_new_tokens = tokens;
  if (tokenizer.eos_id() >= 0) g.stop_tokens = {tokenizer.eos_id()};
  g.vocab_limit = tokenizer.vocab_size();
  torch::NoGradGuard no_grad;
  model_->eval();
  AutocastScope autocast(device_.type(), at::kBFloat16, options_.bf16());
  bool stopped = false;
  std::vector<int64_t> generated = generate(model_, {prompt}, g, [&](const torch::Tensor&, const std::vector<bool>&) {
                                     stopped = requested_stop_signal() != 0;
                                     return !stopped;
                                   }).tokens[0];
  model_->train();
  if (stopped) return "";
  if (!generated.empty() && generated.back() == tokenizer.eos_id()) generated.pop_back();
  text.insert(text.end(), generated.begin(), generated.end());
  return tokenizer.decode(text);
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
               {"device", options_.device}, {"optimizer", optimizer_->kind()}});
  if (log_) {
    *log_ << "model " << options_.model_config << ": " << params << " parameters, layer_types "
          << format_layer_types(c.layer_types) << ", m=" << c.forward_passes << " b=" << c.backward_passes << "\n"
          << "training steps " << step_ << " -> " << total_steps_ << ", " << tokens_per_step() << " tokens/step, "
          << options_.dtype << " on " << options_.device << " with " << options_.threads << " threads, optimizer "
          << optimizer_->kind() << "\n";
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
  result.step = step_;
  result.last_checkpoint = last_checkpoint_;
  if (!result.stop_signal && !options_.prompt.empty() && options_.generate_tokens > 0) {
    result.sample = generate_sample(options_.prompt, options_.generate_tokens);
    if (requested_stop_signal()) result.stop_signal = requested_stop_signal();
  }
  return result;
}

}  // namespace lckv::train
