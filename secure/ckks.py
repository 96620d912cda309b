"""`ckks` mode: TenSEAL/SEAL CKKS ciphertexts, summed by proxies, decrypted by the server only as a total.

Packing. A CKKS ciphertext of ring degree N has N/2 *complex* slots. The usual real-valued
`ckks_vector` wastes the imaginary half; here each ciphertext carries N reals (x[a:a+N/2] in the real
parts, x[a+N/2:a+N] in the imaginary parts). Additions and multiplications by *real* plaintext
scalars act on real and imaginary parts independently, so aggregation is unchanged. The whole
weighted vector is cut into ceil(length / N) ciphertexts across all layers (no per-layer limit).

Levels and wire format. Right after encryption the client mod-switches every ciphertext down to the
lowest level of the modulus chain (one prime, 60 bits by default): proxies only add, so no level is
needed. The coefficients (uniform below that prime) are bit-packed to exactly the prime's width, so a
value costs 2 * 60 bits = 15 bytes = 3.75x float32 (plus a 64-byte header per ciphertext), against
~8x for `ckks_vector` at N=4096 and ~20x at N=8192 with all levels.

Parameters (default N=8192, coeff [60,40,40,60], scale 2^40, 218 bits: 128-bit secure per the HE
standard, SEAL enforces it). Precision: the lowest-level modulus q0 ~ 2^60 holds |value| * 2^40,
so the *aggregate* must stay below 2^(60-1-40) = 2^19 = 524288 in absolute value per coordinate
(`max_total`); fresh-encryption noise is ~1e-9 per client, i.e. ~1e-7 after 100 clients.

Range. A total beyond max_total wraps modulo q0 and decrypts to a plausible wrong number (two
clients at 300,000 gave -448,576). So each client's values must stay below max_total /
`secure.max_clients` (checked in `protect`), a proxy combines at most `max_clients` clients, and
`finish` refuses to decrypt when the clients it holds could exceed the range at the ciphertexts'
final scale (e.g. weights applied at the lowest level grow the scale by 2^weight_bits).

Weights. With all weights equal the proxy sums first and multiplies once. A multiplication by a
real weight w at the lowest level uses w quantized to `weight_bits` fractional bits (scale grows by
2^weight_bits, which costs that many bits of the range above); ciphertexts sent with spare levels
(`spare_levels=1`) are multiplied at full precision and rescaled instead. `effective_weight`
returns the weight actually applied, so the server can normalize with the same numbers.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
import threading
from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np

from fedveil.secure.errors import RangeError, SecurityError
from fedveil.secure.envelope import open_envelope, seal
from fedveil.secure.modes import (
    AggregationRefused,
    Binding,
    ClientKeyring,
    CombineResult,
    ProxyKeyring,
    ReplayGuard,
    ServerKeyring,
    balanced_groups,
    public_weights,
    client_binding,
    register_mode,
)

NAME = "ckks"
# Largest total coefficient-modulus bits for 128-bit security (HomomorphicEncryption.org standard, ternary secret).
MAX_BITS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
KEYS_FIX = "run `fedveil keys init` to provision the CKKS contexts and give each party its own key files"
RANGE_FIX = ("set secure.max_clients (in every party's config) to the most clients one aggregate really holds, e.g. "
             "the number of organizations: each client's values must stay below max_total / secure.max_clients")

_CT_MAGIC = b"FVC1"
_CT_HDR = struct.Struct("<4sIBBd4Q")  # magic, N, n_primes, size, scale, parms_id
_PAYLOAD_HDR = struct.Struct(">4sQI")  # magic, length, n_ct
_PAYLOAD_MAGIC = b"FVK1"
_PARTIAL_MAGIC = b"FVKP"


def make_ckks_context(poly_degree: int = 8192, coeff_bits: Sequence[int] = (60, 40, 40, 60), scale_bits: int = 40) -> tuple[bytes, bytes]:
    """A fresh CKKS context: (secret context bytes for the server, public context bytes for clients/proxies).

    The public context holds the public encryption key only: no secret key, no relinearization or
    Galois keys (not needed for additions and plaintext multiplications).
    """
    import tenseal as ts

    check_params(poly_degree, coeff_bits, scale_bits)
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=int(poly_degree), coeff_mod_bit_sizes=list(coeff_bits))
    ctx.global_scale = 2.0**scale_bits
    secret = ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    public = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    return secret, public


def check_params(poly_degree: int, coeff_bits: Sequence[int], scale_bits: int) -> None:
    """Refuse parameters below 128-bit security or that cannot hold a value at the lowest level."""
    if poly_degree not in MAX_BITS_128:
        raise ValueError(f"secure.ckks.poly_degree must be one of {sorted(MAX_BITS_128)}, got {poly_degree}")
    total = sum(coeff_bits)
    if total > MAX_BITS_128[poly_degree]:
        raise ValueError(
            f"CKKS coeff modulus of {total} bits exceeds the 128-bit-security limit of {MAX_BITS_128[poly_degree]} bits "
            f"for N={poly_degree}; use fewer/smaller primes or a larger secure.ckks.poly_degree"
        )
    if len(coeff_bits) < 2:
        raise ValueError("secure.ckks.coeff_bits needs at least 2 primes (data + special prime)")
    if coeff_bits[0] <= scale_bits + 8:
        raise ValueError(
            f"first prime ({coeff_bits[0]} bits) must exceed the scale ({scale_bits} bits) by > 8 bits to hold values"
        )


# -- runtime: a loaded context plus its SEAL helpers, cached per context bytes ------------------


class _Runtime:
    def __init__(self, ctx_bytes: bytes) -> None:
        import tenseal as ts
        import tenseal.sealapi as sealapi

        self.sealapi = sealapi
        try:
            self.ts_ctx = ts.context_from(ctx_bytes)
        except Exception as exc:  # noqa: BLE001 - TenSEAL raises assorted types for bad bytes
            raise SecurityError(f"CKKS context cannot be loaded ({exc}).", KEYS_FIX) from None
        self.sc = self.ts_ctx.seal_context().data
        self.scale = float(self.ts_ctx.global_scale)
        self.encoder = sealapi.CKKSEncoder(self.sc)
        self.evaluator = sealapi.Evaluator(self.sc)
        self.n = 2 * self.encoder.slot_count()
        self.has_secret = bool(self.ts_ctx.has_secret_key())
        self.encryptor = sealapi.Encryptor(self.sc, self.ts_ctx.public_key().data) if self.ts_ctx.has_public_key() else None
        self.decryptor = sealapi.Decryptor(self.sc, self.ts_ctx.secret_key().data) if self.has_secret else None
        # modulus chain: parms_id -> primes, from first data level down to last
        self.levels: list[tuple[list[int], list[int]]] = []  # (parms_id, primes)
        cd = self.sc.first_context_data()
        while cd is not None:
            self.levels.append((list(cd.parms_id()), [m.value() for m in cd.parms().coeff_modulus()]))
            cd = cd.next_context_data()
        self.primes_by_parms = {tuple(p): primes for p, primes in self.levels}
        self._seal_version = self._probe_version()

    def _probe_version(self) -> tuple[int, int]:
        ct = self.sealapi.Ciphertext(self.sc)
        with _TempFile() as path:
            ct.save(path)
            head = open(path, "rb").read(16)
        if head[:2] != b"\x5e\xa1":
            raise RuntimeError("unexpected SEAL serialization header")
        return head[3], head[4]

    def max_total(self) -> float:
        """|value| a fresh ciphertext holds at the lowest level: 2^(bits(q0) - 1) / scale."""
        return self.capacity(self.levels[-1][1], self.scale)

    @staticmethod
    def capacity(primes: Sequence[int], scale: float) -> float:
        """|value| a ciphertext over `primes` at `scale` holds without wrapping (same convention as max_total)."""
        return 2.0 ** (math.prod(primes).bit_length() - 1) / float(scale)

    # ciphertext <-> compact bytes -------------------------------------------------------------
    def ct_to_bytes(self, ct) -> bytes:
        parms = ct.parms_id()
        primes = self.primes_by_parms[tuple(parms)]
        n, L, size = ct.poly_modulus_degree(), ct.coeff_modulus_size(), ct.size()
        count = size * L * n
        raw = self._raw_coefficients(ct, count)
        if raw is None:  # slow but always correct: element-wise reads
            da = ct.dyn_array()
            raw = np.fromiter((da[i] for i in range(count)), dtype=np.uint64, count=count)
        raw = raw.reshape(size, L, n)
        out = [_CT_HDR.pack(_CT_MAGIC, n, L, size, float(ct.scale), *parms)]
        for j, p in enumerate(primes):
            out.append(_pack_bits(raw[:, j, :].ravel(), p.bit_length()))
        return b"".join(out)

    def _raw_coefficients(self, ct, count: int) -> np.ndarray | None:
        """Fast path: SEAL's own serialization, unwrapped (none / zlib / zstd stored as raw blocks)."""
        with _TempFile() as path:
            ct.save(path)
            with open(path, "rb") as fh:
                blob = fh.read()
        if len(blob) < 16 or blob[:2] != b"\x5e\xa1":
            return None
        mode = blob[5]
        if mode == 0:
            content = blob[16:]
        elif mode == 1:
            import zlib

            try:
                content = zlib.decompress(blob[16:])
            except zlib.error:
                return None
        elif mode == 2:
            content = _zstd_stored_content(blob, 16)
            if content is None:
                return None
        else:
            return None
        if len(content) < 8 * count + 8 or struct.unpack_from("<Q", content, len(content) - 8 * count - 8)[0] != count:
            return None
        if list(struct.unpack_from("<4Q", content, 0)) != list(ct.parms_id()):
            return None
        return np.frombuffer(content, dtype="<u8", offset=len(content) - 8 * count, count=count).astype(np.uint64)

    def ct_from_bytes(self, blob: bytes, offset: int = 0) -> tuple[object, int]:
        magic, n, L, size, scale, *parms = _CT_HDR.unpack_from(blob, offset)
        if magic != _CT_MAGIC or n != self.n or size != 2:
            raise ValueError("not a CKKS ciphertext for this context")
        primes = self.primes_by_parms.get(tuple(parms))
        if primes is None or len(primes) != L:
            raise ValueError("CKKS ciphertext is at an unknown level of this context")
        if not (math.isfinite(scale) and scale >= 1.0):
            raise ValueError("CKKS ciphertext has an invalid scale")
        off = offset + _CT_HDR.size
        data = np.empty((size, L, n), dtype=np.uint64)
        for j, p in enumerate(primes):
            w = p.bit_length()
            nbytes = (size * n * w + 7) // 8
            if off + nbytes > len(blob):
                raise ValueError("truncated CKKS ciphertext")
            vals = _unpack_bits(blob[off : off + nbytes], w, size * n)
            if np.any(vals >= np.uint64(p)):
                raise ValueError("CKKS ciphertext coefficient out of range")
            data[:, j, :] = vals.reshape(size, n)
            off += nbytes
        body = data.astype("<u8").tobytes()
        count = size * L * n
        dyn = _seal_header(16 + 8 + len(body), self._seal_version) + struct.pack("<Q", count) + body
        members = struct.pack("<4QBQQQdQ", *parms, 1, size, n, L, scale, 1) + dyn
        seal_blob = _seal_header(16 + len(members), self._seal_version) + members
        ct = self.sealapi.Ciphertext(self.sc)
        with _TempFile() as path:
            with open(path, "wb") as fh:
                fh.write(seal_blob)
            try:
                ct.load(self.sc, path)
            except Exception as exc:  # noqa: BLE001
                raise ValueError(f"CKKS ciphertext rejected by SEAL: {exc}") from None
        return ct, off

    # arithmetic --------------------------------------------------------------------------------
    def encrypt_reals(self, x: np.ndarray, spare_levels: int = 0) -> list:
        half = self.n // 2
        n_ct = max(1, math.ceil(x.size / self.n))
        padded = np.zeros(n_ct * self.n)
        padded[: x.size] = x
        target = self.levels[max(0, len(self.levels) - 1 - int(spare_levels))][0]
        cts = []
        for k in range(n_ct):
            chunk = padded[k * self.n : (k + 1) * self.n]
            pt = self.sealapi.Plaintext()
            self.encoder.encode((chunk[:half] + 1j * chunk[half:]).tolist(), self.scale, pt)
            ct = self.sealapi.Ciphertext(self.sc)
            self.encryptor.encrypt(pt, ct)
            if list(ct.parms_id()) != target:
                self.evaluator.mod_switch_to_inplace(ct, target)
            cts.append(ct)
        return cts

    def multiply_scalar(self, ct, w: float, weight_bits: int) -> None:
        primes = self.primes_by_parms[tuple(ct.parms_id())]
        pt = self.sealapi.Plaintext()
        if len(primes) > 1:  # full precision: multiply at scale = last prime, then rescale it away
            self.encoder.encode(float(w), ct.parms_id(), float(primes[-1]), pt)
            self.evaluator.multiply_plain_inplace(ct, pt)
            self.evaluator.rescale_to_next_inplace(ct)
        else:  # lowest level: integer round(w * 2^q), scale grows by 2^q
            self.encoder.encode(float(w), ct.parms_id(), float(2**weight_bits), pt)
            self.evaluator.multiply_plain_inplace(ct, pt)

    def align(self, cts: list, parms: list[int], scale: float) -> None:
        for ct in cts:
            if list(ct.parms_id()) != parms:
                self.evaluator.mod_switch_to_inplace(ct, parms)
            ratio = scale / ct.scale
            if abs(ratio - 1.0) > 1e-9:
                if ratio < 1.0 or abs(ratio - round(ratio)) > 1e-6:
                    raise ValueError("partials carry incompatible CKKS scales")
                pt = self.sealapi.Plaintext()
                self.encoder.encode(1.0, ct.parms_id(), ratio, pt)
                self.evaluator.multiply_plain_inplace(ct, pt)

    def decrypt_reals(self, ct) -> np.ndarray:
        pt = self.sealapi.Plaintext()
        self.decryptor.decrypt(ct, pt)
        z = np.asarray(self.encoder.decode_complex(pt))
        return np.concatenate([z.real, z.imag])


