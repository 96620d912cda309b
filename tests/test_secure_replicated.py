"""replicated-sharing: any 2 proxies reconstruct, one proxy's view is uniform, deviations are refused, and
proxies release share sums only for a client set a quorum of them committed to once.

Each security test plays the deviating party with exactly what it holds: the server (every sealed
payload it relays, every partial, every commit tag it forwards, its own keyring) and, where stated,
one colluding proxy (its own private key, hence its k-1 shares of every client and every tag it can make).
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

PROXIES = ["proxy-1", "proxy-2", "proxy-3"]  # the sharing itself works from k=3; a federation needs 4 (quorum)
PROXIES4 = PROXIES + ["proxy-4"]
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


def test_registered_and_config_needs_four_proxies():
    """A federation needs k >= 4: the quorum of 3 then still commits with one proxy dead (k=3 would need all 3)."""
    from fedveil.platform import config as config_mod
    from fedveil.platform.errors import ConfigError

    assert isinstance(get_mode("replicated-sharing"), ReplicatedSharingMode)
    ok = config_mod.validate({"federation": {"secure": "replicated-sharing"},
                              "proxies": {"names": PROXIES4}})
    assert ok.federation.secure == "replicated-sharing"
    for names in (PROXIES, PROXIES[:2]):
        with pytest.raises(ConfigError, match="replicated-sharing needs at least 4 proxies"):
            config_mod.validate({"federation": {"secure": "replicated-sharing"}, "proxies": {"names": names}})


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


@pytest.mark.parametrize("dies_at", ["before-commit", "after-commit"])
def test_round_survives_a_dead_proxy_and_charges_each_org_once(tmp_path, dies_at):
    """proxy-4 answers the handshake, then dies (after every client was charged): before validating, so the
    other 3 are the quorum that commits; or after it committed (its tags already issued), before combining.
    Either way proxy-1..3 release their partials and the round produces an aggregate: no ε is wasted."""
    from fedveil.clients.ledger import PrivacyLedger
    from fedveil.platform import messages as wire
    from fedveil.platform.provision import init_federation_keys
    from tests.conftest import run_federation
    from tests.test_sync_rounds import small_config

    keys = tmp_path / "keys"
    init_federation_keys(keys, PROXIES4, list(ORGS), ckks=False)
    cfg = small_config(**{
        "federation.rounds": 1, "federation.secure": "replicated-sharing", "federation.round_timeout": 5,
        "proxies.names": PROXIES4, "policy.allow_secure": ["replicated-sharing"],
        "orgs": [{"name": n} for n in ORGS],
    })
    fatal = {"before-commit": (wire.VALIDATE, wire.COMMIT, wire.AGGREGATE), "after-commit": (wire.AGGREGATE,)}[dies_at]

    def killed(msg):
        if msg.metadata.message_type in fatal:
            raise RuntimeError("proxy-4 was killed")  # no reply ever comes, as after kill -9
        return 0.0

    fed, store, grid = run_federation(tmp_path / "run", cfg, keys_dir=keys, delays={"proxy-4": killed})
    sent = [(m.metadata.message_type, m.metadata.dst_node_id) for m in grid.sent]
    assert (wire.COMMIT, 4) in sent if dies_at == "after-commit" else (wire.VALIDATE, 4) in sent
    assert sum(t == wire.COMMIT for t, _ in sent) == (4 if dies_at == "after-commit" else 3)
    rounds = store.rounds("r1")
    assert [r["participants"] for r in rounds] == [3]
    events = store.events("r1")
    assert not [e for e in events if e["kind"] in ("round_skipped", "refused")], events
    assert any(e["kind"] == "dropout" and "proxy-4" in e["message"] for e in events)
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
    ([], "replicated-sharing", 4),
    (["--proxies", "3"], "secret-sharing", 3),
    (["--secure", "secret-sharing"], "secret-sharing", 2),
    (["--proxies", "2"], "secret-sharing", 2),
    (["--secure", "ckks"], "ckks", 2),
])
def test_demo_default_tolerates_one_dead_proxy(tmp_path, monkeypatch, argv, secure, n_proxies):
    """`fedveil demo` without a config runs replicated-sharing over 4 proxies (quorum 3, its own orgs opt in to
    it); an explicit --secure secret-sharing, or --proxies 2 or 3, keeps secret-sharing."""
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


# ---- the quorum commit: proxies agree on the client set without trusting the server -------------
QORGS = ("org-a", "org-b", "org-c")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """The real key ceremony (one directory per role) for 4 proxies and one organization whose keyring
    stands for every client; plus proxy-5, provisioned in another federation (a non-peer)."""
    from fedveil.platform.provision import init_federation_keys, load_client_keyring_dir

    root = tmp_path_factory.mktemp("quorum")
    init_federation_keys(root / "keys", PROXIES4, ["org-a"], ckks=False)
    init_federation_keys(root / "other", ["proxy-5"], ["org-z"], ckks=False)
    return root, load_client_keyring_dir(root / "keys" / "org-a")


def _identity(root, work, name):
    from fedveil.aggregator.proxy import ProxyIdentity

    keys = root / ("other" if name == "proxy-5" else "keys") / name
    return ProxyIdentity(name=name, workdir=work / name, keys_dir=str(keys))


def _keyring(root, name):
    from fedveil.aggregator.proxy import proxy_keyring

    return proxy_keyring(_identity(root, root, name))


def _sealed(ck, vectors, task="task-1"):
    mode = ReplicatedSharingMode()
    return protect_all(mode, vectors, ck, binding(16, task), PROXIES4)


def _commit(ident, clients, task="task-1"):
    from fedveil.aggregator.proxy import commit

    return commit(ident, run_id="run", task_id=task, mode="replicated-sharing", proxies=PROXIES4, clients=clients)


def _release(ident, payloads, tags, task="task-1"):
    """The aggregate request as the server sends it: every tag it chooses to forward, as hex, in the task."""
    from fedveil.aggregator.proxy import aggregate_task

    request = {"run_id": "run", "task_id": task, "mode": "replicated-sharing", "length": 16, "min_aggregate": 2,
               "quorum_tags": {ident.name: tags}}
    return aggregate_task(ident, request, payloads)


def _addressed(tags_by_issuer, recipient):
    """What the server forwards to `recipient`: each issuer's tag addressed to it."""
    return {issuer: tags[recipient] for issuer, tags in tags_by_issuer.items() if recipient in tags}


