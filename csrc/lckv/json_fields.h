// Checked reads of JSON files and fields into C++ types: the one place where config.json, the data's
// meta.json and the trainer's run options turn JSON into numbers, so a value is taken as it is or
// refused with a message naming the file, the field and the value. Torch-free.
//
//   integer types   a JSON integer within the type's range (8.9, "8", true and 2^32 + 8 for an int are refused)
//   floating types  any JSON number that is finite in the type
//   bool            true or false;  std::string  a JSON string
// Messages never dump a whole value (a deeply nested one would recurse): describe() cuts it short.
// Each function takes the exception type to throw (ConfigError, TrainError, ...; default JsonError).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

#include <nlohmann/json.hpp>

namespace lckv::json_fields {

struct JsonError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Deeper nesting is refused while parsing: copying, comparing or dumping a nlohmann::json recurses
// once per level, and our files need 3 levels.
constexpr int kMaxDepth = 64;

// At most about 80 characters describing `v`, computed without recursion: a scalar as JSON text
// (long strings cut with "..."), an array or object by its kind and size.
std::string describe(const nlohmann::json& v);

// Why `v` cannot be stored in a T unchanged, as "expected ..."; empty when it can.
template <class T>
std::string mismatch(const nlohmann::json& v);

namespace detail {
// Parses `text`, refusing nesting deeper than kMaxDepth; returns the error message (naming `source`,
// the byte offset and the field being read) in `error` instead of throwing.
nlohmann::json parse(std::string_view text, std::string_view source, std::string& error);
std::string read_file(const std::string& path, std::string_view source, std::string& error);
std::string integer_mismatch(const nlohmann::json& v, int64_t lo, uint64_t hi);
std::string field_message(std::string_view where, std::string_view field, const nlohmann::json& v,
                          const std::string& why);
}  // namespace detail

template <class T>
std::string mismatch(const nlohmann::json& v) {
  if constexpr (std::is_same_v<T, bool>) {
    return v.is_boolean() ? "" : "expected true or false";
  } else if constexpr (std::is_same_v<T, std::string>) {
    return v.is_string() ? "" : "expected a string";
  } else if constexpr (std::is_integral_v<T>) {
    return detail::integer_mismatch(v, static_cast<int64_t>(std::numeric_limits<T>::min()),
                                    static_cast<uint64_t>(std::numeric_limits<T>::max()));
  } else {
    static_assert(std::is_floating_point_v<T>, "json_fields reads bool, std::string, integer and floating types");
    if (!v.is_number()) return "expected a number";
    const double d = v.get<double>();
    if (!(std::abs(d) <= static_cast<double>(std::numeric_limits<T>::max()))) return "expected a finite number";
    return "";
  }
}

// `v` (the value of `field`, in `where`: e.g. "config", "'run/train.json'") as a T, or Error
// "<where> field '<field>' has value <describe(v)>, expected <what>".
template <class T, class Error = JsonError>
T get(const nlohmann::json& v, std::string_view field, std::string_view where) {
  const std::string why = mismatch<T>(v);
  if (!why.empty()) throw Error(detail::field_message(where, field, v, why));
  return v.get<T>();
}

// obj[key] into `out` when present and not null (returns true); otherwise leaves `out` (returns false).
template <class T, class Error = JsonError>
bool get_optional(const nlohmann::json& obj, std::string_view key, T& out, std::string_view where) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return false;
  out = get<T, Error>(*it, key, where);
  return true;
}

// obj[key], or Error "<where> field '<key>' is missing" when absent or null.
template <class T, class Error = JsonError>
T get_required(const nlohmann::json& obj, std::string_view key, std::string_view where) {
  const auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) {
    throw Error(std::string(where) + " field '" + std::string(key) + "' is missing");
  }
  return get<T, Error>(*it, key, where);
}

// Parses `text` (the contents of `source`, e.g. "config file 'x/config.json'"); Error names the
// source, byte offset and field on invalid JSON, a number out of double's range (1e999) or nesting
// deeper than kMaxDepth. No raw nlohmann message ("[json.exception...]") gets through.
template <class Error = JsonError>
nlohmann::json parse(std::string_view text, std::string_view source) {
  std::string error;
  nlohmann::json j = detail::parse(text, source, error);
  if (!error.empty()) throw Error(error);
  return j;
}

// Reads and parses the file at `path`; `what` names it in messages ("config file", "run file").
template <class Error = JsonError>
nlohmann::json parse_file(const std::string& path, std::string_view what) {
  const std::string source = std::string(what) + " '" + path + "'";
  std::string error;
  const std::string text = detail::read_file(path, source, error);
  if (!error.empty()) throw Error(error);
  return parse<Error>(text, source);
}

}  // namespace lckv::json_fields
