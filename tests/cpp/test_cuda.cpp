// The CUDA condensed attention against the CPU op (docs/design.md §2 invariant 5) and the model on a
// GPU against the CPU. Every GPU test starts with cuda_ready(): without a device it warns and
// returns, unless LCKV_REQUIRE_CUDA=1 (scripts/gpu_check.sh), which makes that a failure so a GPU
// run cannot pass by skipping. The size checks of the kernels run everywhere the CUDA path is built.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "lckv/generate/generate.h"
#include "lckv/model/lckv_model.h"
#include "lckv/ops/condensed_attention.h"
#include "lckv/ops/sdpa_attention.h"
#include "test_reference.h"
#ifdef LCKV_WITH_CUDA
#include "lckv/ops/cuda/condensed_attention_kernels.cuh"
#endif

using lckv::ops::AttentionParams;
using lckv::testing::check_close;

// These tests are about our CUDA kernels: the front's `auto` would send CUDA tensors to the SDPA
// backend (ops/sdpa_attention.h), so each forces the lckv backend for its duration.
struct UseLckvKernels {
  UseLckvKernels() { lckv::ops::set_attention_backend(lckv::ops::AttentionBackend::kLckv); }
  ~UseLckvKernels() { lckv::ops::clear_attention_backend(); }
};

namespace {

bool cuda_ready() {
  const char* require = std::getenv("LCKV_REQUIRE_CUDA");
  const bool required = require != nullptr && std::string(require) == "1";
#ifdef LCKV_WITH_CUDA
  if (torch::cuda::is_available()) return true;
  if (required) FAIL("LCKV_REQUIRE_CUDA=1 but torch sees no CUDA device");
  WARN("no CUDA device: this CUDA test did not run");
#else
  if (required) FAIL("LCKV_REQUIRE_CUDA=1 but this build has no CUDA kernels (LCKV_WITH_CUDA is off)");
  WARN("built without CUDA kernels: this CUDA test did not run");
#endif
  return false;
}

const torch::Device kCuda(torch::kCUDA);

struct Case {
  int64_t B, Hq, Hkv, T, S, D;
  bool strict;
  int64_t window, q_offset;
  bool left_padding;  // a per-sequence key_start
};

std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " Hq=" + std::to_string(c.Hq) + " Hkv=" + std::to_string(c.Hkv) +
         " T=" + std::to_string(c.T) + " S=" + std::to_string(c.S) + " D=" + std::to_string(c.D) +
         (c.strict ? " strict" : " causal") + " window=" + std::to_string(c.window) +
         " q_offset=" + std::to_string(c.q_offset) + (c.left_padding ? " key_start" : "");
}

// Ragged sizes (not multiples of the 64-row / 32-key tiles), every mask, GQA ratios 1/2/4/8,
// decode (T = 1, one and several key splits, groups up to 16 and a fallback group of 32).
const Case kCases[] = {
    {2, 8, 8, 77, 77, 64, false, 0, 0, false},   // causal MHA
    {2, 8, 4, 77, 77, 64, true, 0, 0, false},    // strict GQA 2: row 0 empty
    {1, 8, 2, 130, 130, 128, true, 0, 0, false}, // strict GQA 4, D 128
    {1, 8, 1, 100, 100, 64, false, 17, 0, false},// window, GQA 8
    {2, 4, 2, 45, 45, 128, true, 1, 0, false},   // strict + window 1: every row empty
    {1, 8, 2, 19, 150, 64, false, 40, 131, false},// query offset (a chunk after a prefix), window
    {2, 8, 2, 33, 90, 64, true, 0, 57, true},    // strict, offset, left padding
    {2, 8, 4, 70, 70, 64, false, 0, 0, true},    // causal with left padding
    {2, 8, 8, 1, 300, 64, false, 0, 299, false}, // decode MHA, 3 splits
    {3, 16, 2, 1, 1000, 128, true, 0, 1000, true},// decode strict GQA 8, several splits, padding
    {1, 32, 2, 1, 777, 64, false, 100, 776, false},// decode GQA 16 with a window
    {1, 32, 1, 1, 200, 64, true, 0, 150, false}, // group 32: the tiled kernel does T = 1
};

