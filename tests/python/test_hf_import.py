"""Importing Hugging Face Llama directories (issue 13): transformers 5 saves random small LlamaForCausalLM models
(GQA, MQA, tied embeddings, llama3 / linear / yarn RoPE, bf16, sharded, head_dim != hidden / heads), and the test also
writes transformers-4-style config.json files by hand; LCKVForCausalLM.from_pretrained loads them unchanged and
computes what transformers computes: logits and loss <= 1e-9 in float64, <= 1e-4 in float32, equal greedy
continuations.

transformers' Llama keeps RMSNorm statistics and the RoPE tables in float32 even in a float64 model, so for the
float64 comparison the test runs those two in float64 (the same formulas, patched into the loaded model); the RoPE
frequencies come from a naive per-frequency reference written here from transformers' formulas, itself checked
against transformers' own float32 frequencies. Everything else (weight layout, GQA, attention, MLP, head) is
transformers' code as installed."""

import json
import math
import types

import pytest
import torch
import torch.nn.functional as F

from lckv import ConfigError, LCKVConfig, LCKVForCausalLM

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

SHAPE = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, eos_token_id=2, bos_token_id=1,
             initializer_range=0.2)  # logits of order 1, so a wrong detail shows
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}
YARN_MSCALE = {**YARN, "mscale": 2.0, "mscale_all_dim": 1.0, "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False}

# name -> (LlamaConfig overrides, save dtype, save_pretrained kwargs)
CASES = {
    "gqa": ({}, torch.float32, {}),
    "mqa_tied": ({"num_key_value_heads": 1, "tie_word_embeddings": True}, torch.float32, {}),
    "mha_head_dim": ({"num_key_value_heads": 4, "head_dim": 16}, torch.float32, {}),
    "llama3": ({"rope_parameters": LLAMA3}, torch.float32, {}),
    "linear": ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1000.0, "factor": 2.0}}, torch.float32, {}),
    "yarn": ({"rope_parameters": YARN}, torch.float32, {}),
    "yarn_mscale": ({"rope_parameters": YARN_MSCALE}, torch.float32, {}),
    "bf16": ({"rope_parameters": LLAMA3}, torch.bfloat16, {}),
    "sharded": ({"tie_word_embeddings": True}, torch.float32, {"max_shard_size": "20KB"}),
}


def save_hf_llama(directory, overrides, dtype=torch.float32, seed=0, **save_kwargs):
    """A random transformers LlamaForCausalLM saved by transformers; norms randomised too, so a norm weight read
    wrongly shows."""
    cfg = transformers.LlamaConfig(**{**SHAPE, **overrides})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
    model.to(dtype).save_pretrained(directory, **save_kwargs)
    return directory


# ---- the float64 reference: transformers' model with RMSNorm and RoPE in float64