_CACHE: "OrderedDict[bytes, _Runtime]" = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _runtime(ctx_bytes: bytes) -> _Runtime:
    key = hashlib.sha256(ctx_bytes).digest()
    with _CACHE_LOCK:
        rt = _CACHE.get(key)
        if rt is not None:
            _CACHE.move_to_end(key)
            return rt
    rt = _Runtime(ctx_bytes)
    with _CACHE_LOCK:
        _CACHE[key] = rt
        while len(_CACHE) > 4:
            _CACHE.popitem(last=False)
    return rt


def max_total(ckks_context: bytes) -> float:
    """Largest |aggregate| per coordinate the context represents without wrapping (2^19 for the defaults)."""
    return _runtime(ckks_context).max_total()


def effective_weight(w: float, weight_bits: int = 8) -> float:
    """The weight a proxy actually applies at the lowest level: round(w * 2^q) / 2^q."""
    return round(float(w) * 2**weight_bits) / 2**weight_bits


class CKKSMode:
    """CKKS aggregation: one proxy per client (balanced groups), server decrypts only totals."""

    name = NAME

    def __init__(self, min_aggregate: int = 2, weight_bits: int = 8, spare_levels: int = 0,
                 max_clients: int = 256) -> None:
        self.min_aggregate = int(min_aggregate)
        self.max_clients = max(1, int(max_clients))
        self.weight_bits = int(weight_bits)
        self.spare_levels = int(spare_levels)

    def assign(self, client_ids: Sequence[str], proxy_ids: Sequence[str], min_aggregate: int) -> dict[str, list[str]]:
        return balanced_groups(client_ids, proxy_ids, min_aggregate)

    def client_bound(self, rt: "_Runtime") -> float:
        """Largest |value| one client may send: max_total / max_clients, so no total of max_clients can wrap."""
        return rt.max_total() / self.max_clients

    def effective_weight(self, w: float) -> float:
        """The weight the proxies apply: exact (2^-40 scale) with a spare level, else on a 2^-weight_bits grid."""
        return float(w) if self.spare_levels > 0 else effective_weight(w, self.weight_bits)

    # -- client ----------------------------------------------------------------------------
    def protect(self, vector: np.ndarray, proxies: Sequence[str], binding: Binding, keys: ClientKeyring) -> dict[str, bytes]:
        if len(proxies) != 1:
            raise ValueError(f"ckks sends each client's ciphertexts to exactly one proxy, got {list(proxies)}")
        proxy = proxies[0]
        if keys.ckks_public_context is None:
            raise SecurityError("this client holds no CKKS public context.", KEYS_FIX)
        if proxy not in keys.proxy_public_keys:
            raise SecurityError(f"no provisioned public key for proxy {proxy!r}.", KEYS_FIX)
        x = np.asarray(vector, dtype=np.float64).ravel()
        if x.size != binding.length:
            raise ValueError(f"vector has {x.size} values but the binding says {binding.length}")
        if not np.all(np.isfinite(x)):
            raise ValueError("update contains NaN or infinite values")
        rt = _runtime(keys.ckks_public_context)
        if rt.encryptor is None:
            raise SecurityError("CKKS context has no public key.", KEYS_FIX)
        limit = self.client_bound(rt)
        if x.size and np.max(np.abs(x)) >= limit:
            raise RangeError(
                f"update value {np.max(np.abs(x)):.3g} exceeds the CKKS per-client range max_total / "
                f"secure.max_clients = {rt.max_total():.3g} / {self.max_clients} = {limit:.3g}, so a total could wrap.",
                RANGE_FIX,
            )
        cts = rt.encrypt_reals(x, self.spare_levels)
        body = [_PAYLOAD_HDR.pack(_PAYLOAD_MAGIC, x.size, len(cts))] + [rt.ct_to_bytes(c) for c in cts]
        return {proxy: seal(b"".join(body), keys.proxy_public_keys[proxy], _replace(binding, proxy_id=proxy))}

    # -- proxy -----------------------------------------------------------------------------
    def _open(self, rt: _Runtime, blob: bytes, binding: Binding, keys: ProxyKeyring, guard: ReplayGuard | None) -> list:
        data = open_envelope(blob, keys.private_key, binding, guard)
        if len(data) < _PAYLOAD_HDR.size:
            raise ValueError("ckks payload too short")
        magic, length, n_ct = _PAYLOAD_HDR.unpack_from(data)
        if magic != _PAYLOAD_MAGIC:
            raise ValueError("not a ckks payload")
        if length != binding.length:
            raise ValueError(f"wrong length: {length} values, expected {binding.length}")
        if n_ct != max(1, math.ceil(length / rt.n)):
            raise ValueError(f"wrong number of ciphertexts: {n_ct}")
        cts, off = [], _PAYLOAD_HDR.size
        for _ in range(n_ct):
            ct, off = rt.ct_from_bytes(data, off)
            if abs(ct.scale - rt.scale) > 1e-6 * rt.scale:
                raise ValueError("ciphertext scale differs from the context scale")
            cts.append(ct)
        if off != len(data):
            raise ValueError("trailing bytes after ciphertexts")
        if len({tuple(c.parms_id()) for c in cts}) != 1:
            raise ValueError("ciphertexts at mixed levels")
        return cts

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
        if keys.private_key is None:
            raise SecurityError(f"proxy {keys.proxy_id!r} has no X25519 private key loaded.", KEYS_FIX)
        if keys.ckks_public_context is None:
            raise SecurityError(f"proxy {keys.proxy_id!r} holds no CKKS public context.", KEYS_FIX)
        rt = _runtime(keys.ckks_public_context)
        opened: dict[str, list] = {}
        factors, rejected = public_weights(weights, sorted(payloads))
        for cid in factors:
            try:
                opened[cid] = self._open(rt, payloads[cid], client_binding(binding, cid, keys.proxy_id, task_ids), keys,
                                         replay_guard)
            except SecurityError as exc:
                rejected[cid] = exc.problem
            except ValueError as exc:
                rejected[cid] = str(exc)
        # a client at another level than the majority cannot be added: reject it
        if opened:
            levels = [tuple(c[0].parms_id()) for c in opened.values()]
            common = max(set(levels), key=levels.count)
            for cid in [c for c, cts in opened.items() if tuple(cts[0].parms_id()) != common]:
                rejected[cid] = "ciphertexts at a different level than the other clients'"
                del opened[cid]
        included = sorted(opened)
        if len(included) > self.max_clients:
            raise AggregationRefused(
                f"{len(included)} clients exceed secure.max_clients={self.max_clients}: their total could leave the "
                "CKKS range and decrypt to a wrong model; raise secure.max_clients (every party's config) or "
                "aggregate fewer clients"
            )
        if len(included) < max(min_aggregate, 1):
            raise AggregationRefused(
                f"only {len(included)} valid client payload(s); this proxy aggregates at least {min_aggregate}"
                + (f" (rejected: {rejected})" if rejected else "")
            )
        ws = {cid: factors[cid] for cid in included}
        same = len(set(ws.values())) == 1
        total = None
        for cid in included:
            cts = opened[cid]
            if not same:
                for ct in cts:
                    rt.multiply_scalar(ct, ws[cid], self.weight_bits)
            if total is None:
                total = cts
            else:
                for acc, ct in zip(total, cts):
                    rt.evaluator.add_inplace(acc, ct)
        w0 = ws[included[0]]
        if same and w0 != 1.0:
            for ct in total:
                rt.multiply_scalar(ct, w0, self.weight_bits)
        return CombineResult(_encode_partial(rt, total, included, binding.length), included, rejected)

    # -- server ----------------------------------------------------------------------------
    def finish(self, partials: Sequence[bytes], length: int, keys: ServerKeyring) -> np.ndarray:
        if keys.ckks_secret_context is None:
            raise SecurityError("the server holds no CKKS secret context, so it cannot decrypt.", KEYS_FIX)
        rt = _runtime(keys.ckks_secret_context)
        if rt.decryptor is None:
            raise SecurityError("the CKKS context given to the server has no secret key (a public context cannot decrypt).", KEYS_FIX)
        if not partials:
            raise AggregationRefused("no partials to aggregate")
        # check every partial's header BEFORE touching any ciphertext: never decrypt a small group
        headers = [_partial_header(p) for p in partials]
        seen: set[str] = set()
        for ids, plen, _ in headers:
            if len(ids) < self.min_aggregate:
                raise AggregationRefused(
                    f"a partial aggregates only {len(ids)} client(s) (< min_aggregate={self.min_aggregate}); "
                    "the server refuses to decrypt it"
                )
            if plen != length:
                raise ValueError(f"partial has length {plen}, expected {length}")
            dup = seen.intersection(ids)
            if dup:
                raise ValueError(f"client(s) {sorted(dup)} appear in more than one partial")
            seen.update(ids)
        if len(seen) < self.min_aggregate:
            raise AggregationRefused(f"total holds {len(seen)} client(s), fewer than min_aggregate={self.min_aggregate}")
        if len(seen) > self.max_clients:
            raise RangeError(f"the partials hold {len(seen)} clients, more than secure.max_clients={self.max_clients}; "
                             "their total could have wrapped, so the server refuses to decrypt it.", RANGE_FIX)
        all_cts = [_partial_cts(rt, p, off) for p, (_, _, off) in zip(partials, headers)]
        n_ct = len(all_cts[0])
        if any(len(c) != n_ct for c in all_cts) or n_ct != max(1, math.ceil(length / rt.n)):
            raise ValueError("partials carry a wrong number of ciphertexts")
        flat = [ct for cts in all_cts for ct in cts]
        order = [p for p, _ in rt.levels]
        deepest = max(order.index(list(ct.parms_id())) for ct in flat)
        rt.align(flat, order[deepest], max(ct.scale for ct in flat))
        self._check_range(rt, len(seen), rt.levels[deepest][1], flat[0].scale)
        out = []
        for k in range(n_ct):
            acc = all_cts[0][k]
            for cts in all_cts[1:]:
                rt.evaluator.add_inplace(acc, cts[k])
            out.append(rt.decrypt_reals(acc))
        total = np.concatenate(out)[:length]
        if not np.all(np.isfinite(total)):
            raise ValueError("decrypted aggregate is not finite")
        return total


    def _check_range(self, rt: "_Runtime", clients: int, primes: Sequence[int], scale: float) -> None:
        """Refuse a total that could exceed what the ciphertexts represent at their final level and scale.

        Each client sent |x| < client_bound and every weight is <= 1, so |total| < clients * client_bound.
        """
        capacity = rt.capacity(primes, scale)
        worst = clients * self.client_bound(rt)
        if worst > capacity:
            raise RangeError(
                f"a total of {clients} clients could reach {worst:.3g}, beyond the {capacity:.3g} the ciphertexts hold "
                f"at scale 2^{math.log2(scale):.0f} (weights applied at the lowest level grow the scale), so it could "
                "decrypt to a wrong model.",
                "weight with a spare level (async and semi-sync-carry configs send one: secure option "
                "spare_levels=1), or " + RANGE_FIX,
            )


