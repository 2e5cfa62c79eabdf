// Data pipeline tests: token shards, tokenizer, loaders, corpus preparation.
#include <stdlib.h>

#include <catch2/catch.hpp>

#include "test_files.h"
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "lckv/data/dataset.h"
#include "lckv/data/prepare.h"
#include "lckv/data/shards.h"
#include "lckv/data/tokenizer.h"

namespace fs = std::filesystem;
using namespace lckv::data;
using Catch::Matchers::Contains;
using lckv::testing::TempDir;
using lckv::testing::read_bytes;
using lckv::testing::write_bytes;

namespace {

std::vector<int32_t> read_all(const TokenShard& shard) {
  std::vector<int32_t> out(static_cast<std::size_t>(shard.size()));
  shard.read(0, shard.size(), out.data());
  return out;
}

// Tokens equal to their stream position (vocab 65536 keeps them in uint16 and valid), so
// a window's content says where it came from.
std::vector<std::string> position_shards(const TempDir& dir, const std::vector<int32_t>& sizes) {
  std::vector<std::string> paths;
  int32_t next = 0;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    std::vector<int32_t> tokens(static_cast<std::size_t>(sizes[i]));
    for (auto& t : tokens) t = next++;
    paths.push_back(dir / ("s" + std::to_string(i) + ".bin"));
    write_shard(paths.back(), tokens, 65536);
  }
  return paths;
}

// ~50 KB of made-up sentences over a small alphabet, so a 300-piece vocabulary suffices.
std::string generated_text(int lines) {
  const std::vector<std::string> syllables = {"ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "ba", "gu", "fe"};
  std::mt19937 rng(7);
  std::string text;
  for (int l = 0; l < lines; ++l) {
    const int words = 6 + static_cast<int>(rng() % 8);
    for (int w = 0; w < words; ++w) {
      const int n = 1 + static_cast<int>(rng() % 3);
      for (int s = 0; s < n; ++s) text += syllables[rng() % syllables.size()];
      text += w + 1 < words ? (rng() % 7 == 0 ? ", " : " ") : ".\n";
    }
  }
  return text;
}

// A small trained tokenizer for the tests that need one.
std::string small_tokenizer(const TempDir& dir) {
  const std::string text = dir / "tok_train.txt";
  write_bytes(text, generated_text(1200));
  TokenizerTrainOptions o;
  o.vocab_size = 300;
  train_tokenizer({text}, dir / "tok", o);
  return dir / "tok.model";
}

}  // namespace

// ---------------------------------------------------------------------------- shards

