"""Checkpoint and weight files are what they claim to be, or are refused naming the file and the
tensor or field (issue 12 §3). Files are written with the safetensors package or byte by byte."""

import json
import math
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lckv import CheckpointError, LCKVForCausalLM

from conftest import tiny_config


def _model(**overrides):
    return LCKVForCausalLM(tiny_config(num_hidden_layers=2, layer_types="0_1", **overrides))


def _raw_safetensors(path, header, data):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def test_save_pretrained_refuses_non_float_dtypes(tmp_path):
    model = _model()
    for dtype in (torch.int8, torch.int32, torch.uint8, torch.bool):
        with pytest.raises(CheckpointError, match=rf"'{tmp_path / 'out'}'.*torch\.{str(dtype)[6:]} is not a weight dtype"):
            model.save_pretrained(tmp_path / "out", dtype=dtype)
        assert not (tmp_path / "out" / "model.safetensors").exists()
    model.save_pretrained(tmp_path / "half", dtype=torch.float16)
    assert load_file(tmp_path / "half" / "model.safetensors")["model.norm.weight"].dtype == torch.float16


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad):
    _model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"].view(-1)[7] = bad
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' "
                                              r"has 1 non-finite values .* flat index 7"):
        LCKVForCausalLM.from_pretrained(tmp_path)


def test_integer_labelled_weights_are_refused(tmp_path):
    _model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    # the same bytes, labelled I32: loading them as weights would convert integers
    tensors["model.norm.weight"] = tensors["model.norm.weight"].view(torch.int32)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has dtype I32, "
                                              r"expected a float dtype"):
        LCKVForCausalLM.from_pretrained(tmp_path)


def test_data_offsets_must_tile_the_data_section(tmp_path):
    _model().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header, data = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    name = "model.norm.weight"
    begin, end = header[name]["data_offsets"]

    gapped = dict(header)  # the norm weight moved past the end, leaving its bytes unused
    gapped[name] = dict(header[name], data_offsets=[len(data), len(data) + end - begin])
    _raw_safetensors(path, gapped, data + bytes(end - begin))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '.*' data_offsets .* leave the bytes \[{begin}, "):
        LCKVForCausalLM.from_pretrained(tmp_path)

    other = next(k for k, v in header.items() if k != "__metadata__" and v["data_offsets"][0] == end)
    overlapping = dict(header)  # the norm weight's last 4 bytes are also the next tensor's first
    overlapping[other] = dict(header[other], data_offsets=[end - 4, header[other]["data_offsets"][1] - 4])
    _raw_safetensors(path, overlapping, data)
    with pytest.raises(CheckpointError, match=rf"tensor '{other}' .* overlap those of tensor '{name}'"):
        LCKVForCausalLM.from_pretrained(tmp_path)

    _raw_safetensors(path, header, data + b"\0" * 8)
    with pytest.raises(CheckpointError, match="trailing bytes"):
        LCKVForCausalLM.from_pretrained(tmp_path)


def _shard(tmp_path):
    """The model's checkpoint as two shards and an index; returns (model, index dict)."""
    model = _model()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    weight_map = {k: ("b.safetensors" if "layers.1." in k else "a.safetensors") for k in tensors}
    for shard in ("a.safetensors", "b.safetensors"):
        save_file({k: v for k, v in tensors.items() if weight_map[k] == shard}, tmp_path / shard)
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    return model, index


def test_sharded_weight_map_is_honoured(tmp_path):
    model, index = _shard(tmp_path)
    ids = torch.randint(0, 61, (1, 6))
    with torch.no_grad():
        assert torch.equal(LCKVForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)
    moved = "model.layers.1.mlp.up_proj.weight"
    wrong = json.loads(json.dumps(index))
    wrong["weight_map"][moved] = "a.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(wrong))
    with pytest.raises(CheckpointError, match=rf"b\.safetensors: tensor '{moved}' is in this shard, but the weight_map "
                                              r".* assigns it to shard 'a\.safetensors'"):
        LCKVForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_shard_paths_outside_the_checkpoint_are_refused(tmp_path, shard):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _, index = _shard(ckpt)
    (tmp_path / "outside.safetensors").write_bytes((ckpt / "b.safetensors").read_bytes())
    (ckpt / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    index["weight_map"] = {k: (shard if v == "b.safetensors" else v) for k, v in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json: weight_map assigns tensor '.*' to "
                                              rf"shard '{shard}', .*(absolute path|'\.\.'|outside the checkpoint)"):
        LCKVForCausalLM.from_pretrained(ckpt)


def test_tie_word_embeddings_must_match_the_checkpoint(tmp_path):
    _model(tie_word_embeddings=False).save_pretrained(tmp_path / "untied")
    config = json.loads((tmp_path / "untied" / "config.json").read_text())
    (tmp_path / "untied" / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' is present, but config\.json sets tie_word_embeddings: true"):
        LCKVForCausalLM.from_pretrained(tmp_path / "untied")

    _model(tie_word_embeddings=True).save_pretrained(tmp_path / "tied")
    config = json.loads((tmp_path / "tied" / "config.json").read_text())
    (tmp_path / "tied" / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=False)))
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' is missing \(config\.json sets tie_word_embeddings: false"):
        LCKVForCausalLM.from_pretrained(tmp_path / "tied")
