// Data parallelism for the trainer on PyTorch's c10d: torchrun's launch variables, one process group
// (TCPStore + ProcessGroupGloo on CPU, ProcessGroupNCCL on CUDA), the bucketed gradient all-reduce
// overlapped with the backward, and the sharded AdamW (ZeRO-1/2) of --shard-optimizer.
//
// Semantics: batch_size is the global micro-batch; each of N ranks runs batch_size / N of its rows
// (the data loader cuts every global batch into rank slices, data/dataset.h), and the gradients are
// averaged over the ranks, so N ranks compute what one rank computes with the whole batch (up to the
// order of floating-point sums). Every collective is bounded by a timeout: a rank that dies or hangs
// makes the others throw DistributedError instead of waiting forever.
#pragma once

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "lckv/model/lckv_model.h"
#include "lckv/train/optimizer.h"
#include "lckv/train/options.h"

namespace lckv::train {

// A collective failed or timed out: another rank died, hung or disagreed.
struct DistributedError : TrainError {
  using TrainError::TrainError;
};

// torchrun's variables. agent_store: TORCHELASTIC_USE_AGENT_STORE=True, torchrun's agent serves the
// TCPStore at MASTER_ADDR:MASTER_PORT and every rank is its client.
struct LaunchEnv {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;
  std::string master_addr;
  int master_port = 0;
  bool agent_store = false;
};

// Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT through `get` (nullopt: unset).
// Returns nothing when none is set (a single-process run); throws TrainError naming the variables
// when only some are set, or a value is not a number, out of range or inconsistent.
std::optional<LaunchEnv> read_launch_env(const std::function<std::optional<std::string>(const std::string&)>& get);
std::optional<LaunchEnv> read_launch_env();  // from the process environment

// One process group over the ranks of a launch. Collectives throw DistributedError naming this rank
// and what was being done.
class Communicator {
 public:
  // Rank 0 (unless agent_store) serves the TCPStore on MASTER_PORT; every rank connects within
  // `timeout` (a port in use, an unreachable master or a missing rank throw naming them).
  Communicator(const LaunchEnv& env, torch::Device device, std::chrono::milliseconds timeout);
  ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return rank_; }
  int world_size() const { return world_size_; }
  std::chrono::milliseconds timeout() const { return timeout_; }

  // In-place sum (or max) over the ranks; `what` names the step in errors.
  void all_reduce(torch::Tensor& t, const std::string& what, bool max = false);
  // out (n) = this rank's n-element slice of the sum of every rank's in (world_size × n).
  void reduce_scatter(torch::Tensor& out, torch::Tensor& in, const std::string& what);
  // out (world_size × n) = every rank's in (n), in rank order.
  void all_gather(torch::Tensor& out, torch::Tensor& in, const std::string& what);
  // An all-reduce (sum) that runs while the caller goes on; wait() finishes it.
  class Pending;
  std::shared_ptr<Pending> all_reduce_async(torch::Tensor& t, const std::string& what);
  std::shared_ptr<Pending> reduce_scatter_async(torch::Tensor& out, torch::Tensor& in, const std::string& what);
  // Every rank's `value` for `key` (through the store), in rank order.
  std::vector<std::string> exchange(const std::string& key, const std::string& value);

  struct Impl;

 private:
  int rank_ = 0;
  int world_size_ = 1;
  std::chrono::milliseconds timeout_;
  std::unique_ptr<Impl> impl_;
};

class Communicator::Pending {
 public:
  virtual ~Pending() = default;
  virtual void wait() = 0;
};

// Averages the gradients of `model`'s parameters over the ranks in buckets of about `bucket_bytes`
// (parameters in reverse order, as the backward produces their gradients). Each parameter's .grad
// is a view into its bucket's flat buffer (as DDP's gradient_as_bucket_view: no second copy of the
// gradients). While armed, a post-hook on each parameter's gradient accumulator counts it done, and
// a complete bucket is reduced at once (buckets start in index order on every rank), overlapping
// the rest of the backward. Sharded: buckets are reduce-scattered instead, and this rank keeps the
// mean gradient of its 1/N slice of each bucket (shard_grad), for ShardedAdamW.
class GradientSync {
 public:
  GradientSync(Communicator& comm, LCKVForCausalLM& model, int64_t bucket_bytes, bool sharded);
  ~GradientSync();

