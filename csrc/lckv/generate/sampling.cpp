#include "lckv/generate/sampling.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "lckv/ops/accumulate.h"

// Per-row loops instead of chains of ATen ops. Measured at batch 32, vocab 4096, fp32, 2 threads
// (tiny LCKV model, random weights, so top_p = 0.9 keeps ~90% of a nearly flat row): the ATen version
// cost ~12 ms per step over greedy's 18.8 ms, mostly aten::sort (~4 ms: candidates grown to a full
// stable sort of flat rows), torch::multinomial's exponential_ (2.4 ms: one Exp(1) per entry for a
// single draw per row) and ~15 small ops around them. Here one parallel region over rows does
// everything but the softmax, which stays ATen's (its vectorised exp is the top-p cut's definition,
// so it is called on each thread's rows, not rewritten).
namespace lckv {
namespace {

template <typename T>
struct RankKey;
// Packed ranking keys: value key in the high bits, token id in the low 32; ascending order of the
// packed key is value descending, ties by token id ascending (a stable descending sort's order).
template <>
struct RankKey<float> {
  using Bits = uint32_t;
  using Key = uint64_t;
};
template <>
struct RankKey<double> {
  using Bits = uint64_t;
  using Key = unsigned __int128;
};

// An unsigned key that ascends as v descends. -0 is taken as +0 (they compare equal, so their order
// is by id), and every NaN as one NaN above +inf (ATen's sort and topk rank NaN first). Branch-free:
// a branch on the sign mispredicts half the time on a flat row (top-k 50 at [32, 4096], one thread: 1.2 ms
// with it, 0.7 ms without).
template <typename T>
inline typename RankKey<T>::Bits descending_bits(T v) {
  using Bits = typename RankKey<T>::Bits;
  using Signed = std::make_signed_t<Bits>;
  constexpr Bits kSign = Bits(1) << (sizeof(Bits) * 8 - 1);
  v += T(0);  // -0 + 0 = +0, everything else unchanged
  v = std::isnan(v) ? std::numeric_limits<T>::quiet_NaN() : v;
  Bits b;
  std::memcpy(&b, &v, sizeof b);
  b ^= static_cast<Bits>(static_cast<Signed>(b) >> (sizeof(Bits) * 8 - 1)) | kSign;  // ascends with v
  return ~b;
}

template <typename T>
inline T from_descending_bits(typename RankKey<T>::Bits d) {
  using Bits = typename RankKey<T>::Bits;
  constexpr Bits kSign = Bits(1) << (sizeof(Bits) * 8 - 1);
  Bits b = ~d;
  b = (b & kSign) ? (b & ~kSign) : ~b;
  T v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

template <typename T>
inline typename RankKey<T>::Key rank_key(T v, int64_t id) {
  using Key = typename RankKey<T>::Key;
  return (Key(descending_bits(v)) << 32) | Key(static_cast<uint32_t>(id));
}

template <typename Key>
inline int64_t key_id(Key k) {
  return static_cast<uint32_t>(k);
}

// Stable LSD radix sort of keys[0, n) on the value bits above the id (8 bits a pass, passes where
// every key has the same digit skipped). The keys come in token order, so ties stay by id. A full
// ranking this way costs ~4 passes over V, against ~log2(V) compare passes for std::sort.
template <typename Key>
void radix_sort_values(Key* keys, Key* scratch, int64_t n, int value_bytes) {
  constexpr int kMaxBytes = 8;
  uint32_t count[kMaxBytes][256];
  std::memset(count, 0, sizeof count);
  for (int64_t i = 0; i < n; ++i) {
    const Key k = keys[i] >> 32;
    for (int d = 0; d < value_bytes; ++d) ++count[d][static_cast<uint8_t>(k >> (8 * d))];
  }
  Key* src = keys;
  Key* dst = scratch;
  for (int d = 0; d < value_bytes; ++d) {
    if (count[d][static_cast<uint8_t>((src[0] >> 32) >> (8 * d))] == n) continue;
    uint32_t offset[256];
    uint32_t sum = 0;
    for (int i = 0; i < 256; ++i) offset[i] = sum, sum += count[d][i];
    for (int64_t i = 0; i < n; ++i) dst[offset[static_cast<uint8_t>((src[i] >> 32) >> (8 * d))]++] = src[i];
    std::swap(src, dst);
  }
  if (src != keys) std::memcpy(keys, src, n * sizeof(Key));
}

// Per-thread buffers, reused across the rows of one chunk.
template <typename T>
struct Scratch {
  std::vector<typename RankKey<T>::Key> keys, sorted;
  std::vector<typename RankKey<T>::Bits> bits;
  std::vector<double> block_mass, mass;
  std::vector<T> least;
};

// max(f(j)) over j in [0, n), f(j) never NaN, with 8 independent running maxima: a single one is a
// dependency chain of ~4 cycles a token (measured: 1/3 of a flat row's top-p time).
template <typename T, typename F>
T max_over(int64_t n, T init, F f) {
  T m[8] = {init, init, init, init, init, init, init, init};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int l = 0; l < 8; ++l) {
      const T v = f(j + l);
      m[l] = v > m[l] ? v : m[l];
    }
  }
  for (; j < n; ++j) m[0] = f(j) > m[0] ? f(j) : m[0];
  for (int l = 1; l < 8; ++l) m[0] = m[l] > m[0] ? m[l] : m[0];
  return m[0];
}

// Restores the max-heap property of heap[0, n) after heap[0] was replaced.
template <typename U>
void sift_down(U* heap, int64_t n) {
  int64_t i = 0;
  const U v = heap[0];
  for (;;) {
    int64_t child = 2 * i + 1;
    if (child >= n) break;
    if (child + 1 < n && heap[child + 1] > heap[child]) ++child;
    if (!(heap[child] > v)) break;
    heap[i] = heap[child];
    i = child;
  }
  heap[i] = v;
}

// Top-k in place on one row: every token below the k-th largest value goes to -inf (so all tokens tied
// with the k-th stay). The k-th value is found on order keys: for small k by one pass with a bounded
// heap of the k best (most tokens fail one compare against the heap's worst), otherwise nth_element.
// A whole top-k 50 draw at [32, 4096] fp32: ~4 ms with ATen's topk and multinomial, 0.7 ms here on one
// thread, 0.5 ms on 2.
template <typename T>
void keep_top_k(T* x, int64_t V, int64_t k, Scratch<T>& s) {
  using Bits = typename RankKey<T>::Bits;
  s.bits.resize(V);
  Bits* bits = s.bits.data();
  Bits kth_bits;
  if (k * 16 <= V) {
    for (int64_t j = 0; j < k; ++j) bits[j] = descending_bits(x[j]);
    std::make_heap(bits, bits + k);  // max-heap: heap[0] is the worst of the k best
    for (int64_t j = k; j < V; ++j) {
      const Bits b = descending_bits(x[j]);
      if (b < bits[0]) {
        bits[0] = b;
        sift_down(bits, k);
      }
    }
    kth_bits = bits[0];
  } else {
    for (int64_t j = 0; j < V; ++j) bits[j] = descending_bits(x[j]);
    std::nth_element(bits, bits + (k - 1), bits + V);
    kth_bits = bits[k - 1];
  }
  const T kth = from_descending_bits<T>(kth_bits);
  for (int64_t j = 0; j < V; ++j) {
    if (x[j] < kth) x[j] = -std::numeric_limits<T>::infinity();
  }
}

// Whether top-p drops a token of probability prob with running sum `running` (its own p included) at
// its rank: cumsum - p >= top_p, exactly as
//   probs = p[ranked]; drop = (probs.cumsum(-1) - probs) >= top_p
// evaluates: the running sum accumulates in double and is rounded to T at each rank (ATen's CPU cumsum
// accumulates float in double), the difference is taken in T, and top_p compared as a T (a float
// tensor against a double scalar compares in float).
template <typename T>
inline bool dropped(double running, T prob, T threshold) {
  return static_cast<T>(static_cast<T>(running) - prob) >= threshold;
}

// The rank of the first token that top-p drops among keys[0, n) (ranked, after tokens of mass `before`),
// or -1.
template <typename T, typename Key>
int64_t first_dropped(const Key* keys, int64_t n, const T* p, T threshold, double before) {
  double running = before;
  for (int64_t i = 0; i < n; ++i) {
    const T prob = p[key_id(keys[i])];
    running += prob;
    if (dropped(running, prob, threshold)) return i;
  }
  return -1;
}

// Top-p on one row x [V] with p = softmax(x) [V] (ATen's): tokens ranked by logit, ties by token id; the
// first dropped token (first_dropped) and every token ranked after it go to -inf (their p to 0). Once
// a token is dropped every later one is too (cumsum - p does not decrease down the ranking, as p does
// not increase), so only the ranks up to the cut need ranking, and of those only as much as the exact
// running sum needs. Three ways to find the cut, the first two falling back to the third:
// - fp32 (cut_in_logit_buckets): a partial sum in double of fp32 p's that are all >= 2^-29 is exact
//   (multiples of 2^-52 below 2) whatever the order, so the running sum at a rank is just the mass of
//   the tokens ranked up to it. A histogram of mass over V/4 equal-width logit buckets locates the
//   bucket of the cut (the first whose last, least likely, token is dropped with the mass up to the
//   bucket's end), and only that bucket's few tokens are ranked. Used while the buckets up to the cut
//   hold no p below 2^-29 (with top_p <= 0.999 practically always), flat row or peaked;
// - fp64 rows whose nucleus is small (cut_among_candidates): only candidates are ranked, the tokens
//   in the buckets of a histogram of mass over p's float exponent (8 buckets an octave) from the top
//   until their mass passes top_p, plus one more bucket; accepted when the cut is among them and every
//   token left out has a lower logit;
// - one radix sort of the whole row.
// A whole top-p 0.9 draw at [32, 4096] fp32 on the logits of the bench's random-weight models (nearly
// flat rows): 9-13 ms with ATen's sorts and multinomial; with these loops on one thread 2.4 ms with a
// radix sort of every row, 1.0 ms with the logit buckets; 0.55 ms on 2 threads.
enum class Cut { kAt, kNone, kUnknown };

template <typename T>
Cut cut_among_candidates(const T* x, const T* p, int64_t V, double top_p, T threshold, Scratch<T>& s,
                         int64_t& cut_id) {
  using Key = typename RankKey<T>::Key;
  constexpr int kBuckets = 1024;  // float bits >> 20 of p in [0, 1]: 8 exponent bits, 3 mantissa bits
  double mass[kBuckets] = {};
  auto bucket = [](T prob) {
    const float f = static_cast<float>(prob);
    uint32_t b;
    std::memcpy(&b, &f, sizeof b);
    return std::min<uint32_t>(b >> 20, kBuckets - 1);
  };
  for (int64_t j = 0; j < V; ++j) mass[bucket(p[j])] += p[j];
  double cum = 0;
  int lowest = kBuckets;  // the lowest bucket taken
  bool passed = false;
  for (int b = kBuckets - 1; b >= 0; --b) {
    if (mass[b] == 0) continue;
    lowest = b;
    if (passed) break;  // one more bucket beyond the one that passed top_p
    cum += mass[b];
    passed = cum >= top_p + 1e-6;
  }
  if (!passed) return Cut::kUnknown;
  s.keys.resize(V);
  Key* keys = s.keys.data();
  int64_t n = 0;
  T best_left_out = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < V; ++j) {
    if (static_cast<int>(bucket(p[j])) >= lowest) {
      keys[n++] = rank_key(x[j], j);
    } else {
      best_left_out = std::max(best_left_out, x[j]);
    }
  }
  if (n >= V / 2) return Cut::kUnknown;
  if (n > 512) {
    s.sorted.resize(n);
    radix_sort_values(keys, s.sorted.data(), n, static_cast<int>(sizeof(T)));
  } else {
    std::sort(keys, keys + n);
  }
  const int64_t at = first_dropped(keys, n, p, threshold, 0.0);
  if (at < 0 || !(x[key_id(keys[at])] > best_left_out)) return Cut::kUnknown;
  cut_id = key_id(keys[at]);
  return Cut::kAt;
}

