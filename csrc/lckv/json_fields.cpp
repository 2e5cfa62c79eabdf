#include "lckv/json_fields.h"

#include "lckv/files.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <vector>

namespace lckv::json_fields {

using nlohmann::json;

namespace {

constexpr std::size_t kMaxDescription = 60;

// nlohmann's messages start with "[json.exception.<kind>.<id>] "; ours name the file instead.
std::string strip_exception_id(const std::string& what) {
  if (what.rfind("[json.exception.", 0) != 0) return what;
  const std::size_t end = what.find("] ");
  return end == std::string::npos ? what : what.substr(end + 2);
}

struct TooDeep {};

// A scalar as JSON text; bytes that are not UTF-8 (possible in a json built in C++) become U+FFFD.
std::string dump(const json& scalar) { return scalar.dump(-1, ' ', false, json::error_handler_t::replace); }

}  // namespace

std::string describe(const json& v) {
  switch (v.type()) {
    case json::value_t::array:
      return v.empty() ? "[]" : "an array of " + std::to_string(v.size()) + (v.size() == 1 ? " element" : " elements");
    case json::value_t::object:
      return v.empty() ? "{}" : "an object of " + std::to_string(v.size()) + (v.size() == 1 ? " field" : " fields");
    case json::value_t::string: {
      const auto& s = v.get_ref<const std::string&>();
      if (s.size() <= kMaxDescription) return dump(v);
      // Cut at a UTF-8 character boundary, so the dump stays valid.
      std::size_t cut = kMaxDescription;
      while (cut > 0 && (static_cast<unsigned char>(s[cut]) & 0xc0) == 0x80) --cut;
      return dump(json(s.substr(0, cut))) + "... (" + std::to_string(s.size()) + " bytes)";
    }
    default:
      return dump(v);  // a scalar: short
  }
}

namespace detail {

// 2^31 - 1 rather than 2147483647 for the limits of the usual types.
std::string bound_text(uint64_t magnitude, bool negative) {
  for (int k : {15, 16, 31, 32, 63, 64}) {
    const uint64_t p = k == 64 ? 0 : uint64_t{1} << k;  // 2^64 wraps to 0: then magnitude + 1 == 0
    if (negative && magnitude == p) return "-2^" + std::to_string(k);
    if (!negative && magnitude + 1 == p) return "2^" + std::to_string(k) + " - 1";
  }
  return (negative ? "-" : "") + std::to_string(magnitude);
}

std::string integer_mismatch(const json& v, int64_t lo, uint64_t hi) {
  const uint64_t lo_magnitude = lo < 0 ? uint64_t{0} - static_cast<uint64_t>(lo) : static_cast<uint64_t>(lo);
  const std::string expected =
      "expected an integer in [" + bound_text(lo_magnitude, lo < 0) + ", " + bound_text(hi, false) + "]";
  if (!v.is_number_integer()) return expected;
  if (v.is_number_unsigned()) return v.get<uint64_t>() <= hi ? "" : expected;
  const int64_t s = v.get<int64_t>();
  const bool fits = s >= lo && (s < 0 || static_cast<uint64_t>(s) <= hi);
  return fits ? "" : expected;
}

std::string field_message(std::string_view where, std::string_view field, const json& v, const std::string& why) {
  return std::string(where) + " field '" + std::string(field) + "' has value " + describe(v) + ", " + why;
}

json parse(std::string_view text, std::string_view source, std::string& error) {
  // The object keys on the way to what the parser is reading, one per depth (arrays leave theirs
  // empty), so an error can name the field.
  std::vector<std::string> keys;
  int depth_now = 0;
  auto field = [&] {
    std::string path;
    for (int d = 0; d < depth_now && d < static_cast<int>(keys.size()); ++d) {
      if (keys[d].empty()) continue;
      if (!path.empty()) path += '.';
      path += keys[d];
    }
    return path.empty() ? std::string() : " in field '" + path + "'";
  };
  const json::parser_callback_t track = [&](int depth, json::parse_event_t event, json& parsed) {
    switch (event) {
      case json::parse_event_t::object_start:
      case json::parse_event_t::array_start:
        depth_now = depth + 1;
        if (depth_now > kMaxDepth) throw TooDeep{};
        break;
      case json::parse_event_t::key:
        depth_now = depth;
        keys.resize(static_cast<std::size_t>(depth));
        keys[depth - 1] = parsed.get<std::string>();
        break;
      case json::parse_event_t::object_end:
      case json::parse_event_t::array_end:
        depth_now = depth;
        break;
      case json::parse_event_t::value:
        break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), track);
  } catch (const TooDeep&) {
    error = std::string(source) + ": JSON nested deeper than " + std::to_string(kMaxDepth) + " levels" + field() +
            " (refused: the files read here need 3)";
  } catch (const json::parse_error& e) {
    error = std::string(source) + ": invalid JSON at byte " + std::to_string(e.byte) + field() + ": " +
            strip_exception_id(e.what());
  } catch (const json::exception& e) {  // e.g. out_of_range 406: a number beyond double's range
    error = std::string(source) + ": invalid JSON" + field() + ": " + strip_exception_id(e.what());
  }
  return nullptr;
}

std::string read_file(const std::string& path, std::string_view source, std::string& error) {
  std::ifstream probe(path, std::ios::binary);
  if (!probe) {
    error = "cannot open " + std::string(source) + ": " + std::strerror(errno);
    return {};
  }
  try {
    return lckv::read_file(path);
  } catch (const FileError& e) {
    error = "cannot read " + std::string(source) + ": " + e.what();
    return {};
  }
}

}  // namespace detail

}  // namespace lckv::json_fields
