"""tokenizer.json (csrc/lckv/data/hf_tokenizer.cpp) against the `tokenizers` package: ids and decoded text equal on
the whole KJV corpus for a byte-level BPE (Llama-3 style, trained here) and for Llama-2-style tokenizer.json files
converted from our own SentencePiece model by transformers (Metaspace, and the Prepend/Replace normalizer that
transformers 4 wrote), which must also give our SentencePiece ids. Then every supported step on hard strings, and
each bad file refused with a message naming the field."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lckv import _C

ROOT = Path(__file__).resolve().parents[2]
tokenizers = pytest.importorskip("tokenizers")

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]

# Strings that exercise what KJV does not: other scripts, emoji (4-byte UTF-8), digits, contractions in both cases,
# runs of spaces, tabs, CR LF, leading/trailing whitespace, special tokens in the text, characters unseen in training.
HARD = [
    "",
    " ",
    "   leading and trailing   ",
    "In the beginning God created the heaven and the earth.",
    "DON'T you'll WE'RE it's I'M they'd",
    "numbers 1 12 123 1234 12345 3.14159 1,000,000",
    "tabs\tand\r\nCRLF\n\n\nnewlines \n ",
    "héllo wörld — naïve café ÆØÅ ß",
    "日本語のテキスト 中文 한국어",
    "emoji 😀👍🏽 🇩🇪 ☃ and ﷽",
    "<|begin_of_text|>Hello<|end_of_text|> <|eot_id|>x<|begin_of_text|><|begin_of_text|>",
    "<s>a</s> <unk>",
    "ends with special<|end_of_text|>",
    "\u00a0non-breaking\u2003em space\u200bzero width",
    "mixed: abc123def ¡¿ «quotes» “curly” ‘single’",
]


@pytest.fixture(scope="session")
def kjv_text(tmp_path_factory):
    """The whole KJV as lckv's quickstart prepares it (data/kjv/kjv.txt; extracted by get_corpus.sh if missing)."""
    path = ROOT / "data" / "kjv" / "kjv.txt"
    if not path.exists():
        if shutil.which("bible") is None:
            pytest.skip("no data/kjv/kjv.txt and no `bible` (Debian bible-kjv) to extract it")
        out = tmp_path_factory.mktemp("kjv")
        subprocess.run(["bash", str(ROOT / "scripts" / "get_corpus.sh"), str(out)], check=True, capture_output=True,
                       env={**os.environ, "LCKV_CORPUS_TEXT_ONLY": "1"}, timeout=300)
        path = out / "kjv.txt"
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def byte_level_json(kjv_text, tmp_path_factory):
    """A Llama-3-style byte-level BPE trained on KJV with `tokenizers` (split regex, ByteLevel, ignore_merges)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                         use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=3000, special_tokens=SPECIALS, show_progress=False,
                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(kjv_text.splitlines(), trainer)
    path = tmp_path_factory.mktemp("bytelevel") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def llama2_dir(kjv_text, tmp_path_factory):
    """Our SentencePiece tokenizer (lckv-prepare's settings, trained on part of KJV) and the tokenizer.json
    transformers makes of it."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("llama2")
    (d / "part.txt").write_text("\n".join(kjv_text.splitlines()[:4000]) + "\n", encoding="utf-8")
    _C.prepare_corpus([str(d / "part.txt")], str(d / "prep"), vocab_size=1000, val_fraction=0.0)
    spm_dir = d / "spm"
    spm_dir.mkdir()
    shutil.copy(d / "prep" / "tokenizer.model", spm_dir / "tokenizer.model")
    (spm_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    AutoTokenizer.from_pretrained(str(spm_dir)).save_pretrained(str(d / "hf"))
    return d


def llama2_legacy(hf_dir: Path, out: Path) -> Path:
    """The same tokenizer as transformers 4 saved Llama 2 / TinyLlama: a Prepend("▁") + Replace(" ", "▁") normalizer,
    no pre-tokenizer, a byte-fallback BPE with unk."""
    j = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    j["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                           {"type": "Replace", "pattern": {"String": " "},
                                                            "content": "▁"}]}
    j["pre_tokenizer"] = None
    j["model"]["unk_token"] = "<unk>"
    j["model"]["merges"] = [" ".join(m) for m in j["model"]["merges"]]  # the string format of tokenizers < 0.20
    out.mkdir(exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(j, ensure_ascii=False), encoding="utf-8")
    return out / "tokenizer.json"


