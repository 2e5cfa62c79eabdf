// Hugging Face tokenizer.json, BPE models: what Llama-family checkpoints ship. Written here because no maintained
// C++ reader of tokenizer.json installs on this project's machines (HF `tokenizers` is Rust, its crates are not
// reachable, and Debian/PyPI package no C++ port); each step below follows the Rust crate's semantics, and
// tests/python/test_tokenizer_json.py checks ids and text against the `tokenizers` package on the whole KJV corpus.
//
// Encoding, as tokenizers::TokenizerImpl::encode does it (without the post-processor: callers add BOS/EOS):
//   1. split the text on added tokens (leftmost-longest; those with normalized=false on the raw text),
//   2. normalize each remaining piece (Prepend, Replace, Sequence), split it again on normalized added tokens,
//   3. pre-tokenize (Split by regex or string, ByteLevel, Metaspace, Sequence),
//   4. BPE on each word: its characters (or byte-fallback <0xXX> tokens, or unk) merged by rank.
// Decoding: ids -> tokens (special ones skipped) -> decoders (ByteLevel, Metaspace, Replace, ByteFallback, Fuse,
// Strip, Sequence). Any other type, or a field value this code does not implement, is refused at load, naming it.
// Regexes run on PCRE2 with Unicode properties (the Rust crate uses Oniguruma; \p{L}, \p{N}, \s agree).
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <queue>
#include <stdexcept>
#include <unordered_map>

#include "lckv/data/tokenizer.h"
#include "lckv/json_fields.h"

namespace lckv::data::detail {

namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------- UTF-8

// Length of the valid UTF-8 sequence starting at s[i], or 0 if it is not one (the maximal invalid prefix is then
// `*bad` bytes long, as Rust's from_utf8_lossy and Python's errors="replace" cut it).
std::size_t utf8_sequence(std::string_view s, std::size_t i, std::size_t* bad) {
  const auto b = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  if (c < 0x80) return 1;
  int n;
  unsigned char lo = 0x80, hi = 0xbf;
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
  } else {
    *bad = 1;
    return 0;
  }
  for (int k = 1; k < n; ++k) {
    if (i + k >= s.size() || b(i + k) < lo || b(i + k) > hi) {
      *bad = k;
      return 0;
    }
    lo = 0x80;
    hi = 0xbf;
  }
  return n;
}

const char kReplacementChar[] = "\xef\xbf\xbd";  // U+FFFD

// `s` with each maximal invalid UTF-8 subsequence replaced by U+FFFD.
std::string utf8_lossy(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (std::size_t i = 0; i < s.size();) {
    std::size_t bad = 0;
    const std::size_t n = utf8_sequence(s, i, &bad);
    if (n) {
      out.append(s.substr(i, n));
      i += n;
    } else {
      out += kReplacementChar;
      i += bad;
    }
  }
  return out;
}

bool valid_utf8(std::string_view s) {
  for (std::size_t i = 0; i < s.size();) {
    std::size_t bad = 0;
    const std::size_t n = utf8_sequence(s, i, &bad);
    if (!n) return false;
    i += n;
  }
  return true;
}

// Length of the character at s[i] of valid UTF-8.
std::size_t char_len(std::string_view s, std::size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  return c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
}

uint32_t code_point(std::string_view s, std::size_t i) {
  const auto b = [&](std::size_t k) { return static_cast<uint32_t>(static_cast<unsigned char>(s[i + k])); };
  switch (char_len(s, i)) {
    case 1:
      return b(0);
    case 2:
      return (b(0) & 0x1f) << 6 | (b(1) & 0x3f);
    case 3:
      return (b(0) & 0x0f) << 12 | (b(1) & 0x3f) << 6 | (b(2) & 0x3f);
    default:
      return (b(0) & 0x07) << 18 | (b(1) & 0x3f) << 12 | (b(2) & 0x3f) << 6 | (b(3) & 0x3f);
  }
}

std::string utf8_encode(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xc0 | cp >> 6);
    s += static_cast<char>(0x80 | (cp & 0x3f));
  } else if (cp < 0x10000) {
    s += static_cast<char>(0xe0 | cp >> 12);
    s += static_cast<char>(0x80 | (cp >> 6 & 0x3f));
    s += static_cast<char>(0x80 | (cp & 0x3f));
  } else {
    s += static_cast<char>(0xf0 | cp >> 18);
    s += static_cast<char>(0x80 | (cp >> 12 & 0x3f));
    s += static_cast<char>(0x80 | (cp >> 6 & 0x3f));
    s += static_cast<char>(0x80 | (cp & 0x3f));
  }
  return s;
}

std::string replace_all(std::string_view s, const std::string& from, const std::string& to) {
  if (from.empty()) return std::string(s);
  std::string out;
  for (std::size_t i = 0;;) {
    const std::size_t j = s.find(from, i);
    if (j == std::string_view::npos) {
      out.append(s.substr(i));
      return out;
    }
    out.append(s.substr(i, j - i));
    out += to;
    i = j + from.size();
  }
}

// GPT-2's reversible map of bytes to printable characters (ByteLevel pre-tokenizer and decoder).
struct ByteLevelMap {
  std::string byte_to_char[256];
  std::unordered_map<uint32_t, unsigned char> char_to_byte;
  ByteLevelMap() {
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      const uint32_t cp = printable ? b : 256 + n++;
      byte_to_char[b] = utf8_encode(cp);
      char_to_byte[cp] = static_cast<unsigned char>(b);
    }
  }
};
const ByteLevelMap& byte_level_map() {
  static const ByteLevelMap map;
  return map;
}

