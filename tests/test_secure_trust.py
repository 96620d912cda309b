"""Trust-model tests: each party plays its role and fails to see what it must not (DESIGN §2)."""

from dataclasses import replace

import numpy as np
import pytest

from fedveil.platform.errors import SecurityError
from fedveil.secure import fixedpoint
from fedveil.secure.ckks import CKKSMode, make_ckks_context
from fedveil.secure.envelope import generate_x25519_keypair, open_envelope
from fedveil.secure.modes import AggregationRefused, Binding, ClientKeyring, ProxyKeyring, ServerKeyring
from fedveil.secure.sharing import SecretSharingMode, _SHARE_HDR, prg_share

PROXIES = ["proxy-a", "proxy-b"]


@pytest.fixture(scope="module")
def keys():
    pairs = {p: generate_x25519_keypair() for p in PROXIES}
    secret, public = make_ckks_context(4096, [60, 49], 40)
    ck = ClientKeyring({p: pk for p, (sk, pk) in pairs.items()}, public)
    pks = {p: ProxyKeyring(p, sk, public) for p, (sk, pk) in pairs.items()}
    return ck, pks, secret, public


def B(length, cid="org-a", task="t1", mode="secret-sharing"):
    return Binding("run", task, cid, "", mode, length)


def proxy_view(mode, vector, ck, pk, b):
    """Everything proxy `pk` can compute from the payload addressed to it: its share as uint64."""
    blob = mode.protect(vector, PROXIES, b, ck)[pk.proxy_id]
    data = open_envelope(blob, pk.private_key, replace(b, proxy_id=pk.proxy_id))
    body = data[_SHARE_HDR.size :]
    return prg_share(body, b.length) if len(body) == 32 else np.frombuffer(body, dtype="<u8").astype(np.uint64)


@pytest.mark.parametrize("proxy", PROXIES)
def test_sharing_proxy_share_is_uniform_and_independent_of_update(keys, proxy):
    ck, pks, _, _ = keys
    mode = SecretSharingMode()
    L = 20_000
    zeros, big = np.zeros(L), np.full(L, 123.456)
    s0 = proxy_view(mode, zeros, ck, pks[proxy], B(L))
    s1 = proxy_view(mode, big, ck, pks[proxy], B(L))
    for s in (s0, s1):
        # uniform over Z_2^64: each of the top-byte values appears ~L/256 times; mean of bits ~0.5
        counts = np.bincount((s >> np.uint64(56)).astype(np.int64), minlength=256)
        chi2 = float(np.sum((counts - L / 256) ** 2 / (L / 256)))
        assert chi2 < 400  # 255 dof: mean 255, sd ~22.6
        bits = np.unpackbits(s.view(np.uint8)).mean()
        assert abs(bits - 0.5) < 0.01
    # the share of a constant update is not constant, and the two shares are not distinguishable by their mean
    assert len(np.unique(s1)) > L * 0.99
    assert abs(float(np.mean(s0 >> np.uint64(32))) - float(np.mean(s1 >> np.uint64(32)))) < 2**32 * 0.02
    # decoding a single share gives garbage far from the update
    dec = fixedpoint.decode(s1, mode.frac_bits)
    assert np.median(np.abs(dec - 123.456)) > 1e9


def test_sharing_proxy_cannot_open_the_other_proxys_payload(keys):
    ck, pks, _, _ = keys
    mode = SecretSharingMode()
    b = B(10)
    blobs = mode.protect(np.ones(10), PROXIES, b, ck)
    with pytest.raises(SecurityError):
        open_envelope(blobs["proxy-b"], pks["proxy-a"].private_key, replace(b, proxy_id="proxy-b"))


