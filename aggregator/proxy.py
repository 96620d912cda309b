"""The proxy role: open the payloads addressed to this proxy, enforce the guards, and combine.

A proxy runs every message in a fresh process (Flower cold-starts the ClientApp), so the replay
guard lives in SQLite in the proxy's work dir: an envelope opens at most once, ever.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from fedveil.secure.modes import AggregationRefused, Binding, CombineResult, ProxyKeyring, get_mode


@dataclass(frozen=True)
class ProxyIdentity:
    name: str
    workdir: Path
    keys_dir: str
    min_aggregate: int = 2  # this proxy's own floor; a server cannot lower it

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "ProxyIdentity":
        name = str(node_config.get("name", "")) or "proxy"
        return cls(
            name=name,
            workdir=Path(str(node_config.get("workdir", "")) or f"fedveil-{name}"),
            keys_dir=str(node_config.get("keys", "")),
            min_aggregate=int(node_config.get("min-aggregate", 2)),
        )


class SqliteReplayGuard:
    """Durable set of opened envelope ids; `claim` is atomic, so a replay is refused across restarts."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS opened (id BLOB PRIMARY KEY, ts REAL NOT NULL)")

    def claim(self, envelope_id: bytes) -> bool:
        try:
            self._db.execute("INSERT INTO opened (id, ts) VALUES (?, ?)", (bytes(envelope_id), time.time()))
            return True
        except sqlite3.IntegrityError:
            return False

    def close(self) -> None:
        self._db.close()


def proxy_keyring(identity: ProxyIdentity) -> ProxyKeyring:
    """This proxy's private key and the CKKS public context, from its provisioned bundle."""
    if not identity.keys_dir:
        return ProxyKeyring(proxy_id=identity.name)
    from fedveil.platform.provision import load_proxy_keyring_dir

    return load_proxy_keyring_dir(identity.keys_dir, identity.name)


def validate(identity: ProxyIdentity, payloads: Mapping[str, bytes], *, run_id: str, task_id: str, mode: str,
             length: int, options: Mapping[str, Any] | None = None,
             task_ids: Mapping[str, str] | None = None) -> dict[str, str]:
    """{client: reason} for payloads this proxy would reject; opens nothing for good, releases nothing."""
    secure_mode = get_mode(mode, **dict(options or {}))
    check = getattr(secure_mode, "validate", None)
    if check is None:
        return {}
    binding = Binding(run_id=run_id, task_id=task_id, client_id="", proxy_id=identity.name, mode=mode, length=length)
    extra = {"task_ids": dict(task_ids)} if task_ids else {}
    return dict(check(payloads, binding, proxy_keyring(identity), **extra))


def aggregate(
    identity: ProxyIdentity,
    payloads: Mapping[str, bytes],
    *,
    run_id: str,
    task_id: str,
    mode: str,
    length: int,
    min_aggregate: int,
    weights: Mapping[str, float] | None = None,
    options: Mapping[str, Any] | None = None,
    task_ids: Mapping[str, str] | None = None,
) -> CombineResult:
    """Combine one task's payloads, once. Raises AggregationRefused below `min_aggregate` distinct clients.

    A task is combined at most once: re-combining a subset of the same task would let a server
    subtract two aggregates and isolate one client. An async buffer flush is its own aggregate task;
    `task_ids` then names the train task each client's payload is bound to, and the replay guard
    still opens every envelope at most once, so no payload can enter two aggregates.
    """
    binding = Binding(run_id=run_id, task_id=task_id, client_id="", proxy_id=identity.name, mode=mode, length=length)
    guard = SqliteReplayGuard(identity.workdir / "replay-guard.db")
    try:
        if not guard.claim(f"task:{run_id}:{task_id}".encode()):
            raise AggregationRefused(f"task {task_id} was already aggregated by this proxy; a task is combined once")
        extra = {"task_ids": dict(task_ids)} if task_ids else {}
        return get_mode(mode, **dict(options or {})).combine(
            payloads,
            binding,
            proxy_keyring(identity),
            max(min_aggregate, identity.min_aggregate),
            weights=weights,
            replay_guard=guard,
            **extra,
        )
    finally:
        guard.close()