struct Inputs {
  torch::Tensor q, k, v, grad_out, key_start;
};

// Random inputs; q is a [B, T, H, D] transpose (as the model makes it) and k has a non-unit
// last-dim stride, so the strided and the copying paths are both used.
Inputs make_inputs(const Case& c, torch::ScalarType dtype) {
  Inputs in;
  in.q = torch::randn({c.B, c.T, c.Hq, c.D}, torch::kDouble).transpose(1, 2).to(dtype);
  in.k = torch::randn({c.B, c.Hkv, c.D, c.S}, torch::kDouble).to(dtype).transpose(2, 3);
  in.v = torch::randn({c.B, c.Hkv, c.S, c.D}, torch::kDouble).to(dtype);
  in.grad_out = torch::randn({c.B, c.Hq, c.T, c.D}, torch::kDouble).to(dtype);
  if (c.left_padding) in.key_start = torch::randint(0, std::min<int64_t>(c.S, 9), {c.B}, torch::kLong);
  return in;
}

AttentionParams params_for(const Case& c, const torch::Tensor& key_start) {
  AttentionParams p;
  p.mask.strict = c.strict;
  p.mask.window = c.window;
  p.mask.q_offset = c.q_offset;
  p.mask.key_start = key_start;
  return p;
}

Inputs to_device(const Inputs& in, torch::Device d) {
  Inputs out{in.q.to(d), in.k.to(d), in.v.to(d), in.grad_out.to(d), {}};
  if (in.key_start.defined()) out.key_start = in.key_start.to(d);
  return out;
}

}  // namespace

#ifdef LCKV_WITH_CUDA
TEST_CASE("the CUDA kernels' size checks name what is unsupported", "[cuda][bad-input]") {
  namespace kc = lckv::cuda;
  CHECK(kc::unsupported_reason(2, 8, 2, 16, 16, 64, 0.125f) == nullptr);
  CHECK(kc::unsupported_reason(2, 8, 2, 16, 16, 128, 0.125f) == nullptr);
  CHECK(std::string(kc::unsupported_reason(2, 8, 2, 16, 16, 96, 0.1f)) == "head_dim must be 64 or 128");
  CHECK(std::string(kc::unsupported_reason(2, 8, 3, 16, 16, 64, 0.1f)) == "query heads must be a multiple of KV heads");
  CHECK(std::string(kc::unsupported_reason(2, 8, 2, 16, 16, 64, 0.f)) == "the softmax scale must be > 0");
  CHECK(std::string(kc::unsupported_reason(0, 8, 2, 16, 16, 64, 0.1f)) == "every size must be positive");

  kc::FwdParams p;
  p.B = 4, p.Hq = 32, p.Hkv = 4, p.T = 1, p.S = 65536, p.D = 128;
  CHECK(kc::decode_applies(p));
  p.Hkv = 1;  // a group of 32 heads exceeds the decode kernel's registers
  CHECK_FALSE(kc::decode_applies(p));
  p.Hkv = 4, p.T = 2;
  CHECK_FALSE(kc::decode_applies(p));
  p.T = 1;
  const int splits = kc::decode_num_splits(p, 132);
  CHECK(splits >= 1);
  CHECK(splits <= (p.S + 127) / 128);      // at least 128 keys per split
  CHECK(p.B * p.Hkv * splits >= 8 * 132);  // about 8 blocks per multiprocessor
  p.S = 1000;  // too few keys for that many splits
  CHECK(kc::decode_num_splits(p, 132) <= (p.S + 127) / 128);
  p.S = 10;
  CHECK(kc::decode_num_splits(p, 132) == 1);
  CHECK(kc::decode_workspace_floats(p, 3) == 3 * 4 * 32 * (128 + 2));
}
#endif

