// Token shards: flat binary files of token ids, the output of lckv-prepare and the
// input of training.
//
// Layout (all integers little-endian):
//   offset  size  field
//        0     8  magic "LCKVTOK\0"
//        8     4  uint32 version = 1
//       12     4  uint32 dtype: 1 = uint16 tokens, 2 = uint32 tokens
//       16     8  uint64 token count
//       24     4  uint32 vocab_size (every token id is < vocab_size)
//       28    36  zero padding, so the tokens start 64-byte aligned
//       64     …  token count × (2 or 4) bytes
// Writers use uint16 whenever vocab_size <= 65536, which halves the disk and page-cache
// footprint for every tokenizer this project uses (Llama's has 32000 pieces).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace lckv::data {

constexpr std::size_t kShardHeaderBytes = 64;
constexpr uint32_t kShardVersion = 1;

enum class TokenDtype : uint32_t { U16 = 1, U32 = 2 };

// The dtype a writer uses for `vocab_size`.
TokenDtype dtype_for_vocab(int64_t vocab_size);

// Writes `tokens` as a shard at `path`. The file appears atomically: it is written to a
// temporary file in the same directory, flushed to disk, then renamed over `path`, so a
// crash never leaves a half-written shard under the final name. Throws if a token is
// outside [0, vocab_size) or the file cannot be written.
void write_shard(const std::string& path, const std::vector<int32_t>& tokens, int64_t vocab_size);

// A read-only, memory-mapped shard. open() validates the whole file (magic, version,
// dtype, size, every token id < vocab_size), so readers never see a bad id later.
class TokenShard {
 public:
  static TokenShard open(const std::string& path);

  TokenShard(TokenShard&& other) noexcept;
  TokenShard& operator=(TokenShard&& other) noexcept;
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;
  ~TokenShard();

  const std::string& path() const { return path_; }
  int64_t size() const { return count_; }  // number of tokens
  int64_t vocab_size() const { return vocab_size_; }
  TokenDtype dtype() const { return dtype_; }

  // Copies tokens [begin, begin + count) into `out`, widened to the caller's integer type.
  // Throws std::out_of_range if the range is not inside the shard.
  void read(int64_t begin, int64_t count, int32_t* out) const;
  void read(int64_t begin, int64_t count, int64_t* out) const;

 private:
  TokenShard() = default;
  template <class T>
  void read_as(int64_t begin, int64_t count, T* out) const;
  void unmap();

  std::string path_;
  void* map_ = nullptr;  // whole file, from mmap
  std::size_t map_bytes_ = 0;
  const unsigned char* tokens_ = nullptr;  // map_ + kShardHeaderBytes
  int64_t count_ = 0;
  int64_t vocab_size_ = 0;
  TokenDtype dtype_ = TokenDtype::U16;
};

}  // namespace lckv::data
