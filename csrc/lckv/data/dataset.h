// Batches of token windows from shards, for training (shuffled) and validation (in order).
//
// The shards of a split are one token stream: their concatenation in the order given
// (lckv-prepare splits one stream into shards only to bound file size). A window is
// seq_len + 1 consecutive tokens: the first seq_len are the inputs, the last seq_len the
// labels. Windows start every seq_len tokens, so consecutive windows share one token and
// every token after the first is a label exactly once per pass.
//
// TrainLoader: each epoch is a seeded random permutation of the windows, starting at a
// seeded random offset in [0, seq_len) so window boundaries move from epoch to epoch.
// Windows are drawn without replacement; the tail of an epoch too small for a whole
// global batch is skipped. With data parallelism every rank builds the same permutation
// and each global batch of batch_size × world_size windows is cut into rank slices, so
// all ranks share one LoaderState and the sequence of global batches does not depend on
// how it is split across ranks.
//
// SequentialLoader: windows from offset 0 in stream order, rank r taking windows
// r, r + world_size, ...; the last batch may have fewer rows.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "lckv/data/shards.h"

namespace lckv::data {

// Several shards read as one stream of tokens. All must share one vocab_size.
class TokenStream {
 public:
  explicit TokenStream(const std::vector<std::string>& shard_paths);

  int64_t size() const { return size_; }
  int64_t vocab_size() const { return vocab_size_; }
  const std::vector<std::string>& paths() const { return paths_; }
  // Tokens [begin, begin + count) of the stream, across shard boundaries.
  void read(int64_t begin, int64_t count, int32_t* out) const;

 private:
  std::vector<TokenShard> shards_;
  std::vector<int64_t> starts_;  // stream offset of each shard's first token
  std::vector<std::string> paths_;
  int64_t size_ = 0;
  int64_t vocab_size_ = 0;
};

struct LoaderOptions {
  int64_t seq_len = 256;    // T: each row holds T + 1 tokens
  int64_t batch_size = 16;  // rows per rank per batch
  uint64_t seed = 0;        // TrainLoader only
  int rank = 0;
  int world_size = 1;
};

// One batch: `rows` windows, row-major [rows, cols] with cols = seq_len + 1.
// Inputs are tokens[:, :-1], labels tokens[:, 1:].
struct Batch {
  std::vector<int32_t> tokens;
  int64_t rows = 0;
  int64_t cols = 0;
};

// Everything needed to continue a TrainLoader exactly where it stopped. seq_len and
// stream_tokens are recorded so restoring into a loader over other data or another
// window length fails instead of silently changing the sample order.
struct LoaderState {
  uint64_t seed = 0;
  uint64_t epoch = 0;   // completed passes over the data
  uint64_t cursor = 0;  // windows of this epoch's permutation consumed, all ranks together
  int64_t seq_len = 0;
  int64_t stream_tokens = 0;
};
void to_json(nlohmann::json& j, const LoaderState& s);
void from_json(const nlohmann::json& j, LoaderState& s);  // throws naming a missing/mistyped field

class TrainLoader {
 public:
  // Throws if the shards hold fewer than seq_len + 1 tokens, or fewer windows than one
  // global batch (batch_size × world_size).
  TrainLoader(const std::vector<std::string>& shard_paths, const LoaderOptions& options);

  Batch next();
  const LoaderState& state() const { return state_; }
  // Continue from a saved state; its seed replaces options.seed.
  void restore(const LoaderState& state);
  int64_t vocab_size() const { return stream_.vocab_size(); }

 private:
  void start_epoch();  // builds perm_ and offset_ for state_.epoch

  TokenStream stream_;
  LoaderOptions options_;
  LoaderState state_;
  int64_t offset_ = 0;          // this epoch's first window start
  std::vector<uint32_t> perm_;  // this epoch's window order
};

class SequentialLoader {
 public:
  // Throws if the shards hold fewer than seq_len + 1 tokens.
  SequentialLoader(const std::vector<std::string>& shard_paths, const LoaderOptions& options);

  // This rank's next batch in stream order; std::nullopt after the last one.
  std::optional<Batch> next();
  void reset() { next_window_ = 0; }
  int64_t num_windows() const;  // windows this rank visits per pass
  int64_t vocab_size() const { return stream_.vocab_size(); }

 private:
  TokenStream stream_;
  LoaderOptions options_;
  int64_t total_windows_ = 0;  // over all ranks
  int64_t next_window_ = 0;    // index among this rank's windows
};

}  // namespace lckv::data
