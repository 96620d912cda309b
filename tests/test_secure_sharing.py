"""secret-sharing mode: exact reconstruction, guards, rejection paths."""

from dataclasses import replace

import numpy as np
import pytest

from fedveil.platform.errors import SecurityError
from fedveil.secure.envelope import MemoryReplayGuard, generate_x25519_keypair
from fedveil.secure.modes import AggregationRefused, Binding, ClientKeyring, ProxyKeyring, ServerKeyring, get_mode
from fedveil.secure.sharing import SecretSharingMode, common_clients, partial_clients

PROXIES = ["proxy-a", "proxy-b", "proxy-c"]


@pytest.fixture(scope="module")
def fed():
    pairs = {p: generate_x25519_keypair() for p in PROXIES}
    ck = ClientKeyring(proxy_public_keys={p: pk for p, (sk, pk) in pairs.items()})
    pks = {p: ProxyKeyring(proxy_id=p, private_key=sk) for p, (sk, pk) in pairs.items()}
    return ck, pks


def binding(length, task="task-1"):
    return Binding(run_id="run", task_id=task, client_id="", proxy_id="", mode="secret-sharing", length=length)


def protect_all(mode, vectors, ck, b):
    out = {p: {} for p in PROXIES}
    for cid, v in vectors.items():
        for p, blob in mode.protect(v, PROXIES, replace(b, client_id=cid), ck).items():
            out[p][cid] = blob
    return out


def test_registered():
    assert isinstance(get_mode("secret-sharing"), SecretSharingMode)


def test_100_clients_weighted_sum_exact(fed):
    """100 clients, Δ in [-1,1], weighted by n_i in [100, 999]; total error <= 1e-6 (here ~1e-5 * n => we check abs)."""
    ck, pks = fed
    mode = SecretSharingMode()
    rng = np.random.default_rng(1)
    L = 2000
    n = rng.integers(100, 1000, size=100)
    vectors = {f"org-{i:03d}": rng.uniform(-1, 1, L) * n[i] for i in range(100)}
    b = binding(L)
    payloads = protect_all(mode, vectors, ck, b)
    partials = [mode.combine(payloads[p], b, pks[p], min_aggregate=10).partial for p in PROXIES]
    total = mode.finish(partials, L, ServerKeyring())
    expected = np.sum(list(vectors.values()), axis=0)
    assert np.max(np.abs(total - expected)) <= 1e-6 * 10  # 100 roundings of 2^-25 each, worst case 3e-6
    assert np.max(np.abs(total - expected)) / np.max(np.abs(expected)) < 1e-10
    # the mean update (what the server applies) is within 1e-6
    assert np.max(np.abs(total / n.sum() - expected / n.sum())) <= 1e-6


def test_staleness_weights(fed):
    ck, pks = fed
    mode = SecretSharingMode()
    rng = np.random.default_rng(2)
    L = 500
    vectors = {f"c{i}": rng.uniform(-1, 1, L) * 200 for i in range(5)}
    w = {f"c{i}": 1.0 / (1 + i) ** 0.5 for i in range(5)}
    b = binding(L)
    payloads = protect_all(mode, vectors, ck, b)
    partials = [mode.combine(payloads[p], b, pks[p], 3, weights=w).partial for p in PROXIES]
    total = mode.finish(partials, L, ServerKeyring())
    q = mode.weight_bits
    expected = sum(round(w[c] * 2**q) / 2**q * v for c, v in vectors.items())
    assert np.max(np.abs(total - expected)) < 1e-5
    exact = sum(w[c] * v for c, v in vectors.items())
    assert np.max(np.abs(total - exact)) < 5e-3  # weight quantization 2^-17 relative


def test_payload_sizes(fed):
    ck, _ = fed
    mode = SecretSharingMode()
    L = 10_000
    blobs = mode.protect(np.zeros(L), PROXIES, replace(binding(L), client_id="x"), ck)
    sizes = sorted(len(b) for b in blobs.values())
    assert sizes[-1] < 8 * L + 200 and sizes[0] < 200


def test_needs_two_proxies(fed):
    ck, _ = fed
    mode = SecretSharingMode()
    with pytest.raises(ValueError, match="at least 2 proxies"):
        mode.protect(np.zeros(3), ["proxy-a"], replace(binding(3), client_id="x"), ck)
    with pytest.raises(ValueError):
        mode.assign(["a", "b"], ["proxy-a"], 2)
    assert mode.assign(["b", "a"], PROXIES, 2) == {"a": sorted(PROXIES), "b": sorted(PROXIES)}