def hf_ids(hf, text):
    return hf.encode(text, add_special_tokens=False).ids


def check_same(path: Path, texts, hf=None):
    hf = hf or tokenizers.Tokenizer.from_file(str(path))
    ours = _C.Tokenizer.load(str(path))
    assert ours.vocab_size == hf.get_vocab_size(with_added_tokens=True)
    for text in texts:
        ids = hf_ids(hf, text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    return ours, hf


def check_corpus(path: Path, text: str):
    """Every line of the corpus (newlines kept, so together they are the whole text): ids equal to tokenizers',
    and the ids decode to the text. Line by line, since tokenizers takes minutes on one 4 MB string."""
    ours, hf = check_same(path, HARD)
    lines = text.splitlines(keepends=True)
    want = [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
    got = [ours.encode(line) for line in lines]
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert not bad, (f"{len(bad)} of {len(lines)} lines differ; line {bad[0]} {lines[bad[0]]!r}: ours {got[bad[0]]}, "
                     f"tokenizers {want[bad[0]]}")
    # Each line decodes back to itself (both ways); the whole stream decodes the same both ways.
    assert [ours.decode(line) for line in want] == hf.decode_batch(want, skip_special_tokens=True) == lines
    ids = [i for line in want for i in line]
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    # Pieces cut anywhere (a byte-level token sequence may end inside a character: both give U+FFFD).
    for start, end in [(0, 1), (5, 17), (1000, 1003), (len(ids) // 2, len(ids) // 2 + 500)]:
        assert ours.decode(ids[start:end]) == hf.decode(ids[start:end], skip_special_tokens=True)
    return ours, lines, want


def test_byte_level_bpe_matches_tokenizers_on_kjv(byte_level_json, kjv_text):
    ours, _, _ = check_corpus(byte_level_json, kjv_text)
    hf = tokenizers.Tokenizer.from_file(str(byte_level_json))
    # No tokenizer_config.json beside it: BOS/EOS by their usual names.
    assert (ours.bos_id, ours.eos_id) == (hf.token_to_id("<|begin_of_text|>"), hf.token_to_id("<|end_of_text|>"))
    # Special tokens written in the text are matched; decode drops them as tokenizers does by default.
    text = "<|begin_of_text|>" + kjv_text[:2000] + "<|end_of_text|>"
    check_same(byte_level_json, [text])


def test_llama2_tokenizer_json_matches_tokenizers_and_sentencepiece(llama2_dir, kjv_text):
    spm = _C.Tokenizer.load(str(llama2_dir / "prep" / "tokenizer.model"))
    for path in (llama2_dir / "hf" / "tokenizer.json", llama2_legacy(llama2_dir / "hf", llama2_dir / "legacy")):
        ours, lines, ids = check_corpus(path, kjv_text)
        assert [spm.encode(line) for line in lines] == ids, path
        assert (ours.bos_id, ours.eos_id) == (spm.bos_id, spm.eos_id) == (1, 2)


def variants(base: dict):
    """tokenizer.json variants of every supported pre-tokenizer/decoder setting, built from a trained file."""
    def with_(pre=None, dec=None, norm=None):
        j = json.loads(json.dumps(base))
        if pre is not None:
            j["pre_tokenizer"] = pre
        if dec is not None:
            j["decoder"] = dec
        if norm is not None:
            j["normalizer"] = norm
        return j

    bl = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    yield "gpt2 ByteLevel regex + prefix space", with_(pre=bl)
    for behavior in ["Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"]:
        for invert in (False, True):
            split = {"type": "Split", "pattern": {"String": " "}, "behavior": behavior, "invert": invert}
            yield f"Split string {behavior} invert={invert}", with_(
                pre={"type": "Sequence", "pretokenizers": [split, {**bl, "use_regex": False, "add_prefix_space": False}]})
        split = {"type": "Split", "pattern": {"Regex": r"\p{N}|\s+"}, "behavior": behavior, "invert": False}
        yield f"Split regex {behavior}", with_(
            pre={"type": "Sequence", "pretokenizers": [split, {**bl, "use_regex": False, "add_prefix_space": False}]})


def test_every_supported_step_matches_tokenizers(byte_level_json, llama2_dir, tmp_path):
    base = json.loads(byte_level_json.read_text(encoding="utf-8"))
    for name, j in variants(base):
        p = tmp_path / "v.json"
        p.write_text(json.dumps(j, ensure_ascii=False), encoding="utf-8")
        try:
            check_same(p, HARD)
        except AssertionError as e:
            raise AssertionError(f"variant {name}: {e}") from e
    spm_json = json.loads((llama2_dir / "hf" / "tokenizer.json").read_text(encoding="utf-8"))
    for scheme in ["always", "first", "never"]:
        for split in (False, True):
            j = json.loads(json.dumps(spm_json))
            j["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": split}
            j["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": split}
            j["model"]["fuse_unk"] = split
            j["model"]["unk_token"] = "<unk>"
            p = tmp_path / "m.json"
            p.write_text(json.dumps(j, ensure_ascii=False), encoding="utf-8")
            try:
                check_same(p, HARD)
            except AssertionError as e:
                raise AssertionError(f"Metaspace {scheme} split={split}: {e}") from e
    # Without byte fallback, unseen characters become <unk> (fused or not) or, without unk, are dropped.
    for fuse, unk in [(True, "<unk>"), (False, "<unk>"), (False, None)]:
        j = json.loads(json.dumps(spm_json))
        j["model"].update(byte_fallback=False, fuse_unk=fuse, unk_token=unk)
        p = tmp_path / "u.json"
        p.write_text(json.dumps(j, ensure_ascii=False), encoding="utf-8")
        check_same(p, HARD)
    legacy = llama2_legacy(llama2_dir / "hf", tmp_path / "legacy")
    check_same(legacy, HARD)
    # Added tokens that are not special: normalized ones are found in normalized text (as their normalized form).
    extra = HARD + ["And God said unto the LORD, the LORD God", "the LORDthe LORD  God saidGod said"]
    for path, base_json in [(byte_level_json, base), (legacy, json.loads(legacy.read_text(encoding="utf-8")))]:
        j = json.loads(json.dumps(base_json))
        n = max(t["id"] for t in j["added_tokens"]) + max(j["model"]["vocab"].values()) + 1
        j["added_tokens"] += [
            {"id": n, "content": "God said", "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
             "special": False},
            {"id": n + 1, "content": "LORD", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": False}]
        p = tmp_path / "added.json"
        p.write_text(json.dumps(j, ensure_ascii=False), encoding="utf-8")
        try:
            check_same(p, extra)
        except AssertionError as e:
            raise AssertionError(f"added tokens on {path.name}: {e}") from e


def test_bad_tokenizer_json_is_refused_naming_the_field(byte_level_json, tmp_path):
    base = json.loads(byte_level_json.read_text(encoding="utf-8"))
    text = json.dumps(base)
    p = tmp_path / "tokenizer.json"

    def refused(content, *expected):
        p.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
        with pytest.raises(RuntimeError) as e:
            _C.Tokenizer.load(str(p))
        for s in expected:
            assert s in str(e.value), (s, str(e.value))
        assert str(p) in str(e.value)

    def edit(f):
        j = json.loads(text)
        f(j)
        return j

    refused(text[: len(text) // 2], "tokenizer", "json")  # truncated
    refused("{not json", "tokenizer")
    refused(edit(lambda j: j["model"].update(type="WordPiece")), "field 'model.type'", '"WordPiece"', '"BPE"')
    refused(edit(lambda j: j["model"].update(type="Unigram")), "field 'model.type'", '"Unigram"')
    refused(edit(lambda j: j["model"]["merges"].append(["Ġthe", "nosuchtoken"])), "model.merges[",
            '"nosuchtoken" is not in model.vocab')
    refused(edit(lambda j: j["model"]["merges"].insert(0, "a b c")), "model.merges[0]", "two tokens")
    refused(edit(lambda j: j["model"].pop("vocab")), "field 'model.vocab' is missing")
    refused(edit(lambda j: j["model"]["vocab"].update({"x": "7"})), 'model.vocab["x"]', "expected an integer")
    refused(edit(lambda j: j["model"]["vocab"].update({"x": 2_000_000_000})), "2^24")
    refused(edit(lambda j: j["model"].update(dropout=0.1)), "field 'model.dropout'", "random")
    refused(edit(lambda j: j.update(normalizer={"type": "NFKC"})), "field 'normalizer.type'", '"NFKC"')
    refused(edit(lambda j: j.update(pre_tokenizer={"type": "Whitespace"})), "field 'pre_tokenizer.type'",
            '"Whitespace"')
    refused(edit(lambda j: j["pre_tokenizer"]["pretokenizers"][0].update(pattern={"Regex": "(unclosed"})),
            "pre_tokenizer.pretokenizers[0].pattern.Regex", "does not compile")
    refused(edit(lambda j: j.update(decoder={"type": "WordPiece"})), "field 'decoder.type'")
    refused(edit(lambda j: j["added_tokens"][0].update(lstrip=True)), "field 'added_tokens[0].lstrip'")
    refused(edit(lambda j: j.update(truncation={"max_length": 5})), "field 'truncation'")
    refused("[1, 2]", "expected a tokenizer.json object")
    # tokenizer_config.json naming a BOS token the tokenizer does not have.
    p.write_text(text, encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<nope>"}}))
    with pytest.raises(RuntimeError, match=r"tokenizer_config.json.*field 'bos_token'.*\"<nope>\""):
        _C.Tokenizer.load(str(p))


def test_tokenizer_found_in_directories(byte_level_json, llama2_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RuntimeError, match=r"'.*empty' holds no tokenizer: looked for tokenizer.model .* tokenizer.json"):
        _C.Tokenizer.load(str(tmp_path / "empty"))
    assert _C.Tokenizer.load(str(byte_level_json.parent)).vocab_size == 3000
    both = tmp_path / "both"
    both.mkdir()
    shutil.copy(byte_level_json, both / "tokenizer.json")
    shutil.copy(llama2_dir / "prep" / "tokenizer.model", both / "tokenizer.model")
    assert _C.Tokenizer.load(str(both)).vocab_size == 1000  # tokenizer.model first


def test_checkpoints_carry_and_find_their_tokenizer(byte_level_json, tmp_path):
    """A checkpoint directory with a tokenizer.json: load_tokenizer finds it, lckv-generate uses it, and a tokenizer
    with more ids than the model's vocab_size is refused naming both numbers and the file."""
    import lckv
    from conftest import tiny_config

    model = lckv.LCKVForCausalLM(tiny_config(vocab_size=3000, num_hidden_layers=2, layer_types="0_1"))
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    with pytest.raises(RuntimeError, match=r"holds no tokenizer: looked for tokenizer.model .* and tokenizer.json"):
        lckv.load_tokenizer(ckpt)
    assert lckv.data.copy_tokenizer(str(byte_level_json), str(ckpt)) == str(ckpt / "tokenizer.json")
    tok = lckv.load_tokenizer(ckpt, model)
    assert tok.kind == "tokenizer.json" and tok.path == str(ckpt / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(byte_level_json))
    assert tok.encode("And God said") == hf_ids(hf, "And God said")

    small = lckv.LCKVForCausalLM(tiny_config(vocab_size=2000, num_hidden_layers=2, layer_types="0_1"))
    with pytest.raises(ValueError, match=r"tokenizer .*tokenizer.json has 3000 tokens but the model's vocab_size is 2000"):
        lckv.load_tokenizer(ckpt, small)

    exe = Path(os.environ.get("LCKV_BUILD_DIR", ROOT / "build")) / "lckv-generate"
    if not exe.exists():
        pytest.skip(f"{exe} is not built (set LCKV_BUILD_DIR)")
    r = subprocess.run([str(exe), "--model", str(ckpt), "And God said", "--max-new-tokens", "4", "--temperature", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("And God said")
    small.save_pretrained(tmp_path / "small")
    lckv.data.copy_tokenizer(str(ckpt), str(tmp_path / "small"))
    r = subprocess.run([str(exe), "--model", str(tmp_path / "small"), "x"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"{tmp_path / 'small' / 'tokenizer.json'} has 3000 tokens but the checkpoint's vocab_size is 2000" in r.stderr
    (tmp_path / "small" / "tokenizer.json").unlink()
    r = subprocess.run([str(exe), "--model", str(tmp_path / "small"), "x"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "holds no tokenizer" in r.stderr and str(tmp_path / "small") in r.stderr
