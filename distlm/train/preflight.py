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
    """Run the checks on every rank (collective); returns a one-line summary, raises :class:`PreflightError`.

    Nothing here raises between the collectives: a rank that cannot compute a fact sends the
    error instead, so no rank is left waiting in a gather.
    """
    folders = _distinct(folders)
    token = secrets.token_hex(8) if ctx.is_main else None
    marked = _mark(folders, token) if ctx.is_main else []  # rank 0's marks, which every rank must see
    me = _facts(cfg, ctx, token, [str(p.parent.parent) for p in marked])
    everyone = all_gather_objects(me)
    token, rank0_marked = everyone[0]["token"], set(everyone[0]["marked"])
    problems = [m["error"] for m in everyone if m["error"]]
    if not problems:
        problems = _disagreements(everyone) + _shared_gpus(everyone)
        if any(m["config"] != everyone[0]["config"] for m in everyone):  # rare: only then ship whole configs
            problems += _config_keys_that_differ(all_gather_objects(to_dict(cfg)), everyone)
    found = _folder_problems(folders, token, ctx.rank, me["host"], rank0_marked)
    problems += _grouped(p for rank_found in all_gather_objects(found) for p in rank_found)
    _unmark(marked)
    if problems:
        raise PreflightError(_message(problems, ctx.rank))
    hosts = sorted({m["host"] for m in everyone})
    via = f" started by {launcher}" if launcher else ""
    return (f"preflight: {ctx.world_size} ranks on {len(hosts)} host{'s' if len(hosts) > 1 else ''}{via} run config "
            f"{me['config']} with distlm {me['code']} ({me['versions']}); "
            f"{', '.join(str(f) for f in folders)} writable and shared")


def _facts(cfg: Config, ctx: DistContext, token, marked: list[str]) -> dict:
    """What this rank runs, for the others to compare; an error becomes a fact too."""
    me = {"rank": ctx.rank, "host": socket.gethostname(), "token": token, "marked": marked, "error": None,
          "config": None, "code": None, "versions": None, "gpu": None}
    try:
        import deepspeed
        import torch

        me.update(config=config_digest(cfg), code=code_version(),
                  versions=f"torch {torch.__version__}, deepspeed {deepspeed.__version__}")
        if ctx.device.type == "cuda":
            me["gpu"] = str(torch.cuda.get_device_properties(ctx.device).uuid)
    except Exception as e:  # noqa: BLE001 - reported through the gather, not raised alone
        me["error"] = f"rank {ctx.rank} on {me['host']} could not describe its setup: {type(e).__name__}: {e}"
    return me


def _message(problems: list[str], rank: int) -> str:
    """Rank 0 says everything (at most a screenful); the others point at rank 0's log."""
    if rank != 0:
        return f"preflight failed ({len(problems)} problem(s); rank 0's log lists them): {problems[0]}"
    shown = problems[:12]
    more = [f"... and {len(problems) - 12} more"] if len(problems) > 12 else []
    return "preflight failed:\n  " + "\n  ".join(shown + more)


def _distinct(folders: Iterable[Path]) -> list[Path]:
    """The folders to check (symlinks resolved: a link to a node-local disk is what this is for),
    without one that lies inside another already checked."""
    out: list[Path] = []
    for folder in (Path(f).resolve() for f in folders):
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


def _unmark(marked: list[Path]) -> None:
    for path in marked:
        try:
            path.unlink(missing_ok=True)
            path.parent.rmdir()  # empty unless another rank's probe is left behind
        except OSError:
            pass


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


def _shared_gpus(everyone: list[dict]) -> list[str]:
    by_gpu: dict[tuple, list[int]] = {}
    for m in everyone:
        if m["gpu"]:
            by_gpu.setdefault((m["host"], m["gpu"]), []).append(m["rank"])
    return [f"ranks {_ranges(ranks)} on {host} share one GPU ({gpu}): give each rank its own "
            f"(one process per GPU; CUDA_VISIBLE_DEVICES, srun --gpus-per-task=1)"
            for (host, gpu), ranks in by_gpu.items() if len(ranks) > 1]


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


# (what, folder, rank, host, detail): one per rank that found it; grouped before anyone prints them.
Finding = tuple


def _folder_problems(folders: list[Path], token: str, rank: int, host: str, rank0_marked: set[str]) -> list[Finding]:
    found = []
    for folder in folders:
        probe = folder / PREFLIGHT_DIR / f"rank{rank}-{token}-probe"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_text(token)
            probe.unlink()
        except OSError as e:
            found.append(("unwritable", str(folder), rank, host, e.strerror or str(e)))
            continue
        if str(folder) in rank0_marked and not (folder / PREFLIGHT_DIR / f"rank0-{token}").exists():
            found.append(("unshared", str(folder), rank, host, ""))
    return found


def _grouped(findings: Iterable[Finding]) -> list[str]:
    """One line per (problem, folder): at 8192 ranks a node-local disk is one line, not 8191."""
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for what, folder, rank, host, detail in findings:
        groups.setdefault((what, folder, detail), []).append((rank, host))
    lines = []
    for (what, folder, detail), who in groups.items():
        ranks = _ranges(sorted(r for r, _ in who))
        hosts = sorted({h for _, h in who})
        where = f"on {', '.join(hosts[:4])}" + (f" and {len(hosts) - 4} more hosts" if len(hosts) > 4 else "")
        if what == "unwritable":
            lines.append(f"rank {ranks} {where} cannot write {folder}: {detail}; every rank writes its checkpoint "
                         f"shards there: point run.dir / checkpoint.dir at a writable folder")
        else:
            lines.append(f"rank {ranks} {where} does not see the file rank 0 wrote in {folder}: the folder is not "
                         f"shared between the nodes (a node-local disk?). Every rank writes its part of each "
                         f"checkpoint there; use a shared filesystem for run.dir / checkpoint.dir")
    return lines


def _ranges(ranks: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(parts)
