// The condensed KV cache and generation: invariant 4 of DESIGN.md (prefill + token-by-token decode
// with the cache equals the sequential definition, fp64) for several layer_types, GQA, batches of
// prompts with different lengths, both prefill modes and chunked prefill; the per-sequence key
// mask of the attention op against a naive reference; StreamingLLM; sampling; bad input.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "lckv/cache/condensed_kv_cache.h"
#include "lckv/generate/generate.h"
#include "lckv/ops/condensed_attention.h"

using namespace lckv;

namespace {

LCKVConfig small_config(const std::string& layer_types, int layers, int heads, int kv_heads, int64_t window = 3) {
  nlohmann::json j = {{"vocab_size", 41},        {"hidden_size", 8 * heads}, {"intermediate_size", 24},
                      {"num_hidden_layers", layers}, {"num_attention_heads", heads}, {"num_key_value_heads", kv_heads},
                      {"layer_types", layer_types}, {"sliding_window", window},  {"initializer_range", 0.2},
                      {"rope_theta", 100.0},         {"forward_passes", 2},        {"backward_passes", 1}};
  return LCKVConfig::from_json(j);
}

LCKVForCausalLM make_model(const LCKVConfig& c, uint64_t seed = 0) {
  torch::manual_seed(seed);
  LCKVForCausalLM m(c);
  init_weights(m);
  m->to(torch::kDouble);
  return m;
}

double max_diff(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

torch::Tensor row(const std::vector<int64_t>& ids) { return torch::tensor(ids, torch::kLong).unsqueeze(0); }

// Naive attention with a per-sequence first visible key: the mask built entry by entry.
torch::Tensor naive_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v, bool strict,
                              int64_t window, int64_t q_offset, const std::vector<int64_t>& key_start) {
  const int64_t B = q.size(0), Hq = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  torch::Tensor kr = k.repeat_interleave(Hq / Hkv, 1), vr = v.repeat_interleave(Hq / Hkv, 1);
  torch::Tensor scores = torch::matmul(q, kr.transpose(-1, -2)) / std::sqrt(static_cast<double>(D));
  torch::Tensor visible = torch::zeros({B, 1, T, S}, torch::kBool);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pos = q_offset + t;
      for (int64_t s = 0; s < S; ++s) {
        bool ok = (strict ? s < pos : s <= pos) && s >= key_start[b];
        if (window > 0) ok = ok && s > pos - window;
        visible[b][0][t][s] = ok;
      }
    }
  }
  torch::Tensor probs = torch::softmax(scores.masked_fill(visible.logical_not(), -INFINITY), -1);
  probs = torch::where(visible.any(-1, true), probs, torch::zeros_like(probs));
  return torch::matmul(probs, vr);
}

struct ModelCase {
  std::string layer_types;
  int layers, heads, kv_heads;
};

const ModelCase kModelCases[] = {
    {"0_4_4_4_4_5", 6, 4, 2},  // LCKV sandwich w=2, GQA
    {"0_1_2_3", 4, 4, 1},      // Llama identity, MQA
    {"0_0_2_2_4_4", 6, 4, 2},  // CLA
    {"0s_1s_2_2", 4, 4, 2},    // YOCO with a sliding window of 3
    {"0_2_1_3", 4, 4, 2},      // cross targets
    {"0_2_2_2_2_5", 6, 2, 2},  // sandwich-middle, MHA
    {"2_0_3_3", 4, 2, 1},      // two top targets in one segment
    {"0_3s_3_3", 4, 4, 4},     // top attention through a sliding window
};