// GPT-2's pre-tokenizer regex (ByteLevel with use_regex).
const char kGpt2Pattern[] = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---------------------------------------------------------------------------------------------- regex

class Regex {
 public:
  Regex(const std::string& pattern, const std::string& where) : pattern_(pattern) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), PCRE2_UTF | PCRE2_UCP, &error,
                          &offset, nullptr);
    if (!code_) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof message);
      throw std::runtime_error(where + " has regex " + json_fields::describe(json(pattern)) +
                               " that does not compile at offset " + std::to_string(offset) + ": " +
                               reinterpret_cast<const char*>(message));
    }
    pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // falls back to the interpreter where JIT is unavailable
  }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;
  ~Regex() { pcre2_code_free(code_); }

  // The matches in `s` (valid UTF-8) as onig's find_iter yields them: an empty match right after the
  // previous match is skipped by moving on one character.
  std::vector<std::pair<std::size_t, std::size_t>> find_all(std::string_view s) const {
    std::vector<std::pair<std::size_t, std::size_t>> found;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    if (!md) throw std::bad_alloc();
    std::size_t from = 0;
    std::optional<std::size_t> last_end;
    while (from <= s.size()) {
      const int rc =
          pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), from, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        pcre2_match_data_free(md);
        PCRE2_UCHAR message[256];
        pcre2_get_error_message(rc, message, sizeof message);
        throw std::runtime_error("tokenizer regex " + json_fields::describe(json(pattern_)) +
                                 " failed: " + reinterpret_cast<const char*>(message));
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const std::size_t start = ov[0], end = ov[1];
      if (start == end && last_end && *last_end == end) {
        if (from >= s.size()) break;
        from += char_len(s, from);
        continue;
      }
      found.emplace_back(start, end);
      from = end;
      last_end = end;
    }
    pcre2_match_data_free(md);
    return found;
  }

 private:
  pcre2_code* code_ = nullptr;
  std::string pattern_;
};

// ---------------------------------------------------------------------------------------------- JSON reads

// Checked reads of the file's fields; messages name the source and the field path ("model.merges[3]").
struct Fields {
  std::string source;

  [[noreturn]] void fail(const std::string& path, const std::string& why) const {
    throw std::runtime_error(source + ": field '" + path + "' " + why);
  }
  const json& at(const json& obj, const std::string& path, const char* key) const {
    const std::string field = path.empty() ? key : path + "." + key;
    if (!obj.is_object()) fail(path, "has value " + json_fields::describe(obj) + ", expected an object");
    const auto it = obj.find(key);
    if (it == obj.end()) fail(field, "is missing");
    return *it;
  }
  const json* find(const json& obj, const char* key) const {
    const auto it = obj.find(key);
    return it == obj.end() || it->is_null() ? nullptr : &*it;
  }
  template <class T>
  T get(const json& v, const std::string& field) const {
    return json_fields::get<T, std::runtime_error>(v, field, source);
  }
  template <class T>
  T req(const json& obj, const std::string& path, const char* key) const {
    return get<T>(at(obj, path, key), path.empty() ? key : path + "." + key);
  }
  template <class T>
  T opt(const json& obj, const std::string& path, const char* key, T fallback) const {
    const json* v = find(obj, key);
    return v ? get<T>(*v, path.empty() ? key : path + "." + key) : fallback;
  }
  // A field whose value must be one we implement (a default-off feature): `allowed` or absent/null.
  void only(const json& obj, const std::string& path, const char* key, const json& allowed,
            const std::string& why) const {
    const json* v = find(obj, key);
    if (v && *v != allowed) {
      fail(path.empty() ? key : path + "." + key,
           "has value " + json_fields::describe(*v) + ", expected " + allowed.dump() + " (" + why + ")");
    }
  }
  std::string type(const json& obj, const std::string& path) const { return req<std::string>(obj, path, "type"); }
  [[noreturn]] void unsupported(const json& obj, const std::string& path, const std::string& supported) const {
    fail(path + ".type", "has value " + json_fields::describe(obj.at("type")) + ", expected one of " + supported +
                             " (the kinds this reader implements)");
  }
  // One character (Metaspace replacement, Strip content).
  std::string single_char(const json& obj, const std::string& path, const char* key) const {
    const std::string s = req<std::string>(obj, path, key);
    if (s.empty() || !valid_utf8(s) || char_len(s, 0) != s.size()) {
      fail(path + "." + key, "has value " + json_fields::describe(json(s)) + ", expected one character");
    }
    return s;
  }
  // A {"String": s} pattern, or {"Regex": r} where `is_regex` is given (set to which it was).
  std::string pattern(const json& obj, const std::string& path, bool* is_regex) const {
    const json& p = at(obj, path, "pattern");
    const std::string field = path + ".pattern";
    if (!p.is_object() || p.size() != 1)
      fail(field, "has value " + json_fields::describe(p) + R"(, expected {"String": ...} or {"Regex": ...})");
    if (p.contains("String")) {
      if (is_regex) *is_regex = false;
      return get<std::string>(p["String"], field + ".String");
    }
    if (p.contains("Regex")) {
      if (!is_regex)
        fail(field, "is a Regex, expected a String pattern (regex patterns are implemented in Split only)");
      *is_regex = true;
      return get<std::string>(p["Regex"], field + ".Regex");
    }
    fail(field, "has value " + json_fields::describe(p) + R"(, expected {"String": ...} or {"Regex": ...})");
  }
};

// ---------------------------------------------------------------------------------------------- pipeline steps

// A piece of text on its way through normalization and pre-tokenization. `first`: it starts at offset 0 of the
// input (Metaspace's prepend_scheme "first" prepends there only).
struct Piece {
  std::string text;
  bool first = false;
};

