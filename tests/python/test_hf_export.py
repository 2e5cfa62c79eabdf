"""Export to the Hugging Face world (issue 13, docs/design.md §5 "The layer_types field and transformers"): a plain Llama
we save is transformers' own Llama (loaded without a warning, logits equal); an LCKV model we save loads through
AutoModelForCausalLM after `import lckv` and with trust_remote_code=True; pipeline("text-generation") generates our
greedy text; the config round-trips through AutoConfig."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import ROOT, tiny_config

transformers = pytest.importorskip("transformers")

import lckv  # noqa: E402
from lckv.hf import LCKVLlamaConfig, LCKVLlamaForCausalLM  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, pipeline  # noqa: E402

PACKAGE_ROOT = str(Path(lckv.__file__).resolve().parents[1])


def plain_llama(**overrides):
    """A plain Llama: GQA (4 heads, 2 KV heads), no layer_types."""
    c = tiny_config(num_hidden_layers=3, rope_theta=500000.0, **overrides)
    if "layer_types" not in overrides:
        del c["layer_types"]
    return c


def build(config, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return lckv.LCKVForCausalLM(config).to(dtype).eval()


@contextmanager
def no_warnings_from_transformers():
    """Fails on any warning transformers logs (missing / unexpected / unused tensors or config keys, deprecations) or
    emits through the warnings module."""
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logger = logging.getLogger("transformers")
    handler = Keep(level=logging.WARNING)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    messages = records + [f"{w.category.__name__}: {w.message}" for w in caught
                          if not issubclass(w.category, ResourceWarning)]
    assert not messages, messages


def rope_inv_freq_float64(config):
    """The RoPE inverse frequencies of a transformers config in float64 (default or llama3 scaling), computed here:
    transformers computes them in float32 even for a float64 model."""
    rp, d = config.rope_parameters, config.head_dim
    inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if rp["rope_type"] == "default":
        return inv
    assert rp["rope_type"] == "llama3"
    factor, low, high, orig = (rp[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                               "original_max_position_embeddings"))
    wavelen = 2 * torch.pi / inv
    scaled = torch.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


@pytest.fixture
def transformers_in_float64(monkeypatch):
    """transformers' Llama keeps RMSNorm statistics, the RoPE tables and (eager) softmax in float32 even for a float64
    model, so it agrees with a float64 model to float32 precision only. This runs its float64 model in float64 (same
    formulas; SDPA attention, which computes in the input dtype): call it on a loaded model."""
    from transformers.models.llama import modeling_llama

    def rms_norm(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def rotary(self, x, position_ids):
        freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(x.device, torch.float64)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "forward", rotary)

    def in_float64(hf):
        hf.config._attn_implementation = "sdpa"
        hf.model.rotary_emb.inv_freq = rope_inv_freq_float64(hf.config)
        return hf

    return in_float64


def without_dtype(config):
    """A config's fields but torch_dtype, which names the dtype a checkpoint was saved in (a model's own says float32)."""
    d = json.loads(config.to_json("lckv"))
    del d["torch_dtype"]
    return d


def ids(vocab, shape=(2, 11), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# ---- a plain Llama is written as transformers' Llama


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("tied", [False, True])
def test_plain_llama_loads_in_transformers_without_warnings(tmp_path, dtype, tol, tied, transformers_in_float64):
    ours = build(plain_llama(tie_word_embeddings=tied), dtype)
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "llama" and written["architectures"] == ["LlamaForCausalLM"]
    assert not {"layer_types", "forward_passes", "backward_passes", "sliding_window", "use_sequential", "force_nodiag",
                "auto_map"} & set(written)
    assert written["dtype"] == str(dtype).split(".")[1]
    assert written["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert not (tmp_path / "lckv_hf.py").exists()
    x = ids(61)
    with torch.no_grad():
        expected = ours(x).logits
    for load in (LlamaForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with no_warnings_from_transformers():
            hf = load(tmp_path, dtype=dtype).eval()
        assert type(hf) is LlamaForCausalLM and hf.config.num_key_value_heads == 2
        assert hf.config.tie_word_embeddings == tied and hf.config.rope_parameters["rope_theta"] == 500000.0
        if dtype == torch.float64:
            transformers_in_float64(hf)
        with torch.no_grad():
            got = hf(x).logits
        assert got.dtype == dtype and (got - expected).abs().max().item() <= tol
    # and we read back what we wrote
    again = lckv.LCKVForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    saved_config = ours.config.copy()
    saved_config.torch_dtype = written["torch_dtype"]
    # A plain Llama's file holds no LCKV-only fields (design §5.1.1): they come back as defaults, which change nothing
    # for an identity model.
    assert (again.config.forward_passes, again.config.backward_passes) == (7, 2)
    saved_config.forward_passes, saved_config.backward_passes = 7, 2
    assert again.config == saved_config
    with torch.no_grad():
        assert torch.equal(again(x).logits, expected)


def test_plain_llama_with_llama3_rope_scaling_equals_transformers(tmp_path, transformers_in_float64):
    rope = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8}
    ours = build(plain_llama(rope_scaling=rope, max_position_embeddings=64))
    ours.save_pretrained(tmp_path)
    with no_warnings_from_transformers():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert hf.config.rope_parameters == dict(rope, rope_theta=500000.0)
    transformers_in_float64(hf)
    x = ids(61, (1, 40))
    with torch.no_grad():
        assert (hf(x).logits - ours(x).logits).abs().max().item() <= 1e-9


# ---- an LCKV model: the reference's format, our transformers classes


def test_lckv_model_writes_the_reference_format_and_loads_through_auto_classes(tmp_path):
    ours = build(tiny_config())
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "lckv-llama" and written["architectures"] == ["LCKVLlamaForCausalLM"]
    assert written["layer_types"] == "0_4_4_4_4_5" and written["forward_passes"] == 3
    assert written["auto_map"] == {"AutoConfig": "lckv_hf.LCKVLlamaConfig",
                                   "AutoModelForCausalLM": "lckv_hf.LCKVLlamaForCausalLM"}
    assert "from lckv.hf import LCKVLlamaConfig, LCKVLlamaForCausalLM" in (tmp_path / "lckv_hf.py").read_text()
    with no_warnings_from_transformers():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(hf) is LCKVLlamaForCausalLM and not hf.training
    assert without_dtype(hf.lckv.config) == without_dtype(ours.config)
    assert next(hf.parameters()).dtype == torch.float64  # config.json's torch_dtype
    x = ids(61)
    with torch.no_grad():
        expected = ours(x).logits
        assert torch.equal(hf(x).logits, expected)
        assert torch.equal(hf(input_ids=x, return_dict=False)[0], expected)
        out = hf(x, labels=x)
        assert torch.equal(out.loss, ours(x, labels=x).loss)
    # transformers' static cache maps onto lckv's static decode steps: the same tokens
    prompt = ids(61, (2, 5))
    greedy = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(hf.generate(prompt, max_new_tokens=6, do_sample=False, cache_implementation="static"), greedy)
    # the wrapper saves our format again
    hf.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "lckv_hf.py").is_file()
    again = lckv.LCKVForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float64).eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, expected)


def test_sliding_identity_layers_are_not_a_plain_llama(tmp_path):
    # transformers' LlamaForCausalLM has no sliding window: "0_1s_2" stays in the LCKV format.
    ours = build(plain_llama(layer_types="0_1s_2", sliding_window=3))
    ours.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "lckv-llama" and written["layer_types"] == "0_1s_2"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(hf) is LCKVLlamaForCausalLM
    assert hf.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    x = ids(61)
    with torch.no_grad():
        assert torch.equal(hf(x).logits, ours(x).logits)


def run_python(code, tmp_path, timeout=600):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])),
               HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    return r.stdout


def test_trust_remote_code_loads_without_importing_lckv_first(tmp_path):
    ours = build(tiny_config())
    ours.save_pretrained(tmp_path / "ckpt")
    x = ids(61)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "assert 'lckv' not in sys.modules\n"
        "m = AutoModelForCausalLM.from_pretrained('ckpt', trust_remote_code=True)\n"
        "print(type(m).__name__)\n"
        "with torch.no_grad():\n"
        "    torch.save(m(torch.load('x.pt')).logits, 'logits.pt')\n"
    )
    assert run_python(code, tmp_path).split() == ["LCKVLlamaForCausalLM"]
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), ours(x).logits)


def test_import_lckv_leaves_transformers_unimported_and_registers_when_it_is(tmp_path):
    code = (
        "import sys, time\n"
        "t = time.perf_counter(); import lckv; t = time.perf_counter() - t\n"
        "assert 'transformers' not in sys.modules\n"
        "import importlib.util; assert importlib.util.find_spec('transformers.models.auto.modeling_auto')\n"
        "from transformers import AutoConfig\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "import lckv.hf\n"
        "assert CONFIG_MAPPING['lckv-llama'] is lckv.hf.LCKVLlamaConfig\n"
        "assert 'LCKVLlamaForCausalLM' not in vars(lckv.hf)\n"
        "from transformers import AutoModelForCausalLM\n"
        "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING\n"
        "assert MODEL_FOR_CAUSAL_LM_MAPPING[lckv.hf.LCKVLlamaConfig] is lckv.hf.LCKVLlamaForCausalLM\n"
        "print(f'{t:.3f}')\n"
    )
    print("import lckv:", run_python(code, tmp_path).strip(), "s")


# ---- AutoConfig


def test_auto_config_round_trip(tmp_path):
    ours = build(tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0}, pad_token_id=0))
    ours.save_pretrained(tmp_path / "a")
    with no_warnings_from_transformers():
        c = AutoConfig.from_pretrained(tmp_path / "a")
    assert type(c) is LCKVLlamaConfig
    assert c.lckv_layer_types == "0_4_4_4_4_5" and c.layer_types == ["full_attention"] * 6
    assert c.forward_passes == 3 and c.num_key_value_heads == 2 and c.rope_scaling == {"rope_type": "linear",
                                                                                       "factor": 2.0}
    assert c.dtype == torch.float64 and c.pad_token_id == 0
    assert without_dtype(c.to_lckv_config()) == without_dtype(ours.config)
    with no_warnings_from_transformers():
        c.save_pretrained(tmp_path / "b")
    assert lckv.LCKVConfig.from_pretrained(tmp_path / "b") == c.to_lckv_config()
    assert AutoConfig.from_pretrained(tmp_path / "b").to_diff_dict() == c.to_diff_dict()
    # an edited field reaches the model built from the config
    c.forward_passes = 1
    assert LCKVLlamaForCausalLM(c).lckv.config.forward_passes == 1
    assert LCKVLlamaConfig().num_hidden_layers == 32  # transformers builds configs without arguments


# ---- pipeline("text-generation")


def make_tokenizer(tmp_path):
    words = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "ba", "gu", "fe"]
    text = tmp_path / "t.txt"
    text.write_text("".join(words[i % 12] + words[i * 7 % 11] + (" " if i % 9 else ".\n") for i in range(2000)))
    lckv.data.prepare_corpus([str(text)], str(tmp_path / "data"), vocab_size=300, val_fraction=0)
    return tmp_path / "data" / "tokenizer.model"


@pytest.mark.parametrize("layer_types", [None, "0_2_2_3"])
def test_pipeline_text_generation_equals_our_greedy_generate(tmp_path, layer_types):
    tokenizer_model = make_tokenizer(tmp_path)
    config = tiny_config(vocab_size=300, num_hidden_layers=4, layer_types=layer_types)
    if layer_types is None:
        del config["layer_types"]
    ours = build(config, torch.float32, seed=3)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(tokenizer_model, ckpt / "tokenizer.model")
    ours.save_pretrained(ckpt)
    tok_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "LlamaTokenizer" and tok_config["bos_token"] == "<s>"

    sp = lckv.data.Tokenizer.load(str(tokenizer_model))
    prompt = "kalo mine"
    prompt_ids = [sp.bos_id] + sp.encode(prompt)
    new = ours.generate([prompt_ids], max_new_tokens=12).tokens[0]

    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    assert tokenizer(prompt).input_ids == prompt_ids
    generator = pipeline("text-generation", model=str(ckpt))
    assert type(generator.model) is (LlamaForCausalLM if layer_types is None else LCKVLlamaForCausalLM)
    out = generator(prompt, max_new_tokens=12, do_sample=False, return_tensors=True)
    assert out[0]["generated_token_ids"] == prompt_ids + new
    # the text: a random model emits byte pieces, which SentencePiece and transformers render differently when they
    # are not valid UTF-8; the pipeline's text is its tokenizer's rendering of our tokens
    text = generator(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert text == prompt + tokenizer.decode(new, skip_special_tokens=True)


# ---- README example


def readme_example():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Use from Hugging Face transformers"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs(tmp_path):
    tokenizer_model = make_tokenizer(tmp_path)
    (tmp_path / "data" / "kjv").mkdir(parents=True)
    shutil.copy(tokenizer_model, tmp_path / "data" / "kjv" / "tokenizer.model")
    out = run_python(readme_example(), tmp_path)
    assert [line.split()[0] for line in out.splitlines()] == ["LlamaForCausalLM", "LCKVLlamaForCausalLM"], out


# ---- bad input


def test_bad_input(tmp_path):
    ours = build(tiny_config())
    with pytest.raises(lckv.CheckpointError, match=r"dtype torch\.int32 is not a weight dtype"):
        ours.save_pretrained(tmp_path / "int", dtype=torch.int32)
    with pytest.raises(lckv.ConfigError, match=r"layer_types '0_9' has 2 entries"):
        LCKVLlamaConfig(**tiny_config(layer_types="0_9"))
    with pytest.raises(lckv.ConfigError, match="hidden_act"):
        LCKVLlamaConfig(**tiny_config(hidden_act="gelu"))
    c = LCKVLlamaConfig(**tiny_config())
    with pytest.raises(TypeError, match="lckv's string"):
        c.layer_types = ["full_attention"] * 6
    with pytest.raises(lckv.CheckpointError, match="has no config.json"):
        LCKVLlamaForCausalLM.from_pretrained(tmp_path / "nothing-here")
    ours.save_pretrained(tmp_path / "ok")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ok")
    with pytest.raises(ValueError, match="not beam search"):
        hf.generate(ids(61, (1, 3)), max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match=r"does not support \['no_repeat_ngram_size'\]"):
        hf.generate(ids(61, (1, 3)), max_new_tokens=2, no_repeat_ngram_size=3)
    # transformers' own "unset" values (its global defaults, which transformers 5.17's pipeline hands to generate)
    # are no options; the same options set to anything else are refused.
    greedy = hf.generate(ids(61, (1, 3)), max_new_tokens=2)
    neutral = dict(typical_p=1.0, length_penalty=1.0, encoder_repetition_penalty=1.0, num_assistant_tokens=20,
                   num_assistant_tokens_schedule="constant", no_repeat_ngram_size=0)
    assert torch.equal(hf.generate(ids(61, (1, 3)), max_new_tokens=2, **neutral), greedy)
    with pytest.raises(ValueError, match=r"does not support \['typical_p'\]"):
        hf.generate(ids(61, (1, 3)), max_new_tokens=2, typical_p=0.9)
    with pytest.raises(ValueError, match=r"cache_implementation 'offloaded' is not supported .*\['dynamic', 'static'\]"):
        hf.generate(ids(61, (1, 3)), max_new_tokens=2, cache_implementation="offloaded")
    with pytest.raises(TypeError, match="does not support"):
        hf(ids(61), output_attentions=True)
    (tmp_path / "bad_tok").mkdir()
    (tmp_path / "bad_tok" / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(lckv.CheckpointError, match=r"tokenizer\.model: not a SentencePiece model"):
        ours.save_pretrained(tmp_path / "bad_tok")
    with pytest.raises(lckv.ConfigError, match="format='hf'"):
        ours.config.to_json("hf")
