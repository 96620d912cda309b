"""Asynchronous (FedBuff) rounds and semi-sync carry-over, on top of the synchronous engine's pieces.

Both are built on `grid.push_messages` / `grid.pull_messages` with their own bookkeeping of
tasks in flight, and both aggregate through `Federation._aggregate`, so the secure modes, the
proxies' guards and the validate-then-combine-once protocol are exactly those of a sync round.

Async (DESIGN §7):
  * `async.concurrency` clients train at once; each task has a unique task id (the ledger is
    charged per task, idempotently by id) and is bound to the model version v_base it was sent.
  * replies wait in a buffer; at `async.buffer_size` = K updates (K >= federation.min_aggregate)
    the proxies aggregate them with staleness weights alpha(v - v_base). The server sends only each
    client's staleness s_i = v - v_base; each proxy computes alpha(s_i) from its own config
    (`fedveil.secure.staleness`, floor alpha(max_staleness)), and the server normalizes with the same
    public alpha on the mode's grid (`applied_weight`: 2^-16 for secret sharing, exact for ckks with
    its spare level).
  * w <- w + eta * sum alpha_i n_i delta_i / sum alpha_i n_i (then the configured server
    optimizer; fedavg with server.lr = 1 is exactly this), and the version is bumped.
  * a buffer holds at most one update per client; a client that finishes gets new work at once
    on the current version. Its next update, if its last one still waits in the buffer, waits
    for the next buffer (and the client gets no more work until then).
  * replies more than `async.max_staleness` versions old are dropped (event `stale`); a task not
    answered within `federation.round_timeout` is given up (event `dropout`), so a dead client
    never stalls the federation.
  * every aggregate covers >= K >= min_aggregate clients, and each proxy group in it at least
    min_aggregate: an undersized group's updates wait for the next buffer instead.

`federation.rounds` counts aggregation attempts (buffers), as it counts rounds in sync mode;
the model version counts the successful ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message

from fedveil.aggregator import checkpoint
from fedveil.platform import messages as wire
from fedveil.secure.modes import applied_weight
from fedveil.secure.staleness import staleness_weight

if TYPE_CHECKING:
    from fedveil.aggregator.engine import Federation, Node


@dataclass
class Task:
    """One train task in flight."""

    message_id: str
    node: "Node"
    task_id: str
    base_version: int
    pushed_at: float  # time.monotonic()
    round: int = 0  # semi-sync: the round that sent it


@dataclass
class Update:
    """An ok reply waiting to be aggregated: the engine's contribution dict plus where it came from."""

    cid: str
    node: "Node"
    task_id: str
    base_version: int
    arrived: float
    metrics: dict[str, float]
    payloads: dict[str, bytes]
    extra: dict[str, Any] = field(default_factory=dict)

    def contribution(self) -> dict[str, Any]:
        return {"name": self.node.name, "n": int(self.metrics.get("num_samples", 0)), "metrics": self.metrics,
                "payloads": self.payloads, "task_id": self.task_id}


