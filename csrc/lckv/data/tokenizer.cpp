#include "lckv/data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include "lckv/files.h"

#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <type_traits>
#include <unordered_map>

namespace lckv::data {

// SentencePiece speaks std::vector<int>; this lets ids pass through without a copy.
static_assert(std::is_same_v<int, int32_t>, "token ids are int32_t and SentencePiece ids are int");

namespace fs = std::filesystem;

namespace {

class SentencePieceModel : public detail::TokenizerModel {
 public:
  explicit SentencePieceModel(const std::string& path) : path_(path) {
    const auto status = sp_.Load(path);
    if (!status.ok()) {
      throw std::runtime_error("tokenizer '" + path + "': not a valid SentencePiece model (" + status.message() +
                               ") nor a tokenizer.json");
    }
  }
  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int32_t> ids;
    const auto status = sp_.Encode(text, &ids);
    if (!status.ok()) throw std::runtime_error("tokenizer '" + path_ + "': encode failed: " + status.message());
    return ids;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string text;
    const auto status = sp_.Decode(ids, &text);
    if (!status.ok()) throw std::runtime_error("tokenizer '" + path_ + "': decode failed: " + status.message());
    return text;
  }
  int vocab_size() const override { return sp_.GetPieceSize(); }
  int bos_id() const override { return sp_.bos_id(); }
  int eos_id() const override { return sp_.eos_id(); }

 private:
  sentencepiece::SentencePieceProcessor sp_;
  std::string path_;
};

// A tokenizer.json is named so, or at least starts with '{'; a SentencePiece model is a protobuf, whose first byte
// is the tag of field 1 (0x0A, a newline: so leading whitespace cannot be skipped).
bool looks_like_json(const std::string& path) {
  if (fs::path(path).extension() == ".json") return true;
  std::ifstream in(path, std::ios::binary);
  char c = 0;
  return in.get(c) && c == '{';
}

}  // namespace

Tokenizer Tokenizer::load(const std::string& path_or_dir) {
  std::error_code ec;
  const std::string path = fs::is_directory(path_or_dir, ec) ? find_tokenizer(path_or_dir) : path_or_dir;
  if (!fs::is_regular_file(path, ec)) {
    throw std::runtime_error("tokenizer '" + path +
                             "': " + (fs::exists(path, ec) ? "not a regular file" : "file not found") +
                             ", expected a SentencePiece tokenizer.model or a tokenizer.json");
  }
  Tokenizer tok;
  tok.path_ = path;
  if (looks_like_json(path)) {
    tok.kind_ = "tokenizer.json";
    tok.model_ = detail::load_tokenizer_json(read_file(path), "tokenizer '" + path + "'",
                                             fs::path(path).parent_path().string());
  } else {
    tok.kind_ = "sentencepiece";
    tok.model_ = std::make_unique<SentencePieceModel>(path);
  }
  return tok;
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text) const { return model_->encode(text); }

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  const int n = vocab_size();
  for (std::size_t i = 0; i < ids.size(); ++i) {
    if (ids[i] < 0 || ids[i] >= n) {
      throw std::out_of_range("tokenizer '" + path_ + "': cannot decode id " + std::to_string(ids[i]) +
                              " at position " + std::to_string(i) + ", expected 0 <= id < vocab_size " +
                              std::to_string(n));
    }
  }
  return model_->decode(ids);
}

int Tokenizer::vocab_size() const { return model_->vocab_size(); }
int Tokenizer::bos_id() const { return model_->bos_id(); }
int Tokenizer::eos_id() const { return model_->eos_id(); }

std::string find_tokenizer(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    throw std::runtime_error("cannot look for a tokenizer in '" + dir + "': " +
                             (fs::exists(dir, ec) ? "not a directory" : "no such directory"));
  }
  for (const char* name : {"tokenizer.model", "tokenizer.json"}) {
    const fs::path p = fs::path(dir) / name;
    if (fs::is_regular_file(p, ec)) return p.string();
  }
  throw std::runtime_error("directory '" + dir +
                           "' holds no tokenizer: looked for tokenizer.model (SentencePiece) and tokenizer.json "
                           "(Hugging Face); pass one with --tokenizer or copy it there");
}

std::string copy_tokenizer(const std::string& from_dir_or_file, const std::string& to_dir) {
  std::error_code ec;
  const std::string from =
      fs::is_directory(from_dir_or_file, ec) ? find_tokenizer(from_dir_or_file) : from_dir_or_file;
  // Loading checks that it is a tokenizer we can read, and its kind names the copy.
  const Tokenizer tok = Tokenizer::load(from);
  const bool json = tok.kind() == "tokenizer.json";
  const fs::path target = fs::path(to_dir) / (json ? "tokenizer.json" : "tokenizer.model");
  if (fs::exists(target, ec) && fs::equivalent(from, target, ec)) return target.string();
  std::vector<std::pair<fs::path, fs::path>> files = {{from, target}};
  if (json) {
    for (const char* side : {"tokenizer_config.json", "special_tokens_map.json"}) {
      const fs::path p = fs::path(from).parent_path() / side;
      if (fs::is_regular_file(p, ec)) files.emplace_back(p, fs::path(to_dir) / side);
    }
  }
  for (const auto& [src, dst] : files) {
    try {
      write_file_atomically(dst, read_file(src));
    } catch (const std::exception& e) {
      throw std::runtime_error("cannot copy tokenizer file '" + src.string() + "' to '" + dst.string() +
                               "': " + e.what());
    }
  }
  return target.string();
}

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
