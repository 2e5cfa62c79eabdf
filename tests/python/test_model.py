"""LCKVForCausalLM: the C++ model as a torch.nn.Module."""

import json
import subprocess
import sys
from collections import defaultdict

import pytest
import torch
from conftest import CONFORMANCE, ROOT, tiny_config
from safetensors.torch import load_file

import lckv
from lckv import CheckpointError, ConfigError, LCKVConfig, LCKVForCausalLM

CASES = sorted(p.name for p in CONFORMANCE.iterdir() if p.is_dir())


def random_ids(batch, tokens, vocab=61, seed=0):
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


# ---- parity with the C++ program's files and with independent implementations


@pytest.mark.parametrize("case", CASES)
def test_conformance_checkpoint_logits_fp64(case):
    """Checkpoints in the C++ programs' layout, expected logits from an independent float64
    implementation of docs/design.md."""
    d = CONFORMANCE / case
    model = LCKVForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
    info = json.loads((d / "case.json").read_text())
    ids = torch.tensor([info["input_ids"]])
    expected = load_file(str(d / "expected.safetensors"))
    T = ids.shape[1]
    with torch.no_grad():
        exact = model(ids, forward_passes=T, backward_passes=1).logits[0]
        m2b1 = model(ids, forward_passes=2, backward_passes=1).logits[0]
        sequential = model(ids, sequential=True).logits[0]
    assert exact.dtype == torch.float64
    assert max_diff(exact, expected["logits_exact"]) <= 1e-9
    assert max_diff(sequential, expected["logits_exact"]) <= 1e-9
    assert max_diff(m2b1, expected["logits_m2_b1"]) <= 1e-9
    # Greedy continuation by repeated exact forwards.
    seq = ids
    for _ in info["greedy_next_6"]:
        with torch.no_grad():
            nxt = model(seq, forward_passes=seq.shape[1], backward_passes=1).logits[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert seq[0, T:].tolist() == info["greedy_next_6"]


def test_identity_layer_types_match_transformers_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).to(torch.float64).eval()
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(tmp_path / "llama")
    ours = LCKVForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float64).eval()
    assert ours.config.is_identity()
    ids = random_ids(2, 10)
    with torch.no_grad():
        want = hf(input_ids=ids, labels=ids)
        got = ours(ids, labels=ids)
    # transformers' Llama keeps RMSNorm statistics, softmax, RoPE tables and the loss in float32
    # even for a float64 model, so it agrees to float32 precision; a semantic difference (rotary
    # layout, GQA mapping, norm placement) would show as errors of order 1e-1.
    assert max_diff(got.logits, want.logits) <= 1e-6
    assert abs(got.loss.item() - want.loss.item()) <= 1e-5


def test_python_save_and_reload_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = LCKVForCausalLM(tiny_config())
    ids = random_ids(2, 9)
    target = tmp_path / "a" / "b"  # created, nested
    model.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "lckv_hf.py", "model.safetensors"]  # LCKV: auto_map
    reloaded = LCKVForCausalLM.from_pretrained(target)
    assert reloaded.config == model.config
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    # The file holds exactly the Hugging Face names of state_dict(), read by an independent reader.
    tensors = load_file(str(target / "model.safetensors"))
    sd = model.state_dict()
    assert sorted(tensors) == sorted(sd)
    assert all(torch.equal(tensors[k], sd[k]) for k in sd)