# -- partials ------------------------------------------------------------------------------------


def _encode_partial(rt: _Runtime, cts: list, included: Sequence[str], length: int) -> bytes:
    parts = [_PARTIAL_MAGIC, struct.pack(">QII", length, len(included), len(cts))]
    for cid in included:
        b = cid.encode("utf-8")
        parts.append(struct.pack(">I", len(b)) + b)
    parts.extend(rt.ct_to_bytes(c) for c in cts)
    return b"".join(parts)


def _partial_header(partial: bytes) -> tuple[list[str], int, int]:
    try:
        if partial[:4] != _PARTIAL_MAGIC:
            raise ValueError("bad magic")
        length, n_ids, _ = struct.unpack_from(">QII", partial, 4)
        off = 4 + 16
        ids = []
        for _ in range(n_ids):
            (m,) = struct.unpack_from(">I", partial, off)
            ids.append(bytes(partial[off + 4 : off + 4 + m]).decode("utf-8"))
            off += 4 + m
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed ckks partial: {exc}") from None
    if len(set(ids)) != len(ids):
        raise ValueError("ckks partial lists a client twice")
    return ids, length, off


def partial_clients(partial: bytes) -> list[str]:
    """The client ids a ckks partial aggregates (read from its header; nothing is decrypted)."""
    return _partial_header(partial)[0]


