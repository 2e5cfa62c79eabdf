"""Bad arguments are refused by name (issue 12 §2, §5) and OpenMP waits passively by default (§4)."""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, tiny_config

from lckv import ConfigError, LCKVConfig, LCKVForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LCKVForCausalLM(tiny_config())


# ---- config.json numbers: taken as they are, or refused naming the field and value


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_size", 32.5, r"field 'hidden_size' has value 32\.5, expected an integer"),
        ("hidden_size", "32", r"field 'hidden_size' has value \"32\", expected an integer"),
        ("num_hidden_layers", True, r"field 'num_hidden_layers' has value true"),
        ("num_hidden_layers", 2**32 + 6, r"field 'num_hidden_layers' has value 4294967302, expected an integer in \[-2\^31, 2\^31 - 1\]"),
        ("vocab_size", 2**64 - 1, r"field 'vocab_size' has value 18446744073709551615"),
        ("eos_token_id", ["a"], r"field 'eos_token_id\[0\]' has value \"a\""),
        ("forward_passes", 10**9, r"'forward_passes' = 1000000000, expected >= 0 and <= 1000000"),
        ("backward_passes", 2**31 - 1, r"'backward_passes' = 2147483647"),
        ("vocab_size", 10**12, r"config describes a model of \d+ parameters \(\d+ bytes in float32\).*limit of 2\^40"),
        ("hidden_size", 10**9, r"parameters .*hidden_size 1000000000"),
        ("num_hidden_layers", 10**9, r"'num_hidden_layers' = 1000000000"),
    ],
)
def test_config_numbers_refused(field, value, message):
    with pytest.raises(ConfigError, match=message):
        LCKVConfig.from_dict(tiny_config(**{field: value}))


def test_config_file_errors_name_file_and_field(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"hidden_size": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ConfigError, match=r"config\.json.*nested deeper than 64 levels in field 'hidden_size'"):
        LCKVConfig.from_json_file(path)
    text = LCKVConfig.from_dict(tiny_config()).to_json()
    path.write_text(text.replace('"rope_theta": 10000.0', '"rope_theta": 1e999'))
    with pytest.raises(ConfigError, match=r"config\.json.*invalid JSON in field 'rope_theta'") as e:
        LCKVConfig.from_json_file(path)
    assert "[json.exception" not in str(e.value)


def test_config_setters_keep_the_config_consistent():
    llama = LCKVConfig.from_dict(tiny_config(layer_types=None))
    llama.num_hidden_layers = 9  # a plain Llama stays one at the new depth
    assert llama.layer_types == "_".join(map(str, range(9))) and len(llama.segments()) == 9
    assert sum(p.numel() for p in LCKVForCausalLM(llama).parameters()) == llama.parameter_count()

    c = LCKVConfig.from_dict(tiny_config())
    c.num_hidden_layers = 8  # LCKV layer_types have 6 entries now: a clear error, not an IndexError
    for use in (c.segments, c.validate, lambda: LCKVForCausalLM(c)):
        with pytest.raises(ConfigError, match="layer_types has 6 entries, expected num_hidden_layers = 8"):
            use()
    c.layer_types = "0_6_6_6_6_6_6_7"
    assert [s["cyclic"] for s in c.segments()] == [False, True, False]
    for bad in (0, -1, 10**6):
        with pytest.raises(ConfigError, match=f"num_hidden_layers = {bad}, expected 1 to 100000"):
            c.num_hidden_layers = bad
    with pytest.raises(TypeError):
        c.hidden_size = 32.0
    c.vocab_size = 10**12
    with pytest.raises(ConfigError, match=r"parameters .*limit of 2\^40"):
        LCKVForCausalLM(c)


