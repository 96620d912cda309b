"""`secret-sharing` mode: additive shares in Z_2^64, seed-compressed, sealed to every proxy.

Client (`protect`):
  x = fixed-point encode(vector) in Z_2^64. With k >= 2 proxies, k-1 proxies each get a fresh 32-byte
  seed; their share is s_j = AES-256-CTR(seed_j) keystream read as uint64. The remaining proxy
  (chosen per client by a hash of the client id, to spread the traffic) gets the explicit share
  s_k = x - sum_j s_j mod 2^64. Each payload is a sealed envelope of a small header plus the seed or
  the share. Traffic: 8 bytes/value to one proxy (2x float32) plus ~110 bytes to each other proxy.

Proxy (`combine`):
  opens each envelope bound to (run, task, client, this proxy, mode, length), claims it in the replay
  guard, expands seeds, multiplies by integer weights round(w * 2^q) and sums mod 2^64. A payload
  that fails any check is put in `rejected` with the reason; fewer than `min_aggregate` survivors
  raises `AggregationRefused`. A proxy only ever sees a seed or a share, both uniformly random.

Server (`finish`):
  sums the partials mod 2^64 and decodes: total / 2^(f + q) = sum_i w_i n_i delta_i. The partials'
  client sets must be identical (otherwise the sum is garbage): `finish` raises ValueError. Do NOT
  respond by asking proxies to re-combine a subset: a curious server could difference the two
  aggregates of the same task and isolate one client. Instead, before combining, call
  `validate` on every proxy (it releases only valid/invalid bits, claims nothing) and pass
  `common_clients` of the results to `combine` on every proxy. If sets still disagree, drop the
  aggregate.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import replace
from typing import Mapping, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fedveil.secure.errors import SecurityError
from fedveil.secure import fixedpoint
from fedveil.secure.envelope import open_envelope, seal
from fedveil.secure.modes import (
    AggregationRefused,
    Binding,
    ClientKeyring,
    CombineResult,
    ProxyKeyring,
    ReplayGuard,
    ServerKeyring,
    client_binding,
    public_weights,
    register_mode,
)

NAME = "secret-sharing"
SEED_BYTES = 32
_SHARE_MAGIC = b"FVS1"
_PARTIAL_MAGIC = b"FVP1"
_KIND_SEED = 0
_KIND_SHARE = 1
_SHARE_HDR = struct.Struct(">4sBQ")  # magic, kind, length
_PARTIAL_HDR = struct.Struct(">4sBBQI")  # magic, frac_bits, weight_bits, length, n_ids


def prg_share(seed: bytes, length: int) -> np.ndarray:
    """Expand a 32-byte seed into `length` uniform uint64 values with AES-256-CTR (zero IV; seeds are single-use)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"seed must be {SEED_BYTES} bytes")
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\x00" * 16)).encryptor()
    buf = bytearray(8 * int(length) + 15)
    n = enc.update_into(bytes(8 * int(length)), buf)
    return np.frombuffer(bytes(buf[:n]), dtype="<u8").astype(np.uint64, copy=False)


def _require_min_proxies(proxies: Sequence[str]) -> list[str]:
    ps = sorted(set(proxies))
    if len(ps) < 2:
        raise ValueError(
            f"secret-sharing needs at least 2 proxies (got {len(ps)}); add proxies to the federation or use mode 'ckks'"
        )
    return ps