def test_server_view_cannot_be_opened_without_proxy_key(keys):
    """The server forwards sealed envelopes; with any key it holds (not a proxy's) opening fails."""
    ck, _, _, _ = keys
    server_sk, _ = generate_x25519_keypair()
    for mode, m in ((SecretSharingMode(), "secret-sharing"), (CKKSMode(), "ckks")):
        b = B(8, mode=m)
        proxies = PROXIES if m == "secret-sharing" else ["proxy-a"]
        for p, blob in mode.protect(np.full(8, 7.0), proxies, b, ck).items():
            assert np.full(8, 7.0).tobytes() not in blob
            with pytest.raises(SecurityError):
                open_envelope(blob, server_sk, replace(b, proxy_id=p))


def test_proxy_refuses_single_client(keys):
    ck, pks, _, _ = keys
    for mode, m, proxies in ((SecretSharingMode(), "secret-sharing", PROXIES), (CKKSMode(), "ckks", ["proxy-a"])):
        b = B(4, mode=m)
        blob = mode.protect(np.ones(4), proxies, b, ck)["proxy-a"]
        with pytest.raises(AggregationRefused):
            mode.combine({"org-a": blob}, replace(b, client_id=""), pks["proxy-a"], min_aggregate=2)


def test_proxy_refuses_duplicate_client_padding(keys):
    """A server cannot pad a group with copies of one client's envelope: replays and relabels are rejected."""
    from fedveil.secure.envelope import MemoryReplayGuard

    ck, pks, _, _ = keys
    mode = CKKSMode()
    b = B(4, mode="ckks")
    blob = mode.protect(np.ones(4), ["proxy-a"], b, ck)["proxy-a"]
    with pytest.raises(AggregationRefused):
        mode.combine({"org-a": blob, "org-b": blob}, replace(b, client_id=""), pks["proxy-a"], 2, replay_guard=MemoryReplayGuard())


def test_ckks_public_context_cannot_decrypt(keys):
    import tenseal as ts

    ck, pks, secret, public = keys
    ctx = ts.context_from(public)
    assert not ctx.has_secret_key()
    vec = ts.ckks_vector(ctx, [1.0, 2.0])
    with pytest.raises(ValueError):
        vec.decrypt()
    # and the mode's server side refuses to work with a public context
    mode = CKKSMode()
    b = B(4, mode="ckks")
    payloads = {c: mode.protect(np.ones(4), ["proxy-a"], replace(b, client_id=c), ck)["proxy-a"] for c in ("x", "y")}
    res = mode.combine(payloads, replace(b, client_id=""), pks["proxy-a"], 2)
    with pytest.raises(SecurityError, match="public context cannot decrypt"):
        mode.finish([res.partial], 4, ServerKeyring(public))
    np.testing.assert_allclose(mode.finish([res.partial], 4, ServerKeyring(secret)), np.full(4, 2.0), atol=1e-7)


def test_server_never_decrypts_partial_below_min_aggregate(keys, monkeypatch):
    ck, pks, secret, _ = keys
    mode = CKKSMode(min_aggregate=3)
    b = B(4, mode="ckks")
    payloads = {c: mode.protect(np.ones(4), ["proxy-a"], replace(b, client_id=c), ck)["proxy-a"] for c in ("x", "y")}
    small = mode.combine(payloads, replace(b, client_id=""), pks["proxy-a"], 2).partial  # a proxy with floor 2
    payloads3 = {c: mode.protect(np.ones(4), ["proxy-b"], replace(b, client_id=c), ck)["proxy-b"] for c in ("u", "v", "w")}
    big = mode.combine(payloads3, replace(b, client_id=""), pks["proxy-b"], 3).partial
    import fedveil.secure.ckks as ckks_mod

    calls = []
    orig = ckks_mod._Runtime.decrypt_reals
    monkeypatch.setattr(ckks_mod._Runtime, "decrypt_reals", lambda self, ct: calls.append(1) or orig(self, ct))
    with pytest.raises(AggregationRefused, match="refuses to decrypt"):
        mode.finish([small], 4, ServerKeyring(secret))
    with pytest.raises(AggregationRefused):  # even combined with a large partial, a small one is never decrypted into a total
        mode.finish([big, small], 4, ServerKeyring(secret))
    assert calls == []
    np.testing.assert_allclose(mode.finish([big], 4, ServerKeyring(secret)), np.full(4, 3.0), atol=1e-7)
    assert calls