TEST_CASE("shard round trip, uint16 and uint32", "[data]") {
  TempDir dir;
  SECTION("uint16 when vocab <= 65536") {
    const std::vector<int32_t> tokens = {0, 1, 65535, 300, 7};
    write_shard(dir / "a.bin", tokens, 65536);
    const std::string raw = read_bytes(dir / "a.bin");
    REQUIRE(raw.size() == kShardHeaderBytes + 2 * tokens.size());
    CHECK(std::memcmp(raw.data(), "LCKVTOK\0", 8) == 0);
    CHECK(raw[8] == 1);                               // version, little-endian
    CHECK(raw[12] == 1);                              // dtype uint16
    CHECK(raw[16] == 5);                              // count
    CHECK(static_cast<unsigned char>(raw[26]) == 1);  // vocab 65536 = 0x00010000
    CHECK(raw[64] == 0);
    CHECK(static_cast<unsigned char>(raw[68]) == 0xff);  // 65535

    auto shard = TokenShard::open(dir / "a.bin");
    CHECK(shard.dtype() == TokenDtype::U16);
    CHECK(shard.size() == 5);
    CHECK(shard.vocab_size() == 65536);
    CHECK(read_all(shard) == tokens);
    std::vector<int64_t> wide(2);
    shard.read(2, 2, wide.data());
    CHECK(wide == std::vector<int64_t>{65535, 300});
    CHECK_THROWS_AS(shard.read(4, 2, wide.data()), std::out_of_range);
  }
  SECTION("uint32 when vocab > 65536") {
    const std::vector<int32_t> tokens = {0, 65536, 99999, 12};
    write_shard(dir / "b.bin", tokens, 100000);
    CHECK(fs::file_size(dir / "b.bin") == kShardHeaderBytes + 4 * tokens.size());
    auto shard = TokenShard::open(dir / "b.bin");
    CHECK(shard.dtype() == TokenDtype::U32);
    CHECK(read_all(shard) == tokens);
    std::vector<int64_t> wide(4);
    shard.read(0, 4, wide.data());
    CHECK(wide == std::vector<int64_t>{0, 65536, 99999, 12});
  }
  SECTION("empty shard") {
    write_shard(dir / "c.bin", {}, 10);
    CHECK(TokenShard::open(dir / "c.bin").size() == 0);
  }
  SECTION("rewrite replaces the file and leaves no temporary behind") {
    write_shard(dir / "d.bin", {1, 2, 3}, 10);
    write_shard(dir / "d.bin", {4}, 10);
    CHECK(read_all(TokenShard::open(dir / "d.bin")) == std::vector<int32_t>{4});
    CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);
  }
  SECTION("writer rejects ids outside the vocabulary and unwritable paths") {
    CHECK_THROWS_WITH(write_shard(dir / "e.bin", {1, 10}, 10),
                      Contains("e.bin") && Contains("index 1 is id 10") && Contains("vocab_size 10"));
    CHECK_THROWS_WITH(write_shard(dir / "e.bin", {-1}, 10), Contains("id -1"));
    CHECK_FALSE(fs::exists(dir / "e.bin"));
    CHECK_THROWS_WITH(write_shard(dir / "no/such/dir/f.bin", {1}, 10), Contains("no/such/dir/f.bin"));
  }
}

TEST_CASE("bad shards are rejected with the file and the reason", "[data]") {
  TempDir dir;
  const std::string path = dir / "x.bin";
  write_shard(path, {1, 2, 3, 4}, 50);
  std::string raw = read_bytes(path);

  SECTION("truncated") {
    write_bytes(path, raw.substr(0, raw.size() - 1));
    CHECK_THROWS_WITH(TokenShard::open(path),
                      Contains(path) && Contains("header says 4 tokens") && Contains("found 71 bytes"));
    write_bytes(path, raw.substr(0, 20));
    CHECK_THROWS_WITH(TokenShard::open(path), Contains(path) && Contains("truncated header"));
  }
  SECTION("foreign file") {
    write_bytes(path, "hello, world\nthis is text\n");
    CHECK_THROWS_WITH(TokenShard::open(path), Contains(path) && Contains("not an LCKV token shard") &&
                                                  Contains("hello, w") && Contains("expected \"LCKVTOK"));
    write_bytes(path, "");
    CHECK_THROWS_WITH(TokenShard::open(path), Contains("not an LCKV token shard"));
  }
  SECTION("bad magic") {
    raw[0] = 'X';
    write_bytes(path, raw);
    CHECK_THROWS_WITH(TokenShard::open(path), Contains(path) && Contains("not an LCKV token shard"));
  }
  SECTION("unknown version or dtype") {
    std::string bad = raw;
    bad[8] = 2;
    write_bytes(path, bad);
    CHECK_THROWS_WITH(TokenShard::open(path), Contains("unsupported format version 2, expected 1"));
    bad = raw;
    bad[12] = 3;
    write_bytes(path, bad);
    CHECK_THROWS_WITH(TokenShard::open(path), Contains("unknown dtype 3, expected 1 (uint16) or 2 (uint32)"));
  }
  SECTION("token id >= vocab_size") {
    raw[64 + 2 * 2] = 50;  // third token becomes 50 in a vocabulary of 50
    write_bytes(path, raw);
    CHECK_THROWS_WITH(TokenShard::open(path),
                      Contains(path) && Contains("index 2 is id 50") && Contains("expected < vocab_size 50"));
  }
  SECTION("missing file") {
    CHECK_THROWS_WITH(TokenShard::open(dir / "none.bin"), Contains("none.bin") && Contains("cannot open"));
  }
}

// ---------------------------------------------------------------------------- tokenizer