Cut cut_in_logit_buckets(const float* x, const float* p, int64_t V, float threshold, Scratch<float>& s,
                        int64_t& cut_id) {
  using Key = RankKey<float>::Key;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const float hi = max_over(V, kNegInf, [x](int64_t j) { return x[j]; });
  const float lo = -max_over(V, kNegInf, [x](int64_t j) { return x[j] == kNegInf ? kNegInf : -x[j]; });
  if (!(hi >= lo) || !std::isfinite(hi - lo)) return Cut::kUnknown;
  const int64_t buckets = std::clamp<int64_t>(V / 4, 16, 1 << 16);
  // bucket(x) = floor((hi - x) * scale): each step rounds monotonically, so a bucket holds a range of
  // logits (ties together) and the buckets go down the ranking.
  const float scale = hi > lo ? static_cast<float>(buckets) / (hi - lo) : 0.0f;
  auto bucket = [&](float v) { return std::min<int64_t>(static_cast<int64_t>((hi - v) * scale), buckets - 1); };
  s.mass.assign(buckets, 0.0);
  s.least.assign(buckets, std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < V; ++j) {
    if (x[j] == kNegInf) continue;  // ranked after every finite token, p = 0: dropped or not, -inf
    const int64_t b = bucket(x[j]);
    s.mass[b] += p[j];
    s.least[b] = std::min(s.least[b], p[j]);
  }
  double before = 0;  // the exact mass of the buckets before
  int64_t at = -1;
  for (int64_t b = 0; b < buckets; ++b) {
    if (s.least[b] == std::numeric_limits<float>::infinity()) continue;  // empty
    if (!(s.least[b] >= 0x1p-29f)) return Cut::kUnknown;  // sums not exact (or NaN)
    const double end = before + s.mass[b];
    if (dropped(end, s.least[b], threshold)) {
      at = b;
      break;
    }
    before = end;
  }
  if (at < 0) return Cut::kNone;
  s.keys.resize(V);
  Key* keys = s.keys.data();
  int64_t n = 0;
  for (int64_t j = 0; j < V; ++j) {
    if (x[j] != kNegInf && bucket(x[j]) == at) keys[n++] = rank_key(x[j], j);
  }
  std::sort(keys, keys + n);
  const int64_t i = first_dropped(keys, n, p, threshold, before);
  if (i < 0) return Cut::kUnknown;
  cut_id = key_id(keys[i]);
  return Cut::kAt;
}