class _Rounds:
    """What async and semi-sync-carry share: staleness weights, proxy groups, flushing one aggregate."""

    def __init__(self, fed: "Federation") -> None:
        self.fed = fed
        self.cfg = fed.cfg
        self.acfg = fed.cfg.async_
        self.version = 0
        self.pending: dict[str, Task] = {}
        self.queue: list[Update] = []  # ok updates not yet aggregated, in arrival order
        self.retired: set[int] = set()  # clients whose budget is exhausted
        self.poll = 0.05
        clients = sorted(fed.roster.clients.values(), key=lambda n: n.node_id)
        proxies = sorted(fed.roster.proxy_by_name())
        # One stable assignment for the whole run, so updates of different rounds/versions combine. A
        # buffer mixes whichever clients answered first, so modes that give each client one proxy (ckks,
        # none) get a single group: a split buffer could leave a proxy below min_aggregate (it would refuse,
        # and the payloads would be lost). Secret sharing sends to every proxy anyway.
        ids = [str(n.node_id) for n in clients]
        self.assignment = fed.mode.assign(ids, proxies, max(len(ids), self.cfg.federation.min_aggregate))

    def task_ttl(self) -> float:
        """How long the SuperLink keeps a train task and its reply (a reply after that is lost)."""
        return self.cfg.federation.round_timeout

    # ---- bookkeeping ----------------------------------------------------------------------
    def _train_message(self, node: "Node", task_id: str, arrays: list[np.ndarray], extra: dict[str, Any]) -> Message:
        content = self.fed._task_content({"run_id": self.fed.run_id, "task_id": task_id,
                                          "proxies": self.assignment[str(node.node_id)], **extra}, arrays)
        msg = Message(content, node.node_id, wire.TRAIN, group_id=str(extra.get("round", extra.get("version", ""))))
        msg.metadata.ttl = max(self.task_ttl(), 1.0)
        return msg

    def _push(self, tasks: list[tuple["Node", str, dict[str, Any]]], arrays: list[np.ndarray], rnd: int = 0) -> list[str]:
        msgs = [self._train_message(node, task_id, arrays, extra) for node, task_id, extra in tasks]
        if not msgs:
            return []
        ids = list(self.fed.grid.push_messages(msgs))
        now = time.monotonic()
        out = []
        for mid, (node, task_id, _) in zip(ids, tasks):
            if not mid:
                self.fed.event("error", f"could not send a train task to {node.name}", level="error", source=node.name)
                continue
            self.pending[mid] = Task(mid, node, task_id, self.version, now, rnd)
            out.append(mid)
        return out

    def _pull(self, rnd: int) -> list[tuple[Task, Message]]:
        if not self.pending:
            return []
        got = []
        for reply in self.fed.grid.pull_messages(list(self.pending)):
            task = self.pending.pop(reply.metadata.reply_to_message_id, None)
            if task is not None:
                got.append((task, reply))
        return got

    def _accept(self, task: Task, reply: Message, rnd: int) -> Update | None:
        """Record a reply's outcome; an ok one becomes an Update (or is dropped as too stale)."""
        node = task.node
        parsed = self.fed.read_train_reply(rnd, node, reply, self.assignment.get(str(node.node_id), []))
        if parsed is None:  # malformed: recorded as rejected; only this update is lost
            return None
        status, info, metrics = parsed.status, parsed.info, parsed.metrics
        if status == wire.OK:
            s = self.version - task.base_version
            if s > self.acfg.max_staleness:
                self._drop_stale(node, task.task_id, s, rnd, metrics)
                return None
            return Update(str(node.node_id), node, task.task_id, task.base_version, time.monotonic(), metrics,
                          parsed.payloads)
        self.fed._record_client(rnd, node, status, metrics)
        if status == wire.DROPPED:
            self.fed.event("dropout", f"version {self.version}: {info.get('message', node.name + ' dropped out')}",
                           level="warn", source=node.name, round=rnd)
        elif status == wire.BUDGET_EXHAUSTED:
            self.retired.add(node.node_id)
            self.fed.event("budget_exhausted", info.get("message", f"{node.name} declined: budget exhausted"),
                           level="warn", source=node.name, round=rnd)
        elif status == wire.POLICY:  # it would decline every task of this run: stop sending it work
            self.retired.add(node.node_id)
            self.fed.event("policy", f"version {self.version}: {info.get('message', node.name + ' declined by its policy')}",
                           level="warn", source=node.name, round=rnd)
        else:
            self.fed.event("error", f"{node.name}: {info.get('message', status)}", level="error", source=node.name,
                           round=rnd)
        return None

    @staticmethod
    def fed_reply_status(reply: Message) -> tuple[str, dict[str, Any]]:
        from fedveil.aggregator.engine import reply_ok

        return reply_ok(reply)

    def _drop_stale(self, node: "Node", task_id: str, s: int, rnd: int, metrics: dict[str, float]) -> None:
        self.fed._record_client(rnd, node, "stale", metrics, staleness=s)
        self.fed.event("stale", f"{node.name}'s update ({task_id}) is {s} versions old, over "
                       f"async.max_staleness={self.acfg.max_staleness}; it is dropped", level="warn",
                       source=node.name, round=rnd)

    def _expire(self, rnd: int, timeout: float, label: str) -> list[Task]:
        """Give up tasks older than `timeout`: the client is simply absent (it may be dead)."""
        now = time.monotonic()
        gone = [t for t in self.pending.values() if now - t.pushed_at > timeout]
        for t in gone:
            del self.pending[t.message_id]
            self.fed.event("dropout", f"{label}: {t.node.name} did not answer {t.task_id} within {timeout:.0f}s; "
                           "its task is given up", level="warn", source=t.node.name, round=rnd)
            self.fed.store.record_client_round(self.fed.run_id, rnd, t.node.name, "dropped", node_id=str(t.node.node_id))
        return gone

    def _prune_stale_queue(self, rnd: int) -> None:
        keep = []
        for u in self.queue:
            s = self.version - u.base_version
            if s > self.acfg.max_staleness:
                self._drop_stale(u.node, u.task_id, s, rnd, u.metrics)
            else:
                keep.append(u)
        self.queue = keep

    def _select(self, limit: int | None = None) -> tuple[list[Update], list[Update]]:
        """(buffer, rest): the oldest update of each client, keeping only proxy groups of >= min_aggregate."""
        first: dict[str, Update] = {}
        for u in self.queue:
            first.setdefault(u.cid, u)
            if limit is not None and len(first) >= limit:
                break
        groups: dict[tuple[str, ...], list[Update]] = {}
        for u in first.values():
            groups.setdefault(tuple(sorted(u.payloads)), []).append(u)
        floor = self.cfg.federation.min_aggregate
        chosen = {u.cid for g in groups.values() if len(g) >= floor for u in g}
        buffer = [u for u in first.values() if u.cid in chosen]
        ids = {id(u) for u in buffer}
        return buffer, [u for u in self.queue if id(u) not in ids]

    # ---- one aggregate --------------------------------------------------------------------
    def _aggregate_updates(self, rnd: int, task_id: str, updates: list[Update], started: float,
                           fill_seconds: float | None) -> bool:
        """Aggregate `updates` with staleness weights, update the model, record everything."""
        fed = self.fed
        contributions = {u.cid: u.contribution() for u in updates}
        stal = {u.cid: self.version - u.base_version for u in updates}
        alpha = {cid: staleness_weight(s, self.acfg) for cid, s in stal.items()}
        weights = {cid: applied_weight(fed.mode, a) for cid, a in alpha.items()}  # what the proxies apply
        total, included, stats = fed._aggregate(rnd, task_id, contributions, stal)
        extra = {"staleness": [stal[c] for c in sorted(included)], "task_id": task_id,
                 "weights": {contributions[c]["name"]: weights[c] for c in sorted(included)},
                 "base_versions": {contributions[c]["name"]: self.version - stal[c] for c in sorted(included)}}
        updated = False
        if total is not None:
            denom = sum(weights[c] * contributions[c]["n"] for c in included)
            mean = total / denom if denom > 0 else total * np.nan
            if np.all(np.isfinite(mean)):
                fed.weights = fed.optimizer.step(fed.weights, self.acfg.server_lr * mean)
                self.version += 1
                updated = True
            else:
                fed.event("rejected", f"aggregate {rnd}: not finite; update discarded", level="error", round=rnd)
        for u in updates:
            status = "ok" if u.cid in included and updated else "rejected"
            fed._record_client(rnd, u.node, status, u.metrics, staleness=stal[u.cid])
        if updated:
            checkpoint.save(fed.checkpoint_dir, checkpoint.Checkpoint(
                rnd, fed.weights, fed.optimizer.state(), {"run_id": fed.run_id, "version": self.version}))
        fed._record_round(rnd, started, participants=len(included) if updated else 0, stats=stats,
                          model_version=self.version, buffer_fill_seconds=fill_seconds, extra=extra)
        return updated


