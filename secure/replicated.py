"""`replicated-sharing` mode: 2-out-of-k replicated additive sharing in Z_2^64, so a round survives a dead proxy.

Why: a client is charged its ε before anything leaves it (charge-before-release). With plain k-of-k
additive sharing (`secret-sharing`) one proxy dying mid-aggregate loses the round and so wastes
every client's ε. Here any two partials (with 3 proxies: any 2 of 3) reconstruct the total.

Client (`protect`), with k >= 3 proxies P_1..P_k (sorted):
  x = fixed-point encode(vector) = s_1 + ... + s_k mod 2^64, where share s_j is "the share P_j lacks":
  every proxy except P_j holds it. So each proxy holds k-1 shares and misses exactly one. All but
  one share (the explicit one, chosen per client by a hash of the client id, as in `secret-sharing`)
  are AES-256-CTR expansions of fresh 32-byte seeds (`sharing.prg_share`); the explicit one is
  x - sum(others). Its k-1 holders each get it in full, the proxy that lacks it gets only seeds:
  traffic per client is (k-1) x 8 bytes/value plus ~32 bytes per seed (k=3: 16 bytes/value, 4x float32).

Proxy (`combine`):
  opens its envelope (bound to run, task, client, proxy, mode, length), claims it in the replay
  guard, expands the seeds and sums each share it holds over the clients, separately per share.
  Every payload names the proxy list the client shared over; clients in one aggregate must agree on it.

Server (`finish`):
  takes the partials of the proxies that answered (at least two). Each share's sum must come from
  at least one partial, and every partial that holds the same share must report the same sum over
  the same client set: a mismatch means a deviating proxy (or a server that fed proxies different
  sets), and the aggregate is refused rather than decoded into a wrong model.

Trust (see docs/security.md): one proxy's view (its k-1 shares) is uniform and independent of x,
because the share it lacks is uniform; so the server plus ONE colluding proxy learns nothing beyond
the aggregate, provided every proxy combines the same client set. Two proxies together hold every
share and reconstruct each client's update. `secret-sharing` resists k-1 colluding proxies but no
dead one; this mode trades collusion tolerance for fault tolerance, chosen by `federation.secure`.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections import Counter
from dataclasses import dataclass, replace
from typing import Mapping, Sequence

import numpy as np

from fedveil.secure import fixedpoint, quorum
from fedveil.secure.envelope import open_envelope, seal
from fedveil.secure.errors import SecurityError
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
from fedveil.secure.sharing import SEED_BYTES, prg_share

NAME = "replicated-sharing"
MIN_PROXIES = 3
_SHARE_MAGIC = b"FVR1"
_PARTIAL_MAGIC = b"FVRP"
_KIND_SEED = 0
_KIND_SHARE = 1
_SHARE_HDR = struct.Struct(">4sQ")  # magic, length (then the proxy names, then k-1 share entries)
_PARTIAL_HDR = struct.Struct(">4sBBQ")  # magic, frac_bits, weight_bits, length (then names, ids, sums)
_MAX_NAME = 255


# ---- small codecs ------------------------------------------------------------------------------
def _pack_names(names: Sequence[str]) -> bytes:
    out = [struct.pack(">H", len(names))]
    for name in names:
        b = name.encode("utf-8")
        out.append(struct.pack(">H", len(b)) + b)
    return b"".join(out)


def _unpack_names(data: bytes, off: int) -> tuple[list[str], int]:
    (n,) = struct.unpack_from(">H", data, off)
    off += 2
    names = []
    for _ in range(n):
        (m,) = struct.unpack_from(">H", data, off)
        off += 2
        if off + m > len(data):
            raise ValueError("truncated name")
        names.append(bytes(data[off : off + m]).decode("utf-8"))
        off += m
    return names, off


def _require_proxies(proxies: Sequence[str]) -> list[str]:
    ps = sorted(set(proxies))
    if len(ps) < MIN_PROXIES:
        raise ValueError(
            f"replicated-sharing needs at least {MIN_PROXIES} proxies (got {len(ps)}), so that one may die; "
            "add proxies to the federation, or use mode 'secret-sharing' with 2"
        )
    return ps


def explicit_share(client_id: str, proxies: Sequence[str]) -> str:
    """The proxy whose lacked share is sent explicitly for this client (a hash spreads the traffic)."""
    ps = sorted(proxies)
    return ps[int.from_bytes(hashlib.sha256(client_id.encode()).digest()[:8], "big") % len(ps)]


# ---- the mode ----------------------------------------------------------------------------------
class ReplicatedSharingMode:
    """2-out-of-k replicated additive sharing over Z_2^64 (see module docstring)."""

    name = NAME
    needs_quorum = True  # proxies commit to one client set before any release (`fedveil.secure.quorum`)

    def __init__(
        self,
        frac_bits: int = fixedpoint.DEFAULT_FRAC_BITS,
        weight_bits: int = 16,
        clip: float | None = None,
        min_aggregate: int = 2,
    ) -> None:
        self.frac_bits = int(frac_bits)
        self.weight_bits = int(weight_bits)
        self.clip = clip
        self.min_aggregate = int(min_aggregate)

    def min_partials(self, n_proxies: int) -> int:
        """How many proxies' partials may suffice: any two hold every share between them."""
        return 2 if n_proxies >= MIN_PROXIES else n_proxies

    def quorum_size(self, n_proxies: int) -> int:
        """How many proxies must commit to a client set before any releases: two quorums share >= 2 proxies."""
        return quorum.quorum_size(n_proxies)

    # -- assignment ------------------------------------------------------------------------------
    def assign(self, client_ids: Sequence[str], proxy_ids: Sequence[str], min_aggregate: int) -> dict[str, list[str]]:
        ps = _require_proxies(proxy_ids)
        return {cid: list(ps) for cid in sorted(client_ids)}

    # -- client ----------------------------------------------------------------------------------
    def protect(self, vector: np.ndarray, proxies: Sequence[str], binding: Binding, keys: ClientKeyring) -> dict[str, bytes]:
        ps = _require_proxies(proxies)
        if any(len(p.encode("utf-8")) > _MAX_NAME for p in ps):
            raise ValueError(f"proxy names must be at most {_MAX_NAME} bytes")
        arr = np.asarray(vector, dtype=np.float64).ravel()
        if arr.size != binding.length:
            raise ValueError(f"vector has {arr.size} values but the binding says {binding.length}")
        missing = [p for p in ps if p not in keys.proxy_public_keys]
        if missing:
            raise SecurityError(
                f"no provisioned public key for proxy/proxies {missing}.",
                "add their public keys from the manifest to this organization's key bundle (never take proxy keys "
                "from the server)",
            )
        x = fixedpoint.encode(arr, self.frac_bits, self.clip)
        explicit = explicit_share(binding.client_id, ps)
        entries: dict[str, bytes] = {}  # share label (the proxy that lacks it) -> kind byte + body
        last = x.copy()
        for label in ps:
            if label == explicit:
                continue
            seed = os.urandom(SEED_BYTES)
            last -= prg_share(seed, arr.size)
            entries[label] = bytes([_KIND_SEED]) + seed
        entries[explicit] = bytes([_KIND_SHARE]) + last.astype("<u8").tobytes()
        head = _SHARE_HDR.pack(_SHARE_MAGIC, arr.size) + _pack_names(ps)
        out = {}
        for p in ps:
            body = b"".join(entries[label] for label in ps if label != p)
            out[p] = seal(head + body, keys.proxy_public_keys[p], replace(binding, proxy_id=p))
        return out

    # -- proxy -----------------------------------------------------------------------------------
    def _open_shares(self, blob: bytes, binding: Binding, keys: ProxyKeyring,
                     replay_guard: ReplayGuard | None) -> tuple[tuple[str, ...], dict[str, np.ndarray]]:
        """(proxy list the client shared over, {label: share}) of one payload; ValueError if malformed."""
        data = open_envelope(blob, keys.private_key, binding, replay_guard)
        try:
            magic, length = _SHARE_HDR.unpack_from(data)
            if magic != _SHARE_MAGIC:
                raise ValueError("not a replicated-sharing payload")
            if length != binding.length:
                raise ValueError(f"wrong length: {length} values, expected {binding.length}")
            names, off = _unpack_names(data, _SHARE_HDR.size)
        except (struct.error, UnicodeDecodeError) as exc:
            raise ValueError(f"malformed replicated-sharing payload: {exc}") from None
        if names != sorted(set(names)) or len(names) < MIN_PROXIES:
            raise ValueError(f"payload names an invalid proxy list {names}: needs >= {MIN_PROXIES} distinct, sorted")
        if keys.proxy_id not in names:
            raise ValueError(f"payload was shared over proxies {names}, which do not include {keys.proxy_id!r}")
        shares: dict[str, np.ndarray] = {}
        for label in names:
            if label == keys.proxy_id:
                continue
            kind = data[off] if off < len(data) else None
            off += 1
            if kind == _KIND_SEED:
                seed = bytes(data[off : off + SEED_BYTES])
                if len(seed) != SEED_BYTES:
                    raise ValueError("truncated seed in replicated-sharing payload")
                shares[label] = prg_share(seed, length)
                off += SEED_BYTES
            elif kind == _KIND_SHARE:
                if len(data) - off < 8 * length:
                    raise ValueError(f"wrong length: explicit share has {(len(data) - off) // 8} values, expected {length}")
                shares[label] = np.frombuffer(data, dtype="<u8", offset=off, count=length)  # a view, no copy
                off += 8 * length
            else:
                raise ValueError(f"unknown share kind {kind}")
        if off != len(data):
            raise ValueError(f"{len(data) - off} trailing bytes in replicated-sharing payload")
        return tuple(names), shares

    def _open_all(self, payloads: Mapping[str, bytes], clients: Sequence[str], binding: Binding, keys: ProxyKeyring,
                  replay_guard: ReplayGuard | None, task_ids: Mapping[str, str] | None,
                  proxies: Sequence[str] | None = None
                  ) -> tuple[tuple[str, ...] | None, dict[str, dict[str, np.ndarray]], dict[str, str]]:
        """Open every payload; keep the clients that shared over `proxies` (the list this proxy committed to),
        or without one over the most common proxy list."""
        opened: dict[str, tuple[tuple[str, ...], dict[str, np.ndarray]]] = {}
        rejected: dict[str, str] = {}
        for cid in clients:
            try:
                opened[cid] = self._open_shares(payloads[cid], client_binding(binding, cid, keys.proxy_id, task_ids),
                                                keys, replay_guard)
            except SecurityError as exc:
                rejected[cid] = exc.problem
            except ValueError as exc:
                rejected[cid] = str(exc)
        if not opened:
            return None, {}, rejected
        counts = Counter(names for names, _ in opened.values())
        reference = tuple(sorted(proxies)) if proxies else sorted(counts, key=lambda names: (-counts[names], names))[0]
        kept = {}
        for cid, (names, shares) in opened.items():
            if names == reference:
                kept[cid] = shares
            else:
                rejected[cid] = f"shared over proxies {list(names)}, but this aggregate's clients used {list(reference)}"
        return reference, kept, rejected

    def validate(self, payloads: Mapping[str, bytes], binding: Binding, keys: ProxyKeyring,
                 task_ids: Mapping[str, str] | None = None) -> dict[str, str]:
        """{client: reason} of the payloads this proxy would reject; claims nothing, releases nothing."""
        _require_private(keys)
        return self._open_all(payloads, sorted(payloads), binding, keys, None, task_ids)[2]

    def combine(
        self,
        payloads: Mapping[str, bytes],
        binding: Binding,
        keys: ProxyKeyring,
        min_aggregate: int,
        weights: Mapping[str, float] | None = None,
        replay_guard: ReplayGuard | None = None,
        task_ids: Mapping[str, str] | None = None,
        proxies: Sequence[str] | None = None,
    ) -> CombineResult:
        """Sum every share this proxy holds, per share. `proxies`: the proxy list this proxy committed to
        (`fedveil.secure.quorum`); a payload shared over another list is rejected."""
        _require_private(keys)
        q = self.weight_bits if weights is not None else 0
        factors, rejected = public_weights(weights, sorted(payloads))
        names, opened, bad = self._open_all(payloads, sorted(factors), binding, keys, replay_guard, task_ids, proxies)
        rejected.update(bad)
        included = sorted(opened)
        if len(included) < max(min_aggregate, 1) or names is None:
            raise AggregationRefused(
                f"only {len(included)} valid client payload(s); this proxy aggregates at least {min_aggregate}"
                + (f" (rejected: {rejected})" if rejected else "")
            )
        sums = {label: np.zeros(binding.length, dtype=np.uint64) for label in names if label != keys.proxy_id}
        max_factor = 0
        for cid in included:
            factor = int(round(factors[cid] * 2**q))
            max_factor = max(max_factor, factor)
            for label, share in opened[cid].items():
                sums[label] += share if factor == 1 else share * np.uint64(factor)
        if self.clip is not None:
            fixedpoint.check_overflow(self.clip, self.frac_bits, len(included), max_factor / 2**q, q)
        return CombineResult(encode_partial(keys.proxy_id, names, sums, included, self.frac_bits, q), included,
                             rejected)

    def effective_weight(self, w: float) -> float:
        """The weight the proxies apply: round(w * 2^weight_bits) / 2^weight_bits, as in `secret-sharing`."""
        return round(float(w) * 2**self.weight_bits) / 2**self.weight_bits

    # -- server ----------------------------------------------------------------------------------
    def finish(self, partials: Sequence[bytes], length: int, keys: ServerKeyring) -> np.ndarray:
        parsed = [decode_partial(p) for p in partials]
        if len(parsed) < 2:
            raise ValueError(f"replicated-sharing needs the partials of at least 2 proxies, got {len(parsed)}")
        first = parsed[0]
        holders = [p.holder for p in parsed]
        if len(set(holders)) != len(holders):
            raise ValueError(f"two partials claim the same proxy {holders}; a partial counts once")
        for p in parsed:
            if p.sums and any(s.size != length for s in p.sums.values()):
                raise ValueError(f"partial of {p.holder} has the wrong length, expected {length}")
            if p.proxies != first.proxies:
                raise ValueError(f"proxies {first.holder} and {p.holder} combined shares over different proxy lists")
            if p.holder not in p.proxies or set(p.sums) != set(p.proxies) - {p.holder}:
                raise ValueError(f"partial of {p.holder} does not hold exactly the shares that proxy holds")
            if p.clients != first.clients:
                raise ValueError(
                    f"proxies {first.holder} and {p.holder} combined different client sets; replicated shares of "
                    "two different sets could be subtracted to isolate a client, so this aggregate is refused"
                )
            if (p.frac_bits, p.weight_bits) != (first.frac_bits, first.weight_bits):
                raise ValueError("partials disagree on frac_bits/weight_bits; every proxy must use the same secure config")
        if len(first.clients) < self.min_aggregate:
            raise AggregationRefused(
                f"aggregate holds {len(first.clients)} client(s), fewer than min_aggregate={self.min_aggregate}")
        total = np.zeros(length, dtype=np.uint64)
        for label in first.proxies:
            copies = [(p.holder, p.sums[label]) for p in parsed if label in p.sums]
            if not copies:
                raise ValueError(
                    f"no answering proxy holds the share {label} lacks: the partials of {holders} are not enough; "
                    "every proxy but one must answer")
            ref_holder, ref = copies[0]
            for holder, other in copies[1:]:
                if not np.array_equal(ref, other):
                    raise ValueError(
                        f"proxies {ref_holder} and {holder} report different sums of the same share; one of them "
                        "deviated, so this aggregate is refused instead of decoded into a wrong model")
            total += ref
        out = fixedpoint.decode(total, first.frac_bits, first.weight_bits)
        if not np.all(np.isfinite(out)):
            raise ValueError("decoded aggregate is not finite")
        return out


