"""The lm-evaluation-harness model `lckv` (python/lckv/lm_eval_adapter.py), offline: tasks defined
here (a JSONL multiple-choice task, a perplexity task, a generation task), and for a plain Llama
checkpoint the same results as lm-eval's own `hf` model on the same weights through transformers."""

import glob
import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Nothing may reach the hub: the tasks and the model are local.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
# lm-eval's `hf` model (whose request handling LCKVLM reuses) needs accelerate: lm_eval[hf].
pytest.importorskip("accelerate")

from conftest import ROOT  # noqa: E402

from lckv import LCKVForCausalLM  # noqa: E402

WORDS = ("the cat sat on a mat while the dog ran after birds in the green field and a small boy "
         "read old books about kings ships stars rivers and cities far away").split()
TASKS = ("lckv_test_mc", "lckv_test_ppl", "lckv_test_gen")


def _sentence(rng, n):
    return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=rng))


def _tokenizer(directory: Path):
    """A byte-level BPE tokenizer.json with <s> / </s>, as transformers saves one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = torch.Generator().manual_seed(1)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_sentence(rng, 12) + "." for _ in range(200)], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


def _tasks(directory: Path) -> Path:
    directory.mkdir()
    rng = torch.Generator().manual_seed(2)
    mc = [{"question": _sentence(rng, 6) + " ?", "choices": [" " + _sentence(rng, k) for k in (1, 2, 3, 2)],
           "answer": int(torch.randint(0, 4, (1,), generator=rng))} for _ in range(6)]
    ppl = [{"text": _sentence(rng, n)} for n in (5, 40, 90)]  # the longest is several 64-token windows
    gen = [{"question": _sentence(rng, 5), "answer": _sentence(rng, 2)} for _ in range(4)]
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def data(name):
        return (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory / (name + '.jsonl')}\n"
                "test_split: test\n")

    (directory / "mc.yaml").write_text(
        "task: lckv_test_mc\n" + data("mc") + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (directory / "ppl.yaml").write_text(
        "task: lckv_test_ppl\n" + data("ppl") + "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")
    (directory / "gen.yaml").write_text(
        "task: lckv_test_gen\n" + data("gen") + "output_type: generate_until\ndoc_to_text: '{{question}}'\n"
        "doc_to_target: '{{answer}}'\ngeneration_kwargs:\n  until: ['.', 'field']\n  max_gen_toks: 10\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model_dir = root / "llama"
    tok = _tokenizer(model_dir)
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.float32).save_pretrained(model_dir)
    tasks = _tasks(root / "tasks")
    return model_dir, tasks


def _evaluate(model: str, model_dir: Path, tasks: Path, batch_size: int):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lckv.lm_eval_adapter import register

    register()
    args = f"pretrained={model_dir},dtype=float32,device=cpu"
    return simple_evaluate(model=model, model_args=args, tasks=list(TASKS), batch_size=batch_size,
                           task_manager=TaskManager(include_path=str(tasks)), log_samples=True)


def _responses(out, task):
    return {s["doc_id"]: s["resps"] for s in out["samples"][task]}


def test_lckv_equals_lm_eval_hf_on_llama_weights(setup):
    model_dir, tasks = setup
    hf = _evaluate("hf", model_dir, tasks, batch_size=3)
    ours = _evaluate("lckv", model_dir, tasks, batch_size=3)
    # Accuracies identical; every log-likelihood within 1e-4 (fp32); generations identical.
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["lckv_test_mc"][metric] == hf["results"]["lckv_test_mc"][metric]
    for task in ("lckv_test_mc", "lckv_test_ppl"):
        want, got = _responses(hf, task), _responses(ours, task)
        assert sorted(got) == sorted(want)
        for doc in want:
            w = [r[0] if isinstance(r[0], (list, tuple)) else r for r in want[doc]]
            g = [r[0] if isinstance(r[0], (list, tuple)) else r for r in got[doc]]
            w_ll = torch.tensor([float(r[0]) for r in w], dtype=torch.float64)
            g_ll = torch.tensor([float(r[0]) for r in g], dtype=torch.float64)
            assert (w_ll - g_ll).abs().max().item() <= 1e-4, (task, doc, w, g)
            if task == "lckv_test_mc":
                assert [bool(r[1]) for r in g] == [bool(r[1]) for r in w]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        a, b = ours["results"]["lckv_test_ppl"][metric], hf["results"]["lckv_test_ppl"][metric]
        assert abs(a - b) <= 1e-4 * abs(b)
    assert _responses(ours, "lckv_test_gen") == _responses(hf, "lckv_test_gen")
    # The generations are real ones (not all empty), so the stop strings were exercised.
    assert any(r[0][0] for r in _responses(ours, "lckv_test_gen").values())


def test_lckv_loglikelihood_is_batch_independent_for_lckv_checkpoints(setup, tmp_path):
    """An LCKV checkpoint (layers reading another layer's KVs) has no transformers twin: its batched
    log-likelihoods must equal those of each request alone, computed by the sequential definition."""
    from lm_eval.api.instance import Instance

    from lckv.lm_eval_adapter import LCKVLM

    model_dir, _ = setup
    llama = LCKVForCausalLM.from_pretrained(model_dir)
    cfg = llama.config.to_dict()
    cfg.update(num_hidden_layers=4, layer_types="0_3_3_3", forward_passes=3, backward_passes=1)
    torch.manual_seed(3)
    LCKVForCausalLM(cfg).save_pretrained(tmp_path)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / f, tmp_path / f)
    lm = LCKVLM(pretrained=str(tmp_path), batch_size=4, prefill="exact", dtype="float64")
    rng = torch.Generator().manual_seed(4)
    pairs = [(_sentence(rng, 3), " " + _sentence(rng, k)) for k in (1, 2, 4, 3, 2)]
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    model = LCKVForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    tok = lm.tokenizer
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        ctx, cont = tok.encode(context), tok.encode(context + continuation)[len(tok.encode(context)):]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids, sequential=True).logits[0], -1)
        scored = logp[len(ctx) - 1:-1]
        want = scored.gather(1, torch.tensor(cont).view(-1, 1)).sum().item()
        assert abs(ll - want) <= 1e-9
        assert greedy == bool((scored.argmax(-1) == torch.tensor(cont)).all())


def test_bad_model_args_are_clear_errors(setup, tmp_path):
    from lckv.lm_eval_adapter import LCKVLM

    model_dir, _ = setup
    with pytest.raises(TypeError, match="unknown model_args frobnicate"):
        LCKVLM(pretrained=str(model_dir), frobnicate=1)
    with pytest.raises(ValueError, match="prefill must be"):
        LCKVLM(pretrained=str(model_dir), prefill="fast")
    # A checkpoint without a Hugging Face tokenizer: the directory and the files looked for.
    LCKVForCausalLM.from_pretrained(model_dir).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no Hugging Face tokenizer in .*tokenizer\.json, tokenizer_config\.json"):
        LCKVLM(pretrained=str(tmp_path))


def test_lm_eval_command_knows_model_lckv_through_the_installed_pth(setup, tmp_path):
    """The real lm-eval command line: lckv_lm_eval.pth in a site directory (as pip installs it) makes
    `--model lckv` known without importing anything of ours first."""
    model_dir, tasks = setup
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    shutil.copy(ROOT / "python" / "lckv_lm_eval.pth", site_dir)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = ("import site, sys; site.addsitedir(sys.argv[1]); "
           "assert 'lckv.lm_eval_adapter' not in sys.modules and 'torch' not in sys.modules; "
           "sys.argv = ['lm_eval'] + sys.argv[2:]; from lm_eval.__main__ import cli_evaluate; cli_evaluate()")
    out = tmp_path / "out"
    cmd = [sys.executable, "-c", run, str(site_dir), "--model", "lckv", "--model_args",
           f"pretrained={model_dir}", "--tasks", "lckv_test_mc", "--include_path", str(tasks),
           "--batch_size", "2", "--output_path", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(Path(glob.glob(str(out / "**" / "results_*.json"), recursive=True)[0]).read_text())
    assert results["config"]["model"] == "lckv"
    assert 0.0 <= results["results"]["lckv_test_mc"]["acc,none"] <= 1.0
    # The hook, alone: importing lm-eval's registry registers `lckv` (lazily: nothing of ours is
    # imported) with the .pth, and not without it (unless the installed package put one into this
    # interpreter's site-packages), so the run above is not vacuous.
    probe = ("import site, sys; [site.addsitedir(d) for d in sys.argv[1:]]; "
             "from lm_eval.api.registry import model_registry; "
             "print('lckv' in model_registry, 'lckv' in sys.modules, 'torch' in sys.modules)")
    with_pth = subprocess.run([sys.executable, "-c", probe, str(site_dir)], capture_output=True, text=True, env=env)
    assert with_pth.stdout.split() == ["True", "False", "False"], with_pth.stderr
    if not any((Path(p) / "lckv_lm_eval.pth").exists() for p in site.getsitepackages()):
        without = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
        assert without.stdout.split() == ["False", "False", "False"], without.stderr


def test_python_m_lckv_lm_eval_front(setup, tmp_path, monkeypatch):
    """python -m lckv.lm_eval: lm-eval's command line with `lckv` registered (run in process)."""
    import lckv.lm_eval

    model_dir, tasks = setup
    monkeypatch.setattr(sys, "argv", ["python -m lckv.lm_eval", "run", "--model", "lckv", "--model_args",
                                      f"pretrained={model_dir}", "--device", "cpu", "--tasks", "lckv_test_ppl",
                                      "--include_path", str(tasks), "--output_path", str(tmp_path)])
    lckv.lm_eval.main()
    results = json.loads(Path(glob.glob(str(tmp_path / "**" / "results_*.json"), recursive=True)[0]).read_text())
    assert results["config"]["model"] == "lckv" and results["results"]["lckv_test_ppl"]["word_perplexity,none"] > 1


def test_lckv_reads_our_own_checkpoints_sentencepiece_tokenizer(tmp_path):
    """Our programs' checkpoints carry a SentencePiece tokenizer.model plus the tokenizer_config.json that
    save_pretrained writes for transformers: the adapter tokenizes with it exactly as our tokenizer does."""
    import lckv
    from lm_eval.api.instance import Instance

    from lckv.lm_eval_adapter import LCKVLM

    words = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "ba", "gu", "fe"]
    text = tmp_path / "t.txt"
    text.write_text("".join(words[i % 12] + words[i * 7 % 11] + (" " if i % 9 else ".\n") for i in range(2000)))
    lckv.data.prepare_corpus([str(text)], str(tmp_path / "data"), vocab_size=300, val_fraction=0)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copy(tmp_path / "data" / "tokenizer.model", ckpt / "tokenizer.model")
    torch.manual_seed(5)
    cfg = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, layer_types="0_3_3_3", forward_passes=3, backward_passes=1)
    LCKVForCausalLM(cfg).save_pretrained(ckpt)
    lm = LCKVLM(pretrained=str(ckpt), batch_size=2, prefill="exact", dtype="float64")
    sp = lckv.data.Tokenizer.load(str(ckpt / "tokenizer.model"))
    context, continuation = "kalo mine", " suta"
    ctx = [sp.bos_id] + sp.encode(context)
    full = [sp.bos_id] + sp.encode(context + continuation)
    assert full[:len(ctx)] == ctx
    cont = full[len(ctx):]
    (ll, _), = lm.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=(context, continuation),
                                          idx=0)], disable_tqdm=True)
    model = LCKVForCausalLM.from_pretrained(ckpt, dtype=torch.float64)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full]), sequential=True).logits[0], -1)
    want = logp[len(ctx) - 1:-1].gather(1, torch.tensor(cont).view(-1, 1)).sum().item()
    assert abs(ll - want) <= 1e-9