def _partial_cts(rt: _Runtime, partial: bytes, off: int) -> list:
    (_, _, n_ct) = struct.unpack_from(">QII", partial, 4)
    cts = []
    for _ in range(n_ct):
        ct, off = rt.ct_from_bytes(partial, off)
        cts.append(ct)
    if off != len(partial):
        raise ValueError("trailing bytes in ckks partial")
    return cts


# -- helpers -------------------------------------------------------------------------------------


def _replace(binding: Binding, **kw) -> Binding:
    from dataclasses import replace

    return replace(binding, **kw)


def _zstd_stored_content(blob: bytes, off: int) -> bytes | None:
    """Content of a zstd frame whose blocks are all raw/RLE (what zstd emits for incompressible
    ciphertexts); None if any block is really compressed. Not a decompressor."""
    try:
        if struct.unpack_from("<I", blob, off)[0] != 0xFD2FB528:
            return None
        fhd = blob[off + 4]
        fcs_flag, single, dict_flag = fhd >> 6, (fhd >> 5) & 1, fhd & 3
        pos = off + 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
        parts = []
        while True:
            h = int.from_bytes(blob[pos : pos + 3], "little")
            pos += 3
            last, btype, size = h & 1, (h >> 1) & 3, h >> 3
            if btype == 0:
                if pos + size > len(blob):
                    return None
                parts.append(blob[pos : pos + size])
                pos += size
            elif btype == 1:
                parts.append(blob[pos : pos + 1] * size)
                pos += 1
            else:
                return None
            if last:
                return b"".join(parts)
    except (IndexError, struct.error):
        return None


