"""Meet the other ranks: the store, the default process group, and errors that say where it failed.

torch's ``env://`` rendezvous waits for its peers as long as the collectives may take (30 min
by default) and then reports a bare timeout. Here the meeting has its own, shorter deadline
(``fault.rendezvous_timeout_s``), and a failure names the address and port that were tried, the
interface gloo was told to use, and this host's interfaces, and says what to set.

The one choice made for the user: when ``GLOO_SOCKET_IFNAME`` is unset and the ranks meet on
a non-loopback address, gloo would bind the address the host name resolves to, which on
Debian and many images is 127.0.1.1: the peers then never connect. distlm sets it to the
interface that holds the local address routing to the master (found with a UDP ``connect``,
which sends nothing), and says so.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta
from typing import Optional

import torch

from distlm.parallel.launch_env import LaunchError, Placement, is_loopback


class RendezvousError(LaunchError):
    """The ranks could not meet; the message says what was tried and what to set."""


def local_interfaces() -> dict[str, list[str]]:
    """This host's interfaces and their IPv4/IPv6 addresses (name -> addresses)."""
    import psutil  # a DeepSpeed dependency, always present with distlm

    return {name: [a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)]
            for name, addrs in psutil.net_if_addrs().items()}


def route_source(master_addr: str, master_port: int) -> Optional[str]:
    """The local address this host would use to reach ``master_addr``, or None if there is no route.

    A UDP socket's ``connect`` only consults the routing table; no packet leaves the host.
    """
    try:
        family, _, _, _, address = socket.getaddrinfo(master_addr, master_port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(address)
            return s.getsockname()[0]
    except OSError:
        return None


def interface_of(address: str, interfaces: dict[str, list[str]]) -> Optional[str]:
    return next((name for name, addrs in interfaces.items() if address in addrs), None)


def choose_gloo_interface(placement: Placement, environ=os.environ) -> Optional[str]:
    """Set ``GLOO_SOCKET_IFNAME`` to the interface that reaches the master, when the user did not.

    Returns the interface chosen (None: nothing to choose, or nothing found; gloo's default stays).
    """
    if placement.world_size == 1 or environ.get("GLOO_SOCKET_IFNAME") or placement.launcher == "single":
        return None
    addr = _resolve(placement.master_addr)
    if not addr:
        return None
    if is_loopback(addr):
        spans_hosts = placement.local_world_size is not None and placement.local_world_size < placement.world_size
        if spans_hosts:  # the master's own host name maps to 127.0.1.1 (Debian's /etc/hosts)
            raise RendezvousError(
                f"MASTER_ADDR {placement.master_addr} resolves to {addr}, a loopback address, on this host "
                f"({socket.gethostname()}, rank {placement.rank}), but the job spans several hosts "
                f"({placement.world_size} ranks, {placement.local_world_size} here): gloo would listen there and "
                f"the other hosts could not connect. Set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME on GPUs) to "
                f"the interface of the network the nodes share ({_shown(local_interfaces())}), or map the host "
                f"name to that address in /etc/hosts")
        return None  # one host: loopback is right
    source = route_source(addr, placement.master_port)
    name = interface_of(source, local_interfaces()) if source else None
    if name:
        environ["GLOO_SOCKET_IFNAME"] = name
        if placement.local_rank == 0:
            print(f"distlm: rank {placement.rank}: GLOO_SOCKET_IFNAME={name} ({source}), the interface that "
                  f"reaches MASTER_ADDR {placement.master_addr}; set GLOO_SOCKET_IFNAME to choose another",
                  file=sys.stderr, flush=True)
    return name


def join(placement: Placement, backend: str, rendezvous_timeout: timedelta, collective_timeout: timedelta,
         device: Optional[torch.device] = None) -> None:
    """Create the default process group for ``placement``; a failure raises :class:`RendezvousError`.

    The group is created with the rendezvous deadline (gloo connects every pair while it is
    created) and then given ``collective_timeout`` for its collectives.
    """
    from torch.distributed import distributed_c10d

    try:
        store = _store(placement, rendezvous_timeout)
        kwargs = {}
        if device is not None and device.type == "cuda" and placement.world_size > 1:
            kwargs["device_id"] = device  # NCCL then connects eagerly and splits later groups cheaply
        torch.distributed.init_process_group(backend, store=store, rank=placement.rank,
                                             world_size=placement.world_size, timeout=rendezvous_timeout, **kwargs)
    except RendezvousError:
        raise
    except Exception as e:  # noqa: BLE001
        if not _network_failure(e):
            raise  # a CUDA, NCCL-version or memory error: its own message is the right one
        raise RendezvousError(explain(placement, backend, e)) from e
    distributed_c10d._set_pg_timeout(collective_timeout)
    store.set_timeout(collective_timeout)


def _network_failure(error: BaseException) -> bool:
    """Did the ranks fail to reach each other (as opposed to a device or library error)?"""
    if isinstance(error, (torch.distributed.DistError, TimeoutError, ConnectionError)):
        return True
    text = str(error).lower()
    return any(word in text for word in ("connect", "timed out", "timeout", "socket", "address", "refused"))


def _store(placement: Placement, timeout: timedelta) -> torch.distributed.Store:
    """The job's key-value store: rank 0 hosts it, unless torchrun's agent already does for everyone."""
    # torchrun shares its own store with the workers unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
    # (launch/*.sh set it, pytorch#135712); then every worker is a client, as in torch's env://.
    agent_hosts_it = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    is_master = placement.rank == 0 and not agent_hosts_it
    try:
        return torch.distributed.TCPStore(placement.master_addr, placement.master_port, placement.world_size,
                                          is_master=is_master, timeout=timeout, multi_tenant=True)
    except Exception as e:  # noqa: BLE001
        if is_master and "address already in use" in str(e).lower():
            raise RendezvousError(
                f"rank 0 cannot host the rendezvous store on port {placement.master_port}: it is in use on "
                f"{socket.gethostname()} (another job?). Set MASTER_PORT to a free port") from e
        raise RendezvousError(explain(placement, "store", e)) from e


def explain(placement: Placement, what: str, error: BaseException) -> str:
    """A rendezvous failure in words: who tried what, over which interface, and what to set."""
    interfaces = local_interfaces()
    source = route_source(_resolve(placement.master_addr) or placement.master_addr, placement.master_port)
    shown = _shown(interfaces)
    gloo = os.environ.get("GLOO_SOCKET_IFNAME", "unset")
    nccl = os.environ.get("NCCL_SOCKET_IFNAME", "unset")
    return (f"rendezvous failed ({what}): {placement.describe()}; host {socket.gethostname()} "
            f"reaches {placement.master_addr} from {source or 'no local address (no route)'} "
            f"(interface {interface_of(source, interfaces) if source else 'none'}); GLOO_SOCKET_IFNAME={gloo}, "
            f"NCCL_SOCKET_IFNAME={nccl}; this host's interfaces: {shown}. "
            f"Check that MASTER_ADDR is rank 0's address on a network every node shares and MASTER_PORT is open "
            f"there, and set GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME to the interface on that network. "
            f"Cause: {_last_lines(error)}")


def _last_lines(error: BaseException, count: int = 3) -> str:
    """The end of an error's message, where gloo and NCCL put the detail (NCCL's "Last error: ...")."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:]) if lines else type(error).__name__


def _shown(interfaces: dict[str, list[str]]) -> str:
    return ", ".join(f"{name} {' '.join(addrs)}" for name, addrs in sorted(interfaces.items()) if addrs)


def _resolve(host: str) -> Optional[str]:
    try:
        return socket.getaddrinfo(host, None)[0][4][0]
    except OSError:
        return None