class SecretSharingMode:
    """Additive secret sharing over Z_2^64 across all proxies (see module docstring)."""

    name = NAME

    def __init__(
        self,
        frac_bits: int = fixedpoint.DEFAULT_FRAC_BITS,
        weight_bits: int = 16,
        clip: float | None = None,
        min_aggregate: int = 2,
    ) -> None:
        self.frac_bits = int(frac_bits)
        self.weight_bits = int(weight_bits)
        self.clip = clip  # bound on |coordinate| of the *weighted* vector a client sends; None: no clipping
        self.min_aggregate = int(min_aggregate)

    # -- assignment ------------------------------------------------------------------------
    def assign(self, client_ids: Sequence[str], proxy_ids: Sequence[str], min_aggregate: int) -> dict[str, list[str]]:
        ps = _require_min_proxies(proxy_ids)
        return {cid: list(ps) for cid in sorted(client_ids)}

    # -- client ----------------------------------------------------------------------------
    def protect(self, vector: np.ndarray, proxies: Sequence[str], binding: Binding, keys: ClientKeyring) -> dict[str, bytes]:
        ps = _require_min_proxies(proxies)
        arr = np.asarray(vector, dtype=np.float64).ravel()
        if arr.size != binding.length:
            raise ValueError(f"vector has {arr.size} values but the binding says {binding.length}")
        missing = [p for p in ps if p not in keys.proxy_public_keys]
        if missing:
            raise SecurityError(
                f"no provisioned public key for proxy/proxies {missing}.",
                "run `fedveil keys init` and distribute the manifest to every organization (never take proxy keys from the server)",
            )
        x = fixedpoint.encode(arr, self.frac_bits, self.clip)
        explicit = int.from_bytes(hashlib.sha256(binding.client_id.encode()).digest()[:8], "big") % len(ps)
        last = x.copy()
        plain: dict[str, bytes] = {}
        for j, p in enumerate(ps):
            if j == explicit:
                continue
            seed = os.urandom(SEED_BYTES)
            last -= prg_share(seed, arr.size)
            plain[p] = _SHARE_HDR.pack(_SHARE_MAGIC, _KIND_SEED, arr.size) + seed
        plain[ps[explicit]] = _SHARE_HDR.pack(_SHARE_MAGIC, _KIND_SHARE, arr.size) + last.astype("<u8").tobytes()
        out = {}
        for p in ps:
            out[p] = seal(plain[p], keys.proxy_public_keys[p], replace(binding, proxy_id=p))
        return out

    # -- proxy -----------------------------------------------------------------------------
    def _open_share(self, blob: bytes, binding: Binding, keys: ProxyKeyring, replay_guard: ReplayGuard | None) -> np.ndarray:
        data = open_envelope(blob, keys.private_key, binding, replay_guard)
        if len(data) < _SHARE_HDR.size:
            raise ValueError("share payload too short")
        magic, kind, length = _SHARE_HDR.unpack_from(data)
        if magic != _SHARE_MAGIC:
            raise ValueError("not a secret-sharing payload")
        if length != binding.length:
            raise ValueError(f"wrong length: {length} values, expected {binding.length}")
        body = data[_SHARE_HDR.size :]
        if kind == _KIND_SEED:
            if len(body) != SEED_BYTES:
                raise ValueError(f"seed payload has {len(body)} bytes, expected {SEED_BYTES}")
            return prg_share(body, length)
        if kind == _KIND_SHARE:
            if len(body) != 8 * length:
                raise ValueError(f"wrong length: {len(body) // 8} values, expected {binding.length}")
            return np.frombuffer(body, dtype="<u8").astype(np.uint64, copy=False)
        raise ValueError(f"unknown share kind {kind}")

    def validate(self, payloads: Mapping[str, bytes], binding: Binding, keys: ProxyKeyring,
                 task_ids: Mapping[str, str] | None = None) -> dict[str, str]:
        """Check every payload without claiming replay ids or releasing anything; return {client: reason} of the bad ones."""
        _require_private(keys)
        bad = {}
        for cid in sorted(payloads):
            try:
                self._open_share(payloads[cid], client_binding(binding, cid, keys.proxy_id, task_ids), keys, None)
            except SecurityError as exc:
                bad[cid] = exc.problem
            except ValueError as exc:
                bad[cid] = str(exc)
        return bad

    def combine(
        self,
        payloads: Mapping[str, bytes],
        binding: Binding,
        keys: ProxyKeyring,
        min_aggregate: int,
        weights: Mapping[str, float] | None = None,
        replay_guard: ReplayGuard | None = None,
        task_ids: Mapping[str, str] | None = None,
    ) -> CombineResult:
        _require_private(keys)
        q = self.weight_bits if weights is not None else 0
        total = np.zeros(binding.length, dtype=np.uint64)
        included: list[str] = []
        max_factor = 0
        weights_of, rejected = public_weights(weights, sorted(payloads))
        for cid, w in weights_of.items():
            factor = int(round(w * 2**q))  # q = 0 without weights: factor 1
            try:
                share = self._open_share(payloads[cid], client_binding(binding, cid, keys.proxy_id, task_ids), keys,
                                         replay_guard)
            except SecurityError as exc:
                rejected[cid] = exc.problem
                continue
            except ValueError as exc:
                rejected[cid] = str(exc)
                continue
            if factor == 1:
                total += share
            else:
                total += share * np.uint64(factor)
            max_factor = max(max_factor, factor)
            included.append(cid)
        if len(included) < max(min_aggregate, 1):
            raise AggregationRefused(
                f"only {len(included)} valid client payload(s); this proxy aggregates at least {min_aggregate}"
                + (f" (rejected: {rejected})" if rejected else "")
            )
        if self.clip is not None:
            fixedpoint.check_overflow(self.clip, self.frac_bits, len(included), max_factor / 2**q, q)
        return CombineResult(encode_partial(total, included, self.frac_bits, q), included, rejected)

    def effective_weight(self, w: float) -> float:
        """The weight the proxies apply: the integer round(w * 2^weight_bits), i.e. w on a 2^-16 grid."""
        return round(float(w) * 2**self.weight_bits) / 2**self.weight_bits

    # -- server ----------------------------------------------------------------------------
    def finish(self, partials: Sequence[bytes], length: int, keys: ServerKeyring) -> np.ndarray:
        if len(partials) < 2:
            raise ValueError(f"secret-sharing needs the partials of all proxies (>= 2), got {len(partials)}")
        parsed = [decode_partial(p) for p in partials]
        ids0 = parsed[0][1]
        for data, ids, f, q in parsed:
            if len(data) != length:
                raise ValueError(f"partial has {len(data)} values, expected {length}")
            if ids != ids0:
                raise ValueError(
                    "proxies aggregated different client sets, so the shares do not reconstruct; drop this aggregate "
                    f"(common clients: {sorted(set.intersection(*(set(p[1]) for p in parsed)))}). Run `validate` on "
                    "every proxy first and combine only `common_clients`; never re-combine a subset of the same task."
                )
            if (f, q) != (parsed[0][2], parsed[0][3]):
                raise ValueError("partials disagree on frac_bits/weight_bits; every proxy must use the same secure config")
        if len(ids0) < self.min_aggregate:
            raise AggregationRefused(f"aggregate holds {len(ids0)} client(s), fewer than min_aggregate={self.min_aggregate}")
        total = np.zeros(length, dtype=np.uint64)
        for data, *_ in parsed:
            total += data
        out = fixedpoint.decode(total, parsed[0][2], parsed[0][3])
        if not np.all(np.isfinite(out)):
            raise ValueError("decoded aggregate is not finite")
        return out


