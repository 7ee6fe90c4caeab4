"""What every part of ``distlm prepare`` shares: its error, its log and counts in words.

A module of its own so that the worker side (:mod:`.prepare_jobs`) and the main side
(:mod:`.prepare_run`, :mod:`.prepare`) can both raise :class:`PrepareError` without importing
each other.
"""

from __future__ import annotations

from typing import Any, Callable

from .inputs import InputError

Log = Callable[[str], Any]


class PrepareError(InputError):
    """The inputs or options cannot produce a dataset; the message says what to change."""


def counted(count: int, noun: str, plural: str = "") -> str:
    """``1 shard``, ``3 shards``: a count with its noun, for log lines."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"
