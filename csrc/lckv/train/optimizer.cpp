#include "lckv/train/optimizer.h"

#include <algorithm>
#include <cmath>

#include "lckv/io/checkpoint.h"

namespace lckv::train {

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

FusedAdamW::FusedAdamW(LCKVForCausalLM& model, const TrainOptions& o) {
  const ParamGroups groups = weight_decay_groups(model);
  auto adamw = [&](double wd) {
    return std::make_unique<torch::optim::AdamWOptions>(
        torch::optim::AdamWOptions(o.lr).betas({o.beta1, o.beta2}).eps(o.adam_eps).weight_decay(wd));
  };
  auto tensors = [](const std::vector<std::pair<std::string, torch::Tensor>>& named) {
    std::vector<torch::Tensor> out;
    for (const auto& [name, t] : named) out.push_back(t);
    return out;
  };
  std::vector<torch::optim::OptimizerParamGroup> param_groups;
  param_groups.emplace_back(tensors(groups.decay), adamw(o.weight_decay));
  param_groups.emplace_back(tensors(groups.no_decay), adamw(0.0));
  adamw_ = std::make_unique<torch::optim::AdamW>(param_groups, *adamw(o.weight_decay));
}

void FusedAdamW::set_lr(double lr) {
  for (auto& group : adamw_->param_groups()) static_cast<torch::optim::AdamWOptions&>(group.options()).lr(lr);
}

void FusedAdamW::step() { fused_adamw_step(*adamw_); }

void FusedAdamW::save(const std::string& path) { torch::save(*adamw_, path); }

void FusedAdamW::load(const std::string& path, torch::Device device) {
  try {
    torch::load(*adamw_, path, device);
  } catch (const c10::Error& e) {
    throw TrainError("'" + path + "' is not a readable AdamW state (" + e.what_without_backtrace() + ")");
  }
}

void fused_adamw_step(torch::optim::AdamW& opt) {
  torch::NoGradGuard no_grad;
  for (auto& group : opt.param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs, steps;
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

}  // namespace lckv::train
