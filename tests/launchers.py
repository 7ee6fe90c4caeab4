"""What the launcher tests share: one small training job, and the curve every launcher must reproduce.

Every launcher (torchrun on one node or two, the DeepSpeed hostfile launcher, mpiexec, SLURM)
starts the same 2-rank job from the same config, so each must produce the same per-step
losses, bit for bit, as a plain ``torchrun --standalone`` run of it: the reference. A launcher
that got a rank, a world size or a data shard wrong shows up as a different curve.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from helpers import ROOT, curve, run_distlm

CONFIG = str(ROOT / "configs" / "tiny-test.yaml")
STEPS = 12
SAVE_EVERY = 4
WORLD = 2


def job_overrides(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    """The shared job's ``key=value`` overrides (append ``extra``; later ones win)."""
    return [f"run.dir={run_dir}", f"data.path={shards}", f"train.max_steps={STEPS}",
            f"train.save_every={SAVE_EVERY}", "train.log_every=1", "train.eval_every=0",
            "train.batch_size=8", "fault.hang_timeout_s=120", *extra]


def job_args(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    """``distlm`` arguments for the shared job: ``train CONFIG overrides...``."""
    return ["train", CONFIG, *job_overrides(run_dir, shards, *extra)]


def launcher_env(**extra: str) -> dict:
    """An environment for a launcher script: this interpreter first on PATH, one thread a rank."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}", "PYTHON": sys.executable,
            "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **extra}


def reference_curve(root: Path, shards: Path) -> list[tuple]:
    """The shared job under ``torchrun --standalone`` with 2 processes: (step, loss, grad, lr, digest) rows."""
    run_dir = Path(root) / "reference"
    run_distlm(job_args(run_dir, shards), nproc=WORLD, timeout=240)
    rows = curve(run_dir)
    assert [r[0] for r in rows] == list(range(1, STEPS + 1)), rows
    return rows
