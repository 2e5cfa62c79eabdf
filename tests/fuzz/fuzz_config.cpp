// libFuzzer target: config.json parsing (what LCKVConfig::from_file does) on arbitrary bytes. A
// ConfigError is a clean refusal; anything else (a crash, a sanitizer report, another exception
// such as a raw nlohmann::json one) is a finding. An accepted config must survive to_json ->
// from_json unchanged.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include <nlohmann/json.hpp>

#include "lckv/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    // What LCKVConfig::from_file does with the file's bytes.
    const lckv::LCKVConfig c =
        lckv::LCKVConfig::from_json_text(std::string(reinterpret_cast<const char*>(data), size), "fuzz.json");
    const nlohmann::json once = c.to_json();
    if (lckv::LCKVConfig::from_json(once).to_json() != once) std::abort();
  } catch (const lckv::ConfigError&) {
  }
  return 0;
}
