// Corpus preparation (the library behind lckv-prepare): text → tokenizer → token shards.
//
// Inputs, told apart by extension:
//   *.txt    UTF-8 text. A document is a paragraph: a run of non-blank lines, ended by
//            one or more blank (whitespace-only) lines or the end of the file.
//   *.jsonl  one JSON object per line with a string field "text"; a document is one
//            record. Blank lines are skipped.
//   a directory: its *.txt and *.jsonl files (not subdirectories), in name order.
// Trailing whitespace (including CR) is trimmed from every .txt line; documents that are
// only whitespace are dropped. NUL bytes and invalid UTF-8 are errors naming the file
// and byte offset, since they mean a binary or mis-encoded file slipped in.
//
// The last round(val_fraction × documents) documents (at least one when val_fraction
// > 0) form the validation split, the rest the training split; the tokenizer is trained
// on the training split only. Each document is encoded and followed by EOS, and each
// split's token stream is cut into shards of at most shard_tokens tokens.
//
// Output directory:
//   tokenizer.model, tokenizer.vocab   when training a tokenizer
//   tokenizer.model or tokenizer.json  a copy of the given tokenizer otherwise (copy_tokenizer)
//   train_000000.bin ...               training shards (see shards.h)
//   val_000000.bin ...                 validation shards (none when val_fraction is 0)
//   meta.json                          written last: its presence means the rest is complete
// Shards left over from an earlier run in the same directory are removed.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

namespace lckv::data {

struct PrepareOptions {
  std::vector<std::string> inputs;  // files or directories, see above
  std::string out_dir;
  std::string tokenizer;         // an existing tokenizer.model or tokenizer.json, or empty with train_tokenizer
  bool train_tokenizer = false;  // train <out_dir>/tokenizer.model instead
  int vocab_size = 4096;         // when training
  std::string model_type = "bpe";
  double val_fraction = 0.01;
  int64_t shard_tokens = 100'000'000;
  int threads = 1;
  std::ostream* log = nullptr;  // progress messages; nullptr for quiet
};

// Runs the whole preparation and returns the meta.json it wrote. Throws std::runtime_error
// (or std::invalid_argument for bad options) with a message naming the file, line or
// option at fault.
nlohmann::json prepare_corpus(const PrepareOptions& options);

// What a trainer needs from a prepared directory, read from its meta.json with paths
// resolved against the directory.
struct PreparedData {
  std::string tokenizer;  // path of tokenizer.model or tokenizer.json
  int64_t vocab_size = 0;
  int eos_id = -1;
  std::vector<std::string> train_shards;
  std::vector<std::string> val_shards;
};
PreparedData read_prepared(const std::string& data_dir);

}  // namespace lckv::data
