"""LCKVForCausalLM: the C++ model as a torch.nn.Module.

The class derives from the torch::python::bind_module wrapper (torch.nn.cpp.ModuleWrapper), so
its parameters are the C++ module's tensors and forward/backward run the C++ code. This file only
adapts the PyTorch conventions that ModuleWrapper lacks for a nested C++ module (state_dict,
.to() with every signature) and the Hugging Face-style entry points.
"""

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch.nn.modules.module import _IncompatibleKeys

from . import _C
from .config import LCKVConfig

PathLike = Union[str, Path]
# (segment, iteration, layer, k, v): called after each iteration of a cyclic segment for each of
# its top targets, with the KVs that layer holds after that iteration.
KVObserver = Callable[[int, int, int, torch.Tensor, torch.Tensor], None]


@dataclass
class CausalLMOutput:
    """Like a Hugging Face ModelOutput: attributes, out["logits"], and out[0] / tuple(out) over the
    fields that are set (loss first when there is one)."""

    loss: Optional[torch.Tensor]  # mean next-token cross-entropy, when labels are given
    logits: torch.Tensor  # [batch, tokens, vocab]
    # output_hidden_states=True: num_hidden_layers + 1 tensors [batch, tokens, hidden], transformers'
    # convention: the embedding output, each layer's output, the last one after the final norm.
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None

    def to_tuple(self) -> Tuple:
        return tuple(v for v in (self.loss, self.logits, self.hidden_states) if v is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            value = getattr(self, key, None) if key in ("loss", "logits", "hidden_states") else None
            if value is None:
                raise KeyError(key)
            return value
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())


@dataclass
class GenerationOutput:
    tokens: List[List[int]]  # the new tokens of each prompt (a stop token is kept)
    logits: Optional[torch.Tensor]  # [B, steps, V] raw logits of every step, with return_logits=True
    stats: "_C.GenerationStats"  # prompt / new token counts, prefill and decode seconds, cache bytes, ...


