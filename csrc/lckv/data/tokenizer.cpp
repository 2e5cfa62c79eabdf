#include "lckv/data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <stdexcept>
#include <type_traits>
#include <unordered_map>

namespace lckv::data {

// SentencePiece speaks std::vector<int>; this lets ids pass through without a copy.
static_assert(std::is_same_v<int, int32_t>, "token ids are int32_t and SentencePiece ids are int");

namespace fs = std::filesystem;

Tokenizer Tokenizer::load(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) {
    throw std::runtime_error("tokenizer '" + path +
                             "': " + (fs::exists(path, ec) ? "not a regular file" : "file not found") +
                             ", expected a SentencePiece tokenizer.model");
  }
  Tokenizer tok;
  tok.sp_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  tok.path_ = path;
  const auto status = tok.sp_->Load(path);
  if (!status.ok()) {
    throw std::runtime_error("tokenizer '" + path + "': not a valid SentencePiece model (" + status.message() + ")");
  }
  return tok;
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  const auto status = sp_->Encode(text, &ids);
  if (!status.ok()) throw std::runtime_error("tokenizer '" + path_ + "': encode failed: " + status.message());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const int n = vocab_size();
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= n) {
      throw std::out_of_range("tokenizer '" + path_ + "': cannot decode id " + std::to_string(ids[i]) +
                              " at position " + std::to_string(i) + ", expected 0 <= id < vocab_size " +
                              std::to_string(n));
    }
  }
  std::string text;
  const auto status = sp_->Decode(ids, &text);
  if (!status.ok()) throw std::runtime_error("tokenizer '" + path_ + "': decode failed: " + status.message());
  return text;
}

int Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int Tokenizer::bos_id() const { return sp_->bos_id(); }
int Tokenizer::eos_id() const { return sp_->eos_id(); }

namespace {

// Feeds in-memory lines to the SentencePiece trainer.
class LineIterator : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(const std::vector<std::string_view>& lines) : lines_(lines) { settle(); }
  bool done() const override { return i_ >= lines_.size(); }
  void Next() override {
    ++i_;
    settle();
  }
  const std::string& value() const override { return current_; }
  sentencepiece::util::Status status() const override { return {}; }

 private:
  // Skips empty lines and copies the current one (the interface hands out a std::string&).
  void settle() {
    while (i_ < lines_.size() && lines_[i_].empty()) ++i_;
    if (i_ < lines_.size()) current_.assign(lines_[i_]);
  }
  const std::vector<std::string_view>& lines_;
  std::size_t i_ = 0;
  std::string current_;
};

std::unordered_map<std::string, std::string> trainer_args(const std::string& model_prefix,
                                                          const TokenizerTrainOptions& o) {
  if (o.model_type != "bpe" && o.model_type != "unigram") {
    throw std::invalid_argument("tokenizer model_type '" + o.model_type + "', expected \"bpe\" or \"unigram\"");
  }
  if (o.num_threads < 1) {
    throw std::invalid_argument("tokenizer num_threads " + std::to_string(o.num_threads) + ", expected >= 1");
  }
  return {
      {"model_prefix", model_prefix},
      {"model_type", o.model_type},
      {"vocab_size", std::to_string(o.vocab_size)},
      {"num_threads", std::to_string(o.num_threads)},
      {"input_sentence_size", std::to_string(o.input_sentence_size)},
      {"shuffle_input_sentence", "true"},
      // Llama's choices: exact round trip, bytes for rare characters, digits one by one.
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "true"},
      {"byte_fallback", "true"},
      {"split_digits", "true"},
      {"allow_whitespace_only_pieces", "true"},
      {"character_coverage", "0.99995"},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      // Longer lines are left out of training (not of encoding); 16 KiB keeps most paragraphs.
      {"max_sentence_length", "16384"},
      // SentencePiece logs every training step at INFO; keep warnings and errors only.
      {"minloglevel", "1"},
  };
}

void run_trainer(const std::unordered_map<std::string, std::string>& args, sentencepiece::SentenceIterator* lines) {
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, lines);
  if (!status.ok()) {
    throw std::runtime_error("SentencePiece training of '" + args.at("model_prefix") +
                             ".model' failed: " + status.message());
  }
}

}  // namespace

void train_tokenizer(const std::vector<std::string>& text_files, const std::string& model_prefix,
                     const TokenizerTrainOptions& options) {
  auto args = trainer_args(model_prefix, options);
  if (text_files.empty()) throw std::invalid_argument("train_tokenizer: no input text files given");
  std::string input;
  for (const auto& file : text_files) {
    std::error_code ec;
    if (!fs::is_regular_file(file, ec)) {
      throw std::runtime_error("tokenizer training input '" + file + "': file not found");
    }
    // SentencePiece takes its inputs as one comma-separated list.
    if (file.find(',') != std::string::npos) {
      throw std::invalid_argument("tokenizer training input '" + file +
                                  "': SentencePiece cannot read paths containing a comma");
    }
    input += (input.empty() ? "" : ",") + file;
  }
  args["input"] = input;
  run_trainer(args, nullptr);
}

void train_tokenizer_from_lines(const std::vector<std::string_view>& lines, const std::string& model_prefix,
                                const TokenizerTrainOptions& options) {
  const auto args = trainer_args(model_prefix, options);
  LineIterator it(lines);
  run_trainer(args, &it);
}

}  // namespace lckv::data