enum class Prepend { kAlways, kFirst, kNever };

struct Normalizer {
  enum Kind { kPrepend, kReplace } kind;
  std::string a, b;  // Prepend: a = prefix; Replace: a -> b
  void apply(std::string& s) const {
    if (kind == kPrepend) {
      if (!s.empty()) s = a + s;
    } else {
      s = replace_all(s, a, b);
    }
  }
};

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizer {
  enum Kind { kSplit, kByteLevel, kMetaspace } kind;
  // Split (ByteLevel with use_regex: the GPT-2 regex, isolated)
  std::unique_ptr<Regex> regex;
  std::string literal;
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
  // ByteLevel
  bool add_prefix_space = false;
  // Metaspace
  std::string replacement;
  Prepend prepend = Prepend::kAlways;
  bool split = true;
};

// tokenizers' NormalizedString::split: (span, is_match) segments covering `s`, combined by `behavior`, empty
// pieces dropped.
std::vector<std::pair<std::size_t, std::size_t>> split_spans(
    std::string_view s, const std::vector<std::pair<std::size_t, std::size_t>>& matches, SplitBehavior behavior,
    bool invert) {
  struct Seg {
    std::size_t start, end;
    bool match;
  };
  std::vector<Seg> segs;
  if (s.empty()) return {};
  std::size_t prev = 0;
  for (const auto& [start, end] : matches) {
    if (prev != start) segs.push_back({prev, start, false});
    segs.push_back({start, end, true});
    prev = end;
  }
  if (prev != s.size()) segs.push_back({prev, s.size(), false});
  if (invert) {
    for (auto& g : segs) g.match = !g.match;
  }
  std::vector<std::pair<std::size_t, std::size_t>> out;  // (start, end) of kept pieces
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const auto& g : segs) out.emplace_back(g.start, g.end);
      break;
    case SplitBehavior::kRemoved:
      for (const auto& g : segs) {
        if (!g.match) out.emplace_back(g.start, g.end);
      }
      break;
    case SplitBehavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const auto& g : segs) {
        if (g.match && !previous_match && !out.empty()) {
          out.back().second = g.end;
        } else {
          out.emplace_back(g.start, g.end);
        }
        previous_match = g.match;
      }
      break;
    }
    case SplitBehavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto it = segs.rbegin(); it != segs.rend(); ++it) {
        if (it->match && !previous_match && !out.empty()) {
          out.back().first = it->start;
        } else {
          out.emplace_back(it->start, it->end);
        }
        previous_match = it->match;
      }
      std::reverse(out.begin(), out.end());
      break;
    }
    case SplitBehavior::kContiguous: {
      bool previous_match = false;
      for (const auto& g : segs) {
        if (g.match == previous_match && !out.empty()) {
          out.back().second = g.end;
        } else {
          out.emplace_back(g.start, g.end);
        }
        previous_match = g.match;
      }
      break;
    }
  }
  out.erase(std::remove_if(out.begin(), out.end(), [](const auto& p) { return p.first == p.second; }), out.end());
  return out;
}

std::vector<std::pair<std::size_t, std::size_t>> literal_matches(std::string_view s, const std::string& lit) {
  std::vector<std::pair<std::size_t, std::size_t>> found;
  if (lit.empty()) return found;
  for (std::size_t i = s.find(lit); i != std::string_view::npos; i = s.find(lit, i + lit.size())) {
    found.emplace_back(i, i + lit.size());
  }
  return found;
}

void pre_tokenize(const PreTokenizer& p, std::vector<Piece>& pieces) {
  std::vector<Piece> out;
  out.reserve(pieces.size());
  auto emit_spans = [&](const Piece& piece, const std::vector<std::pair<std::size_t, std::size_t>>& spans) {
    for (const auto& [start, end] : spans)
      out.push_back({piece.text.substr(start, end - start), piece.first && start == 0});
  };
  for (Piece& piece : pieces) {
    switch (p.kind) {
      case PreTokenizer::kSplit: {
        const auto matches = p.regex ? p.regex->find_all(piece.text) : literal_matches(piece.text, p.literal);
        emit_spans(piece, split_spans(piece.text, matches, p.behavior, p.invert));
        break;
      }
      case PreTokenizer::kByteLevel: {
        if (p.add_prefix_space && piece.text.rfind(' ', 0) != 0) piece.text.insert(0, " ");
        std::vector<std::pair<std::size_t, std::size_t>> spans;
        if (p.regex) {
          spans = split_spans(piece.text, p.regex->find_all(piece.text), SplitBehavior::kIsolated, false);
        } else if (!piece.text.empty()) {
          spans = {{0, piece.text.size()}};
        }
        const auto& map = byte_level_map();
        for (const auto& [start, end] : spans) {
          Piece q{std::string(), piece.first && start == 0};
          q.text.reserve(2 * (end - start));
          for (std::size_t i = start; i < end; ++i)
            q.text += map.byte_to_char[static_cast<unsigned char>(piece.text[i])];
          out.push_back(std::move(q));
        }
        break;
      }
      case PreTokenizer::kMetaspace: {
        std::string s = replace_all(piece.text, " ", p.replacement);
        const bool starts = s.rfind(p.replacement, 0) == 0;
        if (!starts && (p.prepend == Prepend::kAlways || (p.prepend == Prepend::kFirst && piece.first))) {
          s = p.replacement + s;
        }
        Piece q{std::move(s), piece.first};
        if (p.split) {
          emit_spans(
              q, split_spans(q.text, literal_matches(q.text, p.replacement), SplitBehavior::kMergedWithNext, false));
        } else if (!q.text.empty()) {
          out.push_back(std::move(q));
        }
        break;
      }
    }
  }
  pieces = std::move(out);
}