def test_quorum_size_makes_two_quorums_share_two_proxies():
    from fedveil.secure.quorum import quorum_size

    assert [quorum_size(k) for k in (3, 4, 5, 6, 7)] == [3, 3, 4, 4, 5]
    for k in range(2, 40):
        q = quorum_size(k)
        assert q <= k and 2 * q - k >= 2 and 2 * (q - 1) - k < 2, k  # the smallest such q
    assert ReplicatedSharingMode().quorum_size(4) == 3 and ReplicatedSharingMode.needs_quorum


@pytest.mark.parametrize("dead", [None, "before-commit", "after-commit"])
def test_honest_round_with_four_proxies_commits_and_releases(bundles, tmp_path, dead):
    """Honest path, k=4: every live proxy commits, gets its peers' tags through the server, and releases.
    proxy-4 dead before the commit: the other 3 are the quorum; dead after: its tags were already issued."""
    root, ck = bundles
    vectors = updates(3, 16)
    vectors = {c: v for c, v in zip(QORGS, vectors.values())}
    payloads = _sealed(ck, vectors)
    committing = PROXIES4 if dead != "before-commit" else PROXIES
    tags = {p: _commit(_identity(root, tmp_path, p), list(QORGS)) for p in committing}
    assert set(tags["proxy-1"]) == {"proxy-2", "proxy-3", "proxy-4"}
    releasing = PROXIES if dead else PROXIES4
    partials = {p: _release(_identity(root, tmp_path, p), payloads[p], _addressed(tags, p)).partial for p in releasing}
    expected = np.sum(list(vectors.values()), axis=0)
    for pair in (("proxy-1", "proxy-2"), ("proxy-2", "proxy-3")):
        total = ReplicatedSharingMode().finish([partials[p] for p in pair], 16, ServerKeyring())
        assert np.max(np.abs(total - expected)) < 1e-5


