"""ckks mode: correctness with the default 128-bit parameters, packing, weights, rejection paths."""

from dataclasses import replace

import numpy as np
import pytest

from fedveil.secure.errors import RangeError, SecurityError
from fedveil.secure.ckks import (
    CKKSMode,
    check_params,
    effective_weight,
    make_ckks_context,
    max_total,
    partial_clients,
)
from fedveil.secure.envelope import MemoryReplayGuard, generate_x25519_keypair
from fedveil.secure.modes import AggregationRefused, Binding, ClientKeyring, ProxyKeyring, ServerKeyring, get_mode

PROXIES = ["proxy-a", "proxy-b"]


@pytest.fixture(scope="module")
def fed():
    secret, public = make_ckks_context()  # defaults: N=8192, [60,40,40,60], scale 2^40
    pairs = {p: generate_x25519_keypair() for p in PROXIES}
    ck = ClientKeyring({p: pk for p, (sk, pk) in pairs.items()}, public)
    pks = {p: ProxyKeyring(p, sk, public) for p, (sk, pk) in pairs.items()}
    return ck, pks, ServerKeyring(secret), public


def binding(length, task="t1"):
    return Binding("run", task, "", "", "ckks", length)


def run_round(mode, vectors, fed, b, min_aggregate, weights=None, guard=None):
    ck, pks, sk, _ = fed
    groups = mode.assign(list(vectors), PROXIES, min_aggregate)
    by_proxy = {}
    for cid, v in vectors.items():
        for p, blob in mode.protect(v, groups[cid], replace(b, client_id=cid), ck).items():
            by_proxy.setdefault(p, {})[cid] = blob
    results = [mode.combine(pl, b, pks[p], min_aggregate, weights=weights, replay_guard=guard) for p, pl in by_proxy.items()]
    return results, by_proxy


def test_registered():
    assert isinstance(get_mode("ckks"), CKKSMode)


def test_100_clients_weighted_by_n_exact(fed):
    """100 clients, Δ in [-1,1] weighted by n_i in [100, 999]: |total - plaintext sum| <= 1e-6."""
    mode = CKKSMode(min_aggregate=10)
    rng = np.random.default_rng(0)
    L = 3000
    n = rng.integers(100, 1000, size=100)
    vectors = {f"org-{i:03d}": rng.uniform(-1, 1, L) * n[i] for i in range(100)}
    b = binding(L)
    results, _ = run_round(mode, vectors, fed, b, 10)
    assert sorted(c for r in results for c in r.included) == sorted(vectors)
    total = mode.finish([r.partial for r in results], L, fed[2])
    expected = np.sum(list(vectors.values()), axis=0)
    assert np.max(np.abs(total - expected)) <= 1e-6


def test_packs_across_layers_and_bytes(fed):
    """A vector longer than N/2 slots (any layer size) packs into ceil(L/N) ciphertexts; <= 4x float32 bytes."""
    ck = fed[0]
    mode = CKKSMode()
    L = 8192 * 3
    blobs = mode.protect(np.linspace(-1, 1, L), ["proxy-a"], replace(binding(L), client_id="c"), ck)
    assert len(blobs["proxy-a"]) <= 4 * 4 * L
    results, _ = run_round(mode, {f"c{i}": np.linspace(-1, 1, L) * i for i in range(3)}, fed, binding(L, "t-pack"), 3)
    total = mode.finish([r.partial for r in results], L, fed[2])
    np.testing.assert_allclose(total, np.linspace(-1, 1, L) * 3, atol=1e-7)


