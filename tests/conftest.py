"""Fixtures shared across test modules (most live in their own module)."""

from __future__ import annotations

import pytest

from helpers import source_shards
from launchers import reference_curve


@pytest.fixture(scope="session")
def launch_shards(tmp_path_factory):
    """Shards for the launcher tests' shared job (built once per session)."""
    return source_shards(tmp_path_factory.mktemp("launch-data"))


@pytest.fixture(scope="session")
def launch_reference(tmp_path_factory, launch_shards):
    """The curve every launcher must reproduce: the shared job under plain torchrun, 2 ranks."""
    return reference_curve(tmp_path_factory.mktemp("launch-reference"), launch_shards)
