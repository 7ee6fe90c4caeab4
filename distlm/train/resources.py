"""Memory the process holds, for the log line."""

from __future__ import annotations

import torch


def memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on a CUDA device; the resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        import psutil  # installed with DeepSpeed
        return psutil.Process().memory_info().rss
    except ImportError:
        return 0
