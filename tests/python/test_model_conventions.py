"""LCKVForCausalLM behaves like the modules users know: a read-only config with a clear error,
deepcopy / pickle / torch.save of the whole model, ModelOutput-style outputs, and Hugging Face's
argument names in forward and generate."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from conftest import tiny_config

import lckv
from lckv import LCKVForCausalLM


@pytest.fixture
def model():
    torch.manual_seed(0)
    return LCKVForCausalLM(tiny_config())


def ids(b=2, t=7, seed=1):
    return torch.randint(0, 61, (b, t), generator=torch.Generator().manual_seed(seed))


def test_config_is_read_only_and_says_so(model):
    with pytest.raises(AttributeError, match="model.config is read-only: setting 'forward_passes'"):
        model.config.forward_passes = 0
    editable = model.config.copy()
    editable.forward_passes = 1
    assert editable.forward_passes == 1 and model.config.forward_passes == 3
    assert LCKVForCausalLM(editable, init_weights=False).config.forward_passes == 1


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_are_independent_and_equal(model, how):
    model.eval()
    x = ids()
    if how == "deepcopy":
        other = copy.deepcopy(model)
    elif how == "pickle":
        other = pickle.loads(pickle.dumps(model))
    else:
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)
    assert isinstance(other, LCKVForCausalLM) and not other.training
    assert other.config == model.config
    assert torch.equal(other(x).logits, model(x).logits)  # bitwise
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert not torch.equal(other(x).logits, model(x).logits)  # no shared storage


def test_outputs_index_like_a_model_output(model):
    x = ids()
    out = model(x, labels=x, return_dict=True, use_cache=False)
    loss, logits = out
    assert out[0] is out.loss and out["logits"] is out.logits and len(out) == 2
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)
    assert model(x)[0] is not None and len(model(x)) == 1  # no labels: logits only
    as_tuple = model(x, labels=x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], out.logits)
    with pytest.raises(KeyError):
        model(x)["loss"]


def test_generate_takes_hugging_face_argument_names(model):
    a, b = [5, 9, 2, 44], [17, 3]
    ragged = model.generate([a, b], 4, stop_tokens=[]).tokens
    input_ids = torch.tensor([a, [0, 0] + b])
    attention_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    hf = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, pad_token_id=0,
                        do_sample=False)
    assert hf.tokens == ragged  # the zeros of the mask are pads: each prompt as it is alone
    full = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, include_prompt=True)
    assert full.tokens == [a + ragged[0], b + ragged[1]]
    first = ragged[0][0]
    stopped = model.generate([a], 4, eos_token_id=first).tokens[0]
    assert stopped == [first]  # eos_token_id stops like stop_tokens
    with pytest.raises(ValueError, match="only left padding"):
        model.generate(input_ids=input_ids, attention_mask=torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    with pytest.raises(TypeError, match="both prompts and input_ids"):
        model.generate([a], input_ids=input_ids)
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_beams'"):
        model.generate([a], 2, num_beams=4)


def test_torch_compile_warns_that_the_cpp_forward_is_not_traced(model, monkeypatch):
    monkeypatch.setattr(lckv.model, "_is_compiling", lambda: True)
    monkeypatch.setattr(lckv.model, "_warned", set())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model(ids())
        model(ids())
    assert [str(x.message) for x in w].count(
        "torch.compile: LCKVForCausalLM's forward is C++ and is not traced; it runs eagerly") == 1