class AsyncRounds(_Rounds):
    """FedBuff: keep `concurrency` clients busy, aggregate every K buffered updates (module docstring)."""

    def run(self, first: int) -> int:
        fed = self.fed
        ckpt = checkpoint.load(fed.checkpoint_dir) if fed.resume and first > 1 else None
        self.version = int((ckpt.meta if ckpt else {}).get("version", first - 1))
        K = self.acfg.buffer_size
        clients = sorted(fed.roster.clients.values(), key=lambda n: n.node_id)
        concurrency = self.acfg.concurrency or len(clients)
        self.evals: dict[int, list[dict[str, float]]] = {}
        self.round_of: dict[int, int] = {}  # model version -> the aggregate (round row) that produced it
        self.last_sent: dict[int, int] = {}
        self.seq = 0
        rnd = first
        last_flush = time.time()
        arrays_version, arrays = -1, []
        fed.progress(f"async: {len(clients)} clients, concurrency {concurrency}, buffer K={K}, "
                     f"staleness {self.acfg.staleness}, {fed.cfg.federation.rounds} aggregates")
        while rnd <= fed.cfg.federation.rounds:
            if arrays_version != self.version:
                arrays, arrays_version = fed.global_arrays(), self.version
            self._dispatch(clients, concurrency, arrays, rnd)
            for task, reply in self._pull(rnd):
                if not reply.has_error() and task.base_version >= 1:
                    m = fed.trusted_metrics(reply, task.node)
                    self.evals.setdefault(task.base_version, []).append(m)
                update = self._accept(task, reply, rnd)
                if update is not None:
                    self.queue.append(update)
            self._expire(rnd, fed.cfg.federation.round_timeout, f"aggregate {rnd}")
            self._prune_stale_queue(rnd)
            buffer, rest = self._select(limit=None)
            if len(buffer) >= K:
                buffer = self._oldest_k(buffer, K)
                ids = {id(u) for u in buffer}
                self.queue = [u for u in self.queue if id(u) not in ids]
                now = time.time()
                fed.progress(f"aggregate {rnd}/{fed.cfg.federation.rounds}: {len(buffer)} updates, staleness "
                             f"{sorted(self.version - u.base_version for u in buffer)} (version {self.version})")
                if self._aggregate_updates(rnd, f"{fed.run_id}:aggregate-{rnd}", buffer, last_flush,
                                           now - last_flush):
                    self.round_of[self.version] = rnd
                self._store_evals()
                last_flush = time.time()
                rnd += 1
                continue
            if not self.pending and not self._dispatchable(clients):
                fed.event("stopped", f"async: no client can train any more (budgets exhausted or errors); stopping "
                          f"after {rnd - 1} aggregate(s)", level="warn", round=rnd)
                break
            time.sleep(self.poll)
        self._abandon(rnd - 1)
        return rnd - 1

    def _oldest_k(self, buffer: list[Update], K: int) -> list[Update]:
        """The first updates in arrival order until K are taken and every proxy group has >= min_aggregate."""
        floor = self.cfg.federation.min_aggregate
        picked: list[Update] = []
        counts: dict[tuple[str, ...], int] = {}
        for u in sorted(buffer, key=lambda u: u.arrived):
            picked.append(u)
            g = tuple(sorted(u.payloads))
            counts[g] = counts.get(g, 0) + 1
            if len(picked) >= K and all(n >= floor for n in counts.values()):
                break
        return picked

    def _busy(self) -> set[int]:
        return {t.node.node_id for t in self.pending.values()}

    def _dispatchable(self, clients: list["Node"]) -> list["Node"]:
        """Idle clients that may train now: not retired, and without an update already waiting twice."""
        busy = self._busy()
        waiting: dict[str, int] = {}
        for u in self.queue:
            waiting[u.cid] = waiting.get(u.cid, 0) + 1
        ready = [n for n in clients if n.node_id not in busy and n.node_id not in self.retired
                 and waiting.get(str(n.node_id), 0) < 2]
        # Prefer clients with nothing in the buffer, then the least recently sent.
        return sorted(ready, key=lambda n: (waiting.get(str(n.node_id), 0), self.last_sent.get(n.node_id, -1),
                                            n.node_id))

    def _dispatch(self, clients: list["Node"], concurrency: int, arrays: list[np.ndarray], rnd: int) -> None:
        free = concurrency - len(self.pending)
        if free <= 0:
            return
        tasks = []
        for node in self._dispatchable(clients)[:free]:
            self.seq += 1
            self.last_sent[node.node_id] = self.seq
            tasks.append((node, f"{self.fed.run_id}:async-{self.seq}", {"version": self.version, "round": rnd}))
        self._push(tasks, arrays, rnd)

    def _store_evals(self) -> None:
        """Clients evaluate the version they receive before training: that is each version's accuracy,
        stored on the aggregate (round row) that produced the version."""
        for v, evals in self.evals.items():
            if v in self.round_of:
                self.fed._store_weighted_eval(self.round_of[v], evals, "num_samples")

    def _abandon(self, rnd: int) -> None:
        """At the end, updates never aggregated are recorded (their ε is charged all the same)."""
        for u in self.queue:
            self.fed._record_client(rnd, u.node, "unused", u.metrics, staleness=self.version - u.base_version)
        if self.pending:
            self.fed.event("info", f"async: {len(self.pending)} task(s) still in flight at the end are abandoned; "
                           "their clients' ledgers are charged all the same", round=rnd)
        self.queue, self.pending = [], {}


