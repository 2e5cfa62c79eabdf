// Numbers are taken as they are or refused (issue 12 §2): the checked JSON field reads
// (json_fields.h) and what config.json, meta.json and the loader state refuse through them, each
// with a message naming the file, the field and the value. Torch-free.
#include <catch2/catch.hpp>

#include <string>

#include "lckv/config.h"
#include "lckv/data/dataset.h"
#include "lckv/data/prepare.h"
#include "lckv/json_fields.h"
#include "test_files.h"

using namespace lckv;
using Catch::Contains;
using nlohmann::json;

namespace {

// `{"<key>": [[[ ... ]]]}` nested `depth` arrays deep, as text (building it as a json would recurse).
std::string deeply_nested(const std::string& key, int depth) {
  return "{\"" + key + "\": " + std::string(depth, '[') + std::string(depth, ']') + "}";
}

const std::string kBase =
    R"("vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, )"
    R"("num_attention_heads": 4)";

// A config.json text with `field: value` (raw JSON) over the base fields; a duplicate key's last value wins.
std::string config_text(const std::string& field, const std::string& value) {
  return "{" + kBase + ", \"" + field + "\": " + value + "}";
}

}  // namespace

TEST_CASE("json_fields: integers are taken only when they fit the C++ type", "[config][json]") {
  using json_fields::mismatch;
  CHECK(mismatch<int>(json(8)).empty());
  CHECK(mismatch<int>(json(-2147483648LL)).empty());
  CHECK(mismatch<int>(json(8.9)) == "expected an integer in [-2^31, 2^31 - 1]");
  CHECK(mismatch<int>(json(8.0)) == "expected an integer in [-2^31, 2^31 - 1]");  // a float, even if whole
  CHECK_FALSE(mismatch<int>(json("8")).empty());
  CHECK_FALSE(mismatch<int>(json(true)).empty());
  CHECK_FALSE(mismatch<int>(json(nullptr)).empty());
  CHECK_FALSE(mismatch<int>(json(4294967304LL)).empty());  // 2^32 + 8
  CHECK_FALSE(mismatch<int>(json(2147483648LL)).empty());
  CHECK(mismatch<uint32_t>(json(-1)) == "expected an integer in [0, 2^32 - 1]");
  CHECK(mismatch<uint64_t>(json(18446744073709551615ULL)).empty());
  CHECK(mismatch<int64_t>(json(18446744073709551615ULL)) == "expected an integer in [-2^63, 2^63 - 1]");
  CHECK(mismatch<int64_t>(json(9223372036854775807LL)).empty());
  CHECK(mismatch<double>(json(3)).empty());
  CHECK(mismatch<double>(json("3")) == "expected a number");
  CHECK(mismatch<float>(json(1e300)) == "expected a finite number");
  CHECK(mismatch<bool>(json(1)) == "expected true or false");
  CHECK(mismatch<std::string>(json(1)) == "expected a string");

  const json obj = json::parse(R"({"n": 8.9, "big": 4294967304, "ok": 7, "none": null})");
  int n = 3;
  CHECK_THROWS_WITH(json_fields::get_optional(obj, "n", n, "'f.json'"),
                    "'f.json' field 'n' has value 8.9, expected an integer in [-2^31, 2^31 - 1]");
  CHECK_THROWS_WITH(json_fields::get_optional(obj, "big", n, "'f.json'"),
                    Contains("'f.json' field 'big' has value 4294967304"));
  CHECK_FALSE(json_fields::get_optional(obj, "none", n, "'f.json'"));  // null is absent
  CHECK_FALSE(json_fields::get_optional(obj, "absent", n, "'f.json'"));
  CHECK(n == 3);
  CHECK(json_fields::get_optional(obj, "ok", n, "'f.json'"));
  CHECK(n == 7);
  CHECK_THROWS_WITH(json_fields::get_required<int>(obj, "absent", "'f.json'"), "'f.json' field 'absent' is missing");
  CHECK_THROWS_AS((json_fields::get_required<int, ConfigError>(obj, "n", "x")), ConfigError);
}

