"""Gaussian noise for DP-SGD from a cryptographically secure stream (AES-256-CTR).

Why: DP-SGD's guarantee assumes nobody can predict the noise. torch's default generator is a
Mersenne Twister: its state can be recovered from its outputs, and seeding it with 63 bits of
os.urandom still leaves a non-cryptographic stream. Here the randomness is the AES-256-CTR
keystream (from `cryptography`, never a hand-rolled cipher) under a fresh 256-bit `os.urandom`
key; 64-bit words of it become 53-bit uniforms and Box-Muller turns pairs of uniforms into
pairs of independent N(0, 1) draws, in float64. AES runs on the CPU (AES-NI through OpenSSL);
the keystream words are moved to the training device and Box-Muller runs there, vectorized with
torch, so a GPU receives 8 bytes per normal and does the transcendental maths itself.

`normals_from_words` / `normals_from_bytes` are the pure random words -> normals map;
`SecureGaussian` holds the keystream state (one AES-CTR encryptor) so successive draws continue
the stream and never repeat.
`SecureGaussian.from_seed` is for tests and benchmarks only: a key derived from a public seed
voids the guarantee, exactly like `DPSettings.reproducible`.
"""

from __future__ import annotations

import hashlib
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32  # AES-256
BYTES_PER_PAIR = 16  # two 64-bit words -> two normals
_MASK_53 = (1 << 53) - 1
_TWO_POW_M53 = 2.0**-53


def stream_bytes_for(n: int) -> int:
    """Keystream bytes needed for n normals (whole pairs, so odd n leaves one unused)."""
    if n < 0:
        raise ValueError(f"cannot draw {n} normals")
    return BYTES_PER_PAIR * ((n + 1) // 2)


def normals_from_words(words: torch.Tensor) -> torch.Tensor:
    """One standard normal (float64) per uniformly random 64-bit word (even count), by Box-Muller.

    Each word keeps its top 53 bits, k, giving u = k * 2^-53 in [0, 1). Of each pair, the radius
    uses 1 - u1, in (0, 1], so log never sees 0, and the angle uses 2*pi*u2; the pair gives
    (r cos, r sin). Runs on the words' device.
    """
    if words.dtype != torch.int64 or words.dim() != 1 or len(words) % 2:
        raise ValueError("normals_from_words needs a 1-D int64 tensor of even length")
    u = ((words >> 11) & _MASK_53).to(torch.float64) * _TWO_POW_M53
    radius = torch.sqrt(-2.0 * torch.log1p(-u[0::2]))
    angle = (2.0 * math.pi) * u[1::2]
    return torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1).reshape(-1)


def normals_from_bytes(stream: bytes | bytearray | memoryview, n: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """n standard normals (float64, on `device`) from uniformly random bytes (64-bit little-endian words)."""
    need = stream_bytes_for(n)
    if len(stream) < need:
        raise ValueError(f"{n} normals need {need} random bytes, got {len(stream)}")
    if need == 0:
        return torch.zeros(0, dtype=torch.float64, device=device)
    words = np.frombuffer(stream, dtype="<i8", count=need // 8).astype(np.int64, copy=False)
    words = torch.from_numpy(words if words.flags.writeable else words.copy())
    return normals_from_words(words.to(device))[:n]


class SecureGaussian:
    """A stream of N(0, 1) draws from AES-256-CTR under a fresh os.urandom key (see the module docstring).

    Normals are made in blocks of at least `BLOCK` and handed out in order, so many small draws
    (one per layer per step) cost what one large draw does; the sequence of normals is the same
    however it is sliced into draws.
    """

    BLOCK = 1 << 16  # normals per refill

    def __init__(self, key: bytes | None = None, device: str | torch.device = "cpu") -> None:
        key = os.urandom(KEY_BYTES) if key is None else bytes(key)
        if len(key) != KEY_BYTES:
            raise ValueError(f"the AES-256 key must be {KEY_BYTES} bytes, got {len(key)}")
        # A fresh key per stream, so a fixed initial counter never repeats a keystream.
        self._encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._zeros = bytearray()
        self._out = bytearray()
        self.device = torch.device(device)
        self._normals = torch.zeros(0, dtype=torch.float64, device=self.device)
        self._pos = 0

    @classmethod
    def from_seed(cls, seed: int, device: str | torch.device = "cpu") -> "SecureGaussian":
        """A stream determined by `seed`: tests and benchmarks ONLY (anyone who knows the seed knows the noise)."""
        return cls(hashlib.sha256(b"fedveil-dp-noise:" + str(int(seed)).encode()).digest(), device)

    def keystream(self, nbytes: int) -> memoryview:
        """The next `nbytes` of AES-CTR keystream (the encryption of zeros), in a reused buffer."""
        if len(self._zeros) < nbytes:
            self._zeros = bytearray(nbytes)
            self._out = bytearray(nbytes + 15)  # update_into wants room for one more block
        written = self._encryptor.update_into(memoryview(self._zeros)[:nbytes], self._out)
        return memoryview(self._out)[:written]

    def standard_normal(self, n: int) -> torch.Tensor:
        """The next n N(0, 1) draws of this stream (float64, on the stream's device)."""
        parts = []
        left = n
        while left > 0:
            if self._pos == len(self._normals):
                want = max(self.BLOCK, left)
                self._normals = normals_from_bytes(self.keystream(stream_bytes_for(want)), want, self.device)
                self._pos = 0
            take = min(left, len(self._normals) - self._pos)
            parts.append(self._normals[self._pos:self._pos + take])
            self._pos += take
            left -= take
        if len(parts) == 1:
            return parts[0].clone()
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=self.device)

    def normal(self, std: float, n: int) -> torch.Tensor:
        """The next n N(0, std^2) draws (float64, on the stream's device)."""
        return self.standard_normal(n).mul_(float(std))