def test_weights_quantized_at_lowest_level(fed):
    """Weights at the lowest level grow the scale by 2^8, so the range shrinks 256x: the per-client bound
    max_total / max_clients must leave room for it (max_clients 1024 for 4 clients), else finish refuses."""
    mode = CKKSMode(max_clients=1024)
    rng = np.random.default_rng(3)
    L = 1000
    vectors = {f"c{i}": rng.uniform(-1, 1, L) * 50 for i in range(4)}
    w = {f"c{i}": 1 / (1 + i) for i in range(4)}
    results, _ = run_round(mode, vectors, fed, binding(L, "tw"), 2, weights=w)
    partials = [r.partial for r in results]
    total = mode.finish(partials, L, fed[2])
    expected = sum(effective_weight(w[c], mode.weight_bits) * v for c, v in vectors.items())
    assert np.max(np.abs(total - expected)) < 1e-6
    with pytest.raises(RangeError, match="secure.max_clients"):  # the default bound cannot prove the total fits
        CKKSMode().finish(partials, L, fed[2])


def test_weights_exact_with_spare_level(fed):
    mode = CKKSMode(spare_levels=1)
    rng = np.random.default_rng(4)
    L = 1000
    vectors = {f"c{i}": rng.uniform(-1, 1, L) * 300 for i in range(4)}
    w = {f"c{i}": 1 / (1 + i) ** 0.5 for i in range(4)}
    results, _ = run_round(mode, vectors, fed, binding(L, "tw2"), 2, weights=w)
    total = mode.finish([r.partial for r in results], L, fed[2])
    expected = sum(w[c] * v for c, v in vectors.items())
    assert np.max(np.abs(total - expected)) < 1e-6


def test_equal_weights_multiply_once(fed):
    mode = CKKSMode(spare_levels=1)
    L = 100
    vectors = {f"c{i}": np.full(L, float(i)) for i in range(3)}
    results, _ = run_round(mode, vectors, fed, binding(L, "te"), 3, weights={c: 0.5 for c in vectors})
    np.testing.assert_allclose(mode.finish([r.partial for r in results], L, fed[2]), np.full(L, 1.5), atol=1e-7)


def test_rejections(fed):
    ck, pks, _, _ = fed
    mode = CKKSMode()
    L = 64
    b = binding(L, "tr")
    blobs = {f"c{i}": mode.protect(np.ones(L), ["proxy-a"], replace(b, client_id=f"c{i}"), ck)["proxy-a"] for i in range(4)}
    bad = bytearray(blobs["c1"])
    bad[100] ^= 1
    blobs["c1"] = bytes(bad)
    blobs["c2"] = mode.protect(np.ones(L + 1), ["proxy-a"], replace(binding(L + 1, "tr"), client_id="c2"), ck)["proxy-a"]
    blobs["c3"] = mode.protect(np.ones(L), ["proxy-b"], replace(b, client_id="c3"), ck)["proxy-b"]  # sealed to other proxy
    guard = MemoryReplayGuard()
    with pytest.raises(AggregationRefused):
        mode.combine(blobs, b, pks["proxy-a"], 2, replay_guard=guard)
    blobs["c4"] = mode.protect(np.ones(L), ["proxy-a"], replace(b, client_id="c4"), ck)["proxy-a"]
    guard = MemoryReplayGuard()
    res = mode.combine(blobs, b, pks["proxy-a"], 2, replay_guard=guard)
    assert res.included == ["c0", "c4"] and set(res.rejected) == {"c1", "c2", "c3"}
    with pytest.raises(AggregationRefused):  # replay of the same envelopes
        mode.combine({"c0": blobs["c0"], "c4": blobs["c4"]}, b, pks["proxy-a"], 2, replay_guard=guard)


def test_out_of_range_value_refused(fed):
    mode = CKKSMode()
    lim = max_total(fed[3])
    assert lim == 2.0**19
    with pytest.raises(RangeError, match="secure.max_clients"):
        mode.protect(np.array([lim * 2]), ["proxy-a"], replace(binding(1), client_id="c"), fed[0])