TEST_CASE("tokenizer trains, loads and round-trips text", "[data]") {
  TempDir dir;
  const Tokenizer tok = Tokenizer::load(small_tokenizer(dir));
  CHECK(tok.vocab_size() == 300);
  CHECK(tok.bos_id() == 1);
  CHECK(tok.eos_id() == 2);

  const std::string seen = "kalomi sutari, pode bague.";
  const auto ids = tok.encode(seen);
  CHECK(ids.size() < seen.size());  // merges learned
  CHECK(tok.decode(ids) == seen);
  // Characters never seen in training survive through byte fallback, and the identity
  // normaliser keeps whitespace exactly.
  const std::string unseen = "Zürich  ✓\ttabs\nand newlines";
  CHECK(tok.decode(tok.encode(unseen)) == unseen);
  CHECK_THROWS_WITH(tok.decode({5, 300}), Contains("id 300") && Contains("vocab_size 300"));

  SECTION("unigram") {
    TokenizerTrainOptions o;
    o.vocab_size = 300;
    o.model_type = "unigram";
    train_tokenizer({dir / "tok_train.txt"}, dir / "uni", o);
    const Tokenizer uni = Tokenizer::load(dir / "uni.model");
    CHECK(uni.vocab_size() == 300);
    CHECK(uni.decode(uni.encode(seen)) == seen);
  }
  SECTION("in-memory lines") {
    const std::string text = generated_text(1200);
    std::vector<std::string_view> lines;
    for (std::size_t at = 0, end; (end = text.find('\n', at)) != std::string::npos; at = end + 1) {
      lines.push_back(std::string_view(text).substr(at, end - at));
    }
    TokenizerTrainOptions o;
    o.vocab_size = 300;
    train_tokenizer_from_lines(lines, dir / "mem", o);
    CHECK(Tokenizer::load(dir / "mem.model").encode(seen) == ids);
  }
}

TEST_CASE("tokenizer errors name the file or option", "[data]") {
  TempDir dir;
  CHECK_THROWS_WITH(Tokenizer::load(dir / "missing.model"), Contains("missing.model") && Contains("file not found"));
  write_bytes(dir / "junk.model", "not a model");
  CHECK_THROWS_WITH(Tokenizer::load(dir / "junk.model"),
                    Contains("junk.model") && Contains("not a valid SentencePiece model"));
  TokenizerTrainOptions o;
  o.model_type = "word";
  CHECK_THROWS_WITH(train_tokenizer({dir / "junk.model"}, dir / "t", o), Contains("model_type 'word'"));
  CHECK_THROWS_WITH(train_tokenizer({dir / "nope.txt"}, dir / "t", {}), Contains("nope.txt"));
}

