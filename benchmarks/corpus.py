"""The small corpus the training benchmarks share: tiny Shakespeare when ../shared/data has it.

Character level on ``tinyshakespeare.txt``; without it (a machine without the shared data),
byte level on the Python standard library's top-level ``.py`` files, which every Python has.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def prepare_small(work: Path, seq_len: int, val_fraction: float = 0.0, stdlib_files: Optional[int] = None) -> Path:
    """Prepare the corpus into ``work/shards`` at ``seq_len``; return that folder."""
    from distlm.data.prepare import prepare_corpus

    if SHAKESPEARE.is_file():
        inputs, tokenizer = [str(SHAKESPEARE)], "char"
    else:
        inputs = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:stdlib_files]
        tokenizer = "byte"
    out = work / "shards"
    prepare_corpus(inputs, str(out), tokenizer=tokenizer, seq_len=seq_len, val_fraction=val_fraction,
                   log=lambda *_: None)
    return out