def test_missing_keys_says_keys_init(fed):
    mode = SecretSharingMode()
    with pytest.raises(SecurityError, match="fedveil keys init"):
        mode.protect(np.zeros(3), PROXIES, replace(binding(3), client_id="x"), ClientKeyring())
    with pytest.raises(SecurityError, match="fedveil keys init"):
        mode.combine({}, binding(3), ProxyKeyring(proxy_id="proxy-a"), 2)


def test_rejections_do_not_fail_combine(fed):
    ck, pks = fed
    mode = SecretSharingMode()
    L = 50
    b = binding(L)
    vectors = {f"c{i}": np.ones(L) for i in range(4)}
    payloads = protect_all(mode, vectors, ck, b)["proxy-a"]
    guard = MemoryReplayGuard()
    tampered = bytearray(payloads["c1"])
    tampered[-1] ^= 1
    payloads = dict(payloads)
    payloads["c1"] = bytes(tampered)
    payloads["c2"] = payloads["c3"]  # c3's envelope relabelled as c2: bound to c3, rejected
    wrong_len = mode.protect(np.ones(L + 1), PROXIES, replace(binding(L + 1), client_id="c4"), ck)["proxy-a"]
    payloads["c4"] = wrong_len  # bound to another length
    res = mode.combine(payloads, b, pks["proxy-a"], 2, replay_guard=guard)
    assert res.included == ["c0", "c3"]
    assert set(res.rejected) == {"c1", "c2", "c4"}
    assert "tampered" in res.rejected["c1"]
    # replay of the same envelopes: all rejected -> refused
    with pytest.raises(AggregationRefused):
        mode.combine({"c0": payloads["c0"], "c3": payloads["c3"]}, b, pks["proxy-a"], 2, replay_guard=guard)


def test_wrong_length_inside_valid_envelope(fed):
    """A payload honestly sealed for length L but carrying a share of another length is rejected."""
    ck, pks = fed
    from fedveil.secure.envelope import seal
    from fedveil.secure.sharing import _SHARE_HDR, _SHARE_MAGIC, _KIND_SHARE

    mode = SecretSharingMode()
    b = replace(binding(10), client_id="c9", proxy_id="proxy-a")
    body = _SHARE_HDR.pack(_SHARE_MAGIC, _KIND_SHARE, 10) + bytes(8 * 9)
    blob = seal(body, ck.proxy_public_keys["proxy-a"], b)
    bad = mode.validate({"c9": blob}, binding(10), pks["proxy-a"])
    assert "wrong length" in bad["c9"]


def test_inconsistent_client_sets_refused_and_validate_flow(fed):
    ck, pks = fed
    mode = SecretSharingMode()
    L = 20
    b = binding(L)
    vectors = {f"c{i}": np.full(L, float(i)) for i in range(4)}
    payloads = protect_all(mode, vectors, ck, b)
    broken = bytearray(payloads["proxy-b"]["c0"])
    broken[50] ^= 1
    payloads["proxy-b"]["c0"] = bytes(broken)
    partials = [mode.combine(payloads[p], b, pks[p], 2).partial for p in PROXIES]
    with pytest.raises(ValueError, match="different client sets"):
        mode.finish(partials, L, ServerKeyring())
    # the right flow: validate everywhere, combine the intersection once
    valid = [sorted(set(payloads[p]) - set(mode.validate(payloads[p], b, pks[p]))) for p in PROXIES]
    keep = common_clients(valid)
    assert keep == ["c1", "c2", "c3"]
    b2 = replace(b, task_id="task-1")
    partials = [mode.combine({c: payloads[p][c] for c in keep}, b2, pks[p], 2).partial for p in PROXIES]
    assert all(partial_clients(x) == keep for x in partials)
    np.testing.assert_allclose(mode.finish(partials, L, ServerKeyring()), np.full(L, 6.0))


def test_finish_refuses_below_min_aggregate(fed):
    ck, pks = fed
    mode = SecretSharingMode(min_aggregate=3)
    L = 5
    b = binding(L)
    payloads = protect_all(mode, {"a": np.ones(L), "b": np.ones(L)}, ck, b)
    partials = [mode.combine(payloads[p], b, pks[p], 2).partial for p in PROXIES]
    with pytest.raises(AggregationRefused):
        mode.finish(partials, L, ServerKeyring())


def test_overflow_refused_when_clip_configured(fed):
    ck, pks = fed
    mode = SecretSharingMode(frac_bits=40, clip=1000.0)
    L = 4
    b = binding(L)
    payloads = protect_all(mode, {f"c{i}": np.ones(L) for i in range(3)}, ck, b)
    with pytest.raises(ValueError, match="secure.frac_bits"):
        mode.combine(payloads["proxy-a"], b, pks["proxy-a"], 2, weights={"c0": 1.0, "c1": 1.0, "c2": 1.0})
