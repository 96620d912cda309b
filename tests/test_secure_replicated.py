"""replicated-sharing: any 2 of 3 proxies reconstruct, one proxy's view is uniform, deviations are refused.

Each security test plays the deviating party with exactly what it holds: the server (every sealed
payload it relays, every partial, its own keyring) and, where stated, one colluding proxy (its own
private key, hence its k-1 shares of every client).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from fedveil.secure import fixedpoint
from fedveil.secure.envelope import MemoryReplayGuard, generate_x25519_keypair
from fedveil.secure.errors import SecurityError
from fedveil.secure.modes import AggregationRefused, Binding, ClientKeyring, ProxyKeyring, ServerKeyring, get_mode
from fedveil.secure.replicated import (
    ReplicatedSharingMode,
    decode_partial,
    encode_partial,
    explicit_share,
    partial_clients,
)

PROXIES = ["proxy-1", "proxy-2", "proxy-3"]
L = 512


@pytest.fixture(scope="module")
def fed():
    pairs = {p: generate_x25519_keypair() for p in PROXIES + ["proxy-4"]}
    ck = ClientKeyring(proxy_public_keys={p: pk for p, (sk, pk) in pairs.items()})
    pks = {p: ProxyKeyring(proxy_id=p, private_key=sk) for p, (sk, pk) in pairs.items()}
    return ck, pks


def binding(length=L, task="task-1"):
    return Binding(run_id="run", task_id=task, client_id="", proxy_id="", mode="replicated-sharing", length=length)


def protect_all(mode, vectors, ck, b, proxies=PROXIES):
    out = {p: {} for p in proxies}
    for cid, v in vectors.items():
        for p, blob in mode.protect(v, proxies, replace(b, client_id=cid), ck).items():
            out[p][cid] = blob
    return out


def updates(n_clients=5, length=L, seed=0):
    rng = np.random.default_rng(seed)
    return {f"org-{i}": rng.uniform(-1, 1, length) * rng.integers(50, 500) for i in range(n_clients)}


def test_registered_and_config_needs_three_proxies():
    from fedveil.platform import config as config_mod
    from fedveil.platform.errors import ConfigError

    assert isinstance(get_mode("replicated-sharing"), ReplicatedSharingMode)
    ok = config_mod.validate({"federation": {"secure": "replicated-sharing"},
                              "proxies": {"names": PROXIES}})
    assert ok.federation.secure == "replicated-sharing"
    with pytest.raises(ConfigError, match="replicated-sharing needs at least 3 proxies"):
        config_mod.validate({"federation": {"secure": "replicated-sharing"}, "proxies": {"names": PROXIES[:2]}})


@pytest.mark.parametrize("dead", [None, *PROXIES])
def test_any_two_of_three_partials_give_the_weighted_sum(fed, dead):
    ck, pks = fed
    mode = ReplicatedSharingMode()
    vectors = updates()
    b = binding()
    payloads = protect_all(mode, vectors, ck, b)
    alive = [p for p in PROXIES if p != dead]
    partials = [mode.combine(payloads[p], b, pks[p], min_aggregate=2).partial for p in alive]
    total = mode.finish(partials, L, ServerKeyring())
    expected = np.sum(list(vectors.values()), axis=0)
    assert np.max(np.abs(total - expected)) <= len(vectors) * 2.0 ** -(fixedpoint.DEFAULT_FRAC_BITS + 1)


def test_one_partial_alone_is_refused(fed):
    ck, pks = fed
    mode = ReplicatedSharingMode()
    b = binding()
    payloads = protect_all(mode, updates(), ck, b)
    partial = mode.combine(payloads["proxy-1"], b, pks["proxy-1"], min_aggregate=2).partial
    with pytest.raises(ValueError, match="at least 2 proxies"):
        mode.finish([partial], L, ServerKeyring())


def test_four_proxies_any_two_suffice_and_staleness_weights_apply(fed):
    ck, pks = fed
    proxies = PROXIES + ["proxy-4"]
    mode = ReplicatedSharingMode()
    vectors = updates(4)
    weights = {cid: w for cid, w in zip(sorted(vectors), (1.0, 0.5, 0.25, 0.75))}
    b = binding()
    payloads = protect_all(mode, vectors, ck, b, proxies)
    partials = {p: mode.combine(payloads[p], b, pks[p], 2, weights=weights).partial for p in proxies}
    expected = sum(weights[c] * v for c, v in vectors.items())
    for pair in (("proxy-1", "proxy-4"), ("proxy-2", "proxy-3")):
        total = mode.finish([partials[p] for p in pair], L, ServerKeyring())
        assert np.max(np.abs(total - expected)) < 1e-5


def test_one_proxy_view_is_uniform_whatever_the_update(fed):
    """Play one curious proxy: its k-1 shares (and their sum) look the same for x = 0 and for a huge x.

    Structurally it never gets the share it lacks; statistically every bit of what it holds is a fair coin."""
    ck, pks = fed
    mode = ReplicatedSharingMode()
    n = 4096
    b = binding(n)
    for proxy in PROXIES:
        views = []
        for value in (0.0, 9.0e3):
            # the client whose explicit share this proxy lacks gets only seeds; the others send it in full
            for cid in ("org-a", "org-b", "org-c", "org-d"):
                blob = mode.protect(np.full(n, value), PROXIES, replace(b, client_id=cid), ck)[proxy]
                names, shares = mode._open_shares(blob, replace(b, client_id=cid, proxy_id=proxy), pks[proxy], None)
                assert names == tuple(PROXIES)
                assert set(shares) == set(PROXIES) - {proxy}  # never the share it lacks
                held = sum(shares.values()).astype(np.uint64)
                x = fixedpoint.encode(np.full(n, value))
                assert not np.any(held == x)  # what it holds misses x by a uniform share
                views.append(np.concatenate([*shares.values(), held]))
        for view in views:
            bits = np.unpackbits(view.view(np.uint8)).reshape(-1, 64).mean(axis=0)
            assert np.all(np.abs(bits - 0.5) < 0.03), "a share bit is biased: the view depends on the update"
        # the same statistic for x = 0 and x = 9e3 (the sign bit of x = 0 is always 0, of its shares a coin)
        top0 = np.mean([(v >> np.uint64(63)).mean() for v in views[:4]])
        top1 = np.mean([(v >> np.uint64(63)).mean() for v in views[4:]])
        assert abs(top0 - top1) < 0.03


def test_server_with_one_colluding_proxy_cannot_isolate_a_client(fed):
    """Play the server plus proxy-1: every sealed payload, every partial, and proxy-1's private key."""
    ck, pks = fed
    mode = ReplicatedSharingMode()
    vectors = updates(3)
    b = binding()
    payloads = protect_all(mode, vectors, ck, b)
    partials = {p: mode.combine(payloads[p], b, pks[p], 2, replay_guard=MemoryReplayGuard()).partial for p in PROXIES}
    # the honest path still works
    total = mode.finish(list(partials.values()), L, ServerKeyring())
    np.testing.assert_allclose(total, np.sum(list(vectors.values()), axis=0), atol=1e-5)
    victim = "org-0"
    # proxy-1's key does not open what was sealed to proxy-2 or proxy-3
    for other in ("proxy-2", "proxy-3"):
        with pytest.raises(SecurityError):
            mode._open_shares(payloads[other][victim], replace(b, client_id=victim, proxy_id="proxy-1"),
                              pks["proxy-1"], None)
    # proxy-1 opens its own shares of every client; the server knows every partial's per-share sums.
    mine = {c: mode._open_shares(payloads["proxy-1"][c], replace(b, client_id=c, proxy_id="proxy-1"),
                                 pks["proxy-1"], None)[1] for c in vectors}
    lacked_sum = decode_partial(partials["proxy-2"]).sums["proxy-1"]  # sum over ALL clients of the lacked share
    # best estimate of the victim: its held shares plus the lacked-share sum minus nothing it can know
    held = sum(mine[victim].values()).astype(np.uint64)
    guess = fixedpoint.decode((held + lacked_sum).astype(np.uint64))
    err = np.abs(guess - vectors[victim])
    assert np.median(err) > 1e6, "server + one proxy got close to a single client's update"
    # ... and it equals the victim plus the other clients' lacked shares, which are uniform: nothing isolates it
    others = sum(vectors[c] for c in vectors if c != victim)
    assert np.median(np.abs(guess - vectors[victim] - others)) > 1e6