def test_save_in_bf16(tmp_path):
    torch.manual_seed(0)
    model = LCKVForCausalLM(tiny_config())
    model.save_pretrained(tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    tensors = load_file(str(tmp_path / "model.safetensors"))
    sd = model.state_dict()
    assert all(tensors[k].dtype == torch.bfloat16 and torch.equal(tensors[k], sd[k].bfloat16()) for k in sd)


# ---- torch.nn.Module behaviour


def test_state_dict_uses_hf_names_and_round_trips():
    torch.manual_seed(0)
    a = LCKVForCausalLM(tiny_config())
    b = LCKVForCausalLM(tiny_config())
    sd = a.state_dict()
    assert "model.embed_tokens.weight" in sd and "lm_head.weight" in sd
    assert "model.layers.4.self_attn.k_proj.weight" in sd
    # Layers 1-3 read layer 4's KVs: they have no k/v projections.
    assert "model.layers.1.self_attn.k_proj.weight" not in sd
    assert list(sd) == [n for n, _ in a.named_parameters()]
    ids = random_ids(2, 8)
    with torch.no_grad():
        assert not torch.equal(a(ids).logits, b(ids).logits)
        result = b.load_state_dict(sd)
        assert result.missing_keys == [] and result.unexpected_keys == []
        assert torch.equal(a(ids).logits, b(ids).logits)


def test_load_state_dict_errors_and_non_strict():
    model = LCKVForCausalLM(tiny_config())
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "model.norm.weight"}
    with pytest.raises(CheckpointError, match="'model.norm.weight' is missing"):
        model.load_state_dict(missing)
    with pytest.raises(CheckpointError, match="'extra.weight' is not a parameter"):
        model.load_state_dict({**sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="'model.norm.weight' has shape"):
        model.load_state_dict({**sd, "model.norm.weight": torch.zeros(3)})
    result = model.load_state_dict({"model.norm.weight": torch.full((32,), 2.0), "extra": torch.zeros(1)}, strict=False)
    assert result.unexpected_keys == ["extra"] and "model.norm.weight" not in result.missing_keys
    assert torch.equal(model.state_dict()["model.norm.weight"], torch.full((32,), 2.0))


def test_module_conventions():
    model = LCKVForCausalLM(tiny_config())
    assert isinstance(model, torch.nn.Module)
    params = list(model.parameters())
    assert len(params) == len(model.state_dict()) and all(p.requires_grad for p in params)
    model.eval()
    assert not model.training
    model.train()
    assert model.training
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    model.to("cpu", torch.float32)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    model.double()
    out = model(random_ids(1, 5))
    assert out.logits.dtype == torch.float64 and out.loss is None
    model.float()
    # named_parameters with a prefix, as DDP and optimizers' helpers call it.
    assert next(iter(model.named_parameters(prefix="net")))[0] == "net.model.embed_tokens.weight"
    assert "LCKVForCausalLM(layers=6" in repr(model)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = LCKVForCausalLM(tiny_config())
    ids = random_ids(2, 12)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum().item() > 0, name


def test_parallel_gradients_equal_sequential_fp64():
    """m = 0, b >= T: the gradients of the parallel forward are those of the sequential definition."""
    torch.manual_seed(0)
    model = LCKVForCausalLM(tiny_config()).double()
    ids = random_ids(1, 7)
    params = list(model.parameters())
    par = torch.autograd.grad(model(ids, labels=ids, forward_passes=0, backward_passes=7).loss, params)
    seq = torch.autograd.grad(model(ids, labels=ids, sequential=True).loss, params)
    for (name, _), a, b in zip(model.named_parameters(), par, seq):
        assert max_diff(a, b) <= 1e-10, name


def test_adamw_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = LCKVForCausalLM(tiny_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = random_ids(4, 16)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.3, losses


def test_attention_mask_right_padding_leaves_real_tokens_alone():
    torch.manual_seed(0)
    model = LCKVForCausalLM(tiny_config()).double()
    ids = random_ids(1, 10)
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        plain = model(ids, labels=ids, forward_passes=10, backward_passes=1)
        pad = model(padded, labels=padded, attention_mask=mask, forward_passes=14, backward_passes=1)
    assert max_diff(pad.logits[:, :10], plain.logits) <= 1e-12
    assert abs(pad.loss.item() - plain.loss.item()) <= 1e-12
    with pytest.raises(ValueError, match="attention_mask: only right padding"):
        model(padded, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model(padded, attention_mask=mask[:, :5])


def test_bad_model_inputs_name_the_argument():
    model = LCKVForCausalLM(tiny_config())
    ids = random_ids(2, 6)
    with pytest.raises(RuntimeError, match="input_ids must be int64 or int32"):
        model(ids.float())
    with pytest.raises(RuntimeError, match=r"input_ids must be \[batch, tokens\]"):
        model(ids[0])
    with pytest.raises(RuntimeError, match=r"input_ids must lie in \[0, vocab_size = 61\)"):
        model(ids + 100)
    with pytest.raises(RuntimeError, match="input_ids is on meta but the model's parameters are on cpu"):
        model(ids.to("meta"))
    with pytest.raises(RuntimeError, match="labels must be"):
        model(ids, labels=ids[:, :3])
    with pytest.raises(RuntimeError, match="labels must be int64 or int32"):
        model(ids, labels=ids.float())
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        model(ids.tolist())
    with pytest.raises(RuntimeError, match=r"backward_passes must be in \[1, 1000000\], got 0"):
        model(ids, backward_passes=0)


def test_from_pretrained_on_a_non_checkpoint_directory(tmp_path):
    with pytest.raises(CheckpointError, match="has no config.json: not a checkpoint directory"):
        LCKVForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        LCKVForCausalLM.from_pretrained(tmp_path / "does-not-exist")
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        LCKVForCausalLM.from_pretrained(tmp_path)


# ---- config


def test_config_dict_file_and_presets(tmp_path):
    c = LCKVConfig.from_dict(tiny_config())
    assert c.layer_types == "0_4_4_4_4_5" and c.num_key_value_heads == 2 and c.kv_layers() == [0, 4, 5]
    assert [s["cyclic"] for s in c.segments()] == [False, True, False]
    c.to_json_file(tmp_path / "config.json")
    again = LCKVConfig.from_pretrained(tmp_path)
    assert again == c and again.to_dict()["model_type"] == "lckv-llama"
    assert "tiny-lckv-w2" in LCKVConfig.presets()
    p = LCKVConfig.preset("tiny-lckv-w2")
    assert p.num_hidden_layers == 8 and p.layer_types == "0_6_6_6_6_6_6_7"
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        LCKVConfig.preset("nope")
    with pytest.raises(ConfigError, match="layer_types"):
        LCKVConfig.from_dict(tiny_config(layer_types="0_9_1_2_3_4"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="bad.json"):
        LCKVConfig.from_json_file(tmp_path / "bad.json")


# ---- the KV observer (Figure 3): the theorem on the iterations


def test_kv_observer_iterations_converge_after_T():
    torch.manual_seed(0)
    model = LCKVForCausalLM(tiny_config()).double()
    T = 6
    ids = random_ids(1, T)
    kvs = defaultdict(list)

    def observer(segment, iteration, layer, k, v):
        kvs[(segment, layer)].append((iteration, k.detach().clone(), v.detach().clone()))

    # m = T + 1 iterations without autograd, then one with: T + 2 iterations in all.
    model(ids, forward_passes=T + 1, backward_passes=1, kv_observer=observer)
    assert list(kvs) == [(1, 4)]  # segment [1, 4] of "0_4_4_4_4_5" has one top target, layer 4
    its = kvs[(1, 4)]
    assert [i for i, _, _ in its] == list(range(T + 2))
    for i in range(T + 1):
        (_, k0, v0), (_, k1, v1) = its[i], its[i + 1]
        # After iteration i (0-based), positions <= i are exact, so they no longer change.
        assert torch.equal(k0[:, :, : i + 1], k1[:, :, : i + 1]) and torch.equal(v0[:, :, : i + 1], v1[:, :, : i + 1])
        mse = ((k1 - k0) ** 2).mean().item() + ((v1 - v0) ** 2).mean().item()
        assert (mse == 0) == (i >= T - 1), (i, mse)


# ---- the extension's torch version check


def test_torch_version_mismatch_is_detected():
    with pytest.raises(ImportError, match=r"built against torch 1\.0 but torch .* is installed; rebuild with"):
        lckv._check_torch_version("1.0", torch.__version__)
    code = "import torch; torch.__version__ = '0.0.1'; import lckv"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    assert f"lckv._C was built against torch {torch.__version__} but torch 0.0.1 is installed" in r.stderr
    assert "pip install --no-build-isolation -e ." in r.stderr


# ---- generation (the C++ condensed KV cache)


@pytest.mark.parametrize("case", ["lckv_w2", "yoco_window"])
def test_generate_greedy_matches_conformance(case):
    d = CONFORMANCE / case
    model = LCKVForCausalLM.from_pretrained(d, dtype=torch.float64)
    info = json.loads((d / "case.json").read_text())
    out = model.generate([info["input_ids"]], max_new_tokens=len(info["greedy_next_6"]), prefill="exact")
    assert out.tokens == [info["greedy_next_6"]]
    assert out.stats["new_tokens"] == len(info["greedy_next_6"])


@pytest.mark.parametrize("case", CASES)
def test_generate_static_decode_steps_match_conformance(case):
    # decode_step="static" (fixed shapes over the whole cache, the position on the device) against the
    # independent implementation's greedy tokens, and its logits against the dynamic steps'.
    d = CONFORMANCE / case
    model = LCKVForCausalLM.from_pretrained(d, dtype=torch.float64)
    info = json.loads((d / "case.json").read_text())
    n = len(info["greedy_next_6"])
    fixed = model.generate([info["input_ids"]], max_new_tokens=n, prefill="exact", decode_step="static",
                           cache_capacity=len(info["input_ids"]) + n + 4, return_logits=True)
    dynamic = model.generate([info["input_ids"]], max_new_tokens=n, prefill="exact", return_logits=True)
    assert fixed.tokens == [info["greedy_next_6"]]
    assert (fixed.logits - dynamic.logits).abs().max().item() < 1e-12


def test_generate_batches_prompts_of_different_lengths():
    torch.manual_seed(0)
    model = LCKVForCausalLM(tiny_config()).double()
    a, b = random_ids(1, 9)[0].tolist(), random_ids(1, 4, seed=1)[0].tolist()
    together = model.generate([a, b], max_new_tokens=5, prefill="exact").tokens
    assert together == [model.generate([a], max_new_tokens=5, prefill="exact").tokens[0],
                        model.generate([b], max_new_tokens=5, prefill="exact").tokens[0]]
    with pytest.raises(ValueError, match="prompts must be"):
        model.generate(torch.zeros(1, 2, 3, dtype=torch.long))
