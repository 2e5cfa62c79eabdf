#include "lckv/train/distributed.h"

// Torch's CMake config defines these for its own builds with Gloo/NCCL; the headers need them.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef LCKV_WITH_CUDA
#ifndef USE_C10D_NCCL
#define USE_C10D_NCCL 1
#endif
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <thread>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <array>
#include <map>
#include <set>

namespace lckv::train {

namespace {

const char* const kLaunchVars[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"};

int parse_int(const std::string& name, const std::string& value, int64_t lo, int64_t hi) {
  std::size_t used = 0;
  int64_t v = 0;
  try {
    v = std::stoll(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != value.size() || v < lo || v > hi) {
    throw TrainError("launch variable " + name + "='" + value + "': expected an integer in [" + std::to_string(lo) +
                     ", " + std::to_string(hi) + "]");
  }
  return static_cast<int>(v);
}

bool is_loopback(const std::string& host) { return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1"; }

}  // namespace

std::optional<LaunchEnv> read_launch_env(const std::function<std::optional<std::string>(const std::string&)>& get) {
  std::vector<std::string> set, missing;
  for (const char* name : kLaunchVars) (get(name) ? set : missing).push_back(name);
  if (set.empty()) return std::nullopt;
  if (!missing.empty()) {
    std::string s, m;
    for (const auto& n : set) s += (s.empty() ? "" : ", ") + n;
    for (const auto& n : missing) m += (m.empty() ? "" : ", ") + n;
    throw TrainError("launch variables: " + s + " set but " + m +
                     " not: a data-parallel launch (torchrun) sets all of RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
                     "and MASTER_PORT; a single-process run sets none");
  }
  LaunchEnv e;
  e.world_size = parse_int("WORLD_SIZE", *get("WORLD_SIZE"), 1, 1 << 20);
  e.rank = parse_int("RANK", *get("RANK"), 0, std::numeric_limits<int>::max());
  e.local_rank = parse_int("LOCAL_RANK", *get("LOCAL_RANK"), 0, std::numeric_limits<int>::max());
  e.master_port = parse_int("MASTER_PORT", *get("MASTER_PORT"), 1, 65535);
  e.master_addr = *get("MASTER_ADDR");
  if (e.rank >= e.world_size) {
    throw TrainError("launch variables: RANK " + std::to_string(e.rank) + " is not below WORLD_SIZE " +
                     std::to_string(e.world_size));
  }
  if (e.local_rank > e.rank) {
    throw TrainError("launch variables: LOCAL_RANK " + std::to_string(e.local_rank) + " exceeds RANK " +
                     std::to_string(e.rank) + " (the local rank counts the ranks of one node)");
  }
  if (e.master_addr.empty()) throw TrainError("launch variable MASTER_ADDR is empty: expected the host of rank 0");
  const std::optional<std::string> agent = get("TORCHELASTIC_USE_AGENT_STORE");
  e.agent_store = agent && *agent == "True";
  return e;
}

std::optional<LaunchEnv> read_launch_env() {
  return read_launch_env([](const std::string& name) -> std::optional<std::string> {
    const char* v = std::getenv(name.c_str());
    if (!v) return std::nullopt;
    return std::string(v);
  });
}

// ---------------------------------------------------------------------------------------------
// Communicator

// Ends the process when an armed wait outlives its deadline. The store's client can block in a
// socket read past its own timeout (a master that accepts but never answers); this bounds it.
class Watchdog {
 public:
  Watchdog() : thread_([this] { loop(); }) {}
  ~Watchdog() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  void arm(const std::string& message, std::chrono::milliseconds limit) {
    std::lock_guard<std::mutex> lock(mutex_);
    message_ = message;
    deadline_ = std::chrono::steady_clock::now() + limit;
    armed_ = true;
    cv_.notify_all();
  }
  void disarm() {
    std::lock_guard<std::mutex> lock(mutex_);
    armed_ = false;
  }

 private:
  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    while (!stop_) {
      if (!armed_) {
        cv_.wait(lock);
        continue;
      }
      if (cv_.wait_until(lock, deadline_) == std::cv_status::timeout && armed_ &&
          std::chrono::steady_clock::now() >= deadline_) {
        std::fprintf(stderr, "lckv: error: %s\n", message_.c_str());
        std::fflush(stderr);
        std::_Exit(1);
      }
    }
  }
  std::mutex mutex_;
  std::condition_variable cv_;
  bool stop_ = false, armed_ = false;
  std::chrono::steady_clock::time_point deadline_;
  std::string message_;
  std::thread thread_;
};

struct Communicator::Impl {
  Watchdog watchdog;  // first: destroyed last
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

namespace {

std::string rank_prefix(int rank) { return "rank " + std::to_string(rank) + ": "; }

class PendingWork : public Communicator::Pending {
 public:
  PendingWork(c10::intrusive_ptr<c10d::Work> work, std::string what, int rank, std::chrono::milliseconds timeout)
      : work_(std::move(work)), what_(std::move(what)), rank_(rank), timeout_(timeout) {}
  void wait() override {
    try {
      work_->wait(timeout_);
    } catch (const std::exception& e) {
      throw DistributedError(rank_prefix(rank_) + what_ + " failed: another rank died, hung past the timeout (" +
                             std::to_string(timeout_.count() / 1000) + " s, --dist-timeout-s) or left early (" +
                             e.what() + ")");
    }
  }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
  std::string what_;
  int rank_;
  std::chrono::milliseconds timeout_;
};

}  // namespace

Communicator::Communicator(const LaunchEnv& env, torch::Device device, std::chrono::milliseconds timeout)
    : rank_(env.rank), world_size_(env.world_size), timeout_(timeout), impl_(std::make_unique<Impl>()) {
  const std::string where = env.master_addr + ":" + std::to_string(env.master_port);
  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(env.master_port);
  so.isServer = env.rank == 0 && !env.agent_store;
  so.numWorkers = env.agent_store ? std::nullopt : std::optional<std::size_t>(env.world_size);
  so.waitWorkers = false;
  so.timeout = timeout;
  const auto grace = timeout + std::chrono::milliseconds(5000);
  impl_->watchdog.arm(rank_prefix(rank_) + "connecting the ranks through the rendezvous store on " + where +
                          " took longer than --dist-timeout-s " + std::to_string(timeout.count() / 1000) +
                          " s (+5 s): is every rank started, and does MASTER_ADDR:MASTER_PORT serve this job's store?",
                      grace);
  try {
    c10::intrusive_ptr<c10d::Store> tcp = c10::make_intrusive<c10d::TCPStore>(env.master_addr, so);
    impl_->store = c10::make_intrusive<c10d::PrefixStore>(env.agent_store ? "/worker/lckv" : "lckv", tcp);
  } catch (const std::exception& e) {
    const std::string why = e.what();
    if (so.isServer && (why.find("in use") != std::string::npos || why.find("EADDRINUSE") != std::string::npos)) {
      throw DistributedError(rank_prefix(rank_) + "cannot serve the rendezvous store on " + where +
                             ": the port is in use (another job or a leftover process?); choose another MASTER_PORT");
    }
    throw DistributedError(rank_prefix(rank_) + "cannot " + (so.isServer ? "serve" : "reach") +
                           " the rendezvous store on " + where + " (MASTER_ADDR:MASTER_PORT) within " +
                           std::to_string(timeout.count() / 1000) + " s: " + e.what());
  }
  try {
    if (device.is_cuda()) {
#ifdef LCKV_WITH_CUDA
      c10::cuda::set_device(device.index());  // cuda:LOCAL_RANK: NCCL's communicators and streams live there
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout;
      impl_->backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(impl_->store, rank_, world_size_, options);
#else
      throw DistributedError("device " + device.str() + ": this build has no CUDA (NCCL) support");
#endif
    } else {
      auto options = c10d::ProcessGroupGloo::Options::create(timeout);
      // Loopback when the master is local (tests, one machine); else GLOO_SOCKET_IFNAME or the hostname's address.
      const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
      using Gloo = c10d::ProcessGroupGloo;
      if (ifname && *ifname) options->devices.push_back(Gloo::createDeviceForInterface(ifname));
      else if (is_loopback(env.master_addr)) options->devices.push_back(Gloo::createDeviceForHostname("127.0.0.1"));
      else options->devices.push_back(Gloo::createDefaultDevice());
      impl_->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(impl_->store, rank_, world_size_, options);
    }
  } catch (const DistributedError&) {
    throw;
  } catch (const std::exception& e) {
    throw DistributedError(rank_prefix(rank_) + "cannot connect the " + std::to_string(world_size_) +
                           " ranks through " + where + " within " + std::to_string(timeout.count() / 1000) +
                           " s (is every rank started, with the same WORLD_SIZE?): " + e.what());
  }
  impl_->watchdog.disarm();
}

Communicator::~Communicator() = default;

void Communicator::all_reduce(torch::Tensor& t, const std::string& what, bool max) {
  std::vector<at::Tensor> ts{t};
  c10d::AllreduceOptions o;
  o.reduceOp = max ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
  o.timeout = timeout_;
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = impl_->backend->allreduce(ts, o);
  } catch (const std::exception& e) {
    throw DistributedError(rank_prefix(rank_) + what + " failed: " + e.what());
  }
  PendingWork(work, what, rank_, timeout_).wait();
}

std::shared_ptr<Communicator::Pending> Communicator::all_reduce_async(torch::Tensor& t, const std::string& what) {
  std::vector<at::Tensor> ts{t};
  c10d::AllreduceOptions o;
  o.timeout = timeout_;
  try {
    return std::make_shared<PendingWork>(impl_->backend->allreduce(ts, o), what, rank_, timeout_);
  } catch (const std::exception& e) {
    throw DistributedError(rank_prefix(rank_) + what + " failed: " + e.what());
  }
}

std::shared_ptr<Communicator::Pending> Communicator::reduce_scatter_async(torch::Tensor& out, torch::Tensor& in,
                                                                          const std::string& what) {
  c10d::ReduceScatterOptions o;
  o.timeout = timeout_;
  try {
    return std::make_shared<PendingWork>(impl_->backend->_reduce_scatter_base(out, in, o), what, rank_, timeout_);
  } catch (const std::exception& e) {
    throw DistributedError(rank_prefix(rank_) + what + " failed: " + e.what());
  }
}

void Communicator::reduce_scatter(torch::Tensor& out, torch::Tensor& in, const std::string& what) {
  reduce_scatter_async(out, in, what)->wait();
}

void Communicator::all_gather(torch::Tensor& out, torch::Tensor& in, const std::string& what) {
  c10d::AllgatherOptions o;
  o.timeout = timeout_;
  c10::intrusive_ptr<c10d::Work> work;
  try {
    work = impl_->backend->_allgather_base(out, in, o);
  } catch (const std::exception& e) {
    throw DistributedError(rank_prefix(rank_) + what + " failed: " + e.what());
  }
  PendingWork(work, what, rank_, timeout_).wait();
}

std::vector<std::string> Communicator::exchange(const std::string& key, const std::string& value) {
  std::vector<std::string> all(static_cast<size_t>(world_size_));
  impl_->watchdog.arm(rank_prefix(rank_) + "exchanging '" + key + "' through the store took longer than " +
                          "--dist-timeout-s " + std::to_string(timeout_.count() / 1000) +
                          " s (+5 s): a rank died or hung",
                      timeout_ + std::chrono::milliseconds(5000));
  try {
    impl_->store->set(key + "/" + std::to_string(rank_), std::vector<uint8_t>(value.begin(), value.end()));
    for (int r = 0; r < world_size_; ++r) {
      const std::vector<uint8_t> v = impl_->store->get(key + "/" + std::to_string(r));
      all[static_cast<size_t>(r)] = std::string(v.begin(), v.end());
    }
  } catch (const std::exception& e) {
    impl_->watchdog.disarm();
    throw DistributedError(rank_prefix(rank_) + "exchanging '" + key + "' through the store failed (a rank died or "
                           "did not arrive within " + std::to_string(timeout_.count() / 1000) + " s): " + e.what());
  }
  impl_->watchdog.disarm();
  return all;
}

// ---------------------------------------------------------------------------------------------
// GradientSync

namespace {
// The parameters of `model` once each (a tied weight is one parameter), in registration order.
std::vector<torch::Tensor> unique_parameters(LCKVForCausalLM& model) {
  std::vector<torch::Tensor> out;
  std::set<const void*> seen;
  for (const torch::Tensor& p : model->parameters()) {
    if (p.requires_grad() && seen.insert(p.unsafeGetTensorImpl()).second) out.push_back(p);
  }
  return out;
}
}  // namespace

GradientSync::GradientSync(Communicator& comm, LCKVForCausalLM& model, int64_t bucket_bytes, bool sharded)
    : comm_(comm), sharded_(sharded) {
  std::vector<torch::Tensor> params = unique_parameters(model);
  std::reverse(params.begin(), params.end());  // the backward reaches the last layers first
  const int64_t n = comm.world_size();
  for (const torch::Tensor& p : params) {
    TORCH_CHECK(p.is_contiguous() && p.scalar_type() == torch::kFloat, "GradientSync: fp32 contiguous parameters");
    const bool full = !buckets_.empty() && (buckets_.back().numel + p.numel()) * 4 > bucket_bytes;
    if (buckets_.empty() || (full && !buckets_.back().params.empty())) {
      buckets_.emplace_back();
    }
    Bucket& b = buckets_.back();
    b.offsets.push_back(b.numel);
    b.params.push_back(p);
    b.numel += p.numel();
    param_bytes_ += p.numel() * static_cast<int64_t>(p.element_size());
  }
  for (Bucket& b : buckets_) {
    b.numel = (b.numel + n - 1) / n * n;
    b.flat = torch::zeros({b.numel}, buckets_.front().params.front().options().requires_grad(false));
    if (sharded_) b.shard_grad = torch::zeros({b.numel / n}, b.flat.options());
    bytes_per_step_ += b.numel * 4;
  }
  auto alive = std::make_shared<GradientSync*>(this);
  alive_ = alive;
  for (size_t bi = 0; bi < buckets_.size(); ++bi) {
    for (size_t i = 0; i < buckets_[bi].params.size(); ++i) {
      std::shared_ptr<torch::autograd::Node> acc = torch::autograd::impl::grad_accumulator(buckets_[bi].params[i]);
      std::weak_ptr<GradientSync*> weak = alive;
      const uintptr_t key = acc->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
          [weak, bi, i](const torch::autograd::variable_list& outputs, const torch::autograd::variable_list&) {
            if (auto self = weak.lock(); self && *self) (*self)->on_grad_ready(bi, i);
            return outputs;
          }));
      hooks_.emplace_back(acc.get(), key);
      accumulators_.push_back(std::move(acc));
    }
  }
}

GradientSync::~GradientSync() {
  if (alive_) *alive_ = nullptr;
  for (auto& [node, key] : hooks_) node->del_post_hook(key);
}

void GradientSync::begin_step() {
  torch::NoGradGuard no_grad;
  for (Bucket& b : buckets_) {
    b.flat.zero_();
    for (size_t i = 0; i < b.params.size(); ++i) {
      torch::Tensor& p = b.params[i];
      p.mutable_grad() = b.flat.narrow(0, b.offsets[i], p.numel()).view(p.sizes());
    }
  }
}

void GradientSync::arm() {
  armed_ = true;
  next_launch_ = 0;
  hook_error_.clear();
  for (Bucket& b : buckets_) {
    b.pending = static_cast<int>(b.params.size());
    b.work.reset();
  }
}

void GradientSync::on_grad_ready(size_t bi, size_t i) {
  if (!armed_) return;
  Bucket& b = buckets_[bi];
  const torch::Tensor& p = b.params[i];
  torch::NoGradGuard no_grad;
  torch::Tensor slot = b.flat.narrow(0, b.offsets[i], p.numel());
  if (!p.grad().defined()) slot.zero_();
  else if (p.grad().data_ptr() != slot.data_ptr()) slot.copy_(p.grad().reshape(-1));  // not our view (replaced)
  --b.pending;
  try {
    launch_ready();
  } catch (const std::exception& e) {
    // An exception must not cross the autograd engine's hook call: finish() reports it.
    if (hook_error_.empty()) hook_error_ = e.what();
  }
}

void GradientSync::launch_ready() {
  // Buckets start in index order on every rank: collectives are matched by their order.
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0) {
    Bucket& b = buckets_[next_launch_];
    const std::string what = "the gradient reduction of bucket " + std::to_string(next_launch_);
    b.work = sharded_ ? comm_.reduce_scatter_async(b.shard_grad, b.flat, what) : comm_.all_reduce_async(b.flat, what);
    ++next_launch_;
  }
}