TEST_CASE("CUDA forward and backward equal the CPU op in fp32", "[cuda][gpu]") {
  if (!cuda_ready()) return;
  torch::manual_seed(0);
  for (const Case& c : kCases) {
    INFO(describe(c));
    const Inputs cpu = make_inputs(c, torch::kFloat);
    const Inputs gpu = to_device(cpu, kCuda);
    const AttentionParams pc = params_for(c, cpu.key_start), pg = params_for(c, gpu.key_start);
    auto [out_c, lse_c] = lckv::ops::condensed_attention_forward(cpu.q, cpu.k, cpu.v, pc);
    auto [out_g, lse_g] = lckv::ops::condensed_attention_forward(gpu.q, gpu.k, gpu.v, pg);
    REQUIRE(out_g.is_cuda());
    check_close(out_g, out_c, 1e-5, "out");
    check_close(lse_g, lse_c, 1e-5, "lse");
    if (c.strict && c.q_offset == 0 && !c.left_padding) {
      CHECK(out_g.select(2, 0).abs().max().item<float>() == 0.0f);  // the empty first row is exactly 0
    }
    auto [dq_c, dk_c, dv_c] = lckv::ops::condensed_attention_backward(cpu.grad_out, cpu.q, cpu.k, cpu.v, out_c, lse_c, pc);
    auto [dq_g, dk_g, dv_g] = lckv::ops::condensed_attention_backward(gpu.grad_out, gpu.q, gpu.k, gpu.v, out_g, lse_g, pg);
    check_close(dq_g, dq_c, 1e-5, "dq");
    check_close(dk_g, dk_c, 1e-5, "dk");
    check_close(dv_g, dv_c, 1e-5, "dv");
  }
}

TEST_CASE("CUDA condensed_attention autograd gives the CPU gradients", "[cuda][gpu]") {
  const UseLckvKernels lckv_kernels;
  if (!cuda_ready()) return;
  torch::manual_seed(1);
  for (const Case& c : {kCases[2], kCases[6], kCases[9]}) {
    INFO(describe(c));
    const Inputs cpu = make_inputs(c, torch::kFloat);
    std::vector<torch::Tensor> grads[2];
    for (int on_gpu = 0; on_gpu < 2; ++on_gpu) {
      const Inputs in = on_gpu ? to_device(cpu, kCuda) : cpu;
      torch::Tensor q = in.q.detach().requires_grad_(), k = in.k.detach().requires_grad_(),
                    v = in.v.detach().requires_grad_();
      lckv::ops::condensed_attention(q, k, v, params_for(c, in.key_start)).backward(in.grad_out);
      grads[on_gpu] = {q.grad(), k.grad(), v.grad()};
    }
    for (int i = 0; i < 3; ++i) check_close(grads[1][i], grads[0][i], 1e-5, "grad " + std::to_string(i));
  }
}

