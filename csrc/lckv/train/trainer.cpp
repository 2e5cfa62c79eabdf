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

// The data's tokenizer, which every checkpoint carries; none when the data directory holds no tokenizer
// file (Trainer::build said so).
std::string checkpoint_tokenizer(const data::PreparedData& data) {
  std::error_code ec;
  return fs::is_regular_file(data.tokenizer, ec) ? data.tokenizer : std::string();
}

}  // namespace

torch::Tensor Trainer::batch_loss(const data::Batch& batch) {
  WindowEval w;
  w.seq_len = options_.seq_len;
  w.bf16 = options_.bf16();
  return window_loss(model_, batch, w, device_);
}

StepStats Trainer::train_step() {
  const auto t0 = std::chrono::steady_clock::now();
  StepStats s;
  s.lr = learning_rate(options_, step_, total_steps_);
  optimizer_->set_lr(s.lr);
  model_->train();
  // Data parallel: the gradients are views into the all-reduce buckets, zeroed there (an optimizer's
  // zero_grad would detach them).
  if (sync_) sync_->begin_step();
  else optimizer_->zero_grad();
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
    // Data parallel: a rank goes on through the step's collectives, and the ranks agree below.
    if (!std::isfinite(value) && !comm_) throw not_finite("the training loss", value);
    if (sync_ && micro + 1 == options_.grad_accum) sync_->arm();  // the last backward reduces the gradients
    (loss / options_.grad_accum).backward();
    loss_sum += value;
  }
  if (comm_) {
    sync_->finish();
    // One small all-reduce: the ranks' losses, and whether any rank got a stop signal.
    const int sig = requested_stop_signal();
    torch::Tensor agree = torch::tensor({loss_sum, sig == SIGINT ? 1.0 : 0.0, sig != 0 && sig != SIGINT ? 1.0 : 0.0},
                                        torch::kDouble).to(device_);
    comm_->all_reduce(agree, "the step's loss and stop agreement");
    agree = agree.cpu();
    loss_sum = agree[0].item<double>() / world_size();
    agreed_stop_ = agree[1].item<double>() > 0 ? SIGINT : agree[2].item<double>() > 0 ? SIGTERM : 0;
    if (!std::isfinite(loss_sum)) throw not_finite("the training loss (mean over the ranks)", loss_sum);
    s.grad_norm = sync_->clip_grad_norm(options_.grad_clip);
  } else {
    // The global norm over both groups (clipping with an infinite bound only measures it).
    s.grad_norm = torch::nn::utils::clip_grad_norm_(
        model_->parameters(), options_.grad_clip > 0 ? options_.grad_clip : std::numeric_limits<double>::infinity());
  }
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
  WindowEval w;
  w.seq_len = options_.seq_len;
  w.max_batches = options_.eval_batches;
  w.bf16 = options_.bf16();
  auto [sum, tokens] = loss_sum(model_, *val_loader_, w, device_);
  model_->train();
  if (comm_) {  // each rank evaluated its share of the windows
    torch::Tensor sums = torch::tensor({sum, static_cast<double>(tokens)}, torch::kDouble).to(device_);
    comm_->all_reduce(sums, "the validation loss");
    sums = sums.cpu();
    sum = sums[0].item<double>();
    tokens = static_cast<int64_t>(sums[1].item<double>());
  }
  return eval_stats(sum, tokens);
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
  if (!comm_) {
    last_checkpoint_ = train::save_checkpoint(options_.out, model_, *optimizer_, s, options_.keep_checkpoints,
                                       checkpoint_tokenizer(data_));
    return last_checkpoint_;
  }
  // Data parallel: the ranks' weights are equal and the loader state is global, so rank 0 writes
  // the checkpoint alone, the sharded optimizer's state first gathered from every rank; then every
  // rank learns whether it succeeded.
  std::unique_ptr<FusedAdamW> gathered = sharded_ ? sharded_->gather_full() : nullptr;
  std::string error;
  if (rank() == 0) {
    try {
      train::save_checkpoint(options_.out, model_, gathered ? *gathered : *optimizer_, s, options_.keep_checkpoints,
                                       checkpoint_tokenizer(data_));
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  const std::vector<std::string> outcome = comm_->exchange("save/" + std::to_string(save_count_++), error);
  if (!outcome[0].empty()) {
    throw TrainError(rank() == 0 ? outcome[0] : "rank 0 failed to save a checkpoint: " + outcome[0]);
  }
  last_checkpoint_ = (fs::path(options_.out) / checkpoint_name(step_)).string();
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
  if (rank() != 0) return;
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
    if (comm_) {
      *log_ << "data parallel: " << world_size() << " ranks x " << options_.batch_size / world_size()
            << " rows per micro-batch, " << bytes_reduced_per_step() << " gradient bytes "
            << (sharded_ ? "reduce-scattered" : "all-reduced") << " per step, optimizer state "
            << optimizer_state_bytes() << " bytes per rank" << (sharded_ ? " (sharded)" : "") << "\n";
    }
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
    const int stop = stop_signal();
    if (step_ % options_.log_every == 0 || last || stop) {
      const double tokens_per_s = static_cast<double>(interval_steps * tokens_per_step()) / interval_seconds;
      const double session_s = std::chrono::duration<double>(clock::now() - session_start).count();
      const double eta = session_s / static_cast<double>(step_ - session_first_step) * static_cast<double>(total_steps_ - step_);
      const double loss = interval_loss / static_cast<double>(interval_steps);
      json record = {{"type", "train"}, {"step", step_}, {"loss", loss}, {"lr", s.lr}, {"grad_norm", s.grad_norm},
                     {"tokens", tokens_seen_}, {"tokens_per_s", tokens_per_s}, {"elapsed_s", elapsed_s_}};
      if (comm_) {
        record["world_size"] = world_size();
        record["bytes_reduced_per_step"] = bytes_reduced_per_step();
        record["optimizer_state_bytes"] = optimizer_state_bytes();  // rank 0's
        record["buckets"] = sync_->buckets().size();
        record["buckets_reduced_during_backward"] = sync_->buckets_launched_during_backward();
      }
      log_metrics(record);
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
  if (!result.stop_signal && !options_.prompt.empty() && options_.generate_tokens > 0 && rank() == 0) {
    result.sample = generate_sample(options_.prompt, options_.generate_tokens);
    if (requested_stop_signal()) result.stop_signal = requested_stop_signal();
  }
  return result;
}

}  // namespace lckv::train