# ---- sampling and generation arguments


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(do_sample=True, temperature=-1.0), r"temperature = -1 is invalid"),
        (dict(temperature=-0.5), r"temperature = -0.5 is invalid"),
        (dict(do_sample=True, temperature=math.nan), r"temperature = nan is invalid"),
        (dict(do_sample=True, temperature=0.0), r"temperature = 0 is invalid: expected > 0 with do_sample"),
        (dict(do_sample=True, top_p=0.0), r"top_p = 0 is invalid: expected a value in \(0, 1\]"),
        (dict(do_sample=True, top_p=1.5), r"top_p = 1.5 is invalid"),
        (dict(do_sample=True, top_k=-1), r"top_k = -1 is invalid"),
        (dict(repetition_penalty=0.0), r"repetition_penalty = 0 is invalid"),
        (dict(repetition_penalty=math.nan), r"repetition_penalty = nan is invalid"),
        (dict(max_new_tokens=-1), r"max_new_tokens must be >= 1, got -1"),
        (dict(max_new_tokens=2**63 - 1), r"max_new_tokens \(9223372036854775807\) plus the longest prompt"),
        (dict(max_new_tokens=2**63), r"max_new_tokens = 9223372036854775808 is outside \[-9223372036854775808, 9223372036854775807\]"),
        (dict(seed=-1), r"seed = -1 is outside \[0, 18446744073709551615\]"),
        (dict(decode_step="graph"), r"decode step 'graph' is unknown: expected 'dynamic', 'static' or 'cuda_graph'"),
        (dict(decode_step="cuda_graph"), r"decode_step cuda_graph needs the model on a CUDA device, it is on cpu"),
    ],
)
def test_generate_refuses_bad_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate([[1, 2, 3]], **kwargs)


def test_greedy_ignores_temperature_zero(model):
    greedy = model.generate([[1, 2, 3]], 4).tokens
    assert model.generate([[1, 2, 3]], 4, temperature=0.0).tokens == greedy


def test_generate_refuses_non_integer_token_ids(model):
    with pytest.raises(TypeError, match=r"prompts\[0\]\[1\] must be an integer, got 2\.7 \(float\)"):
        model.generate([[1, 2.7, 3]])
    with pytest.raises(TypeError, match=r"prompts\[1\]\[0\] must be an integer, got 1\.0"):
        model.generate([[1], [1.0]])
    with pytest.raises(TypeError, match=r"prompts\[0\]\[0\] must be an integer, got True"):
        model.generate([[True]])
    with pytest.raises(TypeError, match=r"prompts must be an integer tensor of token ids, got dtype torch.float32"):
        model.generate(torch.tensor([[1.0, 2.5]]))
    with pytest.raises(TypeError, match=r"max_new_tokens must be an integer, got 4\.0"):
        model.generate([[1, 2]], 4.0)
    with pytest.raises(TypeError, match=r"stop_tokens\[0\] must be an integer"):
        model.generate([[1, 2]], stop_tokens=[2.0])
    # Integer tensors and numpy-style integers are token ids.
    assert len(model.generate(torch.tensor([[1, 2]], dtype=torch.int32), 2).tokens[0]) == 2
    assert len(model.generate([[torch.tensor(1), 2]], 2).tokens[0]) == 2


# ---- forward and training conventions


def test_forward_refuses_empty_input(model):
    empty = torch.zeros(2, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"input_ids has no tokens \(shape \(2, 0\)\)"):
        model(empty, empty)
    with pytest.raises(ValueError, match="no tokens"):
        model(empty)


def test_zero_grad_with_and_without_set_to_none(model):
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(1))
    model(ids, ids).loss.backward()
    model.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    model(ids, ids).loss.backward()
    assert any(p.grad.any() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    model(ids, ids).loss.backward()
    model.zero_grad()  # nn.Module's default: set_to_none=True
    assert all(p.grad is None for p in model.parameters())


# ---- OpenMP wait policy


def _python(code, env_update, unset=()):
    env = {k: v for k, v in os.environ.items() if k not in unset and k != "OMP_WAIT_POLICY"}
    env.update(env_update)
    env["PYTHONPATH"] = str(ROOT / "python") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_import_lckv_makes_openmp_wait_passively():
    show = "import lckv, os; print(os.environ.get('OMP_WAIT_POLICY'))"
    r = _python(show, {})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["PASSIVE"]
    r = _python(show, {"OMP_WAIT_POLICY": "ACTIVE"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ACTIVE"]
    # The runtime itself: libgomp shows its start-up settings (GOMP_SPINCOUNT 0 is PASSIVE, 300000 the default).
    r = _python("import lckv", {"OMP_DISPLAY_ENV": "VERBOSE"})
    assert "GOMP_SPINCOUNT = '0'" in r.stderr
    # torch imported first: libgomp has started with its default; the variable is left unset (documented).
    r = _python("import torch, lckv, os; print(os.environ.get('OMP_WAIT_POLICY'))", {})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None"]