class LCKVForCausalLM(_C._LCKVForCausalLM):
    """The LCKV decoder with its LM head. `LCKVForCausalLM(config)` builds a freshly initialised
    model (Llama initialisation); `from_pretrained(dir)` loads a checkpoint of the C++ programs."""

    # ModuleWrapper copies these methods of the C++ module onto the instance; the C++ versions
    # accept fewer signatures than torch.nn.Module's (e.g. .to("cpu"), named_parameters(prefix=))
    # and train()/eval() return None, so the instance uses nn.Module's (through
    # ModuleWrapper._apply) and the methods below.
    # The submodule walks (named_modules, children, ...) are nn.Module's too, over _CppSubmodule views
    # of the C++ children (the C++ versions return objects that are not nn.Modules).
    _NN_MODULE_METHODS = (
        "to", "cuda", "cpu", "float", "double", "half", "parameters", "named_parameters", "train", "eval", "zero_grad",
        "modules", "named_modules", "children", "named_children", "buffers", "named_buffers",
    )

    def __init__(self, config: Union[LCKVConfig, dict], *, init_weights: bool = True):
        if isinstance(config, dict):
            config = LCKVConfig.from_dict(config)
        if not isinstance(config, _C.LCKVConfig):
            raise TypeError(f"config must be an LCKVConfig or a dict, got {type(config).__name__}")
        super().__init__(config)
        self._use_nn_module_methods()
        if init_weights:
            self.cpp_module._init_weights()

    def _use_nn_module_methods(self) -> None:
        for name in self._NN_MODULE_METHODS:
            self.__dict__.pop(name, None)
        self.__dict__["_modules"] = _wrap_children(self.cpp_module, "")

    @classmethod
    def _wrap(cls, cpp_module) -> "LCKVForCausalLM":
        self = cls.__new__(cls)
        torch.nn.cpp.ModuleWrapper.__init__(self, cpp_module)
        self._use_nn_module_methods()
        return self

    # ---- checkpoints (the files of the C++ programs: config.json + model.safetensors, HF names)
    @classmethod
    def from_pretrained(cls, directory: PathLike, dtype: torch.dtype = torch.float32, *,
                        layer_types: Optional[str] = None, kv_init: Optional[str] = None,
                        forward_passes: Optional[int] = None, backward_passes: Optional[int] = None,
                        sliding_window: Optional[int] = None, seed: int = 0) -> "LCKVForCausalLM":
        """Loads config.json and model.safetensors (or a sharded index) from `directory` (a checkpoint
        directory, a run directory of lckv-train or its `latest`). Raises CheckpointError if it is not
        a checkpoint directory.

        With `layer_types` (and/or `forward_passes`, `backward_passes`, `sliding_window`, `kv_init`)
        the checkpoint -- a Hugging Face Llama or any LCKV model -- is converted as lckv-convert does
        (the same C++ conversion): the K/V projections of the new KV layers come from `kv_init`:
        "average" (default, the reference's), "copy" or "random" (seeded by `seed`)."""
        convert = {"layer_types": layer_types, "forward_passes": forward_passes, "backward_passes": backward_passes,
                   "sliding_window": sliding_window}
        if kv_init is None and all(v is None for v in convert.values()):
            return cls._wrap(_C.cpp._LCKVForCausalLM._load_pretrained(str(directory), dtype))
        options = _C.ConvertOptions(**convert, kv_init=kv_init or "average", seed=seed)
        return cls._wrap(_C.cpp._LCKVForCausalLM._load_converted(str(directory), dtype, options))

    def save_pretrained(self, directory: PathLike, dtype: Optional[torch.dtype] = None) -> None:
        """Writes config.json and model.safetensors (atomically); weights in `dtype`
        (default: the parameters' dtype)."""
        self.cpp_module._save_pretrained(str(directory), dtype or self._param_dtype())

    @property
    def config(self) -> "FrozenConfig":
        """The model's configuration, read-only: the C++ model was built from it, so changing a field
        here could not change the model (setting one raises). Per call, forward takes forward_passes=,
        backward_passes= and sequential=; for another architecture build a new model."""
        return FrozenConfig(self.cpp_module._config.to_json("lckv"))

    # ---- copy.deepcopy, pickle and torch.save(model): the config and the weights
    def __reduce__(self):
        state = {name: t.detach().clone() for name, t in self.state_dict().items()}
        return (_rebuild, (self.cpp_module._config.to_json("lckv"), state, self.training))

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def train(self, mode: bool = True) -> "LCKVForCausalLM":
        self.cpp_module.train(mode)  # recursive in C++
        return self

    def eval(self) -> "LCKVForCausalLM":
        return self.train(False)

    # ---- parameters and state dicts by Hugging Face name (lckv::io::hf_state_dict)
    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[Tuple[str, torch.nn.Parameter]]:
        for name, p in self.cpp_module._hf_state_dict():
            yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False) -> Dict[str, torch.Tensor]:
        if args:
            raise TypeError("state_dict() takes keyword arguments only (destination=, prefix=, keep_vars=)")
        out = OrderedDict() if destination is None else destination
        for name, p in self.cpp_module._hf_state_dict():
            out[prefix + name] = p if keep_vars else p.detach()
        return out

    def load_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        """Copies tensors into the C++ parameters (converting dtype/device). strict=True raises
        CheckpointError naming a missing, misshapen or unexpected tensor."""
        if assign:
            raise ValueError("load_state_dict(assign=True) is not supported: the parameters belong to the C++ module")
        current = dict(self.cpp_module._hf_state_dict())
        missing = [k for k in current if k not in state_dict]
        unexpected = [k for k in state_dict if k not in current]
        if strict:
            self.cpp_module._load_state(dict(state_dict), "state_dict")
        else:
            merged = {k: state_dict.get(k, p) for k, p in current.items()}
            self.cpp_module._load_state(merged, "state_dict")
        return _IncompatibleKeys(missing, unexpected)

    # ---- forward
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        *,
        forward_passes: Optional[int] = None,
        backward_passes: Optional[int] = None,
        sequential: bool = False,
        kv_observer: Optional[KVObserver] = None,
        convergence_tolerance: float = 0.0,
        return_dict: Optional[bool] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: bool = False,
    ) -> Union[CausalLMOutput, Tuple[torch.Tensor, ...]]:
        """Logits [B, T, V] and, with labels, the mean next-token loss (labels aligned with
        input_ids, shifted inside; -100 ignored), as in Hugging Face.

        attention_mask: [B, T] of 0/1 with right padding only (ones, then zeros). Padded tokens
        follow every real token, so they cannot affect real positions; they are left out of the loss.
        forward_passes / backward_passes override the config's m and b for this call;
        sequential=True runs the token-by-token definition; kv_observer sees the KVs of the
        top targets after every iteration of the parallel forward; convergence_tolerance > 0 stops
        the no-grad iterations of a segment once its KVs change by at most that fraction of their
        scale (lckv::IterationOptions::tolerance; exact prefill uses lckv._C.convergence_tolerance).
        Hugging Face's return_dict=False gives a tuple ((loss,) logits); use_cache is accepted and
        ignored (a forward over whole sequences keeps no cache: generate() uses the condensed one).
        output_hidden_states=True adds out.hidden_states as transformers' LlamaModel reports them
        (num_hidden_layers + 1 tensors: embeddings, layer outputs, the last after the final norm),
        recorded in C++ from the final iteration of each cyclic segment (the supported way to see
        inside the model: hooks on submodules cannot fire, their forward runs in C++).
        """
        if _is_compiling():
            _warn_once("torch.compile: LCKVForCausalLM's forward is C++ and is not traced; it runs eagerly")
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if labels is not None and not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if input_ids.dim() == 2 and input_ids.shape[1] == 0:
            raise ValueError(f"input_ids has no tokens (shape {tuple(input_ids.shape)}): expected [batch, tokens >= 1]")
        if attention_mask is not None:
            labels = _mask_padding(input_ids, labels, attention_mask)
        logits, loss, hidden = self.cpp_module._forward(
            input_ids, labels, forward_passes, backward_passes, sequential, kv_observer, convergence_tolerance,
            bool(output_hidden_states)
        )
        out = CausalLMOutput(loss=loss, logits=logits, hidden_states=tuple(hidden) if hidden is not None else None)
        return out.to_tuple() if return_dict is False else out

    # ---- generation with the condensed KV cache (lckv::generate)
    def generate(
        self,
        prompts: Union[torch.Tensor, Sequence[Sequence[int]], None] = None,
        max_new_tokens: Optional[int] = None,
        *,
        generation_config: Optional["_C.GenerationConfig"] = None,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        eos_token_id: Union[int, Sequence[int], None] = None,
        pad_token_id: Optional[int] = None,
        include_prompt: bool = False,
        **options,
    ) -> GenerationOutput:
        """Continues a batch of prompts (a [B, T] tensor or lists of token ids of any lengths).

        The options are the fields of the C++ GenerationConfig (lckv.GenerationConfig: seed,
        stop_tokens, prefill "iterative" | "exact", prefill_chunk, cache_capacity, streaming (a
        lckv.StreamingOptions, True for the defaults, or None), vocab_limit, return_logits, decode_step
        "dynamic" | "static" | "cuda_graph" (a CUDA model's decode steps replayed from one CUDA graph)) and of
        its SamplingConfig (do_sample, temperature, top_k, top_p, repetition_penalty), set over
        `generation_config` (default: GenerationConfig()). Greedy by default; Hugging Face's
        sampling rules. cache_capacity 0 means prompt + max_new_tokens slots per sequence.

        Hugging Face's names work too: input_ids= (instead of prompts) with a left-padded
        attention_mask (its zeros are dropped: ragged prompts), eos_token_id= (an id or a list, added
        to stop_tokens), pad_token_id= (accepted; the result is lists, so nothing is padded), and
        include_prompt=True returns each prompt followed by its new tokens, as HF's sequences."""
        if input_ids is not None:
            if prompts is not None:
                raise TypeError("generate() got both prompts and input_ids: pass one of them")
            prompts = input_ids
        if prompts is None:
            raise TypeError("generate() needs prompts (or input_ids)")
        if attention_mask is not None:
            prompts = _strip_left_padding(prompts, attention_mask)
        if pad_token_id is not None:
            _integer(pad_token_id, "pad_token_id")
        if eos_token_id is not None:
            eos = [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) else list(eos_token_id)
            options["stop_tokens"] = list(options.get("stop_tokens", [])) + eos
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() != 2:
                raise ValueError(f"prompts must be [batch, tokens] or a list of token lists, got shape {tuple(prompts.shape)}")
            _check_token_tensor("prompts", prompts)
            prompts = prompts.tolist()
        ids = [[_integer(t, f"prompts[{i}][{j}]") for j, t in enumerate(p)] for i, p in enumerate(prompts)]
        config = _generation_config(generation_config, max_new_tokens, options)
        r = self.cpp_module._generate(ids, config)
        tokens = [p + t for p, t in zip(ids, r.tokens)] if include_prompt else r.tokens
        return GenerationOutput(tokens=tokens, logits=r.logits, stats=r.stats)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LCKVForCausalLM(layers={c.num_hidden_layers}, hidden={c.hidden_size}, "
            f"layer_types={c.layer_types}, m={c.forward_passes}, b={c.backward_passes})"
        )


