"""Synchronous rounds on the in-process grid: the real ClientApp, proxies and engine, in threads."""

from __future__ import annotations

import numpy as np
import pytest

from fedveil.aggregator.engine import Federation
from fedveil.platform import config as config_mod
from fedveil.platform.federation import demo_orgs
from fedveil.platform.store import MetricsStore
from tests.conftest import run_federation


def small_config(**overrides):
    base = config_mod.FedveilConfig()
    values = {
        "federation.rounds": 2, "federation.round_timeout": 60, "federation.secure": "none", "federation.min_clients": 2,
        "data.source": "breast_cancer", "training.epochs": 1, "training.batch_size": 32, "training.lr": 0.1,
        "privacy.noise_multiplier": 1.0, "privacy.budget": 50.0,
        "orgs": [o.model_dump(exclude_none=True) for o in demo_orgs(3)],
        # The test organizations opt in to the plaintext, DP-off baselines these tests compare against
        # (an org's default policy declines both; tests/test_org_policy.py plays that).
        "policy.allow_secure": ["none", "secret-sharing", "ckks"], "policy.require_dp": False,
    }
    values.update(overrides)
    return config_mod.with_overrides(base, values)


def test_sync_rounds_train_record_and_charge_every_org(tmp_path):
    cfg = small_config()
    fed, store, _ = run_federation(tmp_path, cfg)
    rounds = store.rounds("r1")
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(r["participants"] == 3 for r in rounds)
    assert all(r["accuracy"] is not None and 0.5 < r["accuracy"] <= 1.0 for r in rounds)
    latest = {c["org"]: c for c in store.latest_client_status("r1")}
    assert set(latest) == {"hospital-a", "hospital-b", "hospital-c"}
    for i, (org, row) in enumerate(sorted(latest.items())):
        # ε in the store is the accountant's value over the ledger's durable history (2 charges).
        from fedveil.clients.ledger import compute_epsilon
        from fedveil.clients.node import ClientIdentity, load_datasets
        from fedveil.clients.ledger import PrivacyLedger
        from fedveil.platform.data import dataset_fingerprint

        identity = ClientIdentity.from_node_config({"name": org, "index": i, "num-orgs": 3})
        train, _ = load_datasets(identity, cfg)
        ledger = PrivacyLedger(tmp_path / "orgs" / org / "privacy-ledger.db", org)
        history = ledger.history(dataset_fingerprint(train))
        assert len(history) == 2
        assert [h["q"] for h in history] == pytest.approx([min(1.0, 32 / len(train.y))] * 2)
        triples = [(h["sigma"], h["q"], h["steps"]) for h in history]
        assert row["epsilon"] == pytest.approx(compute_epsilon(triples, 1e-5, "rdp"), rel=1e-9)
        assert row["epsilon"] > 0
    assert store.get_run("r1")["status"] == "completed"


def test_global_update_equals_weighted_fedavg_of_client_updates(tmp_path):
    """The proxies' combined aggregate is exactly sum n_i Δ_i / sum n_i of what the clients sent."""
    cfg = small_config(**{"federation.rounds": 1})
    from tests.conftest import make_local_federation

    store = MetricsStore(f"sqlite:///{tmp_path / 'fedveil.db'}")
    grid = make_local_federation(tmp_path, cfg)
    fed = Federation(grid, cfg, store, "r1", workdir=tmp_path, handshake_timeout=20)
    fed.handshake()
    fed.init_model()
    w0 = fed.weights.copy()
    seen = {}
    original = fed._collect_train_replies

    def spy(rnd, sampled, replies):
        out = original(rnd, sampled, replies)
        seen.update(out)
        return out

    fed._collect_train_replies = spy
    assert fed.run_round(1)
    grid.shutdown()
    vectors = {cid: np.frombuffer(next(iter(c["payloads"].values())), dtype="<f4").astype(np.float64) for cid, c in seen.items()}
    n = {cid: c["n"] for cid, c in seen.items()}
    expected = w0 + sum(vectors.values()) / sum(n.values())
    np.testing.assert_allclose(fed.weights, expected, rtol=0, atol=1e-12)


def test_dead_client_drops_out_without_stalling(tmp_path):
    """hospital-c joins, then hangs in training: the round goes on at the deadline without it."""
    cfg2 = small_config(**{"federation.round_timeout": 5, "federation.rounds": 1})
    from tests.conftest import make_local_federation

    store2 = MetricsStore(f"sqlite:///{tmp_path / 'b.db'}")
    grid = make_local_federation(tmp_path / "b", cfg2)
    slow = [nid for nid, node in grid.nodes.items() if node.node_config["name"] == "hospital-c"][0]
    grid.nodes[slow].delay = lambda msg: 30.0 if msg.metadata.message_type == "train" else 0.0
    fed2 = Federation(grid, cfg2, store2, "r2", workdir=tmp_path / "b", handshake_timeout=20)
    fed2.run()
    grid.shutdown()
    (row,) = store2.rounds("r2")
    assert row["participants"] == 2
    statuses = {c["org"]: c["status"] for c in store2.client_rounds("r2")}
    assert statuses["hospital-c"] == "dropped"
    assert any(e["kind"] == "dropout" and "hospital-c" in e["message"] for e in store2.events("r2"))