void GradientSync::finish() {
  torch::NoGradGuard no_grad;
  armed_ = false;
  if (!hook_error_.empty()) throw DistributedError(hook_error_);
  launched_during_backward_ = static_cast<int64_t>(next_launch_);
  // A parameter the backward did not reach (unused this step) contributes its zero gradient.
  for (Bucket& b : buckets_) b.pending = 0;
  launch_ready();
  const double inv = 1.0 / comm_.world_size();
  for (Bucket& b : buckets_) {
    b.work->wait();
    b.work.reset();
    if (sharded_) {
      b.shard_grad.mul_(inv);
      continue;
    }
    b.flat.mul_(inv);
    for (size_t i = 0; i < b.params.size(); ++i) {
      torch::Tensor& p = b.params[i];
      const torch::Tensor mean = b.flat.narrow(0, b.offsets[i], p.numel()).view(p.sizes());
      if (!p.grad().defined() || p.grad().data_ptr() != mean.data_ptr()) p.mutable_grad() = mean;
    }
  }
}

double GradientSync::clip_grad_norm(double max_norm) {
  const double bound = max_norm > 0 ? max_norm : std::numeric_limits<double>::infinity();
  if (!sharded_) {
    std::vector<torch::Tensor> params;
    for (Bucket& b : buckets_) params.insert(params.end(), b.params.begin(), b.params.end());
    return torch::nn::utils::clip_grad_norm_(params, bound);
  }
  torch::NoGradGuard no_grad;
  torch::Tensor sq = torch::zeros({1}, torch::kDouble);
  for (Bucket& b : buckets_) sq += b.shard_grad.to(torch::kDouble).pow(2).sum().cpu();
  sq = sq.to(buckets_.front().flat.device());
  comm_.all_reduce(sq, "the gradient norm");
  const double norm = std::sqrt(sq.item<double>());
  // As torch::nn::utils::clip_grad_norm_.
  const double coef = bound / (norm + 1e-6);
  if (coef < 1) {
    for (Bucket& b : buckets_) b.shard_grad.mul_(coef);
  }
  return norm;
}

