// Generation through the condensed KV cache: prefill + token-by-token decode equals the
// sequential definition (invariant 4 of docs/design.md §2, fp64) for several layer_types, both prefill
// modes and chunked prefill; StreamingLLM generation and decode_nll; sampling; stop tokens and the
// streaming callback; bad input.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <set>

#include "lckv/cache/condensed_kv_cache.h"
#include "lckv/generate/generate.h"
#include "lckv/ops/accumulate.h"
#include "test_models.h"
#include "test_reference.h"

using namespace lckv;
using namespace lckv::testing;

TEST_CASE("prefill + token-by-token decode equals the sequential definition (invariant 4)", "[generate]") {
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

TEST_CASE("StreamingLLM without sinks equals the sequential definition with a sliding window of the cache size", "[generate][streaming]") {
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

TEST_CASE("StreamingLLM generates far beyond the training length in bounded memory", "[generate][streaming]") {
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

TEST_CASE("decode_nll through a cache that holds the text equals the sequential loss", "[generate][streaming]") {
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

TEST_CASE("sampling: greedy, top-k, top-p, temperature, repetition penalty and seeds", "[generate][sampling]") {
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

namespace {

// The sampling filters by their definition, with a full sort of each row (what process_logits did
// before it ranked only the top candidates): repetition penalty, temperature, then top-k (every token
// tied with the k-th stays), then top-p over the tokens ranked by logit, ties by token id (a stable
// sort), dropping a token when the ones before it hold top_p of the mass (softmax in token order,
// summed in rank order), all as ATen ops.
torch::Tensor full_sort_filters(const torch::Tensor& logits, const SamplingConfig& c, const torch::Tensor& seen = {}) {
  const double neg_inf = -std::numeric_limits<double>::infinity();
  torch::Tensor x = logits.clone();
  if (seen.defined() && c.repetition_penalty != 1.0) {
    x = torch::where(seen, torch::where(x < 0, x * c.repetition_penalty, x / c.repetition_penalty), x);
  }
  x = x / c.temperature;
  const int64_t V = x.size(1);
  if (c.top_k > 0 && c.top_k < V) {
    const torch::Tensor kth = std::get<0>(x.sort(-1, true)).narrow(1, c.top_k - 1, 1);
    x.masked_fill_(x < kth, neg_inf);
  }
  if (c.top_p < 1) {
    const torch::Tensor order = std::get<1>(x.sort(/*stable=*/true, -1, /*descending=*/true));
    const torch::Tensor probs = x.softmax(-1).gather(-1, order);
    const torch::Tensor drop = (probs.cumsum(-1) - probs) >= c.top_p;
    x.masked_fill_(torch::zeros_like(drop).scatter(-1, order, drop), neg_inf);
  }
  return x;
}

at::Generator seeded(uint64_t seed) { return at::make_generator<at::CPUGeneratorImpl>(seed); }

}  // namespace

TEST_CASE("top-k and top-p by partial selection equal the full-sort definition bitwise", "[generate][sampling]") {
  // Rows whose nucleus is a few tokens (peaked), most of the vocabulary (flat: a full ranking),
  // heavy-tailed ones in between, ties (logits on a coarse grid), -inf entries, tiny and large
  // vocabularies, batch 1 and 32; p = 1, k = 1, k beyond the vocabulary, temperatures; fp32 and fp64.
  torch::manual_seed(11);
  struct Rows {
    const char* what;
    torch::Tensor logits;
  };
  const int64_t B = 16;
  torch::Tensor with_neg_inf = torch::randn({B, 2000}) * 2;
  with_neg_inf.masked_fill_(torch::rand({B, 2000}) < 0.3, -std::numeric_limits<double>::infinity());
  with_neg_inf[0].fill_(-std::numeric_limits<double>::infinity());
  with_neg_inf[0][1234] = 0.5;  // one finite token
  torch::Tensor peaked = torch::randn({32, 4096});
  peaked.narrow(1, 100, 5) += 9;  // a nucleus of ~5 tokens
  const torch::Tensor zeros = torch::zeros({B, 50});
  const torch::Tensor signed_zeros = torch::cat({-zeros, zeros, torch::randn({B, 50})}, 1);
  torch::Tensor fine_ties = torch::randint(0, 40, {B, 3000}).to(torch::kFloat) * 0.01;  // tied candidates and cut
  std::vector<Rows> rows = {
      {"heavy-tailed, V = 32000, batch 32", torch::randn({32, 32000}) * 4},
      {"peaked, V = 4096, batch 32", peaked},
      {"peaked, batch 1", peaked.narrow(0, 3, 1)},
      {"flat, V = 5000", torch::randn({B, 5000}) * 0.05},
      {"flat, V = 32000, batch 32", torch::randn({32, 32000}) * 0.1},
      {"flat, V = 4096, batch 1", torch::randn({1, 4096}) * 0.1},
      {"mixed peaked and flat rows", torch::cat({torch::randn({B / 2, 3000}) * 5, torch::randn({B / 2, 3000}) * 0.1})},
      {"ties on a coarse grid", torch::randint(0, 6, {B, 700}).to(torch::kFloat)},
      {"ties on a fine grid", fine_ties},
      {"all tied", torch::zeros({B, 300})},
      {"all tied, V = 4096 (p = 2^-12: cumsum - p lands on top_p = 0.5 exactly)", torch::zeros({2, 4096})},
      {"-inf entries", with_neg_inf},
      {"signed zeros (-0 first)", signed_zeros},
      {"V = 3", torch::randn({B, 3})},
      {"V = 1", torch::randn({B, 1})},
  };
  const SamplingConfig base{true};
  std::vector<SamplingConfig> configs;
  for (double p : {1.0, 0.999, 0.9, 0.5, 0.05}) {
    for (int64_t k : {int64_t(0), int64_t(1), int64_t(50), int64_t(1000), int64_t(100000)}) {
      for (double t : {1.0, 0.6}) {
        SamplingConfig c = base;
        c.top_p = p, c.top_k = k, c.temperature = t;
        configs.push_back(c);
      }
    }
  }
  uint64_t seed = 100;
  for (const Rows& r : rows) {
    for (torch::ScalarType dt : {torch::kFloat, torch::kDouble}) {
      const torch::Tensor logits = r.logits.to(dt);
      for (const SamplingConfig& c : configs) {
        INFO(r.what << ", " << dt << ", top_p " << c.top_p << ", top_k " << c.top_k << ", temperature "
                    << c.temperature);
        const torch::Tensor want = full_sort_filters(logits, c);
        const torch::Tensor got = process_logits(logits, c, {});
        REQUIRE(torch::equal(got.isneginf(), want.isneginf()));
        CHECK(torch::equal(got, want));
        // A drawn token is never a filtered one, and the same seed gives the same draws.
        at::Generator g1 = seeded(seed), g2 = seeded(seed);
        ++seed;
        const torch::Tensor drawn = select_next_tokens(logits, c, {}, g1);
        CHECK(want.gather(1, drawn.unsqueeze(1)).isfinite().all().item<bool>());
        CHECK(torch::equal(drawn, select_next_tokens(logits, c, {}, g2)));
      }
    }
  }
}

TEST_CASE("the repetition penalty and greedy argmax equal their ATen definitions bitwise", "[generate][sampling]") {
  torch::manual_seed(5);
  for (torch::ScalarType dt : {torch::kFloat, torch::kDouble, torch::kBFloat16}) {
    const torch::Tensor logits = (torch::randn({8, 1000}) * 3).to(dt);
    const torch::Tensor seen = torch::rand({8, 1000}) < 0.2;
    const torch::Tensor x = logits.to(ops::accumulate_dtype(dt));
    for (double penalty : {1.3, 0.7}) {
      SamplingConfig greedy;
      greedy.repetition_penalty = penalty;
      INFO(dt << ", repetition_penalty " << penalty);
      const torch::Tensor want = torch::where(seen, torch::where(x < 0, x * penalty, x / penalty), x);
      CHECK(torch::equal(process_logits(logits, greedy, seen), want));
      at::Generator g = seeded(1);
      CHECK(torch::equal(select_next_tokens(logits, greedy, seen, g), want.argmax(-1)));
      SamplingConfig sample = greedy;
      sample.do_sample = true, sample.temperature = 0.7, sample.top_k = 40, sample.top_p = 0.8;
      CHECK(torch::equal(process_logits(logits, sample, seen), full_sort_filters(x, sample, seen)));
    }
  }
  // Ties: the first maximum, as torch::argmax.
  at::Generator g = seeded(1);
  CHECK(select_next_tokens(torch::tensor({{1.0, 3.0, 3.0, 2.0}}), SamplingConfig{}, {}, g).item<int64_t>() == 1);
}

TEST_CASE("sampled tokens follow the filtered distribution, row by row", "[generate][sampling]") {
  // Seven tokens with known probabilities (not in rank order); the expected distribution after each
  // filter is computed here by hand in fp64. 20000 draws with a fixed seed: every frequency within
  // 4.5 standard errors of its probability, filtered tokens never drawn.
  const std::vector<double> probs = {0.1, 0.3, 0.02, 0.25, 0.08, 0.2, 0.05};
  torch::Tensor row_logits = torch::log(torch::tensor(probs, torch::kDouble)).view({1, 7});
  struct Case {
    const char* what;
    SamplingConfig c;
    std::vector<double> weight;  // unnormalised expected probabilities
  };
  auto cfg = [](double t, int64_t k, double p) {
    SamplingConfig c{true};
    c.temperature = t, c.top_k = k, c.top_p = p;
    return c;
  };
  std::vector<double> tempered;
  for (double q : probs) tempered.push_back(std::pow(q, 1 / 0.7));
  const std::vector<Case> cases = {
      {"plain", cfg(1, 0, 1), probs},
      // ranks 0.3, 0.25, 0.2, 0.1 (mass before: 0, 0.3, 0.55, 0.75 < 0.8), then 0.08 (0.85 >= 0.8) dropped
      {"top_p 0.8", cfg(1, 0, 0.8), {0.1, 0.3, 0, 0.25, 0, 0.2, 0}},
      {"top_k 3", cfg(1, 3, 1), {0, 0.3, 0, 0.25, 0, 0.2, 0}},
      {"temperature 0.7", cfg(0.7, 0, 1), tempered},
      {"top_k 5 then top_p 0.6", cfg(1, 5, 0.6), {0, 0.3, 0, 0.25, 0, 0.2, 0}},  // masses 0.3/0.93, 0.55/0.93
  };
  const int64_t N = 20000;
  for (const Case& k : cases) {
    INFO(k.what);
    at::Generator gen = seeded(2024);
    const torch::Tensor drawn = select_next_tokens(row_logits.expand({N, 7}), k.c, {}, gen);
    const torch::Tensor counts = torch::bincount(drawn, {}, 7).to(torch::kDouble);
    double total = 0;
    for (double w : k.weight) total += w;
    for (int64_t v = 0; v < 7; ++v) {
      const double q = k.weight[v] / total, freq = counts[v].item<double>() / N;
      INFO("token " << v << ": expected " << q << ", drawn " << freq);
      if (q == 0) {
        CHECK(freq == 0);
      } else {
        CHECK(std::abs(freq - q) <= 4.5 * std::sqrt(q * (1 - q) / N));
      }
    }
    // One uniform per row from the generator, in row order: drawing the rows one at a time from the
    // same seed gives the same tokens.
    at::Generator one_by_one = seeded(2024);
    for (int64_t b = 0; b < 50; ++b) {
      CHECK(select_next_tokens(row_logits, k.c, {}, one_by_one).item<int64_t>() == drawn[b].item<int64_t>());
    }
  }
}

TEST_CASE("a row's draw depends only on its own logits and its place in the batch", "[generate][sampling]") {
  torch::manual_seed(3);
  const torch::Tensor logits = torch::cat({torch::randn({6, 500}) * 3, torch::randn({6, 500}) * 0.1});
  SamplingConfig c{true};
  c.top_p = 0.9, c.top_k = 200;
  at::Generator g = seeded(77);
  const torch::Tensor batch = select_next_tokens(logits, c, {}, g);
  torch::Tensor other = torch::randn({12, 500}) * 2;  // every other row replaced
  for (int64_t b = 0; b < 12; ++b) {
    INFO("row " << b);
    // Alone, after the generator has given the rows before it their uniforms.
    at::Generator alone = seeded(77);
    if (b > 0) select_next_tokens(logits.narrow(0, 0, b), c, {}, alone);
    CHECK(select_next_tokens(logits.narrow(0, b, 1), c, {}, alone).item<int64_t>() == batch[b].item<int64_t>());
    other[b] = logits[b];
    at::Generator mixed = seeded(77);
    CHECK(select_next_tokens(other, c, {}, mixed)[b].item<int64_t>() == batch[b].item<int64_t>());
    other[b] = torch::randn({500}) * 2;
  }
}

TEST_CASE("sampling rejects rows with nothing to draw and malformed input", "[generate][sampling][errors]") {
  SamplingConfig c{true};
  at::Generator g = seeded(1);
  const double neg_inf = -std::numeric_limits<double>::infinity();
  CHECK_THROWS_WITH(select_next_tokens(torch::tensor({{0.0, 1.0}, {neg_inf, neg_inf}}), c, {}, g),
                    Catch::Contains("row 1 has no token to draw"));
  CHECK_THROWS_WITH(select_next_tokens(torch::tensor({{0.0, std::nan("")}}), c, {}, g),
                    Catch::Contains("row 0 has no token to draw"));
  CHECK_THROWS_WITH(select_next_tokens(torch::zeros({2, 0}), c, {}, g), Catch::Contains("vocab >= 1"));
  CHECK_THROWS_WITH(process_logits(torch::zeros({4}), c, {}), Catch::Contains("must be [batch, vocab]"));
  SamplingConfig rp;
  rp.repetition_penalty = 1.5;
  CHECK_THROWS_WITH(process_logits(torch::zeros({2, 3}), rp, torch::zeros({2, 3}, torch::kLong)),
                    Catch::Contains("seen must be bool"));
  CHECK_THROWS_WITH(process_logits(torch::zeros({2, 3}), rp, torch::zeros({2, 4}, torch::kBool)),
                    Catch::Contains("seen must be [2, 3]"));
}

TEST_CASE("generation stops at stop tokens and streams every step to the callback", "[generate][sampling]") {
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

TEST_CASE("generation rejects bad input with clear errors", "[generate][errors]") {
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
}

TEST_CASE("static decode steps (fixed shapes over the whole cache) equal the sequential definition and dynamic decode",
          "[generate][static]") {
  // Independent check: the sequential definition; and against today's dynamic steps: the same keys
  // (the hidden slots weigh exactly 0), so fp64 logits agree to rounding and greedy tokens are identical.
  const std::vector<std::vector<int64_t>> prompts = {{5, 17, 3, 22, 9, 1}, {8}, {11, 4, 39}};
  for (const ModelCase& mc : kModelCases) {
    LCKVForCausalLM m = make_model(small_config(mc.layer_types, mc.layers, mc.heads, mc.kv_heads));
    GenerationConfig g;
    g.max_new_tokens = 7;
    g.prefill = PrefillMode::kExact;
    g.return_logits = true;
    g.cache_capacity = 6 + 7 + 3;  // slots no step reaches stay hidden zeros
    const GenerationResult dynamic = generate(m, prompts, g);
    g.decode_step = DecodeStep::kStatic;
    const GenerationResult fixed = generate(m, prompts, g);
    INFO(mc.layer_types);
    CHECK(fixed.tokens == dynamic.tokens);
    CHECK(max_diff(fixed.logits, dynamic.logits) < 1e-12);
    torch::NoGradGuard no_grad;
    for (size_t b = 0; b < prompts.size(); ++b) {
      std::vector<int64_t> full = prompts[b];
      full.insert(full.end(), fixed.tokens[b].begin(), fixed.tokens[b].end() - 1);
      const torch::Tensor ref = m->forward_sequential(row(full)).logits[0].narrow(0, prompts[b].size() - 1, 7);
      INFO("sequence " << b);
      CHECK(max_diff(fixed.logits[b], ref) < 1e-10);
    }
  }
}

TEST_CASE("static decode steps with StreamingLLM eviction equal dynamic ones", "[generate][static][streaming]") {
  for (const char* types : {"0s_4s_4s_4s_4s_5s", "0_4_4_4_4_5"}) {
    LCKVForCausalLM m = make_model(small_config(types, 6, 4, 2, 5), 3);
    GenerationConfig g;
    g.max_new_tokens = 20;  // far beyond the 8 slots
    g.cache_capacity = 8;
    g.streaming = StreamingOptions{2, 3};
    g.return_logits = true;
    const std::vector<std::vector<int64_t>> prompts = {{3, 9, 27, 1}, {14, 2}};
    const GenerationResult dynamic = generate(m, prompts, g);
    g.decode_step = DecodeStep::kStatic;
    const GenerationResult fixed = generate(m, prompts, g);
    INFO(types);
    CHECK(fixed.stats.evicted == dynamic.stats.evicted);
    CHECK(fixed.stats.evicted > 0);
    CHECK(fixed.tokens == dynamic.tokens);
    CHECK(max_diff(fixed.logits, dynamic.logits) < 1e-12);
  }
}

TEST_CASE("static decode steps in fp32 and sampled agree with dynamic ones", "[generate][static]") {
  LCKVForCausalLM m = make_model(small_config("0_4_4_4_4_5", 6, 4, 2), 4);
  m->to(torch::kFloat);
  GenerationConfig g;
  g.max_new_tokens = 16;
  g.sampling.do_sample = true;
  g.sampling.top_p = 0.9;
  g.seed = 5;
  g.return_logits = true;
  const std::vector<std::vector<int64_t>> prompts = {{1, 2, 3}, {5, 6, 7, 8, 9, 10}};
  const GenerationResult dynamic = generate(m, prompts, g);
  g.decode_step = DecodeStep::kStatic;
  const GenerationResult fixed = generate(m, prompts, g);
  CHECK(fixed.tokens == dynamic.tokens);
  CHECK(max_diff(fixed.logits, dynamic.logits) < 1e-5);
}

TEST_CASE("decode_step names parse and cuda_graph refuses a CPU model", "[generate][static][errors]") {
  CHECK(parse_decode_step("dynamic") == DecodeStep::kDynamic);
  CHECK(parse_decode_step("static") == DecodeStep::kStatic);
  CHECK(parse_decode_step("cuda_graph") == DecodeStep::kCudaGraph);
  for (DecodeStep s : {DecodeStep::kDynamic, DecodeStep::kStatic, DecodeStep::kCudaGraph}) {
    CHECK(parse_decode_step(to_string(s)) == s);
  }
  CHECK_THROWS_WITH(parse_decode_step("graph"), Catch::Contains("'graph' is unknown") && Catch::Contains("cuda_graph"));
  LCKVForCausalLM m = make_model(small_config("0_4_4_4_4_5", 6, 4, 2));
  GenerationConfig g;
  g.decode_step = DecodeStep::kCudaGraph;
  CHECK_THROWS_WITH(generate(m, {{1, 2}}, g), Catch::Contains("cuda_graph needs"));
}

namespace {

// The ATen ops run inside the scope named `scope` while installed (RecordFunction callbacks).
struct OpsInScope {
  explicit OpsInScope(std::string scope_name) {
    scope = std::move(scope_name);
    handle = at::addGlobalCallback(at::RecordFunctionCallback(
                                       [](const at::RecordFunction& fn) -> std::unique_ptr<at::ObserverContext> {
                                         std::lock_guard<std::mutex> lock(mutex);
                                         if (fn.name() == scope) ++depth;
                                         else if (depth > 0) names.insert(fn.name());
                                         return nullptr;
                                       },
                                       [](const at::RecordFunction& fn, at::ObserverContext*) {
                                         std::lock_guard<std::mutex> lock(mutex);
                                         if (fn.name() == scope) --depth;
                                       })
                                       .needsInputs(false));
  }
  ~OpsInScope() { at::removeCallback(handle); }
  at::CallbackHandle handle;
  static inline std::mutex mutex;
  static inline std::string scope;
  static inline int depth = 0;
  static inline std::set<std::string> names;
};

}  // namespace

TEST_CASE("a static decode step never syncs with the host (a CUDA graph capture could not hold it)",
          "[generate][static]") {
  // Ops that read a tensor's value on the host or whose output shape depends on values: on a GPU each is a
  // device-to-host sync, an error inside a CUDA graph capture. Checked on CPU by the ops the step runs.
  const std::set<std::string> syncs = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero",
                                       "aten::masked_select", "aten::unique", "aten::_unique2", "aten::is_nonzero",
                                       "aten::equal", "aten::nonzero_static"};
  for (const char* types : {"0_4_4_4_4_5", "0s_1s_2_2"}) {
    LCKVForCausalLM m = make_model(small_config(types, static_cast<int>(std::count(types, types + std::strlen(types), '_') + 1), 4, 2), 6);
    m->to(torch::kFloat);
    GenerationConfig g;
    g.max_new_tokens = 6;
    g.decode_step = DecodeStep::kStatic;
    g.streaming = StreamingOptions{1, 2};
    g.cache_capacity = 7;  // evictions between the steps
    OpsInScope::names.clear();
    {
      OpsInScope recording("lckv::static_decode_step");
      generate(m, {{3, 9, 27, 1}, {14, 2}}, g);  // ragged: a key_start
    }
    INFO(types);
    CHECK(OpsInScope::names.count("aten::index_copy_") == 1);  // the scope saw the step's KV writes
    for (const std::string& op : OpsInScope::names) {
      INFO("op " << op);
      CHECK(syncs.count(op) == 0);
    }
  }
}

TEST_CASE("greedy picks on the logits' device give the tokens of the host sampler", "[generate][sampling]") {
  // Without return_logits, plain greedy takes argmax where the logits are; with it, the host path of
  // select_next_tokens. The same tokens in every dtype, with a vocab_limit, and through static steps.
  const std::vector<std::vector<int64_t>> prompts = {{5, 17, 3, 22, 9, 1}, {8}, {11, 4, 39}};
  for (auto dtype : {torch::kDouble, torch::kFloat, torch::kBFloat16}) {
    LCKVForCausalLM m = make_model(small_config("0_4_4_4_4_5", 6, 4, 2), 8);
    m->to(dtype);
    for (int64_t vocab_limit : {0, 23}) {
      for (DecodeStep step : {DecodeStep::kDynamic, DecodeStep::kStatic}) {
        GenerationConfig g;
        g.max_new_tokens = 9;
        g.vocab_limit = vocab_limit;
        g.decode_step = step;
        const GenerationResult on_device = generate(m, prompts, g);
        g.return_logits = true;
        const GenerationResult on_host = generate(m, prompts, g);
        INFO(dtype << " vocab_limit " << vocab_limit << " " << to_string(step));
        CHECK(on_device.tokens == on_host.tokens);
        const torch::Tensor l = vocab_limit > 0 ? on_host.logits.narrow(2, 0, vocab_limit) : on_host.logits;
        const torch::Tensor want = l.argmax(-1).contiguous();  // [B, steps]
        for (size_t b = 0; b < prompts.size(); ++b) {
          CHECK(on_device.tokens[b] == std::vector<int64_t>(want[b].data_ptr<int64_t>(), want[b].data_ptr<int64_t>() + 9));
        }
      }
    }
  }
}
