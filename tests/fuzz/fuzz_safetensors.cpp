// libFuzzer target: the safetensors reader on arbitrary bytes. A FormatError is a clean refusal;
// anything else (a crash, a sanitizer report, another exception) is a finding. An accepted file
// must describe what it holds: its tensors' bytes add up to exactly the data section.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "lckv/io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  try {
    const auto tensors = lckv::io::parse_safetensors("fuzz.safetensors", bytes);
    uint64_t header = 0;
    for (int i = 7; i >= 0; --i) header = (header << 8) | data[i];
    uint64_t covered = 0;
    for (const auto& [name, t] : tensors) covered += t.numel() * t.element_size();
    if (covered != size - 8 - header) std::abort();
  } catch (const lckv::io::FormatError&) {
  }
  return 0;
}