def test_known_limit_two_holders_fed_different_client_sets(fed):
    """The documented boundary (docs/security.md): the share proxy-1 lacks is held by proxy-2 AND proxy-3. A
    server that deviates by giving those two different client sets, colluding with proxy-1, isolates the
    client in one set and not the other. `finish` refuses such partials, but a deviating server need not call
    it; `secret-sharing` (every share held once) does not have this gap. This test pins the limit so a fix
    (proxies agreeing on the client set themselves) must update it."""
    ck, pks = fed
    mode = ReplicatedSharingMode()
    vectors = updates(3)
    b = binding()
    payloads = protect_all(mode, vectors, ck, b)
    victim = "org-2"
    p2 = mode.combine(payloads["proxy-2"], b, pks["proxy-2"], 2).partial
    p3 = mode.combine({c: x for c, x in payloads["proxy-3"].items() if c != victim}, b, pks["proxy-3"], 2).partial
    with pytest.raises(ValueError, match="different client sets"):
        mode.finish([p2, p3], L, ServerKeyring())
    lacked = decode_partial(p2).sums["proxy-1"] - decode_partial(p3).sums["proxy-1"]
    held = mode._open_shares(payloads["proxy-1"][victim], replace(b, client_id=victim, proxy_id="proxy-1"),
                             pks["proxy-1"], None)[1]
    recovered = fixedpoint.decode((sum(held.values()) + lacked).astype(np.uint64))
    np.testing.assert_allclose(recovered, vectors[victim], atol=1e-6)


