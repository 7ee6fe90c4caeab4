"""What the training benchmarks share: their small corpus, and running a process group with a deadline.

The corpus is tiny Shakespeare at character level when ../shared/data has it; without it (a
machine without the shared data), the Python standard library's top-level ``.py`` files at byte
level, which every Python has.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
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


def run_group(cmd: list[str], env: dict, timeout: float, label: str) -> str:
    """Run ``cmd`` (torchrun and its ranks) in its own session; its output, or exit naming ``label``.

    Past ``timeout`` the whole session is killed: torchrun and every rank it started.
    """
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        sys.exit(f"{label} ran past {timeout:.0f} s; killed\n{out[-4000:]}")
    if proc.returncode != 0:
        sys.exit(f"{label} exited {proc.returncode}\n{' '.join(cmd)}\n{out[-6000:]}")
    return out