struct Decoder {
  enum Kind { kByteLevel, kMetaspace, kReplace, kByteFallback, kFuse, kStrip } kind;
  std::string a, b;  // Replace: a -> b; Metaspace: a = replacement; Strip: a = content
  Prepend prepend = Prepend::kAlways;
  std::size_t start = 0, stop = 0;  // Strip
};

// A token "<0xHH>" (byte fallback) as its byte.
std::optional<unsigned char> fallback_byte(const std::string& t) {
  if (t.size() != 6 || t.compare(0, 3, "<0x") != 0 || t[5] != '>') return std::nullopt;
  auto hex = [](char c) {
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
                                  : -1;
  };
  const int hi = hex(t[3]), lo = hex(t[4]);
  if (hi < 0 || lo < 0) return std::nullopt;
  return static_cast<unsigned char>(hi * 16 + lo);
}

void decode_chain(const Decoder& d, std::vector<std::string>& tokens) {
  switch (d.kind) {
    case Decoder::kByteLevel: {
      const auto& map = byte_level_map().char_to_byte;
      std::string bytes;
      for (const std::string& t : tokens) {
        std::string b;
        bool all = true;
        for (std::size_t i = 0; i < t.size() && all; i += char_len(t, i)) {
          const auto it = map.find(code_point(t, i));
          if (it == map.end()) {
            all = false;
          } else {
            b += static_cast<char>(it->second);
          }
        }
        bytes += all ? b : t;
      }
      tokens = {utf8_lossy(bytes)};
      break;
    }
    case Decoder::kMetaspace:
      for (std::size_t i = 0; i < tokens.size(); ++i) {
        std::string s = replace_all(tokens[i], d.a, " ");
        if (i == 0 && d.prepend != Prepend::kNever && s.rfind(' ', 0) == 0) s.erase(0, 1);
        tokens[i] = std::move(s);
      }
      break;
    case Decoder::kReplace:
      for (std::string& t : tokens) t = replace_all(t, d.a, d.b);
      break;
    case Decoder::kByteFallback: {
      std::vector<std::string> out;
      std::string bytes;
      auto flush = [&] {
        if (bytes.empty()) return;
        if (valid_utf8(bytes)) {
          out.push_back(bytes);
        } else {
          for (std::size_t i = 0; i < bytes.size(); ++i) out.emplace_back(kReplacementChar);
        }
        bytes.clear();
      };
      for (std::string& t : tokens) {
        if (const auto byte = fallback_byte(t)) {
          bytes += static_cast<char>(*byte);
        } else {
          flush();
          out.push_back(std::move(t));
        }
      }
      flush();
      tokens = std::move(out);
      break;
    }
    case Decoder::kFuse: {
      std::string all;
      for (const std::string& t : tokens) all += t;
      tokens = {std::move(all)};
      break;
    }
    case Decoder::kStrip:
      for (std::string& t : tokens) {
        std::vector<std::size_t> starts;  // character starts
        for (std::size_t i = 0; i < t.size(); i += char_len(t, i)) starts.push_back(i);
        const std::size_t n = starts.size();
        auto char_at = [&](std::size_t k) {
          return t.substr(starts[k], (k + 1 < n ? starts[k + 1] : t.size()) - starts[k]);
        };
        std::size_t cut_start = 0, cut_stop = n;
        for (std::size_t k = 0; k < std::min(d.start, n) && char_at(k) == d.a; ++k) cut_start = k + 1;
        for (std::size_t k = 0; k < std::min(d.stop, n) && char_at(n - k - 1) == d.a; ++k) cut_stop = n - k - 1;
        if (cut_stop <= cut_start) {
          t.clear();
        } else {
          const std::size_t from = cut_start < n ? starts[cut_start] : t.size();
          const std::size_t to = cut_stop < n ? starts[cut_stop] : t.size();
          t = t.substr(from, to - from);
        }
      }
      break;
  }
}

struct AddedToken {
  std::string content;
  int32_t id;
  bool special, normalized;
  std::string match;  // what is looked for: content, or for a normalized token, content normalized
};

// ---------------------------------------------------------------------------------------------- the tokenizer

class TokenizerJson : public TokenizerModel {
 public:
  TokenizerJson(const json& root, const std::string& source, const std::string& config_dir);

  std::vector<int32_t> encode(std::string_view raw) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int vocab_size() const override { return static_cast<int>(id_to_token_.size()); }
  int bos_id() const override { return bos_; }
  int eos_id() const override { return eos_; }

 private:
  void parse_model(const Fields& f, const json& model);
  void parse_added_tokens(const Fields& f, const json& list);
  void parse_normalizer(const Fields& f, const json& n, const std::string& path);
  void parse_pre_tokenizer(const Fields& f, const json& p, const std::string& path);
  void parse_decoder(const Fields& f, const json& d, const std::string& path);
  void find_bos_eos(const std::string& source, const std::string& config_dir);
  int32_t token_id(const std::string& token) const;

  // Splits `text` on the added tokens of one kind (normalized or not): pieces with id -1 are text.
  void split_added(const std::string& text, bool first, bool normalized,
                   std::vector<std::pair<Piece, int32_t>>& out) const;
  void bpe(const std::string& word, std::vector<int32_t>& out) const;

  std::unordered_map<std::string, int32_t> vocab_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (left, right) -> (rank, merged id)
  std::optional<int32_t> unk_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false;
  int32_t byte_ids_[256];  // "<0xHH>" ids for byte fallback (-1: missing)
  bool all_bytes_ = false;

