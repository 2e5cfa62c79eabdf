#include "lckv/data/dataset.h"

#include <algorithm>
#include <limits>
#include <stdexcept>

#include "lckv/json_fields.h"

namespace lckv::data {

namespace {

// SplitMix64: a tiny counter-based generator with a fixed definition, so the sample
// order is the same with every compiler and standard library (std::shuffle and the
// std distributions are not).
class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : x_(seed) {}
  uint64_t next() {
    uint64_t z = (x_ += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n), n > 0. Rejects the lowest 2^64 mod n values so the modulo is unbiased.
  uint64_t below(uint64_t n) {
    const uint64_t reject = (0 - n) % n;
    uint64_t r = next();
    while (r < reject) r = next();
    return r % n;
  }

 private:
  uint64_t x_;
};

std::string join_paths(const std::vector<std::string>& paths) {
  std::string out;
  for (const auto& p : paths) out += (out.empty() ? "'" : ", '") + p + "'";
  return out;
}

void check_options(const LoaderOptions& o) {
  auto fail = [](const std::string& what) { throw std::invalid_argument("loader options: " + what); };
  if (o.seq_len < 1) fail("seq_len " + std::to_string(o.seq_len) + ", expected >= 1");
  if (o.batch_size < 1) fail("batch_size " + std::to_string(o.batch_size) + ", expected >= 1");
  if (o.world_size < 1) fail("world_size " + std::to_string(o.world_size) + ", expected >= 1");
  if (o.rank < 0 || o.rank >= o.world_size) {
    fail("rank " + std::to_string(o.rank) + ", expected 0 <= rank < world_size " + std::to_string(o.world_size));
  }
}

void check_enough_tokens(const TokenStream& stream, int64_t seq_len) {
  if (stream.size() < seq_len + 1) {
    throw std::runtime_error("token shards " + join_paths(stream.paths()) + " hold " + std::to_string(stream.size()) +
                             " tokens in total, expected at least seq_len + 1 = " + std::to_string(seq_len + 1));
  }
}

// Windows of seq_len + 1 tokens starting at offset, offset + seq_len, ... that fit in n tokens.
int64_t windows_from(int64_t n, int64_t offset, int64_t seq_len) {
  return n - offset < seq_len + 1 ? 0 : (n - offset - 1) / seq_len;
}

// Epoch offsets are drawn from [0, this): at most seq_len, and small enough that at
// least one window still fits.
int64_t offset_range(int64_t n, int64_t seq_len) { return std::min(seq_len, n - seq_len); }

template <class T>
T state_field(const nlohmann::json& j, const char* key) {
  return json_fields::get_required<T, std::runtime_error>(j, key, "loader state");
}

}  // namespace

TokenStream::TokenStream(const std::vector<std::string>& shard_paths) : paths_(shard_paths) {
  if (shard_paths.empty()) throw std::invalid_argument("token stream: no shard files given");
  for (const auto& path : shard_paths) {
    TokenShard shard = TokenShard::open(path);
    if (!shards_.empty() && shard.vocab_size() != vocab_size_) {
      throw std::runtime_error("token shard '" + path + "' has vocab_size " + std::to_string(shard.vocab_size()) +
                               ", expected " + std::to_string(vocab_size_) + " like '" + shards_.front().path() +
                               "' (shards from different tokenizers)");
    }
    vocab_size_ = shard.vocab_size();
    starts_.push_back(size_);
    size_ += shard.size();
    shards_.push_back(std::move(shard));
  }
}

void TokenStream::read(int64_t begin, int64_t count, int32_t* out) const {
  if (begin < 0 || count < 0 || begin > size_ - count) {
    throw std::out_of_range("token stream: read of " + std::to_string(count) + " tokens at " + std::to_string(begin) +
                            " is outside its " + std::to_string(size_) + " tokens");
  }
  // The last shard starting at or before `begin` (empty shards are skipped by the loop).
  auto s = static_cast<std::size_t>(std::upper_bound(starts_.begin(), starts_.end(), begin) - starts_.begin() - 1);
  while (count > 0) {
    const int64_t local = begin - starts_[s];
    const int64_t n = std::min(count, shards_[s].size() - local);
    shards_[s].read(local, n, out);
    begin += n;
    count -= n;
    out += n;
    ++s;
  }
}

void to_json(nlohmann::json& j, const LoaderState& s) {
  j = nlohmann::json{{"seed", s.seed},
                     {"epoch", s.epoch},
                     {"cursor", s.cursor},
                     {"seq_len", s.seq_len},
                     {"stream_tokens", s.stream_tokens}};
}

void from_json(const nlohmann::json& j, LoaderState& s) {
  if (!j.is_object()) {
    throw std::runtime_error("loader state: expected a JSON object, found " + json_fields::describe(j));
  }
  s.seed = state_field<uint64_t>(j, "seed");
  s.epoch = state_field<uint64_t>(j, "epoch");
  s.cursor = state_field<uint64_t>(j, "cursor");
  s.seq_len = state_field<int64_t>(j, "seq_len");
  s.stream_tokens = state_field<int64_t>(j, "stream_tokens");
}

TrainLoader::TrainLoader(const std::vector<std::string>& shard_paths, const LoaderOptions& options)
    : stream_(shard_paths), options_(options) {
  check_options(options_);
  const int64_t n = stream_.size(), t = options_.seq_len;
  check_enough_tokens(stream_, t);
  if (windows_from(n, 0, t) > int64_t{std::numeric_limits<uint32_t>::max()}) {
    throw std::runtime_error("token shards " + join_paths(stream_.paths()) + " hold more than 2^32 windows of " +
                             std::to_string(t + 1) + " tokens; use a longer seq_len");
  }
  // The largest epoch offset leaves the fewest windows; every epoch must fill a batch.
  const int64_t fewest = windows_from(n, offset_range(n, t) - 1, t);
  const int64_t global_batch = options_.batch_size * options_.world_size;
  if (fewest < global_batch) {
    throw std::runtime_error(
        "token shards " + join_paths(stream_.paths()) + " hold " + std::to_string(n) + " tokens, only " +
        std::to_string(fewest) + " windows of seq_len + 1 = " + std::to_string(t + 1) +
        " tokens, expected at least one global batch of " + std::to_string(global_batch) + " (batch_size " +
        std::to_string(options_.batch_size) + " x world_size " + std::to_string(options_.world_size) + ")");
  }
  state_.seed = options_.seed;
  state_.seq_len = t;
  state_.stream_tokens = n;
  start_epoch();
}

void TrainLoader::start_epoch() {
  const int64_t n = stream_.size(), t = options_.seq_len;
  // One generator per (seed, epoch), so any epoch can be rebuilt on its own when resuming.
  SplitMix64 rng(SplitMix64(state_.seed).next() ^ SplitMix64(state_.epoch).next());
  offset_ = static_cast<int64_t>(rng.below(static_cast<uint64_t>(offset_range(n, t))));
  perm_.resize(static_cast<std::size_t>(windows_from(n, offset_, t)));
  for (std::size_t i = 0; i < perm_.size(); ++i) perm_[i] = static_cast<uint32_t>(i);
  // Fisher-Yates.
  for (std::size_t i = perm_.size(); i > 1; --i) std::swap(perm_[i - 1], perm_[rng.below(i)]);
}

Batch TrainLoader::next() {
  const auto global_batch = static_cast<uint64_t>(options_.batch_size * options_.world_size);
  if (state_.cursor + global_batch > perm_.size()) {
    ++state_.epoch;
    state_.cursor = 0;
    start_epoch();
  }
  const int64_t t = options_.seq_len, cols = t + 1;
  Batch batch{std::vector<int32_t>(static_cast<std::size_t>(options_.batch_size * cols)), options_.batch_size, cols};
  const uint64_t first = state_.cursor + static_cast<uint64_t>(options_.rank * options_.batch_size);
  for (int64_t row = 0; row < options_.batch_size; ++row) {
    const int64_t window = perm_[first + static_cast<uint64_t>(row)];
    stream_.read(offset_ + window * t, cols, batch.tokens.data() + row * cols);
  }
  state_.cursor += global_batch;
  return batch;
}

void TrainLoader::restore(const LoaderState& state) {
  if (state.seq_len != options_.seq_len || state.stream_tokens != stream_.size()) {
    throw std::runtime_error("loader state was saved with seq_len " + std::to_string(state.seq_len) + " over " +
                             std::to_string(state.stream_tokens) + " tokens, but this loader has seq_len " +
                             std::to_string(options_.seq_len) + " over " + std::to_string(stream_.size()) +
                             " tokens (shards " + join_paths(stream_.paths()) + ")");
  }
  const LoaderState previous = state_;
  state_ = state;
  start_epoch();
  if (state_.cursor > perm_.size()) {
    const std::size_t windows = perm_.size();
    state_ = previous;  // leave the loader as it was
    start_epoch();
    throw std::runtime_error("loader state cursor " + std::to_string(state.cursor) + " is past the end of epoch " +
                             std::to_string(state.epoch) + ", which has " + std::to_string(windows) + " windows");
  }
}

SequentialLoader::SequentialLoader(const std::vector<std::string>& shard_paths, const LoaderOptions& options)
    : stream_(shard_paths), options_(options) {
  check_options(options_);
  check_enough_tokens(stream_, options_.seq_len);
  total_windows_ = windows_from(stream_.size(), 0, options_.seq_len);
}

int64_t SequentialLoader::num_windows() const {
  return total_windows_ <= options_.rank
             ? 0
             : (total_windows_ - options_.rank + options_.world_size - 1) / options_.world_size;
}

std::optional<Batch> SequentialLoader::next() {
  const int64_t remaining = num_windows() - next_window_;
  if (remaining <= 0) return std::nullopt;
  const int64_t t = options_.seq_len, cols = t + 1, rows = std::min(options_.batch_size, remaining);
  Batch batch{std::vector<int32_t>(static_cast<std::size_t>(rows * cols)), rows, cols};
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t window = (next_window_ + row) * options_.world_size + options_.rank;
    stream_.read(window * t, cols, batch.tokens.data() + row * cols);
  }
  next_window_ += rows;
  return batch;
}

}  // namespace lckv::data