def _require_private(keys: ProxyKeyring) -> None:
    if keys.private_key is None:
        raise SecurityError(
            f"proxy {keys.proxy_id!r} has no X25519 private key loaded.",
            "start the proxy with its own key bundle (`--keys`), generated on its own host",
        )


# ---- partials ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Partial:
    """A decoded partial: which proxy made it, over which proxies and clients, and its per-share sums
    (keyed by the proxy that lacks the share)."""

    holder: str
    proxies: tuple[str, ...]
    clients: tuple[str, ...]
    sums: dict[str, np.ndarray]
    frac_bits: int
    weight_bits: int


def encode_partial(holder: str, proxies: Sequence[str], sums: Mapping[str, np.ndarray], included: Sequence[str],
                   frac_bits: int, weight_bits: int) -> bytes:
    labels = [p for p in proxies if p != holder]
    length = int(next(iter(sums.values())).size) if sums else 0
    parts = [_PARTIAL_HDR.pack(_PARTIAL_MAGIC, frac_bits, weight_bits, length), _pack_names([holder]),
             _pack_names(list(proxies)), _pack_names(list(included))]
    parts += [np.asarray(sums[label], dtype=np.uint64).astype("<u8").tobytes() for label in labels]
    return b"".join(parts)


def decode_partial(partial: bytes) -> Partial:
    try:
        magic, f, q, length = _PARTIAL_HDR.unpack_from(partial)
        if magic != _PARTIAL_MAGIC:
            raise ValueError("bad magic")
        holder, off = _unpack_names(partial, _PARTIAL_HDR.size)
        proxies, off = _unpack_names(partial, off)
        clients, off = _unpack_names(partial, off)
        if len(holder) != 1:
            raise ValueError("a partial names exactly one proxy")
        labels = [p for p in proxies if p != holder[0]]
        if len(partial) - off != 8 * length * len(labels):
            raise ValueError("length mismatch")
        sums = {}
        for label in labels:
            sums[label] = np.frombuffer(partial, dtype="<u8", offset=off, count=length).astype(np.uint64)
            off += 8 * length
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed replicated-sharing partial: {exc}") from None
    return Partial(holder[0], tuple(proxies), tuple(clients), sums, f, q)


def partial_clients(partial: bytes) -> list[str]:
    """The client ids a replicated-sharing partial includes."""
    return list(decode_partial(partial).clients)


register_mode(NAME, ReplicatedSharingMode)