  std::vector<AddedToken> added_;
  bool any_added_[2] = {false, false};  // [normalized]: any added token of that kind
  std::vector<Normalizer> normalizers_;
  std::vector<PreTokenizer> pre_tokenizers_;
  std::vector<Decoder> decoders_;
  bool has_decoder_ = false;

  std::vector<std::string> id_to_token_;
  std::vector<char> has_token_, special_;
  int bos_ = -1, eos_ = -1;
};

TokenizerJson::TokenizerJson(const json& root, const std::string& source, const std::string& config_dir) {
  const Fields f{source};
  if (!root.is_object()) {
    throw std::runtime_error(source + ": expected a tokenizer.json object, found " + json_fields::describe(root));
  }
  parse_model(f, f.at(root, "", "model"));
  if (const json* a = f.find(root, "added_tokens")) parse_added_tokens(f, *a);
  if (const json* n = f.find(root, "normalizer")) parse_normalizer(f, *n, "normalizer");
  if (const json* p = f.find(root, "pre_tokenizer")) parse_pre_tokenizer(f, *p, "pre_tokenizer");
  // Normalized added tokens are found in normalized text, so they are looked for as normalized.
  for (AddedToken& t : added_) {
    t.match = t.content;
    if (t.normalized) {
      for (const Normalizer& n : normalizers_) n.apply(t.match);
    }
  }
  // Longest first: at each position the longest added token that matches wins (leftmost-longest).
  std::stable_sort(added_.begin(), added_.end(),
                   [](const AddedToken& x, const AddedToken& y) { return x.match.size() > y.match.size(); });

  if (const json* d = f.find(root, "decoder")) {
    has_decoder_ = true;
    parse_decoder(f, *d, "decoder");
  }
  // truncation and padding change what encode returns; the post-processor only adds special tokens (callers add
  // BOS/EOS themselves), so it is not read.
  f.only(root, "", "truncation", nullptr, "encode never truncates");
  f.only(root, "", "padding", nullptr, "encode never pads");

  int32_t max_id = -1;
  for (const auto& [token, id] : vocab_) max_id = std::max(max_id, id);
  for (const AddedToken& t : added_) max_id = std::max(max_id, t.id);
  // Ids index a table (and a model's embedding): a huge one is a broken file, not a 2^31-row vocabulary.
  constexpr int32_t kMaxId = 1 << 24;
  if (max_id >= kMaxId) {
    throw std::runtime_error(source + ": token id " + std::to_string(max_id) + " in model.vocab or added_tokens, " +
                             "expected ids below 2^24");
  }
  id_to_token_.assign(max_id + 1, std::string());
  has_token_.assign(max_id + 1, 0);
  special_.assign(max_id + 1, 0);
  for (const auto& [token, id] : vocab_) {
    if (has_token_[id]) {
      throw std::runtime_error(source + ": field 'model.vocab' gives id " + std::to_string(id) + " to both " +
                               json_fields::describe(json(id_to_token_[id])) + " and " +
                               json_fields::describe(json(token)) + ", expected one token per id");
    }
    id_to_token_[id] = token;
    has_token_[id] = 1;
  }
  for (const AddedToken& t : added_) {
    id_to_token_[t.id] = t.match;  // as the Rust crate: a normalized token decodes as its normalized form
    has_token_[t.id] = 1;
    special_[t.id] = t.special;
  }
  find_bos_eos(source, config_dir);
}

void TokenizerJson::parse_model(const Fields& f, const json& model) {
  const std::string type = f.type(model, "model");
  if (type != "BPE") f.unsupported(model, "model", "\"BPE\"");
  f.only(model, "model", "dropout", nullptr, "BPE dropout makes encoding random");
  f.only(model, "model", "continuing_subword_prefix", nullptr, "Llama-family BPE has none");
  f.only(model, "model", "end_of_word_suffix", nullptr, "Llama-family BPE has none");
  fuse_unk_ = f.opt<bool>(model, "model", "fuse_unk", false);
  byte_fallback_ = f.opt<bool>(model, "model", "byte_fallback", false);
  ignore_merges_ = f.opt<bool>(model, "model", "ignore_merges", false);

  const json& vocab = f.at(model, "model", "vocab");
  if (!vocab.is_object())
    f.fail("model.vocab", "has value " + json_fields::describe(vocab) + ", expected an object token -> id");
  vocab_.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const std::string field =
        "model.vocab[" + json(it.key()).dump(-1, ' ', false, json::error_handler_t::replace) + "]";
    const int32_t id = f.get<int32_t>(it.value(), field);
    if (id < 0) f.fail(field, "has value " + std::to_string(id) + ", expected an id >= 0");
    if (!valid_utf8(it.key())) f.fail(field, "is not valid UTF-8");
    vocab_.emplace(it.key(), id);
  }
  if (const json* unk = f.find(model, "unk_token")) {
    const std::string u = f.get<std::string>(*unk, "model.unk_token");
    const auto it = vocab_.find(u);
    if (it == vocab_.end())
      f.fail("model.unk_token", "has value " + json_fields::describe(*unk) + ", which is not in model.vocab");
    unk_ = it->second;
  }
  all_bytes_ = true;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    const auto it = vocab_.find(name);
    byte_ids_[b] = it == vocab_.end() ? -1 : it->second;
    all_bytes_ = all_bytes_ && it != vocab_.end();
  }

  const json& merges = f.at(model, "model", "merges");
  if (!merges.is_array()) f.fail("model.merges", "has value " + json_fields::describe(merges) + ", expected a list");
  merges_.reserve(merges.size());
  for (std::size_t i = 0; i < merges.size(); ++i) {
    const std::string field = "model.merges[" + std::to_string(i) + "]";
    const json& m = merges[i];
    std::string left, right;
    if (m.is_string()) {  // "left right", the format before tokenizers 0.20
      const std::string& s = m.get_ref<const std::string&>();
      const std::size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        f.fail(field, "has value " + json_fields::describe(m) + ", expected two tokens separated by one space");
      }
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2) {
      left = f.get<std::string>(m[0], field + "[0]");
      right = f.get<std::string>(m[1], field + "[1]");
    } else {
      f.fail(field, "has value " + json_fields::describe(m) + R"(, expected "left right" or ["left", "right"])");
    }
    auto id_of = [&](const std::string& token, const char* what) {
      const auto it = vocab_.find(token);
      if (it == vocab_.end()) {
        f.fail(field, "merges " + json_fields::describe(m) + ": its " + what + " token " +
                          json_fields::describe(json(token)) + " is not in model.vocab");
      }
      return it->second;
    };
    const int32_t a = id_of(left, "first"), b = id_of(right, "second"), merged = id_of(left + right, "merged");
    // A repeated merge keeps its last rank, as the Rust crate's map does.
    merges_[static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32 | static_cast<uint32_t>(b)] = {
        static_cast<int32_t>(i), merged};
  }
}

