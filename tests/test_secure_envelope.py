"""Sealed envelopes: every tampering / mis-binding / replay path is rejected with SecurityError."""

from dataclasses import replace

import pytest

from fedveil.platform.errors import SecurityError
from fedveil.secure.envelope import (
    OVERHEAD,
    MemoryReplayGuard,
    encode_binding,
    envelope_id,
    generate_x25519_keypair,
    open_envelope,
    public_key_from_private,
    seal,
)
from fedveil.secure.modes import Binding

B = Binding(run_id="run-1", task_id="t-7", client_id="org-a", proxy_id="proxy-0", mode="secret-sharing", length=3)
MSG = b"secret update bytes"


@pytest.fixture(scope="module")
def kp():
    return generate_x25519_keypair()


def test_roundtrip_and_overhead(kp):
    sk, pk = kp
    env = seal(MSG, pk, B)
    assert len(env) == len(MSG) + OVERHEAD
    assert MSG not in env
    assert open_envelope(env, sk, B) == MSG
    assert public_key_from_private(sk) == pk


def test_fresh_randomness_each_seal(kp):
    _, pk = kp
    assert seal(MSG, pk, B) != seal(MSG, pk, B)


@pytest.mark.parametrize("pos", [0 + 1, 10, 33 + 5, 45, -1, -17])
def test_tampered_byte_rejected(kp, pos):
    sk, pk = kp
    env = bytearray(seal(MSG, pk, B))
    env[pos] ^= 0x01
    with pytest.raises(SecurityError):
        open_envelope(bytes(env), sk, B)


def test_tampered_tag_message(kp):
    sk, pk = kp
    env = bytearray(seal(MSG, pk, B))
    env[-1] ^= 0x80
    with pytest.raises(SecurityError, match="tampered, sealed to another key, or bound to another run/task/client/proxy"):
        open_envelope(bytes(env), sk, B)


def test_wrong_key_rejected(kp):
    _, pk = kp
    other_sk, _ = generate_x25519_keypair()
    with pytest.raises(SecurityError, match="sealed to another key"):
        open_envelope(seal(MSG, pk, B), other_sk, B)


@pytest.mark.parametrize(
    "field,value",
    [("run_id", "run-2"), ("task_id", "t-8"), ("client_id", "org-b"), ("proxy_id", "proxy-1"), ("mode", "ckks"), ("length", 4)],
)
def test_wrong_binding_field_rejected(kp, field, value):
    sk, pk = kp
    env = seal(MSG, pk, B)
    with pytest.raises(SecurityError, match="bound to another run/task/client/proxy"):
        open_envelope(env, sk, replace(B, **{field: value}))


def test_task_t_envelope_rejected_for_task_t_plus_1(kp):
    sk, pk = kp
    env = seal(MSG, pk, replace(B, task_id="7"))
    with pytest.raises(SecurityError):
        open_envelope(env, sk, replace(B, task_id="8"))


def test_binding_encoding_is_injective():
    a = Binding("ab", "c", "d", "e", "f", 1)
    b = Binding("a", "bc", "d", "e", "f", 1)
    assert encode_binding(a) != encode_binding(b)


def test_replay_rejected(kp):
    sk, pk = kp
    guard = MemoryReplayGuard()
    env = seal(MSG, pk, B)
    assert open_envelope(env, sk, B, guard) == MSG
    with pytest.raises(SecurityError, match="replay"):
        open_envelope(env, sk, B, guard)
    assert len(guard) == 1


def test_failed_open_does_not_burn_replay_id(kp):
    sk, pk = kp
    guard = MemoryReplayGuard()
    env = seal(MSG, pk, B)
    forged = bytearray(env)
    forged[-3] ^= 1
    with pytest.raises(SecurityError):
        open_envelope(bytes(forged), sk, B, guard)
    assert envelope_id(bytes(forged)) == envelope_id(env)
    assert open_envelope(env, sk, B, guard) == MSG  # the genuine one still opens


@pytest.mark.parametrize("n", [0, 1, 33, 45, OVERHEAD - 1])
def test_truncated_rejected(kp, n):
    sk, pk = kp
    env = seal(b"", pk, B)
    with pytest.raises(SecurityError, match="malformed or truncated"):
        open_envelope(env[:n], sk, B)


def test_truncated_body_rejected(kp):
    sk, pk = kp
    env = seal(MSG, pk, B)
    with pytest.raises(SecurityError):
        open_envelope(env[:-1], sk, B)


def test_wrong_version_rejected(kp):
    sk, pk = kp
    env = b"\x02" + seal(MSG, pk, B)[1:]
    with pytest.raises(SecurityError, match="version"):
        open_envelope(env, sk, B)


def test_missing_private_key(kp):
    _, pk = kp
    with pytest.raises(SecurityError, match="fedveil keys init"):
        open_envelope(seal(MSG, pk, B), None, B)


def test_low_order_ephemeral_key_rejected(kp):
    sk, pk = kp
    env = bytearray(seal(MSG, pk, B))
    env[1:33] = bytes(32)  # all-zero point
    with pytest.raises(SecurityError):
        open_envelope(bytes(env), sk, B)
