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
    // Worded as a failed collective's (PendingWork::wait): where a dead or stopped rank is noticed, at a collective
    // or at an exchange like this one (a checkpoint's), depends on timing, and the cause and the remedy are the same.
    throw DistributedError(rank_prefix(rank_) + "exchanging '" + key + "' through the store failed: another rank died, "
                           "hung past the timeout (" + std::to_string(timeout_.count() / 1000) +
                           " s, --dist-timeout-s) or left early (" + e.what() + ")");
  }
  impl_->watchdog.disarm();
  return all;
}

}  // namespace lckv::train