TEST_CASE("json_fields: descriptions are short and never recurse", "[config][json]") {
  CHECK(json_fields::describe(json(8.9)) == "8.9");
  CHECK(json_fields::describe(json("a")) == "\"a\"");
  CHECK(json_fields::describe(json::array({1, 2})) == "an array of 2 elements");
  CHECK(json_fields::describe(json::object()) == "{}");
  const std::string described = json_fields::describe(json(std::string(10000, 'x')));
  CHECK(described.size() < 100);
  CHECK_THAT(described, Contains("10000 bytes"));
  // A cut never splits a UTF-8 character (byte 60 is inside the first euro sign).
  std::string euros = std::string(59, 'x');
  for (int i = 0; i < 10; ++i) euros += "\xe2\x82\xac";
  CHECK(json_fields::describe(json(euros)) == "\"" + std::string(59, 'x') + "\"... (89 bytes)");
  // Invalid UTF-8 (possible in a json built in C++, not in a parsed one) is replaced, not thrown on.
  CHECK(json_fields::describe(json(std::string("a\xff"))) == "\"a\xef\xbf\xbd\"");
}

TEST_CASE("json_fields: parse errors name the source, byte and field, deep nesting is refused", "[config][json]") {
  CHECK_THROWS_WITH(json_fields::parse("{\"a\": 1,}", "run file 'r.json'"),
                    Contains("run file 'r.json': invalid JSON at byte 9") && !Contains("[json.exception"));
  CHECK_THROWS_WITH(json_fields::parse(R"({"rope_scaling": {"factor": 1e999}})", "config"),
                    Contains("config: invalid JSON in field 'rope_scaling.factor'") && Contains("1e999") &&
                        !Contains("[json.exception"));
  CHECK_THROWS_WITH(json_fields::parse(R"({"a": {"b": 1}, "eos": [1, 1e999]})", "x"),
                    Contains("in field 'eos'"));
  // 100000 levels would overflow the stack on a copy, comparison or dump; they are refused while parsing.
  CHECK_THROWS_WITH(json_fields::parse(deeply_nested("hidden_size", 100000), "config file 'c.json'"),
                    Contains("config file 'c.json': JSON nested deeper than 64 levels in field 'hidden_size'"));
  CHECK_NOTHROW(json_fields::parse(deeply_nested("x", json_fields::kMaxDepth - 1), "x"));
  CHECK_THROWS(json_fields::parse(deeply_nested("x", json_fields::kMaxDepth), "x"));
  CHECK_THROWS_WITH(json_fields::parse_file("/nonexistent/r.json", "run file"),
                    Contains("cannot open run file '/nonexistent/r.json'"));
}

