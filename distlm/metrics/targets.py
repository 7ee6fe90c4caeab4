"""The Prometheus ``file_sd`` target file of a run: every rank's metrics endpoint, found without a restart.

A scheduler places a job on nodes nobody knows in advance, and only the ranks know whether
their ports could be bound. So the run writes the file itself: once every rank has started its
exporter, rank 0 gathers their scrape addresses and writes ``TARGETS_DIR/<run>.json``
(atomically; Prometheus re-reads it by itself), one group per serving rank::

    [{"targets": ["node1:9470"], "labels": {"job": "distlm", "run": "pretrain", "rank": "0",
                                            "node": "node1", "slurm_job_id": "1234"}}, ...]

and removes it when the run's processes end, so a finished or preempted run (waiting in the
queue) is not read as ranks missing. A run killed outright (SIGKILL, a lost node) leaves its
file: its targets go down and DistlmRankMissing fires, which is the point; the run's next start
overwrites the file, and ``launch/slurm/train.sbatch`` removes it when the job ends for good::

    python -m distlm.metrics.targets --remove CONFIG.yaml [key.sub=value ...]

TARGETS_DIR is ``metrics.targets_dir`` (``monitoring/targets``, relative to the working
directory, beside the shipped ``monitoring/prometheus/prometheus.yml``), or ``DISTLM_TARGETS_DIR``
when set; an empty value writes nothing. The series carry ``run``, ``rank`` and ``node``
themselves too, so the scrape config needs ``honor_labels: true``.

The address Prometheus must use depends on ``metrics.bind``: an endpoint bound to loopback (the
default) answers only on 127.0.0.1, so that is its target, and only a Prometheus on the same host
can scrape it (a run over several hosts is warned about); a wildcard bind is reached by the host
name; any other address is its own target.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional

from distlm.config import Config, ConfigError, load_config
from distlm.fsutil import atomic_write_text
from distlm.parallel.launch_env import is_loopback

JOB_LABEL = "distlm"
TARGETS_DIR_ENV = "DISTLM_TARGETS_DIR"
WILDCARDS = ("", "0.0.0.0", "::")


def run_label(cfg: Config) -> str:
    """The ``run`` label the ranks' own series carry (``run.name``, else the run folder's name)."""
    return cfg.run.name or Path(cfg.run.dir).name


def targets_file(cfg: Config, environ: Mapping[str, str] = os.environ) -> Optional[Path]:
    """Where this run's target file goes; None when metrics are off or the folder is set to ''."""
    folder = environ.get(TARGETS_DIR_ENV, cfg.metrics.targets_dir)
    if not cfg.metrics.enabled or not folder:
        return None
    # The run label may hold anything a run folder's name can; the file name must stay one name.
    return Path(folder) / (re.sub(r"[^A-Za-z0-9._-]", "_", run_label(cfg)) + ".json")


def scrape_address(bind: str, port: int, hostname: str) -> str:
    """``host:port`` as a scraper reaches an endpoint bound to ``bind`` on ``hostname``."""
    host = hostname if bind in WILDCARDS else bind
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a name, not an address literal
    return f"{host}:{port}"


def target_groups(endpoints: list[Optional[tuple[str, str]]], run: str,
                  environ: Mapping[str, str] = os.environ) -> list[dict]:
    """The file_sd content: ``endpoints[rank]`` is (address, node), or None for a rank not serving."""
    extra = {"slurm_job_id": environ["SLURM_JOB_ID"]} if environ.get("SLURM_JOB_ID") else {}
    return [{"targets": [address], "labels": {"job": JOB_LABEL, "run": run, "rank": str(rank), "node": node, **extra}}
            for rank, endpoint in enumerate(endpoints) if endpoint is not None
            for address, node in [endpoint]]


def write_targets(path: str | os.PathLike, groups: list[dict]) -> None:
    """Atomically: Prometheus re-reads the file when it changes and must never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(groups, indent=1) + "\n")


def publish(cfg: Config, address: Optional[tuple[str, int]], rank: int, world_size: int, group,
            log: Callable[[str], None]) -> Optional[Path]:
    """Every rank: share this rank's endpoint (``address``: (bind host, port), None when not
    serving); rank 0 writes the run's target file and returns its path. A collective on ``group``
    when the run has several ranks. A file that cannot be written only warns: monitoring is not
    worth a run."""
    node = socket.gethostname()
    mine = None if address is None else (scrape_address(cfg.metrics.bind, address[1], node), node)
    endpoints = [mine]
    if world_size > 1:
        import torch.distributed as dist

        endpoints = [None] * world_size
        dist.all_gather_object(endpoints, mine, group=group)
    path = targets_file(cfg)
    if rank != 0 or path is None:
        return None
    nodes = {endpoint[1] for endpoint in endpoints if endpoint is not None}
    if len(nodes) > 1 and is_loopback(cfg.metrics.bind):
        log(f"metrics: WARNING: metrics.bind={cfg.metrics.bind} serves each rank on its own host only; a "
            f"Prometheus elsewhere cannot reach the {len(nodes)} hosts of this run: set metrics.bind=0.0.0.0 "
            f"(or the nodes' address)")
    try:
        write_targets(path, target_groups(endpoints, run_label(cfg)))
    except OSError as e:
        log(f"metrics: WARNING: cannot write the Prometheus target file {path} ({e}); the ranks serve "
            f"anyway but Prometheus will not find them. Set metrics.targets_dir (or {TARGETS_DIR_ENV}) "
            f"to a writable folder that Prometheus reads")
        return None
    serving = sum(endpoint is not None for endpoint in endpoints)
    log(f"metrics: {serving} of {world_size} ranks listed for Prometheus in {path}")
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distlm.metrics.targets",
                                description="Remove a run's Prometheus target file (what a run killed "
                                            "outright leaves behind).")
    p.add_argument("--remove", action="store_true", required=True, help="remove the run's target file")
    p.add_argument("config", metavar="CONFIG", help="the training config (YAML)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="the training job's overrides")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"distlm.metrics.targets: config error: {e}", file=sys.stderr)
        return 2
    path = targets_file(cfg)
    if path is not None and path.exists():
        path.unlink()
        print(f"distlm.metrics.targets: removed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