template <typename T>
void keep_nucleus(T* x, T* p, int64_t V, double top_p, Scratch<T>& s) {
  using Key = typename RankKey<T>::Key;
  const T threshold = static_cast<T>(top_p);
  int64_t cut_id = -1;
  Cut cut = Cut::kUnknown;
  if constexpr (std::is_same_v<T, float>) {
    if (V > 64) cut = cut_in_logit_buckets(x, p, V, threshold, s, cut_id);
  } else {
    // The nucleus holds at least top_p / max(p) tokens: below half the vocabulary, try candidates.
    const T top = max_over(V, T(0), [p](int64_t j) { return std::isnan(p[j]) ? T(0) : p[j]; });
    if (V > 64 && top_p < 0.5 * V * double(top)) cut = cut_among_candidates(x, p, V, top_p, threshold, s, cut_id);
  }
  if (cut == Cut::kUnknown) {
    s.keys.resize(V);
    s.sorted.resize(V);
    Key* keys = s.keys.data();
    for (int64_t j = 0; j < V; ++j) keys[j] = rank_key(x[j], j);
    radix_sort_values(keys, s.sorted.data(), V, static_cast<int>(sizeof(T)));
    const int64_t at = first_dropped(keys, V, p, threshold, 0.0);
    cut = at < 0 ? Cut::kNone : Cut::kAt;
    if (at >= 0) cut_id = key_id(keys[at]);
  }
  if (cut == Cut::kNone) return;
  // Drop the token at the cut and every one ranked after it: lower logits, or tied and a higher id.
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const T cut_value = x[cut_id];
  if (std::isnan(cut_value)) {  // (NaN logits: by keys, where NaN ranks first)
    const Key cut_key = rank_key(cut_value, cut_id);
    for (int64_t j = 0; j < V; ++j) {
      if (rank_key(x[j], j) >= cut_key) x[j] = kNegInf, p[j] = 0;
    }
    return;
  }
  // (Two branch-free loops: before the cut's id, ties stay; from it, ties go.)
  for (int64_t j = 0; j < cut_id; ++j) {
    const bool drop = x[j] < cut_value;
    x[j] = drop ? kNegInf : x[j];
    p[j] = drop ? T(0) : p[j];
  }
  for (int64_t j = cut_id; j < V; ++j) {
    const bool drop = x[j] <= cut_value;
    x[j] = drop ? kNegInf : x[j];
    p[j] = drop ? T(0) : p[j];
  }
}

