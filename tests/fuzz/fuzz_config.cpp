// libFuzzer target: config.json parsing (what LCKVConfig::from_file does) on arbitrary bytes. A
// ConfigError is a clean refusal; anything else (a crash, a sanitizer report, another exception
// such as a raw nlohmann::json one) is a finding. An accepted config must survive to_json ->
// from_json unchanged.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include <nlohmann/json.hpp>

#include "lckv/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(data, data + size);
  } catch (const nlohmann::json::parse_error&) {
    return 0;  // from_file turns this into a ConfigError naming the file
  }
  try {
    const lckv::LCKVConfig c = lckv::LCKVConfig::from_json(j);
    const nlohmann::json once = c.to_json();
    if (lckv::LCKVConfig::from_json(once).to_json() != once) std::abort();
  } catch (const lckv::ConfigError&) {
  }
  return 0;
}
