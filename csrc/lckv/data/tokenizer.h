// Tokenizers: SentencePiece tokenizer.model (ours, Llama 1/2, TinyLlama) and Hugging Face tokenizer.json
// (BPE: byte-level as GPT-2 / Llama 3 save it, SentencePiece-style as transformers saves Llama 2), behind one
// Tokenizer; finding and copying the tokenizer that travels with a checkpoint; training a SentencePiece model.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace lckv::data {

namespace detail {
// What each kind of tokenizer file implements: tokenizer.cpp (SentencePiece), hf_tokenizer.cpp (tokenizer.json).
class TokenizerModel {
 public:
  virtual ~TokenizerModel() = default;
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;  // ids already checked in range
  virtual int vocab_size() const = 0;
  virtual int bos_id() const = 0;
  virtual int eos_id() const = 0;
};

// A tokenizer.json from its text; `source` names it in errors, `config_dir` (may be empty) is where
// tokenizer_config.json naming the BOS/EOS tokens is looked for. Throws std::runtime_error naming the
// source, the JSON field and the value it cannot honour.
std::unique_ptr<TokenizerModel> load_tokenizer_json(std::string_view text, const std::string& source,
                                                    const std::string& config_dir);
}  // namespace detail

class Tokenizer {
 public:
  // `path` is a SentencePiece model (any name), a tokenizer.json (a name ending in .json, or content
  // starting with '{'), or a directory holding one (see find_tokenizer). Throws std::runtime_error naming
  // `path` if it is missing, of another kind, or uses a tokenizer.json feature this code does not implement.
  static Tokenizer load(const std::string& path);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Text to ids, without BOS/EOS (callers add them where their format wants them); special tokens
  // written in the text (tokenizer.json's added tokens) become their ids, as Hugging Face tokenizers do.
  // Bytes that are not UTF-8 are read as U+FFFD. Safe to call from several threads at once.
  std::vector<int32_t> encode(std::string_view text) const;
  // Ids to text; special (control) tokens decode to nothing. Throws if an id is outside [0, vocab_size).
  std::string decode(const std::vector<int32_t>& ids) const;

  int vocab_size() const;
  int bos_id() const;  // -1 when the model has none
  int eos_id() const;  // -1 when the model has none
  const std::string& path() const { return path_; }  // the file (a directory given to load resolved)
  const std::string& kind() const { return kind_; }  // "sentencepiece" or "tokenizer.json"

 private:
  Tokenizer() = default;
  std::unique_ptr<detail::TokenizerModel> model_;
  std::string path_, kind_;
};

// The tokenizer file in checkpoint or data directory `dir`: tokenizer.model (preferred: the original of a
// converted tokenizer.json) else tokenizer.json. Throws std::runtime_error naming `dir` and the files looked for.
std::string find_tokenizer(const std::string& dir);

// Copies a tokenizer (a file, or the one find_tokenizer finds in a directory) into directory `to_dir` under
// its canonical name, tokenizer.model or tokenizer.json (with the tokenizer_config.json and
// special_tokens_map.json beside a tokenizer.json, which name its BOS/EOS), each file written atomically.
// Returns the path of the copied tokenizer. Throws std::runtime_error naming the file that failed.
std::string copy_tokenizer(const std::string& from_dir_or_file, const std::string& to_dir);

struct TokenizerTrainOptions {
  int vocab_size = 4096;
  std::string model_type = "bpe";  // "bpe" or "unigram"
  int num_threads = 1;
  // SentencePiece holds its training sentences in memory; beyond this many it trains on
  // a random sample (a few million lines give a good vocabulary at modest RAM).
  int64_t input_sentence_size = 2'000'000;
};

// Trains a SentencePiece model on the lines of `text_files` (one sentence per line) and
// writes `<model_prefix>.model` and `<model_prefix>.vocab`. The settings follow Llama's
// tokenizer: identity normalisation (text round-trips exactly), byte fallback (no <unk>
// for unseen characters), split digits, unk=0 bos=1 eos=2, no pad. Errors from
// SentencePiece (e.g. a vocab_size it rejects) are thrown with its message.
void train_tokenizer(const std::vector<std::string>& text_files, const std::string& model_prefix,
                     const TokenizerTrainOptions& options);

// The same, training on in-memory `lines` (one sentence each; empty ones are skipped).
void train_tokenizer_from_lines(const std::vector<std::string_view>& lines, const std::string& model_prefix,
                                const TokenizerTrainOptions& options);

}  // namespace lckv::data