void TokenizerJson::parse_added_tokens(const Fields& f, const json& list) {
  if (!list.is_array()) f.fail("added_tokens", "has value " + json_fields::describe(list) + ", expected a list");
  for (std::size_t i = 0; i < list.size(); ++i) {
    const std::string path = "added_tokens[" + std::to_string(i) + "]";
    const json& t = list[i];
    AddedToken a;
    (void)f.req<int32_t>(t, path, "id");  // checked, but see below
    a.content = f.req<std::string>(t, path, "content");
    if (a.content.empty() || !valid_utf8(a.content)) f.fail(path + ".content", "is empty or not UTF-8");
    a.special = f.opt<bool>(t, path, "special", false);
    a.normalized = f.opt<bool>(t, path, "normalized", !a.special);
    for (const char* flag : {"single_word", "lstrip", "rstrip"}) {
      f.only(t, path, flag, false, "Llama-family added tokens match exactly");
    }
    any_added_[a.normalized] = true;
    // The id is the one the Rust crate gives when it loads the file (it re-adds each token and only warns about a
    // different "id"): the token's id in model.vocab, the id of the same content added before, else the next one
    // after model.vocab's size and the added ids.
    const auto same =
        std::find_if(added_.begin(), added_.end(), [&](const AddedToken& x) { return x.content == a.content; });
    if (same != added_.end()) {
      a.id = same->id;
      *same = std::move(a);
      continue;
    }
    const auto in_vocab = vocab_.find(a.content);
    if (in_vocab != vocab_.end()) {
      a.id = in_vocab->second;
    } else {
      const int32_t model_size = static_cast<int32_t>(vocab_.size());
      int32_t max_added = -1;
      for (const AddedToken& x : added_) max_added = std::max(max_added, x.id);
      a.id = max_added < 0 ? model_size : max_added >= model_size || model_size == 0 ? max_added + 1 : model_size;
    }
    added_.push_back(std::move(a));
  }
}

void TokenizerJson::parse_normalizer(const Fields& f, const json& n, const std::string& path) {
  const std::string type = f.type(n, path);
  if (type == "Sequence") {
    const json& list = f.at(n, path, "normalizers");
    if (!list.is_array())
      f.fail(path + ".normalizers", "has value " + json_fields::describe(list) + ", expected a list");
    for (std::size_t i = 0; i < list.size(); ++i)
      parse_normalizer(f, list[i], path + ".normalizers[" + std::to_string(i) + "]");
  } else if (type == "Prepend") {
    normalizers_.push_back({Normalizer::kPrepend, f.req<std::string>(n, path, "prepend"), ""});
  } else if (type == "Replace") {
    const std::string from = f.pattern(n, path, nullptr);
    normalizers_.push_back({Normalizer::kReplace, from, f.req<std::string>(n, path, "content")});
  } else {
    f.unsupported(n, path, "\"Sequence\", \"Prepend\", \"Replace\"");
  }
}

Prepend prepend_scheme(const Fields& f, const json& obj, const std::string& path) {
  if (const json* s = f.find(obj, "prepend_scheme")) {
    const std::string v = f.get<std::string>(*s, path + ".prepend_scheme");
    if (v == "always") return Prepend::kAlways;
    if (v == "first") return Prepend::kFirst;
    if (v == "never") return Prepend::kNever;
    f.fail(path + ".prepend_scheme",
           "has value " + json_fields::describe(*s) + R"(, expected "always", "first" or "never")");
  }
  // Files before tokenizers 0.14 have add_prefix_space instead.
  return f.opt<bool>(obj, path, "add_prefix_space", true) ? Prepend::kAlways : Prepend::kNever;
}

