"""Gaussian noise for DP-SGD from a cryptographically secure stream (AES-256-CTR).

Why: DP-SGD's guarantee assumes nobody can predict the noise. torch's default generator is a
Mersenne Twister: its state can be recovered from its outputs, and seeding it with 63 bits of
os.urandom still leaves a non-cryptographic stream. Here the randomness is the AES-256-CTR
keystream (from `cryptography`, never a hand-rolled cipher) under a fresh 256-bit `os.urandom`
key; 64-bit words of it become 53-bit uniforms and Box-Muller turns pairs of uniforms into
pairs of independent N(0, 1) draws, in float64, vectorized with numpy.

`normals_from_bytes` is the pure bytes -> normals map; `SecureGaussian` holds the keystream
state (one AES-CTR encryptor) so successive draws continue the stream and never repeat.
`SecureGaussian.from_seed` is for tests and benchmarks only: a key derived from a public seed
voids the guarantee, exactly like `DPSettings.reproducible`.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32  # AES-256
BYTES_PER_PAIR = 16  # two 64-bit words -> two normals
_TWO_POW_M53 = 2.0**-53


def stream_bytes_for(n: int) -> int:
    """Keystream bytes `normals_from_bytes` needs for n normals (pairs, so odd n wastes one)."""
    if n < 0:
        raise ValueError(f"cannot draw {n} normals")
    return BYTES_PER_PAIR * ((n + 1) // 2)


def normals_from_bytes(stream: bytes | bytearray | memoryview, n: int) -> np.ndarray:
    """n standard normals (float64) from uniformly random bytes, by Box-Muller on 53-bit uniforms.

    Each 64-bit little-endian word keeps its top 53 bits, k, giving u = k * 2^-53 in [0, 1).
    The radius uses 1 - u, in (0, 1], so log never sees 0; the angle uses 2*pi*u.
    """
    need = stream_bytes_for(n)
    if len(stream) < need:
        raise ValueError(f"{n} normals need {need} random bytes, got {len(stream)}")
    words = np.frombuffer(stream, dtype="<u8", count=need // 8) >> np.uint64(11)
    u = words.astype(np.float64) * _TWO_POW_M53
    radius = np.sqrt(-2.0 * np.log1p(-u[0::2]))
    angle = (2.0 * math.pi) * u[1::2]
    out = np.empty(need // 8, dtype=np.float64)
    np.multiply(radius, np.cos(angle), out=out[0::2])
    np.multiply(radius, np.sin(angle), out=out[1::2])
    return out[:n]


class SecureGaussian:
    """A stream of N(0, 1) draws from AES-256-CTR under a fresh os.urandom key (see the module docstring).

    Normals are made in blocks of at least `BLOCK` and handed out in order, so many small draws
    (one per layer per step) cost what one large draw does; the sequence of normals is the same
    however it is sliced into draws.
    """

    BLOCK = 1 << 16  # normals per refill

    def __init__(self, key: bytes | None = None) -> None:
        key = os.urandom(KEY_BYTES) if key is None else bytes(key)
        if len(key) != KEY_BYTES:
            raise ValueError(f"the AES-256 key must be {KEY_BYTES} bytes, got {len(key)}")
        # A fresh key per stream, so a fixed initial counter never repeats a keystream.
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = bytearray()
        self._out = bytearray()
        self._normals = np.empty(0)
        self._pos = 0

    @classmethod
    def from_seed(cls, seed: int) -> "SecureGaussian":
        """A stream determined by `seed`: tests and benchmarks ONLY (anyone who knows the seed knows the noise)."""
        return cls(hashlib.sha256(b"fedveil-dp-noise:" + str(int(seed)).encode()).digest())

    def keystream(self, nbytes: int) -> memoryview:
        """The next `nbytes` of AES-CTR keystream (the encryption of zeros), in a reused buffer."""
        if len(self._zeros) < nbytes:
            self._zeros = bytearray(nbytes)
            self._out = bytearray(nbytes + 15)  # update_into wants room for one more block
        written = self._encryptor.update_into(memoryview(self._zeros)[:nbytes], self._out)
        return memoryview(self._out)[:written]

    def standard_normal(self, n: int) -> np.ndarray:
        """The next n N(0, 1) draws of this stream (float64)."""
        out = np.empty(n, dtype=np.float64)
        done = 0
        while done < n:
            if self._pos == len(self._normals):
                want = max(self.BLOCK, n - done)
                self._normals = normals_from_bytes(self.keystream(stream_bytes_for(want)), want)
                self._pos = 0
            take = min(n - done, len(self._normals) - self._pos)
            out[done:done + take] = self._normals[self._pos:self._pos + take]
            done += take
            self._pos += take
        return out

    def normal(self, std: float, n: int) -> np.ndarray:
        """The next n N(0, std^2) draws (float64)."""
        out = self.standard_normal(n)
        out *= float(std)
        return out
