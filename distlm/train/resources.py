"""Memory the process holds, for the log line and the metrics."""

from __future__ import annotations

import resource

import torch


def memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a CUDA device; the resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return _resident_bytes()


def memory_now_and_peak(device: torch.device) -> tuple[int, int]:
    """(in use now, peak): CUDA memory allocated by tensors, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    # ru_maxrss is in KiB on Linux.
    return _resident_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _resident_bytes() -> int:
    try:
        import psutil  # installed with DeepSpeed
        return psutil.Process().memory_info().rss
    except ImportError:
        return 0
