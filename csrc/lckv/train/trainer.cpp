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
  const std::optional<LaunchEnv> launch = read_launch_env();
  if (launch) {
    if (launch->rank != 0) log_ = nullptr;  // rank 0 alone logs
    if (options_.batch_size % launch->world_size != 0) {
      throw TrainError("option batch_size " + std::to_string(options_.batch_size) + " (the global micro-batch) is not "
                       "divisible by WORLD_SIZE " + std::to_string(launch->world_size) +
                       ": each rank runs batch_size / WORLD_SIZE rows; choose a multiple of " +
                       std::to_string(launch->world_size));
    }
    if (options_.shard_optimizer && make_optimizer) {
      throw TrainError("option shard_optimizer: the sharded AdamW replaces the optimizer; a custom optimizer cannot be "
                       "sharded");
    }
  }
  torch::set_num_threads(options_.threads);
  try {
    device_ = torch::Device(options_.device);
  } catch (const c10::Error&) {
    throw TrainError("option device: cannot parse \"" + options_.device + "\" (expected cpu or cuda[:N])");
  }
  if (device_.is_cuda() && !torch::cuda::is_available()) {
    throw TrainError("option device \"" + options_.device + "\": this LibTorch has no CUDA or sees no GPU");
  }
  if (!launch) {
    if (options_.shard_optimizer && log_) *log_ << "note: shard_optimizer has no effect without torchrun's variables\n";
    build(make_optimizer);
    write_outputs();
    return;
  }
  if (device_.is_cuda()) device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(launch->local_rank));
  comm_ = std::make_unique<Communicator>(
      *launch, device_, std::chrono::milliseconds(static_cast<int64_t>(options_.dist_timeout_s * 1000)));
  // Every rank builds, then all learn whether every rank succeeded and runs the same thing.
  std::string local_error;
  try {
    build(make_optimizer);
  } catch (const std::exception& e) {
    local_error = e.what();
    if (local_error.empty()) local_error = "failed";
  }
  check_ranks_agree(local_error);
  write_outputs();
}

