"""The C++ data pipeline (lckv-prepare's library): tokenizers (SentencePiece tokenizer.model and Hugging Face
tokenizer.json), corpus preparation and the deterministic loaders over token shards that lckv-train uses."""

import os
from typing import Optional, Union

from ._C import SequentialLoader, Tokenizer, TrainLoader, copy_tokenizer, find_tokenizer, prepare_corpus, read_prepared

__all__ = ["Tokenizer", "TrainLoader", "SequentialLoader", "prepare_corpus", "read_prepared", "load_tokenizer",
           "find_tokenizer", "copy_tokenizer"]


def load_tokenizer(path: Union[str, os.PathLike], model=None) -> Tokenizer:
    """The tokenizer at `path`: a tokenizer.model or tokenizer.json file, or a checkpoint/data directory holding one
    (tokenizer.model first). With `model` (an LCKVForCausalLM), refuses a tokenizer whose ids the model cannot embed.
    Raises RuntimeError naming the directory and the files looked for when there is none."""
    tok = Tokenizer.load(os.fspath(path))
    if model is not None and tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocab_size is "
                         f"{model.config.vocab_size}: they do not belong together")
    return tok
