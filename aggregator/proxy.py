"""The proxy role: open the payloads addressed to this proxy, enforce the guards, and combine.

Everything in an aggregate task comes from the server, which may deviate (DESIGN §2), so the proxy
takes from it only what it can check, and decides the rest from its own config (`--config`):
  * weights: never from the server. A sync round carries none; in async and semi-sync-carry the
    server sends each client's staleness s_i and the proxy computes alpha(s_i) itself
    (`fedveil.secure.staleness`), refusing s_i outside [0, async.max_staleness], so no client's
    weight falls below the floor alpha(max_staleness). A task that carries `weights` is refused.
  * mode options (fixed-point bits, clip, CKKS max_clients): from the proxy's config.
  * once per update: a client's update for one train task goes into at most one aggregate,
    whatever aggregate id the server chooses. (run, train task, client) is claimed durably on
    combine, next to every envelope id and the aggregate id.
  * commit-once (modes with `needs_quorum`, `fedveil.secure.quorum`): the proxy commits durably to one
    client set per aggregate task (and each update to one aggregate) and tags it for every peer; it
    releases only that set, holding a quorum of its peers' tags over it.
A proxy may run every message in a fresh process, so the replay guard lives in SQLite in the
proxy's work dir: an envelope opens at most once, ever.

Payloads a proxy validated stay in its work dir (`validated/`) until it combines them: the aggregate
request then names them (`kept`) instead of carrying the same bytes through the SuperLink a second
time (a third of a secret-sharing round's traffic). What is combined is exactly what was validated.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from fedveil.platform import messages as wire
from fedveil.secure import quorum
from fedveil.secure.errors import SecurityError
from fedveil.secure.modes import AggregationRefused, Binding, CombineResult, ProxyKeyring, get_mode
from fedveil.secure.staleness import staleness_weights

if TYPE_CHECKING:
    from fedveil.platform.config import FedveilConfig


@dataclass(frozen=True)
class ProxyIdentity:
    name: str
    workdir: Path
    keys_dir: str
    min_aggregate: int = 2  # this proxy's own floor; a server cannot lower it
    config: str = ""  # this proxy's own federation TOML; without one, the defaults (sync rounds, no weights)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "ProxyIdentity":
        name = str(node_config.get("name", "")) or "proxy"
        return cls(
            name=name,
            workdir=Path(str(node_config.get("workdir", "")) or f"fedveil-{name}"),
            keys_dir=str(node_config.get("keys", "")),
            min_aggregate=int(node_config.get("min-aggregate", 2)),
            config=str(node_config.get("config", "")),
        )

    def own_config(self) -> "FedveilConfig":
        """The proxy's own config: it decides weights and encoding options, never the server's task."""
        from fedveil.platform import config as config_mod

        return config_mod.load(self.config or None)


class SqliteReplayGuard:
    """Durable claims, each atomic, so a replay is refused across restarts.

    `claim` takes envelope and aggregate ids; `claim_updates` takes (run, train task, client), the
    identity of one client update, so that no update enters two aggregates of this proxy.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS opened (id BLOB PRIMARY KEY, ts REAL NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS combined (run_id TEXT NOT NULL, train_task TEXT NOT NULL, "
                         "client TEXT NOT NULL, aggregate TEXT NOT NULL, ts REAL NOT NULL, "
                         "PRIMARY KEY (run_id, train_task, client))")
        self._db.execute("CREATE TABLE IF NOT EXISTS commits (run_id TEXT NOT NULL, task_id TEXT NOT NULL, "
                         "statement BLOB NOT NULL, ts REAL NOT NULL, PRIMARY KEY (run_id, task_id))")
        self._db.execute("CREATE TABLE IF NOT EXISTS committed_updates (run_id TEXT NOT NULL, train_task TEXT NOT NULL, "
                         "client TEXT NOT NULL, task_id TEXT NOT NULL, PRIMARY KEY (run_id, train_task, client))")

    def claim(self, envelope_id: bytes) -> bool:
        try:
            self._db.execute("INSERT INTO opened (id, ts) VALUES (?, ?)", (bytes(envelope_id), time.time()))
            return True
        except sqlite3.IntegrityError:
            return False

    def combined_in(self, run_id: str, updates: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """{(train task, client): aggregate id} for the updates already combined by this proxy."""
        out = {}
        for train_task, client in updates:
            row = self._db.execute("SELECT aggregate FROM combined WHERE run_id = ? AND train_task = ? AND client = ?",
                                   (run_id, train_task, client)).fetchone()
            if row is not None:
                out[(train_task, client)] = row[0]
        return out

    def claim_updates(self, run_id: str, aggregate_id: str, updates: Iterable[tuple[str, str]]) -> dict[tuple[str, str], str]:
        """Claim every (train task, client) for `aggregate_id` in one transaction; on any conflict claim none
        and return the conflicts ({update: aggregate id that holds it})."""
        updates = list(updates)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            taken = self.combined_in(run_id, updates)
            if taken:
                self._db.execute("ROLLBACK")
                return taken
            now = time.time()
            self._db.executemany("INSERT INTO combined (run_id, train_task, client, aggregate, ts) VALUES (?, ?, ?, ?, ?)",
                                 [(run_id, t, c, aggregate_id, now) for t, c in updates])
            self._db.execute("COMMIT")
            return {}
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def commitment(self, run_id: str, task_id: str) -> bytes | None:
        """The statement this proxy committed to for (run, task), or None."""
        row = self._db.execute("SELECT statement FROM commits WHERE run_id = ? AND task_id = ?",
                               (run_id, task_id)).fetchone()
        return None if row is None else bytes(row[0])

    def commit_once(self, run_id: str, task_id: str, statement: bytes, updates: Iterable[tuple[str, str]]) -> str:
        """Commit (run, task) to `statement` and each (train task, client) to this task, in one transaction.

        Returns "" when committed now or before to the same statement, else why it is refused (another
        statement for this task, or an update already committed to another task); a refusal commits nothing."""
        updates = list(updates)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            before = self.commitment(run_id, task_id)
            if before is not None:
                self._db.execute("ROLLBACK")
                return "" if before == statement else (
                    f"task {task_id} is already committed to another client set or proxy list; a proxy commits once "
                    "per task")
            for train_task, client in updates:
                row = self._db.execute("SELECT task_id FROM committed_updates WHERE run_id = ? AND train_task = ? AND "
                                       "client = ?", (run_id, train_task, client)).fetchone()
                if row is not None:
                    self._db.execute("ROLLBACK")
                    return (f"client {client}'s update for train task {train_task} is already committed to aggregate "
                            f"{row[0]}; an update is committed to one aggregate")
            self._db.execute("INSERT INTO commits (run_id, task_id, statement, ts) VALUES (?, ?, ?, ?)",
                             (run_id, task_id, statement, time.time()))
            self._db.executemany("INSERT INTO committed_updates (run_id, train_task, client, task_id) VALUES (?, ?, ?, ?)",
                                 [(run_id, t, c, task_id) for t, c in updates])
            self._db.execute("COMMIT")
            return ""
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self._db.close()


KEPT_DIR = "validated"  # payloads validated, kept until combined (one directory per aggregate task)
KEPT_TASKS = 8  # task directories kept at most: a round the server abandoned leaves one behind


def _kept_dir(identity: ProxyIdentity, run_id: str, task_id: str) -> Path:
    return identity.workdir / KEPT_DIR / hashlib.sha256(f"{run_id}\0{task_id}".encode()).hexdigest()[:32]


def _kept_file(directory: Path, client: str) -> Path:
    return directory / f"{hashlib.sha256(client.encode()).hexdigest()[:32]}.bin"


def keep_validated(identity: ProxyIdentity, run_id: str, task_id: str, payloads: Mapping[str, bytes]) -> dict[str, str]:
    """Keep the payloads this proxy validated for the aggregate it will be asked for; {client: sha256 hex}.

    The server compares each digest with the bytes it holds and, where they match, names the client in
    the aggregate request instead of sending its payload again."""
    directory = _kept_dir(identity, run_id, task_id)
    directory.mkdir(parents=True, exist_ok=True)
    kept = {}
    for cid, blob in payloads.items():
        path = _kept_file(directory, cid)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(blob)
        os.replace(tmp, path)  # a reader sees the old payload or the new one, never part of one
        kept[cid] = hashlib.sha256(blob).hexdigest()
    older = sorted((d for d in directory.parent.iterdir() if d.is_dir() and d != directory),
                   key=lambda d: d.stat().st_mtime)
    for stale in older[:max(0, len(older) - (KEPT_TASKS - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return kept


def kept_payloads(identity: ProxyIdentity, run_id: str, task_id: str, clients: Any) -> dict[str, bytes]:
    """The payloads this proxy validated for the task, for the clients the aggregate request names."""
    if clients is None:
        return {}
    if not isinstance(clients, list) or not all(isinstance(c, str) for c in clients):
        raise AggregationRefused(f"proxy {identity.name}: `kept` must list client ids")
    directory = _kept_dir(identity, run_id, task_id)
    out = {}
    for cid in clients:
        try:
            out[cid] = _kept_file(directory, cid).read_bytes()
        except OSError:
            raise AggregationRefused(f"proxy {identity.name}: the payload of client {cid} it validated for task "
                                     f"{task_id} {wire.KEPT_MISSING} (restarted or pruned); send the payload") from None
    return out


def forget_kept(identity: ProxyIdentity, run_id: str, task_id: str) -> None:
    shutil.rmtree(_kept_dir(identity, run_id, task_id), ignore_errors=True)


def proxy_keyring(identity: ProxyIdentity) -> ProxyKeyring:
    """This proxy's private key and the CKKS public context, from its provisioned bundle."""
    if not identity.keys_dir:
        return ProxyKeyring(proxy_id=identity.name)
    from fedveil.platform.provision import load_proxy_keyring_dir

    return load_proxy_keyring_dir(identity.keys_dir, identity.name)


def _train_tasks(payloads: Mapping[str, bytes], task_id: str, task_ids: Mapping[str, str] | None) -> dict[str, str]:
    """The train task each client's payload answers (its own in async buffers, else the aggregate's)."""
    return {cid: str((task_ids or {}).get(cid, task_id)) for cid in payloads}


def screen(identity: ProxyIdentity, cfg: "FedveilConfig", guard: SqliteReplayGuard, payloads: Mapping[str, bytes], *,
           run_id: str, task_id: str, staleness: Mapping[str, Any] | None = None,
           task_ids: Mapping[str, str] | None = None) -> tuple[dict[str, float] | None, dict[str, str]]:
    """(weights this proxy applies, or None for the unweighted sum; {client: reason} refused before opening).

    Raises AggregationRefused when the request itself breaks this proxy's config (staleness sent for a
    sync round). Claims nothing, so `validate` and `aggregate` screen alike.
    """
    rejected: dict[str, str] = {}
    weights: dict[str, float] | None = None
    tasks = _train_tasks(payloads, task_id, task_ids)
    if cfg.staleness_weighted():
        weights, rejected = staleness_weights(dict(staleness or {}), sorted(payloads), cfg.async_)
        for cid in [c for c in weights if tasks[c] == task_id and (staleness or {}).get(c, 0) != 0]:
            # semi-sync: a payload answering this round's own task is fresh by definition
            rejected[cid] = (f"it answers this aggregate's own task {task_id}, so it is fresh; staleness "
                             f"{(staleness or {})[cid]!r} is refused")
            del weights[cid]
        if all(w == 1.0 for w in weights.values()):
            weights = None  # the exact unweighted path
    elif staleness is not None:
        raise AggregationRefused(
            f"proxy {identity.name}: its config runs {cfg.federation.mode} rounds (late_replies = "
            f"{cfg.federation.late_replies!r}), which carry no per-client weights; a task that sends staleness is "
            "refused (clients already weight their updates by n_i)")
    for (train_task, cid), aggregate_id in guard.combined_in(run_id, ((tasks[c], c) for c in sorted(payloads))).items():
        rejected[cid] = (f"its update for train task {train_task} was already combined by this proxy (aggregate "
                         f"{aggregate_id}); a client update enters at most one aggregate")
    return weights, rejected


def _refuse_server_weights(identity: ProxyIdentity, task: Mapping[str, Any]) -> None:
    if task.get("weights") is not None:
        raise AggregationRefused(
            f"proxy {identity.name}: the task carries per-client weights, which a proxy never takes from the server "
            "(they could isolate one client); send each client's staleness and the proxy computes the weights from "
            "its own [async] config")


def validate(identity: ProxyIdentity, payloads: Mapping[str, bytes], *, run_id: str, task_id: str, mode: str,
             length: int, task_ids: Mapping[str, str] | None = None,
             staleness: Mapping[str, Any] | None = None) -> dict[str, str]:
    """{client: reason} for payloads this proxy would reject; opens nothing for good, claims and releases nothing."""
    cfg = identity.own_config()
    guard = SqliteReplayGuard(identity.workdir / "replay-guard.db")
    try:
        _, rejected = screen(identity, cfg, guard, payloads, run_id=run_id, task_id=task_id, staleness=staleness,
                             task_ids=task_ids)
    finally:
        guard.close()
    secure_mode = get_mode(mode, **cfg.secure_options())
    check = getattr(secure_mode, "validate", None)
    if check is None:
        return rejected
    binding = Binding(run_id=run_id, task_id=task_id, client_id="", proxy_id=identity.name, mode=mode, length=length)
    extra = {"task_ids": dict(task_ids)} if task_ids else {}
    rest = {cid: blob for cid, blob in payloads.items() if cid not in rejected}
    return {**rejected, **dict(check(rest, binding, proxy_keyring(identity), **extra))}


def _needs_quorum(mode: str) -> bool:
    return bool(getattr(get_mode(mode), "needs_quorum", False))


def commit(identity: ProxyIdentity, *, run_id: str, task_id: str, mode: str, proxies: Sequence[str],
           clients: Sequence[str], task_ids: Mapping[str, str] | None = None,
           staleness: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Commit once to one aggregate's client set (modes with `needs_quorum`); {peer: hex tag} for every peer.

    The commit is durable and once: a second request for the task with another set, or one that puts a
    client update already committed to another aggregate, is refused. The same request again gets the
    same tags (HMAC is deterministic), so a resent commit is harmless."""
    if not _needs_quorum(mode):
        raise AggregationRefused(f"proxy {identity.name}: mode {mode} has no commit phase")
    try:
        st = quorum.statement(run_id, task_id, proxies, clients, task_ids, staleness)
    except ValueError as exc:
        raise AggregationRefused(f"proxy {identity.name}: commit request refused: {exc}") from None
    if len(st.clients) < identity.min_aggregate:
        raise AggregationRefused(f"proxy {identity.name}: commit request names {len(st.clients)} client(s); this proxy "
                                 f"aggregates at least {identity.min_aggregate}")
    try:
        tags = quorum.commit_tags(proxy_keyring(identity), st)  # before the record: a key problem commits nothing
    except SecurityError as exc:
        raise AggregationRefused(f"proxy {identity.name}: {exc.problem} Fix: {exc.fix}") from None
    guard = SqliteReplayGuard(identity.workdir / "replay-guard.db")
    try:
        refused = guard.commit_once(run_id, task_id, st.encode(), st.updates)
    finally:
        guard.close()
    if refused:
        raise AggregationRefused(f"proxy {identity.name}: {refused}")
    return {peer: tag.hex() for peer, tag in tags.items()}


def _hex_tags(value: Any) -> dict[str, bytes]:
    """The tags the server forwarded to this proxy ({issuer: hex}); entries that are not hex are dropped."""
    out = {}
    for issuer, tag in (value.items() if isinstance(value, Mapping) else ()):
        try:
            out[str(issuer)] = bytes.fromhex(tag)
        except (TypeError, ValueError):
            continue
    return out


def _committed_release(identity: ProxyIdentity, guard: SqliteReplayGuard, payloads: Mapping[str, bytes], *,
                       run_id: str, task_id: str, task_ids: Mapping[str, str] | None,
                       staleness: Mapping[str, Any] | None, tags: Mapping[str, bytes]) -> quorum.Statement:
    """The statement this proxy committed to, once the aggregate request matches it exactly and a quorum of
    peers tagged it; else AggregationRefused, before anything is claimed or opened."""
    stored = guard.commitment(run_id, task_id)
    if stored is None:
        raise AggregationRefused(f"proxy {identity.name}: task {task_id} was never committed by this proxy; it releases "
                                 "only a client set it committed to (the server sends query.commit first)")
    committed = quorum.Statement.decode(stored)
    try:
        asked = quorum.statement(run_id, task_id, committed.proxies, sorted(payloads), task_ids, staleness)
    except ValueError as exc:
        raise AggregationRefused(f"proxy {identity.name}: aggregate request refused: {exc}") from None
    if asked != committed:
        raise AggregationRefused(
            f"proxy {identity.name}: the aggregate asks for clients {asked.clients} (with their train tasks and "
            f"staleness), but this proxy committed task {task_id} to {committed.clients}; it releases only that set")
    try:
        quorum.check_quorum(proxy_keyring(identity), committed, tags)
    except SecurityError as exc:
        raise AggregationRefused(f"proxy {identity.name}: {exc.problem} Fix: {exc.fix}") from None
    return committed


def aggregate(
    identity: ProxyIdentity,
    payloads: Mapping[str, bytes],
    *,
    run_id: str,
    task_id: str,
    mode: str,
    length: int,
    min_aggregate: int,
    staleness: Mapping[str, Any] | None = None,
    task_ids: Mapping[str, str] | None = None,
    quorum_tags: Mapping[str, bytes] | None = None,
) -> CombineResult:
    """Combine one task's payloads, once. Raises AggregationRefused below `min_aggregate` distinct clients.

    A task is combined at most once, and so is each client update: re-combining a subset, or a
    re-sealed update of the same train task under a new aggregate id, would let a server subtract
    two aggregates and isolate one client. `task_ids` names the train task each client's payload
    is bound to (async buffers); `staleness` gives each client's versions behind, from which this
    proxy computes the weights with its own config. In a mode that `needs_quorum`, the request must be
    exactly the statement this proxy committed to, `quorum_tags` ({peer: tag} addressed to this proxy)
    must hold a quorum over it, and every committed client must make it in, or nothing is released.
    """
    cfg = identity.own_config()
    binding = Binding(run_id=run_id, task_id=task_id, client_id="", proxy_id=identity.name, mode=mode, length=length)
    guard = SqliteReplayGuard(identity.workdir / "replay-guard.db")
    try:
        weights, rejected = screen(identity, cfg, guard, payloads, run_id=run_id, task_id=task_id,
                                   staleness=staleness, task_ids=task_ids)  # a request that breaks the config claims nothing
        extra: dict[str, Any] = {"task_ids": dict(task_ids)} if task_ids else {}
        committed = None
        if _needs_quorum(mode):
            committed = _committed_release(identity, guard, payloads, run_id=run_id, task_id=task_id,
                                           task_ids=task_ids, staleness=staleness, tags=quorum_tags or {})
            extra["proxies"] = committed.proxies
        if not guard.claim(f"task:{run_id}:{task_id}".encode()):
            raise AggregationRefused(f"task {task_id} was already aggregated by this proxy; a task is combined once")
        floor = max(min_aggregate, identity.min_aggregate)
        try:
            result = get_mode(mode, **cfg.secure_options()).combine(
                {cid: blob for cid, blob in payloads.items() if cid not in rejected}, binding,
                proxy_keyring(identity), floor, weights=weights, replay_guard=guard, **extra)
        except AggregationRefused as exc:
            raise AggregationRefused(f"{exc}" + (f" (refused before opening: {rejected})" if rejected else "")) from None
        if committed is not None and result.included != committed.clients:
            raise AggregationRefused(f"proxy {identity.name}: only {result.included} of the committed clients "
                                     f"{committed.clients} are valid here ({ {**rejected, **result.rejected} }); a "
                                     "quorum committed the whole set, so a subset is not released")
        tasks = _train_tasks(payloads, task_id, task_ids)
        taken = guard.claim_updates(run_id, task_id, [(tasks[cid], cid) for cid in result.included])
        if taken:  # another aggregate claimed one of them meanwhile: release nothing
            raise AggregationRefused(f"client update(s) {sorted(taken)} were combined meanwhile in another aggregate "
                                     f"({sorted(set(taken.values()))}); nothing is released")
        result.rejected = {**rejected, **result.rejected}
        return result
    finally:
        guard.close()


def validate_task(identity: ProxyIdentity, task: Mapping[str, Any], payloads: Mapping[str, bytes]
                  ) -> tuple[dict[str, str], dict[str, str]]:
    """`validate` for a server's task as it arrives: ({client: reason} rejected, {client: sha256} kept)."""
    _refuse_server_weights(identity, task)
    run_id, task_id = str(task["run_id"]), str(task["task_id"])
    rejected = validate(identity, payloads, run_id=run_id, task_id=task_id, mode=str(task["mode"]),
                        length=int(task["length"]), task_ids=task.get("task_ids"), staleness=task.get("staleness"))
    kept = keep_validated(identity, run_id, task_id, {c: b for c, b in payloads.items() if c not in rejected})
    return rejected, kept


def aggregate_task(identity: ProxyIdentity, task: Mapping[str, Any], payloads: Mapping[str, bytes]) -> CombineResult:
    """`aggregate` for a server's task as it arrives: everything in `task` is the server's choice."""
    _refuse_server_weights(identity, task)
    tags = task.get("quorum_tags")
    run_id, task_id = str(task["run_id"]), str(task["task_id"])
    kept = kept_payloads(identity, run_id, task_id, task.get("kept"))
    if set(kept) & set(payloads):
        raise AggregationRefused(f"proxy {identity.name}: client(s) {sorted(set(kept) & set(payloads))} are both "
                                 "sent and named as kept; a client has one payload")
    result = aggregate(identity, {**payloads, **kept}, run_id=run_id, task_id=task_id,
                       mode=str(task["mode"]), length=int(task["length"]), min_aggregate=int(task["min_aggregate"]),
                       staleness=task.get("staleness"), task_ids=task.get("task_ids"),
                       quorum_tags=_hex_tags(tags.get(identity.name) if isinstance(tags, Mapping) else None))
    forget_kept(identity, run_id, task_id)
    return result


def commit_task(identity: ProxyIdentity, task: Mapping[str, Any]) -> dict[str, str]:
    """`commit` for a server's commit request as it arrives: the task plus `proxies` and `clients`."""
    _refuse_server_weights(identity, task)
    proxies, clients = task.get("proxies"), task.get("clients")
    if not isinstance(proxies, list) or not isinstance(clients, list):
        raise AggregationRefused(f"proxy {identity.name}: a commit request names `proxies` and `clients` as lists")
    return commit(identity, run_id=str(task["run_id"]), task_id=str(task["task_id"]), mode=str(task["mode"]),
                  proxies=proxies, clients=clients, task_ids=task.get("task_ids"), staleness=task.get("staleness"))

