"""``manifest.json``: what a finished checkpoint folder must contain, byte for byte.

It is the commit marker (written last, inside the temporary folder, before the rename) and the
proof of integrity: every file's size and SHA-256, plus the step, the layout, a hash of the
config and the code version that wrote it. A folder is loaded only if its manifest verifies.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Optional

from distlm import __version__
from distlm.checkpoint.errors import CheckpointError
from distlm.checkpoint.files import FileRecord, sha256_file

MANIFEST = "manifest.json"
# 3: a manifest with sizes and hashes is the commit marker (2: distlm.json was the marker).
FORMAT = 3


class ManifestError(CheckpointError):
    """A checkpoint folder whose files do not match its manifest (or that has none)."""


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """distlm's version, plus the git commit when it runs from a checkout (for bisecting a run)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+g{commit}" if commit else __version__


def build(step: int, records: dict[str, FileRecord], layout: dict, config: dict) -> dict:
    return {"format": FORMAT, "step": step, "layout": layout, "config_sha256": config_hash(config),
            "code_version": code_version(),
            "files": {name: {"size": r.size, "sha256": r.sha256} for name, r in sorted(records.items())}}


def read(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{folder} has no {MANIFEST}: the save did not finish") from None
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path} is unreadable ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{path} is not a distlm checkpoint manifest")
    if manifest.get("format") != FORMAT:
        raise ManifestError(f"{folder} was saved by a distlm whose checkpoint format is "
                            f"{manifest.get('format')}, not {FORMAT}; resume it with the distlm that saved it "
                            f"(version {manifest.get('code_version', 'unknown')}), or set train.resume=never")
    return manifest


def verify(folder: Path, hashes: bool = True, manifest: Optional[dict] = None, share: tuple[int, int] = (0, 1)) -> dict:
    """Check every listed file's size (and SHA-256); return the manifest or raise naming the file.

    ``share=(i, n)``: check only every n-th file from the i-th (ranks split a large checkpoint).
    """
    manifest = manifest or read(folder)
    index, count = share
    for position, (name, want) in enumerate(sorted(manifest["files"].items())):
        if position % count != index:
            continue
        path = folder / name
        if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts \
                or Path(name) == Path("."):
            raise ManifestError(f"{folder / MANIFEST} lists {name!r}, which is not a file inside the checkpoint folder")
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise ManifestError(f"{path} is not a file (listed in {MANIFEST})")
            if size != want["size"]:
                raise ManifestError(f"{path} has {size} bytes, the manifest says {want['size']}: truncated or replaced")
            if hashes and sha256_file(path) != want["sha256"]:
                raise ManifestError(f"{path} does not match its SHA-256 in {MANIFEST}: the file is corrupt")
        except FileNotFoundError:
            raise ManifestError(f"{path} is missing (listed in {MANIFEST})") from None
        except (OSError, KeyError, TypeError) as e:
            raise ManifestError(f"{path} cannot be checked against {MANIFEST}: {type(e).__name__}: {e}") from None
    return manifest


def read_verified(folder: Path, name: str, manifest: dict) -> bytes:
    """A file's bytes, only if they hash to the manifest's value (read once: no check-then-swap)."""
    want = manifest["files"].get(name)
    if want is None:
        raise ManifestError(f"{folder / name} is not listed in {folder / MANIFEST}: refusing to load it")
    data = (folder / name).read_bytes()
    if len(data) != want["size"] or hashlib.sha256(data).hexdigest() != want["sha256"]:
        raise ManifestError(f"{folder / name} does not match its size and SHA-256 in {MANIFEST}: refusing to load it")
    return data

