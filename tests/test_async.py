"""Async (FedBuff) and semi-sync carry-over on the in-process grid, with deterministic delays.

DP noise is drawn from os.urandom by design, so runs that compare numbers turn privacy off;
the ledger test keeps it on.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from fedveil.aggregator.engine import Federation
from fedveil.platform import config as config_mod
from fedveil.platform.errors import ConfigError
from fedveil.platform.store import MetricsStore
from fedveil.secure.modes import applied_weight
from fedveil.secure.staleness import staleness_weight
from tests.conftest import make_local_federation
from tests.test_sync_rounds import small_config

ORGS = ("hospital-a", "hospital-b", "hospital-c", "hospital-d")


def async_config(**overrides):
    values = {"federation.mode": "async", "federation.rounds": 4, "federation.round_timeout": 30,
              "async.buffer_size": 2, "async.staleness": "polynomial", "async.staleness_exponent": 0.5,
              "orgs": [{"name": n} for n in ORGS], "privacy.enabled": False}
    values.update(overrides)
    return small_config(**values)


def train_delay(seconds):
    return lambda msg: seconds if msg.metadata.message_type == "train" else 0.0


def start(tmp_path, cfg, delays=None, keys_dir=None, run_id="a1"):
    from fedveil.platform.provision import load_server_keyring_dir

    store = MetricsStore(f"sqlite:///{tmp_path / 'fedveil.db'}")
    grid = make_local_federation(tmp_path, cfg, delays=delays, keys_dir=keys_dir)
    fed = Federation(grid, cfg, store, run_id, workdir=tmp_path, handshake_timeout=30,
                     server_keys=None if keys_dir is None else load_server_keyring_dir(keys_dir / "server"))
    return fed, store, grid


def spy_aggregates(fed):
    """Record every aggregate: the staleness sent to the proxies, the contributions, the result, the model."""
    seen = []
    original = fed._aggregate

    def spy(rnd, task_id, contributions, staleness=None):
        before = fed.weights.copy()
        out = original(rnd, task_id, contributions, staleness)
        seen.append({"contributions": contributions, "staleness": staleness, "total": out[0], "included": out[1],
                     "before": before, "task_id": task_id})
        return out

    fed._aggregate = spy
    return seen


def spy_protect(monkeypatch):
    """The plaintext n_i Δ_i each client protected, by (client id, train task id)."""
    import fedveil.clients.node as node

    vectors = {}
    original = node.protect

    def spy(identity, federation, vector, proxies, run_id, task_id, client_id):
        vectors[(client_id, task_id)] = np.array(vector, dtype=np.float64)
        return original(identity, federation, vector, proxies, run_id, task_id, client_id)

    monkeypatch.setattr(node, "protect", spy)
    return vectors


# ---- staleness functions and config ------------------------------------------------------------
def test_staleness_functions_match_their_formulas():
    cfg = config_mod.FedveilConfig().async_
    for s in range(0, 12):
        assert staleness_weight(s, cfg.model_copy(update={"staleness": "constant"})) == 1.0
        poly = cfg.model_copy(update={"staleness": "polynomial", "staleness_exponent": 0.7})
        assert staleness_weight(s, poly) == pytest.approx((1 + s) ** -0.7, rel=0, abs=0)
        hinge = cfg.model_copy(update={"staleness": "hinge", "hinge_a": 10.0, "hinge_b": 4})
        assert staleness_weight(s, hinge) == (1.0 if s <= 4 else 1.0 / (10.0 * (s - 4) + 1.0))


def test_config_names_keys_and_fixes():
    with pytest.raises(ConfigError, match=r"async.buffer_size \(1\) must be >= federation.min_aggregate"):
        small_config(**{"async.buffer_size": 1, "federation.min_aggregate": 2})
    with pytest.raises(ConfigError, match="async.buffer_size .* exceeds the 3 organizations"):
        small_config(**{"federation.mode": "async", "async.buffer_size": 4, "federation.min_clients": 2})
    with pytest.raises(ConfigError, match="async.concurrency"):
        small_config(**{"federation.mode": "async", "async.concurrency": 1})
    with pytest.raises(ConfigError, match=r"orgs.0.dropout"):
        small_config(**{"orgs": [{"name": "a", "dropout": 1.5}, {"name": "b"}]})
    cfg = small_config(**{"async.staleness": "hinge", "federation.late_replies": "carry"})
    again = config_mod.FedveilConfig.from_json(cfg.to_json())
    assert again.async_.staleness == "hinge" and json.loads(cfg.to_json())["async"]["staleness"] == "hinge"


# ---- async engine ----------------------------------------------------------------------------------
def test_staleness_weights_are_applied_exactly_and_recorded(tmp_path):
    """w' = w + η Σ α_i n_i Δ_i / Σ α_i n_i with α_i = (1+s_i)^-1/2, to float64 precision (plaintext mode)."""
    cfg = async_config(**{"async.server_lr": 0.8, "federation.rounds": 5})
    fed, store, grid = start(tmp_path, cfg, delays={"hospital-c": train_delay(0.6), "hospital-d": train_delay(0.9)})
    seen = spy_aggregates(fed)
    try:
        fed.run()
    finally:
        grid.shutdown()
    stale_seen = False
    rows = store.rounds("a1")
    for agg, row in zip(seen, rows):
        extra = json.loads(row["extra"])
        c = agg["contributions"]
        stal = {cid: row["model_version"] - 1 - extra["base_versions"][c[cid]["name"]] for cid in agg["included"]}
        alpha = {cid: (1 + s) ** -0.5 for cid, s in stal.items()}
        stale_seen |= any(s > 0 for s in stal.values())
        vec = {cid: np.frombuffer(next(iter(c[cid]["payloads"].values())), dtype="<f4").astype(np.float64) for cid in stal}
        expected = agg["before"] + 0.8 * sum(alpha[k] * vec[k] for k in stal) / sum(alpha[k] * c[k]["n"] for k in stal)
        after = seen[seen.index(agg) + 1]["before"] if agg is not seen[-1] else fed.weights
        np.testing.assert_allclose(after, expected, rtol=0, atol=1e-12)
        assert sorted(stal.values()) == extra["staleness"]
        # the server sent each client's staleness, never a weight; the proxies applied alpha(s) (checked above)
        assert {k: agg["staleness"][k] for k in stal} == stal
    assert stale_seen, "the slow clients should have produced stale updates"
    assert [r["model_version"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["buffer_fill_seconds"] is not None and r["buffer_fill_seconds"] >= 0 for r in rows)
    recorded = [c for c in store.client_rounds("a1") if c["status"] == "ok"]
    assert all(c["staleness"] is not None for c in recorded)
    (run,) = store.export()["runs"]
    assert run["model_version"] == 5 and run["updates"] == len(recorded)
    assert sum(len(r["staleness"]) for r in run["rounds"]) == len(recorded)
    assert all(r["buffer_fill_seconds"] is not None for r in run["rounds"])


def test_no_buffer_holds_two_updates_of_one_client(tmp_path):
    """hospital-a is much faster than the others: it is re-tasked at once, but never twice in one buffer."""
    cfg = async_config(**{"async.buffer_size": 3, "federation.rounds": 3, "federation.min_aggregate": 2,
                          "federation.min_clients": 2})
    delays = {n: train_delay(0.8) for n in ORGS[1:]}
    fed, store, grid = start(tmp_path, cfg, delays=delays)
    seen = spy_aggregates(fed)
    try:
        fed.run()
    finally:
        grid.shutdown()
    for agg in seen:
        names = [agg["contributions"][cid]["name"] for cid in agg["contributions"]]
        assert len(names) == len(set(names)) and len(names) >= 3
    # hospital-a was sent more tasks than there were buffers: it got new work at once after each reply.
    sent_a = [m for m in grid.sent if m.metadata.message_type == "train" and m.metadata.dst_node_id == 101]
    assert len(sent_a) > len(seen)
    task_ids = [json.loads(m.content.config_records["task"]["json"])["task_id"]
                for m in grid.sent if m.metadata.message_type == "train"]
    assert len(task_ids) == len(set(task_ids)), "every async task has its own task id"


def test_client_dying_mid_training_does_not_stall(tmp_path):
    """hospital-d hangs in every train task: its tasks time out, the others keep the buffers filling."""
    cfg = async_config(**{"federation.round_timeout": 1.5, "federation.rounds": 6})
    delays = {n: train_delay(0.5) for n in ORGS[:3]}
    delays["hospital-d"] = train_delay(60.0)
    fed, store, grid = start(tmp_path, cfg, delays=delays)
    started = time.monotonic()
    try:
        fed.run()
    finally:
        grid.shutdown()
    assert time.monotonic() - started < 40
    rows = store.rounds("a1")
    assert [r["model_version"] for r in rows] == [1, 2, 3, 4, 5, 6] and all(r["participants"] >= 2 for r in rows)
    assert all("hospital-d" not in json.loads(r["extra"])["weights"] for r in rows)
    assert any(e["kind"] == "dropout" and "hospital-d" in e["message"] for e in store.events("a1"))
    assert store.get_run("a1")["status"] == "completed"


def test_ledger_is_charged_for_each_async_task(tmp_path):
    from fedveil.clients.ledger import PrivacyLedger

    cfg = async_config(**{"privacy.enabled": True, "federation.rounds": 3})
    fed, store, grid = start(tmp_path, cfg, delays={"hospital-d": train_delay(0.5)})
    try:
        fed.run()
    finally:
        grid._pool.shutdown(wait=True)  # let tasks still in flight finish: they charge too
    sent = {}
    for m in grid.sent:
        if m.metadata.message_type == "train":
            org = grid.nodes[m.metadata.dst_node_id].node_config["name"]
            sent.setdefault(org, []).append(json.loads(m.content.config_records["task"]["json"])["task_id"])
    for org in ORGS:
        ledger = PrivacyLedger(tmp_path / "orgs" / org / "privacy-ledger.db", org)
        (dataset,) = ledger.datasets()
        charged = [h["task_id"] for h in ledger.history(dataset) if h["run_id"] == "a1"]
        assert sorted(charged) == sorted(sent[org]), org
    ok = [c for c in store.client_rounds("a1") if c["status"] == "ok"]
    assert len(ok) >= 6 and all(c["epsilon"] > 0 for c in ok)


# ---- secure modes with staleness weights -----------------------------------------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    from fedveil.platform.provision import init_federation_keys

    out = tmp_path_factory.mktemp("keys")
    init_federation_keys(out, ["proxy-1", "proxy-2"], list(ORGS))
    return out


@pytest.mark.parametrize("secure, exact_tol", [("secret-sharing", 1e-5), ("ckks", 1e-8)])
def test_secure_aggregate_with_staleness_weights_equals_plaintext_weighted_average(tmp_path, keys, monkeypatch,
                                                                                   secure, exact_tol):
    """The proxies' weighted aggregate equals sum w_i n_i Δ_i of the clients' plaintext updates, and the
    server's step equals the plaintext staleness-weighted average within 1e-6.

    Secret sharing applies integer weights round(α·2^16): against the average with exactly those
    weights the step agrees to ~1e-7 (fixed point, 2^-24); against the exact α to < 1e-6 (measured
    8.5e-7 worst; asserted 1e-5). CKKS with its spare level applies α at full precision: ~1e-10.
    """
    vectors = spy_protect(monkeypatch)
    cfg = async_config(**{"federation.secure": secure, "federation.rounds": 3})
    fed, store, grid = start(tmp_path, cfg, keys_dir=keys, delays={"hospital-d": train_delay(0.8)})
    seen = spy_aggregates(fed)
    try:
        fed.run()
    finally:
        grid.shutdown()
    weighted = 0
    for agg, row in zip(seen, store.rounds("a1")):
        assert agg["total"] is not None
        c, inc = agg["contributions"], agg["included"]
        base = json.loads(row["extra"])["base_versions"]
        alpha = {k: (1 + row["model_version"] - 1 - base[c[k]["name"]]) ** -0.5 for k in inc}
        weighted += any(a != 1.0 for a in alpha.values())
        w = {k: applied_weight(fed.mode, alpha[k]) for k in inc}  # what the proxies' own configs give
        plain = {k: vectors[(k, c[k]["task_id"])] for k in inc}
        expected_total = sum(w[k] * plain[k] for k in inc)
        assert np.max(np.abs(agg["total"] - expected_total)) < 1e-6 * max(1.0, np.max(np.abs(expected_total)))
        step = (seen[seen.index(agg) + 1]["before"] if agg is not seen[-1] else fed.weights) - agg["before"]
        with_applied = sum(w[k] * plain[k] for k in inc) / sum(w[k] * c[k]["n"] for k in inc)
        np.testing.assert_allclose(step, with_applied, rtol=0, atol=1e-6)
        with_exact = sum(alpha[k] * plain[k] for k in inc) / sum(alpha[k] * c[k]["n"] for k in inc)
        np.testing.assert_allclose(step, with_exact, rtol=0, atol=exact_tol)
    assert weighted >= 1, "at least one aggregate must have carried non-trivial staleness weights"
    assert all(r["participants"] >= 2 for r in store.rounds("a1"))


# ---- semi-sync -----------------------------------------------------------------------------------
def test_semi_sync_carries_a_late_reply_with_its_staleness_weight(tmp_path):
    """hospital-d misses round 1's deadline; its update joins round 2 with weight (1+1)^-1/2."""
    calls = {"n": 0}

    def late_first(msg):
        if msg.metadata.message_type != "train":
            return 0.0
        calls["n"] += 1
        return 2.5 if calls["n"] == 1 else 0.0

    cfg = async_config(**{"federation.mode": "semi-sync", "federation.late_replies": "carry",
                          "federation.round_timeout": 2.0, "federation.rounds": 2})
    # a, b, c take 1 s; d takes 2.5 s in round 1 only: it misses the 2 s deadline and lands inside round 2.
    delays = {n: train_delay(1.0) for n in ORGS[:3]}
    delays["hospital-d"] = late_first
    fed, store, grid = start(tmp_path, cfg, delays=delays)
    seen = spy_aggregates(fed)
    try:
        fed.run()
    finally:
        grid.shutdown()
    assert len(seen) == 2
    first, second = seen
    names1 = {first["contributions"][c]["name"] for c in first["included"]}
    assert names1 == {"hospital-a", "hospital-b", "hospital-c"} and set(first["staleness"].values()) == {0}
    d = next(cid for cid in second["included"] if second["contributions"][cid]["name"] == "hospital-d")
    assert second["contributions"][d]["task_id"].endswith("round-1")
    assert second["staleness"][d] == 1 and all(s == 0 for cid, s in second["staleness"].items() if cid != d)
    c = second["contributions"]
    vec = {cid: np.frombuffer(next(iter(c[cid]["payloads"].values())), dtype="<f4").astype(np.float64) for cid in second["included"]}
    w = {cid: 2 ** -0.5 if cid == d else 1.0 for cid in vec}  # alpha(1) = (1+1)^-1/2, applied by the proxies
    expected = second["before"] + sum(w[k] * vec[k] for k in vec) / sum(w[k] * c[k]["n"] for k in vec)
    np.testing.assert_allclose(fed.weights, expected, rtol=0, atol=1e-12)
    rows = {(r["round"], r["org"]): r for r in store.client_rounds("a1") if r["status"] == "ok"}
    assert rows[(2, "hospital-d")]["staleness"] == 1
    kinds = {e["kind"] for e in store.events("a1")}
    assert {"late", "carried"} <= kinds
    assert [r["participants"] for r in store.rounds("a1")] == [3, 4]


def test_experiment_knobs_slow_and_drop_clients(tmp_path):
    """orgs.latency slows a client's replies; orgs.dropout = 0.99 makes it (almost) never contribute."""
    orgs = [{"name": "hospital-a"}, {"name": "hospital-b"}, {"name": "hospital-c", "latency": 0.7},
            {"name": "hospital-d", "dropout": 0.99}]
    cfg = async_config(**{"orgs": orgs, "federation.rounds": 3})
    fed, store, grid = start(tmp_path, cfg)
    try:
        fed.run()
    finally:
        grid.shutdown()
    ok = [c for c in store.client_rounds("a1") if c["status"] == "ok"]
    by_org = {}
    for c in ok:
        by_org.setdefault(c["org"], []).append(c)
    assert "hospital-d" not in by_org or len(by_org["hospital-d"]) <= 1
    assert any(e["kind"] == "dropout" and "hospital-d" in e["message"] for e in store.events("a1"))
    assert store.get_run("a1")["status"] == "completed"
