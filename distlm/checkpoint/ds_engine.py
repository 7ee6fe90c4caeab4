"""DeepSpeed's checkpoint file I/O, routed through distlm.

DeepSpeed writes and reads its files through ``engine.checkpoint_engine``. Replacing it with
:class:`RoutedCheckpointEngine` means every file DeepSpeed saves goes to the current save's
sink (which serializes it at once, so the bytes are the state of this step even when they
are written in the background), and every file it loads is first checked against the
checkpoint's manifest and then unpickled with ``weights_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

from distlm.checkpoint.errors import CheckpointError
from distlm.checkpoint.manifest import read_verified
from distlm.checkpoint.safe_load import load_bytes


class RoutedCheckpointEngine(CheckpointEngine):
    def __init__(self) -> None:
        super().__init__()
        self.name = "distlm"
        self.sink: Optional[Callable[[Path, object], None]] = None  # set for the duration of a save
        self.source: Optional[tuple[Path, dict]] = None             # (folder, manifest) during a load

    def create(self, info) -> None:
        pass

    def makedirs(self, path, exist_ok=False) -> None:
        try:
            os.makedirs(path, exist_ok=exist_ok)
        except OSError:
            pass  # the file writes that follow fail too, and the writer records it for all ranks to see

    def save(self, state_dict, path: str) -> None:
        if self.sink is None:
            raise CheckpointError("DeepSpeed saved a checkpoint outside distlm's save (use distlm.checkpoint)")
        self.sink(Path(path), state_dict)

    def load(self, path: str, map_location=None):
        if self.source is None:
            raise CheckpointError(f"DeepSpeed tried to load {path} outside distlm's verified load")
        folder, manifest = self.source
        try:
            name = Path(path).resolve().relative_to(folder.resolve()).as_posix()
        except ValueError:
            raise CheckpointError(f"DeepSpeed asked for {path}, outside the checkpoint {folder}") from None
        return load_bytes(read_verified(folder, name, manifest), str(path), map_location)

    def commit(self, info) -> bool:
        return True  # distlm commits the whole folder itself (distlm.checkpoint.commit)
