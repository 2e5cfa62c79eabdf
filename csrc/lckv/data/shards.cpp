#include "lckv/data/shards.h"

#include "lckv/files.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace lckv::data {

// Tokens are copied between disk and memory without byte swapping.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "token shards assume a little-endian host");

namespace {

constexpr char kMagic[8] = {'L', 'C', 'K', 'V', 'T', 'O', 'K', '\0'};
// Token ids travel as int32_t, so no vocabulary may be larger than this.
constexpr int64_t kMaxVocab = int64_t{std::numeric_limits<int32_t>::max()} + 1;

std::size_t dtype_bytes(TokenDtype dtype) { return dtype == TokenDtype::U16 ? 2 : 4; }

std::runtime_error shard_error(const std::string& path, const std::string& what) {
  return std::runtime_error("token shard '" + path + "': " + what);
}

std::string errno_text() { return std::strerror(errno); }

// The magic as text, with unprintable bytes escaped, for "found X" messages.
std::string escaped(const unsigned char* bytes, std::size_t n) {
  std::string out;
  for (std::size_t i = 0; i < n; ++i) {
    if (bytes[i] >= 0x20 && bytes[i] < 0x7f && bytes[i] != '"' && bytes[i] != '\\') {
      out += static_cast<char>(bytes[i]);
    } else {
      char buf[5];
      std::snprintf(buf, sizeof buf, "\\x%02x", bytes[i]);
      out += buf;
    }
  }
  return out;
}

template <class U>
void write_tokens_as(AtomicFile& file, const std::vector<int32_t>& tokens) {
  // Convert in fixed-size chunks so a large shard never needs a second full-size buffer.
  constexpr std::size_t kChunk = 1 << 20;
  std::vector<U> buf;
  for (std::size_t start = 0; start < tokens.size(); start += kChunk) {
    std::size_t n = std::min(kChunk, tokens.size() - start);
    buf.assign(tokens.begin() + static_cast<std::ptrdiff_t>(start),
               tokens.begin() + static_cast<std::ptrdiff_t>(start + n));
    file.write(buf.data(), n * sizeof(U));
  }
}

}  // namespace

TokenDtype dtype_for_vocab(int64_t vocab_size) { return vocab_size <= 65536 ? TokenDtype::U16 : TokenDtype::U32; }

void write_shard(const std::string& path, const std::vector<int32_t>& tokens, int64_t vocab_size) {
  if (vocab_size < 1 || vocab_size > kMaxVocab) {
    throw shard_error(path, "vocab_size " + std::to_string(vocab_size) + " is out of range, expected 1.." +
                                std::to_string(kMaxVocab));
  }
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab_size) {
      throw shard_error(path, "token at index " + std::to_string(i) + " is id " + std::to_string(tokens[i]) +
                                  ", expected 0 <= id < vocab_size " + std::to_string(vocab_size));
    }
  }
  const TokenDtype dtype = dtype_for_vocab(vocab_size);

  unsigned char header[kShardHeaderBytes] = {};
  const uint32_t version = kShardVersion, dtype_code = static_cast<uint32_t>(dtype);
  const uint64_t count = tokens.size();
  const uint32_t vocab = static_cast<uint32_t>(vocab_size);
  std::memcpy(header, kMagic, 8);
  std::memcpy(header + 8, &version, 4);
  std::memcpy(header + 12, &dtype_code, 4);
  std::memcpy(header + 16, &count, 8);
  std::memcpy(header + 24, &vocab, 4);

  try {
    AtomicFile file(path);
    file.write(header, sizeof header);
    if (dtype == TokenDtype::U16) {
      write_tokens_as<uint16_t>(file, tokens);
    } else {
      write_tokens_as<uint32_t>(file, tokens);
    }
    file.commit();
  } catch (const FileError& e) {
    throw shard_error(path, e.what());
  }
}

