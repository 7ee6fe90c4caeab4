"""The Prometheus exporter, over real sockets on 127.0.0.1 only, and the listener facts the README
states (reliability matrix rows 21 and 22)."""

import datetime
import ipaddress
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import free_ports
import torch
from prometheus_client.parser import text_string_to_metric_families

from distlm.config import MetricsConfig
from distlm.metrics.exporter import Exporter, start_exporter
from distlm.metrics.forward_clock import ForwardClock

HTTP_TIMEOUT_S = 5
LISTEN = "0A"       # TCP state in /proc/net/tcp*
ESTABLISHED = "01"


# --------------------------------------------------------------------------- helpers

def _row(step, **extra):
    row = {"step": step, "loss": 3.25, "lr": 3e-4, "grad_norm": 0.9, "tokens_per_s": 1.0e6,
           "elapsed_s": 12.0, "ms_per_step": 250.0, "mfu": 0.41, "data_wait": 0.01,
           "tokens": 4096 * step, "mem_bytes": 2**30, "data_errors": {"decode": 2}, "checkpoint_errors": 0}
    row.update(extra)
    return row






def _start(port: int, local_rank: int = 0, warnings: list | None = None, rank: int | None = None):
    cfg = MetricsConfig(enabled=True, port=port)
    sink = warnings if warnings is not None else []
    return start_exporter(cfg, rank=local_rank if rank is None else rank, local_rank=local_rank,
                          run="unit", warn=sink.append)


def _scrape(port: int) -> dict:
    """GET /metrics; {(sample name, frozenset of labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=HTTP_TIMEOUT_S) as resp:
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels) -> float:
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def _sample_value(exporter, name: str, **labels) -> float:
    value = exporter.registry.get_sample_value(name, _constant_labels(exporter) | labels)
    assert value is not None, f"{name}{labels} missing"
    return value


def _constant_labels(exporter) -> dict:
    return dict(exporter._constant)


def _decode_proc_address(hex_address: str) -> ipaddress._BaseAddress:
    """/proc/net/tcp* print addresses as 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_address)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def _sockets_on_port(port: int, state: str) -> list[tuple[str, ipaddress._BaseAddress]]:
    """(table, local address) of every socket in ``state`` whose local port is ``port``."""
    found = []
    for table in ("tcp", "tcp6"):
        path = Path("/proc/net") / table
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if int(port_hex, 16) == port and fields[3] == state:
                found.append((table, _decode_proc_address(address)))
    return found


def _kernel_has_ipv6() -> bool:
    inet6 = Path("/proc/net/if_inet6")
    return inet6.exists() and bool(inet6.read_text().strip())


@pytest.fixture
def closing():
    """Collects exporters and closes them even when the test fails, so ports never leak."""
    opened = []
    yield opened.append
    for exporter in opened:
        exporter.close()


# --------------------------------------------------------------------------- exporter

def test_disabled_returns_none():
    assert start_exporter(MetricsConfig(enabled=False), 0, 0, "unit", warn=pytest.fail) is None