TEST_CASE("config.json: integer fields refuse non-integers and values outside their type", "[config][json]") {
  const testing::TempDir tmp;
  const std::string path = tmp / "config.json";
  auto load = [&](const std::string& text) {
    testing::write_bytes(path, text);
    return LCKVConfig::from_file(path);
  };
  REQUIRE_NOTHROW(load("{" + kBase + "}"));
  struct Case {
    std::string field, value, message;
  };
  const std::vector<Case> cases = {
      {"hidden_size", "64.9", "field 'hidden_size' has value 64.9, expected an integer"},
      {"hidden_size", "\"64\"", "field 'hidden_size' has value \"64\", expected an integer"},
      {"hidden_size", "true", "field 'hidden_size' has value true"},
      {"num_hidden_layers", "4294967300", "field 'num_hidden_layers' has value 4294967300, expected an integer in [-2^31, 2^31 - 1]"},
      {"num_attention_heads", "-4294967292", "field 'num_attention_heads' has value -4294967292"},
      {"vocab_size", "18446744073709551615", "field 'vocab_size' has value 18446744073709551615"},
      {"forward_passes", "2.5", "field 'forward_passes' has value 2.5"},
      {"backward_passes", "4294967298", "field 'backward_passes' has value 4294967298"},
      {"sliding_window", "[1]", "field 'sliding_window' has value an array of 1 element"},
      {"eos_token_id", "[\"a\"]", "field 'eos_token_id[0]' has value \"a\", expected an integer"},
      {"eos_token_id", "[2, 3.5]", "field 'eos_token_id[1]' has value 3.5"},
      {"eos_token_id", "[]", "field 'eos_token_id' is an empty list"},
      {"pad_token_id", "0.5", "field 'pad_token_id' has value 0.5"},
      {"rms_norm_eps", "\"1e-6\"", "field 'rms_norm_eps' has value \"1e-6\", expected a number"},
      {"tie_word_embeddings", "1", "field 'tie_word_embeddings' has value 1, expected true or false"},
      {"hidden_act", "7", "field 'hidden_act' has value 7, expected a string"},
      {"rope_scaling", "{\"rope_type\": \"linear\", \"factor\": \"2\"}", "field 'rope_scaling.factor' has value \"2\""},
      {"rope_scaling", "{\"rope_type\": 3}", "field 'rope_scaling.rope_type' has value 3"},
      {"rope_scaling", "[1, 2]", "field 'rope_scaling' has value an array of 2 elements, expected an object"},
      {"layer_types", "[[\"0\"], 1, 2, 3]",
       "field 'layer_types[0]' has value an array of 1 element, expected a string"},
      {"layer_types", "{\"0\": 1}", "'layer_types' must be a string like \"0_6_6_7\" or a list of attention kinds"},
      {"rope_theta", "1e999", "invalid JSON in field 'rope_theta'"},
      {"vocab_size", "1e999", "invalid JSON in field 'vocab_size'"},
  };
  for (const Case& c : cases) {
    INFO(c.field << ": " << c.value);
    CHECK_THROWS_WITH(load(config_text(c.field, c.value)), Contains(path) && Contains(c.message));
    CHECK_THROWS_AS(load(config_text(c.field, c.value)), ConfigError);
  }
  // A deeply nested value in a known field: refused (it segfaulted building the message).
  testing::write_bytes(path, deeply_nested("hidden_size", 100000));
  CHECK_THROWS_WITH(LCKVConfig::from_file(path), Contains(path) && Contains("nested deeper than 64 levels") &&
                                                     Contains("hidden_size"));
  CHECK_THROWS_WITH(LCKVConfig::from_json_text(deeply_nested("eos_token_id", 5000)),
                    Contains("config: JSON nested deeper"));
  // A value nested within the limit but of the wrong type is described, not dumped.
  CHECK_THROWS_WITH(LCKVConfig::from_json_text(config_text("hidden_size", "[[[[[[[[[[1]]]]]]]]]]")),
                    Contains("'hidden_size' has value an array of 1 element"));
}

TEST_CASE("config.json: iteration counts and model sizes have documented bounds", "[config][json]") {
  auto with = [](const std::string& field, const std::string& value) {
    return LCKVConfig::from_json_text(config_text(field, value));
  };
  CHECK(with("forward_passes", std::to_string(kMaxPasses)).forward_passes == kMaxPasses);
  CHECK_THROWS_WITH(with("forward_passes", "1000000000"),
                    Contains("'forward_passes' = 1000000000, expected >= 0 and <= 1000000"));
  CHECK_THROWS_WITH(with("backward_passes", "2147483647"),
                    Contains("'backward_passes' = 2147483647, expected >= 1 and <= 1000000"));
  CHECK_THROWS_WITH(with("num_hidden_layers", "1000000000"), Contains("'num_hidden_layers' = 1000000000"));
  CHECK_THROWS_WITH(with("max_position_embeddings", "0"), Contains("'max_position_embeddings' = 0"));

  // Sizes are refused before anything is allocated, with the parameter and byte counts.
  // vocab 1e12 x hidden 64, twice (embeddings and LM head) + the layers.
  const int64_t layers = 4 * (2 * 64 * 64 + 3 * 64 * 128 + 2 * 64 + 2 * 64 * 64);
  const int64_t big_vocab = 2 * int64_t{1'000'000'000'000} * 64 + layers + 64;
  CHECK_THROWS_WITH(with("vocab_size", "1000000000000"),
                    Contains("config describes a model of " + std::to_string(big_vocab) + " parameters (" +
                             std::to_string(4 * big_vocab) + " bytes in float32)") &&
                        Contains("vocab_size 1000000000000") && Contains("limit of 2^40"));
  CHECK_THROWS_WITH(with("hidden_size", "1000000000"), Contains("parameters") && Contains("hidden_size 1000000000"));
  // 9.2e18 x 9.2e18 overflows int64: the count is not printed, the rule is.
  CHECK_THROWS_WITH(LCKVConfig::from_json_text(R"({"vocab_size": 9223372036854775807, "hidden_size": 9223372036854775806,
      "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "head_dim": 2})"),
                    Contains("more than 2^63 parameters") && Contains("limit of 2^40"));
  // Just under and over the limit: 2^40 parameters is the last size allowed.
  LCKVConfig c = with("tie_word_embeddings", "true");
  const int64_t rest = c.parameter_count() - c.vocab_size * c.hidden_size;
  c.vocab_size = (kMaxParameters - rest) / c.hidden_size;
  CHECK(c.parameter_count() <= kMaxParameters);
  c.vocab_size += 1;
  CHECK_THROWS_WITH(c.validate(), Contains("more than the limit of 2^40"));
}

