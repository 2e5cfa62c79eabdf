// Vector helpers shared by the CPU kernels that are compiled once per capability (fused_kernels.cpp,
// tiled_attention.cpp): included inside their `namespace lckv::ops::cpu::CPU_CAPABILITY { namespace {`,
// so each variant gets its own copy built with its own vector width. The including file includes
// <ATen/cpu/vec/functional.h>, <ATen/cpu/vec/vec.h>, <algorithm> and <type_traits> first (outside any
// namespace).
#pragma once

#ifndef CPU_CAPABILITY
#error "vec_lanes.h is for the per-capability kernel files (CMake defines CPU_CAPABILITY)"
#endif

using at::vec::Vectorized;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// T can be loaded into Vectorized<A>: itself, or bf16/fp16/fp32 into fp32.
template <typename T, typename A>
constexpr bool kLoadable = std::is_same_v<T, A> || (std::is_same_v<A, float> && !std::is_same_v<T, double>);

// Loads and stores of 2 * Vectorized<A>::size() elements of T (or the first n), as two
// Vectorized<A>. Tail lanes of a partial load are zero.
template <typename T, typename A = acc_t<T>>
struct Lanes {
  using V = Vectorized<A>;
  static constexpr int64_t kWidth = V::size();
  static constexpr int64_t kStep = 2 * kWidth;

  static std::pair<V, V> load(const T* p, int64_t n = kStep) {
    if constexpr (std::is_same_v<T, A>) {
      if (n >= kStep) return {V::loadu(p), V::loadu(p + kWidth)};
      return {V::loadu(p, std::min(n, kWidth)), n > kWidth ? V::loadu(p + kWidth, n - kWidth) : V(A(0))};
    } else {
      const auto v = n >= kStep ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
      auto [a, b] = at::vec::convert_to_float<T>(v);
      return {a, b};
    }
  }

  static void store(T* p, const V& a, const V& b, int64_t n = kStep) {
    if constexpr (std::is_same_v<T, A>) {
      if (n >= kStep) {
        a.store(p);
        b.store(p + kWidth);
        return;
      }
      a.store(p, std::min(n, kWidth));
      if (n > kWidth) b.store(p + kWidth, n - kWidth);
    } else {
      const auto v = at::vec::convert_from_float<T>(a, b);
      n >= kStep ? v.store(p) : v.store(p, n);
    }
  }
};

template <typename A>
A sum_lanes(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& x, Vectorized<A>& y) { return x + y; }, v);
}

template <typename A>
A max_lanes(const Vectorized<A>& v) {
  return at::vec::vec_reduce_all<A>([](Vectorized<A>& x, Vectorized<A>& y) { return at::vec::maximum(x, y); }, v);
}