# ---- a deviating server against the proxies (issue 8 defects 1 and 3) -------------------------------
# Each test plays the server with exactly what it holds: the honest clients' sealed payloads and the
# aggregate task dict it sends (`aggregate_task` is what the proxy's `aggregate` handler runs on it).
ORGS = ("org-a", "org-b", "org-c", "org-d")
RUN = "run-x"


@pytest.fixture(scope="module")
def fed_keys(tmp_path_factory):
    from fedveil.platform.provision import init_federation_keys

    return init_federation_keys(tmp_path_factory.mktemp("keys"), ["proxy-1", "proxy-2"], list(ORGS))


def own_config(secure, mode="async", **overrides):
    from fedveil.platform import config as config_mod

    values = {"federation.secure": secure, "federation.mode": mode, "async.staleness": "polynomial",
              "async.staleness_exponent": 0.5, "async.max_staleness": 10, "secure.max_clients": 8}
    if mode == "semi-sync":
        values["federation.late_replies"] = "carry"
    values.update(overrides)
    return config_mod.with_overrides(config_mod.FedveilConfig(), values)


def make_proxy(tmp_path, fed_keys, name, cfg):
    """A proxy with its own config file, keys and work dir, as `fedveil proxy --config` starts it."""
    from fedveil.aggregator.proxy import ProxyIdentity
    from fedveil.platform.federation import write_config

    path = write_config(cfg, tmp_path / name / "federation.toml")
    return ProxyIdentity(name=name, workdir=tmp_path / name, keys_dir=str(fed_keys / name), min_aggregate=2,
                         config=str(path))


def client_payloads(cfg, fed_keys, org, vector, task_id, proxies):
    """What an honest organization sends for one train task: {proxy: sealed payload}."""
    from fedveil.platform.provision import load_client_keyring_dir
    from fedveil.secure.modes import get_mode

    mode = get_mode(cfg.federation.secure, **cfg.secure_options())
    b = Binding(RUN, task_id, org, "", cfg.federation.secure, vector.size)
    return mode.protect(vector, proxies, b, load_client_keyring_dir(fed_keys / org))


def server_task(cfg, aggregate_id, length, **extra):
    return {"run_id": RUN, "task_id": aggregate_id, "mode": cfg.federation.secure, "length": length,
            "min_aggregate": 2, "options": cfg.secure_options(), **extra}


def proxies_for(secure):
    return ["proxy-1", "proxy-2"] if secure == "secret-sharing" else ["proxy-1"]


def finish(cfg, fed_keys, partials, length):
    from fedveil.platform.provision import load_server_keyring_dir
    from fedveil.secure.modes import get_mode

    return get_mode(cfg.federation.secure, **cfg.secure_options()).finish(
        partials, length, load_server_keyring_dir(fed_keys / "server"))


VICTIM = np.array([3.0, -1.5, 0.25, 8.0])
OTHER = np.array([-2.0, 4.0, 1.0, -6.0])


