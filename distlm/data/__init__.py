"""Data: tokenizers, the shard format, ``prepare`` (text -> shards) and the training stream.

Import the submodules directly for the full API; the common names are re-exported here.
"""

from .prepare import DEFAULT_VAL_FRACTION, PrepareError, prepare_corpus
from .shards import Manifest, ShardError, ShardInfo, SplitInfo, load_manifest
from .stream import TokenStream, make_loader
from .tokenizers import ByteTokenizer, CharTokenizer, load_tokenizer, tokenizer_from_dict

__all__ = [
    "ByteTokenizer",
    "CharTokenizer",
    "DEFAULT_VAL_FRACTION",
    "Manifest",
    "PrepareError",
    "ShardError",
    "ShardInfo",
    "SplitInfo",
    "TokenStream",
    "load_manifest",
    "load_tokenizer",
    "make_loader",
    "prepare_corpus",
    "tokenizer_from_dict",
]
