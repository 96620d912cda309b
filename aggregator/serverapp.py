"""The ServerApp: Flower's entry point for the coordinator. It wires config, store and keys to the engine."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


def _run_config(context: Context) -> dict:
    return {k: v for k, v in context.run_config.items()}


def resolve_run_id(store, federation_name: str, requested: str, flower_run_id: int, resume: bool) -> str:
    """The fedveil run id: the one asked for; with `resume` and none asked for, the newest run of this
    federation that did not complete (so a resumed run keeps its id, history and checkpoints); else a
    new id from Flower's run id."""
    if requested:
        return requested
    if resume:
        found = store.latest_unfinished_run(federation_name)
        if found is not None:
            return found
    return f"run-{flower_run_id}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedveil.aggregator.engine import Federation
    from fedveil.platform import config as config_mod
    from fedveil.platform.store import MetricsStore, store_url

    rc = _run_config(context)
    cfg = config_mod.load(str(rc.get("config", "")) or None)
    overrides = json.loads(str(rc.get("overrides", "") or "{}"))
    cfg = config_mod.with_overrides(cfg, overrides)
    workdir = Path(str(rc.get("workdir", "")) or ".").resolve()
    url = str(rc.get("store", "")) or cfg.server.store or store_url(workdir)
    store = MetricsStore(url)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fedveil %(levelname)s %(message)s")
    server_keys = None
    keys_dir = str(rc.get("keys", "")) or cfg.secure.keys_dir
    if keys_dir:
        from fedveil.platform.provision import load_server_keyring_dir

        server_keys = load_server_keyring_dir(keys_dir)
    resume = bool(rc.get("resume", False))
    run_id = resolve_run_id(store, cfg.federation.name, str(rc.get("run-name", "")), context.run_id, resume)
    try:
        Federation(grid, cfg, store, run_id, workdir=workdir, server_keys=server_keys, resume=resume).run()
    finally:
        store.close()
