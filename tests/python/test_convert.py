"""from_pretrained(layer_types=..., kv_init=...) and lckv._C.convert_checkpoint: the C++ conversion,
checked against the source tensors combined here with torch in float64."""

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from lckv import _C, CheckpointError, ConfigError, LCKVForCausalLM

LLAMA = "0_1_2_3_4_5"
W2 = "0_4_4_4_4_5"  # layers 1-4 attend to layer 4


def kv(layer, part):
    return f"model.layers.{layer}.self_attn.{part}"


PARTS = ["k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias"]


@pytest.fixture
def llama_dir(tmp_path):
    torch.manual_seed(0)
    model = LCKVForCausalLM(tiny_config(layer_types=LLAMA, attention_bias=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)  # init_weights zeroes them
    model.to(torch.float64).save_pretrained(tmp_path / "llama", dtype=torch.float64)
    return tmp_path / "llama"


def test_average_is_the_mean_of_the_attending_layers(llama_dir):
    src = load_file(str(llama_dir / "model.safetensors"))
    model = LCKVForCausalLM.from_pretrained(llama_dir, torch.float64, layer_types=W2, kv_init="average")
    state = model.state_dict()
    assert model.config.layer_types == W2
    for part in PARTS:
        expected = torch.stack([src[kv(i, part)] for i in (1, 2, 3, 4)]).mean(0)
        assert (state[kv(4, part)] - expected).abs().max().item() <= 1e-15
        assert torch.equal(state[kv(0, part)], src[kv(0, part)])
        assert torch.equal(state[kv(5, part)], src[kv(5, part)])
        for gone in (1, 2, 3):
            assert kv(gone, part) not in state
    for name, t in state.items():
        if "k_proj" not in name and "v_proj" not in name:
            assert torch.equal(t, src[name]), name


def test_copy_random_and_identity(llama_dir):
    src = load_file(str(llama_dir / "model.safetensors"))
    copy = LCKVForCausalLM.from_pretrained(llama_dir, torch.float64, layer_types=W2, kv_init="copy").state_dict()
    for part in PARTS:
        assert torch.equal(copy[kv(4, part)], src[kv(4, part)])
    a = LCKVForCausalLM.from_pretrained(llama_dir, layer_types=W2, kv_init="random", seed=3).state_dict()
    b = LCKVForCausalLM.from_pretrained(llama_dir, layer_types=W2, kv_init="random", seed=3).state_dict()
    c = LCKVForCausalLM.from_pretrained(llama_dir, layer_types=W2, kv_init="random", seed=4).state_dict()
    assert torch.equal(a[kv(4, "k_proj.weight")], b[kv(4, "k_proj.weight")])
    assert not torch.equal(a[kv(4, "k_proj.weight")], c[kv(4, "k_proj.weight")])
    assert a[kv(4, "k_proj.bias")].abs().max().item() == 0
    # Identity: the same layer_types gives back the source exactly.
    same = LCKVForCausalLM.from_pretrained(llama_dir, torch.float64, layer_types=LLAMA).state_dict()
    assert set(same) == set(src)
    for name, t in src.items():
        assert torch.equal(same[name], t), name
    # Only m/b change: the layout stays, the config follows.
    m = LCKVForCausalLM.from_pretrained(llama_dir, forward_passes=5, backward_passes=1)
    assert (m.config.forward_passes, m.config.backward_passes) == (5, 1)


def test_convert_checkpoint_writes_a_directory_from_pretrained_loads(llama_dir, tmp_path):
    options = _C.ConvertOptions(layer_types=W2, kv_init="average")
    config = _C.convert_checkpoint(str(llama_dir), str(tmp_path / "w2"), options, dtype=torch.bfloat16)
    assert config.layer_types == W2
    assert json.loads((tmp_path / "w2" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    on_disk = LCKVForCausalLM.from_pretrained(tmp_path / "w2", torch.bfloat16).state_dict()
    in_memory = LCKVForCausalLM.from_pretrained(llama_dir, torch.bfloat16, layer_types=W2).state_dict()
    for name, t in on_disk.items():
        assert torch.equal(t, in_memory[name]), name
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        _C.convert_checkpoint(str(llama_dir), str(tmp_path / "w2"), options)


def test_run_directory_and_latest(llama_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    llama_dir.rename(run / "step_000010")
    (run / "latest").write_text("step_000010\n")
    for path in (run, run / "latest"):
        assert LCKVForCausalLM.from_pretrained(path).config.num_hidden_layers == 6
        assert LCKVForCausalLM.from_pretrained(path, layer_types=W2).config.layer_types == W2
    (run / "latest").write_text("step_000099\n")
    with pytest.raises(CheckpointError, match="step_000099.*no config.json"):
        LCKVForCausalLM.from_pretrained(run)


def test_bad_conversions_are_refused_by_name(llama_dir, tmp_path):
    with pytest.raises(ConfigError, match=r'layer_types "0_1_1" has 3 entries but the source .* has 6 layers'):
        LCKVForCausalLM.from_pretrained(llama_dir, layer_types="0_1_1")
    with pytest.raises(ConfigError, match='kv_init: unknown initialisation "mean"'):
        LCKVForCausalLM.from_pretrained(llama_dir, layer_types=W2, kv_init="mean")
    with pytest.raises(CheckpointError, match="does not exist"):
        LCKVForCausalLM.from_pretrained(tmp_path / "missing", layer_types=W2)
