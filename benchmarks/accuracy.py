"""Accuracy of the federated DP demo against centralized, non-private training of the same model.

    python benchmarks/accuracy.py [--dataset breast_cancer digits] [--rounds N]

Both arms see exactly the same records: the centralized model trains on the union of the
organizations' training splits and is scored on the union of their validation splits, which is
what the federated accuracy (weighted over the organizations' validation splits) measures too.
The federated arm runs the real ClientApp, proxies and engine on the in-process grid.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedveil.aggregator.engine import Federation
from fedveil.clients.node import ClientIdentity, build_model, load_datasets
from fedveil.clients.training import DPSettings, TrainSettings, evaluate, train
from fedveil.platform import config as config_mod
from fedveil.platform.data import Dataset
from fedveil.platform.federation import demo_orgs
from fedveil.platform.localgrid import grid_for_config
from fedveil.platform.store import MetricsStore


def demo_config(dataset: str, rounds: int | None, sigma: float | None = None) -> config_mod.FedveilConfig:
    cfg = config_mod.load(Path(__file__).resolve().parents[1] / "examples" / "federation.toml")
    # The secure mode does not change the model (tests/test_secure_federation.py), so measure in `none`.
    overrides = {"data.source": dataset, "federation.secure": "none",
                 "orgs": [o.model_dump(exclude_none=True) for o in demo_orgs(3)]}
    if rounds:
        overrides["federation.rounds"] = rounds
    if sigma:
        overrides["privacy.noise_multiplier"] = sigma
    return config_mod.with_overrides(cfg, overrides)


def pooled(cfg) -> tuple[Dataset, Dataset]:
    trains, vals = [], []
    for i, org in enumerate(cfg.orgs):
        ident = ClientIdentity.from_node_config({"name": org.name, "index": i, "num-orgs": len(cfg.orgs)})
        tr, va = load_datasets(ident, cfg)
        trains.append(tr)
        vals.append(va)
    join = lambda parts: Dataset(np.concatenate([p.X for p in parts]), np.concatenate([p.y for p in parts]),  # noqa: E731
                                 parts[0].num_classes, parts[0].name)
    return join(trains), join(vals)


def centralized(cfg, epochs: int, seed: int) -> float:
    train_ds, val_ds = pooled(cfg)
    torch.manual_seed(seed)
    model = build_model(cfg, train_ds.feature_shape, train_ds.num_classes)
    settings = TrainSettings(epochs=epochs, batch_size=cfg.training.batch_size, lr=cfg.training.lr, seed=seed)
    train(model, train_ds, settings, DPSettings(enabled=False), 0.0)
    return evaluate(model, val_ds)[1]


def federated(cfg) -> tuple[float, dict[str, float], float]:
    with tempfile.TemporaryDirectory() as tmp:
        store = MetricsStore(f"sqlite:///{tmp}/fedveil.db")
        grid = grid_for_config(cfg, Path(tmp))
        start = time.perf_counter()
        try:
            result = Federation(grid, cfg, store, "bench", workdir=Path(tmp), handshake_timeout=60).run()
        finally:
            grid.shutdown()
        eps = {c["org"]: c["epsilon"] for c in store.latest_client_status("bench")}
        store.close()
        return result["accuracy"], eps, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", nargs="+", default=["breast_cancer", "digits"])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sigma", type=float, help="override privacy.noise_multiplier")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| dataset | rounds x epochs | federated DP accuracy | max ε | centralized non-private (same epochs) | "
          "gap (points) | federated wall s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.dataset:
        cfg = demo_config(name, args.rounds, args.sigma)
        epochs = cfg.federation.rounds * cfg.training.epochs
        central = float(np.mean([centralized(cfg, epochs, s) for s in range(args.seeds)]))
        acc, eps, wall = federated(cfg)
        print(f"| {name} | {cfg.federation.rounds} x {cfg.training.epochs} | {acc:.4f} | {max(eps.values()):.2f} | "
              f"{central:.4f} | {100 * (central - acc):+.1f} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