// One token from row probabilities p [V] (softmax of the processed logits, or for top-p of the logits
// before its cut, with the dropped tokens' p set to 0: on the kept tokens the two are proportional).
// Inverse CDF in fp64 in token order with one uniform u in [0, 1): the first token whose running mass
// exceeds u * total, never one with zero probability (at the rounding edge, the last token with mass).
// The running mass is summed per block of 256 tokens first, so only one block is scanned token by token.
// torch::multinomial(probs, 1) instead drew argmax(p / Exp(1)) over the whole row, one Exp(1) per entry
// (ATen's CPU exponential_: 2.4 ms for [32, 4096]). Returns -1 when the row has no finite mass.
template <typename T>
int64_t draw_token(const T* p, int64_t V, double u, Scratch<T>& s) {
  constexpr int64_t kBlock = 256;
  const int64_t blocks = (V + kBlock - 1) / kBlock;
  s.block_mass.resize(blocks);
  double total = 0;
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t begin = k * kBlock, end = std::min(V, begin + kBlock);
    double a[4] = {0, 0, 0, 0};
    int64_t j = begin;
    for (; j + 4 <= end; j += 4) {
      for (int l = 0; l < 4; ++l) a[l] += p[j + l];
    }
    for (; j < end; ++j) a[0] += p[j];
    s.block_mass[k] = (a[0] + a[1]) + (a[2] + a[3]);
    total += s.block_mass[k];
  }
  if (!(total > 0) || !std::isfinite(total)) return -1;  // all -inf, or NaN logits
  const double target = u * total;
  double running = 0;
  int64_t block = -1;
  bool found = false;
  for (int64_t k = 0; k < blocks && !found; ++k) {
    if (s.block_mass[k] > 0) block = k;
    found = running + s.block_mass[k] > target;
    if (!found) running += s.block_mass[k];
  }
  const int64_t begin = block * kBlock, end = std::min(V, begin + kBlock);
  int64_t last = -1;
  for (int64_t j = begin; j < end; ++j) {
    if (p[j] > 0) {
      running += p[j];
      last = j;
      if (found && running > target) return j;
    }
  }
  return last;  // the last token with mass in the block (rounding edge)
}

