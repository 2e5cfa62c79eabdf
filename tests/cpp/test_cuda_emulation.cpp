// The CUDA kernels run on CPU threads (tests/cpp/cuda_emulation.h, with a WMMA stand-in) against
// the CPU op: their tiling, masks, online softmax, GQA packing, decode key splits, backward and the
// operand layouts of the tensor-core products are checked here, where no GPU is present. What the
// emulation cannot show (real tensor cores, timing, memory model) is left to test_cuda.cpp on a GPU.
#include "cuda_emulation.h"

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cmath>
#include <string>
#include <vector>

#include "lckv/ops/condensed_attention.h"
#include "lckv/ops/cuda/condensed_attention_cuda.h"
#include "test_reference.h"

namespace lckv::cuda {
namespace {
// The kernels' dynamic shared memory (`extern __shared__ ... smem[]`); blocks run one at a time.
alignas(128) unsigned char smem[256 * 1024];
}  // namespace
}  // namespace lckv::cuda

#include "lckv/ops/cuda/condensed_attention_device.cuh"

namespace {

namespace kc = lckv::cuda;
using cuda_emulation::launch;
using lckv::ops::cuda::set_bwd_params;
using lckv::ops::cuda::set_fwd_params;
using lckv::testing::check_close;

struct Case {
  int64_t B, Hq, Hkv, T, S;
  bool strict;
  int64_t window, q_offset;
  bool left_padding;
  int decode_splits;  // > 0: T == 1 through the decode kernel with this many key splits
};

std::string describe(const Case& c) {
  return "B=" + std::to_string(c.B) + " Hq=" + std::to_string(c.Hq) + " Hkv=" + std::to_string(c.Hkv) +
         " T=" + std::to_string(c.T) + " S=" + std::to_string(c.S) + (c.strict ? " strict" : " causal") +
         " window=" + std::to_string(c.window) + " q_offset=" + std::to_string(c.q_offset) +
         (c.left_padding ? " key_start" : "") + " splits=" + std::to_string(c.decode_splits);
}

// Ragged tiles, every mask, GQA 1/2/4, left padding; decode with one and several key splits.
const std::vector<Case> kCases = {
    {2, 4, 2, 37, 37, true, 0, 0, false, 0},     // strict GQA 2: row 0 empty
    {1, 4, 1, 20, 50, false, 7, 30, true, 0},    // causal, window, offset, padding, GQA 4
    {1, 2, 2, 9, 9, true, 1, 0, false, 0},       // strict window 1: every row empty
    {2, 8, 2, 1, 150, true, 0, 150, true, 3},    // decode, 3 splits, padding
    {1, 4, 4, 1, 100, false, 40, 99, false, 1},  // decode with a window, 1 split
};

// The emulated GPU's results for case c: out, lse (forward, or decode with c.decode_splits key
// splits), then dq_accum, dk, dv of the backward from those. Outputs and scratch start as NaN, so
// anything a kernel fails to write shows.
template <typename T, int D>
std::vector<torch::Tensor> run_kernels(const Case& c, const torch::Tensor& q, const torch::Tensor& k,
                                       const torch::Tensor& v, const torch::Tensor& grad_out,
                                       const lckv::ops::AttentionMask& mask) {
  const auto opts = torch::TensorOptions().dtype(q.scalar_type());
  torch::Tensor out = torch::full({c.B, c.Hq, c.T, D}, NAN, opts), lse = torch::full({c.B, c.Hq, c.T}, NAN);
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  kc::FwdParams fp;
  set_fwd_params(fp, q, k, v, out, lse, mask, mask.key_start, scale);
  if (c.decode_splits > 0) {
    REQUIRE(kc::decode_applies(fp));
    kc::DecodeParams dp;
    dp.fwd = fp;
    dp.splits = c.decode_splits;
    torch::Tensor workspace = torch::full({kc::decode_workspace_floats(fp, dp.splits)}, NAN);
    dp.workspace = workspace.data_ptr<float>();
    launch(kc::decode_kernel<T, D>, kc::decode_grid(dp), kc::kThreads, dp, kc::smem, kc::DecodeTile<T, D>::kBytes);
    launch(kc::decode_merge_kernel<T, D>, kc::decode_merge_grid(dp), D, dp, kc::smem, 0);
  } else {
    launch(kc::fwd_kernel<T, D>, kc::fwd_grid<T, D>(fp), kc::kThreads, fp, kc::smem, kc::FwdTile<T, D>::kBytes);
  }

  torch::Tensor dq_accum = torch::zeros({c.B, c.Hq, c.T, D}), delta = torch::full({c.B, c.Hq, c.T}, NAN);
  torch::Tensor dk = torch::full({c.B, c.Hkv, c.S, D}, NAN, opts), dv = torch::full({c.B, c.Hkv, c.S, D}, NAN, opts);
  kc::BwdParams bp;
  set_bwd_params(bp, q, k, v, out, lse, mask, mask.key_start, scale, grad_out, delta, dq_accum, dk, dv);
  launch(kc::bwd_delta_kernel<T>, kc::bwd_delta_grid(bp), kc::kThreads, bp, kc::smem, 0);
  launch(kc::bwd_kernel<T, D>, kc::bwd_grid<T, D>(bp), kc::kThreads, bp, kc::smem, kc::BwdTile<T, D>::kBytes);
  return {out, lse, dq_accum, dk, dv};
}

// Random inputs of case c in dtype; q as the model makes it (a [B, T, H, D] transpose): the kernels
// read strided rows. Left padding draws key_start in [0, 9).
struct Inputs {
  torch::Tensor q, k, v, grad_out;
  lckv::ops::AttentionMask mask;
};

Inputs make_inputs(const Case& c, int64_t D, torch::ScalarType dtype) {
  Inputs in;
  in.q = torch::randn({c.B, c.T, c.Hq, D}).to(dtype).transpose(1, 2);
  in.k = torch::randn({c.B, c.Hkv, c.S, D}).to(dtype);
  in.v = torch::randn({c.B, c.Hkv, c.S, D}).to(dtype);
  in.grad_out = torch::randn({c.B, c.Hq, c.T, D}).to(dtype);
  in.mask.strict = c.strict;
  in.mask.window = c.window;
  in.mask.q_offset = c.q_offset;
  if (c.left_padding) in.mask.key_start = torch::randint(0, 9, {c.B}, torch::kLong);
  return in;
}

// Runs forward (or decode) and backward of element type T, head dim D on the emulated GPU and
// compares with the CPU op: in fp32 against the fp32 op within 1e-5; in fp16/bf16 against the
// fp64 op on the same rounded inputs within `tol` (tensor-core rounding of P and dS, not layout
// or indexing errors, which are of the order of the values themselves).
template <typename T, int D>
void check_kernels(torch::ScalarType dtype, double tol, const std::vector<Case>& cases) {
  torch::manual_seed(0);
  for (const Case& c : cases) {
    INFO(describe(c) << " D=" << D << " dtype " << dtype);
    const Inputs in = make_inputs(c, D, dtype);
    lckv::ops::AttentionParams ap;
    ap.mask = in.mask;
    const auto ref_dtype = dtype == torch::kFloat ? torch::kFloat : torch::kDouble;
    const torch::Tensor rq = in.q.to(ref_dtype), rk = in.k.to(ref_dtype), rv = in.v.to(ref_dtype),
                        rg = in.grad_out.to(ref_dtype);
    auto [want_out, want_lse] = lckv::ops::condensed_attention_forward(rq, rk, rv, ap);
    auto [want_dq, want_dk, want_dv] = lckv::ops::condensed_attention_backward(rg, rq, rk, rv, want_out, want_lse, ap);
    const std::vector<torch::Tensor> got = run_kernels<T, D>(c, in.q, in.k, in.v, in.grad_out, in.mask);
    check_close(got[0], want_out, tol, "out");
    check_close(got[1], want_lse, tol, "lse");
    check_close(got[2], want_dq, tol, "dq");
    check_close(got[3], want_dk, tol, "dk");
    check_close(got[4], want_dv, tol, "dv");
  }
}

// Keys and values that no query sees (future or unwritten cache slots, keys before every window,
// left padding) hold NaN, +inf or -inf: the kernels' out, lse, dq, dk, dv equal those of the clean
// inputs bit for bit (the emulation is deterministic), and the hidden keys' dk, dv are exactly 0.
template <typename T, int D>
void check_hidden_keys_inert(torch::ScalarType dtype, const std::vector<Case>& cases) {
  torch::manual_seed(5);
  const char* names[] = {"out", "lse", "dq", "dk", "dv"};
  for (const Case& c : cases) {
    const Inputs in = make_inputs(c, D, dtype);
    std::vector<int64_t> key_start;
    if (c.left_padding) {
      const int64_t* ks = in.mask.key_start.data_ptr<int64_t>();
      key_start.assign(ks, ks + c.B);
    }
    const torch::Tensor hidden =
        lckv::testing::keys_no_query_sees(c.B, c.T, c.S, c.strict, c.window, c.q_offset, key_start);
    INFO(describe(c) << " D=" << D << " dtype " << dtype << ", hidden keys per sequence " << hidden.sum({1, 2, 3}));
    REQUIRE(hidden.any().item<bool>());
    const std::vector<torch::Tensor> clean = run_kernels<T, D>(c, in.q, in.k, in.v, in.grad_out, in.mask);
    for (double poison : {double(NAN), double(INFINITY)}) {  // NaN in K and V; +inf in K, -inf in V
      INFO("hidden keys hold " << poison << ", values " << -poison);
      const std::vector<torch::Tensor> got = run_kernels<T, D>(c, in.q, in.k.masked_fill(hidden, poison),
                                                               in.v.masked_fill(hidden, -poison), in.grad_out, in.mask);
      for (int i = 0; i < 5; ++i) {
        INFO(names[i]);
        CHECK(torch::equal(got[i], clean[i]));
      }
      CHECK(got[3].masked_select(hidden.expand_as(got[3])).eq(0).all().item<bool>());
      CHECK(got[4].masked_select(hidden.expand_as(got[4])).eq(0).all().item<bool>());
    }
  }
}

// Cases with keys no query sees, each mask kind; the decode kernel with padding and a window.
const std::vector<Case> kHiddenCases = {
    {1, 4, 2, 20, 40, false, 0, 0, false, 0},    // causal, unwritten slots after the chunk (a partial key tile)
    {2, 4, 2, 37, 37, true, 0, 0, false, 0},     // strict GQA 2: row 0 empty, the last key seen by none
    {1, 4, 1, 20, 60, false, 7, 30, true, 0},    // window before the chunk, q_offset, padding, slots after, GQA 4
    {1, 2, 2, 9, 9, true, 1, 0, false, 0},       // strict window 1: every key hidden
    {2, 8, 2, 1, 150, true, 0, 120, true, 3},    // decode, 3 splits, padding, slots after
    {1, 4, 4, 1, 100, false, 40, 70, false, 1},  // decode with a window, slots after
};

}  // namespace

TEST_CASE("the CUDA kernels' fp32 path, emulated on CPU threads, equals the CPU op", "[cuda][emulated]") {
  check_kernels<float, 64>(torch::kFloat, 1e-5, kCases);
}

TEST_CASE("the CUDA kernels' tensor-core path, emulated, agrees with the fp64 op to 16-bit precision",
          "[cuda][emulated]") {
  // Every product layout and the decode merge, in few cases: the emulation is slow.
  const std::vector<Case> cases = {kCases[0], kCases[1], kCases[3]};
  check_kernels<__nv_bfloat16, 64>(torch::kBFloat16, 4e-2, cases);
  check_kernels<__half, 128>(torch::kHalf, 1e-2, cases);
}

TEST_CASE("the CUDA kernels, emulated, ignore NaN/inf in keys and values that no query sees", "[cuda][emulated]") {
  check_hidden_keys_inert<float, 64>(torch::kFloat, kHiddenCases);
  check_hidden_keys_inert<__nv_bfloat16, 64>(torch::kBFloat16, {kHiddenCases[0], kHiddenCases[2], kHiddenCases[4]});
}