TEST_CASE("CUDA bf16/fp16 errors are within 2x those of PyTorch's own attention", "[cuda][gpu]") {
  const UseLckvKernels lckv_kernels;
  if (!cuda_ready()) return;
  torch::manual_seed(2);
  // No empty rows here: PyTorch's attention gives NaN for them, which would make its error undefined.
  const Case cases[] = {
      {2, 8, 8, 200, 200, 64, false, 0, 0, false},
      {1, 8, 2, 150, 150, 128, true, 0, 1, false},
      {2, 8, 1, 120, 120, 64, false, 33, 0, false},
      {2, 16, 2, 1, 700, 128, true, 0, 700, false},  // decode
  };
  for (torch::ScalarType dt : {torch::kBFloat16, torch::kHalf}) {
    for (const Case& c : cases) {
      INFO(describe(c) << " dtype " << dt);
      const Inputs low = to_device(make_inputs(c, dt), kCuda);
      // The fp64 truth on the very inputs both low-precision computations see.
      const Inputs exact{low.q.to(torch::kCPU, torch::kDouble), low.k.to(torch::kCPU, torch::kDouble),
                         low.v.to(torch::kCPU, torch::kDouble), low.grad_out.to(torch::kCPU, torch::kDouble), {}};
      const AttentionParams p = params_for(c, {});

      auto run = [&](const Inputs& in, bool ours) {
        torch::Tensor q = in.q.detach().requires_grad_(), k = in.k.detach().requires_grad_(),
                      v = in.v.detach().requires_grad_();
        torch::Tensor out;
        if (ours) {
          out = lckv::ops::condensed_attention(q, k, v, p);
        } else {
          // PyTorch's attention on repeated K/V with the mask written out as booleans.
          const int64_t G = c.Hq / c.Hkv;
          const torch::Tensor visible =
              lckv::testing::naive_visible(1, c.T, c.S, c.strict, c.window, c.q_offset)[0][0];
          out = at::scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1),
                                                 visible.to(q.device()));
        }
        out.backward(in.grad_out);
        return std::vector<torch::Tensor>{out.detach(), q.grad(), k.grad(), v.grad()};
      };
      const auto truth = run(exact, true);
      const auto ours = run(low, true);
      const auto torch_ref = run(low, false);
      const char* names[] = {"out", "dq", "dk", "dv"};
      for (int i = 0; i < 4; ++i) {
        const double ours_err = (ours[i].to(torch::kCPU, torch::kDouble) - truth[i]).abs().max().item<double>();
        const double torch_err = (torch_ref[i].to(torch::kCPU, torch::kDouble) - truth[i]).abs().max().item<double>();
        INFO(names[i] << ": ours " << ours_err << ", PyTorch " << torch_err);
        CHECK(ours_err <= 2 * torch_err);
      }
    }
  }
}

TEST_CASE("the CUDA path rejects inputs it cannot compute, naming the problem", "[cuda][gpu][bad-input]") {
  const UseLckvKernels lckv_kernels;
  if (!cuda_ready()) return;
  const auto f32 = torch::TensorOptions().device(kCuda);
  torch::Tensor q = torch::randn({1, 4, 8, 64}, f32), k = torch::randn({1, 2, 8, 64}, f32),
                v = torch::randn({1, 2, 8, 64}, f32);
  AttentionParams p;
  using Catch::Matchers::Contains;
  REQUIRE_THROWS_WITH(lckv::ops::condensed_attention(q.to(torch::kDouble), k.to(torch::kDouble), v.to(torch::kDouble), p),
                      Contains("float64"));
  torch::Tensor q96 = torch::randn({1, 4, 8, 96}, f32), k96 = torch::randn({1, 2, 8, 96}, f32);
  REQUIRE_THROWS_WITH(lckv::ops::condensed_attention(q96, k96, k96, p), Contains("head_dim must be 64 or 128"));
  REQUIRE_THROWS_WITH(lckv::ops::condensed_attention(q, k.cpu(), v, p), Contains("one device"));
  p.mask.key_start = torch::zeros({1}, torch::kLong);  // on the CPU while q is on the GPU
  REQUIRE_THROWS_WITH(lckv::ops::condensed_attention(q, k, v, p), Contains("key_start must be on"));
}

namespace {

// A tiny LCKV model with head_dim 64 (the CUDA kernels' smallest), sandwich w=2 with a window layer.
lckv::LCKVForCausalLM tiny_model(uint64_t seed) {
  nlohmann::json j = {{"vocab_size", 96},        {"hidden_size", 128},      {"intermediate_size", 192},
                      {"num_hidden_layers", 4},  {"num_attention_heads", 2}, {"num_key_value_heads", 1},
                      {"layer_types", "0_3s_3_3"}, {"sliding_window", 5},    {"forward_passes", 2},
                      {"backward_passes", 1},    {"initializer_range", 0.1}};
  torch::manual_seed(seed);
  lckv::LCKVForCausalLM m(lckv::LCKVConfig::from_json(j));
  lckv::init_weights(m);
  return m;
}

}  // namespace