// Rows per parallel chunk: ~64k entries, so that small batches (or small vocabularies) stay on the
// calling thread instead of waking the pool.
int64_t row_grain(int64_t V) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(V, 1)); }

// The processed logits x [B, V] in place (contiguous, T), and with `draws` (sampling) the drawn tokens.
template <typename T>
void process_rows(torch::Tensor& x, const SamplingConfig& c, const torch::Tensor& seen, const double* uniforms,
                  int64_t* drawn) {
  const int64_t B = x.size(0), V = x.size(1);
  T* const xd = x.data_ptr<T>();
  const bool* const seen_d = seen.defined() ? seen.data_ptr<bool>() : nullptr;
  const bool top_k = c.do_sample && c.top_k > 0 && c.top_k < V;
  const bool top_p = c.do_sample && c.top_p < 1.0;
  const bool need_probs = top_p || drawn != nullptr;
  torch::Tensor probs = need_probs ? torch::empty_like(x) : torch::Tensor();
  T* const pd = need_probs ? probs.data_ptr<T>() : nullptr;
  // Repetition penalty and temperature as ATen computes x * p, x / p with a double scalar on a T tensor.
  const T penalty = static_cast<T>(c.repetition_penalty);
  const T temperature = static_cast<T>(c.temperature);
  at::parallel_for(0, B, row_grain(V), [&](int64_t begin, int64_t end) {
    Scratch<T> s;
    for (int64_t b = begin; b < end; ++b) {
      T* row = xd + b * V;
      if (seen_d != nullptr) {
        const bool* sr = seen_d + b * V;
        for (int64_t j = 0; j < V; ++j) {
          if (sr[j]) row[j] = row[j] < 0 ? row[j] * penalty : row[j] / penalty;
        }
      }
      if (!c.do_sample) continue;
      for (int64_t j = 0; j < V; ++j) row[j] /= temperature;
      if (top_k) keep_top_k(row, V, c.top_k, s);
    }
    if (!need_probs) return;
    // ATen's softmax on this chunk's rows (serial here: inside a parallel region).
    torch::Tensor chunk_probs = probs.narrow(0, begin, end - begin);
    at::_softmax_out(chunk_probs, x.narrow(0, begin, end - begin), 1, false);
    for (int64_t b = begin; b < end; ++b) {
      if (top_p) keep_nucleus(xd + b * V, pd + b * V, V, c.top_p, s);
      if (drawn != nullptr) drawn[b] = draw_token(pd + b * V, V, uniforms[b], s);
    }
  });
}