// Logits of every position of the prompts from a cache-backed prefill in chunks, with the prompts
// left-padded to one length: [B, max_len, V].
torch::Tensor cached_prefill_logits(LCKVForCausalLM& m, const std::vector<std::vector<int64_t>>& prompts, int64_t chunk,
                                    PrefillMode mode) {
  const int64_t B = prompts.size();
  int64_t max_len = 0;
  for (auto& p : prompts) max_len = std::max<int64_t>(max_len, p.size());
  CondensedKVCache cache(m->config, B, max_len, torch::TensorOptions().dtype(torch::kDouble));
  torch::Tensor ids = torch::zeros({B, max_len}, torch::kLong), pads = torch::zeros({B}, torch::kLong);
  for (int64_t b = 0; b < B; ++b) {
    pads[b] = max_len - static_cast<int64_t>(prompts[b].size());
    ids[b].narrow(0, max_len - prompts[b].size(), prompts[b].size()).copy_(row(prompts[b])[0]);
  }
  cache.set_key_start(pads);
  std::vector<torch::Tensor> logits;
  for (int64_t s = 0; s < max_len; s += chunk) {
    const int64_t n = std::min(chunk, max_len - s);
    const IterationOptions counts = mode == PrefillMode::kExact ? IterationOptions{int(n), 1}
                                                               : IterationOptions{m->config.forward_passes, m->config.backward_passes};
    cache.make_room(n);
    logits.push_back(m->lm_logits(m->model->forward_chunk(ids.narrow(1, s, n), cache, counts, cache.positions(n))));
    cache.advance(n);
  }
  return torch::cat(logits, 1);
}

}  // namespace

TEST_CASE("attention with per-sequence key_start matches the naive reference, forward and backward", "[cache][ops]") {
  torch::manual_seed(0);
  struct Case {
    int64_t Hq, Hkv, T, S;
    bool strict;
    int64_t window, q_offset, block;
    std::vector<int64_t> key_start;
  };
  const Case cases[] = {
      {4, 2, 9, 9, false, 0, 0, 256, {0, 3, 8}},  // causal GQA; the last sequence has one real key
      {4, 2, 9, 9, true, 0, 0, 3, {2, 0, 5}},     // strict, several query blocks, padded rows see nothing
      {4, 4, 6, 6, true, 3, 0, 2, {1, 4, 0}},     // strict + window
      {8, 2, 3, 10, false, 4, 7, 256, {6, 0, 2}}, // chunk after a past (q_offset), window, GQA 4
      {8, 1, 1, 7, true, 0, 6, 256, {3, 6, 0}},   // one decoded token, MQA; a sequence with no visible key
  };
  for (const Case& c : cases) {
    const int64_t B = c.key_start.size(), D = 8;
    auto opts = torch::TensorOptions().dtype(torch::kDouble);
    torch::Tensor q = torch::randn({B, c.Hq, c.T, D}, opts).requires_grad_(true);
    torch::Tensor k = torch::randn({B, c.Hkv, c.S, D}, opts).requires_grad_(true);
    torch::Tensor v = torch::randn({B, c.Hkv, c.S, D}, opts).requires_grad_(true);
    torch::Tensor g = torch::randn({B, c.Hq, c.T, D}, opts);
    ops::AttentionParams p{{c.strict, c.window, c.q_offset, torch::tensor(c.key_start, torch::kLong)}, 0, c.block};
    torch::Tensor out = ops::condensed_attention(q, k, v, p);
    torch::Tensor ref = naive_attention(q, k, v, c.strict, c.window, c.q_offset, c.key_start);
    INFO("T=" << c.T << " S=" << c.S << " strict=" << c.strict << " window=" << c.window << " offset=" << c.q_offset);
    REQUIRE_FALSE(out.isnan().any().item<bool>());
    CHECK(max_diff(out, ref) < 1e-12);
    auto grads = torch::autograd::grad({(out * g).sum()}, {q, k, v});
    auto ref_grads = torch::autograd::grad({(ref * g).sum()}, {q, k, v});
    for (int i = 0; i < 3; ++i) CHECK(max_diff(grads[i], ref_grads[i]) < 1e-12);
  }
  torch::Tensor q = torch::randn({2, 2, 3, 4}), k = torch::randn({2, 2, 3, 4});
  ops::AttentionParams bad;
  bad.mask.key_start = torch::zeros({3}, torch::kLong);
  CHECK_THROWS_WITH(ops::condensed_attention(q, k, k, bad), Catch::Contains("key_start must be an int64 tensor [B = 2]"));
}

