// The trainer's set-up (trainer.h): checking every input, building the model, optimizer and loaders,
// the data-parallel agreement between ranks, the output directory's lock and files, and resuming.
#include "lckv/train/trainer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "lckv/autocast.h"
#include "lckv/data/tokenizer.h"
#include "lckv/generate/generate.h"
#include "lckv/io/checkpoint.h"

namespace lckv::train {

namespace fs = std::filesystem;
using json = nlohmann::json;

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
  // "auto" becomes the concrete dtype here, so that train.json, the metrics and the checkpoints say which one
  // ran; a resumed run keeps its checkpoint's (resume_from).
  dtype_auto_ = options_.dtype == "auto";
  options_.dtype = resolve_compute_dtype(options_.dtype, device_);
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
  // The model config: the model_config file's (vocab_size from the data), or the init_from checkpoint's.
  auto config_from_file = [&] {
    LCKVConfig c = LCKVConfig::from_file(options_.model_config);
    if (c.vocab_size != data_.vocab_size) {
      if (log_) {
        *log_ << "note: vocab_size " << c.vocab_size << " of " << options_.model_config << " replaced by the data's "
              << data_.vocab_size << " (" << options_.data << "/meta.json)\n";
      }
      c.vocab_size = data_.vocab_size;
    }
    return c;
  };
  std::string init_dir, config_source = options_.model_config;
  LCKVConfig config;
  if (options_.init_from.empty()) {
    config = config_from_file();
  } else {
    try {
      init_dir = io::resolve_checkpoint_dir(options_.init_from);
      config = LCKVConfig::from_file((fs::path(init_dir) / "config.json").string());
    } catch (const std::exception& e) {
      throw TrainError(std::string("option init_from: ") + e.what());
    }
    config_source = (fs::path(init_dir) / "config.json").string();
    if (config.vocab_size < data_.vocab_size) {
      throw TrainError("option init_from: the checkpoint's vocab_size " + std::to_string(config.vocab_size) + " (" +
                       config_source + ") is smaller than the data's " + std::to_string(data_.vocab_size) + " (" +
                       options_.data + "/meta.json): the data was written with another tokenizer");
    }
    if (!options_.model_config.empty()) {
      // Both in one format (a plain Llama's config.json is written in transformers' own, without the LCKV fields),
      // so that only real differences are listed.
      json given = config_from_file().to_json(ConfigFormat::kLCKV), saved = config.to_json(ConfigFormat::kLCKV);
      given.erase("torch_dtype");
      saved.erase("torch_dtype");
      std::string list;
      json keys = given;
      keys.update(saved);
      for (auto it = keys.begin(); it != keys.end(); ++it) {
        const json a = given.value(it.key(), json()), b = saved.value(it.key(), json());
        if (a != b) list += (list.empty() ? "" : ", ") + it.key() + " " + a.dump() + " vs " + b.dump();
      }
      if (!list.empty()) {
        throw TrainError("option model_config '" + options_.model_config + "' differs from the init_from checkpoint's " +
                         config_source + ": " + list +
                         " (model_config vs checkpoint); leave out --model-config to train the checkpoint's model");
      }
    }
  }
  if (options_.seq_len > config.max_position_embeddings) {
    throw TrainError("option seq_len " + std::to_string(options_.seq_len) + " exceeds max_position_embeddings " +
                     std::to_string(config.max_position_embeddings) + " of " + config_source);
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
  // The data's tokenizer must fit the model; it is copied into every checkpoint and samples the prompt.
  std::error_code ec;
  if (std::filesystem::exists(data_.tokenizer, ec)) {
    try {
      const data::Tokenizer tokenizer = data::Tokenizer::load(data_.tokenizer);
      check_tokenizer_vocab(config, tokenizer.vocab_size(), data_.tokenizer);
    } catch (const std::exception& e) {
      throw TrainError(std::string("the data's tokenizer (") + options_.data + "/meta.json field 'tokenizer'): " +
                       e.what());
    }
  } else if (!options_.prompt.empty() && options_.generate_tokens > 0) {
    throw TrainError("option prompt: the sample after training needs the data's tokenizer, but '" + data_.tokenizer +
                     "' (" + options_.data + "/meta.json field 'tokenizer') does not exist");
  } else if (log_) {
    *log_ << "note: the data's tokenizer '" << data_.tokenizer << "' does not exist: checkpoints will carry none\n";
  }

  torch::manual_seed(options_.seed);
  model_ = LCKVForCausalLM(config);
  init_weights(model_);
  if (!init_dir.empty()) {
    try {
      io::load_state(model_, io::load_directory_tensors(init_dir), init_dir);
    } catch (const std::exception& e) {
      throw TrainError(std::string("option init_from: ") + e.what());
    }
    if (log_) *log_ << "initialised from " << init_dir << " (fresh optimizer and schedule, step 0)\n";
  }
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
  // dtype auto continues in the dtype the run was trained in (a checkpoint moved to another CPU, say).
  const auto saved_dtype = s.options.find("dtype");
  if (dtype_auto_ && saved_dtype != s.options.end() && saved_dtype->is_string()) {
    const std::string saved = saved_dtype->get<std::string>();
    if (saved != "auto" && is_compute_dtype_name(saved) && saved != options_.dtype) {
      if (log_) {
        *log_ << "note: dtype auto: resuming in the checkpoint's " << saved << " (on its own, auto would choose "
              << options_.dtype << " here)\n";
      }
      options_.dtype = saved;
    }
  }
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

}  // namespace lckv::train
