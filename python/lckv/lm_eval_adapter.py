"""The lm-evaluation-harness model `lckv`: `lm_eval --model lckv --model_args pretrained=DIR,...`.

LCKVLM is lm-eval's own `hf` model (HFLM) with the model calls replaced by ours: the log-likelihood
requests run our C++ batched forward (`_model_call`), the generation requests our C++ generation
with the condensed KV cache (`_model_generate`). Everything else, which is what makes results
comparable with the field, is HFLM's code unchanged: tokenization (the checkpoint directory's
Hugging Face tokenizer, through AutoTokenizer), context/continuation splitting, request reordering
and batching (`batch_size`), rolling windows of `loglikelihood_rolling`, truncation to the context
length, `until` stop sequences, `max_gen_toks` and the post-processing of generated text. So for a
plain Llama checkpoint the results equal those of `--model hf` on the same weights.

The name reaches lm-eval's registry in one of two ways (lm-eval 0.4 has no plugin entry points):
- installed with the package, lckv_lm_eval.pth (see _lckv_lm_eval_hook.py) registers it whenever
  lm_eval's registry is imported, so the real `lm_eval` / `lm-eval` commands know `--model lckv`;
- `python -m lckv.lm_eval ...` registers it and runs lm-eval's command line (a source tree).

model_args (all optional except pretrained):
  pretrained      checkpoint directory (config.json, model.safetensors: ours or a transformers Llama)
  tokenizer       a Hugging Face tokenizer name or directory (default: the checkpoint directory)
  dtype           float32 | bfloat16 | float16 | float64 (default float32; "auto": the checkpoint's)
  device          cpu | cuda | cuda:N (default cpu; one that is not here: cuda if there is one, else cpu)
  batch_size      requests per forward / generation batch (lm-eval's --batch_size), max_batch_size
  max_length      context length (default: the config's max_position_embeddings)
  prefill         iterative (the config's m + b iterations, as in training) | exact (iterate the KVs to
                  convergence: the sequential definition). For a plain Llama the two are the same.
  add_bos_token, prefix_token_id, truncation, logits_cache, softmax_dtype: as in HFLM
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import List, Optional

import torch

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import configure_pad_token
from lm_eval.models.utils_hf import get_dtype

from . import _C
from .model import LCKVForCausalLM

eval_logger = logging.getLogger(__name__)

MODEL_NAME = "lckv"
# Files AutoTokenizer can build a tokenizer from (what we look for before calling it).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Generation options of lm-eval tasks we map onto lckv.SamplingConfig (HF names; the same in ours).
_SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


def _dtype(name) -> Optional[torch.dtype]:
    if name in (None, "auto"):
        return None
    dtype = get_dtype(name)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise ValueError(f"lckv: dtype must be float32, bfloat16, float16, float64 or auto, got {name!r}")
    return dtype


def _checkpoint_dtype(directory: Path) -> torch.dtype:
    import json

    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = config.get("torch_dtype") or config.get("dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}.get(name, torch.float32)


def _device(name: Optional[str]) -> torch.device:
    """HFLM's choice: a device that exists here as asked; otherwise (lm-eval's command line asks for
    cuda:0 by default) CUDA when there is one, else the CPU."""
    gpus = torch.cuda.device_count()
    if name in {"cpu", "cuda", *(f"cuda:{i}" for i in range(gpus))}:
        return torch.device(name)
    chosen = torch.device("cuda" if gpus else "cpu")
    eval_logger.info("lckv: device %r not available, using %s", name, chosen)
    return chosen


def load_hf_tokenizer(source: str):
    """The Hugging Face tokenizer of a directory (or hub name) for lm-eval. A directory without one is
    an error naming it and the files looked for (not AutoTokenizer's guess at a hub repository)."""
    import transformers

    path = Path(source)
    if path.is_dir() and not any((path / f).is_file() for f in HF_TOKENIZER_FILES):
        hint = (" It holds tokenizer.model (SentencePiece, our programs' tokenizer): the lm-eval adapter needs "
                "the Hugging Face tokenizer of the same vocabulary (tokenizer=NAME_OR_DIR)."
                if (path / "tokenizer.model").is_file() else " Pass tokenizer=NAME_OR_DIR in --model_args.")
        raise ValueError(f"lckv: no Hugging Face tokenizer in '{path}' (looked for {', '.join(HF_TOKENIZER_FILES)})."
                         + hint)
    if path.is_dir():
        # The tokenizer's own files say what it is: AutoTokenizer would also parse the directory's
        # config.json, which for an LCKV checkpoint is not a transformers Llama config (layer_types).
        config = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
        return transformers.AutoTokenizer.from_pretrained(str(source), use_fast=True, config=config())
    return transformers.AutoTokenizer.from_pretrained(str(source), use_fast=True)


class LCKVLM(HFLM):
    """lm-eval's HFLM on our C++ model: see the module docstring."""

    def __init__(
        self,
        pretrained: str,
        tokenizer: Optional[str] = None,
        dtype: Optional[str] = "float32",
        device: Optional[str] = "cpu",
        batch_size: int = 1,
        max_batch_size: Optional[int] = 64,
        max_length: Optional[int] = None,
        prefill: str = "iterative",
        add_bos_token: Optional[bool] = None,
        prefix_token_id: Optional[int] = None,
        truncation: bool = False,
        logits_cache: bool = True,
        softmax_dtype: Optional[str] = None,
        **unknown,
    ) -> None:
        if unknown:
            raise TypeError(f"lckv: unknown model_args {', '.join(sorted(unknown))} (the options are: pretrained, "
                            "tokenizer, dtype, device, batch_size, max_batch_size, max_length, prefill, "
                            "add_bos_token, prefix_token_id, truncation, logits_cache, softmax_dtype)")
        if not isinstance(pretrained, (str, Path)):
            raise TypeError(f"lckv: pretrained must be a checkpoint directory, got {type(pretrained).__name__}")
        if prefill not in ("iterative", "exact"):
            raise ValueError(f"lckv: prefill must be 'iterative' or 'exact', got {prefill!r}")
        if str(batch_size).startswith("auto"):
            raise ValueError("lckv: batch_size 'auto' is not supported (it probes for out-of-memory errors); "
                             "pass a number")
        TemplateLM.__init__(self)  # not HFLM.__init__: it loads a transformers model
        directory = Path(pretrained)
        weights_dtype = _dtype(dtype) or _checkpoint_dtype(directory)
        self._device = _device(device)
        self._model = LCKVForCausalLM.from_pretrained(directory, dtype=weights_dtype).to(self._device).eval()
        self._config = self._model.config
        self.tokenizer = configure_pad_token(load_hf_tokenizer(str(tokenizer or directory)))
        self.backend = "causal"
        self.prefill = prefill
        # HFLM's state, set as its __init__ sets it for a causal model on one process.
        self.pretrained = str(directory)
        self.revision = None
        self.peft = None
        self.delta = None
        self.truncation = truncation
        self.logits_cache = logits_cache
        self.vocab_size = self.tokenizer.vocab_size
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_length = int(max_length) if max_length else self._config.max_position_embeddings
        self.batch_size_per_gpu = int(batch_size)
        self.batch_schedule = 1
        self.batch_sizes = {}
        self.max_batch_size = max_batch_size
        self.softmax_dtype = get_dtype(softmax_dtype) if softmax_dtype is not None else None
        self.mixed_precision_dtype = None
        self.think_end_token = None
        self.enable_thinking = None
        self.chat_template_args = {}
        if len(self.tokenizer) > self._config.vocab_size:
            raise ValueError(f"lckv: the tokenizer has {len(self.tokenizer)} ids but the model's vocab_size is "
                             f"{self._config.vocab_size} ({directory / 'config.json'})")

    # ---- the two model calls HFLM's request handling makes
    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits [B, T, V] of right-padded inputs (padding follows the real tokens, so a causal model's
        real positions do not see it: HFLM passes no mask)."""
        if attn_mask is not None or labels is not None:
            raise ValueError("lckv is a decoder-only model: no encoder attention mask or labels")
        with torch.no_grad():
            if self.prefill == "exact":
                return self._model(inps, forward_passes=inps.shape[1], backward_passes=1,
                                   convergence_tolerance=_C.convergence_tolerance(self._model._param_dtype())).logits
            return self._model(inps).logits

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: List[str], **generation_kwargs):
        """HF generate's result for HFLM.generate_until: [B, context width + new] rows of the left-padded
        context followed by the new tokens (greedy unless do_sample), right-padded with the pad token
        after a sequence's end-of-text. Generation ends once every sequence produced end-of-text or
        contains a stop string (what is generated after one is cut by generate_until)."""
        attention_mask = generation_kwargs.pop("attention_mask", None)
        options = {k: generation_kwargs.pop(k) for k in _SAMPLING_KWARGS if k in generation_kwargs}
        seed = generation_kwargs.pop("seed", None)
        if generation_kwargs:
            raise ValueError(f"lckv: unsupported generation arguments {sorted(generation_kwargs)} (supported: "
                             f"until, max_gen_toks, {', '.join(_SAMPLING_KWARGS)}, seed)")
        if options.get("temperature") == 0.0 and not options.get("do_sample"):
            options.pop("temperature")  # greedy; temperature 0 means the same in HF
        if seed is not None:
            options["seed"] = int(seed)
        if attention_mask is None:
            attention_mask = torch.ones_like(context)
        width = context.shape[1]
        max_new = max_length - width
        if max_new < 1:
            raise ValueError(f"lckv: no room to generate: max_length {max_length} <= context width {width}")
        prompts = [row[m.bool()].tolist() for row, m in zip(context.cpu(), attention_mask.cpu())]
        eos = self.tokenizer.eos_token_id
        generated = [[] for _ in prompts]
        finished = [False] * len(prompts)

        def on_tokens(tokens, active):
            for i, (t, a) in enumerate(zip(tokens, active)):
                if not a or finished[i]:
                    continue
                generated[i].append(t)
                if t == eos or any(s and s in self.tokenizer.decode(generated[i]) for s in stop):
                    finished[i] = True
            return not all(finished)

        config = _C.GenerationConfig()
        config.max_new_tokens = max_new
        config.prefill = self.prefill
        config.stop_tokens = [eos] if eos is not None else []
        sampling = config.sampling
        for name, value in options.items():
            setattr(sampling if hasattr(sampling, name) else config, name, value)
        config.sampling = sampling
        result = self._model.cpp_module._generate(prompts, config, on_tokens)
        steps = max((len(t) for t in result.tokens), default=0)
        pad = self.tokenizer.pad_token_id
        out = torch.full((len(prompts), width + steps), pad, dtype=torch.long)
        out[:, :width] = context.cpu()
        for i, t in enumerate(result.tokens):
            out[i, width:width + len(t)] = torch.tensor(t, dtype=torch.long)
        return out

    # ---- what HFLM reports about a transformers model
    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
            "model_dtype": str(self._model._param_dtype()),
            "model_revision": None,
            "model_sha": "",
            "prefill": self.prefill,
        }


def register() -> None:
    """Makes `lckv` a model name of lm-eval's registry (idempotent)."""
    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=LCKVLM)