void TokenizerJson::parse_pre_tokenizer(const Fields& f, const json& p, const std::string& path) {
  const std::string type = f.type(p, path);
  if (type == "Sequence") {
    const json& list = f.at(p, path, "pretokenizers");
    if (!list.is_array())
      f.fail(path + ".pretokenizers", "has value " + json_fields::describe(list) + ", expected a list");
    for (std::size_t i = 0; i < list.size(); ++i) {
      parse_pre_tokenizer(f, list[i], path + ".pretokenizers[" + std::to_string(i) + "]");
    }
    return;
  }
  PreTokenizer t;
  if (type == "Split") {
    t.kind = PreTokenizer::kSplit;
    bool is_regex = false;
    const std::string pattern = f.pattern(p, path, &is_regex);
    if (is_regex) {
      t.regex = std::make_unique<Regex>(pattern, f.source + ": field '" + path + ".pattern.Regex'");
    } else {
      t.literal = pattern;
    }
    const std::string b = f.req<std::string>(p, path, "behavior");
    if (b == "Removed") {
      t.behavior = SplitBehavior::kRemoved;
    } else if (b == "Isolated") {
      t.behavior = SplitBehavior::kIsolated;
    } else if (b == "MergedWithPrevious") {
      t.behavior = SplitBehavior::kMergedWithPrevious;
    } else if (b == "MergedWithNext") {
      t.behavior = SplitBehavior::kMergedWithNext;
    } else if (b == "Contiguous") {
      t.behavior = SplitBehavior::kContiguous;
    } else {
      f.fail(path + ".behavior",
             "has value " + json_fields::describe(json(b)) +
                 R"(, expected "Removed", "Isolated", "MergedWithPrevious", "MergedWithNext" or "Contiguous")");
    }
    t.invert = f.opt<bool>(p, path, "invert", false);
  } else if (type == "ByteLevel") {
    t.kind = PreTokenizer::kByteLevel;
    t.add_prefix_space = f.opt<bool>(p, path, "add_prefix_space", true);
    if (f.opt<bool>(p, path, "use_regex", true)) t.regex = std::make_unique<Regex>(kGpt2Pattern, "the GPT-2 regex");
  } else if (type == "Metaspace") {
    t.kind = PreTokenizer::kMetaspace;
    t.replacement = f.single_char(p, path, "replacement");
    t.prepend = prepend_scheme(f, p, path);
    t.split = f.opt<bool>(p, path, "split", true);
  } else {
    f.unsupported(p, path, "\"Sequence\", \"Split\", \"ByteLevel\", \"Metaspace\"");
  }
  pre_tokenizers_.push_back(std::move(t));
}

void TokenizerJson::parse_decoder(const Fields& f, const json& d, const std::string& path) {
  const std::string type = f.type(d, path);
  Decoder t;
  if (type == "Sequence") {
    const json& list = f.at(d, path, "decoders");
    if (!list.is_array()) f.fail(path + ".decoders", "has value " + json_fields::describe(list) + ", expected a list");
    for (std::size_t i = 0; i < list.size(); ++i)
      parse_decoder(f, list[i], path + ".decoders[" + std::to_string(i) + "]");
    return;
  } else if (type == "ByteLevel") {
    t.kind = Decoder::kByteLevel;
  } else if (type == "Metaspace") {
    t.kind = Decoder::kMetaspace;
    t.a = f.single_char(d, path, "replacement");
    t.prepend = prepend_scheme(f, d, path);
  } else if (type == "Replace") {
    t.kind = Decoder::kReplace;
    t.a = f.pattern(d, path, nullptr);
    t.b = f.req<std::string>(d, path, "content");
  } else if (type == "ByteFallback") {
    t.kind = Decoder::kByteFallback;
  } else if (type == "Fuse") {
    t.kind = Decoder::kFuse;
  } else if (type == "Strip") {
    t.kind = Decoder::kStrip;
    t.a = f.single_char(d, path, "content");
    t.start = f.req<uint32_t>(d, path, "start");
    t.stop = f.req<uint32_t>(d, path, "stop");
  } else {
    f.unsupported(d, path,
                  "\"Sequence\", \"ByteLevel\", \"Metaspace\", \"Replace\", \"ByteFallback\", \"Fuse\", \"Strip\"");
  }
  decoders_.push_back(std::move(t));
}

int32_t TokenizerJson::token_id(const std::string& token) const {
  for (const AddedToken& t : added_) {
    if (t.content == token) return t.id;
  }
  const auto it = vocab_.find(token);
  return it == vocab_.end() ? -1 : it->second;
}

// BOS and EOS are not in tokenizer.json: transformers keeps them in tokenizer_config.json (bos_token, eos_token,
// a string or {"content": ...}). Without that file, the usual names are looked up.
void TokenizerJson::find_bos_eos(const std::string& source, const std::string& config_dir) {
  const fs::path config = fs::path(config_dir) / "tokenizer_config.json";
  std::error_code ec;
  if (!config_dir.empty() && fs::is_regular_file(config, ec)) {
    const std::string where = "tokenizer config '" + config.string() + "'";
    const json c = json_fields::parse_file<std::runtime_error>(config.string(), "tokenizer config");
    const Fields f{where};
    auto read = [&](const char* key) {
      const json* v = c.is_object() ? f.find(c, key) : nullptr;
      if (!v) return -1;
      const std::string token = v->is_object() ? f.req<std::string>(*v, key, "content") : f.get<std::string>(*v, key);
      const int32_t id = token_id(token);
      if (id < 0)
        f.fail(key, "has value " + json_fields::describe(json(token)) + ", which " + source + " does not hold");
      return static_cast<int>(id);
    };
    bos_ = read("bos_token");
    eos_ = read("eos_token");
    return;
  }
  auto first_of = [&](std::initializer_list<const char*> names) {
    for (const char* n : names) {
      const int32_t id = token_id(n);
      if (id >= 0) return static_cast<int>(id);
    }
    return -1;
  };
  bos_ = first_of({"<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>"});
  eos_ = first_of({"</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"});
}