// ---------------------------------------------------------------------------------------------
// ShardedAdamW

ShardedAdamW::ShardedAdamW(GradientSync& sync, LCKVForCausalLM& model, const TrainOptions& o)
    : sync_(sync), model_(model), options_(o), lr_(o.lr) {
  TORCH_CHECK(sync.sharded(), "ShardedAdamW needs a sharded GradientSync");
  std::set<const void*> decayed;
  for (const auto& [name, p] : weight_decay_groups(model).decay) decayed.insert(p.unsafeGetTensorImpl());
  const int64_t n = sync.comm().world_size(), r = sync.comm().rank();
  auto& buckets = sync.buckets();
  for (size_t bi = 0; bi < buckets.size(); ++bi) {
    const auto& b = buckets[bi];
    const int64_t shard = b.numel / n, lo = r * shard, hi = lo + shard;
    for (size_t i = 0; i < b.params.size(); ++i) {
      const int64_t begin = std::max(lo, b.offsets[i]), end = std::min(hi, b.offsets[i] + b.params[i].numel());
      if (begin >= end) continue;
      Piece piece;
      piece.bucket = bi;
      piece.param = b.params[i];
      piece.param_begin = begin - b.offsets[i];
      piece.shard_begin = begin - lo;
      piece.numel = end - begin;
      piece.decay = decayed.count(b.params[i].unsafeGetTensorImpl()) > 0;
      piece.exp_avg = torch::zeros({piece.numel}, b.flat.options());
      piece.exp_avg_sq = torch::zeros({piece.numel}, b.flat.options());
      pieces_.push_back(std::move(piece));
    }
  }
}