@pytest.mark.parametrize("secure", ["secret-sharing", "ckks"])
def test_server_chosen_weights_are_refused_and_staleness_weights_keep_the_floor(tmp_path, fed_keys, secure):
    """Defect 1: weights {victim: 1, other: 0} (or 2^-16, or 1e-9 in ckks) used to make an 'aggregate of
    two' equal the victim's update. A proxy now refuses any weight from the server; from staleness it
    computes alpha itself, refuses s beyond async.max_staleness, so the other client keeps >= the floor."""
    from fedveil.aggregator.proxy import aggregate_task, validate_task
    from fedveil.secure.modes import applied_weight, get_mode
    from fedveil.secure.staleness import weight_floor

    cfg = own_config(secure)
    ps = proxies_for(secure)
    proxies = {p: make_proxy(tmp_path, fed_keys, p, cfg) for p in ps}
    L = VICTIM.size
    task_ids = {org: f"{RUN}:async-{i}" for i, org in enumerate(("org-a", "org-b"))}
    sent = {org: client_payloads(cfg, fed_keys, org, v, task_ids[org], ps) for org, v in (("org-a", VICTIM), ("org-b", OTHER))}

    def payloads(p):
        return {org: blobs[p] for org, blobs in sent.items()}

    for weights in ({"org-a": 1.0, "org-b": 0.0}, {"org-a": 1.0, "org-b": 2.0**-16}, {"org-a": 1.0, "org-b": 1e-9}):
        task = server_task(cfg, f"{RUN}:aggregate-w", L, task_ids=task_ids, weights=weights)
        for p in ps:
            with pytest.raises(AggregationRefused, match="never takes from the server"):
                aggregate_task(proxies[p], task, payloads(p))
    # staleness the proxy's own config does not allow is refused per client, with the reason
    for s, reason in ((11, "exceeds async.max_staleness=10"), (-3, "negative"), (2.5, "not a whole number")):
        task = server_task(cfg, f"{RUN}:aggregate-s{s}", L, task_ids=task_ids, staleness={"org-a": 0, "org-b": s})
        assert reason in validate_task(proxies[ps[0]], task, payloads(ps[0]))[0]["org-b"]
    task = server_task(cfg, f"{RUN}:aggregate-s", L, task_ids=task_ids, staleness={"org-a": 0, "org-b": 11})
    with pytest.raises(AggregationRefused, match="exceeds async.max_staleness=10"):  # alone, org-a is never combined
        aggregate_task(proxies[ps[0]], task, payloads(ps[0]))
    sent = {org: client_payloads(cfg, fed_keys, org, v, task_ids[org], ps) for org, v in (("org-a", VICTIM), ("org-b", OTHER))}
    # the most the server can do: the other client at max_staleness, weighted by the floor alpha(10); options
    # that would round that weight to 0 (a 2^0 weight grid) are ignored: a proxy encodes by its own config
    task = server_task(cfg, f"{RUN}:aggregate-1", L, task_ids=task_ids, staleness={"org-a": 0, "org-b": 10})
    task["options"] = {"weight_bits": 0, "spare_levels": 0, "max_clients": 1000}
    results = [aggregate_task(proxies[p], task, payloads(p)) for p in ps]
    assert all(r.included == ["org-a", "org-b"] for r in results)
    total = finish(cfg, fed_keys, [r.partial for r in results], L)
    floor = applied_weight(get_mode(secure, **cfg.secure_options()), weight_floor(cfg.async_))
    assert floor == pytest.approx(11 ** -0.5, abs=2**-16)
    np.testing.assert_allclose(total, VICTIM + floor * OTHER, atol=1e-6)
    assert np.min(np.abs(total - VICTIM)) > 0.25 * np.min(np.abs(OTHER))  # never the victim's update alone


@pytest.mark.parametrize("secure", ["none", "secret-sharing", "ckks"])
def test_a_sync_round_carries_no_weights(tmp_path, fed_keys, secure):
    """A proxy whose own config runs sync rounds refuses a task with weights or staleness; the honest
    task (neither) gives the plain sum."""
    from fedveil.aggregator.proxy import aggregate_task, validate_task

    cfg = own_config(secure, mode="sync")
    ps = proxies_for(secure)
    proxies = {p: make_proxy(tmp_path, fed_keys, p, cfg) for p in ps}
    L = VICTIM.size
    task_id = f"{RUN}:round-1"
    sent = {org: client_payloads(cfg, fed_keys, org, v, task_id, ps) for org, v in (("org-a", VICTIM), ("org-b", OTHER))}
    payloads = {p: {org: blobs[p] for org, blobs in sent.items()} for p in ps}
    for bad in ({"weights": {"org-a": 1.0, "org-b": 0.0}}, {"staleness": {"org-a": 0, "org-b": 10}}):
        for p in ps:
            with pytest.raises(AggregationRefused, match="never takes from the server|carry no per-client weights"):
                validate_task(proxies[p], server_task(cfg, task_id, L, **bad), payloads[p])
            with pytest.raises(AggregationRefused, match="never takes from the server|carry no per-client weights"):
                aggregate_task(proxies[p], server_task(cfg, task_id, L, **bad), payloads[p])
    results = [aggregate_task(proxies[p], server_task(cfg, task_id, L), payloads[p]) for p in ps]
    np.testing.assert_allclose(finish(cfg, fed_keys, [r.partial for r in results], L), VICTIM + OTHER, atol=1e-6)


