// Invariants 1-3 of docs/design.md §2 in float64 on small random models: identity layer_types is a
// plain Llama (checked against a naive Llama written here), the parallel iterative forward with
// m + b >= T equals the sequential definition (logits and loss), and with m = 0, b >= T so do the
// gradients of every parameter.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cmath>
#include <map>

#include "lckv/autocast.h"
#include "lckv/model/lckv_model.h"
#include "test_reference.h"

using namespace lckv;
using lckv::testing::max_diff;
using lckv::testing::naive_attention;

namespace {

LCKVConfig small_config(const std::string& layer_types, int layers, int heads, int kv_heads) {
  nlohmann::json j = {{"vocab_size", 37},        {"hidden_size", 8 * heads}, {"intermediate_size", 24},
                      {"num_hidden_layers", layers}, {"num_attention_heads", heads}, {"num_key_value_heads", kv_heads},
                      {"layer_types", layer_types}, {"sliding_window", 3},       {"initializer_range", 0.2},
                      {"rope_theta", 100.0}};
  return LCKVConfig::from_json(j);
}

LCKVForCausalLM make_model(const LCKVConfig& c, uint64_t seed = 0) {
  torch::manual_seed(seed);
  LCKVForCausalLM m(c);
  init_weights(m);
  {
    // Norm weights away from 1 so a wrong norm would show.
    torch::NoGradGuard g;
    for (auto& p : m->named_parameters()) {
      if (p.key().find("norm") != std::string::npos) p.value().uniform_(0.5, 1.5);
    }
  }
  m->to(torch::kDouble);
  return m;
}

// A plain Llama written from the HF definition with naive ops, reading the model's parameters by name.
torch::Tensor naive_llama_logits(LCKVForCausalLM& m, const torch::Tensor& ids) {
  std::map<std::string, torch::Tensor> P;
  for (auto& p : m->named_parameters()) P[p.key()] = p.value().detach();
  const auto& c = m->config;
  const int64_t T = ids.size(1), H = c.num_attention_heads, KV = c.num_key_value_heads, D = c.head_dim;
  auto rms = [&](const torch::Tensor& x, const torch::Tensor& w) {
    return w * x / torch::sqrt(x.pow(2).mean(-1, true) + c.rms_norm_eps);
  };
  // RoPE angles from the formula theta^(-2i/D) * position.
  torch::Tensor angle = torch::empty({T, D}, torch::kDouble);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < D / 2; ++i) {
      const double a = t * std::pow(c.rope_theta, -2.0 * i / D);
      angle[t][i] = a;
      angle[t][i + D / 2] = a;
    }
  }
  auto rope = [&](const torch::Tensor& x) {  // x [B, heads, T, D]
    torch::Tensor x1 = x.narrow(-1, 0, D / 2), x2 = x.narrow(-1, D / 2, D / 2);
    return x * angle.cos() + torch::cat({-x2, x1}, -1) * angle.sin();
  };
  torch::Tensor h = P["model.embed_tokens.weight"].index_select(0, ids.view({-1})).view({ids.size(0), T, -1});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    const std::string pre = "model.layers." + std::to_string(l) + ".";
    torch::Tensor x = rms(h, P[pre + "input_layernorm.weight"]);
    auto heads = [&](const torch::Tensor& w, int64_t n) { return torch::matmul(x, w.t()).view({x.size(0), T, n, D}).transpose(1, 2); };
    torch::Tensor q = rope(heads(P[pre + "self_attn.q_proj.weight"], H));
    torch::Tensor k = rope(heads(P[pre + "self_attn.k_proj.weight"], KV));
    torch::Tensor v = heads(P[pre + "self_attn.v_proj.weight"], KV);
    torch::Tensor a = naive_attention(q, k, v, /*strict=*/false, /*window=*/0, /*q_offset=*/0);
    h = h + torch::matmul(a.transpose(1, 2).reshape({x.size(0), T, H * D}), P[pre + "self_attn.o_proj.weight"].t());
    torch::Tensor y = rms(h, P[pre + "post_attention_layernorm.weight"]);
    torch::Tensor g = torch::matmul(y, P[pre + "mlp.gate_proj.weight"].t());
    torch::Tensor u = torch::matmul(y, P[pre + "mlp.up_proj.weight"].t());
    h = h + torch::matmul(g * torch::sigmoid(g) * u, P[pre + "mlp.down_proj.weight"].t());
  }
  h = rms(h, P["model.norm.weight"]);
  torch::Tensor head = c.tie_word_embeddings ? P["model.embed_tokens.weight"] : P["lm_head.weight"];
  return torch::matmul(h, head.t());
}

struct ModelCase {
  std::string layer_types;
  int layers, heads, kv_heads;
  bool force_nodiag = false;
};