def _check_token_tensor(name: str, t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids, got dtype {t.dtype}")


def _integer(value, name: str, lo: int = -(2**63), hi: int = 2**63 - 1) -> int:
    """`value` as a Python int in [lo, hi] (the C++ type's range); floats (1.5 and 1.0 alike), bools and
    other types raise TypeError, values outside the range ValueError."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    v = value.__index__()
    if not lo <= v <= hi:
        raise ValueError(f"{name} = {v} is outside [{lo}, {hi}]")
    return v


def _mask_padding(input_ids: torch.Tensor, labels: Optional[torch.Tensor], attention_mask: torch.Tensor):
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}"
        )
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be an integer or bool tensor of 0/1, got {attention_mask.dtype}")
    mask = attention_mask.to(torch.long)
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 and 1")
    if (mask[:, 1:] > mask[:, :-1]).any():
        raise ValueError(
            "attention_mask: only right padding (ones, then zeros) is supported; "
            "a zero before a one (left padding or holes) would change the positions of the real tokens"
        )
    if labels is None:
        return None
    return labels.masked_fill(mask.to(labels.device) == 0, -100)


class _CppSubmodule(torch.nn.cpp.ModuleWrapper):
    """A submodule of LCKVForCausalLM as named_modules() / get_submodule() return it: an nn.Module
    over the C++ submodule's parameters (so apply(), parameter walks and the like work) whose
    forward runs only inside the C++ model. Hooks registered on it could never fire, so registering
    one warns and says what to use instead; calling it raises."""

    _HOOK_ADVICE = (
        "for layer outputs use model(..., output_hidden_states=True), for the KVs of the parallel iterations "
        "kv_observer=, or hook the top-level LCKVForCausalLM (its forward is Python)"
    )

    def __init__(self, cpp_module, name: str):
        super().__init__(cpp_module)
        for method in LCKVForCausalLM._NN_MODULE_METHODS:
            self.__dict__.pop(method, None)
        self.__dict__["_modules"] = _wrap_children(cpp_module, name)
        self.__dict__["_lckv_name"] = name

    def _warn_hook(self, kind: str) -> None:
        warnings.warn(
            f"{kind} on submodule '{self._lckv_name}' of LCKVForCausalLM will never fire: the model's forward runs "
            f"in C++ and does not call submodules through Python; {self._HOOK_ADVICE}",
            UserWarning, stacklevel=3)

    def register_forward_hook(self, hook, **kwargs):
        self._warn_hook("register_forward_hook")
        return super().register_forward_hook(hook, **kwargs)

    def register_forward_pre_hook(self, hook, **kwargs):
        self._warn_hook("register_forward_pre_hook")
        return super().register_forward_pre_hook(hook, **kwargs)

    def register_full_backward_hook(self, hook, prepend: bool = False):
        self._warn_hook("register_full_backward_hook")
        return super().register_full_backward_hook(hook, prepend=prepend)

    def register_full_backward_pre_hook(self, hook, prepend: bool = False):
        self._warn_hook("register_full_backward_pre_hook")
        return super().register_full_backward_pre_hook(hook, prepend=prepend)

    def register_backward_hook(self, hook):
        self._warn_hook("register_backward_hook")
        return super().register_backward_hook(hook)

    def forward(self, *args, **kwargs):
        raise TypeError(f"submodule '{self._lckv_name}' of LCKVForCausalLM runs only inside the C++ model: call the "
                        "top-level model (output_hidden_states=True returns each layer's output)")

    def __repr__(self) -> str:
        return f"_CppSubmodule({self._lckv_name!r})"


def _wrap_children(cpp_module, prefix: str) -> "OrderedDict[str, _CppSubmodule]":
    return OrderedDict((name, _CppSubmodule(child, f"{prefix}.{name}" if prefix else name))
                       for name, child in cpp_module._modules.items())


class FrozenConfig(LCKVConfig):
    """An LCKVConfig whose fields cannot be set: model.config (use config.copy() for an editable one)."""

    def __setattr__(self, name, value):
        raise AttributeError(
            f"model.config is read-only: setting '{name}' would not change the C++ model built from it. "
            "Pass forward_passes=/backward_passes=/sequential= to forward() for one call, or build a new "
            "model from model.config.copy()"
        )

    def copy(self) -> LCKVConfig:
        return LCKVConfig(self.to_json("lckv"))


_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _strip_left_padding(prompts, attention_mask: torch.Tensor) -> List[List[int]]:
    """The prompts of a left-padded [B, T] batch without their pads (Hugging Face's generate input)."""
    if not isinstance(prompts, torch.Tensor) or not isinstance(attention_mask, torch.Tensor):
        raise TypeError("attention_mask needs input_ids as a [batch, tokens] tensor, and must be a tensor itself")
    if attention_mask.shape != prompts.shape:
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(prompts.shape)}, got {tuple(attention_mask.shape)}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(f"attention_mask must be an integer or bool tensor of 0/1, got {attention_mask.dtype}")
    mask = attention_mask.to(torch.long)
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 and 1")
    if (mask[:, 1:] < mask[:, :-1]).any():
        raise ValueError("attention_mask for generate: only left padding (zeros, then ones) is supported")
    _check_token_tensor("input_ids", prompts)
    return [row[m.bool()].tolist() for row, m in zip(prompts, mask)]


def _rebuild(config_json: str, state: Dict[str, torch.Tensor], training: bool) -> "LCKVForCausalLM":
    model = LCKVForCausalLM(LCKVConfig(config_json), init_weights=False)
    if state:
        model = model.to(next(iter(state.values())).dtype)
    model.load_state_dict(state)
    return model.train(training)


def _generation_config(base: Optional["_C.GenerationConfig"], max_new_tokens: Optional[int], options: Dict):
    """A GenerationConfig: `base` (copied) or the defaults, with `options` set by field name."""
    config = _C.GenerationConfig()
    if base is not None:
        for name in dir(base):
            if not name.startswith("_") and not callable(getattr(base, name)):
                setattr(config, name, getattr(base, name))
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    sampling = config.sampling
    for name, value in options.items():
        if name == "streaming" and value is True:
            value = _C.StreamingOptions()
        target = config if hasattr(config, name) else sampling if hasattr(sampling, name) else None
        if target is None or name.startswith("_") or callable(getattr(target, name)):
            raise TypeError(f"generate() got an unexpected keyword argument '{name}' (the options are the fields of "
                            "lckv.GenerationConfig and lckv.SamplingConfig)")
        # The C++ field's type decides: integers are checked exactly (no truncated floats).
        current = getattr(target, name)
        if isinstance(current, int) and not isinstance(current, bool):
            value = _integer(value, name, *((0, 2**64 - 1) if name == "seed" else ()))
        elif isinstance(current, list):
            value = [_integer(v, f"{name}[{i}]") for i, v in enumerate(value)]
        setattr(target, name, value)
    config.sampling = sampling
    return config
