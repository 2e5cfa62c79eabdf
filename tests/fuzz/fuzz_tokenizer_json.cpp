// libFuzzer target: tokenizer.json parsing (what Tokenizer::load does with a .json file's bytes) on arbitrary
// bytes, then encoding and decoding a few strings with a tokenizer that loaded. A std::runtime_error is a clean
// refusal; anything else (a crash, a sanitizer report, another exception, an id outside the vocabulary) is a
// finding.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string_view>

#include "lckv/data/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<lckv::data::detail::TokenizerModel> tok;
  try {
    tok = lckv::data::detail::load_tokenizer_json(std::string_view(reinterpret_cast<const char*>(data), size),
                                                  "fuzz.json", "");
  } catch (const std::runtime_error&) {
    return 0;
  }
  for (std::string_view text : {"", "hello world", "<s>a  b\n\t12345 \xc3\xbcn\xc3\xaf \xf0\x9f\x98\x80</s>",
                                "\xff\xfe bad \xe2\x82 utf-8 \xed\xa0\x80"}) {
    try {
      const std::vector<int32_t> ids = tok->encode(text);
      for (int32_t id : ids) {
        if (id < 0 || id >= tok->vocab_size()) std::abort();
      }
      (void)tok->decode(ids);
    } catch (const std::runtime_error&) {  // a regex past PCRE2's match limit
    }
  }
  return 0;
}