@pytest.mark.parametrize("secure", ["secret-sharing", "ckks"])
def test_a_client_update_enters_at_most_one_aggregate(tmp_path, fed_keys, secure):
    """Defect 3: the server resends a train task, gets a freshly sealed update of the same task from org-a
    and asks for a new aggregate id over it and fresh clients. Differencing the two aggregates would
    isolate org-a; the proxy combines each (run, train task, client) once, so org-a is refused the second
    time, and a group left below min_aggregate is refused as a whole."""
    from fedveil.aggregator.proxy import aggregate_task, validate_task

    cfg = own_config(secure, mode="sync")
    ps = proxies_for(secure)
    proxies = {p: make_proxy(tmp_path, fed_keys, p, cfg) for p in ps}
    L = VICTIM.size
    t1 = f"{RUN}:round-1"
    first = {org: client_payloads(cfg, fed_keys, org, v, t1, ps) for org, v in (("org-a", VICTIM), ("org-b", OTHER))}
    results = [aggregate_task(proxies[p], server_task(cfg, t1, L), {o: b[p] for o, b in first.items()}) for p in ps]
    np.testing.assert_allclose(finish(cfg, fed_keys, [r.partial for r in results], L), VICTIM + OTHER, atol=1e-6)

    # the same aggregate id again: refused outright
    with pytest.raises(AggregationRefused, match="already aggregated"):
        aggregate_task(proxies[ps[0]], server_task(cfg, t1, L), {o: b[ps[0]] for o, b in first.items()})
    # re-sealed updates of round 1 (new envelopes) plus a fresh client, under a new aggregate id
    resent = {org: client_payloads(cfg, fed_keys, org, v, t1, ps) for org, v in (("org-a", VICTIM), ("org-b", OTHER))}
    resent["org-c"] = client_payloads(cfg, fed_keys, "org-c", np.ones(L), t1, ps)
    resent["org-d"] = client_payloads(cfg, fed_keys, "org-d", np.full(L, 2.0), t1, ps)
    task = server_task(cfg, f"{RUN}:round-1-again", L, task_ids={o: t1 for o in resent})
    lone = {o: resent[o] for o in ("org-a", "org-c")}
    for p in ps:
        rejected = validate_task(proxies[p], task, {o: b[p] for o, b in lone.items()})[0]
        assert set(rejected) == {"org-a"} and "already combined" in rejected["org-a"]
        with pytest.raises(AggregationRefused, match="already combined"):
            aggregate_task(proxies[p], task, {o: b[p] for o, b in lone.items()})
    # with enough fresh clients the aggregate goes on without the already-combined ones (org-c re-seals: the
    # refused attempt opened its envelope, and an envelope opens once)
    resent["org-c"] = client_payloads(cfg, fed_keys, "org-c", np.ones(L), t1, ps)
    task = server_task(cfg, f"{RUN}:round-1-third", L, task_ids={o: t1 for o in resent})
    results = [aggregate_task(proxies[p], task, {o: b[p] for o, b in resent.items()}) for p in ps]
    for r in results:
        assert r.included == ["org-c", "org-d"]
        assert {"org-a", "org-b"} <= set(r.rejected) and all("already combined" in r.rejected[o] for o in ("org-a", "org-b"))
    np.testing.assert_allclose(finish(cfg, fed_keys, [r.partial for r in results], L), np.full(L, 3.0), atol=1e-6)


