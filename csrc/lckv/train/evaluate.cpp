#include "lckv/train/evaluate.h"

#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "lckv/autocast.h"
#include "lckv/data/tokenizer.h"
#include "lckv/files.h"
#include "lckv/generate/generate.h"
#include "lckv/ops/fused_ops.h"
#include "lckv/train/trainer.h"

namespace lckv::train {

torch::Tensor window_loss(LCKVForCausalLM& model, const data::Batch& batch, const WindowEval& o, torch::Device device) {
  const torch::Tensor ids = batch_tensor(batch, device);
  AutocastScope autocast(device.type(), at::kBFloat16, o.bf16);
  return model->next_token_loss(ids.narrow(1, 0, o.seq_len), ids.narrow(1, 1, o.seq_len), o.iterations);
}

std::pair<double, int64_t> loss_sum(LCKVForCausalLM& model, data::SequentialLoader& loader, const WindowEval& o,
                                    torch::Device device) {
  torch::NoGradGuard no_grad;
  model->eval();
  loader.reset();
  double sum = 0;
  int64_t tokens = 0, batches = 0;
  int64_t windows = 0, total = loader.num_windows();
  while (auto batch = loader.next()) {
    if (o.max_batches > 0 && batches == o.max_batches) break;
    const torch::Tensor loss = window_loss(model, *batch, o, device);
    const int64_t n = batch->rows * o.seq_len;
    sum += loss.item<double>() * static_cast<double>(n);
    tokens += n;
    ++batches;
    windows += batch->rows;
    if (o.max_batches > 0 && batches == 1) total = std::min(total, o.max_batches * batch->rows);
    if (o.progress) o.progress(windows, total);
  }
  return {sum, tokens};
}

EvalStats eval_stats(double loss_sum, int64_t tokens) {
  EvalStats e;
  e.tokens = tokens;
  e.loss = tokens > 0 ? loss_sum / static_cast<double>(tokens) : std::numeric_limits<double>::quiet_NaN();
  e.ppl = std::exp(e.loss);
  return e;
}

std::vector<ScoringWindow> sliding_windows(int64_t document, int64_t tokens, int64_t context, int64_t stride) {
  if (context < 1 || stride < 1 || stride > context) {
    throw std::invalid_argument("sliding_windows: need 1 <= stride (" + std::to_string(stride) + ") <= context (" +
                                std::to_string(context) + ")");
  }
  std::vector<ScoringWindow> windows;
  // `predicted`: predictions [1, predicted) are scored; a window [begin, end) predicts [begin + 1, end + 1).
  int64_t predicted = 1;
  while (predicted < tokens) {
    const int64_t next = std::min(tokens, predicted == 1 ? context + 1 : predicted + stride);
    const int64_t end = next - 1;
    windows.push_back({document, std::max<int64_t>(0, end - context), end, next - predicted});
    predicted = next;
  }
  return windows;
}

TextLossSum text_loss_sum(LCKVForCausalLM& model, const std::vector<std::vector<int64_t>>& documents,
                          const TextEval& o, torch::Device device) {
  const int64_t max_positions = model->config.max_position_embeddings;
  if (o.context < 1 || o.context > max_positions) {
    throw std::invalid_argument("context " + std::to_string(o.context) + " must be in [1, max_position_embeddings = " +
                                std::to_string(max_positions) + "]: longer texts are scored in windows of the context "
                                "(--stride) or token by token with --streaming");
  }
  if (o.stride < 1 || o.stride > o.context) {
    throw std::invalid_argument("stride " + std::to_string(o.stride) + " must be in [1, context = " +
                                std::to_string(o.context) + "]");
  }
  if (o.batch_size < 1) throw std::invalid_argument("batch_size must be >= 1, got " + std::to_string(o.batch_size));
  torch::NoGradGuard no_grad;
  model->eval();
  TextLossSum r;
  if (o.streaming) {
    for (size_t d = 0; d < documents.size(); ++d) {
      const int64_t n = static_cast<int64_t>(documents[d].size());
      if (n >= 2) {
        AutocastScope autocast(device.type(), at::kBFloat16, o.bf16);
        r.sum += decode_nll(model, documents[d], o.context, o.streaming) * static_cast<double>(n - 1);
        r.tokens += n - 1;
        ++r.windows;
      }
      if (o.progress) o.progress(static_cast<int64_t>(d) + 1, static_cast<int64_t>(documents.size()));
    }
    return r;
  }
  std::vector<ScoringWindow> windows;
  for (size_t d = 0; d < documents.size(); ++d) {
    const auto w = sliding_windows(static_cast<int64_t>(d), static_cast<int64_t>(documents[d].size()), o.context,
                                   o.stride);
    windows.insert(windows.end(), w.begin(), w.end());
  }
  const int64_t total = static_cast<int64_t>(windows.size());
  for (int64_t first = 0; first < total; first += o.batch_size) {
    const int64_t rows = std::min(o.batch_size, total - first);
    int64_t width = 0;
    for (int64_t i = 0; i < rows; ++i) width = std::max(width, windows[first + i].end - windows[first + i].begin);
    // Right padding with id 0: it follows every real id, so the real positions cannot see it.
    torch::Tensor ids = torch::zeros({rows, width}, torch::kLong);
    torch::Tensor targets = torch::full({rows, width}, ops::kIgnoreIndex, torch::kLong);
    int64_t scored = 0;
    for (int64_t i = 0; i < rows; ++i) {
      const ScoringWindow& w = windows[first + i];
      const std::vector<int64_t>& doc = documents[w.document];
      const int64_t len = w.end - w.begin;
      auto id = ids[i];
      auto target = targets[i];
      for (int64_t t = 0; t < len; ++t) id[t] = doc[w.begin + t];
      for (int64_t t = len - w.scored; t < len; ++t) target[t] = doc[w.begin + t + 1];
      scored += w.scored;
    }
    AutocastScope autocast(device.type(), at::kBFloat16, o.bf16);
    const torch::Tensor loss = model->next_token_loss(ids.to(device), targets.to(device), o.iterations);
    r.sum += loss.item<double>() * static_cast<double>(scored);
    r.tokens += scored;
    r.windows += rows;
    if (o.progress) o.progress(first + rows, total);
  }
  return r;
}

std::vector<std::string> read_documents(const std::vector<std::string>& files, bool jsonl,
                                        const std::string& text_field) {
  std::vector<std::string> documents;
  for (const std::string& file : files) {
    const std::string text = read_file(file);
    if (text.empty()) throw std::runtime_error("'" + file + "' is empty: no text to evaluate");
    if (!jsonl) {
      documents.push_back(text);
      continue;
    }
    std::istringstream lines(text);
    std::string line;
    int64_t number = 0, records = 0;
    while (std::getline(lines, line)) {
      ++number;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      const std::string where = file + ":" + std::to_string(number);
      nlohmann::json record;
      try {
        record = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        throw std::runtime_error(where + ": not JSON (" + e.what() + ")");
      }
      if (!record.is_object()) throw std::runtime_error(where + ": expected a JSON object, got " + record.type_name());
      const auto field = record.find(text_field);
      if (field == record.end()) {
        throw std::runtime_error(where + ": the record has no field '" + text_field + "' (--text-field)");
      }
      if (!field->is_string()) {
        throw std::runtime_error(where + ": field '" + text_field + "' is " + field->type_name() +
                                 ", expected a string");
      }
      documents.push_back(field->get<std::string>());
      ++records;
    }
    if (records == 0) throw std::runtime_error("'" + file + "' holds no JSONL records (only blank lines)");
  }
  return documents;
}

std::string checkpoint_tokenizer(const std::string& checkpoint_dir) {
  return data::find_tokenizer(checkpoint_dir);  // one home for which files make a checkpoint's tokenizer
}

std::vector<std::vector<int64_t>> tokenize_documents(const std::vector<std::string>& files, bool jsonl,
                                                     const std::string& text_field, const std::string& tokenizer_path,
                                                     const LCKVConfig& config) {
  const std::vector<std::string> texts = read_documents(files, jsonl, text_field);
  const data::Tokenizer tokenizer = data::Tokenizer::load(tokenizer_path);
  check_tokenizer_vocab(config, tokenizer.vocab_size(), tokenizer_path);
  std::vector<std::vector<int64_t>> documents;
  int64_t tokens = 0;
  for (const std::string& text : texts) {
    const std::vector<int32_t> ids = tokenizer.encode(text);
    std::vector<int64_t> doc;
    doc.reserve(ids.size() + 1);
    if (tokenizer.eos_id() >= 0) doc.push_back(tokenizer.eos_id());
    doc.insert(doc.end(), ids.begin(), ids.end());
    tokens += static_cast<int64_t>(ids.size());
    documents.push_back(std::move(doc));
  }
  if (tokens == 0) throw std::runtime_error("the inputs (" + files.front() + ", ...) tokenize to no tokens");
  return documents;
}

IterationOptions exact_iterations(int64_t seq_len, bool bf16, torch::ScalarType weights) {
  return IterationOptions{static_cast<int>(seq_len), 1, {}, convergence_tolerance(bf16 ? torch::kBFloat16 : weights)};
}

}  // namespace lckv::train