const ModelCase kCases[] = {
    {"0_1_2_3", 4, 4, 2},                 // Llama identity, GQA
    {"0_1_2", 3, 2, 2},                   // Llama identity, MHA
    {"0_4_4_4_4_5", 6, 4, 2},             // LCKV sandwich w=2
    {"0_1_5_5_5_5_6_7", 8, 4, 1},         // LCKV w=4 (w=10 shape on fewer layers), MQA
    {"0_0_2_2_4_4", 6, 4, 2},             // CLA
    {"0s_1s_2_2", 4, 4, 2},               // YOCO with a sliding window of 3
    {"0_2_2_2_2_5", 6, 2, 2},             // sandwich-middle, MHA
    {"0_2_1_3", 4, 4, 2},                 // cross targets: a target that attends elsewhere
    {"0_3s_3_3", 4, 4, 4},                // top attention through a sliding window
    {"0_3_3_3", 4, 4, 2, true},           // force_nodiag
    {"2_0_3_3", 4, 2, 1},                 // layer 0 attends top; one segment with two top targets
};

LCKVConfig case_config(const ModelCase& mc) {
  LCKVConfig c = small_config(mc.layer_types, mc.layers, mc.heads, mc.kv_heads);
  c.force_nodiag = mc.force_nodiag;
  return c;
}

}  // namespace

TEST_CASE("identity layer_types equals a naive Llama forward (invariant 1)", "[model]") {
  for (bool tied : {false, true}) {
    for (auto [lt, L, H, KV] : {std::tuple{"0_1_2_3", 4, 4, 2}, std::tuple{"0_1_2", 3, 2, 2}}) {
      LCKVConfig c = small_config(lt, L, H, KV);
      c.tie_word_embeddings = tied;
      REQUIRE(c.is_identity());
      auto m = make_model(c, 7);
      torch::Tensor ids = torch::randint(0, c.vocab_size, {2, 13});
      torch::NoGradGuard g;
      INFO(lt << " tied=" << tied);
      CHECK(max_diff(m->forward(ids).logits, naive_llama_logits(m, ids)) < 1e-10);
    }
  }
}

TEST_CASE("parallel iterative forward with m + b >= T equals the sequential definition (invariant 2)", "[model]") {
  for (const ModelCase& mc : kCases) {
    auto m = make_model(case_config(mc), 11);
    const int64_t T = 12;
    torch::Tensor ids = torch::randint(0, 37, {2, T});
    auto seq = m->forward_sequential(ids, ids);
    INFO("layer_types " << mc.layer_types);
    // with autograd on (m no-grad + b grad iterations) and off
    auto par = m->forward(ids, ids, IterationOptions{int(T) - 2, 2});
    CHECK(max_diff(par.logits, seq.logits) < 1e-10);
    CHECK(std::abs(par.loss.item<double>() - seq.loss.item<double>()) < 1e-10);
    torch::NoGradGuard g;
    auto eval = m->forward(ids, {}, IterationOptions{int(T), 2});
    CHECK(max_diff(eval.logits, seq.logits) < 1e-10);
  }
}

TEST_CASE("iterations without autograd run by batch slices give what the whole batch gives", "[model]") {
  // On 2 threads a CPU batch's iterations without autograd run one slice of the batch per thread (uneven slices:
  // B = 3); on 1 thread, with autograd, or for one sequence, the whole batch at once. Outputs, loss and
  // gradients must agree.
  struct Threads {
    int before = torch::get_num_threads();
    ~Threads() { torch::set_num_threads(before); }
  } restore;
  for (const char* lt : {"0_4_4_4_4_5", "2_0_3_3"}) {
    INFO("layer_types " << lt);
    const ModelCase mc{lt, lt[0] == '2' ? 4 : 6, 4, 2};
    auto m = make_model(case_config(mc), 13);
    const torch::Tensor ids = torch::randint(0, 37, {3, 9});
    auto run = [&](int threads) {
      torch::set_num_threads(threads);
      const int64_t sliced = m->model->batch_sliced_iterations.load();
      auto out = m->forward(ids, ids, IterationOptions{4, 2});
      auto grads = torch::autograd::grad({out.loss}, m->parameters());
      torch::NoGradGuard g;
      grads.push_back(out.logits);
      grads.push_back(m->forward(ids, {}, IterationOptions{5, 1}).logits);  // inference: the last one sliced too
      return std::pair{grads, m->model->batch_sliced_iterations.load() - sliced};
    };
    const auto [one, sliced_one] = run(1);
    const auto [two, sliced_two] = run(2);
    CHECK(sliced_one == 0);
    // Training: the no-grad iterations but the last before the grad ones (3 of 4); inference: all 6.
    CHECK(sliced_two == 3 + 6);
    // 8 threads for 3 sequences would leave 5 idle: the whole batch, per-op parallel, as on 1 thread.
    const auto [eight, sliced_eight] = run(8);
    CHECK(sliced_eight == 0);
    for (size_t i = 0; i < one.size(); ++i) {
      INFO("output " << i);
      CHECK(max_diff(one[i], two[i]) < 1e-12);
    }
  }
}