void TokenizerJson::split_added(const std::string& text, bool first, bool normalized,
                                std::vector<std::pair<Piece, int32_t>>& out) const {
  if (!any_added_[normalized]) {
    if (!text.empty()) out.push_back({{text, first}, -1});
    return;
  }
  std::size_t piece_start = 0;
  for (std::size_t i = 0; i < text.size();) {
    const AddedToken* hit = nullptr;
    for (const AddedToken& t : added_) {  // longest first
      if (t.normalized == normalized && !t.match.empty() && text.compare(i, t.match.size(), t.match) == 0) {
        hit = &t;
        break;
      }
    }
    if (!hit) {
      ++i;
      continue;
    }
    if (i > piece_start) out.push_back({{text.substr(piece_start, i - piece_start), first && piece_start == 0}, -1});
    out.push_back({{hit->match, false}, hit->id});
    i += hit->match.size();
    piece_start = i;
  }
  if (piece_start < text.size()) out.push_back({{text.substr(piece_start), first && piece_start == 0}, -1});
}

std::vector<int32_t> TokenizerJson::encode(std::string_view raw) const {
  const std::string text = utf8_lossy(raw);
  std::vector<std::pair<Piece, int32_t>> pieces, normalized;
  split_added(text, true, false, pieces);
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3);
  std::vector<Piece> words;
  for (auto& [piece, id] : pieces) {
    if (id >= 0) {
      ids.push_back(id);
      continue;
    }
    for (const Normalizer& n : normalizers_) n.apply(piece.text);
    normalized.clear();
    split_added(piece.text, piece.first, true, normalized);
    for (auto& [sub, sub_id] : normalized) {
      if (sub_id >= 0) {
        ids.push_back(sub_id);
        continue;
      }
      words.clear();
      words.push_back(std::move(sub));
      for (const PreTokenizer& p : pre_tokenizers_) pre_tokenize(p, words);
      for (const Piece& w : words) bpe(w.text, ids);
    }
  }
  return ids;
}

// tokenizers' BPE::merge_word + Word::merge_all: characters (or byte-fallback tokens, or unk) as symbols, then
// the lowest-ranked adjacent merge first (leftmost among equal ranks), through a heap with stale entries skipped.
void TokenizerJson::bpe(const std::string& word, std::vector<int32_t>& out) const {
  if (ignore_merges_) {
    const auto it = vocab_.find(word);
    if (it != vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  struct Symbol {
    int32_t id;
    int prev, next;
    bool alive;
  };
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  auto add = [&](int32_t id) {
    const int n = static_cast<int>(sym.size());
    sym.push_back({id, n - 1, n + 1, true});
  };
  std::optional<int32_t> pending_unk;
  std::string ch;
  for (std::size_t i = 0; i < word.size();) {
    const std::size_t len = char_len(word, i);
    ch.assign(word, i, len);
    i += len;
    const auto it = vocab_.find(ch);
    if (it != vocab_.end()) {
      if (pending_unk) add(*pending_unk), pending_unk.reset();
      add(it->second);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (char c : ch) all = all && byte_ids_[static_cast<unsigned char>(c)] >= 0;
      if (all) {
        // The Rust crate leaves a pending unk pending here (it is added before the next known character).
        for (char c : ch) add(byte_ids_[static_cast<unsigned char>(c)]);
        continue;
      }
    }
    if (unk_) {
      if (pending_unk && !fuse_unk_) add(*pending_unk);
      pending_unk = *unk_;
    }
  }
  if (pending_unk) add(*pending_unk);
  if (sym.empty()) return;
  sym.back().next = -1;

  struct Merge {
    int32_t rank;
    int pos;
    int32_t new_id;
  };
  auto later = [](const Merge& x, const Merge& y) { return x.rank != y.rank ? x.rank > y.rank : x.pos > y.pos; };
  std::priority_queue<Merge, std::vector<Merge>, decltype(later)> queue(later);
  auto merge_of = [&](int32_t a, int32_t b) -> const std::pair<int32_t, int32_t>* {
    const auto it = merges_.find(static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32 | static_cast<uint32_t>(b));
    return it == merges_.end() ? nullptr : &it->second;
  };
  for (int i = 0; i + 1 < static_cast<int>(sym.size()); ++i) {
    if (const auto* m = merge_of(sym[i].id, sym[i + 1].id)) queue.push({m->first, i, m->second});
  }
  while (!queue.empty()) {
    const Merge top = queue.top();
    queue.pop();
    Symbol& left = sym[top.pos];
    if (!left.alive || left.next < 0) continue;
    const int right_pos = left.next;
    const Symbol right = sym[right_pos];
    const auto* m = merge_of(left.id, right.id);
    if (!m || m->second != top.new_id) continue;  // a stale entry
    left.id = top.new_id;
    left.next = right.next;
    sym[right_pos].alive = false;
    if (right.next >= 0) sym[right.next].prev = top.pos;
    if (left.prev >= 0) {
      if (const auto* p = merge_of(sym[left.prev].id, left.id)) queue.push({p->first, left.prev, p->second});
    }
    if (left.next >= 0) {
      if (const auto* n = merge_of(left.id, sym[left.next].id)) queue.push({n->first, top.pos, n->second});
    }
  }
  for (const Symbol& s : sym) {
    if (s.alive) out.push_back(s.id);
  }
}

std::string TokenizerJson::decode(const std::vector<int32_t>& ids) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (has_token_[id] && !special_[id]) tokens.push_back(id_to_token_[id]);
  }
  if (!has_decoder_) {
    std::string s;
    for (std::size_t i = 0; i < tokens.size(); ++i) s += (i ? " " : "") + tokens[i];
    return s;
  }
  for (const Decoder& d : decoders_) decode_chain(d, tokens);
  std::string s;
  for (const std::string& t : tokens) s += t;
  return s;
}

}  // namespace

std::unique_ptr<TokenizerModel> load_tokenizer_json(std::string_view text, const std::string& source,
                                                    const std::string& config_dir) {
  const json root = json_fields::parse<std::runtime_error>(text, source);
  return std::make_unique<TokenizerJson>(root, source, config_dir);
}

}  // namespace lckv::data::detail
