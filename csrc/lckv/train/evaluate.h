// The next-token loss of a model over the windows of a data split: what the trainer's validation
// reports and what lckv-eval / python -m lckv.eval compute for a checkpoint (one home, so the two
// agree exactly for the same windows, batch, dtype and threads).
#pragma once

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "lckv/cache/condensed_kv_cache.h"
#include "lckv/data/dataset.h"
#include "lckv/model/lckv_model.h"

namespace lckv::train {

struct EvalStats {
  double loss = 0;  // mean next-token loss over the evaluated tokens
  double ppl = 0;   // exp(loss)
  int64_t tokens = 0;
};

struct WindowEval {
  int64_t seq_len = 256;    // T: each window predicts T tokens
  int64_t max_batches = 0;  // 0: the whole split
  bool bf16 = false;        // bf16 autocast (fp32 weights), as the trainer's dtype "bf16"
  std::optional<IterationOptions> iterations;  // default: the config's m and b
  std::function<void(int64_t done, int64_t total)> progress;  // optional: windows done / to do, per batch
};

// The mean next-token loss of one loader batch of windows [rows, T + 1] (autograd as the caller's
// mode): what a training step and validation both compute per batch.
torch::Tensor window_loss(LCKVForCausalLM& model, const data::Batch& batch, const WindowEval& o, torch::Device device);

// Sum of per-token losses and the token count over `loader`'s windows from its start (no autograd;
// the model is left in eval mode). Sums, not means, so data-parallel ranks can add theirs.
std::pair<double, int64_t> loss_sum(LCKVForCausalLM& model, data::SequentialLoader& loader, const WindowEval& o,
                                    torch::Device device);

EvalStats eval_stats(double loss_sum, int64_t tokens);

// ---- texts (lckv-eval --text / --jsonl): documents of token ids, each scored on its own.
//
// Long-text policy. A document of N ids (N - 1 next-token predictions) longer than the context is
// scored in sliding windows, as in Hugging Face's perplexity guide but without losing a token per
// window: a window holds at most `context` ids; the first scores all its predictions, each later one
// moves on by `stride` predictions and scores only those, so every prediction is scored exactly once
// and each sees at least context - stride ids of left context (stride = context: consecutive windows,
// the fastest; a smaller stride: more context per prediction, more compute). With StreamingLLM the
// document is fed token by token through a cache of `context` slots that evicts the oldest
// (sink_tokens kept) instead, as generation beyond the cache would run.

// Window `document`[begin, end) as input; its last `scored` next-token predictions count.
struct ScoringWindow {
  int64_t document = 0, begin = 0, end = 0, scored = 0;
};
std::vector<ScoringWindow> sliding_windows(int64_t document, int64_t tokens, int64_t context, int64_t stride);

struct TextEval {
  int64_t context = 0;     // ids per window (>= 1)
  int64_t stride = 0;      // in [1, context]
  int64_t batch_size = 8;  // windows per forward (right-padded; padding follows the real ids)
  bool bf16 = false;
  std::optional<IterationOptions> iterations;  // default: the config's m and b
  std::optional<StreamingOptions> streaming;   // token by token through a `context`-slot cache
  std::function<void(int64_t done, int64_t total)> progress;  // optional: after each batch / document
};

struct TextLossSum {
  double sum = 0;       // of the per-token losses
  int64_t tokens = 0;   // predictions scored
  int64_t windows = 0;  // forward windows (streaming: documents)
};

// Throws std::invalid_argument naming the option when context/stride/batch are out of range or the
// context exceeds the model's max_position_embeddings.
TextLossSum text_loss_sum(LCKVForCausalLM& model, const std::vector<std::vector<int64_t>>& documents,
                          const TextEval& o, torch::Device device);

// The documents of text files: a text file is one document; a JSONL file (`jsonl`) one per
// non-blank line, its `text_field` string. Errors name the file (and line): a missing or unreadable
// file, an empty one, a line that is not a JSON object, a record without the field or not a string.
std::vector<std::string> read_documents(const std::vector<std::string>& files, bool jsonl,
                                        const std::string& text_field = "text");

// The tokenizer of a checkpoint directory: <dir>/tokenizer.model. Throws naming the directory and
// the files looked for. (Stand-in for data::find_tokenizer(dir), which also knows tokenizer.json.)
std::string checkpoint_tokenizer(const std::string& checkpoint_dir);

// The documents of `files` (read_documents) tokenized with the SentencePiece model at
// `tokenizer_path`, each preceded by the tokenizer's end-of-document id as lckv-prepare's streams
// present a document (so its first token is scored too). Throws if the tokenizer has more ids than
// the model's vocab_size or no document has a token.
std::vector<std::vector<int64_t>> tokenize_documents(const std::vector<std::string>& files, bool jsonl,
                                                     const std::string& text_field, const std::string& tokenizer_path,
                                                     const LCKVConfig& config);

// Iterations of exact evaluation: until the KVs converge (at most T), to the compute dtype's rounding.
IterationOptions exact_iterations(int64_t seq_len, bool bf16, torch::ScalarType weights);

}  // namespace lckv::train