void ShardedAdamW::zero_grad() {
  for (auto& b : sync_.buckets()) {
    for (auto& p : b.params) p.mutable_grad() = torch::Tensor();
  }
}

void ShardedAdamW::step() {
  torch::NoGradGuard no_grad;
  auto& buckets = sync_.buckets();
  const int64_t n = sync_.comm().world_size();
  std::vector<torch::Tensor> shard_params;
  for (auto& b : buckets) shard_params.push_back(torch::zeros({b.numel / n}, b.flat.options()));
  for (int decay = 0; decay < 2; ++decay) {
    std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
    for (Piece& piece : pieces_) {
      if (piece.decay != (decay == 1)) continue;
      torch::Tensor view = shard_params[piece.bucket].narrow(0, piece.shard_begin, piece.numel);
      view.copy_(piece.param.view(-1).narrow(0, piece.param_begin, piece.numel));
      ++piece.step;  // the fused kernel takes the already-incremented step, as in fused_adamw_step
      params.push_back(view);
      grads.push_back(buckets[piece.bucket].shard_grad.narrow(0, piece.shard_begin, piece.numel));
      exp_avgs.push_back(piece.exp_avg);
      exp_avg_sqs.push_back(piece.exp_avg_sq);
      steps.push_back(torch::full({}, static_cast<double>(piece.step), view.options().dtype(torch::kFloat)));
    }
    if (params.empty()) continue;
    at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps, lr_, options_.beta1,
                      options_.beta2, decay ? options_.weight_decay : 0.0, options_.adam_eps, /*amsgrad=*/false,
                      /*maximize=*/false);
  }
  for (size_t bi = 0; bi < buckets.size(); ++bi) {
    auto& b = buckets[bi];
    sync_.comm().all_gather(b.flat, shard_params[bi], "the parameter all-gather of bucket " + std::to_string(bi));
    for (size_t i = 0; i < b.params.size(); ++i) {
      b.params[i].view(-1).copy_(b.flat.narrow(0, b.offsets[i], b.params[i].numel()));
    }
  }
}