// A tokenizer.json of a tiny BPE: characters a b c, merges "a b" then "ab c", special <s> and </s>. Hand-sized so
// the expected ids follow from the BPE rules (tests/python/test_tokenizer_json.py checks real ones against the
// `tokenizers` package).
std::string tiny_tokenizer_json(const std::string& model_type = "BPE") {
  return nlohmann::json{
      {"version", "1.0"},
      {"added_tokens",
       {{{"id", 5}, {"content", "<s>"}, {"special", true}, {"normalized", false}},
        {{"id", 6}, {"content", "</s>"}, {"special", true}, {"normalized", false}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer", nullptr},
      {"decoder", nullptr},
      {"model",
       {{"type", model_type},
        {"vocab", {{"a", 0}, {"b", 1}, {"c", 2}, {"ab", 3}, {"abc", 4}}},
        {"merges", {"a b", {"ab", "c"}}}}}}
      .dump();
}

TEST_CASE("tokenizer.json: BPE merges by rank (leftmost first), special tokens in text, directories", "[data]") {
  TempDir dir;
  write_bytes(dir / "tokenizer.json", tiny_tokenizer_json());
  const Tokenizer tok = Tokenizer::load(dir / "tokenizer.json");
  CHECK(tok.kind() == "tokenizer.json");
  CHECK(tok.vocab_size() == 7);
  CHECK(tok.bos_id() == 5);  // no tokenizer_config.json: the usual names
  CHECK(tok.eos_id() == 6);
  // "abcab": a b -> ab (rank 0) twice, then ab c -> abc (rank 1).
  CHECK(tok.encode("abcab") == std::vector<int32_t>{4, 3});
  CHECK(tok.encode("ab<s>c</s>") == std::vector<int32_t>{3, 5, 2, 6});
  CHECK(tok.encode("bac") == std::vector<int32_t>{1, 0, 2});  // no merge "b a" or "a c"
  // No decoder: tokens joined with spaces; special tokens skipped.
  CHECK(tok.decode({4, 5, 3}) == "abc ab");
  CHECK_THROWS_WITH(tok.decode({7}), Contains("id 7") && Contains("vocab_size 7"));

  // tokenizer_config.json beside it names BOS/EOS, as transformers writes it.
  write_bytes(dir / "tokenizer_config.json", R"({"bos_token": {"content": "</s>"}, "eos_token": "<s>"})");
  const Tokenizer configured = Tokenizer::load(dir.path.string());  // a directory: finds tokenizer.json
  CHECK(configured.path() == dir / "tokenizer.json");
  CHECK(configured.bos_id() == 6);
  CHECK(configured.eos_id() == 5);

  // copy_tokenizer takes the side files with it; a SentencePiece model is copied as tokenizer.model.
  fs::create_directories(dir / "ckpt");
  CHECK(copy_tokenizer(dir.path.string(), dir / "ckpt") == dir / "ckpt/tokenizer.json");
  CHECK(read_bytes(dir / "ckpt/tokenizer_config.json") == read_bytes(dir / "tokenizer_config.json"));
  CHECK(Tokenizer::load(dir / "ckpt").bos_id() == 6);
  const std::string spm = small_tokenizer(dir);  // tok.model, not tokenizer.model
  fs::create_directories(dir / "ckpt2");
  CHECK(copy_tokenizer(spm, dir / "ckpt2") == dir / "ckpt2/tokenizer.model");
  CHECK(read_bytes(dir / "ckpt2/tokenizer.model") == read_bytes(spm));
  CHECK(find_tokenizer(dir / "ckpt2") == dir / "ckpt2/tokenizer.model");
  CHECK(Tokenizer::load(dir / "ckpt2").kind() == "sentencepiece");
  // Copying onto itself leaves it as it is.
  CHECK(copy_tokenizer(dir / "ckpt2", dir / "ckpt2") == dir / "ckpt2/tokenizer.model");
  CHECK(read_bytes(dir / "ckpt2/tokenizer.model") == read_bytes(spm));
}

TEST_CASE("tokenizer.json and tokenizer lookup errors name the file, directory and field", "[data]") {
  TempDir dir;
  fs::create_directories(dir / "empty");
  CHECK_THROWS_WITH(find_tokenizer(dir / "empty"),
                    Contains(dir / "empty") && Contains("holds no tokenizer") &&
                        Contains("tokenizer.model") && Contains("tokenizer.json"));
  CHECK_THROWS_WITH(Tokenizer::load(dir / "empty"), Contains("holds no tokenizer"));
  CHECK_THROWS_WITH(copy_tokenizer(dir / "empty", dir.path.string()), Contains("holds no tokenizer"));
  CHECK_THROWS_WITH(find_tokenizer(dir / "nope"), Contains("nope") && Contains("no such directory"));

  const std::string good = tiny_tokenizer_json();
  write_bytes(dir / "t.json", good.substr(0, good.size() / 2));
  CHECK_THROWS_WITH(Tokenizer::load(dir / "t.json"), Contains("t.json"));
  write_bytes(dir / "t.json", tiny_tokenizer_json("WordPiece"));
  CHECK_THROWS_WITH(Tokenizer::load(dir / "t.json"),
                    Contains("t.json") && Contains("field 'model.type'") && Contains("\"WordPiece\"") && Contains("BPE"));
  nlohmann::json j = nlohmann::json::parse(good);
  j["model"]["merges"].push_back("ab x");
  write_bytes(dir / "t.json", j.dump());
  CHECK_THROWS_WITH(Tokenizer::load(dir / "t.json"),
                    Contains("field 'model.merges[2]'") && Contains("second token \"x\" is not in model.vocab"));
  j = nlohmann::json::parse(good);
  j["model"]["merges"].push_back("b c");
  write_bytes(dir / "t.json", j.dump());
  CHECK_THROWS_WITH(Tokenizer::load(dir / "t.json"), Contains("merged token \"bc\" is not in model.vocab"));
  j = nlohmann::json::parse(good);
  j["pre_tokenizer"] = {{"type", "Whitespace"}};
  write_bytes(dir / "t.json", j.dump());
  CHECK_THROWS_WITH(Tokenizer::load(dir / "t.json"), Contains("field 'pre_tokenizer.type'") && Contains("Whitespace"));
  j = nlohmann::json::parse(good);
  j["model"]["vocab"]["d"] = 4;
  write_bytes(dir / "t.json", j.dump());
  CHECK_THROWS_WITH(Tokenizer::load(dir / "t.json"), Contains("gives id 4 to both"));
}

// ---------------------------------------------------------------------------- loaders

TEST_CASE("token stream reads across shard boundaries", "[data]") {
  TempDir dir;
  const TokenStream stream(position_shards(dir, {5, 0, 3, 7}));
  CHECK(stream.size() == 15);
  std::vector<int32_t> out(10);
  stream.read(2, 10, out.data());
  CHECK(out == std::vector<int32_t>{2, 3, 4, 5, 6, 7, 8, 9, 10, 11});
  CHECK_THROWS_AS(stream.read(10, 6, out.data()), std::out_of_range);

  write_shard(dir / "other.bin", {1}, 100);
  CHECK_THROWS_WITH(TokenStream({dir / "s0.bin", dir / "other.bin"}),
                    Contains("other.bin") && Contains("vocab_size 100, expected 65536"));
}

TEST_CASE("train loader: windows, determinism, resume", "[data]") {
  TempDir dir;
  const auto shards = position_shards(dir, {700, 400, 901});  // 2001 tokens
  LoaderOptions o;
  o.seq_len = 16;
  o.batch_size = 4;
  o.seed = 42;

  SECTION("each row is seq_len + 1 consecutive tokens; an epoch draws distinct windows on one grid") {
    TrainLoader loader(shards, o);
    std::set<int32_t> starts;
    const int batches_per_epoch = static_cast<int>((2001 - 1) / 16 / 4);  // at least this many fit
    for (int b = 0; b < batches_per_epoch - 1; ++b) {
      const Batch batch = loader.next();
      REQUIRE(batch.rows == 4);
      REQUIRE(batch.cols == 17);
      REQUIRE(batch.tokens.size() == 4 * 17);
      for (int r = 0; r < 4; ++r) {
        const int32_t* row = batch.tokens.data() + r * 17;
        for (int k = 1; k < 17; ++k) REQUIRE(row[k] == row[0] + k);
        starts.insert(row[0]);
      }
    }
    CHECK(starts.size() == static_cast<std::size_t>(4 * (batches_per_epoch - 1)));
    std::set<int32_t> phases;
    for (int32_t s : starts) phases.insert(s % 16);
    CHECK(phases.size() == 1);  // one offset per epoch
    CHECK(loader.state().epoch == 0);
  }
  SECTION("same seed, same batches; another seed, other batches") {
    TrainLoader a(shards, o), b(shards, o);
    auto o2 = o;
    o2.seed = 43;
    TrainLoader c(shards, o2);
    bool differs = false;
    for (int i = 0; i < 70; ++i) {  // crosses epoch boundaries (31 batches per epoch at most)
      const auto ba = a.next();
      REQUIRE(ba.tokens == b.next().tokens);
      differs = differs || ba.tokens != c.next().tokens;
    }
    CHECK(differs);
    CHECK(a.state().epoch == 2);
  }
  SECTION("state through JSON continues identically") {
    TrainLoader a(shards, o);
    for (int i = 0; i < 29; ++i) a.next();
    const std::string saved = nlohmann::json(a.state()).dump();

    TrainLoader b(shards, o);  // fresh loader, as in a restarted process
    b.restore(nlohmann::json::parse(saved).get<LoaderState>());
    for (int i = 0; i < 40; ++i) REQUIRE(a.next().tokens == b.next().tokens);
    CHECK(nlohmann::json(a.state()) == nlohmann::json(b.state()));
  }
  SECTION("ranks split each global batch") {
    auto big = o;
    big.batch_size = 8;
    TrainLoader whole(shards, big);
    auto r0 = o, r1 = o;
    r0.world_size = r1.world_size = 2;
    r1.rank = 1;
    TrainLoader rank0(shards, r0), rank1(shards, r1);
    for (int i = 0; i < 20; ++i) {
      auto joined = rank0.next().tokens;
      const auto second = rank1.next().tokens;
      joined.insert(joined.end(), second.begin(), second.end());
      REQUIRE(joined == whole.next().tokens);
    }
  }
  SECTION("errors") {
    auto long_seq = o;
    long_seq.seq_len = 2001;
    CHECK_THROWS_WITH(TrainLoader(shards, long_seq), Contains("s0.bin") && Contains("hold 2001 tokens in total") &&
                                                         Contains("at least seq_len + 1 = 2002"));
    auto big_batch = o;
    big_batch.batch_size = 200;
    CHECK_THROWS_WITH(TrainLoader(shards, big_batch), Contains("expected at least one global batch of 200"));
    auto bad_rank = o;
    bad_rank.rank = 1;
    CHECK_THROWS_WITH(TrainLoader(shards, bad_rank), Contains("rank 1"));

    TrainLoader loader(shards, o);
    LoaderState state = loader.state();
    state.seq_len = 32;
    CHECK_THROWS_WITH(loader.restore(state), Contains("saved with seq_len 32"));
    state = loader.state();
    state.cursor = 1000;
    CHECK_THROWS_WITH(loader.restore(state), Contains("cursor 1000 is past the end of epoch 0"));
    CHECK_THROWS_WITH(nlohmann::json::parse(R"({"seed": 1, "epoch": 0})").get<LoaderState>(),
                      Contains("field 'cursor' is missing"));
    CHECK_THROWS_WITH(
        nlohmann::json::parse(R"({"seed": 1, "epoch": -1, "cursor": 0, "seq_len": 16, "stream_tokens": 5})")
            .get<LoaderState>(),
        Contains("field 'epoch' has value -1, expected an integer in [0, 2^64 - 1]"));
  }
}

TEST_CASE("sequential loader visits every window in order", "[data]") {
  TempDir dir;
  const auto shards = position_shards(dir, {60, 43});  // 103 tokens: windows at 0, 10, ..., 90
  LoaderOptions o;
  o.seq_len = 10;
  o.batch_size = 4;
  SequentialLoader loader(shards, o);
  CHECK(loader.num_windows() == 10);
  for (int pass = 0; pass < 2; ++pass) {
    std::vector<int32_t> starts;
    while (auto batch = loader.next()) {
      REQUIRE(batch->cols == 11);
      for (int64_t r = 0; r < batch->rows; ++r) {
        const int32_t* row = batch->tokens.data() + r * 11;
        for (int k = 0; k < 11; ++k) REQUIRE(row[k] == row[0] + k);
        starts.push_back(row[0]);
      }
    }
    CHECK(starts == std::vector<int32_t>{0, 10, 20, 30, 40, 50, 60, 70, 80, 90});  // batches of 4, 4, 2
    loader.reset();
  }

  SECTION("ranks take alternate windows") {
    auto r1 = o;
    r1.world_size = 3;
    r1.rank = 1;
    SequentialLoader rank1(shards, r1);
    CHECK(rank1.num_windows() == 3);
    std::vector<int32_t> starts;
    while (auto batch = rank1.next()) {
      for (int64_t r = 0; r < batch->rows; ++r) starts.push_back(batch->tokens[static_cast<std::size_t>(r * 11)]);
    }
    CHECK(starts == std::vector<int32_t>{10, 40, 70});
  }
  SECTION("too few tokens") {
    o.seq_len = 103;
    CHECK_THROWS_WITH(SequentialLoader(shards, o), Contains("hold 103 tokens in total"));
  }
}

// ---------------------------------------------------------------------------- prepare

TEST_CASE("prepare_corpus writes tokenizer, shards and meta.json", "[data]") {
  TempDir dir;
  // 20 paragraphs in a .txt (with CRLF and extra blank lines) and 5 JSONL records.
  const std::string text = generated_text(60);
  std::string txt;
  std::vector<std::string> expected_docs;
  for (int p = 0; p < 20; ++p) {
    std::string para = text.substr(static_cast<std::size_t>(p) * 150, 100);
    para = para.substr(0, para.find_last_not_of(" \n") + 1);
    for (auto& c : para) c = c == '\n' ? ' ' : c;
    expected_docs.push_back(para + "\nsecond line");
    txt += para + "\r\nsecond line   \n\n\n";
  }
  write_bytes(dir / "a.txt", txt);
  std::string jsonl;
  for (int r = 0; r < 5; ++r) {
    expected_docs.push_back("record " + std::to_string(r) + " kalo\tmi");
    jsonl += nlohmann::json{{"id", r}, {"text", expected_docs.back()}}.dump() + "\n\n";
  }
  write_bytes(dir / "b.jsonl", jsonl);

  PrepareOptions o;
  o.inputs = {dir / "a.txt", dir / "b.jsonl"};
  o.out_dir = dir / "out";
  o.tokenizer = small_tokenizer(dir);
  o.val_fraction = 0.1;  // 25 documents → the last 3 (all JSONL) are validation
  o.shard_tokens = 100;
  o.threads = 2;

  const auto meta = prepare_corpus(o);
  CHECK(meta["documents"]["train"] == 22);
  CHECK(meta["documents"]["val"] == 3);
  CHECK(meta["vocab_size"] == 300);

  const PreparedData data = read_prepared(o.out_dir);
  // The data directory holds a copy of the tokenizer it was encoded with.
  CHECK(data.tokenizer == dir / "out/tokenizer.model");
  CHECK(read_bytes(data.tokenizer) == read_bytes(o.tokenizer));
  CHECK(data.eos_id == 2);
  REQUIRE(data.train_shards.size() > 1);
  CHECK(data.train_shards[0] == dir / "out/train_000000.bin");
  REQUIRE(data.val_shards.size() == 1);

  // Decoding each split's stream, cut at EOS, gives back the documents in order.
  const Tokenizer tok = Tokenizer::load(data.tokenizer);
  auto documents_of = [&](const std::vector<std::string>& shards) {
    const TokenStream stream(shards);
    std::vector<int32_t> all(static_cast<std::size_t>(stream.size()));
    stream.read(0, stream.size(), all.data());
    REQUIRE(all.back() == 2);
    std::vector<std::string> docs;
    std::vector<int32_t> current;
    for (int32_t id : all) {
      if (id == 2) {
        docs.push_back(tok.decode(current));
        current.clear();
      } else {
        current.push_back(id);
      }
    }
    return docs;
  };
  const auto train_docs = documents_of(data.train_shards);
  const auto val_docs = documents_of(data.val_shards);
  CHECK(train_docs == std::vector<std::string>(expected_docs.begin(), expected_docs.begin() + 22));
  CHECK(val_docs == std::vector<std::string>(expected_docs.begin() + 22, expected_docs.end()));
  for (std::size_t i = 0; i + 1 < data.train_shards.size(); ++i) {
    CHECK(TokenShard::open(data.train_shards[i]).size() == 100);
  }
  CHECK(meta["tokens"]["train"] == TokenStream(data.train_shards).size());

  SECTION("a rerun with bigger shards removes the stale ones") {
    o.shard_tokens = 1'000'000;
    prepare_corpus(o);
    CHECK(read_prepared(o.out_dir).train_shards.size() == 1);
    CHECK_FALSE(fs::exists(dir / "out/train_000001.bin"));
  }
  SECTION("training a tokenizer, inputs from a directory") {
    fs::create_directory(dir / "in");
    fs::copy_file(dir / "a.txt", dir / "in/a.txt");
    fs::copy_file(dir / "b.jsonl", dir / "in/b.jsonl");
    write_bytes(dir / "in/notes.md", "ignored");
    PrepareOptions t;
    t.inputs = {dir / "in"};
    t.out_dir = dir / "out2";
    t.train_tokenizer = true;
    t.vocab_size = 320;
    t.val_fraction = 0;
    const auto meta2 = prepare_corpus(t);
    CHECK(meta2["tokenizer"] == "tokenizer.model");
    CHECK(meta2["documents"]["train"] == 25);
    CHECK(read_prepared(t.out_dir).val_shards.empty());
    CHECK(Tokenizer::load(dir / "out2/tokenizer.model").vocab_size() == 320);
  }
}

TEST_CASE("prepare_corpus errors name the file and the problem", "[data]") {
  TempDir dir;
  PrepareOptions o;
  o.out_dir = dir / "out";
  o.train_tokenizer = true;
  o.vocab_size = 300;

  SECTION("missing input") {
    o.inputs = {dir / "nope.txt"};
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("nope.txt") && Contains("no such file or directory"));
  }
  SECTION("unsupported extension") {
    write_bytes(dir / "a.csv", "x");
    o.inputs = {dir / "a.csv"};
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("a.csv") && Contains("'.csv'"));
  }
  SECTION("empty corpus") {
    write_bytes(dir / "a.txt", "  \n\t\n\r\n");
    write_bytes(dir / "b.jsonl", "{\"text\": \"   \"}\n\n");
    o.inputs = {dir / "a.txt", dir / "b.jsonl"};
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("empty corpus") && Contains("a.txt") && Contains("b.jsonl"));
  }
  SECTION("binary garbage") {
    write_bytes(dir / "nul.txt", std::string("some text\n\0\1\2", 13));
    o.inputs = {dir / "nul.txt"};
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("nul.txt") && Contains("NUL byte at byte offset 10"));
    write_bytes(dir / "latin1.txt", "caf\xe9 au lait\n");
    o.inputs = {dir / "latin1.txt"};
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("latin1.txt") && Contains("invalid UTF-8") && Contains("0xe9") &&
                                             Contains("byte offset 3"));
    write_bytes(dir / "overlong.txt", "ok \xc0\xaf");
    o.inputs = {dir / "overlong.txt"};
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("byte offset 3"));
  }
  SECTION("JSONL record without text") {
    write_bytes(dir / "c.jsonl", "{\"text\": \"fine\"}\n\n{\"body\": \"no text\"}\n");
    o.inputs = {dir / "c.jsonl"};
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("c.jsonl' line 3") && Contains("no \"text\" field"));
    write_bytes(dir / "c.jsonl", "{\"text\": 5}\n");
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("line 1") && Contains("\"text\" is a JSON number"));
    write_bytes(dir / "c.jsonl", "{\"text\": \"a\"}\n{oops\n");
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("line 2") && Contains("invalid JSON"));
  }
  SECTION("unwritable output directory") {
    write_bytes(dir / "a.txt", "text\n");
    write_bytes(dir / "file", "");
    o.inputs = {dir / "a.txt"};
    o.out_dir = dir / "file/out";
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("cannot create output directory") && Contains("file/out"));
  }
  SECTION("vocabulary size SentencePiece rejects") {
    write_bytes(dir / "a.txt", generated_text(200));
    o.inputs = {dir / "a.txt"};
    o.vocab_size = 100;
    o.val_fraction = 0;
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("SentencePiece training") && Contains("Vocabulary size"));
  }
  SECTION("one document cannot be split") {
    write_bytes(dir / "a.txt", "just one paragraph\nof two lines\n");
    o.inputs = {dir / "a.txt"};
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("corpus has 1 document,") && Contains("val_fraction"));
  }
  SECTION("a bad tokenizer fails before the corpus is read") {
    write_bytes(dir / "bad.model", "not a model");
    o.inputs = {dir / "missing.txt"};
    o.train_tokenizer = false;
    o.tokenizer = dir / "bad.model";
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("bad.model") && Contains("not a valid SentencePiece model"));
  }
  SECTION("neither or both tokenizer choices") {
    write_bytes(dir / "a.txt", "text\n");
    o.inputs = {dir / "a.txt"};
    o.train_tokenizer = false;
    CHECK_THROWS_WITH(prepare_corpus(o), Contains("exactly one of"));
  }
  SECTION("read_prepared on a directory without meta.json") {
    CHECK_THROWS_WITH(read_prepared(dir.path.string()), Contains("meta.json") && Contains("lckv-prepare"));
  }
}
