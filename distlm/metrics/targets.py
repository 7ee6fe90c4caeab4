"""The Prometheus ``file_sd`` target file of a run: every rank's metrics endpoint, found without a restart.

A scheduler places a job on nodes nobody knows in advance, and only the ranks know whether
their ports could be bound. So the run writes the file itself: once every rank has started its
exporter, rank 0 gathers their scrape addresses and writes ``TARGETS_DIR/<run>-<digest>.json``
(atomically; Prometheus re-reads it by itself), one group per serving rank::

    [{"targets": ["node1:9470"], "labels": {"job": "distlm", "run": "pretrain", "rank": "0",
                                            "node": "node1", "slurm_job_id": "1234"}}, ...]

and removes it when the run's processes end, also when they end at once on a second signal or
the watchdog, so a finished or preempted run (waiting in the queue) is not read as ranks
missing. A run killed outright (SIGKILL, a lost node) leaves its
file: its targets go down and DistlmRankMissing fires, which is the point; the run's next start
overwrites the file, and ``launch/slurm/train.sbatch`` removes it when the job ends for good::

    python -m distlm.metrics.targets --remove CONFIG.yaml [key.sub=value ...]

TARGETS_DIR is ``metrics.targets_dir`` (``monitoring/targets``, relative to the working
directory, beside the shipped ``monitoring/prometheus/prometheus.yml``), or ``DISTLM_TARGETS_DIR``
when set; an empty value writes nothing. The file's name is the run label and a digest of the
run folder's path (``targets_file``). The series carry ``run``, ``rank`` and ``node``
themselves too, so the scrape config needs ``honor_labels: true``.

The address Prometheus must use depends on ``metrics.bind``: an endpoint bound to loopback (the
default) answers only on 127.0.0.1, so that is its target on rank 0's host, and only a
Prometheus there can scrape it; the ranks of other hosts are listed by host name, unreachable,
so they show as down rather than as rank 0's host's ranks (a run over several hosts is warned
about). A wildcard bind is reached by the host name; any other address is its own target.
"""

from __future__ import annotations

import argparse
import hashlib
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
    """Where this run's target file goes; None when metrics are off or the folder is set to ''.

    Named by the run label (readable) and a digest of the run folder's absolute path: two runs
    whose folders share a name (``a/exp`` and ``b/exp``) must not overwrite each other's file.
    """
    folder = environ.get(TARGETS_DIR_ENV, cfg.metrics.targets_dir)
    if not cfg.metrics.enabled or not folder:
        return None
    # The run label may hold anything a run folder's name can; the file name must stay one name.
    label = re.sub(r"[^A-Za-z0-9._-]", "_", run_label(cfg))
    digest = hashlib.sha256(str(Path(cfg.run.dir).absolute()).encode()).hexdigest()[:8]
    return Path(folder) / f"{label}-{digest}.json"


def scrape_address(bind: str, port: int, node: str, same_host: bool = True) -> str:
    """``host:port`` as a scraper reaches an endpoint bound to ``bind`` on ``node``.

    ``same_host``: whether ``node`` is the host the file is written from. A loopback endpoint on
    another host is listed by that host's name: unreachable (it says so by being down), where
    127.0.0.1 would have Prometheus scrape this host's rank in its place.
    """
    wildcard = bind in WILDCARDS or (not same_host and is_loopback(bind))
    host = node if wildcard else bind
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


def write_targets(path: str | os.PathLike, groups: list[dict]) -> str:
    """Atomically (Prometheus re-reads the file when it changes and must never see half of it);
    returns the text written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(groups, indent=1) + "\n"
    atomic_write_text(path, text)
    return text


class TargetFile:
    """The file rank 0 wrote, removed only while it still holds what this process wrote (a later
    start of the run may have replaced it)."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text

    def remove(self, log: Callable[[str], None]) -> None:
        """Never raises: the run's own ending matters more than its monitoring."""
        try:
            if self.path.read_text() == self.text:
                self.path.unlink()
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log(f"metrics: WARNING: cannot remove the Prometheus target file {self.path} ({e}); "
                f"remove it by hand, or Prometheus reports this run's ranks as down")


def publish(cfg: Config, address: Optional[tuple[str, int]], rank: int, world_size: int, group,
            log: Callable[[str], None]) -> Optional[TargetFile]:
    """Every rank: share this rank's endpoint (``address``: (bind host, port), None when not
    serving); rank 0 writes the run's target file. A collective on ``group`` when the run has
    several ranks. On rank 0 nothing here raises after the collective (a failure only warns:
    monitoring is not worth a run, and a raise on rank 0 alone would leave the others waiting)."""
    mine = None if address is None else (socket.gethostname(), address[1])
    shared = [mine]
    if world_size > 1:
        import torch.distributed as dist

        shared = [None] * world_size
        dist.all_gather_object(shared, mine, group=group)
    if rank != 0:
        return None
    try:
        return _write_for_rank0(cfg, shared, log)
    except Exception as e:  # noqa: BLE001 - see the docstring
        log(f"metrics: WARNING: no Prometheus target file for this run ({type(e).__name__}: {e}); the ranks "
            f"serve anyway but Prometheus will not find them. Set metrics.targets_dir (or {TARGETS_DIR_ENV}) "
            f"to a writable folder that Prometheus reads")
        return None


def _write_for_rank0(cfg: Config, shared: list[Optional[tuple[str, int]]], log: Callable[[str], None]) -> Optional[TargetFile]:
    path = targets_file(cfg)
    if path is None:
        return None
    here = socket.gethostname()
    bind = cfg.metrics.bind
    endpoints = [None if item is None else (scrape_address(bind, item[1], item[0], item[0] == here), item[0])
                 for item in shared]
    nodes = {item[0] for item in shared if item is not None}
    if len(nodes) > 1 and is_loopback(bind):
        log(f"metrics: WARNING: metrics.bind={bind} serves each rank on its own host only; a Prometheus "
            f"cannot reach the ranks of the other {len(nodes) - 1} host(s) of this run (they will show as "
            f"down): set metrics.bind=0.0.0.0 (or the nodes' address)")
    text = write_targets(path, target_groups(endpoints, run_label(cfg)))
    serving = sum(endpoint is not None for endpoint in endpoints)
    log(f"metrics: {serving} of {len(shared)} ranks listed for Prometheus in {path}")
    return TargetFile(path, text)


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
