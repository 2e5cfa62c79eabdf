// lckv-prepare: turns text into token shards for training, with a trained SentencePiece tokenizer or a given one.
// All the work is in lckv::data::prepare_corpus (csrc/lckv/data/prepare.h); this file
// only parses flags.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <exception>
#include <iostream>
#include <thread>

#include "lckv/data/prepare.h"
#include "lckv/openmp_policy.h"

int main(int argc, char** argv) {
  lckv::ensure_passive_openmp(argc, argv);
  lckv::data::PrepareOptions o;
  o.threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  o.log = &std::cerr;

  CLI::App app{
      "Prepare a training corpus: read text, train a SentencePiece tokenizer or load one (tokenizer.model or\n"
      "tokenizer.json, copied into --out), and write\n"
      "token shards plus meta.json to --out.\n"
      "Documents: a blank-line-separated paragraph of a .txt file, or one record of a .jsonl file.\n"
      "Each document is followed by EOS. The last --val-fraction of the documents is the\n"
      "validation split.",
      "lckv-prepare"};
  app.add_option("inputs", o.inputs,
                 "Input text: .txt files (UTF-8), .jsonl files (one JSON object per line with a \"text\" "
                 "string), or directories holding such files (read in name order, not recursively)")
      ->required();
  app.add_option("-o,--out", o.out_dir,
                 "Output directory (created if missing) for train_NNNNNN.bin, val_NNNNNN.bin, meta.json "
                 "and the tokenizer (tokenizer.model, or a copy of --tokenizer)")
      ->required();
  auto* tokenizer =
      app.add_option("--tokenizer", o.tokenizer, "Existing tokenizer to encode with: a SentencePiece tokenizer.model (Llama 1/2) or a "
                     "Hugging Face tokenizer.json (Llama 3), or a directory holding one")
          ->check(CLI::ExistingPath);
  auto* train = app.add_flag("--train-tokenizer", o.train_tokenizer,
                             "Train a new tokenizer on the training split and write it to <out>/tokenizer.model");
  tokenizer->excludes(train);
  auto* vocab = app.add_option("--vocab-size", o.vocab_size, "Vocabulary size of the trained tokenizer")
                    ->capture_default_str()
                    ->check(CLI::PositiveNumber);
  auto* type = app.add_option("--model-type", o.model_type, "Kind of tokenizer to train")
                   ->capture_default_str()
                   ->check(CLI::IsMember({"bpe", "unigram"}));
  vocab->needs(train);
  type->needs(train);
  app.add_option("--val-fraction", o.val_fraction,
                 "Fraction of documents, taken from the end of the corpus, held out for validation (0 for none)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));  // 1 itself is rejected by prepare_corpus: no training data
  app.add_option("--shard-tokens", o.shard_tokens, "Maximum tokens per shard file")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--threads", o.threads, "Threads for tokenizer training and encoding (default: all cores)")
      ->check(CLI::PositiveNumber);
  app.add_flag_callback(
      "-q,--quiet", [&o] { o.log = nullptr; }, "Print no progress messages");

  CLI11_PARSE(app, argc, argv);
  if (o.tokenizer.empty() && !o.train_tokenizer) {
    std::cerr << "lckv-prepare: error: give --tokenizer <tokenizer.model|tokenizer.json> or --train-tokenizer\n"
              << "Run with --help for more information.\n";
    return 2;
  }
  try {
    lckv::data::prepare_corpus(o);
  } catch (const std::exception& e) {
    std::cerr << "lckv-prepare: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