def test_a_deviating_proxy_is_refused_not_decoded(fed):
    """Play a proxy that alters one of its share sums (or claims another set): the server refuses the aggregate."""
    ck, pks = fed
    mode = ReplicatedSharingMode()
    b = binding()
    payloads = protect_all(mode, updates(), ck, b)
    good = {p: mode.combine(payloads[p], b, pks[p], 2).partial for p in PROXIES}
    bad = decode_partial(good["proxy-3"])
    bad.sums["proxy-1"] = bad.sums["proxy-1"] + np.uint64(1 << 30)
    forged = encode_partial("proxy-3", bad.proxies, bad.sums, bad.clients, bad.frac_bits, bad.weight_bits)
    with pytest.raises(ValueError, match="different sums of the same share"):
        mode.finish([good["proxy-1"], good["proxy-2"], forged], L, ServerKeyring())
    # a partial that claims to be another proxy counts once
    with pytest.raises(ValueError, match="same proxy"):
        mode.finish([good["proxy-1"], good["proxy-1"]], L, ServerKeyring())
    fewer = decode_partial(good["proxy-2"])
    dropped = encode_partial("proxy-2", fewer.proxies, fewer.sums, fewer.clients[:-1], fewer.frac_bits,
                             fewer.weight_bits)
    with pytest.raises(ValueError, match="different client sets"):
        mode.finish([good["proxy-1"], dropped], L, ServerKeyring())
    with pytest.raises(ValueError, match="malformed"):
        mode.finish([good["proxy-1"], good["proxy-2"][:-3]], L, ServerKeyring())
    # the honest partials still finish
    assert mode.finish([good["proxy-1"], good["proxy-2"]], L, ServerKeyring()).shape == (L,)
    assert partial_clients(good["proxy-1"]) == sorted(payloads["proxy-1"])


