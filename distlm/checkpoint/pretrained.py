"""A trained model for the tools that use one: ``generate``, ``eval``, classification, fine-tuning.

``CKPT`` is what the user points at: a run folder (its newest valid checkpoint), a checkpoints
folder (its ``latest``), or one checkpoint step folder. :func:`resolve_checkpoint` finds the step
folder and checks every file's SHA-256 against its manifest first, so a damaged checkpoint is an
error and never a silent fallback to an older one.

The weights come from the layout-independent model files (:func:`consolidated_state_dict`), so a
checkpoint of any (tp, pp, dp) layout or ZeRO stage loads the same way into the one-process
:class:`~distlm.model.Transformer`, and the optimizer state is never read.

The tokenizer is the one the model was trained with: ``--tokenizer`` if given, else the
``tokenizer.json`` of the dataset named in the checkpoint's config (``data.path`` or the first
of ``data.sources``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from distlm.checkpoint.errors import CheckpointError

STATE_FILE = "distlm.json"


def resolve_checkpoint(path: str | os.PathLike, log: Callable[[str], None] = print) -> Path:
    """The checkpoint step folder ``path`` names, verified against its manifest (CheckpointError if none)."""
    from distlm.checkpoint.manifest import MANIFEST
    from distlm.checkpoint.select import find_resume

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (give a run folder, a checkpoints folder with a "
                              f"'latest' file, or one checkpoint step folder)")
    if (path / MANIFEST).is_file() or (path / STATE_FILE).is_file():
        resume, ckpt_dir = str(path), path.parent
    else:
        if (path / "checkpoints").is_dir() and not (path / "latest").exists():
            path = path / "checkpoints"
        resume, ckpt_dir = "auto", path
    folder = find_resume(resume, ckpt_dir, verify="hash", on_damaged="fail", log=log)
    if folder is None:
        raise CheckpointError(f"{path} holds no finished checkpoint (no step folder with a {MANIFEST}); "
                              f"a run writes one at train.save_every and at its end")
    return folder


def saved_config(folder: Path) -> dict:
    """The full run config saved with the checkpoint (``distlm.json``'s ``config``)."""
    try:
        return json.loads((folder / STATE_FILE).read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / STATE_FILE}: cannot read the run config ({type(e).__name__}: {e})") from e


def model_config_of(config: dict, where: Path):
    from distlm.config import ModelConfig

    try:
        return ModelConfig(**config["model"])
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: the saved model config does not fit this distlm's ModelConfig: {e}") from e


def tokenizer_for(config: dict, override: Optional[str] = None, where: Optional[Path] = None):
    """The tokenizer the checkpoint's model reads: ``override``, else its dataset's tokenizer.json."""
    from distlm.data.tokenizers import load_tokenizer

    if override:
        try:
            return load_tokenizer(override)
        except ValueError as e:
            raise CheckpointError(f"--tokenizer {override}: {e}") from None
    data = config.get("data") or {}
    path = data.get("path") or next((s.get("path") for s in data.get("sources") or [] if s.get("path")), None)
    if not path:
        raise CheckpointError(f"{where}: the saved config names no dataset to take the tokenizer from; "
                              f"pass --tokenizer FILE (the tokenizer.json the model was trained with)")
    try:
        return load_tokenizer(path)
    except ValueError as e:
        raise CheckpointError(f"{where}: the model's tokenizer comes from its dataset {path}, which cannot be "
                              f"read here ({e}); pass --tokenizer FILE (that dataset's tokenizer.json)") from None


@dataclass
class Pretrained:
    """A checkpoint's one-process model (eval mode, on ``device``), its config and where it came from."""

    folder: Path
    step: int
    config: dict
    model: torch.nn.Module

    @property
    def model_config(self):
        return self.model.cfg

    def tokenizer(self, override: Optional[str] = None):
        return tokenizer_for(self.config, override, self.folder)


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """The one-process float32 state dict of a resolved step folder (CheckpointError if incomplete)."""
    from distlm.checkpoint.consolidate import consolidated_state_dict

    try:
        return consolidated_state_dict(folder)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from e


def load_pretrained(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, log: Callable[[str], None] = print) -> Pretrained:
    """Resolve ``path``, build the one-process Transformer from its saved config, load the weights."""
    from distlm.model import Transformer

    folder = resolve_checkpoint(path, log)
    config = saved_config(folder)
    cfg = model_config_of(config, folder / STATE_FILE)
    with torch.device("meta"):
        model = Transformer(cfg, seed=0)
    state = load_state(folder)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a tensor of another shape than the saved config gives it
        raise CheckpointError(f"{folder}: the model files do not fit the saved model config: {e}") from None
    if missing or unexpected:
        raise CheckpointError(f"{folder}: the model files do not fit the saved model config "
                              f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
    model = _materialize_buffers(model, cfg).to(device=device, dtype=dtype).eval()
    step = int(json.loads((folder / STATE_FILE).read_text()).get("step", 0))
    return Pretrained(folder=folder, step=step, config=config, model=model)


def _materialize_buffers(model: torch.nn.Module, cfg) -> torch.nn.Module:
    # Non-persistent buffers (the sinusoidal table) are a function of the config, not in the
    # checkpoint: build them for real after a meta-device construction.
    from distlm.model.transformer import sinusoidal_table

    if hasattr(model.positions, "pos_table"):
        model.positions.pos_table = sinusoidal_table(cfg.max_seq_len, cfg.d_model)
    return model


def pick_device(requested: str = "auto") -> torch.device:
    """``--device``: ``auto`` (the GPU when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    A device that cannot be used here is a ConfigError naming the flag (exit 2).
    """
    from distlm.config import ConfigError

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:  # torch's own message for a string that names no device
        raise ConfigError(f"--device {requested} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {requested}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: this machine has no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (a GPU of compute capability 8.0+).

    Not ``torch.cuda.is_bf16_supported()``: it asks about the current GPU, not ``device``, and
    also says yes where bf16 is only emulated (slowly). On a CPU bf16 is slower and less exact.
    """
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
