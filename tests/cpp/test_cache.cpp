// The condensed KV cache: invariant 4 of docs/design.md §2 on the cache (cached chunked prefill equals the
// sequential definition, fp64) for several layer_types, GQA, batches of prompts with different
// lengths and both prefill modes; the per-sequence key mask of the attention op against the naive
// reference; StreamingLLM eviction; memory accounting; bad input. Generation: test_generate.cpp.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <algorithm>

#include "lckv/cache/condensed_kv_cache.h"
#include "lckv/generate/generate.h"
#include "lckv/ops/condensed_attention.h"
#include "test_models.h"
#include "test_reference.h"

using namespace lckv;
using namespace lckv::testing;

namespace {

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

TEST_CASE("a cache refuses chunks beyond its capacity without StreamingLLM and reads of layers without KV",
          "[cache][errors]") {
  CondensedKVCache cache(small_config("0_4_4_4_4_5", 6, 4, 2), 1, 4, torch::TensorOptions().dtype(torch::kDouble));
  CHECK_THROWS_WITH(cache.make_room(5), Catch::Contains("exceed the cache capacity of 4"));
  CHECK_THROWS_WITH(cache.read(1), Catch::Contains("layer 1 computes no KV"));
}

TEST_CASE("static steps: the device slot and positions follow the cache, reads cover every slot, misuse is refused",
          "[cache][static]") {
  const LCKVConfig c = small_config("0_4_4_4_4_5", 6, 4, 2);
  CondensedKVCache cache(c, 2, 6, torch::TensorOptions().dtype(torch::kDouble));
  cache.set_key_start(torch::tensor({0, 2}, torch::kLong));
  const torch::Tensor kv3 = torch::randn({2, 2, 3, 8}, torch::kDouble);
  cache.make_room(3);
  cache.write(0, kv3, kv3);
  cache.advance(3);
  CHECK_THROWS_WITH(cache.device_positions(), Catch::Contains("outside static steps"));
  cache.set_static(true);
  cache.make_room(1);
  CHECK(cache.device_slot().item<int64_t>() == 3);
  CHECK(torch::equal(cache.device_positions(), cache.positions(1)));  // [[3], [1]]: slot - key_start
  const torch::Tensor kv1 = torch::randn({2, 2, 1, 8}, torch::kDouble);
  cache.write(0, kv1, kv1);
  const KV all = cache.read(0);
  CHECK(all.k.size(2) == 6);  // the whole buffer: attention hides slots after the device slot
  CHECK(torch::equal(all.k.narrow(2, 0, 3), kv3));
  CHECK(torch::equal(all.k.narrow(2, 3, 1), kv1));
  CHECK(torch::equal(all.k.narrow(2, 4, 2), torch::zeros({2, 2, 2, 8}, torch::kDouble)));  // zero-filled
  ops::AttentionParams p;
  cache.describe_keys(p);
  CHECK(p.mask.q_offset == 0);
  CHECK(p.mask.q_position.item<int64_t>() == 3);
  CHECK(p.keys_finite);
  CHECK_THROWS_WITH(cache.advance_replayed(), Catch::Contains("commits a replayed static step only"));
  cache.advance(1);
  CHECK_THROWS_WITH(cache.make_room(2), Catch::Contains("static steps take one token"));
  cache.make_room(1);
  CHECK(cache.device_slot().item<int64_t>() == 4);
  CHECK_THROWS_WITH(cache.write(0, kv3, kv3), Catch::Contains("a static step writes one token"));
  cache.advance_replayed();  // as after a CUDA graph replay wrote slot 4 on the device
  CHECK(cache.past_length() == 5);
  cache.set_static(false);
  cache.describe_keys(p = ops::AttentionParams{});
  CHECK(p.mask.q_offset == 5);
  CHECK(!p.mask.q_position.defined());
}
