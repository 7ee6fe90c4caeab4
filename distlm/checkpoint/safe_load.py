"""Loading checkpoint bytes without running code: ``torch.load(weights_only=True)`` always.

A pickle can run anything while it loads, and checkpoints get copied between clusters, shared
and downloaded. distlm's own files hold only tensors and plain values. DeepSpeed's optimizer
files also hold a few of its small state classes (a fragment address, the loss scaler, the
ZeRO stage enum): those, and nothing else, are allowed; whatever else a file asks to construct
is refused with its name. Beside that, every file is checked against the manifest's SHA-256
before it is unpickled (:func:`distlm.checkpoint.manifest.read_verified`).
"""

from __future__ import annotations

import importlib
import io
import pickle
from functools import lru_cache

import torch

from distlm.checkpoint.errors import CheckpointError

# module, class: the DeepSpeed state types found in its checkpoints (ZeRO 0-3, fp32/bf16/fp16,
# pipeline). A name a DeepSpeed version lacks is skipped.
_DEEPSPEED_TYPES = (
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
)


@lru_cache(maxsize=1)
def allowed_types() -> tuple:
    found = []
    for module, name in _DEEPSPEED_TYPES:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def load_bytes(data: bytes, where: str, map_location="cpu"):
    """Unpickle ``data`` (the contents of ``where``) allowing tensors, plain values and DeepSpeed's state types."""
    try:
        with torch.serialization.safe_globals(list(allowed_types())):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else "")
        raise CheckpointError(f"{where}: refused to load: it asks to construct an object that is not a tensor, a plain "
                              f"value or a known DeepSpeed state type ({detail.strip()}). A checkpoint from an "
                              f"untrusted source can run code when unpickled; distlm never does that") from None


def load_file(path, map_location="cpu"):
    with open(path, "rb") as f:
        return load_bytes(f.read(), str(path), map_location)