torch::Tensor process(const torch::Tensor& logits, const SamplingConfig& c, const torch::Tensor& seen,
                      const double* uniforms, int64_t* drawn) {
  TORCH_CHECK(logits.dim() == 2, "sampling: logits must be [batch, vocab], got ", logits.sizes());
  TORCH_CHECK(logits.device().is_cpu(), "sampling: logits must be on the CPU, got ", logits.device());
  TORCH_CHECK(logits.size(1) < (int64_t(1) << 31), "sampling: a vocabulary of ", logits.size(1),
              " tokens is too large (at most 2^31 - 1)");
  const auto dt = ops::accumulate_dtype(logits.scalar_type());
  torch::Tensor x = logits.to(dt, /*non_blocking=*/false, /*copy=*/true).contiguous();
  torch::Tensor seen_rows;
  if (c.repetition_penalty != 1.0 && seen.defined()) {
    TORCH_CHECK(seen.sizes() == logits.sizes(), "sampling: seen must be ", logits.sizes(), ", got ", seen.sizes());
    TORCH_CHECK(seen.scalar_type() == torch::kBool, "sampling: seen must be bool, got ", seen.scalar_type());
    seen_rows = seen.to(torch::kCPU).contiguous();
  }
  if (x.numel() == 0 || (!c.do_sample && !seen_rows.defined())) return x;  // (greedy: nothing to do per row)
  if (dt == torch::kDouble) {
    process_rows<double>(x, c, seen_rows, uniforms, drawn);
  } else {
    process_rows<float>(x, c, seen_rows, uniforms, drawn);
  }
  return x;
}

}  // namespace

void SamplingConfig::validate() const {
  auto fail = [](const std::string& field, double value, const std::string& expected) {
    std::ostringstream msg;
    msg << "sampling: " << field << " = " << value << " is invalid: expected " << expected;
    throw std::invalid_argument(msg.str());
  };
  // Greedy decoding ignores the temperature, but a negative or NaN one is a mistake either way; 0 is
  // greedy's own spelling (lckv-generate --temperature 0), so with do_sample it is refused, as in HF.
  if (!(temperature >= 0)) fail("temperature", temperature, ">= 0 (> 0 to sample; greedy ignores it)");
  if (do_sample && temperature == 0) {
    fail("temperature", temperature, "> 0 with do_sample (for greedy decoding turn do_sample off)");
  }
  if (top_k < 0) fail("top_k", static_cast<double>(top_k), ">= 0 (0 disables it)");
  if (!(top_p > 0 && top_p <= 1)) fail("top_p", top_p, "a value in (0, 1]");
  if (!(repetition_penalty > 0)) fail("repetition_penalty", repetition_penalty, "> 0 (1 disables it)");
}

torch::Tensor process_logits(const torch::Tensor& logits, const SamplingConfig& c, const torch::Tensor& seen) {
  return process(logits, c, seen, nullptr, nullptr);
}

torch::Tensor select_next_tokens(const torch::Tensor& logits, const SamplingConfig& c, const torch::Tensor& seen,
                                 at::Generator& generator) {
  if (!c.do_sample) {
    TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "sampling: logits must be [batch, vocab >= 1], got ",
                logits.sizes());
    return process(logits, c, seen, nullptr, nullptr).argmax(-1);
  }
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "sampling: logits must be [batch, vocab >= 1], got ",
              logits.sizes());
  const int64_t B = logits.size(0);
  // One uniform per row, in row order, from the generator (as ATen's uniform_ takes a double: 53 bits).
  std::vector<double> uniforms(B);
  {
    at::CPUGeneratorImpl* gen = at::check_generator<at::CPUGeneratorImpl>(generator);
    std::lock_guard<std::mutex> lock(generator.mutex());
    for (double& u : uniforms) u = static_cast<double>(gen->random64() & ((uint64_t(1) << 53) - 1)) * 0x1p-53;
  }
  torch::Tensor next = torch::empty({B}, torch::kLong);
  int64_t* const nd = next.data_ptr<int64_t>();
  process(logits, c, seen, uniforms.data(), nd);
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(nd[b] >= 0, "sampling: row ", b, " has no token to draw (its logits are all -inf or NaN after ",
                "filtering)");
  }
  return next;
}

}  // namespace lckv