TEST_CASE("training a tiny model on the GPU follows the CPU losses", "[cuda][gpu]") {
  const UseLckvKernels lckv_kernels;
  if (!cuda_ready()) return;
  std::vector<double> losses[2];
  torch::manual_seed(3);
  const torch::Tensor ids = torch::randint(0, 96, {2, 40}, torch::kLong);
  for (int on_gpu = 0; on_gpu < 2; ++on_gpu) {
    const torch::Device dev = on_gpu ? kCuda : torch::Device(torch::kCPU);
    auto m = tiny_model(7);
    m->to(dev);
    torch::optim::SGD opt(m->parameters(), torch::optim::SGDOptions(0.5));
    for (int step = 0; step < 4; ++step) {
      opt.zero_grad();
      torch::Tensor loss = m->forward(ids.to(dev), ids.to(dev)).loss;
      loss.backward();
      opt.step();
      losses[on_gpu].push_back(loss.item<double>());
    }
  }
  CHECK(losses[0][3] < losses[0][0]);  // it trains at all
  for (int step = 0; step < 4; ++step) {
    INFO("step " << step << ": CPU " << losses[0][step] << ", GPU " << losses[1][step]);
    CHECK(std::abs(losses[1][step] - losses[0][step]) <= 1e-4 * std::abs(losses[0][step]));
  }
}

TEST_CASE("greedy generation on the GPU equals the CPU's for a tiny fp32 model", "[cuda][gpu]") {
  const UseLckvKernels lckv_kernels;
  if (!cuda_ready()) return;
  // Prompts of different lengths: left padding puts a key_start on the device.
  const std::vector<std::vector<int64_t>> prompts = {{5, 17, 3, 88, 41, 9, 60}, {12, 7, 30}};
  lckv::GenerationConfig gc;
  gc.max_new_tokens = 12;
  gc.prefill = lckv::PrefillMode::kExact;
  gc.return_logits = true;
  lckv::GenerationResult results[2];
  for (int on_gpu = 0; on_gpu < 2; ++on_gpu) {
    auto m = tiny_model(11);
    m->eval();
    if (on_gpu) m->to(kCuda);
    torch::NoGradGuard no_grad;
    results[on_gpu] = lckv::generate(m, prompts, gc);
  }
  CHECK(results[1].tokens == results[0].tokens);
  check_close(results[1].logits, results[0].logits, 1e-4, "logits of every step");
}

TEST_CASE("decode steps replayed from a CUDA graph equal the dynamic and static ones on the GPU", "[cuda][gpu][static]") {
  if (!cuda_ready()) return;
  // Ragged prompts (a device key_start), and StreamingLLM eviction between replays.
  const std::vector<std::vector<int64_t>> prompts = {{5, 17, 3, 88, 41, 9, 60}, {12, 7, 30}};
  for (bool streaming : {false, true}) {
    lckv::GenerationConfig gc;
    gc.max_new_tokens = streaming ? 40 : 16;
    gc.prefill = lckv::PrefillMode::kExact;
    gc.return_logits = true;
    if (streaming) {
      gc.cache_capacity = 16;
      gc.streaming = lckv::StreamingOptions{2, 3};
    }
    auto m = tiny_model(13);
    m->eval();
    m->to(kCuda);
    torch::NoGradGuard no_grad;
    const lckv::GenerationResult dynamic = lckv::generate(m, prompts, gc);
    for (auto step : {lckv::DecodeStep::kStatic, lckv::DecodeStep::kCudaGraph}) {
      INFO("streaming " << streaming << " decode_step " << lckv::to_string(step));
      gc.decode_step = step;
      const lckv::GenerationResult r = lckv::generate(m, prompts, gc);
      CHECK(r.tokens == dynamic.tokens);
      CHECK(r.stats.evicted == dynamic.stats.evicted);
      check_close(r.logits, dynamic.logits, 1e-5, "logits of every step");
    }
  }
}
