"""Hugging Face transformers classes for LCKV checkpoints (docs/design.md §5, "The layer_types field and transformers").

`LCKVLlamaConfig` is transformers' view of our config.json in the reference's LCKV format (model_type "lckv-llama"),
`LCKVLlamaForCausalLM` a `PreTrainedModel` whose forward and generate are lckv.LCKVForCausalLM's (the C++ model, with
Hugging Face's argument names mapped there, in python/lckv/model.py). `import lckv` registers them with AutoConfig /
AutoModelForCausalLM once transformers imports those (lckv/__init__.py); the model class is defined on first use; exported LCKV directories also name them in an auto_map
(lckv_hf.py), for trust_remote_code=True. A plain Llama is exported as transformers' own Llama and needs neither.

The config keeps our layer_types string as `lckv_layer_types`: transformers 5 validates a field `layer_types` on every
config as a list of attention kinds, so `config.layer_types` is that list ("sliding_attention" where our entry has the
"s" suffix, "full_attention" elsewhere), and config.json holds the string, as the reference writes it.
"""

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from transformers.configuration_utils import PretrainedConfig

from . import _C
from .config import LCKVConfig
from .model import LCKVForCausalLM

# LlamaConfig's defaults for the shape fields (Llama-7B), which our config requires: transformers builds configs
# without arguments (LCKVLlamaConfig()) to find defaults.
_LLAMA_SHAPE = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 32}
# Keys of the LCKV format that PretrainedConfig itself owns or that name the classes, not the model.
_NOT_ATTRIBUTES = ("architectures", "model_type", "auto_map", "torch_dtype", "layer_types", "rope_scaling")
# transformers' generation options that LCKVLlamaForCausalLM.generate passes to lckv's (or that only describe the
# config); any other one set to a non-default value is refused.
_GENERATION_BOOKKEEPING = {"transformers_version", "_from_model_config", "bos_token_id", "use_cache",
                           "num_beams", "num_return_sequences"}
_GENERATE_OPTIONS = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                     "eos_token_id", "pad_token_id", "cache_implementation"} | _GENERATION_BOOKKEEPING
# transformers' cache_implementation values lckv's decode steps implement (GenerationConfig.decode_step): the
# condensed cache is always preallocated; "static" gives every step fixed shapes over the whole cache, as
# transformers' StaticCache (what torch.compile / CUDA graphs need).
_CACHE_IMPLEMENTATIONS = {None: "dynamic", "dynamic": "dynamic", "static": "static"}
_AUTO_MAP = {"AutoConfig": "lckv_hf.LCKVLlamaConfig", "AutoModelForCausalLM": "lckv_hf.LCKVLlamaForCausalLM"}


def _lckv_fields():
    """The fields our config.json reader knows: those the C++ library writes in the LCKV format."""
    small = dict(_LLAMA_SHAPE, num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=2)
    return set(json.loads(LCKVConfig.from_dict(small).to_json("lckv"))) | {"pad_token_id"}  # written only when set


_FIELDS = _lckv_fields()


class LCKVLlamaConfig(PretrainedConfig):
    """transformers' config of an LCKV model: the fields of lckv.LCKVConfig as attributes (checked by the C++ library
    when built, so a bad value raises lckv.ConfigError naming the field), generic PretrainedConfig ones beside them.
    `to_lckv_config()` gives the lckv.LCKVConfig the model is built from."""

    model_type = "lckv-llama"

    def __init__(self, **kwargs):
        ours = {k: kwargs.pop(k) for k in list(kwargs) if k in _FIELDS}
        for k, v in _LLAMA_SHAPE.items():
            ours.setdefault(k, v)
        if kwargs.get("dtype") is None and ours.get("torch_dtype") is not None:
            kwargs["dtype"] = ours["torch_dtype"]
        ours.pop("torch_dtype", None)
        lckv_format = json.loads(LCKVConfig.from_dict(ours).to_json("lckv"))
        kwargs.setdefault("architectures", ["LCKVLlamaForCausalLM"])
        super().__init__(**kwargs)
        for k, v in lckv_format.items():
            if k not in _NOT_ATTRIBUTES:
                setattr(self, k, v)
        self.pad_token_id = lckv_format.get("pad_token_id")
        self.lckv_layer_types = lckv_format["layer_types"]
        self.lckv_rope_scaling = lckv_format["rope_scaling"]

    # transformers' reading of layer_types (see the module docstring); setting a string sets ours.
    @property
    def layer_types(self):
        entries = self.lckv_layer_types.split("_")
        return ["sliding_attention" if e.endswith("s") else "full_attention" for e in entries]

    @layer_types.setter
    def layer_types(self, value):
        if not isinstance(value, str):
            raise TypeError(f"LCKVLlamaConfig.layer_types is set as lckv's string (e.g. \"0_3_3_3\"), got {value!r}")
        self.lckv_layer_types = value

    # The reference's rope_scaling (transformers 4's), not PretrainedConfig's deprecated alias of rope_parameters.
    @property
    def rope_scaling(self):
        return self.lckv_rope_scaling

    @rope_scaling.setter
    def rope_scaling(self, value):
        self.lckv_rope_scaling = value

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        d["layer_types"] = d.pop("lckv_layer_types")
        d["rope_scaling"] = d.pop("lckv_rope_scaling")
        d["auto_map"] = dict(_AUTO_MAP)
        return d

    def to_diff_dict(self) -> Dict[str, Any]:
        # config.json also names the dtype as the reference (and transformers 4) read it. Not in to_dict: transformers
        # reads every to_dict key back as an attribute, and the attribute torch_dtype warns that it is deprecated.
        return _with_torch_dtype(super().to_diff_dict())

    def to_lckv_config(self) -> LCKVConfig:
        """The lckv.LCKVConfig of these fields (validated by the C++ library)."""
        return LCKVConfig.from_dict({k: v for k, v in _with_torch_dtype(self.to_dict()).items() if k in _FIELDS})