def test_default_bind_is_loopback_only_and_serves_the_logged_row(closing):
    port = free_ports(2)
    exporter = _start(port, rank=3)
    closing(exporter)
    assert exporter.address == ("127.0.0.1", port)
    assert _sockets_on_port(port, LISTEN) == [("tcp", ipaddress.ip_address("127.0.0.1"))]

    before = time.time()
    exporter.step(_row(7))
    exporter.memory(2**30, 2**31)
    exporter.evaluated(2.5)
    exporter.describe_run(world_size=8, checkpoint_every_steps=100)
    exporter.checkpoint_saved(1.5)
    samples = _scrape(port)

    node = socket.gethostname()
    constant = {"run": "unit", "rank": "3", "node": node}
    assert _value(samples, "distlm_loss", **constant) == 3.25
    assert _value(samples, "distlm_learning_rate", **constant) == pytest.approx(3e-4)
    assert _value(samples, "distlm_grad_norm", **constant) == 0.9
    assert _value(samples, "distlm_mfu_ratio", **constant) == 0.41
    assert _value(samples, "distlm_step", **constant) == 7
    assert _value(samples, "distlm_tokens_trained", **constant) == 4096 * 7
    assert _value(samples, "distlm_data_errors_total", kind="decode", **constant) == 2
    assert _value(samples, "distlm_memory_allocated_bytes", **constant) == 2**30
    assert _value(samples, "distlm_memory_max_allocated_bytes", **constant) == 2**31
    assert _value(samples, "distlm_val_loss", **constant) == 2.5
    assert _value(samples, "distlm_world_size", **constant) == 8
    assert _value(samples, "distlm_checkpoint_every_steps", **constant) == 100
    assert _value(samples, "distlm_checkpoint_save_duration_seconds", **constant) == 1.5
    assert _value(samples, "distlm_checkpoint_save_failures_total", **constant) == 0
    assert before <= _value(samples, "distlm_checkpoint_last_success_timestamp_seconds", **constant) <= time.time()
    assert before <= _value(samples, "distlm_last_step_timestamp_seconds", **constant) <= time.time()
    assert _value(samples, "distlm_start_timestamp_seconds", **constant) <= before
    assert _value(samples, "distlm_build_info", version="0.1.0", **constant) == 1

    ours = [labels for (name, labels) in samples if name.startswith("distlm_")]
    assert ours and all(set(constant.items()) <= labels for labels in ours)
    assert not any("step" in dict(labels) for labels in ours)


def test_taken_port_warns_once_and_recording_goes_on(closing):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        warnings = []
        exporter = _start(port, local_rank=0, warnings=warnings)
        closing(exporter)

    assert len(warnings) == 1
    message = warnings[0]
    assert str(port) in message and "taken" in message
    assert "rank 0" in message and f"127.0.0.1:{port}" in message and "metrics.port=" in message
    assert exporter.address is None
    exporter.step(_row(1))
    exporter.skipped_step("spike")
    exporter.heartbeat(2)
    exporter.close()
    assert _sample_value(exporter, "distlm_skipped_steps_total", reason="spike") == 1
    assert _sample_value(exporter, "distlm_step") == 2


def test_each_local_rank_serves_its_own_port_and_close_frees_it(closing):
    port = free_ports(2)
    rank0, rank1 = _start(port, local_rank=0), _start(port, local_rank=1)
    closing(rank0)
    closing(rank1)
    assert rank0.address == ("127.0.0.1", port)
    assert rank1.address == ("127.0.0.1", port + 1)

    rank0.heartbeat(5)
    rank1.heartbeat(6)
    assert _value(_scrape(port), "distlm_step", rank="0") == 5
    assert _value(_scrape(port + 1), "distlm_step", rank="1") == 6

    rank1.close()
    assert rank1.address is None
    assert _sockets_on_port(port + 1, LISTEN) == []
    # SO_REUSEADDR only lets the bind past the scrape's TIME_WAIT; on Linux it still refuses a
    # port another socket is listening on, so this bind proves the listener is gone.
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port + 1))
        again.listen(1)
    rank1.close()  # a second close is harmless
    assert _sockets_on_port(port, LISTEN), "closing rank 1 left rank 0 serving"


