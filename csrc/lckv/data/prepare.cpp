#include "lckv/data/prepare.h"

#include "lckv/files.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string_view>
#include <thread>

#include "lckv/data/shards.h"
#include "lckv/json_fields.h"
#include "lckv/data/tokenizer.h"

namespace lckv::data {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Documents are encoded in blocks of about this much text, which bounds the memory for
// tokens in flight and sets the pace of progress messages.
constexpr std::size_t kEncodeBlockBytes = 16 << 20;

void say(const PrepareOptions& o, const std::string& message) {
  if (o.log != nullptr) *o.log << "lckv-prepare: " << message << std::endl;
}

std::string mib(std::size_t bytes) {
  std::ostringstream s;
  s.precision(1);
  s << std::fixed << static_cast<double>(bytes) / (1 << 20) << " MiB";
  return s.str();
}

void check_options(const PrepareOptions& o) {
  auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  if (o.inputs.empty()) fail("no inputs given, expected .txt/.jsonl files or directories");
  if (o.out_dir.empty()) fail("no output directory given");
  if (o.train_tokenizer == !o.tokenizer.empty()) {
    fail("expected exactly one of an existing tokenizer (got '" + o.tokenizer + "') or train_tokenizer (got " +
         (o.train_tokenizer ? "true" : "false") + ")");
  }
  if (!(o.val_fraction >= 0.0 && o.val_fraction < 1.0)) {
    fail("val_fraction " + std::to_string(o.val_fraction) + ", expected 0 <= val_fraction < 1");
  }
  if (o.shard_tokens < 1) fail("shard_tokens " + std::to_string(o.shard_tokens) + ", expected >= 1");
  if (o.threads < 1) fail("threads " + std::to_string(o.threads) + ", expected >= 1");
}

// The input files: each named file, and the .txt/.jsonl files directly inside each
// named directory, in name order (so the corpus order, and thus the split, is stable).
std::vector<fs::path> expand_inputs(const std::vector<std::string>& inputs) {
  auto supported = [](const fs::path& p) { return p.extension() == ".txt" || p.extension() == ".jsonl"; };
  std::vector<fs::path> files;
  for (const auto& input : inputs) {
    std::error_code ec;
    const auto status = fs::status(input, ec);
    if (!fs::exists(status)) throw std::runtime_error("input '" + input + "': no such file or directory");
    if (fs::is_directory(status)) {
      std::vector<fs::path> found;
      for (const auto& entry : fs::directory_iterator(input)) {
        if (entry.is_regular_file() && supported(entry.path())) found.push_back(entry.path());
      }
      if (found.empty()) throw std::runtime_error("input directory '" + input + "' holds no .txt or .jsonl files");
      std::sort(found.begin(), found.end());
      files.insert(files.end(), found.begin(), found.end());
    } else if (supported(input)) {
      files.emplace_back(input);
    } else {
      throw std::runtime_error("input '" + input + "': unsupported file type '" + fs::path(input).extension().string() +
                               "', expected .txt, .jsonl or a directory of them");
    }
  }
  return files;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("input '" + path.string() + "': cannot open: " + std::strerror(errno));
  std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw std::runtime_error("input '" + path.string() + "': read error");
  return content;
}

// Offset of the first NUL byte or byte that breaks UTF-8 in `s`, or npos; `why` says which.
std::size_t first_bad_byte(std::string_view s, std::string& why) {
  const auto* b = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  for (std::size_t i = 0; i < n;) {
    const unsigned char c = b[i];
    if (c == 0) {
      why = "NUL byte";
      return i;
    }
    if (c < 0x80) {
      ++i;
      continue;
    }
    // Sequence length and the allowed range of the second byte (excludes overlong forms,
    // UTF-16 surrogates and code points above U+10FFFF).
    std::size_t len = 0;
    unsigned char lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;
      if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;
      if (c == 0xf4) hi = 0x8f;
    }
    bool ok = len != 0 && i + len <= n && b[i + 1] >= lo && b[i + 1] <= hi;
    for (std::size_t k = 2; ok && k < len; ++k) ok = (b[i + k] & 0xc0) == 0x80;
    if (!ok) {
      char hex[8];
      std::snprintf(hex, sizeof hex, "0x%02x", c);
      why = std::string("invalid UTF-8 (sequence starting with byte ") + hex + ")";
      return i;
    }
    i += len;
  }
  return std::string_view::npos;
}

