// SentencePiece tokenizer: loading a tokenizer.model (ours or Llama's own) and training one.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}  // namespace sentencepiece

namespace lckv::data {

class Tokenizer {
 public:
  // Throws std::runtime_error naming `path` if it is missing or not a SentencePiece model.
  static Tokenizer load(const std::string& path);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // Text to ids, without BOS/EOS (callers add them where their format wants them).
  // Safe to call from several threads at once.
  std::vector<int32_t> encode(std::string_view text) const;
  // Ids to text. Throws if an id is outside [0, vocab_size).
  std::string decode(const std::vector<int32_t>& ids) const;

  int vocab_size() const;
  int bos_id() const;  // -1 when the model has none
  int eos_id() const;  // -1 when the model has none
  const std::string& path() const { return path_; }

 private:
  Tokenizer() = default;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp_;
  std::string path_;
};

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
