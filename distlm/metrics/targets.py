"""The Prometheus ``file_sd`` target file of a job: every rank's metrics endpoint, found without a restart.

A scheduler places a job on nodes nobody knows in advance; Prometheus watches a folder of
target files (``file_sd_configs``) and starts scraping a job as soon as its file appears.
``launch/slurm/train.sbatch`` writes one per job before the ranks start and removes it when
the job ends for good (``launch/local.sh`` and ``launch/multinode.sh`` write one per node,
through ``launch/targets.sh``)::

    python -m distlm.metrics.targets --out FILE --job-id ID --hosts "node1 node2" \\
        --tasks-per-node "2(x2)" CONFIG.yaml [key.sub=value ...]

It reads the config the job trains with (the same file and overrides, through distlm's own
loader), so the ports and the run label cannot disagree with what the ranks serve: rank r of a
node serves on ``metrics.port + r`` (see :mod:`distlm.metrics.exporter`). The file is a JSON
list with one group::

    [{"targets": ["node1:9470", "node1:9471", "node2:9470", ...],
      "labels": {"job": "distlm", "run": "<run.name or run.dir's name>", "slurm_job_id": "1234"}}]

The ``run`` label is here so that ``up{run=...}`` (which carries only target labels) says which
run a dead endpoint belonged to; the series carry ``run`` themselves too, so scrape them with
``honor_labels: true`` (else Prometheus renames theirs to ``exported_run``).

With ``metrics.enabled: false`` nothing is written (and an old file of the same name is left
alone: it is the launcher's to remove). Endpoints bind ``metrics.bind``, 127.0.0.1 by default:
a scraper on another machine needs ``metrics.bind=0.0.0.0``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from distlm.config import Config, ConfigError, load_config
from distlm.fsutil import atomic_write_text
from distlm.parallel.launch_env import is_loopback, slurm_task_counts

JOB_LABEL = "distlm"


def run_label(cfg: Config) -> str:
    """The ``run`` label the ranks' own series carry (``run.name``, else the run folder's name)."""
    return cfg.run.name or Path(cfg.run.dir).name


def tasks_per_node(spec: str, n_hosts: int) -> list[int]:
    """SLURM's task counts per node, "2(x3),1" -> [2, 2, 2, 1], checked against the host count."""
    counts = slurm_task_counts(spec)
    if len(counts) == 1 and n_hosts > 1:  # a plain "2": the same on every node (--ntasks-per-node)
        counts *= n_hosts
    if len(counts) != n_hosts:
        raise ValueError(f"tasks per node {spec!r} names {len(counts)} nodes but the job has {n_hosts} hosts")
    return counts


def target_groups(cfg: Config, hosts: list[str], counts: list[int], job_id: str,
                  id_label: str = "slurm_job_id") -> Optional[list[dict]]:
    """The file_sd content: one endpoint per rank, ``host:metrics.port + local_rank``; None when metrics are off."""
    if not cfg.metrics.enabled:
        return None
    if len(hosts) != len(counts):
        raise ValueError(f"{len(hosts)} hosts but {len(counts)} task counts")
    hosts = [endpoint_host(cfg.metrics.bind, hosts)] if len(hosts) == 1 else hosts
    targets = [f"{host}:{cfg.metrics.port + local}" for host, n in zip(hosts, counts) for local in range(n)]
    too_high = [t for t in targets if int(t.rsplit(":", 1)[1]) > 65535]
    if too_high:
        raise ValueError(f"metrics.port={cfg.metrics.port} plus the local rank passes 65535 ({too_high[0]})")
    return [{"targets": targets, "labels": {"job": JOB_LABEL, "run": run_label(cfg), id_label: str(job_id)}}]


def endpoint_host(bind: str, hosts: list[str]) -> str:
    """How a scraper reaches a one-host job: an endpoint bound to loopback (the default) answers
    only on that address, not on the host's name; a multi-host job needs metrics.bind set anyway."""
    return bind if is_loopback(bind) else hosts[0]


def write_targets(path: str | os.PathLike, groups: list[dict]) -> None:
    """Atomically: Prometheus re-reads the file when it changes and must never see half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(groups, indent=1) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m distlm.metrics.targets",
                                description="Write a job's Prometheus file_sd target file (one endpoint per rank).")
    p.add_argument("--out", required=True, help="the target file to write (atomically)")
    p.add_argument("--job-id", default=os.environ.get("SLURM_JOB_ID"), help="default: $SLURM_JOB_ID")
    p.add_argument("--id-label", default="slurm_job_id",
                   help="the target label that carries --job-id (default slurm_job_id; launch/local.sh uses launch_id)")
    p.add_argument("--quiet", action="store_true", help="say nothing when metrics are disabled")
    p.add_argument("--hosts", required=True, help="the job's hosts, separated by spaces or newlines, "
                                                  "as `scontrol show hostnames` prints them")
    p.add_argument("--tasks-per-node", default=os.environ.get("SLURM_TASKS_PER_NODE"),
                   help="ranks per host, SLURM's form (2, 2(x3),1); default: $SLURM_TASKS_PER_NODE")
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
    if not cfg.metrics.enabled:
        if not args.quiet:
            print(f"distlm.metrics.targets: metrics.enabled is false: no target file written ({args.out})")
        return 0
    missing = [name for name, value in (("--job-id", args.job_id), ("--tasks-per-node", args.tasks_per_node))
               if not value]
    hosts = args.hosts.split()
    if not hosts:
        missing.append("--hosts")
    if missing:
        print(f"distlm.metrics.targets: {', '.join(missing)} not given (and not in the SLURM environment)",
              file=sys.stderr)
        return 2
    try:
        groups = target_groups(cfg, hosts, tasks_per_node(args.tasks_per_node, len(hosts)), args.job_id,
                               args.id_label)
    except ValueError as e:
        print(f"distlm.metrics.targets: {e}", file=sys.stderr)
        return 2
    write_targets(args.out, groups)
    if len(hosts) > 1 and is_loopback(cfg.metrics.bind):
        print(f"distlm.metrics.targets: WARNING: metrics.bind={cfg.metrics.bind} serves each rank on its own "
              f"host only; a Prometheus elsewhere cannot reach them: set metrics.bind=0.0.0.0 (or the "
              f"nodes' address) to scrape this {len(hosts)}-host job", file=sys.stderr)
    n = len(groups[0]["targets"])
    print(f"distlm.metrics.targets: {args.out}: {n} endpoints ({groups[0]['targets'][0]} ...), "
          f"run={groups[0]['labels']['run']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
