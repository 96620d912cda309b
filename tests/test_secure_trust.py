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