class SemiSyncRounds(_Rounds):
    """Semi-sync with `federation.late_replies = "carry"`: a reply after the deadline joins the next round.

    Rounds are sync rounds with a deadline and minimum participation. A late client keeps working on
    its task (it is not sent another) and its update, when it comes, is aggregated in the round in
    progress with the staleness weight alpha(v - v_base), up to `async.max_staleness` versions.
    """

    def task_ttl(self) -> float:
        # a late reply must outlive its round's deadline to be carried: keep it as long as it is usable
        return self.cfg.federation.round_timeout * (self.acfg.max_staleness + 1)

    def run(self, first: int) -> int:
        self.version = first - 1
        last = first - 1
        for rnd in range(first, self.cfg.federation.rounds + 1):
            self.run_round(rnd)
            last = rnd
        if self.pending:
            self.fed.event("info", f"semi-sync: {len(self.pending)} late task(s) still in flight at the end are "
                           "abandoned", round=last)
        return last

    def run_round(self, rnd: int) -> bool:
        fed = self.fed
        f = self.cfg.federation
        started = time.time()
        busy = {t.node.node_id for t in self.pending.values()}
        sampled = [n for n in fed.sample_clients() if n.node_id not in busy and n.node_id not in self.retired]
        fed.progress(f"round {rnd}/{f.rounds}: training on {len(sampled)} client(s)"
                     + (f", {len(self.pending)} late task(s) may still arrive" if self.pending else ""))
        task_id = f"{fed.run_id}:round-{rnd}"
        mine = set(self._push([(n, task_id, {"round": rnd}) for n in sampled], fed.global_arrays(), rnd))
        deadline = time.monotonic() + f.round_timeout
        fresh_evals = []
        while True:
            for task, reply in self._pull(rnd):
                if task.round == rnd and not reply.has_error():
                    fresh_evals.append(fed.trusted_metrics(reply, task.node))
                update = self._accept(task, reply, rnd)
                if update is not None:
                    self.queue.append(update)
                    if task.round != rnd:
                        fed.event("carried", f"round {rnd}: {task.node.name}'s late update from round {task.round} "
                                  f"is carried in with staleness {self.version - task.base_version}",
                                  source=task.node.name, round=rnd)
            if not (mine & set(self.pending)) or time.monotonic() >= deadline:
                break
            time.sleep(self.poll)
        for mid in sorted(mine & set(self.pending)):
            t = self.pending[mid]
            fed.event("late", f"round {rnd}: {t.node.name} missed the deadline ({f.round_timeout:.0f}s); its update "
                      "will be carried into a later round if it comes", level="warn", source=t.node.name, round=rnd)
        # A late task older than max_staleness rounds can no longer be used: give it up.
        self._expire(rnd, f.round_timeout * (self.acfg.max_staleness + 1), f"round {rnd}")
        if rnd > 1:
            fed._store_weighted_eval(rnd - 1, fresh_evals, "num_samples")
        self._prune_stale_queue(rnd)
        buffer, rest = self._select()
        if len(buffer) < f.min_clients:
            fed.event("round_skipped", f"round {rnd}: only {len(buffer)} update(s), need federation.min_clients="
                      f"{f.min_clients}; the global model is unchanged", level="warn", round=rnd)
            fed._record_round(rnd, started, participants=0, stats={}, model_version=self.version)
            return False
        self.queue = rest
        return self._aggregate_updates(rnd, task_id, buffer, started, None)