TokenShard TokenShard::open(const std::string& path) {
  TokenShard shard;
  shard.path_ = path;

  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw shard_error(path, "cannot open: " + errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    std::string err = errno_text();
    ::close(fd);
    throw shard_error(path, "cannot stat: " + err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw shard_error(path, "not a regular file");
  }
  const auto file_bytes = static_cast<std::size_t>(st.st_size);
  if (file_bytes > 0) {
    shard.map_ = ::mmap(nullptr, file_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
    if (shard.map_ == MAP_FAILED) {
      shard.map_ = nullptr;
      std::string err = errno_text();
      ::close(fd);
      throw shard_error(path, "mmap failed: " + err);
    }
    shard.map_bytes_ = file_bytes;
  }
  ::close(fd);  // the mapping stays valid without the descriptor

  const auto* bytes = static_cast<const unsigned char*>(shard.map_);
  if (file_bytes < sizeof kMagic || std::memcmp(bytes, kMagic, sizeof kMagic) != 0) {
    throw shard_error(path, "not an LCKV token shard: starts with \"" +
                                escaped(bytes, std::min(file_bytes, sizeof kMagic)) + "\", expected \"LCKVTOK\\x00\"");
  }
  if (file_bytes < kShardHeaderBytes) {
    throw shard_error(path, "truncated header: file has " + std::to_string(file_bytes) + " bytes, expected at least " +
                                std::to_string(kShardHeaderBytes));
  }
  uint32_t version = 0, dtype_code = 0, vocab = 0;
  uint64_t count = 0;
  std::memcpy(&version, bytes + 8, 4);
  std::memcpy(&dtype_code, bytes + 12, 4);
  std::memcpy(&count, bytes + 16, 8);
  std::memcpy(&vocab, bytes + 24, 4);
  if (version != kShardVersion) {
    throw shard_error(
        path, "unsupported format version " + std::to_string(version) + ", expected " + std::to_string(kShardVersion));
  }
  if (dtype_code != static_cast<uint32_t>(TokenDtype::U16) && dtype_code != static_cast<uint32_t>(TokenDtype::U32)) {
    throw shard_error(path, "unknown dtype " + std::to_string(dtype_code) + ", expected 1 (uint16) or 2 (uint32)");
  }
  if (vocab < 1 || vocab > kMaxVocab) {
    throw shard_error(
        path, "vocab_size " + std::to_string(vocab) + " is out of range, expected 1.." + std::to_string(kMaxVocab));
  }
  shard.dtype_ = static_cast<TokenDtype>(dtype_code);
  const std::size_t width = dtype_bytes(shard.dtype_);
  const std::size_t payload = file_bytes - kShardHeaderBytes;
  // Compare by division: a corrupt count could overflow count * width.
  if (payload % width != 0 || count != payload / width) {
    throw shard_error(path, "size mismatch (truncated or corrupt): header says " + std::to_string(count) +
                                " tokens of " + std::to_string(width) + " bytes, so expected " +
                                std::to_string(kShardHeaderBytes) + " + " + std::to_string(count) + " x " +
                                std::to_string(width) + " bytes, found " + std::to_string(file_bytes) + " bytes");
  }
  shard.count_ = static_cast<int64_t>(count);
  shard.vocab_size_ = vocab;
  shard.tokens_ = bytes + kShardHeaderBytes;

  // Validate every id once here, so the training loop can trust them without checks.
  auto check_ids = [&](auto const* ids) {
    for (int64_t i = 0; i < shard.count_; ++i) {
      if (ids[i] >= vocab) {
        throw shard_error(path, "token at index " + std::to_string(i) + " is id " + std::to_string(ids[i]) +
                                    ", expected < vocab_size " + std::to_string(vocab));
      }
    }
  };
  if (shard.dtype_ == TokenDtype::U16) {
    if (vocab < 65536) check_ids(reinterpret_cast<const uint16_t*>(shard.tokens_));
  } else {
    check_ids(reinterpret_cast<const uint32_t*>(shard.tokens_));
  }
  return shard;
}

TokenShard::TokenShard(TokenShard&& other) noexcept { *this = std::move(other); }

TokenShard& TokenShard::operator=(TokenShard&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    map_ = other.map_;
    map_bytes_ = other.map_bytes_;
    tokens_ = other.tokens_;
    count_ = other.count_;
    vocab_size_ = other.vocab_size_;
    dtype_ = other.dtype_;
    other.map_ = nullptr;
    other.map_bytes_ = 0;
    other.tokens_ = nullptr;
    other.count_ = 0;
  }
  return *this;
}

TokenShard::~TokenShard() { unmap(); }

void TokenShard::unmap() {
  if (map_ != nullptr) ::munmap(map_, map_bytes_);
  map_ = nullptr;
  map_bytes_ = 0;
}

template <class T>
void TokenShard::read_as(int64_t begin, int64_t count, T* out) const {
  if (begin < 0 || count < 0 || begin > count_ - count) {
    throw std::out_of_range("token shard '" + path_ + "': read of " + std::to_string(count) + " tokens at " +
                            std::to_string(begin) + " is outside its " + std::to_string(count_) + " tokens");
  }
  if (dtype_ == TokenDtype::U16) {
    const auto* ids = reinterpret_cast<const uint16_t*>(tokens_) + begin;
    for (int64_t i = 0; i < count; ++i) out[i] = static_cast<T>(ids[i]);
  } else {
    const auto* ids = reinterpret_cast<const uint32_t*>(tokens_) + begin;
    for (int64_t i = 0; i < count; ++i) out[i] = static_cast<T>(ids[i]);
  }
}

void TokenShard::read(int64_t begin, int64_t count, int32_t* out) const { read_as(begin, count, out); }
void TokenShard::read(int64_t begin, int64_t count, int64_t* out) const { read_as(begin, count, out); }

}  // namespace lckv::data