TEST_CASE("meta.json: fields are checked, naming the file, field and value", "[data][json]") {
  const testing::TempDir tmp;
  const std::string meta = tmp / "meta.json";
  const std::string good = R"("tokenizer": "tokenizer.model", "train_shards": ["train_000000.bin"], "val_shards": [])";
  auto read = [&](const std::string& text) {
    testing::write_bytes(meta, text);
    return data::read_prepared(tmp.path.string());
  };
  const data::PreparedData ok = read("{" + good + R"(, "vocab_size": 64, "eos_id": 2})");
  CHECK(ok.vocab_size == 64);
  CHECK(ok.eos_id == 2);
  struct Case {
    std::string text, message;
  };
  const std::vector<Case> cases = {
      {good + R"(, "vocab_size": 64.5, "eos_id": 2)", "field 'vocab_size' has value 64.5, expected an integer"},
      {good + R"(, "vocab_size": "64", "eos_id": 2)", "field 'vocab_size' has value \"64\""},
      {good + R"(, "vocab_size": 64, "eos_id": 4294967298)", "field 'eos_id' has value 4294967298, expected an integer in [-2^31, 2^31 - 1]"},
      {good + R"(, "vocab_size": 64, "eos_id": true)", "field 'eos_id' has value true"},
      {good + R"(, "vocab_size": 64, "eos_id": 64)", "field 'eos_id' has value 64, expected a token id in [0, vocab_size = 64)"},
      {good + R"(, "vocab_size": -3, "eos_id": 2)", "field 'vocab_size' has value -3, expected a positive integer"},
      {good + R"(, "vocab_size": 1e999, "eos_id": 2)", "invalid JSON in field 'vocab_size'"},
      {R"("tokenizer": 5, "train_shards": [], "val_shards": [], "vocab_size": 64, "eos_id": 2)", "field 'tokenizer' has value 5, expected a string"},
      {R"("tokenizer": "t", "train_shards": [1], "val_shards": [], "vocab_size": 64, "eos_id": 2)", "field 'train_shards[0]' has value 1, expected a string"},
      {R"("tokenizer": "t", "train_shards": "a.bin", "val_shards": [], "vocab_size": 64, "eos_id": 2)", "field 'train_shards' has value \"a.bin\", expected a list"},
      {R"("tokenizer": "t", "train_shards": [], "vocab_size": 64, "eos_id": 2)", "field 'val_shards' is missing"},
  };
  for (const Case& c : cases) {
    INFO(c.text);
    CHECK_THROWS_WITH(read("{" + c.text + "}"), Contains(meta) && Contains(c.message) && !Contains("[json.exception"));
  }
  CHECK_THROWS_WITH(read(deeply_nested("val_shards", 100000)),
                    Contains(meta) && Contains("nested deeper than 64 levels in field 'val_shards'"));
  CHECK_THROWS_WITH(read("[1, 2]"), Contains(meta) && Contains("expected a JSON object, found an array of 2 elements"));
}

TEST_CASE("loader state: integers outside their type are refused", "[data][json]") {
  auto state = [](const std::string& seq_len) {
    return json::parse(R"({"seed": 1, "epoch": 0, "cursor": 0, "stream_tokens": 5, "seq_len": )" + seq_len + "}")
        .get<data::LoaderState>();
  };
  CHECK(state("16").seq_len == 16);
  CHECK_THROWS_WITH(state("9223372036854775808"),
                    Contains("loader state field 'seq_len' has value 9223372036854775808, expected an integer in [-2^63"));
  CHECK_THROWS_WITH(state("16.5"), Contains("'seq_len' has value 16.5"));
}
