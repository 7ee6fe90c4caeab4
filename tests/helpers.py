"""Spawn real distlm processes (one, or several through torchrun) with hard timeouts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def package_source_corpus(folder: Path) -> Path:
    """The package's own source as one text file: deterministic, varied, in every checkout."""
    text = "\n".join(f.read_text() for f in sorted((ROOT / "distlm").rglob("*.py")))
    path = Path(folder) / "corpus.txt"
    path.write_text(text)
    return path


def source_shards(root: Path, **options) -> Path:
    """``root/shards``: the package source as byte-level rows of 32 tokens, 16 rows a block, no val split."""
    from distlm.data.prepare import prepare_corpus

    out = Path(root) / "shards"
    settings = {"tokenizer": "byte", "seq_len": 32, "val_fraction": 0, "block_rows": 16, **options}
    prepare_corpus([str(package_source_corpus(root))], str(out), log=lambda *_: None, **settings)
    return out


def distlm_command(args: list[str], nproc: int = 1, torchrun: tuple = ()) -> list[str]:
    """``distlm ARGS`` in one process, or under torchrun (``torchrun``: its extra options)."""
    if nproc == 1 and not torchrun:
        return [sys.executable, "-m", "distlm", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            *torchrun, "-m", "distlm", *args]


def run_distlm(args: list[str], nproc: int = 1, timeout: float = 300, env: dict | None = None,
               check: bool = True, torchrun: tuple = ()) -> subprocess.CompletedProcess:
    """Run ``distlm ARGS`` in fresh processes; kill the whole process group on timeout."""
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE: as launch/local.sh, so torchrun restarts work (pytorch#135712).
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **(env or {})}
    proc = subprocess.Popen(distlm_command(args, nproc, torchrun), cwd=ROOT, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"distlm {' '.join(args)} (nproc={nproc}) hung past {timeout} s:\n{out[-4000:]}")
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"distlm {' '.join(args)} (nproc={nproc}) exited {proc.returncode}:\n{out[-6000:]}")
    return result


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def step_rows(run_dir: Path) -> list[dict]:
    return [row for row in read_metrics(run_dir) if "loss" in row]


def curve(run_dir: Path) -> list[tuple]:
    """Every logged step's (step, loss, grad norm, LR, data digest): what "equals golden" compares."""
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"], r["data_digest"]) for r in step_rows(run_dir)]


def final_weights(run_dir: Path, step: int) -> dict:
    """The weights of a single-stage, single-tp run's checkpoint of ``step``, by name."""
    import torch

    folder = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    return torch.load(folder / "model-stage00-tp00.pt", weights_only=True)["tensors"]


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def free_ports(count: int = 1) -> int:
    """A port p with p .. p + count - 1 all free on 127.0.0.1 right now (rank r serves metrics on
    metrics.port + r); the kernel picks p, so parallel tests do not collide."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + count <= 65536 and all(port_free(port + i) for i in range(1, count)):
            return port
    raise RuntimeError(f"no {count} consecutive free ports on 127.0.0.1")


def port_free(port: int) -> bool:
    """Whether ``port`` can be bound on 127.0.0.1 right now."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def system_unavailable(reason: str) -> NoReturn:
    """A real system a test needs (SLURM, Prometheus, network namespaces) is missing: skip and
    say why, except under CI (CI=true, set by .ci/run), which must run every such test."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI is set, so this test must run, but: {reason}", pytrace=False)
    pytest.skip(reason)