def test_the_proxy_node_answers_a_deviating_aggregate_task_with_refused(tmp_path):
    """Through the real ClientApp on the in-process grid: the server's Message with weights (or, in a sync
    round, staleness) gets status `refused` naming the reason; the honest Message gets the sum."""
    from flwr.app import Message, RecordDict

    from fedveil.platform import messages as wire
    from fedveil.platform.localgrid import grid_for_config

    cfg = own_config("none", mode="sync", **{"orgs": [{"name": o} for o in ORGS[:2]]})
    grid = grid_for_config(cfg, tmp_path)
    proxy_node = next(nid for nid, n in grid.nodes.items() if n.node_config["name"] == "proxy-1")
    payloads = {"101": VICTIM.astype("<f4").tobytes(), "102": OTHER.astype("<f4").tobytes()}

    def ask(aggregate_id, **extra):
        task = server_task(cfg, aggregate_id, VICTIM.size, **extra)
        msg = Message(RecordDict({"task": wire.json_record(task), "payloads": wire.blobs_record(payloads)}),
                      proxy_node, wire.AGGREGATE)
        (reply,) = grid.send_and_receive([msg], timeout=30)
        return wire.reply_status(reply.content), reply

    try:
        info, _ = ask("t-w", weights={"101": 1.0, "102": 0.0})
        assert info["status"] == wire.REFUSED and "never takes from the server" in info["message"]
        info, _ = ask("t-s", staleness={"101": 0, "102": 10})
        assert info["status"] == wire.REFUSED and "carry no per-client weights" in info["message"]
        info, reply = ask("t-ok")
        assert info["status"] == wire.OK and sorted(info["included"]) == ["101", "102"]
        total = np.frombuffer(wire.reply_blobs(reply.content)["partial"], dtype=np.float64)
        np.testing.assert_allclose(total, VICTIM + OTHER, atol=1e-6)
    finally:
        grid.shutdown()


def test_semi_sync_fresh_updates_cannot_be_down_weighted(tmp_path, fed_keys):
    """Semi-sync carry: a payload answering the round's own task is fresh, so the server cannot give it a
    staleness (only carried late updates are weighted); the honest carry round weights the late one."""
    from fedveil.aggregator.proxy import aggregate_task, validate_task

    cfg = own_config("secret-sharing", mode="semi-sync")
    ps = proxies_for("secret-sharing")
    proxies = {p: make_proxy(tmp_path, fed_keys, p, cfg) for p in ps}
    L = VICTIM.size
    now, late = f"{RUN}:round-3", f"{RUN}:round-2"
    sent = {"org-a": client_payloads(cfg, fed_keys, "org-a", VICTIM, now, ps),
            "org-b": client_payloads(cfg, fed_keys, "org-b", OTHER, now, ps),
            "org-c": client_payloads(cfg, fed_keys, "org-c", np.ones(L), late, ps)}
    task_ids = {"org-a": now, "org-b": now, "org-c": late}
    bad = server_task(cfg, now, L, task_ids=task_ids, staleness={"org-a": 0, "org-b": 10, "org-c": 1})
    for p in ps:
        rejected = validate_task(proxies[p], bad, {o: b[p] for o, b in sent.items()})[0]
        assert set(rejected) == {"org-b"} and "fresh" in rejected["org-b"]
    honest = server_task(cfg, now, L, task_ids=task_ids, staleness={"org-a": 0, "org-b": 0, "org-c": 1})
    results = [aggregate_task(proxies[p], honest, {o: b[p] for o, b in sent.items()}) for p in ps]
    assert all(r.included == ["org-a", "org-b", "org-c"] for r in results)
    total = finish(cfg, fed_keys, [r.partial for r in results], L)
    np.testing.assert_allclose(total, VICTIM + OTHER + round(2 ** -0.5 * 2**16) / 2**16, atol=1e-6)