void check_text(const fs::path& path, std::string_view content) {
  std::string why;
  const std::size_t at = first_bad_byte(content, why);
  if (at != std::string_view::npos) {
    throw std::runtime_error("input '" + path.string() + "': " + why + " at byte offset " + std::to_string(at) +
                             ", expected UTF-8 text (is this a binary file?)");
  }
}

bool is_blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || (c >= '\t' && c <= '\r'); });
}

std::string_view trim_right(std::string_view s) {
  while (!s.empty() && (s.back() == ' ' || (s.back() >= '\t' && s.back() <= '\r'))) s.remove_suffix(1);
  return s;
}

// Calls f(line, line_number) for each line of `content`, without its '\n'.
template <class F>
void for_each_line(std::string_view content, F&& f) {
  std::size_t number = 1;
  while (!content.empty()) {
    const std::size_t end = content.find('\n');
    f(content.substr(0, end), number++);
    if (end == std::string_view::npos) break;
    content.remove_prefix(end + 1);
  }
}

void read_txt(std::string_view content, std::vector<std::string>& docs) {
  std::string paragraph;
  auto flush = [&] {
    if (!paragraph.empty()) docs.push_back(std::move(paragraph));
    paragraph.clear();
  };
  for_each_line(content, [&](std::string_view line, std::size_t) {
    line = trim_right(line);
    if (line.empty()) return flush();
    if (!paragraph.empty()) paragraph += '\n';
    paragraph += line;
  });
  flush();
}

void read_jsonl(const fs::path& path, std::string_view content, std::vector<std::string>& docs) {
  for_each_line(content, [&](std::string_view line, std::size_t number) {
    if (is_blank(line)) return;
    const std::string where = "input '" + path.string() + "' line " + std::to_string(number) + ": ";
    const json record = json_fields::parse<std::runtime_error>(line, where.substr(0, where.size() - 2));
    if (!record.is_object()) {
      throw std::runtime_error(where + "expected a JSON object with a \"text\" string, found a JSON " +
                               record.type_name());
    }
    const auto text = record.find("text");
    if (text == record.end()) throw std::runtime_error(where + "record has no \"text\" field");
    if (!text->is_string()) {
      throw std::runtime_error(where + "field \"text\" is a JSON " + std::string(text->type_name()) +
                               ", expected a string");
    }
    const auto& s = text->get_ref<const std::string&>();
    // Escapes like \u0000 get past the byte check of the raw file.
    if (s.find('\0') != std::string::npos) throw std::runtime_error(where + "\"text\" contains a NUL character");
    if (!is_blank(s)) docs.push_back(s);
  });
}

std::vector<std::string> read_documents(const std::vector<fs::path>& files, const PrepareOptions& o) {
  std::vector<std::string> docs;
  for (const auto& path : files) {
    const std::string content = read_file(path);
    std::string_view text = content;
    check_text(path, text);
    if (text.substr(0, 3) == "\xEF\xBB\xBF") text.remove_prefix(3);  // a UTF-8 byte order mark is not text
    const std::size_t before = docs.size();
    if (path.extension() == ".jsonl") {
      read_jsonl(path, text, docs);
    } else {
      read_txt(text, docs);
    }
    say(o,
        "read " + path.string() + ": " + std::to_string(docs.size() - before) + " documents, " + mib(content.size()));
  }
  return docs;
}