TEST_CASE("batch-sliced iterations under autocast see the current weights", "[model][autocast]") {
  // The slices' threads cast the weights to bf16 through autocast's cache; those casts must go with the caller's
  // autocast scope, or the next step would compute with the weights before the optimizer's update.
  struct Threads {
    int before = torch::get_num_threads();
    ~Threads() { torch::set_num_threads(before); }
  } restore;
  auto m = make_model(case_config({"0_4_4_4_4_5", 6, 4, 2}), 17);
  m->to(torch::kFloat);
  const torch::Tensor ids = torch::randint(0, 37, {4, 8});
  auto logits = [&](int threads) {
    torch::set_num_threads(threads);
    lckv::AutocastScope autocast(at::kCPU, at::kBFloat16);
    torch::NoGradGuard g;
    return m->forward(ids, {}, IterationOptions{4, 1}).logits.to(torch::kFloat);
  };
  const torch::Tensor before = logits(2);
  {
    torch::NoGradGuard g;
    for (auto& p : m->parameters()) p.mul_(1.5);
  }
  const torch::Tensor after_sliced = logits(2), after_whole = logits(1);
  CHECK(max_diff(after_sliced, before) > 1e-2);              // the update shows
  CHECK(max_diff(after_sliced, after_whole) < 1e-2 * after_whole.abs().max().item<double>());
}

TEST_CASE("after k iterations the first k positions are exact, later ones are not yet", "[model]") {
  auto m = make_model(case_config({"0_4_4_4_4_5", 6, 4, 2}), 3);
  torch::Tensor ids = torch::randint(0, 37, {1, 10});
  torch::NoGradGuard g;
  torch::Tensor seq = m->forward_sequential(ids).logits;
  for (int k = 1; k <= 4; ++k) {
    torch::Tensor par = m->forward(ids, {}, IterationOptions{k - 1, 1}).logits;
    INFO("iterations " << k);
    CHECK(max_diff(par.narrow(1, 0, k), seq.narrow(1, 0, k)) < 1e-10);
    CHECK(max_diff(par.narrow(1, k, 10 - k), seq.narrow(1, k, 10 - k)) > 1e-6);
  }
}

TEST_CASE("m = 0, b >= T gives the sequential gradients for every parameter (invariant 3)", "[model]") {
  for (const ModelCase& mc : kCases) {
    auto m = make_model(case_config(mc), 5);
    const int64_t T = 7;
    torch::Tensor ids = torch::randint(0, 37, {2, T});
    auto params = m->parameters();
    auto seq_grads = torch::autograd::grad({m->forward_sequential(ids, ids).loss}, params);
    auto par_grads = torch::autograd::grad({m->forward(ids, ids, IterationOptions{0, int(T)}).loss}, params);
    INFO("layer_types " << mc.layer_types);
    for (size_t i = 0; i < params.size(); ++i) {
      INFO("parameter " << i);
      CHECK(max_diff(par_grads[i], seq_grads[i]) < 1e-10);
    }
  }
}

TEST_CASE("gradient stopping: only the last b iterations carry gradients", "[model]") {
  // With m = T - 1, b = 1 the output equals the sequential one, but its gradient is that of one
  // iteration with detached top KVs, which differs from the sequential gradient.
  auto m = make_model(case_config({"0_4_4_4_4_5", 6, 4, 2}), 9);
  torch::Tensor ids = torch::randint(0, 37, {1, 6});
  auto k_proj = m->model->layer_list[4]->self_attn->k_proj->weight;
  auto seq = torch::autograd::grad({m->forward_sequential(ids, ids).loss}, {k_proj})[0];
  auto out = m->forward(ids, ids, IterationOptions{5, 1});
  auto one = torch::autograd::grad({out.loss}, {k_proj})[0];
  CHECK(std::abs(out.loss.item<double>() - m->forward_sequential(ids, ids).loss.item<double>()) < 1e-10);
  CHECK(max_diff(one, seq) > 1e-8);
}