def test_server_and_one_colluding_proxy_cannot_release_two_sets(bundles, tmp_path):
    """The former known limit, now refused. The share proxy-1 lacks is held by proxy-2, -3 and -4. The server
    colludes with proxy-1 (which holds all of the victim's other shares and makes any tag it likes) and wants
    proxy-2 to release S and proxy-3 to release S minus the victim: the difference is the victim's lacked
    share. proxy-4, honest, commits once, so S minus the victim never gathers a quorum of 3."""
    from fedveil.secure import quorum

    root, ck = bundles
    vectors = {c: v for c, v in zip(QORGS, updates(3, 16).values())}
    payloads = _sealed(ck, vectors)
    victim, full, fewer = "org-c", list(QORGS), ["org-a", "org-b"]
    ids = {p: _identity(root, tmp_path, p) for p in PROXIES4}
    colluder = _keyring(root, "proxy-1")  # exactly what proxy-1 holds: its private key and the manifest
    forged = {st: quorum.commit_tags(colluder, quorum.statement("run", "task-1", PROXIES4, clients))
              for st, clients in (("full", full), ("fewer", fewer))}
    # the server commits proxy-2 and proxy-4 to S, proxy-3 to S minus the victim
    tags_full = {"proxy-2": _commit(ids["proxy-2"], full), "proxy-4": _commit(ids["proxy-4"], full)}
    tags_fewer = {"proxy-3": _commit(ids["proxy-3"], fewer)}
    # proxy-4 refuses to commit the second set, and the task's updates cannot move to another aggregate
    with pytest.raises(AggregationRefused, match="already committed to another client set"):
        _commit(ids["proxy-4"], fewer)
    from fedveil.aggregator.proxy import commit

    with pytest.raises(AggregationRefused, match="already committed to aggregate task-1"):
        commit(ids["proxy-4"], run_id="run", task_id="task-1b", mode="replicated-sharing", proxies=PROXIES4,
               clients=fewer, task_ids={c: "task-1" for c in fewer})
    # proxy-3 gets every tag the server holds or can make: proxy-1's forgery over S minus the victim, and the
    # honest tags over S (addressed to proxy-3, and, relabelled, those addressed to others)
    offered = {"proxy-1": forged["fewer"]["proxy-3"], "proxy-2": bytes.fromhex(tags_full["proxy-2"]["proxy-3"]),
               "proxy-4": bytes.fromhex(tags_full["proxy-4"]["proxy-3"])}
    for relabelled in (offered, {**offered, "proxy-4": bytes.fromhex(tags_full["proxy-4"]["proxy-2"])},
                       {**offered, "proxy-2": bytes.fromhex(tags_fewer["proxy-3"]["proxy-2"])}):
        with pytest.raises(AggregationRefused, match="fewer than the 2 a quorum of 3"):
            _release(ids["proxy-3"], {c: payloads["proxy-3"][c] for c in fewer},
                     {k: v.hex() for k, v in relabelled.items()})
    # asking proxy-3 for S instead does not match what it committed to
    with pytest.raises(AggregationRefused, match="committed task task-1 to"):
        _release(ids["proxy-3"], payloads["proxy-3"], {k: v.hex() for k, v in offered.items()})
    # S itself has a real quorum (proxy-1, -2, -4) and is released; with it alone nothing isolates the victim
    p2 = _release(ids["proxy-2"], payloads["proxy-2"],
                  {"proxy-1": forged["full"]["proxy-2"].hex(), "proxy-4": tags_full["proxy-4"]["proxy-2"]})
    assert p2.included == full
    assert decode_partial(p2.partial).clients == tuple(full)


def test_a_commit_is_once_per_task_and_repeatable(bundles, tmp_path):
    """A resent commit of the same set gets the same tags; another set for the task is refused, durably
    (a fresh process reads the SQLite record)."""
    root, _ = bundles
    ident = _identity(root, tmp_path, "proxy-2")
    first = _commit(ident, list(QORGS))
    assert _commit(ident, list(reversed(QORGS))) == first
    for other in (["org-a", "org-b"], [*QORGS, "org-d"]):
        with pytest.raises(AggregationRefused, match="commits once per task"):
            _commit(ident, other)
    with pytest.raises(AggregationRefused, match="aggregates at least 2"):
        _commit(_identity(root, tmp_path, "proxy-3"), ["org-a"])


