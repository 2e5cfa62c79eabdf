"""forward(output_hidden_states=True) (recorded in C++) and hooks on a model whose forward is C++."""

import json
import warnings

import pytest
import torch
from conftest import CONFORMANCE, tiny_config
from safetensors.torch import load_file

from lckv import LCKVForCausalLM


def random_ids(batch, tokens, vocab=61, seed=0):
    return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def test_hidden_states_match_transformers_llama_fp64(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).to(torch.float64).eval()
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(tmp_path)
    ours = LCKVForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    ids = random_ids(2, 9)
    with torch.no_grad():
        want = hf(input_ids=ids, output_hidden_states=True).hidden_states
        got = ours(ids, output_hidden_states=True)
    # transformers' convention: embeddings, each layer's output, the last one after the final norm.
    assert isinstance(got.hidden_states, tuple) and len(got.hidden_states) == len(want) == 4
    for g, w in zip(got.hidden_states, want):
        assert g.dtype == torch.float64 and g.shape == w.shape == (2, 9, 32)
        # transformers keeps RMSNorm statistics in float32 for a float64 model (see test_model.py).
        assert (g - w).abs().max().item() <= 1e-6
    assert got["hidden_states"] is got.hidden_states
    assert got.to_tuple()[-1] is got.hidden_states


@pytest.mark.parametrize("case", ["lckv_w2", "cross_targets", "yoco_window"])
def test_lckv_hidden_states_against_independent_computations(case):
    d = CONFORMANCE / case
    model = LCKVForCausalLM.from_pretrained(d, dtype=torch.float64).eval()
    ids = torch.tensor([json.loads((d / "case.json").read_text())["input_ids"]])
    T, L = ids.shape[1], model.config.num_hidden_layers
    with torch.no_grad():
        exact = model(ids, forward_passes=T, backward_passes=1, output_hidden_states=True)
        sequential = model(ids, sequential=True, output_hidden_states=True)
        m2b1 = model(ids, forward_passes=2, backward_passes=1, output_hidden_states=True)
    sd = model.state_dict()
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    expected = load_file(str(d / "expected.safetensors"))
    for out, logits in ((exact, expected["logits_exact"]), (m2b1, expected["logits_m2_b1"])):
        h = out.hidden_states
        assert len(h) == L + 1
        # Embeddings: the rows of the embedding matrix; the last entry: what the independent float64
        # implementation's logits come from through the LM head.
        assert torch.equal(h[0][0], sd["model.embed_tokens.weight"][ids[0]])
        assert (h[-1][0] @ head.T - logits).abs().max().item() <= 1e-9
        assert (h[-1] @ head.T - out.logits).abs().max().item() <= 1e-12
    # Each layer's output of the converged parallel forward equals the token-by-token definition's.
    for e, s in zip(exact.hidden_states, sequential.hidden_states):
        assert e.shape == s.shape == (1, T, model.config.hidden_size)
        assert (e - s).abs().max().item() <= 1e-9


def test_hidden_states_keep_autograd_and_are_off_by_default():
    torch.manual_seed(0)
    model = LCKVForCausalLM(tiny_config())
    ids = random_ids(2, 7)
    out = model(ids, labels=ids)
    assert out.hidden_states is None and len(out.to_tuple()) == 2
    out = model(ids, output_hidden_states=True)
    out.hidden_states[3].sum().backward()  # a layer inside the cyclic segment: from its grad iteration
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert len(model(ids, output_hidden_states=True, return_dict=False)) == 2  # (logits, hidden_states)


def test_hooks_on_submodules_warn_at_registration_and_top_level_hooks_fire():
    torch.manual_seed(0)
    model = LCKVForCausalLM(tiny_config())
    names = [n for n, _ in model.named_modules()]
    assert names[0] == "" and "model.layers.3.self_attn" in names
    layer = model.get_submodule("model.layers.3")
    assert isinstance(layer, torch.nn.Module) and layer is model.get_submodule("model.layers.3")
    assert dict(layer.named_parameters()).keys() >= {"self_attn.q_proj.weight", "mlp.up_proj.weight"}
    with pytest.raises(TypeError, match="runs only inside the C.. model"):
        layer(torch.zeros(1, 2, 32))
    fired = []
    for register in ("register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook"):
        with pytest.warns(UserWarning, match=r"submodule 'model\.layers\.3' of LCKVForCausalLM will never fire.*"
                                             r"output_hidden_states=True.*kv_observer"):
            getattr(layer, register)(lambda *a: fired.append(register))
    # nn.Module's walks work over the submodules.
    visited = []
    model.apply(lambda m: visited.append(m))
    assert len(visited) == len(names) and visited[-1] is model
    # The top-level forward is Python: its hooks fire (no warning), the backward one with tuple outputs.
    seen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # (hooks return None: a returned value would replace the inputs / outputs)
        h1 = model.register_forward_pre_hook(lambda m, args: seen.update(pre=args[0].shape))
        h2 = model.register_forward_hook(lambda m, args, out: seen.update(out=tuple(out[-1].shape)))
        h3 = model.register_full_backward_hook(lambda m, gin, gout: seen.update(grad=gout[0].shape))
    ids = random_ids(1, 5)
    model(ids)
    assert seen == {"pre": (1, 5), "out": (1, 5, 61)}
    loss, logits = model(ids, labels=ids, return_dict=False)
    loss.backward()
    assert seen["grad"] == ()
    assert fired == []  # the submodule hooks did not fire, as their warning said
    for h in (h1, h2, h3):
        h.remove()
