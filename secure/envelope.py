"""Sealed envelopes: ephemeral X25519 -> HKDF-SHA256 -> AES-256-GCM, bound to a `Binding`.

Wire format (version 1)::

    version (1 byte, 0x01) | ephemeral X25519 public key (32) | GCM nonce (12) | ciphertext || tag (16)

* The AES key comes from HKDF-SHA256 over the X25519 shared secret, with
  ``info = LABEL || ephemeral_pub || recipient_pub`` (domain separation plus both public keys,
  so a key is bound to this exact exchange and recipient).
* The AAD is the canonical encoding of every `Binding` field (run id, task id, client id, proxy id,
  mode, vector length), each length-prefixed, so no two different bindings encode alike.
* The envelope id used for replay protection is SHA-256(ephemeral_pub || nonce). It is claimed
  only *after* the tag verified, so nobody can burn a legitimate envelope's id with garbage.

Nothing here is a home-made cipher: all primitives come from `cryptography`.
"""

from __future__ import annotations

import hashlib
import os
import struct
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedveil.secure.errors import SecurityError
from fedveil.secure.modes import Binding, ReplayGuard

VERSION = 1
LABEL = b"fedveil/sealed-envelope/v1/x25519-hkdf-sha256-aes256gcm"
_PUB = 32
_NONCE = 12
_TAG = 16
HEADER_SIZE = 1 + _PUB + _NONCE
OVERHEAD = HEADER_SIZE + _TAG

KEYS_FIX = "provision keys with `fedveil keys init` and give each party its own key files"


def generate_x25519_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 keypair as raw bytes: (private 32 bytes, public 32 bytes)."""
    sk = X25519PrivateKey.generate()
    return _raw_private(sk), _raw_public(sk.public_key())


def public_key_from_private(private_key: bytes) -> bytes:
    """The raw X25519 public key that belongs to a raw private key."""
    return _raw_public(_load_private(private_key).public_key())


def encode_binding(binding: Binding) -> bytes:
    """Canonical, injective encoding of every Binding field (used as the AEAD associated data)."""
    out = [b"fedveil/binding/v1"]
    for value in (binding.run_id, binding.task_id, binding.client_id, binding.proxy_id, binding.mode):
        data = str(value).encode("utf-8")
        out.append(struct.pack(">I", len(data)))
        out.append(data)
    length = int(binding.length)
    if length < 0:
        raise ValueError("binding length must be non-negative")
    out.append(struct.pack(">Q", length))
    return b"".join(out)


def envelope_id(envelope: bytes) -> bytes:
    """The replay id of an envelope: SHA-256 of its ephemeral public key and nonce."""
    if len(envelope) < HEADER_SIZE:
        raise _malformed(len(envelope))
    return hashlib.sha256(b"fedveil/envelope-id/v1" + envelope[1:HEADER_SIZE]).digest()


def seal(plaintext: bytes, recipient_public_key: bytes, binding: Binding) -> bytes:
    """Encrypt `plaintext` to the holder of `recipient_public_key`, authenticating `binding`."""
    recipient = _load_public(recipient_public_key)
    eph = X25519PrivateKey.generate()
    eph_pub = _raw_public(eph.public_key())
    key = _derive(eph.exchange(recipient), eph_pub, bytes(recipient_public_key))
    nonce = os.urandom(_NONCE)
    ct = AESGCM(key).encrypt(nonce, bytes(plaintext), encode_binding(binding))
    return bytes([VERSION]) + eph_pub + nonce + ct


def open_envelope(
    envelope: bytes,
    private_key: bytes | None,
    binding: Binding,
    replay_guard: ReplayGuard | None = None,
) -> bytes:
    """Decrypt and verify an envelope; raise `SecurityError` (problem + fix) on any failure."""
    if private_key is None:
        raise SecurityError(
            "this party holds no X25519 private key, so it cannot open sealed payloads.",
            "run `fedveil keys init` and point the proxy at its private key file",
        )
    sk = _load_private(private_key)
    envelope = bytes(envelope)
    if len(envelope) < OVERHEAD:
        raise _malformed(len(envelope))
    if envelope[0] != VERSION:
        raise SecurityError(
            f"sealed envelope has version {envelope[0]}, this node understands version {VERSION}.",
            "run the same fedveil version on clients and proxies",
        )
    eph_pub = envelope[1 : 1 + _PUB]
    nonce = envelope[1 + _PUB : HEADER_SIZE]
    try:
        shared = sk.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    except ValueError as exc:  # low-order point / all-zero shared secret
        raise SecurityError(
            f"sealed envelope carries an invalid ephemeral public key ({exc}).",
            "the payload was corrupted or forged; drop it",
        ) from None
    key = _derive(shared, eph_pub, public_key_from_private(private_key))
    try:
        plaintext = AESGCM(key).decrypt(nonce, envelope[HEADER_SIZE:], encode_binding(binding))
    except InvalidTag:
        raise SecurityError(
            "sealed envelope failed authentication: it was tampered, sealed to another key, or bound to "
            f"another run/task/client/proxy (opened as run={binding.run_id!r} task={binding.task_id!r} "
            f"client={binding.client_id!r} proxy={binding.proxy_id!r} mode={binding.mode!r} "
            f"length={binding.length}).",
            "drop this payload; if it keeps happening check that clients use the provisioned proxy keys "
            "(`fedveil keys init`) and that the server forwards payloads to the proxy they were sealed for",
        ) from None
    if replay_guard is not None and not replay_guard.claim(envelope_id(envelope)):
        raise SecurityError(
            "sealed envelope was already opened once (replay).",
            "each envelope opens at most once; drop the duplicate",
        )
    return plaintext


class MemoryReplayGuard:
    """In-memory ReplayGuard: a thread-safe set of claimed envelope ids (forgets on restart)."""

    def __init__(self) -> None:
        self._seen: set[bytes] = set()
        self._lock = threading.Lock()

    def claim(self, envelope_id: bytes) -> bool:
        with self._lock:
            if envelope_id in self._seen:
                return False
            self._seen.add(bytes(envelope_id))
            return True

    def __len__(self) -> int:
        return len(self._seen)


# -- internals ---------------------------------------------------------------------------------


def _derive(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=LABEL + eph_pub + recipient_pub).derive(shared)


def _malformed(n: int) -> SecurityError:
    return SecurityError(
        f"sealed envelope is malformed or truncated ({n} bytes; at least {OVERHEAD} expected).",
        "drop this payload; it was cut off or corrupted in transit",
    )


def _load_private(private_key: bytes) -> X25519PrivateKey:
    if not isinstance(private_key, (bytes, bytearray)) or len(private_key) != 32:
        raise SecurityError("X25519 private key must be 32 raw bytes.", KEYS_FIX)
    return X25519PrivateKey.from_private_bytes(bytes(private_key))


def _load_public(public_key: bytes) -> X25519PublicKey:
    if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != 32:
        raise SecurityError("X25519 public key must be 32 raw bytes.", KEYS_FIX)
    return X25519PublicKey.from_public_bytes(bytes(public_key))


def _raw_private(sk: X25519PrivateKey) -> bytes:
    return sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def _raw_public(pk: X25519PublicKey) -> bytes:
    return pk.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