  void begin_step();  // after the optimizer's zero_grad: zero gradients, as views into the buckets
  void arm();         // the next backward reduces (the last micro-batch of a step)
  void finish();  // after it: reduces what the hooks did not, waits; parameters' grads = mean (unsharded)
  // Clips the averaged gradient to `max_norm` (0: no clipping) and returns its global norm before.
  double clip_grad_norm(double max_norm);
  int64_t bytes_per_step() const { return bytes_per_step_; }  // reduced per step, all buckets
  int64_t param_bytes() const { return param_bytes_; }
  // Of the last step's buckets, those whose reduction started inside the backward (overlapped).
  int64_t buckets_launched_during_backward() const { return launched_during_backward_; }

  // One bucket: its parameters at offsets of a flat buffer padded to a multiple of world_size.
  struct Bucket {
    std::vector<torch::Tensor> params;
    std::vector<int64_t> offsets;
    int64_t numel = 0;   // padded
    torch::Tensor flat;  // gradients, then (sharded) parameters
    torch::Tensor shard_grad;  // sharded: this rank's slice of the mean gradient
    int pending = 0;     // parameters whose gradient has not arrived in this backward
    std::shared_ptr<Communicator::Pending> work;
  };
  std::vector<Bucket>& buckets() { return buckets_; }
  Communicator& comm() { return comm_; }
  bool sharded() const { return sharded_; }

 private:
  void on_grad_ready(size_t bucket, size_t index);
  void launch_ready();

  Communicator& comm_;
  bool sharded_;
  bool armed_ = false;
  std::vector<Bucket> buckets_;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators_;  // kept alive for their hooks
  std::vector<std::pair<torch::autograd::Node*, uintptr_t>> hooks_;
  std::shared_ptr<GradientSync*> alive_;  // the hooks hold it weakly: they outlive this object with the model
  size_t next_launch_ = 0;
  std::string hook_error_;
  int64_t bytes_per_step_ = 0;
  int64_t param_bytes_ = 0;
  int64_t launched_during_backward_ = 0;
};

// AdamW (the run's betas, eps, lr, weight decay groups; ATen's fused kernel) where each rank keeps
// and updates only its slice of every gradient bucket and its moments, then all-gathers the
// parameters. The optimizer state per rank is 1/N of FusedAdamW's. Its checkpoint file is
// FusedAdamW's (kind "adamw"): gather_full() assembles the whole state on every rank (rank 0 saves
// it), load() reads the whole file and keeps this rank's slice, so runs resume across world sizes
// and with or without sharding.
class ShardedAdamW : public Optimizer {
 public:
  ShardedAdamW(GradientSync& sync, LCKVForCausalLM& model, const TrainOptions& o);
  std::string kind() const override { return "adamw"; }
  void set_lr(double lr) override { lr_ = lr; }
  void zero_grad() override;
  void step() override;
  // A FusedAdamW holding the full state (what a checkpoint saves). A collective: every rank calls it.
  std::unique_ptr<FusedAdamW> gather_full();
  void save(const std::string& path) override;  // gather_full()->save(path): every rank calls it
  void load(const std::string& path, torch::Device device) override;
  int64_t state_bytes() const;  // of this rank's moments

 private:
  struct Piece {  // the part of one parameter inside this rank's slice of one bucket
    size_t bucket;
    torch::Tensor param;
    int64_t param_begin;  // element offset into param (flattened)
    int64_t shard_begin;  // element offset into the bucket's shard
    int64_t numel;
    bool decay;
    torch::Tensor exp_avg, exp_avg_sq;
    int64_t step = 0;
  };
  GradientSync& sync_;
  LCKVForCausalLM model_;
  TrainOptions options_;
  double lr_;
  std::vector<Piece> pieces_;
};

}  // namespace lckv::train
