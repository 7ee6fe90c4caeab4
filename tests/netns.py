"""Two "hosts" on one machine: two network namespaces joined by a veth cable.

Each namespace has its own loopback, its own interfaces and routes and its own ports, so a
multi-node launcher run in both meets what it meets between machines: the rendezvous endpoint
and the workers' MASTER_ADDR must be an address the other side reaches (a hostname resolving to
127.0.0.1 reaches only itself), and gloo must bind the cable's interface. The namespaces have no
route anywhere else: nothing run inside can send a packet off the machine.

    with two_hosts() as (a, b):          # 10.77.0.1 in a, 10.77.0.2 in b
        subprocess.Popen(a.wrap(["torchrun", ...]), ...)

Names carry this process's pid and a counter, so a run never meets another's leftovers, and
the namespaces are deleted on the way out, failure or not (after killing what still runs in
them: a namespace outlives its deletion while a process holds it). Needs root and iproute2.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

from helpers import process_alive

PREFIX = "distlm-"
_counter = itertools.count()


class NamespaceUnavailable(RuntimeError):
    """Network namespaces cannot be created here (not root, no iproute2, or the kernel refuses)."""


@dataclass(frozen=True)
class Host:
    netns: str    # the namespace's name
    ifname: str   # its end of the cable
    addr: str     # that end's address

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace (the environment passes through unchanged)."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def pids(self) -> list[int]:
        """Every process whose network namespace is this host's."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill_all(self) -> None:
        """SIGKILL every process in this namespace, by pid (all of them were started by the caller)."""
        for _ in range(20):  # a dying torchrun may still fork: repeat until the namespace is empty
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)


def unavailable() -> Optional[str]:
    """Why namespaces cannot be made here, or None when they may be."""
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) to create network namespaces"
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")


def remove_stale() -> None:
    """Delete namespaces this module made in processes that are gone (a run killed past its finally)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)-\d+-[ab]", name)
        if m and not process_alive(int(m.group(1))):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextmanager
def two_hosts(subnet: str = "10.77.0") -> Iterator[tuple[Host, Host]]:
    """Two namespaces, ``subnet``.1 and ``subnet``.2 on a /24 between them, loopback up in both.

    Raises NamespaceUnavailable when the first namespace cannot be created (the environment's
    limit); any later failure is a plain error.
    """
    reason = unavailable()
    if reason:
        raise NamespaceUnavailable(reason)
    remove_stale()
    tag = f"{os.getpid()}-{next(_counter)}"
    hosts = (Host(f"{PREFIX}{tag}-a", f"dl{tag.replace('-', 'x')}a", f"{subnet}.1"),
             Host(f"{PREFIX}{tag}-b", f"dl{tag.replace('-', 'x')}b", f"{subnet}.2"))
    assert all(len(h.ifname) <= 15 for h in hosts), hosts  # the kernel's limit on interface names
    made: list[Host] = []
    try:
        try:
            _ip("netns", "add", hosts[0].netns)
        except RuntimeError as e:
            raise NamespaceUnavailable(str(e)) from e
        made.append(hosts[0])
        _ip("netns", "add", hosts[1].netns)
        made.append(hosts[1])
        _ip("link", "add", hosts[0].ifname, "type", "veth", "peer", "name", hosts[1].ifname)
        for h in hosts:
            _ip("link", "set", h.ifname, "netns", h.netns)
            _ip("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip("-n", h.netns, "link", "set", h.ifname, "up")
            _ip("-n", h.netns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for h in made:
            h.kill_all()
        # The veth pair goes with its namespaces; this only matters when a step failed before it moved.
        subprocess.run(["ip", "link", "del", hosts[0].ifname], capture_output=True)
        for h in made:
            subprocess.run(["ip", "netns", "del", h.netns], capture_output=True)
