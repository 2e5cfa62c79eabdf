// Runs CUDA kernels written for one block of threads at a time on CPU threads, for testing their
// logic without a GPU: every CUDA thread of a block is a std::thread, __syncthreads() is a barrier
// of the block, warp shuffles exchange values through a per-warp slot array between two warp
// barriers, and blocks run one after another (so one static buffer serves as shared memory).
// Tensor cores are replaced by a WMMA stand-in (below). Enough for the condensed attention kernels;
// include it before their device header.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <cmath>
#include <condition_variable>
#include <cstring>
#include <type_traits>
#include <mutex>
#include <thread>
#include <vector>

#pragma GCC diagnostic ignored "-Wattributes"  // the CUDA headers' __device__ etc. become unknown attributes
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace cuda_emulation {

class Barrier {
 public:
  void reset(int parties) {
    parties_ = parties;
    waiting_ = 0;
  }
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long generation = generation_;
    if (++waiting_ == parties_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int parties_ = 0, waiting_ = 0;
  unsigned long generation_ = 0;
};

constexpr int kMaxWarps = 32;
inline Barrier block_barrier;
inline Barrier warp_barriers[kMaxWarps];
inline float warp_slots[kMaxWarps][32];
inline std::mutex atomic_mutex;

}  // namespace cuda_emulation

inline thread_local uint3 threadIdx, blockIdx;
inline uint3 blockDim, gridDim;

inline void __syncthreads() { cuda_emulation::block_barrier.arrive_and_wait(); }

// Lane `lane` of the calling warp reads what lane `src_lane(lane)` passed in.
template <typename SrcLane>
float emulated_shuffle(float x, SrcLane src_lane) {
  using namespace cuda_emulation;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  warp_slots[warp][lane] = x;
  warp_barriers[warp].arrive_and_wait();
  const float y = warp_slots[warp][src_lane(lane)];
  warp_barriers[warp].arrive_and_wait();  // everyone has read before the next shuffle writes
  return y;
}

inline float __shfl_xor_sync(unsigned, float x, int mask) {
  return emulated_shuffle(x, [&](int lane) { return lane ^ mask; });
}

inline float __shfl_sync(unsigned, float x, int src) {
  return emulated_shuffle(x, [&](int) { return src; });
}

inline float atomicAdd(float* address, float value) {
  std::lock_guard<std::mutex> lock(cuda_emulation::atomic_mutex);
  const float old = *address;
  *address = old + value;
  return old;
}

// WMMA stand-in: lane 0 of a warp does the warp's work on whole 16x16 tiles (in fp32, as tensor
// cores multiply 16-bit inputs exactly and accumulate in fp32); the other lanes' fragments stay
// unused. That is what the warp-collective calls mean for code that only loads, multiplies and
// stores fragments, as the kernels do.
namespace nvcuda::wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

inline float element(float x) { return x; }
inline float element(__half x) { return __half2float(x); }
inline float element(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the stand-in knows 16x16x16 only");
  float x[16][16];  // [row][col] of the tile
};

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  if (threadIdx.x % 32 != 0) return;
  const bool row = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) f.x[r][c] = element(row ? p[r * ldm + c] : p[c * ldm + r]);
  }
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) f.x[r][c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  }
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  if (threadIdx.x % 32 != 0) return;
  for (auto& row : f.x) for (float& e : row) e = v;
}

template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  if (threadIdx.x % 32 != 0) return;
  float out[16][16];
  for (int r = 0; r < 16; ++r) {
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[r][n];
      for (int k = 0; k < 16; ++k) acc = std::fma(a.x[r][k], b.x[k][n], acc);
      out[r][n] = acc;
    }
  }
  std::memcpy(d.x, out, sizeof out);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r][c];
  }
}

}  // namespace nvcuda::wmma

namespace cuda_emulation {

// kernel(params) on a grid of blocks of `threads` threads (a multiple of 32), block after block,
// by one CPU thread per CUDA thread. `smem` is the kernel's dynamic shared memory buffer, zeroed
// before each block.
template <typename Kernel, typename Params>
void launch(Kernel kernel, dim3 grid, int threads, const Params& params, unsigned char* smem, size_t smem_bytes) {
  blockDim = {static_cast<unsigned>(threads), 1, 1};
  gridDim = {grid.x, grid.y, grid.z};
  block_barrier.reset(threads);
  for (int w = 0; w < threads / 32; ++w) warp_barriers[w].reset(32);
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = {static_cast<unsigned>(t), 0, 0};
      for (unsigned z = 0; z < grid.z; ++z) {
        for (unsigned y = 0; y < grid.y; ++y) {
          for (unsigned x = 0; x < grid.x; ++x) {
            if (t == 0) std::memset(smem, 0, smem_bytes);
            block_barrier.arrive_and_wait();  // shared memory is clear before the block starts
            blockIdx = {x, y, z};
            kernel(params);
            block_barrier.arrive_and_wait();  // every thread is done with the block
          }
        }
      }
    });
  }
  for (auto& th : pool) th.join();
}

}  // namespace cuda_emulation
