// libFuzzer target: the token shard reader on arbitrary bytes (written to a file, since shards are
// memory-mapped). A refusal is std::runtime_error (open) or std::out_of_range (read); anything
// else is a finding. An accepted shard must hold only ids below its vocab_size, and reads outside
// it must be refused.
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "lckv/data/shards.h"

namespace {

std::string scratch_path() {
  const char* dir = std::getenv("TMPDIR");
  return std::string(dir && *dir ? dir : "/tmp") + "/lckv_fuzz_shard_" + std::to_string(::getpid()) + ".bin";
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = scratch_path();
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) std::abort();
  if (size && std::fwrite(data, 1, size, f) != size) std::abort();
  std::fclose(f);
  try {
    const auto shard = lckv::data::TokenShard::open(path);
    std::vector<int64_t> ids(static_cast<std::size_t>(shard.size()));
    shard.read(0, shard.size(), ids.data());
    for (int64_t id : ids) {
      if (id < 0 || id >= shard.vocab_size()) std::abort();
    }
    bool refused = false;
    try {
      int32_t one = 0;
      shard.read(shard.size(), 1, &one);
    } catch (const std::out_of_range&) {
      refused = true;
    }
    if (!refused) std::abort();
  } catch (const std::out_of_range&) {
  } catch (const std::runtime_error&) {
  }
  std::remove(path.c_str());
  return 0;
}
