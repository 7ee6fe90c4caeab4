"""Model FLOPs utilisation: achieved model FLOP/s over the device's peak.

Peaks are dense bf16 (fp32 for ``precision=fp32`` on cards that differ) datasheet figures; an
unknown device has no peak and its MFU is reported as absent rather than guessed.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

# Dense (no sparsity) peak FLOP/s per GPU from the vendors' datasheets.
_BF16_PEAKS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; the PCIe card is lower, set train.peak_flops for it
    "A100": 312e12,
    "A10G": 70e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
}


def device_peak_flops(device: torch.device, precision: str) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in _BF16_PEAKS.items():
        # Whole words only: "L4" must not match "L40S" (a card with three times its peak).
        if re.search(rf"\b{key}\b", name):
            # fp32 without TF32 runs far below the tensor-core peak; do not pretend otherwise.
            return peak if precision == "bf16" else None
    return None


def mfu(flops_per_token: float, tokens_per_s: float, n_devices: int, peak: Optional[float]) -> Optional[float]:
    if not peak:
        return None
    return flops_per_token * tokens_per_s / (peak * n_devices)
