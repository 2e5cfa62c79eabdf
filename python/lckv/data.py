"""The C++ data pipeline (lckv-prepare's library): SentencePiece tokenizer, corpus preparation
and the deterministic loaders over token shards that lckv-train uses."""

from ._C import SequentialLoader, Tokenizer, TrainLoader, prepare_corpus, read_prepared

__all__ = ["Tokenizer", "TrainLoader", "SequentialLoader", "prepare_corpus", "read_prepared"]