std::unique_ptr<FusedAdamW> ShardedAdamW::gather_full() {
  torch::NoGradGuard no_grad;
  auto& buckets = sync_.buckets();
  const int64_t n = sync_.comm().world_size();
  // Per bucket: the moments and step counts of every element, gathered from the rank that owns it.
  auto full = std::make_unique<FusedAdamW>(model_, options_);
  std::map<const void*, std::array<torch::Tensor, 3>> per_param;  // exp_avg, exp_avg_sq, step (as float)
  for (size_t bi = 0; bi < buckets.size(); ++bi) {
    auto& b = buckets[bi];
    std::array<torch::Tensor, 3> shard, all;
    for (int k = 0; k < 3; ++k) {
      const auto opts = b.flat.options().dtype(k == 2 ? torch::kDouble : torch::kFloat);  // steps exact in double
      shard[k] = torch::zeros({b.numel / n}, opts);
      all[k] = torch::zeros({b.numel}, opts);
    }
    for (const Piece& piece : pieces_) {
      if (piece.bucket != bi) continue;
      shard[0].narrow(0, piece.shard_begin, piece.numel).copy_(piece.exp_avg);
      shard[1].narrow(0, piece.shard_begin, piece.numel).copy_(piece.exp_avg_sq);
      shard[2].narrow(0, piece.shard_begin, piece.numel).fill_(static_cast<double>(piece.step));
    }
    for (int k = 0; k < 3; ++k) {
      sync_.comm().all_gather(all[k], shard[k], "the optimizer-state gather for a checkpoint");
    }
    for (size_t i = 0; i < b.params.size(); ++i) {
      auto& slot = per_param[b.params[i].unsafeGetTensorImpl()];
      for (int k = 0; k < 3; ++k) {
        slot[k] = all[k].narrow(0, b.offsets[i], b.params[i].numel()).view(b.params[i].sizes()).clone();
      }
    }
  }
  for (auto& group : full->adamw().param_groups()) {
    for (auto& p : group.params()) {
      const auto& s = per_param.at(p.unsafeGetTensorImpl());
      const int64_t step = static_cast<int64_t>(s[2].reshape(-1)[0].item<double>());
      if (step == 0) continue;  // never stepped: no state, as FusedAdamW
      auto st = std::make_unique<torch::optim::AdamWParamState>();
      st->step(step);
      st->exp_avg(s[0]);
      st->exp_avg_sq(s[1]);
      full->adamw().state()[p.unsafeGetTensorImpl()] = std::move(st);
    }
  }
  return full;
}

void ShardedAdamW::save(const std::string& path) { gather_full()->save(path); }

void ShardedAdamW::load(const std::string& path, torch::Device device) {
  torch::NoGradGuard no_grad;
  FusedAdamW full(model_, options_);
  full.load(path, device);
  for (Piece& piece : pieces_) {
    const auto it = full.adamw().state().find(piece.param.unsafeGetTensorImpl());
    if (it == full.adamw().state().end()) {
      piece.step = 0;
      piece.exp_avg.zero_();
      piece.exp_avg_sq.zero_();
      continue;
    }
    const auto& st = static_cast<const torch::optim::AdamWParamState&>(*it->second);
    piece.step = st.step();
    piece.exp_avg.copy_(st.exp_avg().reshape(-1).narrow(0, piece.param_begin, piece.numel));
    piece.exp_avg_sq.copy_(st.exp_avg_sq().reshape(-1).narrow(0, piece.param_begin, piece.numel));
  }
}

int64_t ShardedAdamW::state_bytes() const {
  int64_t bytes = 0;
  for (const Piece& p : pieces_) bytes += 2 * p.numel * static_cast<int64_t>(sizeof(float));
  return bytes;
}

}  // namespace lckv::train