void Trainer::build(const OptimizerFactory& make_optimizer) {
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
  lo.batch_size = options_.batch_size / world_size();
  lo.seed = options_.seed;
  lo.rank = rank();
  lo.world_size = world_size();
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
  if (comm_) {
    sync_ = std::make_unique<GradientSync>(*comm_, model_, static_cast<int64_t>(options_.bucket_mb * (1 << 20)),
                                           options_.shard_optimizer);
  }
  if (sync_ && options_.shard_optimizer) {
    auto sharded = std::make_unique<ShardedAdamW>(*sync_, model_, options_);
    sharded_ = sharded.get();
    optimizer_ = std::move(sharded);
  } else {
    optimizer_ = make_optimizer ? make_optimizer(model_, options_) : std::make_unique<FusedAdamW>(model_, options_);
  }
  if (!optimizer_) throw TrainError("the optimizer factory returned no optimizer");

  const fs::path out(options_.out);
  if (rank() == 0) {  // the other ranks of a data-parallel run only read (a checkpoint to resume)
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
}

void Trainer::write_outputs() {
  const fs::path out(options_.out);
  metrics_path_ = options_.metrics.empty() ? (out / "metrics.jsonl").string() : options_.metrics;
  if (rank() != 0) return;
  remove_stale_temporaries(options_.out);
  write_file_atomically(out / "train.json", options_.to_json().dump(2) + "\n");
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

// What every rank of a data-parallel run must share, compared field by field with rank 0's.
namespace {

uint64_t fnv1a(const std::string& text) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : text) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Appends "field 'a.b' is 1 (rank 0: 2)" for each difference between two JSON values.
void differences(const json& mine, const json& theirs, const std::string& path, std::vector<std::string>& out) {
  if (mine.is_object() && theirs.is_object()) {
    for (auto it = theirs.begin(); it != theirs.end(); ++it) {
      const std::string p = path.empty() ? it.key() : path + "." + it.key();
      const auto other = mine.find(it.key());
      if (other == mine.end()) out.push_back("field '" + p + "' is missing (rank 0: " + it.value().dump() + ")");
      else differences(*other, it.value(), p, out);
    }
    for (auto it = mine.begin(); it != mine.end(); ++it) {
      if (!theirs.contains(it.key())) {
        out.push_back("field '" + (path.empty() ? it.key() : path + "." + it.key()) + "' is extra");
      }
    }
    return;
  }
  if (mine == theirs) return;
  auto cut = [](const json& v) {
    std::string s = v.dump();
    return s.size() > 80 ? s.substr(0, 77) + "..." : s;
  };
  out.push_back("field '" + path + "' is " + cut(mine) + " (rank 0: " + cut(theirs) + ")");
}

}  // namespace

void Trainer::check_ranks_agree(const std::string& local_error) {
  json mine = {{"error", local_error}};
  if (local_error.empty()) {
    json run = options_.to_json();
    run.erase("device");  // cuda is cuda:LOCAL_RANK on each rank
    std::string meta;
    try {
      meta = read_file(fs::path(options_.data) / "meta.json");
    } catch (const std::exception&) {
    }
    mine["model config"] = model_->config.to_json();
    mine["run options"] = run;
    mine["data"] = {{"meta.json fnv1a", std::to_string(fnv1a(meta))},
                    {"training tokens", train_loader_->state().stream_tokens},
                    {"vocab_size", data_.vocab_size}};
    mine["resumed step"] = step_;
  }
  const std::vector<std::string> all = comm_->exchange("startup", mine.dump());
  std::vector<json> ranks;
  for (const std::string& text : all) ranks.push_back(json::parse(text));
  for (size_t r = 0; r < ranks.size(); ++r) {
    const std::string error = ranks[r].value("error", std::string());
    if (!error.empty()) {
      throw TrainError(static_cast<int>(r) == rank() ? error
                                                     : "rank " + std::to_string(r) + " failed to start: " + error);
    }
  }
  for (size_t r = 1; r < ranks.size(); ++r) {
    for (const char* part : {"model config", "run options", "data", "resumed step"}) {
      std::vector<std::string> found;
      differences(ranks[r][part], ranks[0][part], "", found);
      if (!found.empty()) {
        std::string list;
        for (size_t i = 0; i < found.size() && i < 4; ++i) list += (i ? ", " : "") + found[i];
        if (found.size() > 4) list += ", and " + std::to_string(found.size() - 4) + " more";
        throw TrainError("rank " + std::to_string(r) + "'s " + part + " differs from rank 0's: " + list +
                         "; every rank of a data-parallel run must use the same model config, run options and data");
      }
    }
  }
}

int Trainer::stop_signal() const { return comm_ ? agreed_stop_ : requested_stop_signal(); }

int64_t Trainer::optimizer_state_bytes() const {
  if (sharded_) return sharded_->state_bytes();
  auto* fused = dynamic_cast<FusedAdamW*>(optimizer_.get());
  if (!fused) return 0;
  int64_t bytes = 0;
  for (const auto& [key, state] : fused->adamw().state()) {
    const auto& st = static_cast<const torch::optim::AdamWParamState&>(*state);
    bytes += (st.exp_avg().numel() + st.exp_avg_sq().numel()) * static_cast<int64_t>(st.exp_avg().element_size());
  }
  return bytes;
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
  if (comm_) {  // each rank evaluated its share of the windows
    torch::Tensor sums = torch::tensor({loss_sum, static_cast<double>(e.tokens)}, torch::kDouble).to(device_);
    comm_->all_reduce(sums, "the validation loss");
    sums = sums.cpu();
    loss_sum = sums[0].item<double>();
    e.tokens = static_cast<int64_t>(sums[1].item<double>());
  }
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
  if (!comm_) {
    last_checkpoint_ = train::save_checkpoint(options_.out, model_, *optimizer_, s, options_.keep_checkpoints);
    return last_checkpoint_;
  }
  // Data parallel: the ranks' weights are equal and the loader state is global, so rank 0 writes
  // the checkpoint alone, the sharded optimizer's state first gathered from every rank; then every
  // rank learns whether it succeeded.
  std::unique_ptr<FusedAdamW> gathered = sharded_ ? sharded_->gather_full() : nullptr;
  std::string error;
  if (rank() == 0) {
    try {
      train::save_checkpoint(options_.out, model_, gathered ? *gathered : *optimizer_, s, options_.keep_checkpoints);
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
