"""The secure-aggregation mode contract: protect (client), combine (proxy), finish (server).

The round engines only ever talk to a mode through these functions, so a new mode plugs in
without touching them. Everything here is pure: arrays and bytes in, arrays and bytes out.

Vectors are flat float64 arrays that the client has *already weighted* by its sample count
n_i, so the server's total is sum_i n_i * delta_i and it divides by sum_i n_i itself.
Proxies may apply extra per-client factors (async staleness weights) in `combine`: the proxy
computes them itself from its own config (`fedveil.secure.staleness`); a mode only accepts
factors in (0, 1] (`public_weights`), never a zero that would silently drop a counted client.

Async aggregates mix payloads of different train tasks: each payload stays bound to the task it
answered, so `combine` and `validate` take `task_ids` ({client: task id}) to open each envelope
against its own task, while `binding.task_id` names the aggregate itself. `effective_weight`
says which weight a mode really applies (fixed-point grids), so the server normalizes with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class Binding:
    """What a payload is bound to; sealed envelopes authenticate all of it as AAD."""

    run_id: str
    task_id: str
    client_id: str
    proxy_id: str
    mode: str
    length: int


@dataclass(frozen=True)
class ClientKeyring:
    """What an organization holds: proxy public keys (from provisioning) and the CKKS public context."""

    proxy_public_keys: Mapping[str, bytes] = field(default_factory=dict)
    ckks_public_context: bytes | None = None


@dataclass(frozen=True)
class ProxyKeyring:
    """What a proxy holds: its own X25519 private key, the CKKS public context, and its peers' X25519
    public keys from the pinned manifest (pairwise quorum keys, `fedveil.secure.quorum`)."""

    proxy_id: str
    private_key: bytes | None = None
    ckks_public_context: bytes | None = None
    peer_public_keys: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerKeyring:
    """What the server holds: the CKKS secret context (the decryptor role)."""

    ckks_secret_context: bytes | None = None


@dataclass
class CombineResult:
    """A proxy's partial aggregate plus which clients made it in and why others did not."""

    partial: bytes
    included: list[str]
    rejected: dict[str, str] = field(default_factory=dict)


class ReplayGuard(Protocol):
    """Remembers envelope ids a proxy has opened; `claim` returns False on reuse."""

    def claim(self, envelope_id: bytes) -> bool: ...


class SecureMode(Protocol):
    """One secure-aggregation mode. Implementations are stateless."""

    name: str

    def assign(self, client_ids: Sequence[str], proxy_ids: Sequence[str], min_aggregate: int) -> dict[str, list[str]]:
        """Which proxies each client sends a payload to."""
        ...

    def protect(self, vector: np.ndarray, proxies: Sequence[str], binding: Binding, keys: ClientKeyring) -> dict[str, bytes]:
        """Client side: one payload per proxy in `proxies`. `binding.proxy_id` is ignored and set per proxy."""
        ...

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
        """Proxy side: open, guard, and sum the payloads (keyed by client id). `binding.client_id` is ignored.

        `weights` are the factors the proxy computed from its own config (staleness weights in (0, 1],
        `fedveil.secure.staleness`), never values taken from the server. `task_ids` (optional) gives the
        train task each client's payload is bound to; clients not in it (or all, when it is None) are
        opened against `binding.task_id`.
        """
        ...

    def finish(self, partials: Sequence[bytes], length: int, keys: ServerKeyring) -> np.ndarray:
        """Server side: turn the proxies' partials into the float64 total sum_i w_i n_i delta_i."""
        ...


def client_binding(binding: Binding, client_id: str, proxy_id: str, task_ids: Mapping[str, str] | None = None) -> Binding:
    """The binding one client's payload was sealed under: its own train task when `task_ids` names one."""
    from dataclasses import replace

    task_id = binding.task_id if not task_ids else str(task_ids.get(client_id, binding.task_id))
    return replace(binding, client_id=client_id, proxy_id=proxy_id, task_id=task_id)


def applied_weight(mode: object, weight: float) -> float:
    """The weight `mode`'s proxies really apply for `weight` (a mode without a grid applies it as is)."""
    quantize = getattr(mode, "effective_weight", None)
    return float(weight) if quantize is None else float(quantize(weight))


class AggregationRefused(Exception):
    """A proxy refuses to release an aggregate (too few distinct clients survived the guards)."""