TEST_CASE("cache memory is #KV layers x batch x positions x kv_heads x head_dim x 2 x dtype bytes", "[cache]") {
  const LCKVConfig llama = LCKVConfig::from_file("configs/tiny-llama.json");
  const LCKVConfig w2 = LCKVConfig::from_file("configs/tiny-lckv-w2.json");
  for (const LCKVConfig* c : {&llama, &w2}) {
    CondensedKVCache cache(*c, 3, 40, torch::TensorOptions().dtype(torch::kBFloat16));
    const int64_t expected = static_cast<int64_t>(c->kv_layers().size()) * 3 * 40 * c->num_key_value_heads * c->head_dim * 2 * 2;
    CHECK(cache.memory_bytes() == expected);
    CHECK(CondensedKVCache::bytes_for(*c, 3, 40, torch::kBFloat16) == expected);
  }
  // The Llama/LCKV ratio is L / #KV layers: 8 / 3 for w=2 on 8 layers (layers 0, 6, 7 compute KV).
  REQUIRE(w2.kv_layers() == std::vector<int>{0, 6, 7});
  CHECK(CondensedKVCache::bytes_for(llama, 5, 100, torch::kFloat) * 3 ==
        CondensedKVCache::bytes_for(w2, 5, 100, torch::kFloat) * 8);
}

TEST_CASE("max_batch_for_budget finds the largest batch that fits and rejects a budget below batch 1", "[cache]") {
  const LCKVConfig c = LCKVConfig::from_file("configs/tiny-lckv-w2.json");
  for (int64_t budget : {int64_t(1) << 20, int64_t(77777777), int64_t(1) << 31}) {
    const int64_t b = max_batch_for_budget(c, 256, torch::kBFloat16, budget);
    CHECK(CondensedKVCache::bytes_for(c, b, 256, torch::kBFloat16) <= budget);
    CHECK(CondensedKVCache::bytes_for(c, b + 1, 256, torch::kBFloat16) > budget);
  }
  CHECK_THROWS_WITH(max_batch_for_budget(c, 256, torch::kBFloat16, 1000), Catch::Contains("too small for batch 1"));
}

TEST_CASE("cached chunked prefill of left-padded prompts equals the sequential definition (exact mode)", "[cache]") {
  const std::vector<std::vector<int64_t>> prompts = {{5, 17, 3, 22, 9, 1, 30}, {8, 2}, {11, 4, 39, 6, 13}};
  for (const ModelCase& mc : kModelCases) {
    LCKVForCausalLM m = make_model(small_config(mc.layer_types, mc.layers, mc.heads, mc.kv_heads));
    torch::NoGradGuard no_grad;
    std::vector<torch::Tensor> refs;
    for (const auto& p : prompts) refs.push_back(m->forward_sequential(row(p)).logits[0]);
    for (int64_t chunk : {7, 3, 1}) {
      torch::Tensor logits = cached_prefill_logits(m, prompts, chunk, PrefillMode::kExact);
      for (size_t b = 0; b < prompts.size(); ++b) {
        const int64_t len = prompts[b].size(), pad = 7 - len;
        INFO(mc.layer_types << " chunk " << chunk << " sequence " << b);
        CHECK(max_diff(logits[b].narrow(0, pad, len), refs[b]) < 1e-10);
      }
    }
  }
}