def test_bad_payloads_are_rejected_and_the_rest_combine(fed):
    ck, pks = fed
    mode = ReplicatedSharingMode()
    vectors = updates(4)
    b = binding()
    payloads = protect_all(mode, vectors, ck, b)
    tampered = bytearray(payloads["proxy-2"]["org-1"])
    tampered[-3] ^= 1
    group = dict(payloads["proxy-2"], **{"org-1": bytes(tampered)})
    # a client that (told by a deviating server) shared over a different proxy list is not mixed in
    group["org-3"] = mode.protect(vectors["org-3"], PROXIES + ["proxy-4"], replace(b, client_id="org-3"),
                                  ck)["proxy-2"]
    assert set(mode.validate(group, b, pks["proxy-2"])) == {"org-1", "org-3"}
    guard = MemoryReplayGuard()
    result = mode.combine(group, b, pks["proxy-2"], 2, replay_guard=guard)
    assert result.included == ["org-0", "org-2"]
    assert "proxy-4" in result.rejected["org-3"]
    # a replayed envelope is refused
    again = mode.combine(payloads["proxy-2"], b, pks["proxy-2"], 1, replay_guard=guard)
    assert set(again.rejected) == {"org-0", "org-2"}
    with pytest.raises(AggregationRefused):
        mode.combine({"org-0": payloads["proxy-3"]["org-0"]}, b, pks["proxy-3"], 2)


def test_client_side_errors_name_the_fix(fed):
    ck, _ = fed
    mode = ReplicatedSharingMode()
    b = replace(binding(4), client_id="org-0")
    with pytest.raises(ValueError, match="at least 3 proxies.*secret-sharing"):
        mode.protect(np.zeros(4), PROXIES[:2], b, ck)
    with pytest.raises(SecurityError, match="no provisioned public key"):
        mode.protect(np.zeros(4), PROXIES + ["proxy-x"], b, ck)
    with pytest.raises(ValueError, match="NaN"):
        mode.protect(np.array([0, np.nan, 0, 0]), PROXIES, b, ck)


def test_payload_bytes_one_explicit_share_held_by_k_minus_1(fed):
    """Traffic: the explicit share reaches the k-1 proxies that hold it; the proxy that lacks it gets seeds."""
    ck, _ = fed
    mode = ReplicatedSharingMode()
    n = 10_000
    b = replace(binding(n), client_id="org-0")
    out = mode.protect(np.zeros(n), PROXIES, b, ck)
    lacks = explicit_share("org-0", PROXIES)
    assert len(out[lacks]) < 300
    assert all(8 * n < len(out[p]) < 8 * n + 300 for p in PROXIES if p != lacks)


# ---- a whole round with one proxy dead -----------------------------------------------------------
ORGS = ("hospital-a", "hospital-b", "hospital-c")


def test_round_survives_a_dead_proxy_and_charges_each_org_once(tmp_path):
    """proxy-3 answers the handshake, then dies before validating (after every client was charged).
    The round still produces an aggregate from proxy-1 and proxy-2, so no ε is wasted."""
    from fedveil.clients.ledger import PrivacyLedger
    from fedveil.platform import messages as wire
    from fedveil.platform.provision import init_federation_keys
    from tests.conftest import run_federation
    from tests.test_sync_rounds import small_config

    keys = tmp_path / "keys"
    init_federation_keys(keys, PROXIES, list(ORGS))
    cfg = small_config(**{
        "federation.rounds": 1, "federation.secure": "replicated-sharing", "federation.round_timeout": 20,
        "proxies.names": PROXIES, "policy.allow_secure": ["replicated-sharing"],
        "orgs": [{"name": n} for n in ORGS],
    })

    def killed_mid_aggregate(msg):
        if msg.metadata.message_type in (wire.VALIDATE, wire.AGGREGATE):
            raise RuntimeError("proxy-3 was killed")  # no reply ever comes, as after kill -9
        return 0.0

    fed, store, grid = run_federation(tmp_path / "run", cfg, keys_dir=keys, delays={"proxy-3": killed_mid_aggregate})
    assert any(m.metadata.message_type == wire.VALIDATE and m.metadata.dst_node_id == 3 for m in grid.sent)
    rounds = store.rounds("r1")
    assert [r["participants"] for r in rounds] == [3]
    events = store.events("r1")
    assert not [e for e in events if e["kind"] == "round_skipped"]
    assert any(e["kind"] == "dropout" and "proxy-3" in e["message"] for e in events)
    assert np.all(np.isfinite(fed.weights)) and fed.weights.size > 0
    for org in ORGS:
        ledger = PrivacyLedger(tmp_path / "run" / "orgs" / org / "privacy-ledger.db", org)
        charges = [h for ds in ledger.datasets() for h in ledger.history(ds)]
        assert [h["task_id"] for h in charges] == ["r1:round-1"]  # charged once, for a round that counted