TEST_CASE("under bf16 autocast every parameter gets the fp32 gradient, to bf16 precision", "[model][autocast]") {
  // The m no-grad iterations use the same weights as the b grad ones: a weight cast cached while
  // gradients were off must not cut the gradient of the later uses.
  LCKVConfig c = small_config("0_4_4_4_4_5", 6, 4, 2);
  c.initializer_range = 0.05;
  auto m = make_model(c, 6);
  m->to(torch::kFloat);
  torch::Tensor ids = torch::randint(0, 37, {2, 12});
  auto params = m->parameters();
  const IterationOptions counts{3, 2};
  auto fp32 = torch::autograd::grad({m->forward(ids, ids, counts).loss}, params);
  std::vector<torch::Tensor> bf16;
  {
    AutocastScope autocast(torch::kCPU, torch::kBFloat16);
    torch::Tensor loss = m->forward(ids, ids, counts).loss;
    bf16 = torch::autograd::grad({loss}, params, {}, /*retain_graph=*/std::nullopt, /*create_graph=*/false,
                                 /*allow_unused=*/true);
  }
  auto names = m->named_parameters().keys();
  for (size_t i = 0; i < params.size(); ++i) {
    INFO(names[i]);
    REQUIRE(bf16[i].defined());
    const double norm = fp32[i].norm().item<double>();
    CHECK(norm > 0);
    const double rel = (bf16[i].to(torch::kFloat) - fp32[i]).norm().item<double>() / norm;
    CHECK(rel < 0.05);
  }
}

TEST_CASE("use_sequential in the config selects the sequential definition", "[model]") {
  LCKVConfig c = case_config({"0_4_4_4_4_5", 6, 4, 2});
  auto m = make_model(c, 2);
  torch::Tensor ids = torch::randint(0, 37, {1, 8});
  torch::NoGradGuard g;
  torch::Tensor one_pass = m->forward(ids, {}, IterationOptions{0, 1}).logits;
  m->config.use_sequential = true;
  CHECK(max_diff(m->forward(ids, {}, IterationOptions{0, 1}).logits, m->forward_sequential(ids).logits) == 0);
  CHECK(max_diff(one_pass, m->forward_sequential(ids).logits) > 1e-6);
}

TEST_CASE("the loss ignores -100 labels and matches a hand-computed cross-entropy", "[model]") {
  auto m = make_model(case_config({"0_2_2_3", 4, 4, 2}), 4);
  torch::Tensor ids = torch::randint(0, 37, {2, 6});
  torch::Tensor labels = ids.clone();
  labels[0][3] = -100;
  auto out = m->forward(ids, labels);
  out.logits.retain_grad();
  // The naive loss on a detached copy of the same logits, and its gradient by autograd.
  const torch::Tensor logits = out.logits.detach().clone().requires_grad_(true);
  torch::Tensor logp = torch::log_softmax(logits, -1);
  torch::Tensor total = torch::zeros({}, logits.options());
  int n = 0;
  for (int b = 0; b < 2; ++b) {
    for (int t = 0; t + 1 < 6; ++t) {
      const int64_t y = labels[b][t + 1].item<int64_t>();
      if (y == -100) continue;
      total = total - logp[b][t][y];
      ++n;
    }
  }
  const torch::Tensor naive = total / n;
  CHECK(std::abs(out.loss.item<double>() - naive.item<double>()) < 1e-12);
  // The gradient reaching the logits: the naive one, and exactly zero at the last position (it predicts nothing).
  out.loss.backward();
  naive.backward();
  CHECK(max_diff(out.logits.grad(), logits.grad()) < 1e-12);
  CHECK(out.logits.grad().select(1, 5).abs().max().item<double>() == 0);
  CHECK(out.logits.grad().select(1, 4).abs().max().item<double>() > 0);
}

TEST_CASE("the model rejects token ids outside the vocabulary", "[model]") {
  auto m = make_model(case_config({"0_1", 2, 2, 2}), 0);
  CHECK_THROWS_WITH(m->forward(torch::full({1, 3}, 37, torch::kLong)), Catch::Contains("vocab_size = 37"));
  CHECK_THROWS_WITH(m->forward(torch::full({1, 3}, -1, torch::kLong)), Catch::Contains("input_ids must lie in"));
  CHECK_THROWS_WITH(m->forward(torch::zeros({3}, torch::kLong)), Catch::Contains("[batch, tokens]"));
}

TEST_CASE("layers that do not compute KV have no k/v projections", "[model]") {
  LCKVForCausalLM m(case_config({"0_4_4_4_4_5", 6, 4, 2}));
  std::set<std::string> names;
  for (auto& p : m->named_parameters()) names.insert(p.key());
  CHECK(names.count("model.layers.4.self_attn.k_proj.weight"));
  CHECK(names.count("model.layers.0.self_attn.v_proj.weight"));
  CHECK_FALSE(names.count("model.layers.1.self_attn.k_proj.weight"));
  CHECK_FALSE(names.count("model.layers.3.self_attn.v_proj.weight"));
  CHECK(names.count("lm_head.weight"));
}
