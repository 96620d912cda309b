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


def make_local_federation(tmp_path: Path, cfg, *, delays: dict[str, float] | None = None,
                          dead: set[str] | None = None, keys_dir: Path | None = None):
    """A LocalGrid with one node per proxy and org of `cfg` (node ids: proxies 1.., clients 101..)."""
    from fedveil.platform.federation import write_config
    from fedveil.platform.localgrid import LocalGrid, LocalNode
    from fedveil.platform.nodeapp import app

    # Each organization reads its own copy of the config (its budget never comes from the server).
    config_path = write_config(cfg, tmp_path / "federation.toml")

    delays = delays or {}
    dead = dead or set()
    nodes: dict[int, LocalNode] = {}
    for i, name in enumerate(cfg.proxies.names):
        nc = {"role": "proxy", "name": name, "workdir": str(tmp_path / "proxies" / name),
              "min-aggregate": cfg.federation.min_aggregate}
        if keys_dir is not None:
            nc["keys"] = str(keys_dir / name)
        nodes[1 + i] = LocalNode(nc, delay=delays.get(name, 0.0), dead=name in dead)
    for i, org in enumerate(cfg.orgs):
        nc = {"role": "client", "name": org.name, "workdir": str(tmp_path / "orgs" / org.name),
              "data": org.data, "index": i, "num-orgs": len(cfg.orgs), "config": str(config_path)}
        if keys_dir is not None:
            nc["keys"] = str(keys_dir / org.name)
        nodes[101 + i] = LocalNode(nc, delay=delays.get(org.name, 0.0), dead=org.name in dead)
    return LocalGrid(app, nodes)


@pytest.fixture
def local_federation():
    return make_local_federation
