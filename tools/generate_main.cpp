// lckv-generate: text generation from a checkpoint directory (config.json, model.safetensors,
// tokenizer.model) with the condensed KV cache. Prompts come from the command line, a file or
// stdin (one per line); with a single prompt the text is streamed to stdout as it is generated.
// Throughput and cache memory go to stderr.
#include <CLI/CLI.hpp>
#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <iostream>

#include "lckv/dtype.h"
#include "lckv/data/tokenizer.h"
#include "lckv/generate/generate.h"
#include "lckv/io/checkpoint.h"
#include "lckv/openmp_policy.h"

namespace {

std::vector<std::string> read_lines(std::istream& in) {
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

// The text that `generated` adds to `prompt`: decoding both together keeps SentencePiece's
// spacing right (a decode drops the "▁" of its first piece).
std::string continuation(const lckv::data::Tokenizer& tokenizer, const std::vector<int64_t>& prompt,
                         const std::vector<int64_t>& generated) {
  std::vector<int32_t> ids(prompt.begin(), prompt.end());
  const size_t prompt_chars = tokenizer.decode(ids).size();
  ids.insert(ids.end(), generated.begin(), generated.end());
  const std::string text = tokenizer.decode(ids);
  return text.size() > prompt_chars ? text.substr(prompt_chars) : std::string();
}

// Streams one sequence to stdout: the prompt text with the first token, then each new piece.
struct TextStreamer {
  const lckv::data::Tokenizer& tokenizer;
  const std::string& prompt_text;
  const std::vector<int64_t>& prompt;
  std::vector<int64_t> generated;
  size_t printed = 0;
  void push(int64_t id) {
    if (generated.empty()) std::cout << prompt_text;
    generated.push_back(id);
    const std::string text = continuation(tokenizer, prompt, generated);
    if (text.size() > printed) {
      std::cout << text.substr(printed) << std::flush;
      printed = text.size();
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  lckv::ensure_passive_openmp(argc, argv);
  CLI::App app{"lckv-generate: generate text with an LCKV checkpoint and the condensed KV cache"};
  std::string model_dir, tokenizer_path, prompt_file, perplexity_file, dtype = "fp32", prefill = "iterative";
  std::vector<std::string> prompts;
  int threads = 2;
  int64_t batch_size = 0, sink = 4, evict_block = 1;
  bool no_bos = false, ignore_eos = false, streaming = false;
  std::vector<int64_t> stop_tokens;
  lckv::GenerationConfig gen;
  double temperature = 0;
  app.add_option("--model", model_dir, "checkpoint directory (config.json, model.safetensors, tokenizer.model or tokenizer.json)")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--tokenizer", tokenizer_path, "tokenizer.model or tokenizer.json (default: the one in --model)");
  app.add_option("prompts", prompts, "prompts (default: --prompt-file, else stdin, one per line)");
  app.add_option("--prompt-file", prompt_file, "file with one prompt per line")->check(CLI::ExistingFile);
  app.add_option("--max-new-tokens", gen.max_new_tokens, "tokens to generate per prompt");
  app.add_option("--temperature", temperature, "sampling temperature (> 0); 0 = greedy");
  app.add_option("--top-k", gen.sampling.top_k, "sample from the k most likely tokens (0 = all)");
  app.add_option("--top-p", gen.sampling.top_p, "nucleus sampling mass (1 = off)");
  app.add_option("--repetition-penalty", gen.sampling.repetition_penalty, "penalty for tokens already present (1 = off)");
  app.add_option("--seed", gen.seed, "seed of the sampling draws")
      ->check(CLI::Validator(  // CLI11 would wrap -1 into the uint64
          [](std::string& s) { return s.find('-') == std::string::npos ? "" : s + " is negative, expected >= 0"; },
          "UINT64"));
  app.add_option("--stop-token", stop_tokens, "token ids that end a sequence (the tokenizer's EOS is one by default)");
  app.add_flag("--ignore-eos", ignore_eos, "do not stop at the tokenizer's EOS");
  app.add_flag("--no-bos", no_bos, "do not prepend the tokenizer's BOS");
  app.add_option("--prefill", prefill, "exact | iterative (m + b iterations, the paper's choice)")
      ->check(CLI::IsMember({"exact", "iterative"}));
  app.add_option("--prefill-chunk", gen.prefill_chunk, "prompt tokens per prefill chunk (0 = whole prompt)");
  app.add_option("--cache-size", gen.cache_capacity, "KV-cache slots per sequence (0 = prompt + max-new-tokens)");
  app.add_flag("--streaming", streaming, "StreamingLLM: keep --sink first tokens + the most recent ones when full");
  app.add_option("--sink", sink, "StreamingLLM attention-sink tokens");
  app.add_option("--evict-block", evict_block, "StreamingLLM: slots evicted at once when the cache is full");
  app.add_option("--batch-size", batch_size, "prompts per batch (0 = all at once)");
  app.add_option("--dtype", dtype, "fp32 | bf16 | fp64")->check(CLI::IsMember({"fp32", "bf16", "fp64"}));
  app.add_option("--threads", threads, "torch intra-op threads");
  app.add_option("--perplexity", perplexity_file,
                 "instead of generating: perplexity of this text fed token by token through the cache "
                 "(with --streaming --cache-size N: StreamingLLM; --sink 0 is the plain sliding window)")
      ->check(CLI::ExistingFile);
  CLI11_PARSE(app, argc, argv);
  try {
    // --temperature 0 spells greedy; any other value samples with it (a negative or NaN one is refused).
    gen.sampling.do_sample = temperature != 0;
    if (gen.sampling.do_sample) gen.sampling.temperature = temperature;
    gen.validate();  // generate() checks again; this fails before the checkpoint is loaded
    if (threads < 1) throw std::invalid_argument("--threads " + std::to_string(threads) + ": expected >= 1");
    if (batch_size < 0) throw std::invalid_argument("--batch-size " + std::to_string(batch_size) + ": expected >= 0");
    torch::set_num_threads(threads);
    model_dir = lckv::io::resolve_checkpoint_dir(model_dir);  // a run directory or its latest names one
    if (tokenizer_path.empty()) tokenizer_path = lckv::data::find_tokenizer(model_dir);
    const auto scalar = lckv::parse_float_dtype(dtype, "--dtype");
    lckv::LCKVForCausalLM model = lckv::io::load_pretrained(model_dir, scalar);
    const lckv::data::Tokenizer tokenizer = lckv::data::Tokenizer::load(tokenizer_path);
    lckv::check_tokenizer_vocab(model->config, tokenizer.vocab_size(), tokenizer_path);
    if (tokenizer.vocab_size() < model->config.vocab_size) gen.vocab_limit = tokenizer.vocab_size();

    if (streaming) gen.streaming = lckv::StreamingOptions{sink, evict_block};
    if (!perplexity_file.empty()) {
      std::ifstream in(perplexity_file);
      const std::string text{std::istreambuf_iterator<char>(in), {}};
      std::vector<int64_t> ids;
      if (!no_bos && tokenizer.bos_id() >= 0) ids.push_back(tokenizer.bos_id());
      for (int32_t id : tokenizer.encode(text)) ids.push_back(id);
      const int64_t capacity = gen.cache_capacity > 0 ? gen.cache_capacity : static_cast<int64_t>(ids.size());
      const auto t0 = std::chrono::steady_clock::now();
      const double nll = lckv::decode_nll(model, ids, capacity, gen.streaming);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::cout << nlohmann::json{{"file", perplexity_file}, {"tokens", ids.size()}, {"cache_size", capacity},
                                  {"streaming", streaming}, {"sink", streaming ? sink : 0}, {"nll", nll},
                                  {"perplexity", std::exp(nll)}, {"seconds", s}}.dump()
                << "\n";
      return 0;
    }

    std::string source = "argument";
    if (prompts.empty() && !prompt_file.empty()) {
      std::ifstream in(prompt_file);
      prompts = read_lines(in);
      source = "line of " + prompt_file;
    } else if (prompts.empty()) {
      prompts = read_lines(std::cin);
      source = "line of stdin";
    }
    if (prompts.empty()) throw std::invalid_argument("no prompts given (arguments, --prompt-file or stdin)");
    std::vector<std::vector<int64_t>> ids;
    for (size_t i = 0; i < prompts.size(); ++i) {
      if (prompts[i].empty()) {
        throw std::invalid_argument("prompt " + std::to_string(i + 1) + " (" + source + ") is empty");
      }
      std::vector<int64_t> p;
      if (!no_bos && tokenizer.bos_id() >= 0) p.push_back(tokenizer.bos_id());
      for (int32_t id : tokenizer.encode(prompts[i])) p.push_back(id);
      ids.push_back(std::move(p));
    }

    gen.prefill = lckv::parse_prefill_mode(prefill);
    gen.stop_tokens = stop_tokens;
    if (!ignore_eos && tokenizer.eos_id() >= 0) gen.stop_tokens.push_back(tokenizer.eos_id());

    const size_t per_batch = batch_size > 0 ? static_cast<size_t>(batch_size) : ids.size();
    for (size_t first = 0; first < ids.size(); first += per_batch) {
      const size_t n = std::min(per_batch, ids.size() - first);
      std::vector<std::vector<int64_t>> batch(ids.begin() + first, ids.begin() + first + n);
      lckv::GenerationResult r;
      if (ids.size() == 1) {
        // One prompt: stream its continuation as it is generated.
        TextStreamer streamer{tokenizer, prompts[0], ids[0]};
        r = lckv::generate(model, batch, gen, [&](const torch::Tensor& tokens, const std::vector<bool>& active) {
          if (active[0]) streamer.push(tokens[0].item<int64_t>());
          return true;
        });
        std::cout << "\n";
      } else {
        r = lckv::generate(model, batch, gen);
        for (size_t b = 0; b < n; ++b) {
          std::cout << "=== prompt " << first + b + 1 << " ===\n"
                    << prompts[first + b] << continuation(tokenizer, batch[b], r.tokens[b]) << "\n";
        }
      }
      const auto& s = r.stats;
      const auto& c = model->config;
      std::cerr << "[lckv-generate] batch " << s.batch << ": prefill " << s.prompt_tokens << " tokens in "
                << s.prefill_seconds << " s (" << to_string(gen.prefill) << "), decode " << s.new_tokens << " tokens in "
                << s.decode_seconds << " s = " << s.new_tokens / std::max(s.decode_seconds, 1e-9) << " tokens/s; "
                << "KV cache " << s.cache_bytes / 1048576.0 << " MiB (" << s.cache_capacity << " slots, "
                << c.kv_layers().size() << " of " << c.num_hidden_layers << " layers cached"
                << (gen.streaming ? ", StreamingLLM evicted " + std::to_string(s.evicted) + " slots" : std::string()) << ")\n";
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "lckv-generate: " << e.what() << "\n";
    return 1;
  }
}
