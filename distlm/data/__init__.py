"""Data: tokenizers, the shard format, ``prepare`` (text -> shards), remote shards and the training stream.

Import the submodules directly for the full API; the common names are re-exported here, loaded
on first use: ``prepare`` and its worker processes never import torch, which takes seconds.
"""

from importlib import import_module

_EXPORTS = {
    "BlendSchedule": "blend",
    "ByteTokenizer": "tokenizers",
    "CharTokenizer": "tokenizers",
    "DEFAULT_VAL_FRACTION": "prepare",
    "ERROR_KINDS": "shards",
    "HFTokenizer": "tokenizers",
    "Manifest": "shards",
    "MicroBatch": "stream",
    "PrepareError": "prepare",
    "SentencePieceTokenizer": "tokenizers",
    "ShardError": "shards",
    "ShardInfo": "shards",
    "Source": "blend",
    "SplitInfo": "shards",
    "TokenStream": "stream",
    "load_manifest": "shards",
    "load_tokenizer": "tokenizers",
    "make_loader": "stream",
    "prepare_corpus": "prepare",
    "tokenizer_from_dict": "tokenizers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
