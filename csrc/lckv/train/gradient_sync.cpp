// Data parallelism's gradient side (distributed.h): GradientSync's bucketed all-reduce (or
// reduce-scatter) overlapped with the backward through gradient-accumulator hooks, and ShardedAdamW,
// the ZeRO-style optimizer that updates each rank's slice. distributed.cpp holds the launch and the
// process group.
#include "lckv/train/distributed.h"

#include <torch/csrc/autograd/utils/lambda_post_hook.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

namespace lckv::train {

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