TEST_CASE("iterative prefill of a padded batch equals the parallel plan of each prompt alone", "[cache]") {
  // With m + b < T the iterative prefill is not exact, but pads must not change it: each sequence
  // gets what the parallel forward with the config's m, b gives it alone.
  const std::vector<std::vector<int64_t>> prompts = {{5, 17, 3, 22, 9, 1, 30}, {8, 2, 19, 7}};
  for (const ModelCase& mc : kModelCases) {
    LCKVForCausalLM m = make_model(small_config(mc.layer_types, mc.layers, mc.heads, mc.kv_heads));
    torch::NoGradGuard no_grad;
    torch::Tensor logits = cached_prefill_logits(m, prompts, 7, PrefillMode::kIterative);
    for (size_t b = 0; b < prompts.size(); ++b) {
      const int64_t len = prompts[b].size();
      torch::Tensor ref = m->forward(row(prompts[b]), {}, m->default_iterations()).logits[0];
      INFO(mc.layer_types << " sequence " << b);
      CHECK(max_diff(logits[b].narrow(0, 7 - len, len), ref) < 1e-10);
    }
  }
}

TEST_CASE("prefill + token-by-token decode equals the sequential definition (invariant 4)", "[cache]") {
  const std::vector<std::vector<int64_t>> prompts = {{5, 17, 3, 22, 9, 1}, {8}, {11, 4, 39}};
  for (const ModelCase& mc : kModelCases) {
    LCKVForCausalLM m = make_model(small_config(mc.layer_types, mc.layers, mc.heads, mc.kv_heads));
    struct Mode {
      PrefillMode prefill;
      int64_t chunk;
    };
    // Iterative prefill is exact here too: the config's m + b = 3 iterations cover chunks of 3.
    for (Mode mode : {Mode{PrefillMode::kExact, 0}, Mode{PrefillMode::kExact, 4}, Mode{PrefillMode::kIterative, 3}}) {
      GenerationConfig g;
      g.max_new_tokens = 7;
      g.prefill = mode.prefill;
      g.prefill_chunk = mode.chunk;
      g.return_logits = true;
      GenerationResult r = generate(m, prompts, g);
      REQUIRE(r.logits.size(1) == 7);
      torch::NoGradGuard no_grad;
      for (size_t b = 0; b < prompts.size(); ++b) {
        std::vector<int64_t> full = prompts[b];
        full.insert(full.end(), r.tokens[b].begin(), r.tokens[b].end() - 1);
        torch::Tensor ref = m->forward_sequential(row(full)).logits[0].narrow(0, prompts[b].size() - 1, 7);
        INFO(mc.layer_types << " prefill " << to_string(mode.prefill) << " chunk " << mode.chunk << " sequence " << b);
        CHECK(max_diff(r.logits[b], ref) < 1e-10);
        const torch::Tensor greedy = ref.argmax(-1).contiguous();
        CHECK(r.tokens[b] == std::vector<int64_t>(greedy.data_ptr<int64_t>(), greedy.data_ptr<int64_t>() + 7));
      }
    }
  }
}