def test_engine_needs_every_partial_unless_the_mode_tolerates_a_missing_one():
    """The engine's rule is keyed on the mode: secret-sharing and ckks still refuse a round with a dead proxy."""
    from fedveil.aggregator.engine import Federation

    fed = Federation.__new__(Federation)
    for name, need in (("secret-sharing", 3), ("ckks", 3), ("replicated-sharing", 2)):
        fed.mode = get_mode(name)
        assert fed._partials_needed(3) == need, name


@pytest.mark.parametrize("argv, secure, n_proxies", [
    ([], "replicated-sharing", 3),
    (["--secure", "secret-sharing"], "secret-sharing", 2),
    (["--proxies", "2"], "secret-sharing", 2),
    (["--secure", "ckks"], "ckks", 2),
])
def test_demo_default_tolerates_one_dead_proxy(tmp_path, monkeypatch, argv, secure, n_proxies):
    """`fedveil demo` without a config runs replicated-sharing over 3 proxies (its own orgs opt in to it);
    an explicit --secure secret-sharing or --proxies 2 keeps the 2-proxy secret-sharing federation."""
    from fedveil.platform import cli

    seen = {}

    class Stop(Exception):
        pass

    def capture(args, cfg):  # stops the demo before it provisions keys or starts processes
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(cli, "_demo_keys", capture)
    args = cli.build_parser().parse_args(["demo", "--no-dashboard", "--workdir", str(tmp_path), *argv])
    with pytest.raises(Stop):
        cli.cmd_demo(args)
    cfg = seen["cfg"]
    assert (cfg.federation.secure, len(cfg.proxies.names)) == (secure, n_proxies)
    assert (secure in cfg.policy.allow_secure) == (secure != "none")


def test_mutated_partials_and_payloads_fail_only_with_clear_errors(fed):
    """A deviating server or proxy may send any bytes: garbage is refused with ValueError/SecurityError, never a crash."""
    ck, pks = fed
    mode = ReplicatedSharingMode()
    b = binding(16)
    payloads = protect_all(mode, updates(3, 16), ck, b)
    good = [mode.combine(payloads[p], b, pks[p], 2).partial for p in PROXIES[:2]]
    rng = np.random.default_rng(7)
    for _ in range(1500):
        blob = bytearray(good[int(rng.integers(2))])
        for _ in range(int(rng.integers(1, 4))):
            choice = int(rng.integers(3))
            if choice == 0 and blob:
                blob[int(rng.integers(len(blob)))] = int(rng.integers(256))
            elif choice == 1:
                del blob[int(rng.integers(len(blob) + 1)):]
            else:
                blob += rng.bytes(int(rng.integers(1, 9)))
        try:
            mode.finish([good[0], bytes(blob)], 16, ServerKeyring())
        except (ValueError, AggregationRefused):
            pass
    # a client (or its compromised host) may seal any plaintext: mutated share payloads are rejected with a reason
    from fedveil.secure.envelope import open_envelope, seal

    cb = replace(b, client_id="org-0", proxy_id="proxy-1")
    plain = open_envelope(payloads["proxy-1"]["org-0"], pks["proxy-1"].private_key, cb)
    rejected = 0
    for _ in range(500):
        data = bytearray(plain)
        for _ in range(int(rng.integers(1, 4))):
            if rng.random() < 0.7 and data:
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
            else:
                del data[int(rng.integers(len(data) + 1)):]
        blob = seal(bytes(data), ck.proxy_public_keys["proxy-1"], cb)
        rejected += "org-0" in mode.validate({"org-0": blob}, b, pks["proxy-1"])
    assert rejected > 250  # most mutations break the structure (a flipped share byte is still a valid share)