def _seal_header(total_size: int, version: tuple[int, int]) -> bytes:
    # SEAL SEALHeader: magic 0xA15E, header size 16, version major/minor, compr_mode none, reserved, size
    return struct.pack("<HBBBBHQ", 0xA15E, 16, version[0], version[1], 0, 0, total_size)


def _pack_bits(values: np.ndarray, width: int) -> bytes:
    """Keep the low `width` bits of each uint64, little-endian bit order, concatenated."""
    if width == 64:
        return values.astype("<u8").tobytes()
    bits = np.unpackbits(values.astype("<u8").view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :width]
    return np.packbits(bits.ravel(), bitorder="little").tobytes()


def _unpack_bits(data: bytes, width: int, count: int) -> np.ndarray:
    if width == 64:
        return np.frombuffer(data, dtype="<u8", count=count).astype(np.uint64)
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * width].reshape(count, width)
    full = np.zeros((count, 64), dtype=np.uint8)
    full[:, :width] = bits
    return np.packbits(full, axis=1, bitorder="little").view("<u8").ravel().astype(np.uint64)


class _TempFile:
    """A private temp file path (tmpfs when available) removed on exit; SEAL's Python API saves/loads via paths."""

    _dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

    def __enter__(self) -> str:
        fd, self.path = tempfile.mkstemp(prefix="fedveil-ckks-", dir=self._dir)
        os.close(fd)
        return self.path

    def __exit__(self, *exc) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


register_mode(NAME, CKKSMode)