TEST_CASE("StreamingLLM eviction shifts kept keys and re-rotates them to their new slots", "[cache][streaming]") {
  LCKVConfig c = small_config("0_2_2_3", 4, 4, 2);
  torch::manual_seed(3);
  const int64_t B = 2, Hkv = 2, D = c.head_dim, C = 8, sink = 2, block = 3;
  CondensedKVCache cache(c, B, C, torch::TensorOptions().dtype(torch::kDouble), StreamingOptions{sink, block});
  RotaryEmbedding rope(c);
  auto rotated = [&](const torch::Tensor& k, int64_t first_position) {
    auto [cos, sin] = rope.cos_sin(torch::arange(first_position, first_position + k.size(2)), torch::kDouble);
    const int64_t half = D / 2;  // HF rotate_half, written out: the reference for the cache's own rotation
    return k * cos + torch::cat({-k.narrow(-1, half, half), k.narrow(-1, 0, half)}, -1) * sin;
  };
  // Fill the cache with C tokens whose unrotated keys are known.
  torch::Tensor k_raw = torch::randn({B, Hkv, C, D}, torch::kDouble), v = torch::randn({B, Hkv, C, D}, torch::kDouble);
  cache.make_room(C);
  for (int layer : c.kv_layers()) cache.write(layer, rotated(k_raw, 0), v);
  cache.advance(C);
  // One more token: evicts `block` slots after the sinks.
  cache.make_room(1);
  CHECK(cache.past_length() == C - block);
  CHECK(cache.evicted() == block);
  CHECK(cache.positions(1)[0][0].item<int64_t>() == C - block);
  torch::Tensor k_new = torch::randn({B, Hkv, 1, D}, torch::kDouble);
  for (int layer : c.kv_layers()) cache.write(layer, k_new, k_new);
  for (int layer : c.kv_layers()) {
    KV kv = cache.read(layer);
    REQUIRE(kv.k.size(2) == C - block + 1);
    // Sinks untouched; the kept tokens sink+block.. now sit at slots sink.. with keys rotated there.
    CHECK(max_diff(kv.k.narrow(2, 0, sink), rotated(k_raw.narrow(2, 0, sink), 0)) == 0);
    CHECK(max_diff(kv.k.narrow(2, sink, C - sink - block), rotated(k_raw.narrow(2, sink + block, C - sink - block), sink)) < 1e-12);
    CHECK(max_diff(kv.v.narrow(2, sink, C - sink - block), v.narrow(2, sink + block, C - sink - block)) == 0);
  }
}

TEST_CASE("StreamingLLM without sinks equals the sequential definition with a sliding window of the cache size", "[cache][streaming]") {
  // With sink 0 and eviction one slot at a time, each query sees exactly the last C tokens, with
  // RoPE distances preserved by the re-rotation: what every layer with a window of C computes.
  const int64_t C = 5;
  for (const char* types : {"0s_1s_2s_3s", "0s_4s_4s_4s_4s_5s", "0s_0s_2s_2s", "0s_2s_1s_3s"}) {
    const LCKVConfig c = small_config(types, static_cast<int>(std::count(types, types + std::strlen(types), '_') + 1), 4, 2, C);
    LCKVForCausalLM m = make_model(c, 1);
    const std::vector<std::vector<int64_t>> prompts = {{3, 9, 27, 1}, {14, 2, 8, 40}};
    GenerationConfig g;
    g.max_new_tokens = 12;  // 16 tokens through a cache of 5
    g.cache_capacity = C;
    g.streaming = StreamingOptions{0, 1};
    g.prefill = PrefillMode::kExact;
    g.return_logits = true;
    GenerationResult r = generate(m, prompts, g);
    CHECK(r.stats.evicted == 4 + (12 - 1) - C);  // tokens through the cache beyond its C slots
    torch::NoGradGuard no_grad;
    for (size_t b = 0; b < prompts.size(); ++b) {
      std::vector<int64_t> full = prompts[b];
      full.insert(full.end(), r.tokens[b].begin(), r.tokens[b].end() - 1);
      torch::Tensor ref = m->forward_sequential(row(full)).logits[0].narrow(0, 3, 12);
      INFO(types << " sequence " << b);
      CHECK(max_diff(r.logits[b], ref) < 1e-10);
    }
  }
}

TEST_CASE("StreamingLLM generates far beyond the training length in bounded memory", "[cache][streaming]") {
  LCKVConfig c = small_config("0_4_4_4_4_5", 6, 4, 2);
  c.max_position_embeddings = 16;
  LCKVForCausalLM m = make_model(c, 2);
  m->to(torch::kFloat);
  GenerationConfig g;
  g.max_new_tokens = 200;
  g.cache_capacity = 12;
  g.streaming = StreamingOptions{4, 3};
  g.sampling.do_sample = true;
  g.seed = 7;
  g.return_logits = true;
  GenerationResult r = generate(m, {{1, 2, 3}, {5, 6, 7, 8, 9, 10}}, g);
  CHECK(r.tokens[0].size() == 200);
  CHECK(r.stats.cache_bytes == CondensedKVCache::bytes_for(c, 2, 12, torch::kFloat));
  CHECK(r.stats.evicted >= 200 + 6 - 12);
  CHECK(r.logits.isfinite().all().item<bool>());
  // Without StreamingLLM the same request is refused up front.
  g.streaming.reset();
  CHECK_THROWS_WITH(generate(m, {{1, 2, 3}}, g), Catch::Contains("cannot hold the longest prompt"));
}

