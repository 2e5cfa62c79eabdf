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

kc::TensorRef ref(const torch::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

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

// max |got - want| <= tol * max(1, max |want|); -inf entries (empty rows' lse) must match exactly.
void check_close(const torch::Tensor& got_in, const torch::Tensor& want_in, double tol, const std::string& what) {
  const torch::Tensor got = got_in.to(torch::kDouble), want = want_in.to(torch::kDouble);
  INFO(what);
  REQUIRE_FALSE(got.isnan().any().item<bool>());
  const torch::Tensor want_inf = want.isinf();
  CHECK(torch::equal(got.isinf(), want_inf));
  const double err = (got.masked_fill(want_inf, 0) - want.masked_fill(want_inf, 0)).abs().max().item<double>();
  const double scale = std::max(1.0, want.masked_fill(want_inf, 0).abs().max().item<double>());
  INFO("max error " << err << ", scale " << scale);
  CHECK(err <= tol * scale);
}

// Ragged tiles, every mask, GQA 1/2/4, left padding; decode with one and several key splits.
const std::vector<Case> kCases = {
    {2, 4, 2, 37, 37, true, 0, 0, false, 0},     // strict GQA 2: row 0 empty
    {1, 4, 1, 20, 50, false, 7, 30, true, 0},    // causal, window, offset, padding, GQA 4
    {1, 2, 2, 9, 9, true, 1, 0, false, 0},       // strict window 1: every row empty
    {2, 8, 2, 1, 150, true, 0, 150, true, 3},    // decode, 3 splits, padding
    {1, 4, 4, 1, 100, false, 40, 99, false, 1},  // decode with a window, 1 split
};

// Runs forward (or decode) and backward of element type T, head dim D on the emulated GPU and
// compares with the CPU op: in fp32 against the fp32 op within 1e-5; in fp16/bf16 against the
// fp64 op on the same rounded inputs within `tol` (tensor-core rounding of P and dS, not layout
// or indexing errors, which are of the order of the values themselves).
template <typename T, int D>
void check_kernels(torch::ScalarType dtype, double tol, const std::vector<Case>& cases) {
  torch::manual_seed(0);
  for (const Case& c : cases) {
    INFO(describe(c) << " D=" << D << " dtype " << dtype);
    // q as the model makes it (a [B, T, H, D] transpose): the kernels read strided rows.
    torch::Tensor q = torch::randn({c.B, c.T, c.Hq, D}).to(dtype).transpose(1, 2);
    torch::Tensor k = torch::randn({c.B, c.Hkv, c.S, D}).to(dtype), v = torch::randn({c.B, c.Hkv, c.S, D}).to(dtype);
    torch::Tensor grad_out = torch::randn({c.B, c.Hq, c.T, D}).to(dtype);
    torch::Tensor key_start = c.left_padding ? torch::randint(0, 9, {c.B}, torch::kLong) : torch::Tensor();
    lckv::ops::AttentionParams ap;
    ap.mask.strict = c.strict;
    ap.mask.window = c.window;
    ap.mask.q_offset = c.q_offset;
    ap.mask.key_start = key_start;
    const auto ref_dtype = dtype == torch::kFloat ? torch::kFloat : torch::kDouble;
    const torch::Tensor rq = q.to(ref_dtype), rk = k.to(ref_dtype), rv = v.to(ref_dtype), rg = grad_out.to(ref_dtype);
    auto [want_out, want_lse] = lckv::ops::condensed_attention_forward(rq, rk, rv, ap);
    auto [want_dq, want_dk, want_dv] = lckv::ops::condensed_attention_backward(rg, rq, rk, rv, want_out, want_lse, ap);

    kc::MaskParams mask;
    mask.strict = c.strict;
    mask.window = c.window;
    mask.q_offset = c.q_offset;
    mask.key_start = c.left_padding ? key_start.data_ptr<int64_t>() : nullptr;

    const auto opts = torch::TensorOptions().dtype(dtype);
    torch::Tensor out = torch::full({c.B, c.Hq, c.T, D}, NAN, opts), lse = torch::full({c.B, c.Hq, c.T}, NAN);
    kc::FwdParams fp;
    fp.B = c.B, fp.Hq = c.Hq, fp.Hkv = c.Hkv, fp.T = c.T, fp.S = c.S, fp.D = D;
    fp.mask = mask;
    fp.scale = 1.0f / std::sqrt(static_cast<float>(D));
    fp.q = ref(q), fp.k = ref(k), fp.v = ref(v), fp.out = ref(out);
    fp.lse = lse.data_ptr<float>();
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
    check_close(out, want_out, tol, "out");
    check_close(lse, want_lse, tol, "lse");

    torch::Tensor dq_accum = torch::zeros({c.B, c.Hq, c.T, D}), delta = torch::full({c.B, c.Hq, c.T}, NAN);
    torch::Tensor dk = torch::full({c.B, c.Hkv, c.S, D}, NAN, opts), dv = torch::full({c.B, c.Hkv, c.S, D}, NAN, opts);
    kc::BwdParams bp;
    bp.B = c.B, bp.Hq = c.Hq, bp.Hkv = c.Hkv, bp.T = c.T, bp.S = c.S, bp.D = D;
    bp.mask = mask;
    bp.scale = fp.scale;
    bp.q = ref(q), bp.k = ref(k), bp.v = ref(v), bp.out = ref(out), bp.grad_out = ref(grad_out);
    bp.lse = lse.data_ptr<float>();
    bp.delta = delta.data_ptr<float>();
    bp.dq_accum = dq_accum.data_ptr<float>();
    bp.dk = ref(dk), bp.dv = ref(dv);
    launch(kc::bwd_delta_kernel<T>, kc::bwd_delta_grid(bp), kc::kThreads, bp, kc::smem, 0);
    launch(kc::bwd_kernel<T, D>, kc::bwd_grid<T, D>(bp), kc::kThreads, bp, kc::smem, kc::BwdTile<T, D>::kBytes);
    check_close(dq_accum, want_dq, tol, "dq");
    check_close(dk, want_dk, tol, "dk");
    check_close(dv, want_dv, tol, "dv");
  }
}

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