def _require_private(keys: ProxyKeyring) -> None:
    if keys.private_key is None:
        raise SecurityError(
            f"proxy {keys.proxy_id!r} has no X25519 private key loaded.",
            "run `fedveil keys init` and start the proxy with its private key file",
        )


def encode_partial(total: np.ndarray, included: Sequence[str], frac_bits: int, weight_bits: int) -> bytes:
    parts = [_PARTIAL_HDR.pack(_PARTIAL_MAGIC, frac_bits, weight_bits, total.size, len(included))]
    for cid in included:
        b = cid.encode("utf-8")
        parts.append(struct.pack(">I", len(b)) + b)
    parts.append(np.asarray(total, dtype=np.uint64).astype("<u8").tobytes())
    return b"".join(parts)


def decode_partial(partial: bytes) -> tuple[np.ndarray, list[str], int, int]:
    """(share sum, included client ids, frac_bits, weight_bits) of a secret-sharing partial."""
    try:
        magic, f, q, length, n = _PARTIAL_HDR.unpack_from(partial)
        if magic != _PARTIAL_MAGIC:
            raise ValueError("bad magic")
        off = _PARTIAL_HDR.size
        ids = []
        for _ in range(n):
            (m,) = struct.unpack_from(">I", partial, off)
            off += 4
            ids.append(bytes(partial[off : off + m]).decode("utf-8"))
            off += m
        if len(partial) - off != 8 * length:
            raise ValueError("length mismatch")
        data = np.frombuffer(partial, dtype="<u8", offset=off, count=length).astype(np.uint64)
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed secret-sharing partial: {exc}") from None
    return data, ids, f, q


def partial_clients(partial: bytes) -> list[str]:
    """The client ids a secret-sharing partial includes."""
    return decode_partial(partial)[1]


def common_clients(client_sets: Sequence[Sequence[str]]) -> list[str]:
    """Intersection of the valid-client sets reported by every proxy (sorted)."""
    if not client_sets:
        return []
    return sorted(set.intersection(*(set(s) for s in client_sets)))


register_mode(NAME, SecretSharingMode)