TEST_CASE("decode_nll through a cache that holds the text equals the sequential loss", "[cache][streaming]") {
  LCKVForCausalLM m = make_model(small_config("0_4_4_4_4_5", 6, 4, 2));
  const std::vector<int64_t> text = {3, 9, 27, 1, 14, 2, 8, 40, 22, 5};
  torch::NoGradGuard no_grad;
  const double ref = m->forward_sequential(row(text), row(text)).loss.item<double>();
  CHECK(std::abs(decode_nll(m, text, 10, std::nullopt) - ref) < 1e-10);
  // Beyond a small streaming cache it is still finite, and differs (fewer keys are seen).
  const double streamed = decode_nll(m, text, 5, StreamingOptions{1, 1});
  CHECK(std::isfinite(streamed));
  CHECK(std::abs(streamed - ref) > 1e-6);
  CHECK_THROWS_WITH(decode_nll(m, text, 5, std::nullopt), Catch::Contains("exceed the cache capacity of 5"));
}

TEST_CASE("sampling: greedy, top-k, top-p, temperature, repetition penalty and seeds", "[cache][sampling]") {
  torch::Tensor logits = torch::tensor({std::log(0.5), std::log(0.3), std::log(0.2)}, torch::kDouble).repeat({4000, 1});
  auto draw = [&](SamplingConfig s, uint64_t seed) {
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    return select_next_tokens(logits, s, {}, gen);
  };
  CHECK(draw(SamplingConfig{}, 0).eq(0).all().item<bool>());  // greedy
  SamplingConfig s;
  s.do_sample = true;
  torch::Tensor plain = draw(s, 1);
  CHECK(std::abs(plain.eq(2).to(torch::kDouble).mean().item<double>() - 0.2) < 0.03);
  CHECK(torch::equal(plain, draw(s, 1)));       // same seed, same draws
  CHECK_FALSE(torch::equal(plain, draw(s, 2)));
  s.top_k = 2;
  torch::Tensor k2 = draw(s, 3);
  CHECK(k2.ne(2).all().item<bool>());
  CHECK(std::abs(k2.eq(0).to(torch::kDouble).mean().item<double>() - 0.5 / 0.8) < 0.03);
  s.top_k = 0;
  s.top_p = 0.7;  // 0.5 < 0.7, 0.5 + 0.3 >= 0.7: keeps tokens 0 and 1
  CHECK(draw(s, 4).ne(2).all().item<bool>());
  s.top_p = 0.4;  // the most likely token alone
  CHECK(draw(s, 5).eq(0).all().item<bool>());
  s.top_p = 1.0;
  s.temperature = 0.25;  // p ~ 0.5^4 : 0.3^4 : 0.2^4
  const double w0 = std::pow(0.5, 4), w2 = std::pow(0.2, 4), total = w0 + std::pow(0.3, 4) + w2;
  CHECK(std::abs(draw(s, 6).eq(0).to(torch::kDouble).mean().item<double>() - w0 / total) < 0.03);
  // Repetition penalty, hand-computed: seen positive logits are divided, negative ones multiplied.
  SamplingConfig rp;
  rp.repetition_penalty = 2.0;
  torch::Tensor x = torch::tensor({{1.0, -1.0, 3.0}}, torch::kDouble);
  torch::Tensor seen = torch::tensor({true, true, false}).view({1, 3});
  CHECK(max_diff(process_logits(x, rp, seen), torch::tensor({{0.5, -2.0, 3.0}}, torch::kDouble)) == 0);
}

