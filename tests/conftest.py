"""Shared fixtures: a federation on the in-process grid, built from the real ClientApp and engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread():
    """Two cores are shared by threads of the in-process grid; one torch thread each keeps runs stable."""
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def make_local_federation(tmp_path: Path, cfg, *, delays: dict | None = None, dead: set[str] | None = None,
                          keys_dir: Path | None = None):
    """The in-process grid for `cfg` (see fedveil.platform.localgrid.grid_for_config)."""
    from fedveil.platform.localgrid import grid_for_config

    return grid_for_config(cfg, tmp_path, delays=delays, dead=dead, keys_dir=keys_dir)


@pytest.fixture
def local_federation():
    return make_local_federation