def test_tags_from_a_non_peer_over_another_task_or_reflected_are_refused(bundles, tmp_path):
    """proxy-2 committed task-1 to S. Offered: proxy-5's tag (provisioned elsewhere, not a peer), honest tags
    over the same set for task-2, a tag under an unknown name, proxy-2's own tag reflected back as a peer's,
    and garbage: none counts, nothing is released, and the honest tags still release afterwards."""
    from fedveil.secure import quorum

    root, ck = bundles
    payloads = _sealed(ck, {c: v for c, v in zip(QORGS, updates(3, 16).values())})
    ids = {p: _identity(root, tmp_path, p) for p in PROXIES4}
    mine = _commit(ids["proxy-2"], list(QORGS))
    other_task = {p: _commit(ids[p], list(QORGS), task="task-2") for p in ("proxy-1", "proxy-3")}
    outsider = quorum.ProxyKeyring(
        "proxy-5", _keyring(root, "proxy-5").private_key,
        peer_public_keys={"proxy-2": _keyring(root, "proxy-1").peer_public_keys["proxy-2"]})
    committed = quorum.statement("run", "task-1", PROXIES4, list(QORGS))
    bad_offers = [
        {"proxy-5": quorum.tag(outsider, "proxy-2", committed).hex(), "proxy-1": other_task["proxy-1"]["proxy-2"]},
        _addressed(other_task, "proxy-2"),
        {"proxy-9": "00" * 32, "proxy-1": "zz", "proxy-3": mine["proxy-3"]},
    ]
    for offer in bad_offers:
        with pytest.raises(AggregationRefused, match="fewer than the 2") as exc:
            _release(ids["proxy-2"], payloads["proxy-2"], offer)
    assert "not a peer" in str(exc.value)
    honest = {p: _commit(ids[p], list(QORGS)) for p in ("proxy-1", "proxy-3")}
    assert _release(ids["proxy-2"], payloads["proxy-2"], _addressed(honest, "proxy-2")).included == list(QORGS)


def test_an_uncommitted_task_or_a_changed_member_is_not_released(bundles, tmp_path):
    """The release must be exactly the committed statement: no commit, a missing member (a dropped payload),
    or a staleness the commit did not name, and nothing is released."""
    root, ck = bundles
    payloads = _sealed(ck, {c: v for c, v in zip(QORGS, updates(3, 16).values())})
    ids = {p: _identity(root, tmp_path, p) for p in PROXIES4}
    with pytest.raises(AggregationRefused, match="never committed"):
        _release(ids["proxy-1"], payloads["proxy-1"], {})
    tags = {p: _commit(ids[p], list(QORGS)) for p in PROXIES4}
    with pytest.raises(AggregationRefused, match="committed task task-1 to"):
        _release(ids["proxy-1"], {c: payloads["proxy-1"][c] for c in QORGS[:2]}, _addressed(tags, "proxy-1"))
    # tags bind each member's staleness: sets that differ only in one weight isolate a client as well
    from fedveil.secure import quorum

    keyrings = {p: _keyring(root, p) for p in ("proxy-1", "proxy-2", "proxy-3")}
    fresh = quorum.statement("run", "task-9", PROXIES4, list(QORGS), staleness={c: 0 for c in QORGS})
    shifted = quorum.statement("run", "task-9", PROXIES4, list(QORGS), staleness={**{c: 0 for c in QORGS}, "org-c": 3})
    offered = {p: quorum.tag(keyrings[p], "proxy-1", fresh) for p in ("proxy-2", "proxy-3")}
    assert quorum.check_quorum(keyrings["proxy-1"], fresh, offered) == ["proxy-2", "proxy-3"]
    with pytest.raises(SecurityError, match="fewer than the 2"):
        quorum.check_quorum(keyrings["proxy-1"], shifted, offered)
    # a tampered payload inside the committed set: the proxy releases no subset
    broken = dict(payloads["proxy-1"], **{"org-b": payloads["proxy-1"]["org-b"][:-1] + b"\0"})
    with pytest.raises(AggregationRefused, match="a subset is not released"):
        _release(ids["proxy-1"], broken, _addressed(tags, "proxy-1"))