TEST_CASE("generation stops at stop tokens and streams every step to the callback", "[cache][sampling]") {
  LCKVForCausalLM m = make_model(small_config("0_4_4_4_4_5", 6, 4, 2));
  GenerationConfig g;
  g.max_new_tokens = 10;
  GenerationResult free_run = generate(m, {{5, 6, 7}}, g);
  REQUIRE(free_run.tokens[0].size() == 10);
  g.stop_tokens = {free_run.tokens[0][3]};
  int calls = 0;
  GenerationResult stopped = generate(m, {{5, 6, 7}, {1}}, g, [&](const torch::Tensor& t, const std::vector<bool>& active) {
    ++calls;
    return t.size(0) == 2 && active.size() == 2;
  });
  const auto& first = stopped.tokens[0];
  const auto stop_at = std::find(free_run.tokens[0].begin(), free_run.tokens[0].end(), g.stop_tokens[0]) - free_run.tokens[0].begin();
  CHECK(first == std::vector<int64_t>(free_run.tokens[0].begin(), free_run.tokens[0].begin() + stop_at + 1));
  CHECK(calls == stopped.stats.steps);
  // A callback returning false ends generation after that step.
  GenerationResult one = generate(m, {{5, 6, 7}}, g, [](const torch::Tensor&, const std::vector<bool>&) { return false; });
  CHECK(one.tokens[0].size() == 1);
}

TEST_CASE("generation rejects bad input with clear errors", "[cache][errors]") {
  LCKVForCausalLM m = make_model(small_config("0_4_4_4_4_5", 6, 4, 2));
  GenerationConfig g;
  g.max_new_tokens = 4;
  CHECK_THROWS_WITH(generate(m, {{1, 2}, {}}, g), Catch::Contains("prompt 1 is empty"));
  CHECK_THROWS_WITH(generate(m, {}, g), Catch::Contains("no prompts"));
  CHECK_THROWS_WITH(generate(m, {{1, 41, 2}}, g), Catch::Contains("prompt 0 has token id 41 at position 1") &&
                                                        Catch::Contains("[0, 41)"));
  CHECK_THROWS_WITH(generate(m, {{1, -3}}, g), Catch::Contains("token id -3"));
  g.cache_capacity = 5;  // the prompt alone is longer than the cache
  CHECK_THROWS_WITH(generate(m, {{1, 2, 3, 4, 5, 6}}, g), Catch::Contains("cache of 5 slots cannot hold"));
  g.cache_capacity = 0;
  g.sampling.top_p = 0;
  CHECK_THROWS_WITH(generate(m, {{1}}, g), Catch::Contains("top_p = 0"));
  g.sampling = {};
  g.sampling.do_sample = true;
  g.sampling.temperature = 0;
  CHECK_THROWS_WITH(generate(m, {{1}}, g), Catch::Contains("temperature"));
  g.sampling = {};
  g.max_new_tokens = 0;
  CHECK_THROWS_WITH(generate(m, {{1}}, g), Catch::Contains("max_new_tokens"));
  CHECK_THROWS_WITH(parse_prefill_mode("fast"), Catch::Contains("'fast' is unknown"));
  CHECK_THROWS_WITH(check_tokenizer_vocab(m->config, 50, "tok.model"), Catch::Contains("tok.model has 50 tokens") &&
                                                                           Catch::Contains("vocab_size is 41"));
  CHECK_NOTHROW(check_tokenizer_vocab(m->config, 41, "tok.model"));
  // A cache refuses chunks beyond its capacity without StreamingLLM.
  CondensedKVCache cache(m->config, 1, 4, torch::TensorOptions().dtype(torch::kDouble));
  CHECK_THROWS_WITH(cache.make_room(5), Catch::Contains("exceed the cache capacity of 4"));
  CHECK_THROWS_WITH(cache.read(1), Catch::Contains("layer 1 computes no KV"));
}