// Encodes docs[begin, end), each followed by EOS, on `threads` threads; the result is
// in document order whatever the thread count.
std::vector<int32_t> encode_documents(const Tokenizer& tok, const std::vector<std::string>& docs, std::size_t begin,
                                      std::size_t end, int threads) {
  const int32_t eos = tok.eos_id();
  const std::size_t n = end - begin;
  const std::size_t parts = std::min<std::size_t>(static_cast<std::size_t>(threads), std::max<std::size_t>(n, 1));
  std::vector<std::vector<int32_t>> out(parts);
  std::vector<std::exception_ptr> errors(parts);
  auto work = [&](std::size_t part) {
    try {
      for (std::size_t i = begin + n * part / parts; i < begin + n * (part + 1) / parts; ++i) {
        auto ids = tok.encode(docs[i]);
        out[part].insert(out[part].end(), ids.begin(), ids.end());
        out[part].push_back(eos);
      }
    } catch (...) {
      errors[part] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (std::size_t part = 1; part < parts; ++part) pool.emplace_back(work, part);
  work(0);
  for (auto& t : pool) t.join();
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
  for (std::size_t part = 1; part < parts; ++part) out[0].insert(out[0].end(), out[part].begin(), out[part].end());
  return std::move(out[0]);
}

// Cuts one split's token stream into <prefix>_NNNNNN.bin shards of shard_tokens tokens.
class ShardWriter {
 public:
  ShardWriter(const PrepareOptions& o, std::string prefix, int64_t vocab_size)
      : o_(o), prefix_(std::move(prefix)), vocab_size_(vocab_size) {}

  void add(const std::vector<int32_t>& tokens) {
    total_ += static_cast<int64_t>(tokens.size());
    auto it = tokens.begin();
    while (it != tokens.end()) {
      const auto room = static_cast<std::ptrdiff_t>(o_.shard_tokens - static_cast<int64_t>(buffer_.size()));
      const auto take = std::min(room, tokens.end() - it);
      buffer_.insert(buffer_.end(), it, it + take);
      it += take;
      if (static_cast<int64_t>(buffer_.size()) == o_.shard_tokens) flush();
    }
  }

  // Writes what is left; returns the shard file names.
  std::vector<std::string> finish() {
    if (!buffer_.empty()) flush();
    return names_;
  }
  int64_t total() const { return total_; }

 private:
  void flush() {
    char name[64];
    std::snprintf(name, sizeof name, "%s_%06zu.bin", prefix_.c_str(), names_.size());
    write_shard((fs::path(o_.out_dir) / name).string(), buffer_, vocab_size_);
    say(o_, std::string("wrote ") + name + " (" + std::to_string(buffer_.size()) + " tokens)");
    names_.emplace_back(name);
    buffer_.clear();
  }

  const PrepareOptions& o_;
  std::string prefix_;
  int64_t vocab_size_;
  std::vector<int32_t> buffer_;
  std::vector<std::string> names_;
  int64_t total_ = 0;
};

// Encodes docs[begin, end) into shards named <prefix>_NNNNNN.bin; returns their names.
std::vector<std::string> write_split(const PrepareOptions& o, const Tokenizer& tok, const std::string& prefix,
                                     const std::vector<std::string>& docs, std::size_t begin, std::size_t end,
                                     int64_t& tokens) {
  ShardWriter writer(o, prefix, tok.vocab_size());
  std::size_t done_bytes = 0, total_bytes = 0;
  for (std::size_t i = begin; i < end; ++i) total_bytes += docs[i].size();
  for (std::size_t block = begin; block < end;) {
    std::size_t stop = block, bytes = 0;
    while (stop < end && (stop == block || bytes < kEncodeBlockBytes)) bytes += docs[stop++].size();
    writer.add(encode_documents(tok, docs, block, stop, o.threads));
    done_bytes += bytes;
    say(o, "encoding " + prefix + ": " + std::to_string(100 * done_bytes / std::max<std::size_t>(total_bytes, 1)) +
               "% (" + std::to_string(writer.total()) + " tokens)");
    block = stop;
  }
  tokens = writer.total();
  return writer.finish();
}


void prepare_out_dir(const PrepareOptions& o) {
  std::error_code ec;
  fs::create_directories(o.out_dir, ec);
  if (ec) throw std::runtime_error("cannot create output directory '" + o.out_dir + "': " + ec.message());
  // Fail now rather than after a long tokenizer training.
  const fs::path probe = fs::path(o.out_dir) / ".lckv-prepare-write-test";
  if (!std::ofstream(probe)) {
    throw std::runtime_error("output directory '" + o.out_dir + "' is not writable: " + std::strerror(errno));
  }
  fs::remove(probe, ec);
  // Until the new meta.json appears the directory is incomplete; say so by its absence.
  fs::remove(fs::path(o.out_dir) / "meta.json", ec);
  if (ec) throw std::runtime_error("cannot remove old '" + o.out_dir + "/meta.json': " + ec.message());
}

// Removes shards of an earlier run that this run did not rewrite.
void remove_stale_shards(const PrepareOptions& o, const std::vector<std::string>& keep) {
  static const std::regex shard_name(R"((train|val)_\d{6}\.bin)");
  const std::set<std::string> kept(keep.begin(), keep.end());
  for (const auto& entry : fs::directory_iterator(o.out_dir)) {
    const std::string name = entry.path().filename().string();
    if (std::regex_match(name, shard_name) && kept.count(name) == 0) {
      fs::remove(entry.path());
      say(o, "removed stale " + name);
    }
  }
}

Tokenizer train_on_split(const PrepareOptions& o, const std::vector<std::string>& docs, std::size_t train_docs) {
  std::vector<std::string_view> lines;
  for (std::size_t i = 0; i < train_docs; ++i) {
    for_each_line(docs[i], [&](std::string_view line, std::size_t) { lines.push_back(line); });
  }
  const std::string prefix = (fs::path(o.out_dir) / "tokenizer").string();
  say(o, "training " + o.model_type + " tokenizer, vocab " + std::to_string(o.vocab_size) + ", on " +
             std::to_string(lines.size()) + " lines -> " + prefix + ".model");
  TokenizerTrainOptions train;
  train.vocab_size = o.vocab_size;
  train.model_type = o.model_type;
  train.num_threads = o.threads;
  train_tokenizer_from_lines(lines, prefix, train);
  return Tokenizer::load(prefix + ".model");
}

}  // namespace

json prepare_corpus(const PrepareOptions& o) {
  check_options(o);
  // Everything that can fail fast does so before the corpus is read.
  std::optional<Tokenizer> tok;
  if (!o.train_tokenizer) {
    tok = Tokenizer::load(o.tokenizer);
    if (tok->eos_id() < 0) {
      throw std::runtime_error("tokenizer '" + o.tokenizer + "' has no EOS piece, which separates documents");
    }
  }
  const std::vector<fs::path> files = expand_inputs(o.inputs);
  prepare_out_dir(o);
  // The data directory holds its tokenizer (tokenizer.model or tokenizer.json), which the trainer copies into
  // every checkpoint.
  const std::string tokenizer_file =
      o.train_tokenizer ? std::string("tokenizer.model")
                        : fs::path(copy_tokenizer(o.tokenizer, o.out_dir)).filename().string();

  const std::vector<std::string> docs = read_documents(files, o);
  if (docs.empty()) {
    std::string names;
    for (const auto& f : files) names += (names.empty() ? "'" : ", '") + f.string() + "'";
    throw std::runtime_error("empty corpus: " + names + " hold no text (only whitespace or empty records)");
  }
  const std::size_t val_docs =
      o.val_fraction > 0
          ? std::max<std::size_t>(1, static_cast<std::size_t>(std::llround(o.val_fraction * docs.size())))
          : 0;
  if (val_docs >= docs.size()) {
    throw std::runtime_error("corpus has " + std::to_string(docs.size()) +
                             (docs.size() == 1 ? " document" : " documents") + ", too few to hold out " +
                             std::to_string(val_docs) + " for validation (val_fraction " +
                             std::to_string(o.val_fraction) +
                             ") and keep some for training; separate .txt documents with blank lines or use "
                             "val_fraction 0");
  }
  const std::size_t train_docs = docs.size() - val_docs;
  say(o, std::to_string(docs.size()) + " documents: " + std::to_string(train_docs) + " train, " +
             std::to_string(val_docs) + " val");

  if (o.train_tokenizer) tok = train_on_split(o, docs, train_docs);  // EOS is id 2 by construction

  int64_t train_tokens = 0, val_tokens = 0;
  const auto train_shards = write_split(o, *tok, "train", docs, 0, train_docs, train_tokens);
  const auto val_shards = write_split(o, *tok, "val", docs, train_docs, docs.size(), val_tokens);
  std::vector<std::string> all_shards = train_shards;
  all_shards.insert(all_shards.end(), val_shards.begin(), val_shards.end());
  remove_stale_shards(o, all_shards);

  json sources = json::array();
  for (const auto& f : files) sources.push_back(fs::absolute(f).lexically_normal().string());
  json meta = {
      {"format", "lckv-token-shards"},
      // Relative paths here are relative to the directory holding meta.json.
      {"tokenizer", tokenizer_file},
      {"vocab_size", tok->vocab_size()},
      {"bos_id", tok->bos_id()},
      {"eos_id", tok->eos_id()},
      {"sources", sources},
      {"val_fraction", o.val_fraction},
      {"shard_tokens", o.shard_tokens},
      {"documents", {{"train", train_docs}, {"val", val_docs}}},
      {"tokens", {{"train", train_tokens}, {"val", val_tokens}}},
      {"train_shards", train_shards},
      {"val_shards", val_shards},
  };
  if (o.train_tokenizer) meta["tokenizer_training"] = {{"model_type", o.model_type}, {"vocab_size", o.vocab_size}};
  std::string meta_text;
  try {
    meta_text = meta.dump(2) + "\n";
  } catch (const json::type_error&) {  // JSON text must be UTF-8, and paths need not be
    throw std::runtime_error("cannot write '" + (fs::path(o.out_dir) / "meta.json").string() +
                             "': an input or tokenizer path is not valid UTF-8; rename it");
  }
  write_file_atomically(fs::path(o.out_dir) / "meta.json", meta_text);
  say(o, "done: " + std::to_string(train_tokens) + " train tokens in " + std::to_string(train_shards.size()) +
             " shards, " + std::to_string(val_tokens) + " val tokens in " + std::to_string(val_shards.size()) +
             " shards, " + (fs::path(o.out_dir) / "meta.json").string());
  return meta;
}

PreparedData read_prepared(const std::string& data_dir) {
  const fs::path meta_path = fs::path(data_dir) / "meta.json";
  std::ifstream in(meta_path, std::ios::binary);
  if (!in) {
    throw std::runtime_error("'" + meta_path.string() + "' not found: is '" + data_dir +
                             "' a directory written by lckv-prepare (or is it still running)?");
  }
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string where = "'" + meta_path.string() + "'";
  const json meta = json_fields::parse<std::runtime_error>(text, where);
  if (!meta.is_object()) {
    throw std::runtime_error(where + ": expected a JSON object, found " + json_fields::describe(meta));
  }
  auto required = [&](const char* key, auto type_tag) {
    return json_fields::get_required<decltype(type_tag), std::runtime_error>(meta, key, where);
  };
  auto resolve = [&](const std::string& p) { return (fs::path(data_dir) / p).lexically_normal().string(); };
  auto shard_list = [&](const char* key) {
    const auto it = meta.find(key);
    if (it == meta.end() || it->is_null()) throw std::runtime_error(where + " field '" + key + "' is missing");
    if (!it->is_array()) {
      throw std::runtime_error(where + " field '" + key + "' has value " + json_fields::describe(*it) +
                               ", expected a list of shard file names");
    }
    std::vector<std::string> paths;
    for (std::size_t i = 0; i < it->size(); ++i) {
      const std::string field = std::string(key) + "[" + std::to_string(i) + "]";
      paths.push_back(resolve(json_fields::get<std::string, std::runtime_error>((*it)[i], field, where)));
    }
    return paths;
  };
  PreparedData data;
  data.tokenizer = resolve(required("tokenizer", std::string()));
  data.vocab_size = required("vocab_size", int64_t());
  data.eos_id = required("eos_id", int());
  if (data.vocab_size < 1) {
    throw std::runtime_error(where + " field 'vocab_size' has value " + std::to_string(data.vocab_size) +
                             ", expected a positive integer");
  }
  if (data.eos_id < 0 || data.eos_id >= data.vocab_size) {
    throw std::runtime_error(where + " field 'eos_id' has value " + std::to_string(data.eos_id) +
                             ", expected a token id in [0, vocab_size = " + std::to_string(data.vocab_size) + ")");
  }
  data.train_shards = shard_list("train_shards");
  data.val_shards = shard_list("val_shards");
  return data;
}

}  // namespace lckv::data