def test_total_overflow_is_refused_not_decrypted_wrong(fed):
    """Defect 6: two clients at 300,000 used to decrypt silently to -448,576 (the total wrapped mod q0).

    Each client is now bounded by max_total / secure.max_clients, a proxy combines at most max_clients
    clients, and finish refuses more: a total can no longer leave the range unnoticed.
    """
    ck, pks, sk, public = fed
    L = 4
    two = CKKSMode(max_clients=2)  # per-client bound 2^19 / 2 = 262,144
    with pytest.raises(RangeError, match=r"max_total / secure.max_clients .* 2\.62e\+05"):
        two.protect(np.full(L, 300_000.0), ["proxy-a"], replace(binding(L, "ov"), client_id="c0"), ck)
    # the honest path at the edge of the bound: 2 clients just below it decrypt exactly, near max_total
    results, _ = run_round(two, {f"c{i}": np.full(L, 262_000.0) for i in range(2)}, fed, binding(L, "ov-ok"), 2)
    np.testing.assert_allclose(two.finish([r.partial for r in results], L, sk), np.full(L, 524_000.0), atol=1e-3)
    # a proxy refuses to combine more clients than its max_clients, whatever their values
    three = {f"c{i}": two.protect(np.ones(L), ["proxy-a"], replace(binding(L, "ov3"), client_id=f"c{i}"), ck)["proxy-a"]
             for i in range(3)}
    with pytest.raises(AggregationRefused, match="secure.max_clients=2"):
        two.combine(three, binding(L, "ov3"), pks["proxy-a"], 2)
    # and the server refuses to decrypt partials holding more than max_clients clients in total
    wide = CKKSMode(max_clients=3)
    partial = wide.combine(three, binding(L, "ov3"), pks["proxy-a"], 2).partial
    with pytest.raises(RangeError, match="more than secure.max_clients=2"):
        two.finish([partial], L, sk)
    np.testing.assert_allclose(wide.finish([partial], L, sk), np.full(L, 3.0), atol=1e-6)


def test_missing_keys(fed):
    mode = CKKSMode()
    with pytest.raises(SecurityError, match="fedveil keys init"):
        mode.protect(np.ones(2), ["proxy-a"], replace(binding(2), client_id="c"), ClientKeyring(fed[0].proxy_public_keys))
    with pytest.raises(SecurityError, match="fedveil keys init"):
        mode.combine({}, binding(2), ProxyKeyring("proxy-a", None, fed[3]), 2)
    with pytest.raises(SecurityError, match="fedveil keys init"):
        mode.finish([], 2, ServerKeyring())


def test_params_below_128_bit_refused():
    with pytest.raises(ValueError, match="128-bit"):
        check_params(4096, [60, 60], 40)
    check_params(4096, [60, 49], 40)
    check_params(8192, [60, 40, 40, 60], 40)


def test_duplicate_client_across_partials_refused(fed):
    mode = CKKSMode()
    L = 10
    results, _ = run_round(mode, {f"c{i}": np.ones(L) for i in range(2)}, fed, binding(L, "td"), 2)
    with pytest.raises(ValueError, match="more than one partial"):
        mode.finish([results[0].partial, results[0].partial], L, fed[2])
    assert partial_clients(results[0].partial) == ["c0", "c1"]


def test_fast_coefficient_read_matches_seal(fed):
    """The zero-copy read of SEAL's serialization equals element-wise reads of the ciphertext."""
    from fedveil.secure.ckks import _runtime

    rt = _runtime(fed[3])
    (ct,) = rt.encrypt_reals(np.linspace(-5, 5, 1000))
    count = ct.size() * ct.coeff_modulus_size() * ct.poly_modulus_degree()
    fast = rt._raw_coefficients(ct, count)
    assert fast is not None
    da = ct.dyn_array()
    idx = np.random.default_rng(0).integers(0, count, 500)
    assert all(int(fast[i]) == da[i] for i in idx)
    back, _ = rt.ct_from_bytes(rt.ct_to_bytes(ct))
    assert np.array_equal(rt._raw_coefficients(back, count), fast)