def balanced_groups(client_ids: Sequence[str], proxy_ids: Sequence[str], min_aggregate: int) -> dict[str, list[str]]:
    """Assign each client to exactly one proxy so that every used proxy gets >= min_aggregate clients.

    Uses as many proxies as the group-size floor allows, round-robin over sorted ids, so the
    groups differ in size by at most one and the assignment is deterministic.
    """
    clients = sorted(client_ids)
    proxies = sorted(proxy_ids)
    if not proxies:
        raise ValueError("no proxies available")
    used = max(1, min(len(proxies), len(clients) // max(1, min_aggregate)))
    return {cid: [proxies[i % used]] for i, cid in enumerate(clients)}


def public_weights(weights: Mapping[str, float] | None, client_ids: Sequence[str]) -> tuple[dict[str, float], dict[str, str]]:
    """Each client's factor (1.0 without weights), and the clients whose factor is unusable.

    Every mode applies the same rule, so a factor outside (0, 1] is rejected the same way whether the
    proxy sums floats, shares or ciphertexts: a zero (or tiny) factor would count a client as
    included while dropping its update, and a factor above 1 would let one client outweigh the rest.
    The proxy's own staleness floor (`fedveil.secure.staleness.weight_floor`) is the tighter bound.
    """
    factors: dict[str, float] = {}
    invalid: dict[str, str] = {}
    for cid in client_ids:
        w = 1.0 if weights is None else float(weights.get(cid, 1.0))
        if math.isfinite(w) and 0 < w <= 1:
            factors[cid] = w
        else:
            invalid[cid] = f"invalid weight {w}: a staleness weight lies in (0, 1]"
    return factors, invalid


def _check_vector(vector: np.ndarray) -> np.ndarray:
    arr = np.asarray(vector, dtype=np.float64).ravel()
    if not np.all(np.isfinite(arr)):
        raise ValueError("update contains NaN or infinite values")
    return arr


class PlaintextMode:
    """`none`: the comparison baseline. Clients send raw float32 vectors, as Flower does.

    float32 on the wire keeps every secure/plaintext byte ratio honest (float64 made them look 2x
    better); proxies and the server sum in float64. It still goes through the proxies and their
    guards so that the engines exercise the same path as the secure modes. It protects nothing:
    never use it with real data.
    """

    wire_dtype = np.dtype("<f4")

    name = "none"

    def assign(self, client_ids: Sequence[str], proxy_ids: Sequence[str], min_aggregate: int) -> dict[str, list[str]]:
        return balanced_groups(client_ids, proxy_ids, min_aggregate)

    def protect(self, vector: np.ndarray, proxies: Sequence[str], binding: Binding, keys: ClientKeyring) -> dict[str, bytes]:
        data = _check_vector(vector).astype(self.wire_dtype).tobytes()
        return {p: data for p in proxies}

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
        total = np.zeros(binding.length, dtype=np.float64)
        included: list[str] = []
        factors, rejected = public_weights(weights, sorted(payloads))
        for cid, factor in factors.items():
            blob = payloads[cid]
            size = self.wire_dtype.itemsize
            if len(blob) != binding.length * size:
                rejected[cid] = f"wrong length: {len(blob) // size} values, expected {binding.length}"
                continue
            vec = np.frombuffer(blob, dtype=self.wire_dtype).astype(np.float64)
            if not np.all(np.isfinite(vec)):
                rejected[cid] = "non-finite values in update"
                continue
            total += vec * factor
            included.append(cid)
        if len(included) < min_aggregate:
            raise AggregationRefused(
                f"only {len(included)} valid client payload(s); this proxy aggregates at least {min_aggregate}"
                + (f" (rejected: {rejected})" if rejected else "")
            )
        return CombineResult(total.tobytes(), included, rejected)

    def effective_weight(self, w: float) -> float:
        return float(w)

    def finish(self, partials: Sequence[bytes], length: int, keys: ServerKeyring) -> np.ndarray:
        total = np.zeros(length, dtype=np.float64)
        for p in partials:
            total += np.frombuffer(p, dtype=np.float64)
        return total


_REGISTRY: dict[str, Callable[[], SecureMode]] = {"none": PlaintextMode}


def register_mode(name: str, factory: Callable[[], SecureMode]) -> None:
    """Make a mode available to the engines under `name`."""
    _REGISTRY[name] = factory


def get_mode(name: str, **options: object) -> SecureMode:
    """Look a mode up by its config name (`none`, `secret-sharing`, `ckks`), configured with `options`.

    Options a mode does not take are ignored, so callers can pass one set for every mode.
    """
    import inspect

    _load_builtin_modes()
    if name not in _REGISTRY:
        raise KeyError(f"unknown secure mode {name!r}; choose one of {sorted(_REGISTRY)}")
    factory = _REGISTRY[name]
    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in options.items() if k in accepted})


def available_modes() -> list[str]:
    _load_builtin_modes()
    return sorted(_REGISTRY)


def _load_builtin_modes() -> None:
    """Import the optional mode modules so they register themselves (they may not exist yet)."""
    import importlib

    for module in ("fedveil.secure.sharing", "fedveil.secure.replicated", "fedveil.secure.ckks"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
