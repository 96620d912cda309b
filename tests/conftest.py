"""Shared fixtures: a federation on the in-process grid, built from the real ClientApp and engine."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

# The suite sends Ctrl-C (SIGINT) to the commands it starts. Run from a script in the background
# (`make test &`, a CI runner), pytest inherits SIGINT *ignored*, every child would inherit that too,
# and the Ctrl-C tests would test the shell, not fedveil. Children get the default disposition again.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


def run_federation(path: Path, cfg, run_id: str = "r1", *, resume: bool = False, keys_dir: Path | None = None,
                   store_url: str | None = None, **grid_options):
    """Run `cfg` to completion on the in-process grid; returns (federation, store, grid).

    The store is PATH/fedveil.db unless `store_url` names another (tests/test_postgres.py)."""
    from fedveil.aggregator.engine import Federation
    from fedveil.platform.provision import load_server_keyring_dir
    from fedveil.platform.store import MetricsStore

    store = MetricsStore(store_url or f"sqlite:///{path / 'fedveil.db'}")
    grid = make_local_federation(path, cfg, keys_dir=keys_dir, **grid_options)
    server_keys = None if keys_dir is None else load_server_keyring_dir(keys_dir / "server")
    fed = Federation(grid, cfg, store, run_id, workdir=path, handshake_timeout=30, resume=resume,
                     server_keys=server_keys)
    try:
        fed.run()
    finally:
        grid.shutdown()
    return fed, store, grid


@pytest.fixture
def local_federation():
    return make_local_federation