def reference_rope(rope, head_dim, max_position_embeddings):
    """Inverse frequencies and attention scaling of a rope dict, per frequency in Python floats (float64), from the
    formulas of transformers' modeling_rope_utils."""
    theta = rope.get("rope_theta", 10000.0)
    kind = rope.get("rope_type", rope.get("type", "default"))
    d = head_dim
    inv = [1.0 / theta ** (2 * i / d) for i in range(d // 2)]
    if kind == "default":
        return inv, 1.0
    factor = rope["factor"]
    if kind == "linear":
        return [f / factor for f in inv], 1.0
    orig = rope.get("original_max_position_embeddings", max_position_embeddings)
    if kind == "llama3":
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        out = []
        for f in inv:
            wavelen = 2 * math.pi / f
            if wavelen < orig / high:
                out.append(f)
            elif wavelen > orig / low:
                out.append(f / factor)
            else:
                smooth = (orig / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        return out, 1.0
    assert kind == "yarn"

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.get("attention_factor")
    if attention is None:
        both = rope.get("mscale") and rope.get("mscale_all_dim")
        attention = mscale(factor, rope["mscale"]) / mscale(factor, rope["mscale_all_dim"]) if both else mscale(factor)

    def correction_dim(rotations):
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(rope.get("beta_fast") or 32), correction_dim(rope.get("beta_slow") or 1)
    if rope.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    out = []
    for i, f in enumerate(inv):
        extrapolation = 1 - min(max((i - lo) / (hi - lo), 0.0), 1.0)
        out.append(f / factor * (1 - extrapolation) + f * extrapolation)
    return out, attention


def _rms_norm_fp64(self, x):
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _rotary_fp64(self, x, position_ids):
    freqs = position_ids[..., None].to(torch.float64) * self.inv_freq_fp64
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * self.scaling_fp64).to(x.dtype), (emb.sin() * self.scaling_fp64).to(x.dtype)


def hf_fp64(directory, rope):
    """transformers' model from `directory` in float64, RMSNorm and RoPE computed in float64 (see the module doc)."""
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float64, attn_implementation="sdpa")
    hf.eval()
    cfg = hf.config
    inv, scaling = reference_rope(rope, cfg.head_dim, cfg.max_position_embeddings)
    rot = hf.model.rotary_emb
    # The reference is transformers' RoPE: its own (float32) frequencies and scaling agree to float32 precision.
    theirs = rot.inv_freq.to(torch.float64)
    ours = torch.tensor(inv, dtype=torch.float64)
    assert ((theirs - ours).abs() / ours).max().item() <= 2e-6
    assert abs(rot.attention_scaling - scaling) <= 1e-12
    rot.inv_freq_fp64, rot.scaling_fp64 = ours, scaling
    rot.forward = types.MethodType(_rotary_fp64, rot)
    for m in hf.modules():
        if isinstance(m, LlamaRMSNorm):
            m.forward = types.MethodType(_rms_norm_fp64, m)
    hf.generation_config.eos_token_id = None  # run the full max_new_tokens, as ours does without stop tokens
    hf.generation_config.pad_token_id = 0
    return hf


def rope_of(directory):
    c = json.loads((directory / "config.json").read_text())
    rope = c.get("rope_scaling") or c.get("rope_parameters") or {}
    return {"rope_theta": c.get("rope_theta", 10000.0), **rope}


def token_ids(batch=2, tokens=24, seed=1):
    return torch.randint(0, SHAPE["vocab_size"], (batch, tokens), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


def check_parity(directory):
    """fp64 logits and loss <= 1e-9, fp32 <= 1e-4, equal greedy continuations."""
    ids = token_ids()
    hf = hf_fp64(directory, rope_of(directory))
    ours = LCKVForCausalLM.from_pretrained(directory, dtype=torch.float64).eval()
    assert ours.config.is_identity()
    with torch.no_grad():
        want = hf(input_ids=ids, labels=ids)
        got = ours(ids, labels=ids)
    assert got.logits.dtype == torch.float64
    assert max_diff(got.logits, want.logits) <= 1e-9
    # transformers' loss is computed in float32; the float64 reference is the next-token loss of its logits.
    exact_loss = F.cross_entropy(want.logits[:, :-1].reshape(-1, want.logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(got.loss.item() - exact_loss.item()) <= 1e-9
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5

    prompts = ids[:, :6]
    with torch.no_grad():
        hf_tokens = hf.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=8,
                                do_sample=False)[:, 6:].tolist()
    assert ours.generate(prompts, max_new_tokens=8).tokens == hf_tokens

    # float32: transformers as installed, unpatched.
    hf32 = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ours32 = LCKVForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        want32 = hf32(input_ids=ids, labels=ids)
        got32 = ours32(ids, labels=ids)
    assert max_diff(got32.logits, want32.logits) <= 1e-4
    assert abs(got32.loss.item() - want32.loss.item()) <= 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers5_llama_loads_unchanged_and_matches(tmp_path, case):
    overrides, dtype, save_kwargs = CASES[case]
    d = save_hf_llama(tmp_path / case, overrides, dtype, **save_kwargs)
    written = json.loads((d / "config.json").read_text())
    assert "rope_parameters" in written and "rope_theta" not in written  # the transformers 5 format
    if case == "sharded":
        assert (d / "model.safetensors.index.json").is_file() and not (d / "model.safetensors").exists()
        assert len(set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    if case == "bf16":
        assert written["dtype"] == "bfloat16"
    check_parity(d)


def write_transformers4_config(directory, rope_theta, rope_scaling, torch_dtype="float32"):
    """Rewrites a saved config.json as transformers 4.x wrote it: rope_theta and rope_scaling at the top level,
    torch_dtype, no rope_parameters / dtype."""
    c = json.loads((directory / "config.json").read_text())
    for key in ("rope_parameters", "dtype"):
        c.pop(key, None)
    c.update(rope_theta=rope_theta, rope_scaling=rope_scaling, torch_dtype=torch_dtype,
             transformers_version="4.44.2", architectures=["LlamaForCausalLM"])
    (directory / "config.json").write_text(json.dumps(c, indent=2))


TRANSFORMERS4 = {
    "none": (10000.0, None),
    "linear_type": (1000.0, {"type": "linear", "factor": 2.0}),
    "llama3_rope_type": (500000.0, {k: v for k, v in LLAMA3.items() if k != "rope_theta"}),
    "yarn_type": (10000.0, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("case", sorted(TRANSFORMERS4))
def test_transformers4_config_loads_unchanged_and_matches(tmp_path, case):
    theta, scaling = TRANSFORMERS4[case]
    rope = {"rope_theta": theta, **(scaling or {})}
    rope.pop("type", None)
    if scaling:
        rope["rope_type"] = scaling.get("rope_type", scaling.get("type"))
    d5 = save_hf_llama(tmp_path / "v5", {"rope_parameters": rope})
    d4 = save_hf_llama(tmp_path / "v4", {"rope_parameters": rope})
    write_transformers4_config(d4, theta, scaling)
    # The hand-written transformers 4 file means the same model to transformers 5 as the file it wrote.
    ids = token_ids()
    with torch.no_grad():
        a = transformers.LlamaForCausalLM.from_pretrained(d5, dtype=torch.float64)(input_ids=ids).logits
        b = transformers.LlamaForCausalLM.from_pretrained(d4, dtype=torch.float64)(input_ids=ids).logits
    assert torch.equal(a, b)
    check_parity(d4)


def test_sliding_attention_layer_types_map_to_the_s_suffix(tmp_path):
    # transformers' Llama (5.24) keeps layer_types and sliding_window in its config but attends fully in every
    # layer, so this mapping is tested on the config alone; Mistral-style models honour it.
    d = save_hf_llama(tmp_path / "sw", {"layer_types": ["full_attention", "sliding_attention", "sliding_attention"],
                                        "sliding_window": 5})
    assert json.loads((d / "config.json").read_text())["layer_types"][1] == "sliding_attention"
    c = LCKVConfig.from_pretrained(d)
    assert c.layer_types == "0_1s_2s"
    assert c.sliding_window == 5
    model = LCKVForCausalLM.from_pretrained(d)
    assert model.config.layer_types == "0_1s_2s"


# ---- configs we cannot honour: refused naming the file and the field


def edit_config(directory, **changes):
    c = json.loads((directory / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            c.pop(k, None)
        else:
            c[k] = v
    (directory / "config.json").write_text(json.dumps(c))


BAD = {
    "non_llama": ({"model_type": "mistral"}, "'model_type' = 'mistral' is not supported"),
    "rope_type": ({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
                  "rope_type 'longrope', which is not supported"),
    "dynamic": ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    "layer_types_length": ({"layer_types": ["full_attention"] * 2},
                           "'layer_types' is a list of 2 attention kinds, expected num_hidden_layers = 3"),
    "layer_types_entry": ({"layer_types": ["full_attention", "chunked_attention", "full_attention"]},
                          "'layer_types[1]' = 'chunked_attention' is not supported"),
    "rope_missing_field": ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
                           "has rope_type 'llama3' but no 'low_freq_factor'"),
    "rope_theta_conflict": ({"rope_theta": 10000.0, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
                            "'rope_parameters.rope_theta' = 500000.0 conflicts with 'rope_theta' = 10000.0"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_hf_configs_are_refused_naming_file_and_field(tmp_path, case):
    changes, message = BAD[case]
    d = save_hf_llama(tmp_path / case, {})
    edit_config(d, **changes)
    for load in (LCKVConfig.from_pretrained, LCKVForCausalLM.from_pretrained):
        with pytest.raises(ConfigError) as e:
            load(d)
        assert message in str(e.value)
        assert "config.json" in str(e.value)