def _with_torch_dtype(d: Dict[str, Any]) -> Dict[str, Any]:
    if d.get("dtype") is not None:
        d["torch_dtype"] = d["dtype"]
    return d


def _define_model_class():
    """LCKVLlamaForCausalLM, defined on first use: transformers' PreTrainedModel costs seconds to import, and the
    config alone (AutoConfig, AutoTokenizer, pipeline's set-up) does not need it."""
    from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class LCKVLlamaForCausalLM(PreTrainedModel, GenerationMixin):
        """transformers' PreTrainedModel around lckv.LCKVForCausalLM (`self.lckv`): forward, generate, from_pretrained and
        save_pretrained are the C++ model's, so logits and generations equal lckv's exactly."""

        config_class = LCKVLlamaConfig
        base_model_prefix = "lckv"
        main_input_name = "input_ids"
        _supports_cache_class = False

        def __init__(self, config: LCKVLlamaConfig, lckv_model: Optional[LCKVForCausalLM] = None):
            super().__init__(config)
            self.lckv = lckv_model if lckv_model is not None else LCKVForCausalLM(config.to_lckv_config())

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path: Union[str, Path], *model_args, config=None, dtype=None,
                            torch_dtype=None, **kwargs) -> "LCKVLlamaForCausalLM":
            """Loads an lckv checkpoint directory with the C++ reader (lckv.LCKVForCausalLM.from_pretrained), in `dtype`
            (a torch dtype, its name, or "auto" / None for config.json's torch_dtype)."""
            if model_args:
                raise TypeError(f"LCKVLlamaForCausalLM.from_pretrained takes no positional model arguments, got {model_args}")
            directory = Path(pretrained_model_name_or_path)
            if not (directory / "config.json").is_file():
                raise _C.CheckpointError(f"'{directory}' has no config.json: LCKVLlamaForCausalLM loads local lckv checkpoint "
                                         "directories (download a hub repository first, e.g. huggingface_hub.snapshot_download)")
            if kwargs.get("device_map") not in (None, "cpu"):
                raise ValueError(f"device_map={kwargs['device_map']!r} is not supported: load on the CPU and call .to(device)")
            if config is None:
                config = LCKVLlamaConfig.from_pretrained(directory)
            dtype = dtype if dtype is not None else torch_dtype
            if dtype is None or dtype == "auto":
                dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
            elif isinstance(dtype, str):
                dtype = getattr(torch, dtype)
            model = LCKVForCausalLM.from_pretrained(directory, dtype=dtype)
            return cls(config, lckv_model=model).eval()

        def save_pretrained(self, save_directory: Union[str, Path], *args, dtype: Optional[torch.dtype] = None, **kwargs):
            """Writes the checkpoint as lckv does (config.json, model.safetensors, lckv_hf.py; a plain Llama as transformers'
            Llama); transformers' other save options (sharding, push_to_hub, ...) are not supported."""
            unsupported = [k for k, v in kwargs.items() if v and k not in ("safe_serialization", "is_main_process")]
            if args or unsupported:
                raise TypeError(f"LCKVLlamaForCausalLM.save_pretrained takes a directory and dtype=, got {args} {unsupported}")
            self.lckv.save_pretrained(save_directory, dtype=dtype)

        def get_input_embeddings(self):
            raise NotImplementedError("the embedding of the C++ model is not a torch.nn.Embedding: resizing is not supported")

        def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    labels: Optional[torch.Tensor] = None, return_dict: Optional[bool] = None, **kwargs):
            """lckv.LCKVForCausalLM.forward (right padding only; use_cache and the like accepted and ignored)."""
            out = self.lckv(input_ids, labels=labels, attention_mask=attention_mask, use_cache=kwargs.pop("use_cache", None))
            unknown = [k for k, v in kwargs.items() if v not in (None, False)]
            if unknown:
                raise TypeError(f"LCKVLlamaForCausalLM.forward does not support {unknown}")
            result = CausalLMOutputWithPast(loss=out.loss, logits=out.logits)
            return result.to_tuple() if return_dict is False else result

        @torch.no_grad()
        def generate(self, input_ids: Optional[torch.Tensor] = None, generation_config=None, attention_mask=None,
                     **kwargs) -> torch.Tensor:
            """transformers' generate contract (a [B, T + new] tensor: the input, then the new tokens right-padded with
            pad_token_id) over lckv's C++ generation, which takes Hugging Face's argument names itself. Options come from
            `generation_config` (default: the model's) updated by `kwargs`; beam search and the like are refused."""
            gc = (generation_config or self.generation_config).to_dict()
            gc.update(kwargs)
            if input_ids is None:
                raise TypeError("generate() needs input_ids")
            if gc.get("num_beams", 1) not in (None, 1) or gc.get("num_return_sequences", 1) not in (None, 1):
                raise ValueError("LCKVLlamaForCausalLM.generate supports greedy decoding and sampling, not beam search or "
                                 "several sequences per prompt")
            # An option lckv's generate does not have is refused unless it is off (None, False, 0) or transformers'
            # default: never silently dropped. transformers 5 leaves unset fields None and fills them from its global
            # defaults (GenerationConfig._get_default_generation_params: typical_p 1.0, length_penalty 1.0, ...),
            # which some versions (5.17) hand to generate as values: those mean unset too.
            defaults = GenerationConfig().to_dict()
            global_defaults = getattr(GenerationConfig, "_get_default_generation_params", dict)()

            def is_default(k, v):
                return v in (None, False) or v == defaults.get(k, v) or (k in global_defaults and v == global_defaults[k])

            ignored = sorted(k for k, v in gc.items() if k not in _GENERATE_OPTIONS and not is_default(k, v))
            if ignored:
                raise ValueError(f"LCKVLlamaForCausalLM.generate does not support {ignored} (lckv's generate takes "
                                 f"{sorted(_GENERATE_OPTIONS - _GENERATION_BOOKKEEPING)})")
            max_new = gc.get("max_new_tokens")
            if max_new is None:
                max_new = max(int(gc.get("max_length") or 20) - input_ids.shape[1], 0)
            options = {k: gc[k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
                       if gc.get(k) is not None}
            if not options.get("do_sample"):
                options = {k: v for k, v in options.items() if k in ("do_sample", "repetition_penalty")}
            cache = gc.get("cache_implementation")
            if cache not in _CACHE_IMPLEMENTATIONS:
                raise ValueError(f"LCKVLlamaForCausalLM.generate: cache_implementation {cache!r} is not supported "
                                 f"(lckv's condensed cache implements {sorted(k for k in _CACHE_IMPLEMENTATIONS if k)})")
            options["decode_step"] = _CACHE_IMPLEMENTATIONS[cache]
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            pad = gc.get("pad_token_id")
            eos = gc.get("eos_token_id")
            if pad is None:
                pad = eos[0] if isinstance(eos, (list, tuple)) else (eos if eos is not None else 0)
            new = self.lckv.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new,
                                     eos_token_id=eos, pad_token_id=pad, **options).tokens
            width = max((len(t) for t in new), default=0)
            tail = torch.full((input_ids.shape[0], width), pad, dtype=input_ids.dtype)
            for i, t in enumerate(new):
                tail[i, : len(t)] = torch.tensor(t, dtype=input_ids.dtype)
            return torch.cat([input_ids.cpu(), tail], dim=1).to(input_ids.device)

    LCKVLlamaForCausalLM.__qualname__ = "LCKVLlamaForCausalLM"  # found as lckv.hf.LCKVLlamaForCausalLM (pickle)
    return LCKVLlamaForCausalLM


_model_class = None


def __getattr__(name):
    global _model_class
    if name == "LCKVLlamaForCausalLM":
        if _model_class is None:
            _model_class = _define_model_class()
        return _model_class
    raise AttributeError(f"module 'lckv.hf' has no attribute '{name}'")


def register_config() -> None:
    """Registers LCKVLlamaConfig with AutoConfig (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(LCKVLlamaConfig.model_type, LCKVLlamaConfig, exist_ok=True)


def register_model() -> None:
    """Registers LCKVLlamaForCausalLM with AutoModelForCausalLM (idempotent)."""
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    AutoModelForCausalLM.register(LCKVLlamaConfig, __getattr__("LCKVLlamaForCausalLM"), exist_ok=True)