class _Clock:
    """time.perf_counter and time.time under the test's control: exact durations, no sleeps."""

    def __init__(self, monkeypatch):
        self.now = 1000.0
        monkeypatch.setattr(time, "perf_counter", lambda: self.now)
        monkeypatch.setattr(time, "time", lambda: 1.7e9 + self.now)

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_phases_time_the_data_wait_and_each_step(monkeypatch):
    clock = _Clock(monkeypatch)
    exporter = Exporter(rank=0, run="unit")
    exporter.describe_rank(tokens_per_step=4096, stage=0, dp_rank=1, tp_rank=0)
    exporter.phase(0, "agree")
    clock.advance(1.0)
    exporter.phase(0, "data")
    # Visible while the wait lasts: when it began.
    assert _sample_value(exporter, "distlm_dataloader_waiting_since_timestamp_seconds") == 1.7e9 + clock.now
    clock.advance(0.25)
    exporter.phase(0, "step")
    assert _sample_value(exporter, "distlm_dataloader_waiting_since_timestamp_seconds") == 0
    assert _sample_value(exporter, "distlm_dataloader_wait_seconds_total") == pytest.approx(0.25)
    clock.advance(0.5)
    exporter.phase(1, "save")  # the step ends; the save is not part of it
    assert _sample_value(exporter, "distlm_step_duration_seconds_count") == 1
    assert _sample_value(exporter, "distlm_step_duration_seconds_sum") == pytest.approx(0.75)  # data + step
    assert _sample_value(exporter, "distlm_step_duration_seconds_bucket", le="0.75") == 1
    assert _sample_value(exporter, "distlm_step_duration_seconds_bucket", le="0.5") == 0
    assert _sample_value(exporter, "distlm_tokens_total") == 4096  # counted every step
    clock.advance(30.0)
    exporter.phase(1, "agree")
    assert _sample_value(exporter, "distlm_step_duration_seconds_sum") == pytest.approx(0.75)
    assert _sample_value(exporter, "distlm_step") == 1
    assert _sample_value(exporter, "distlm_last_step_timestamp_seconds") == 1.7e9 + clock.now
    assert _sample_value(exporter, "distlm_layout_info", stage="0", dp_rank="1", tp_rank="0") == 1


def test_forward_clock_counts_only_forward_passes(monkeypatch):
    fake = _Clock(monkeypatch)

    class Slow(torch.nn.Module):
        def forward(self, x):
            fake.advance(0.02)
            return x * 2

    module = Slow()
    clock = ForwardClock(module, torch.device("cpu"))
    for _ in range(3):
        module(torch.ones(2)).sum()
    fake.advance(5)  # outside forward: not counted
    assert clock.take_seconds() == pytest.approx(0.06)
    assert clock.take_seconds() == 0  # each call returns what is new
    clock.close()
    module(torch.ones(2))
    assert clock.take_seconds() == 0  # hooks removed


def test_skipped_steps_count_per_reason():
    exporter = Exporter(rank=0, run="unit")  # records, serves nothing
    for reason in ("nonfinite", "spike", "nonfinite"):
        exporter.skipped_step(reason)
    assert _sample_value(exporter, "distlm_skipped_steps_total", reason="nonfinite") == 2
    assert _sample_value(exporter, "distlm_skipped_steps_total", reason="spike") == 1


def test_counters_follow_running_totals_and_never_decrease():
    exporter = Exporter(rank=0, run="unit")  # records, serves nothing
    totals = []
    for decode in (1, 3, 3, 5):
        exporter.step(_row(1, data_errors={"decode": decode}))
        totals.append(_sample_value(exporter, "distlm_data_errors_total", kind="decode"))
    assert totals == [1, 3, 3, 5]

    # A smaller total (a rollback) must neither raise nor lower the counter; what comes after it
    # counts again.
    exporter.step(_row(1, data_errors={"decode": 2}))
    assert _sample_value(exporter, "distlm_data_errors_total", kind="decode") == 5
    exporter.step(_row(2, data_errors={"decode": 4, "checksum": 1}))
    assert _sample_value(exporter, "distlm_data_errors_total", kind="decode") == 7
    assert _sample_value(exporter, "distlm_data_errors_total", kind="checksum") == 1
    assert _sample_value(exporter, "distlm_data_errors_total", kind="truncated") == 0  # every kind from the start
    exporter.step(_row(3, data_errors={"decode": 4, "checksum": 1, "rows_skipped": 32}))
    assert _sample_value(exporter, "distlm_data_rows_skipped_total") == 32  # rows, not events: its own series
    assert exporter.registry.get_sample_value(
        "distlm_data_errors_total", _constant_labels(exporter) | {"kind": "rows_skipped"}) is None

    exporter.restarts(2)
    exporter.restarts(2)
    assert _sample_value(exporter, "distlm_restarts_total") == 2
    exporter.checkpoint_saved(1.5)
    assert _sample_value(exporter, "distlm_checkpoint_save_duration_seconds") == 1.5
    assert _sample_value(exporter, "distlm_checkpoint_last_success_timestamp_seconds") > 0


