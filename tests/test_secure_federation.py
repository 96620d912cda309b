"""Secure modes through the whole federation on the in-process grid, with provisioned keys.

The same seeded federation is run with `none`, `secret-sharing` and `ckks`: the global model must
come out the same (up to the fixed-point / CKKS precision), so security costs no accuracy.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from fedveil.platform.provision import init_federation_keys
from tests.conftest import run_federation
from tests.test_sync_rounds import small_config


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys")
    init_federation_keys(out, ["proxy-1", "proxy-2"], ["hospital-a", "hospital-b", "hospital-c", "hospital-d"])
    return out


def run_mode(path, keys_dir, secure: str, run_id: str = "same", **overrides):
    values = {"federation.rounds": 1, "federation.secure": secure, "federation.min_aggregate": 2,
              "orgs": [{"name": n} for n in ("hospital-a", "hospital-b", "hospital-c", "hospital-d")]}
    values.update(overrides)
    cfg = small_config(**values)
    for org in cfg.orgs:  # each org's split secret, the same in every run: the same records train and validate
        secret = path / "orgs" / org.name / "split.secret"
        secret.parent.mkdir(parents=True, exist_ok=True)
        secret.write_bytes(org.name.encode().ljust(32, b"\0"))
    return run_federation(path, cfg, run_id, keys_dir=keys_dir)


def test_secure_modes_give_the_same_model_as_plaintext(tmp_path, keys):
    # DP noise is drawn from os.urandom (a server-known seed would void DP), so compare without it.
    deterministic = {"privacy.enabled": False}
    plain, _, _ = run_mode(tmp_path / "none", keys, "none", **deterministic)
    # each organization pins its validation split with a secret in its work dir: the same orgs, same split
    for secret in (tmp_path / "none" / "orgs").glob("*/*.secret"):
        for run in ("ss", "ckks"):
            target = tmp_path / run / "orgs" / secret.parent.name
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(secret, target / secret.name)
    shared, store_ss, _ = run_mode(tmp_path / "ss", keys, "secret-sharing", **deterministic)
    ckks, store_ckks, _ = run_mode(tmp_path / "ckks", keys, "ckks", **deterministic)
    assert store_ss.rounds("same")[0]["participants"] == 4
    assert store_ckks.rounds("same")[0]["participants"] == 4
    np.testing.assert_allclose(shared.weights, plain.weights, atol=1e-6, rtol=0)
    np.testing.assert_allclose(ckks.weights, plain.weights, atol=1e-6, rtol=0)


def test_server_view_of_a_secret_sharing_round_holds_nothing_it_can_open(tmp_path, keys):
    """Play the server: everything it relays is sealed to proxies; without their keys nothing opens."""
    from fedveil.platform import messages as wire
    from fedveil.platform.errors import SecurityError
    from fedveil.secure.envelope import open_envelope
    from fedveil.secure.modes import Binding

    fed, _, grid = run_mode(tmp_path, keys, "secret-sharing")
    relayed = [m for m in grid.sent if m.metadata.message_type in (wire.VALIDATE, wire.AGGREGATE)]
    assert any(wire.record_blobs(m.content.array_records["payloads"]) for m in relayed)
    server_secret = (keys / "server" / "superlink.key").read_bytes()
    for msg in relayed:
        task = wire.record_json(msg.content.config_records["task"])
        for cid, blob in wire.record_blobs(msg.content.array_records["payloads"]).items():
            binding = Binding(task["run_id"], task["task_id"], cid, "proxy-1", task["mode"], task["length"])
            # The server's own TLS key is not an X25519 key for these envelopes; a random key fails too.
            for wrong_key in (server_secret[:32], bytes(32)):
                with pytest.raises((SecurityError, ValueError)):
                    open_envelope(blob, wrong_key, binding)


def _aggregate_requests(grid):
    from fedveil.platform import messages as wire

    return [(wire.record_json(m.content.config_records["task"]), wire.record_blobs(m.content.array_records["payloads"]))
            for m in grid.sent if m.metadata.message_type == wire.AGGREGATE]


def test_validated_payloads_stay_at_the_proxy_and_the_aggregate_names_them(tmp_path, keys):
    """The aggregate request carries no payload a proxy already validated (a third of a round's bytes),
    the proxy combines exactly those bytes, and it deletes its copies once combined."""
    deterministic = {"privacy.enabled": False}
    plain, _, _ = run_mode(tmp_path / "none", None, "none", **deterministic)
    fed, _, grid = run_mode(tmp_path / "ss", keys, "secret-sharing", **deterministic)
    requests = _aggregate_requests(grid)
    assert len(requests) == 2
    for task, payloads in requests:
        assert payloads == {} and len(task["kept"]) == 4
    np.testing.assert_allclose(fed.weights, plain.weights, atol=1e-4)
    assert not any((tmp_path / "ss" / "proxies").glob("*/validated/*/*.bin"))


def test_a_proxy_that_lost_its_validated_payloads_is_sent_them_and_the_round_completes(tmp_path, keys):
    """A proxy restarted between validate and aggregate (its copies gone) refuses before claiming
    anything; the server sends the same request with the bytes."""
    from fedveil.platform import messages as wire

    def lose_copies(msg):
        if msg.metadata.message_type == wire.AGGREGATE:
            shutil.rmtree(tmp_path / "proxies" / "proxy-1" / "validated", ignore_errors=True)
        return 0.0

    values = {"federation.rounds": 1, "federation.secure": "secret-sharing", "federation.min_aggregate": 2,
              "orgs": [{"name": n} for n in ("hospital-a", "hospital-b", "hospital-c", "hospital-d")]}
    fed, store, grid = run_federation(tmp_path, small_config(**values), "lost", keys_dir=keys,
                                      delays={"proxy-1": lose_copies})
    (row,) = store.rounds("lost")
    assert row["participants"] == 4
    to_proxy_1 = [(t, p) for t, p in _aggregate_requests(grid) if len(p) == 4]
    assert len(to_proxy_1) == 1 and "kept" not in to_proxy_1[0][0]


def test_a_proxy_combines_only_payloads_it_validated(tmp_path):
    """Playing a deviating server: naming as kept a payload the proxy never validated, or sending a payload
    and naming it kept too, is refused before anything is claimed or opened."""
    from fedveil.aggregator.proxy import ProxyIdentity, aggregate_task, keep_validated
    from fedveil.platform import messages as wire
    from fedveil.secure.modes import AggregationRefused

    proxy = ProxyIdentity.from_node_config({"name": "proxy-1", "workdir": str(tmp_path / "p1")})
    task = {"run_id": "r", "task_id": "t:agg", "mode": "secret-sharing", "length": 4, "min_aggregate": 2}
    kept = keep_validated(proxy, "r", "t:agg", {"org-a": b"share-a"})
    assert set(kept) == {"org-a"} and len(kept["org-a"]) == 64
    with pytest.raises(AggregationRefused, match=wire.KEPT_MISSING):
        aggregate_task(proxy, {**task, "kept": ["org-a", "org-b"]}, {})
    with pytest.raises(AggregationRefused, match="one payload"):
        aggregate_task(proxy, {**task, "kept": ["org-a"]}, {"org-a": b"other"})
    with pytest.raises(AggregationRefused, match=wire.KEPT_MISSING):
        aggregate_task(proxy, {**task, "task_id": "t:other", "kept": ["org-a"]}, {})
    assert not (tmp_path / "p1" / "replay-guard.db").exists()


def test_tampered_share_is_rejected_recorded_and_the_round_goes_on(tmp_path, keys, monkeypatch):
    """A tampered envelope is refused by its proxy; all proxies drop that client; the others aggregate."""
    import fedveil.clients.node as node

    original = node.protect

    def tamper(identity, *args, **kwargs):
        blobs = original(identity, *args, **kwargs)
        if identity.org == "hospital-b":
            name = sorted(blobs)[0]
            data = bytearray(blobs[name])
            data[-5] ^= 0x01
            blobs[name] = bytes(data)
        return blobs

    monkeypatch.setattr(node, "protect", tamper)
    fed, store, _ = run_mode(tmp_path, keys, "secret-sharing")
    (row,) = store.rounds("same")
    assert row["participants"] == 3
    rejected = [e for e in store.events("same") if e["kind"] == "rejected"]
    assert rejected and "hospital-b" in rejected[0]["message"] and "tampered" in rejected[0]["message"]


def test_client_without_provisioned_keys_declines_before_spending_budget(tmp_path):
    """No proxy key in the client's bundle: a clear error, and the ledger is not charged for nothing."""
    from fedveil.clients.ledger import PrivacyLedger

    fed, store, _ = run_mode(tmp_path, None, "secret-sharing", **{"federation.min_clients": 2})
    errors = [e for e in store.events("same") if e["kind"] == "error"]
    assert errors and "fedveil keys init" in errors[0]["message"]
    assert store.rounds("same")[0]["participants"] == 0
    ledger = PrivacyLedger(tmp_path / "orgs" / "hospital-a" / "privacy-ledger.db", "hospital-a")
    assert ledger.datasets() == []


def test_a_client_receives_only_the_global_model_and_its_task(tmp_path, keys):
    """Play a client: every message addressed to it holds the global model and task metadata, nothing else."""
    from fedveil.platform import messages as wire

    fed, _, grid = run_mode(tmp_path, keys, "secret-sharing")
    client_ids = set(fed.roster.clients)
    to_clients = [m for m in grid.sent if m.metadata.dst_node_id in client_ids]
    assert to_clients
    for msg in to_clients:
        assert set(msg.content.array_records) <= {"global"}
        assert set(msg.content.config_records) == {"task"}
        task = wire.record_json(msg.content.config_records["task"])
        assert set(task) <= {"run_id", "task_id", "round", "proxies", "config"}
        if "global" in msg.content.array_records:
            sizes = [a.size for a in wire.record_weights(msg.content.array_records["global"])]
            assert sum(sizes) == fed.weights.size  # exactly one model, no other client's update


def test_a_dashboard_viewer_sees_no_update_and_no_key(tmp_path, keys):
    """Play the dashboard viewer: read the whole store; it holds metrics only, never updates or keys."""
    import base64
    import sqlite3

    run_mode(tmp_path, keys, "ckks")
    con = sqlite3.connect(tmp_path / "fedveil.db")
    secrets = [(keys / "proxy-1" / "proxies" / "proxy-1" / "x25519.key").read_bytes(),
               (keys / "hospital-a" / "supernode.key").read_bytes()[40:80],
               (keys / "server" / "superlink.key").read_bytes()[40:80]]
    needles = [s.hex() for s in secrets] + [base64.b64encode(s).decode()[:40] for s in secrets]
    for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'"):
        for row in con.execute(f"SELECT * FROM {table}"):
            for value in row:
                assert not isinstance(value, bytes), f"binary data in {table}"
                if isinstance(value, str):
                    assert len(value) < 20_000, f"a large blob in {table}"
                    assert not any(n in value for n in needles), f"key material in {table}"
    con.close()
