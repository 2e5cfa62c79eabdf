"""LCKVConfig: the C++ config (Hugging Face LlamaConfig fields + LCKV fields), parsed and
validated by the C++ library, with dict / file / preset constructors."""

import json
from pathlib import Path
from typing import Any, Dict, List, Union

from . import _C

PathLike = Union[str, Path]


def _preset_dirs() -> List[Path]:
    here = Path(__file__).resolve().parent
    # Installed packages carry the presets; an editable install reads the repository's configs/.
    return [here / "configs", here.parents[1] / "configs"]


class LCKVConfig(_C.LCKVConfig):
    """Construct with from_dict / from_json_file / from_pretrained / preset.

    Fields are attributes (hidden_size, layer_types as "0_6_6_..._7", forward_passes, ...);
    the C++ model validates the whole config when it is built from it.
    """

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "LCKVConfig":
        return cls(json.dumps(d))

    @classmethod
    def from_json_file(cls, path: PathLike) -> "LCKVConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file '{path}' does not exist")
        try:
            return cls(path.read_text())
        except _C.ConfigError as e:
            raise _C.ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, directory: PathLike) -> "LCKVConfig":
        return cls.from_json_file(Path(directory) / "config.json")

    @classmethod
    def preset(cls, name: str) -> "LCKVConfig":
        """A preset from configs/, e.g. "tiny-lckv-w2" (see presets())."""
        for d in _preset_dirs():
            if (d / f"{name}.json").is_file():
                return cls.from_json_file(d / f"{name}.json")
        raise ValueError(f"unknown preset '{name}'; available: {', '.join(cls.presets())}")

    @staticmethod
    def presets() -> List[str]:
        names = set()
        for d in _preset_dirs():
            names.update(p.stem for p in d.glob("*.json"))
        return sorted(names)

    # In memory the LCKV format is used: it keeps every field (a plain Llama's file form drops the LCKV-only
    # ones, docs/design.md §5.1.1); files get the format transformers reads.
    def to_dict(self) -> Dict[str, Any]:
        return json.loads(self.to_json("lckv"))

    def to_json_file(self, path: PathLike) -> None:
        self.save(str(path))

    def copy(self) -> "LCKVConfig":
        return type(self)(self.to_json("lckv"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _C.LCKVConfig) and self.to_dict() == json.loads(other.to_json("lckv"))

    def __repr__(self) -> str:
        return f"LCKVConfig({self.to_json('lckv')})"