def test_a_resumed_process_counts_only_its_own_work():
    exporter = Exporter(rank=0, run="unit")
    exporter.resumed(tokens=10_000_000, data_errors={"decode": 4}, checkpoint_errors=1)
    assert _sample_value(exporter, "distlm_tokens_trained") == 10_000_000
    exporter.step(_row(101, tokens=10_004_096, data_errors={"decode": 5}, checkpoint_errors=1))
    # rate() over the restart sees one new error, not all of the run's in one scrape interval.
    assert _sample_value(exporter, "distlm_tokens_trained") == 10_004_096
    assert _sample_value(exporter, "distlm_data_errors_total", kind="decode") == 1
    assert _sample_value(exporter, "distlm_checkpoint_save_failures_total") == 0


def test_mfu_left_unset_when_not_measured():
    exporter = Exporter(rank=0, run="unit")  # records, serves nothing
    exporter.step(_row(1, mfu=None))
    assert _sample_value(exporter, "distlm_mfu_ratio") == 0  # never set, not an error
    assert _sample_value(exporter, "distlm_loss") == 3.25


# --------------------------------------------------------------------------- rendezvous store

def test_torch_tcpstore_listens_on_every_interface_even_when_given_loopback():
    """Measured fact for the README (reliability matrix row 22): the c10d TCPStore server binds the
    wildcard address whatever host it is given. On a kernel with IPv6 it is one dual-stack socket
    on [::] (IPv4 clients land on it as ::ffff:a.b.c.d); without IPv6 it is 0.0.0.0. If this test
    fails, torch changed its listener and the README paragraph must change with it."""
    dist = pytest.importorskip("torch.distributed")
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=5))
    port = store.port
    assert port > 0

    listening = _sockets_on_port(port, LISTEN)
    if _kernel_has_ipv6():
        assert listening == [("tcp6", ipaddress.ip_address("::"))]
        # The master's own client reached it over IPv4 loopback: the socket is dual-stack, so it
        # accepts IPv4 on every interface too, not only IPv6.
        accepted = _sockets_on_port(port, ESTABLISHED)
        assert ("tcp6", ipaddress.ip_address("::ffff:127.0.0.1")) in accepted
    else:
        assert listening == [("tcp", ipaddress.ip_address("0.0.0.0"))]
    del store


def test_forward_clock_on_cuda_reads_only_finished_events(monkeypatch):
    """No GPU here: CUDA events are stood in for by ones whose completion the test decides, to
    check the clock never waits for the GPU and loses no finished pass."""

    class FakeEvent:
        made = []

        def __init__(self, enable_timing):
            assert enable_timing
            self.done, self.at = False, None
            FakeEvent.made.append(self)

        def record(self):
            self.at = len(FakeEvent.made) * 0.010  # each event 10 ms after the one before

        def query(self):
            return self.done

        def elapsed_time(self, end):
            assert self.done and end.done, "elapsed_time read before the GPU finished"
            return (end.at - self.at) * 1000  # milliseconds, as CUDA reports

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    module = torch.nn.Identity()
    clock = ForwardClock(module, torch.device("cuda", 0))
    for _ in range(3):
        module(torch.ones(1))
    assert clock.take_seconds() == 0  # queued, nothing finished: no wait, nothing counted
    for event in FakeEvent.made[:4]:  # the GPU finished the first two passes
        event.done = True
    assert clock.take_seconds() == pytest.approx(0.020)
    for event in FakeEvent.made:
        event.done = True
    module(torch.ones(1))  # a pass collects the finished ones as it queues its own
    assert clock.take_seconds() == pytest.approx(0.010)  # the third; the fourth is still running
    clock.close()
