"""Checks every rank makes together before the first step, so a mistake costs seconds, not a job.

A node with an older checkout, an override typed on one node's command line, a run folder on a
node-local disk (each node then keeps its own half of every checkpoint, and a resume finds
none) or a read-only one: each lets a multi-node job start and fails it much later, or
silently. Here every rank shows the others what it runs, and writes a file into the run and
checkpoint folders that every other rank must see. Any difference stops every rank with a
message naming the ranks, hosts and keys (exit code 6). Two small all-gathers in all.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import distlm
from distlm.config import Config, to_dict
from distlm.parallel.distributed import DistContext, all_gather_objects
from distlm.parallel.launch_env import LaunchError

PREFLIGHT_DIR = ".preflight"


class PreflightError(LaunchError):
    """The ranks disagree on what they run, or cannot share the run folder; the message says how."""


@lru_cache(maxsize=1)
def code_version() -> str:
    """distlm's version and a digest of its source files: two checkouts that differ in one line differ here."""
    package = Path(distlm.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{distlm.__version__}+{digest.hexdigest()[:12]}"


def config_digest(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def preflight(cfg: Config, ctx: DistContext, folders: Iterable[Path], launcher: str = "") -> str:
    """Run the checks on every rank (collective); returns a one-line summary, raises :class:`PreflightError`."""
    import deepspeed
    import torch

    folders = _distinct(folders)
    token = secrets.token_hex(8) if ctx.is_main else None
    written = _mark(folders, token) if ctx.is_main else []  # rank 0's marks, which every rank must see
    me = {"rank": ctx.rank, "host": socket.gethostname(), "config": config_digest(cfg), "code": code_version(),
          "versions": f"torch {torch.__version__}, deepspeed {deepspeed.__version__}", "token": token}
    everyone = all_gather_objects(me)
    token = everyone[0]["token"]
    problems = _disagreements(everyone)
    if any(p.startswith("config") for p in problems):  # rare: only then ship whole configs around
        problems += _config_keys_that_differ(all_gather_objects(to_dict(cfg)), everyone)
    problems += _folder_problems(folders, token, ctx.rank, me["host"])
    problems = [p for rank_problems in all_gather_objects(problems) for p in rank_problems]
    problems = list(dict.fromkeys(problems))  # several ranks report a shared difference
    for path in written:
        path.unlink(missing_ok=True)
        try:
            path.parent.rmdir()  # empty unless a rank's probe is left behind
        except OSError:
            pass
    if problems:
        raise PreflightError("preflight failed:\n  " + "\n  ".join(problems))
    hosts = sorted({m["host"] for m in everyone})
    via = f" started by {launcher}" if launcher else ""
    return (f"preflight: {ctx.world_size} ranks on {len(hosts)} host{'s' if len(hosts) > 1 else ''}{via} run config "
            f"{me['config']} with distlm {me['code']} ({me['versions']}); "
            f"{', '.join(str(f) for f in folders)} writable and shared")


def _distinct(folders: Iterable[Path]) -> list[Path]:
    """The folders to check, without one that lies inside another already checked."""
    out: list[Path] = []
    for folder in (Path(f).absolute() for f in folders):
        if not any(folder == o or o in folder.parents for o in out):
            out.append(folder)
    return out


def _mark(folders: list[Path], token: str) -> list[Path]:
    written = []
    for folder in folders:
        try:
            path = folder / PREFLIGHT_DIR / f"rank0-{token}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(token)
            written.append(path)
        except OSError:
            pass  # reported by _folder_problems, which rank 0 runs too
    return written


def _disagreements(everyone: list[dict]) -> list[str]:
    first = everyone[0]
    problems = []
    for field, what in (("config", "config"), ("code", "distlm code version"), ("versions", "library versions")):
        differ = [m for m in everyone if m[field] != first[field]]
        if differ:
            shown = ", ".join(f"rank {m['rank']} on {m['host']} has {m[field]}" for m in differ[:8])
            more = f" and {len(differ) - 8} more" if len(differ) > 8 else ""
            problems.append(f"{what} differs from rank 0's ({first[field]} on {first['host']}): {shown}{more}; "
                            f"start every node from the same checkout, environment and command line")
    return problems


def _config_keys_that_differ(configs: list[dict], everyone: list[dict]) -> list[str]:
    reference = _flatten(configs[0])
    problems = []
    for config, who in zip(configs[1:], everyone[1:]):
        mine = _flatten(config)
        keys = sorted(k for k in reference.keys() | mine.keys() if reference.get(k) != mine.get(k))
        if keys:
            shown = "; ".join(f"{k}: {reference.get(k)!r} on rank 0, {mine.get(k)!r} here" for k in keys[:5])
            problems.append(f"config keys that differ on rank {who['rank']} ({who['host']}): {shown}")
    return problems[:8]


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _folder_problems(folders: list[Path], token: str, rank: int, host: str) -> list[str]:
    problems = []
    for folder in folders:
        mine = folder / PREFLIGHT_DIR / f"rank{rank}-{token}-probe"
        try:
            mine.parent.mkdir(parents=True, exist_ok=True)
            mine.write_text(token)
            mine.unlink()
        except OSError as e:
            problems.append(f"rank {rank} on {host} cannot write {folder}: {e.strerror or e}; every rank writes "
                            f"its checkpoint shards there: point run.dir / checkpoint.dir at a writable folder")
            continue
        if not (folder / PREFLIGHT_DIR / f"rank0-{token}").exists():
            problems.append(f"rank {rank} on {host} does not see the file rank 0 wrote in {folder}: the folder "
                            f"is not shared between the nodes (a node-local disk?). Every rank writes its part of "
                            f"each checkpoint there; use a shared filesystem for run.dir / checkpoint.dir")
    return problems
