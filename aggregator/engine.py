"""The server's round engine: handshake, synchronous rounds through the proxy tier, checkpoints.

It reads top to bottom like one round of DESIGN §5: sample, send `train`, collect what arrives
before the deadline, forward each proxy the payloads addressed to it, combine the partials,
apply the server optimizer, checkpoint, record. It knows secure modes only through
`fedveil.secure.modes`, so a new mode needs no change here.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedveil.aggregator import checkpoint
from fedveil.aggregator import replies as boundary
from fedveil.aggregator.optimizers import ServerOptimizer
from fedveil.platform import messages as wire
from fedveil.platform.config import FedveilConfig
from fedveil.platform.data import input_scaling, load_heldout
from fedveil.platform.errors import FedveilError
from fedveil.platform.models import build_configured_model as build_model
from fedveil.platform.models import evaluate, model_arrays, model_kind, model_kwargs, set_model_arrays
from fedveil.platform.params import flatten, unflatten
from fedveil.platform.store import HEARTBEAT_SECONDS, MetricsStore
from fedveil.secure.modes import AggregationRefused, ServerKeyring, get_mode

log = logging.getLogger("fedveil.server")


@dataclass
class Node:
    node_id: int
    role: str
    name: str
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Roster:
    clients: dict[int, Node] = field(default_factory=dict)
    proxies: dict[int, Node] = field(default_factory=dict)

    def proxy_by_name(self) -> dict[str, Node]:
        return {n.name: n for n in self.proxies.values()}


def exchange(grid: Grid, messages: list[Message], timeout: float, poll: float = 0.2) -> dict[int, Message]:
    """Push messages and pull replies until all arrive or the deadline passes; late nodes are absent."""
    if not messages:
        return {}
    for m in messages:
        m.metadata.ttl = max(timeout, 1.0)
    dst = {}
    ids = list(grid.push_messages(messages))
    for mid, m in zip(ids, messages):
        dst[mid] = m.metadata.dst_node_id
    pending = set(i for i in ids if i)
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            mid = reply.metadata.reply_to_message_id
            pending.discard(mid)
            replies[dst.get(mid, reply.metadata.src_node_id)] = reply
        if pending:
            time.sleep(poll)
    return replies


def kept_clients(claimed: Any, sent: Mapping[str, bytes]) -> set[str]:
    """Clients whose payload a proxy says it kept with the very bytes the server sent it (SHA-256); anything
    else in its claim is ignored, and those payloads are simply sent again."""
    if not isinstance(claimed, dict):
        return set()
    return {cid for cid, digest in claimed.items()
            if cid in sent and isinstance(digest, str) and digest == hashlib.sha256(sent[cid]).hexdigest()}


def reply_ok(reply: Message) -> tuple[str, dict[str, Any]]:
    """(status, info) of a reply; a Flower-level error or a malformed status becomes status `error`."""
    if reply.has_error():
        return wire.ERROR, {"message": f"node error: {reply.error.reason}"}
    try:
        info = boundary.read_status(reply.content)
    except boundary.BadReply as bad:
        return wire.ERROR, {"message": f"malformed reply: {bad.problem}", "field": bad.field}
    return str(info["status"]), info


class Federation:
    """One run of the federation, as seen from the server. Single writer of the metrics store."""

    def __init__(
        self,
        grid: Grid,
        cfg: FedveilConfig,
        store: MetricsStore,
        run_id: str,
        *,
        workdir: Path,
        server_keys: ServerKeyring | None = None,
        resume: bool = False,
        progress: Callable[[str], None] | None = None,
        handshake_timeout: float = 120.0,
    ) -> None:
        self.grid = grid
        self.cfg = cfg
        self.store = store
        self.run_id = run_id
        self.workdir = workdir
        self.server_keys = server_keys or ServerKeyring()
        self.resume = resume
        self.progress = progress or (lambda text: log.info(text))
        self.handshake_timeout = handshake_timeout
        self.mode = get_mode(cfg.federation.secure, **cfg.secure_options())
        self.optimizer = ServerOptimizer(cfg.server.optimizer, cfg.server.lr, cfg.server.beta1, cfg.server.beta2,
                                         cfg.server.tau, cfg.server.momentum)
        self.rng = random.Random(cfg.federation.seed)
        self.roster = Roster()
        self.assignment: dict[str, list[str]] = {}  # this round's client id -> proxies it must address
        self.like: list[np.ndarray] = []
        self.weights = np.zeros(0)

    # ---- events -------------------------------------------------------------------------
    def event(self, kind: str, message: str, *, level: str = "info", source: str = "", round: int | None = None) -> None:
        self.store.record_event(self.run_id, kind, message, level=level, source=source, round=round)
        (log.warning if level in ("warn", "error") else log.info)(message)
        if level in ("warn", "error"):
            self.progress(f"[{level}] {message}")

    def _task_content(self, task: dict[str, Any], arrays: list[np.ndarray] | None = None) -> RecordDict:
        content = RecordDict({"task": wire.json_record({**task, "config": self.cfg.to_json()})})
        if arrays is not None:
            content["global"] = wire.weights_record(arrays)
        return content

    # ---- handshake ----------------------------------------------------------------------
    def handshake(self) -> Roster:
        """Discover roles until enough clients and proxies answered (nodes may still be connecting)."""
        need_proxies = 2 if self.cfg.federation.secure == "secret-sharing" else 1
        need_clients = self.cfg.federation.min_clients
        expected = {p for p in self.cfg.proxies.names}
        deadline = time.monotonic() + self.handshake_timeout
        asked: set[int] = set()
        while time.monotonic() < deadline:
            fresh = [n for n in self.grid.get_node_ids() if n not in asked]
            msgs = [Message(self._task_content({"run_id": self.run_id}), n, wire.HELLO) for n in fresh]
            for node_id, reply in exchange(self.grid, msgs, timeout=60).items():
                asked.add(node_id)
                try:
                    status, info = boundary.parse_hello(reply)
                except boundary.BadReply as bad:
                    self.event("rejected", f"node {node_id} cannot join: its hello reply is malformed: {bad.problem}",
                               level="error", source=str(node_id))
                    continue
                if status != wire.OK:
                    self.event("error", f"node {node_id} ({info.get('name', '?')}) cannot join: {info.get('message')}",
                               level="error", source=str(info.get("name", node_id)))
                    continue
                node = Node(node_id, info["role"], info["name"], info)
                (self.roster.proxies if node.role == "proxy" else self.roster.clients)[node_id] = node
                self.store.upsert_node(self.run_id, str(node_id), role=node.role, name=node.name, status="online",
                                       info=info)
                self.progress(f"joined: {node.role} {node.name}")
            have_proxies = {n.name for n in self.roster.proxies.values()}
            if len(self.roster.clients) >= need_clients and len(have_proxies) >= need_proxies and (
                expected <= have_proxies or not expected
            ) and len(self.roster.clients) >= self._expected_clients():
                break
            time.sleep(1.0)
        if len(self.roster.clients) < need_clients or len(self.roster.proxies) < need_proxies:
            raise FedveilError(
                f"only {len(self.roster.clients)} client(s) and {len(self.roster.proxies)} proxy(ies) joined within "
                f"{self.handshake_timeout:.0f}s; need {need_clients} clients and {need_proxies} proxies",
                "start more `fedveil client` / `fedveil proxy` nodes against this SuperLink, or lower "
                "federation.min_clients",
            )
        return self.roster

    def _expected_clients(self) -> int:
        return max(len(self.cfg.orgs), self.cfg.federation.min_clients)

    # ---- model --------------------------------------------------------------------------
    def init_model(self) -> int:
        """Initial global weights (or the checkpoint's); returns the first round to run."""
        shapes = {tuple(n.info["input_shape"]) for n in self.roster.clients.values()}
        classes = {int(n.info["num_classes"]) for n in self.roster.clients.values()}
        if len(shapes) != 1 or len(classes) != 1:
            raise FedveilError(
                f"organizations disagree on the data schema: input shapes {sorted(shapes)}, classes {sorted(classes)}",
                "every organization must provide the same features and label set",
            )
        torch.manual_seed(self.cfg.federation.seed)
        model = build_model(self.cfg, next(iter(shapes)), next(iter(classes)))
        self.like = model_arrays(model)
        self.weights = flatten(self.like)
        self._save_model_info(model, next(iter(shapes)), next(iter(classes)))
        if self.resume:
            # this run's own checkpoint, else the newest run's of this federation (a resume under a new id)
            ckpt = checkpoint.load(self.checkpoint_dir) or checkpoint.load(self.checkpoint_dir.parent)
            if ckpt is not None and ckpt.weights.size == self.weights.size:
                self.weights = ckpt.weights
                self.optimizer.load_state(ckpt.optimizer)
                self.event("info", f"resumed from checkpoint after round {ckpt.round}")
                return ckpt.round + 1
            self.event("info", "no usable checkpoint found; starting from round 1", level="warn")
        return 1

    @property
    def checkpoint_dir(self) -> Path:
        """This run's checkpoints (aggregator/checkpoint.py): a second run never overwrites the first's."""
        root = Path(self.cfg.server.checkpoint_dir or self.workdir / "checkpoints") / self.cfg.federation.name
        return root / self.run_id.replace("/", "_").replace("\\", "_")

    def _save_model_info(self, model: Any, input_shape: tuple[int, ...], num_classes: int) -> None:
        """What `fedveil model export` needs to rebuild the model without this federation's config."""
        m = self.cfg.model
        checkpoint.save_model_info(self.checkpoint_dir, {
            "run_id": self.run_id, "federation": self.cfg.federation.name, "model": m.name,
            "kwargs": model_kwargs(m.name, m.hidden, m.activation, m.groupnorm),
            "input_shape": [int(d) for d in input_shape], "num_classes": int(num_classes),
            "state_dict": [[k, list(v.shape)] for k, v in model.state_dict().items()],
            "dataset": self.cfg.data.source, "input_scaling": input_scaling(self.cfg.data.source),
            "private": bool(self.cfg.privacy.enabled),
        })

    # ---- server-side evaluation on a public held-out set ([evaluation]) -----------------
    def server_evaluation(self, rnd: int) -> dict[str, float]:
        """Score the global model on the public held-out set after round `rnd` (when configured and due).

        Unlike the clients' validation accuracy (which arrives with the next round), this is the
        accuracy of the model the round produced, on data no organization holds."""
        ev = self.cfg.evaluation
        if not ev.resolved(self.cfg.data.source) or not self.like:
            return {}
        if rnd % ev.every != 0 and rnd < self.cfg.federation.rounds:
            return {}
        try:
            heldout = self._heldout()
        except FedveilError as exc:
            self.event("error", f"server-side evaluation is off: {exc.problem} ({exc.fix})", level="warn")
            self.cfg.evaluation.source = "none"
            return {}
        model = build_model(self.cfg, heldout.feature_shape, heldout.num_classes)
        set_model_arrays(model, self.global_arrays())
        loss, acc = evaluate(model, heldout, ev.device, ev.batch_size)
        checkpoint.record_score(self.checkpoint_dir, rnd, "server_accuracy", acc)
        return {"server_accuracy": float(acc), "server_loss": float(loss)}

    def _heldout(self):
        if getattr(self, "_heldout_ds", None) is None:
            classes = {int(n.info["num_classes"]) for n in self.roster.clients.values()}
            self._heldout_ds = load_heldout(self.cfg.evaluation.resolved(self.cfg.data.source), self.cfg.data.source,
                                            image=model_kind(self.cfg.model.name) == "image",
                                            label_column=self.cfg.data.label_column,
                                            num_classes=max(classes) if classes else None)
        return self._heldout_ds

    def global_arrays(self) -> list[np.ndarray]:
        return unflatten(self.weights, self.like)

    # ---- one synchronous round ----------------------------------------------------------
    def sample_clients(self) -> list[Node]:
        clients = sorted(self.roster.clients.values(), key=lambda n: n.node_id)
        k = self.cfg.federation.clients_per_round
        return clients if k <= 0 or k >= len(clients) else sorted(self.rng.sample(clients, k), key=lambda n: n.node_id)

    def run_round(self, rnd: int) -> bool:
        """Run one synchronous round; returns True if the global model was updated."""
        started = time.time()
        fed = self.cfg.federation
        task_id = f"{self.run_id}:round-{rnd}"
        sampled = self.sample_clients()
        proxy_names = sorted(self.roster.proxy_by_name())
        assignment = self.mode.assign([str(n.node_id) for n in sampled], proxy_names, fed.min_aggregate)
        self.progress(f"round {rnd}/{fed.rounds}: training on {len(sampled)} client(s)")

        arrays = self.global_arrays()
        msgs = [
            Message(
                self._task_content({"run_id": self.run_id, "task_id": task_id, "round": rnd,
                                    "proxies": assignment[str(n.node_id)]}, arrays),
                n.node_id, wire.TRAIN, group_id=str(rnd),
            )
            for n in sampled
        ]
        answers = exchange(self.grid, msgs, timeout=fed.round_timeout)
        self.assignment = assignment
        contributions = self._collect_train_replies(rnd, sampled, answers)
        self._record_previous_round_accuracy(rnd, answers)

        if len(contributions) < fed.min_clients:
            self.event("round_skipped", f"round {rnd}: only {len(contributions)} update(s), need "
                       f"federation.min_clients={fed.min_clients}; the global model is unchanged", level="warn", round=rnd)
            self._record_round(rnd, started, participants=0, stats={})
            return False
        total, included, stats = self._aggregate(rnd, task_id, contributions)
        if total is None:
            self._record_round(rnd, started, participants=0, stats=stats)
            return False
        n_total = sum(contributions[cid]["n"] for cid in included)
        mean_delta = total / n_total
        if not np.all(np.isfinite(mean_delta)):
            self.event("rejected", f"round {rnd}: aggregate is not finite; update discarded", level="error", round=rnd)
            self._record_round(rnd, started, participants=0, stats=stats)
            return False
        self.weights = self.optimizer.step(self.weights, mean_delta)
        checkpoint.save(self.checkpoint_dir, checkpoint.Checkpoint(rnd, self.weights, self.optimizer.state(),
                                                                   {"run_id": self.run_id}))
        self._record_round(rnd, started, participants=len(included), stats=stats)
        return True

    def _collect_train_replies(self, rnd: int, sampled: list[Node], answers: dict[int, Message]) -> dict[str, dict]:
        """Record every sampled client's outcome; return the usable contributions by client id.

        `self.assignment` holds the proxies each client was told to protect for this round; a reply
        must address exactly those."""
        contributions: dict[str, dict] = {}
        for node in sampled:
            reply = answers.get(node.node_id)
            if reply is None:
                self.event("dropout", f"round {rnd}: {node.name} did not reply before the deadline "
                           f"({self.cfg.federation.round_timeout:.0f}s); it is left out of this round",
                           level="warn", source=node.name, round=rnd)
                self.store.record_client_round(self.run_id, rnd, node.name, "dropped", node_id=str(node.node_id))
                continue
            parsed = self.read_train_reply(rnd, node, reply, self.assignment.get(str(node.node_id), []))
            if parsed is None:
                continue
            status, info, metrics = parsed.status, parsed.info, parsed.metrics
            self._record_client(rnd, node, status, metrics)
            if status == wire.DROPPED:  # experiment knob `dropout`: the same as an absent client
                self.event("dropout", f"round {rnd}: {info.get('message', node.name + ' dropped out')}", level="warn",
                           source=node.name, round=rnd)
                continue
            if status == wire.BUDGET_EXHAUSTED:
                self.event("budget_exhausted", info.get("message", f"{node.name} declined: budget exhausted"),
                           level="warn", source=node.name, round=rnd)
                continue
            if status == wire.POLICY:  # the task asked for less than the organization's own [policy]
                self.event("policy", f"round {rnd}: {info.get('message', node.name + ' declined by its policy')}",
                           level="warn", source=node.name, round=rnd)
                continue
            if status != wire.OK:
                self.event("error", f"round {rnd}: {node.name}: {info.get('message', status)}", level="error",
                           source=node.name, round=rnd)
                continue
            contributions[str(node.node_id)] = {
                "name": node.name, "n": parsed.num_samples, "metrics": metrics, "payloads": parsed.payloads,
            }
        return contributions

    # ---- reading replies: everything a node sends goes through fedveil.aggregator.replies ----------
    def declared_samples(self, node: Node) -> int | None:
        n = node.info.get("num_samples")
        return int(n) if isinstance(n, int) and not isinstance(n, bool) else None

    def read_train_reply(self, rnd: int, node: Node, reply: Message, proxies: list[str]) -> boundary.ClientReply | None:
        """The validated train reply, or None once its rejection is recorded (only this update is lost).

        A Flower-level error is the node's own failure report, not a malformed reply: it reads as
        status `error`, as before."""
        if reply.has_error():
            return boundary.ClientReply(wire.ERROR, {"message": f"node error: {reply.error.reason}"}, {})
        try:
            return boundary.parse_train_reply(reply, proxies=proxies, declared=self.declared_samples(node),
                                             tolerance=self.cfg.federation.num_samples_tolerance)
        except boundary.BadReply as bad:
            self.reject_reply(rnd, node, bad)
            return None

    def reject_reply(self, rnd: int, node: Node, bad: boundary.BadReply) -> None:
        self.store.record_client_round(self.run_id, rnd, node.name, "rejected", node_id=str(node.node_id))
        self.event("rejected", f"round {rnd}: {node.name}'s reply is rejected ({bad.problem}); its update is left "
                   "out and the round goes on", level="warn", source=node.name, round=rnd)

    def trusted_metrics(self, reply: Message, node: Node | None = None) -> dict[str, float]:
        """A reply's metrics if they pass validation, else {} (for evaluation, where a bad reply just does not count)."""
        if reply.has_error():
            return {}
        if node is None:
            node = self.roster.clients.get(reply.metadata.src_node_id)
        try:
            return boundary.parse_eval_reply(reply, declared=None if node is None else self.declared_samples(node),
                                            tolerance=self.cfg.federation.num_samples_tolerance).metrics
        except boundary.BadReply:
            return {}

    def _record_client(self, rnd: int, node: Node, status: str, m: dict[str, float], staleness: int | None = None) -> None:
        steps = m.get("steps")
        self.store.record_client_round(
            self.run_id, rnd, node.name, status, node_id=str(node.node_id),
            num_samples=int(m.get("num_samples", 0)), accuracy=m.get("val_accuracy"), loss=m.get("val_loss"),
            epsilon=m.get("epsilon"), delta=m.get("delta"), budget=m.get("budget"),
            noise_multiplier=m.get("noise_multiplier"), sample_rate=m.get("sample_rate"),
            steps=None if steps is None else int(steps), accountant=self.cfg.privacy.accountant,
            train_seconds=m.get("train_seconds"), bytes_up=int(m.get("bytes_up", 0)), staleness=staleness,
        )

    def _record_previous_round_accuracy(self, rnd: int, replies: dict[int, Message]) -> None:
        """Clients evaluated the model of round rnd-1 before training: that is its global accuracy."""
        if rnd <= 1:
            return
        evals = [self.trusted_metrics(r, self.roster.clients.get(nid)) for nid, r in replies.items()]
        self._store_weighted_eval(rnd - 1, evals, "num_samples")

    def _store_weighted_eval(self, rnd: int, evals: list[dict[str, float]], weight_key: str) -> tuple[float, float] | None:
        evals = [e for e in evals if "val_accuracy" in e and e.get(weight_key, 0) > 0]
        if not evals:
            return None
        w = np.array([e[weight_key] for e in evals])
        acc = float(np.dot(w, [e["val_accuracy"] for e in evals]) / w.sum())
        loss = float(np.dot(w, [e["val_loss"] for e in evals]) / w.sum())
        self.store.set_round_evaluation(self.run_id, rnd, acc, loss)
        checkpoint.record_score(self.checkpoint_dir, rnd, "val_accuracy", acc)
        return acc, loss

    def _proxy_task(self, task_id: str, length: int, contributions: dict[str, dict] | None = None,
                    staleness: dict[str, int] | None = None) -> dict[str, Any]:
        """An aggregate request. Payloads answering other train tasks (async buffers, semi-sync carry-over)
        stay bound to their own task: `task_ids` tells the proxies which. Weights are never sent: in
        async and semi-sync-carry rounds `staleness` gives each client's versions behind, and every
        proxy computes the weights from its own config (a sync round sends neither)."""
        task = {"run_id": self.run_id, "task_id": task_id, "mode": self.mode.name, "length": length,
                "min_aggregate": self.cfg.federation.min_aggregate, "options": self.cfg.secure_options()}
        own = {cid: c["task_id"] for cid, c in (contributions or {}).items() if c.get("task_id", task_id) != task_id}
        if own:
            task["task_ids"] = {cid: c.get("task_id", task_id) for cid, c in contributions.items()}
        if staleness is not None:
            task["staleness"] = {cid: int(s) for cid, s in staleness.items()}
        return task

    def _ask_proxies(self, rnd: int, kind: str, task: dict[str, Any], groups: dict[str, dict[str, bytes]],
                     kept: Mapping[str, set[str]] | None = None) -> dict[str, tuple[str, dict[str, Any], Message]]:
        """Send each proxy its group's payloads; {proxy: (status, info, reply)} for those that answered.

        `kept` names, per proxy, the clients whose payload it validated and kept: the request lists them
        under `kept` instead of carrying their bytes again."""
        by_name = self.roster.proxy_by_name()
        for name in sorted(set(groups) - set(by_name)):  # replies are validated, so this is a bug if it happens
            self.event("rejected", f"round {rnd}: payloads for unknown proxy {name!r} are dropped", level="error",
                       round=rnd)
        groups = {name: payloads for name, payloads in groups.items() if name in by_name}
        msgs = []
        for name, payloads in sorted(groups.items()):
            named = sorted(set(payloads) & (kept or {}).get(name, set()))
            sent = {cid: blob for cid, blob in payloads.items() if cid not in named}
            content = RecordDict({"task": wire.json_record({**task, "kept": named} if named else task),
                                  "payloads": wire.blobs_record(sent)})
            msgs.append(Message(content, by_name[name].node_id, kind, group_id=str(rnd)))
        answers = exchange(self.grid, msgs, timeout=self.cfg.federation.round_timeout)
        answered = {}
        for name in sorted(groups):
            reply = answers.get(by_name[name].node_id)
            if reply is None:
                self.event("dropout", f"round {rnd}: proxy {name} did not answer", level="warn", source=name, round=rnd)
                continue
            answered[name] = self.read_proxy_reply(rnd, name, kind, reply, groups[name])
        return answered

    def read_proxy_reply(self, rnd: int, name: str, kind: str, reply: Message, sent: dict[str, bytes]
                         ) -> tuple[str, dict[str, Any], Message]:
        """(status, info, reply) of a proxy's validated reply; a malformed one reads as `error` and is recorded."""
        if reply.has_error():
            return wire.ERROR, {"message": f"node error: {reply.error.reason}"}, reply
        try:
            parsed = boundary.parse_proxy_reply(reply, sent=sent, want_partial=kind == wire.AGGREGATE,
                                               min_included=self.cfg.federation.min_aggregate)
        except boundary.BadReply as bad:
            self.event("rejected", f"round {rnd}: proxy {name}'s reply is rejected ({bad.problem}); its partial is "
                       "not used", level="warn", source=name, round=rnd)
            return wire.ERROR, {"message": f"malformed reply ({bad.field})", "field": bad.field}, reply
        return parsed.status, parsed.info, reply

    def _record_rejections(self, rnd: int, proxy: str, rejected: dict[str, str], contributions: dict[str, dict]) -> None:
        for cid, reason in rejected.items():
            who = contributions.get(cid, {}).get("name", cid)
            self.event("rejected", f"round {rnd}: proxy {proxy} rejected {who}'s payload: {reason}", level="warn",
                       source=proxy, round=rnd)

    def _agree_on_clients(self, rnd: int, task: dict[str, Any], groups: dict[str, dict[str, bytes]],
                          contributions: dict[str, dict], kept: dict[str, set[str]]
                          ) -> dict[str, dict[str, bytes]] | None:
        """Additive shares decode only as a whole: every proxy must combine the same clients.

        Each proxy validates first (opening nothing for good); the server then asks all of them to
        combine only the clients valid everywhere, once. Returns the narrowed groups, or None; fills
        `kept` with the clients whose validated payload each proxy kept (`kept_clients`).
        """
        answered = self._ask_proxies(rnd, wire.VALIDATE, task, groups)
        ok = {name for name, (status, _, _) in answered.items() if status == wire.OK}
        for name in sorted(set(answered) - ok):
            self.event("error", f"round {rnd}: proxy {name} could not validate: "
                       f"{answered[name][1].get('message', answered[name][0])}", level="warn", source=name, round=rnd)
        need = self._partials_needed(len(groups))
        if len(ok) < need:
            self.event("round_skipped", f"round {rnd}: only {len(ok)} of {len(groups)} proxies could validate their "
                       f"shares; mode {self.mode.name} needs {need}", level="warn", round=rnd)
            return None
        bad: set[str] = set()
        for name in sorted(ok):
            info = answered[name][1]
            self._record_rejections(rnd, name, info.get("rejected") or {}, contributions)
            bad |= set(info.get("rejected") or {})
            kept[name] = kept_clients(info.get("kept"), groups[name])
        common = set.intersection(*(set(g) for g in groups.values())) - bad
        return {name: {cid: blob for cid, blob in g.items() if cid in common} for name, g in groups.items() if name in ok}

    def _commit_clients(self, rnd: int, task: dict[str, Any], groups: dict[str, dict[str, bytes]],
                        proxies: list[str]) -> tuple[dict[str, dict[str, bytes]] | None, dict[str, Any]]:
        """Quorum modes: each proxy commits once to the agreed client set and tags it for its peers.

        The server cannot be trusted to give every proxy the same set, so proxies release only a set a
        quorum of them committed to (`fedveil.secure.quorum`). Returns the groups of the proxies that
        committed and the aggregate task carrying `quorum_tags` {recipient: {issuer: hex tag}}, or None
        when fewer than a quorum committed."""
        clients = sorted(set.intersection(*(set(g) for g in groups.values()))) if groups else []
        request = {**task, "proxies": proxies, "clients": clients}
        answered = self._ask_proxies(rnd, wire.COMMIT, request, {name: {} for name in groups})
        tags: dict[str, dict[str, str]] = {}
        committed = []
        for name, (status, info, _) in sorted(answered.items()):
            if status != wire.OK:
                self.event("refused" if status == wire.REFUSED else "error", f"round {rnd}: proxy {name} did not "
                           f"commit: {info.get('message', status)}", level="warn", source=name, round=rnd)
                continue
            committed.append(name)
            given = info.get("tags")
            for peer, tag in (given.items() if isinstance(given, dict) else ()):
                if peer in proxies and isinstance(tag, str) and len(tag) <= 128:
                    tags.setdefault(peer, {})[name] = tag
        need = self.mode.quorum_size(len(proxies))
        if len(committed) < need:
            self.event("round_skipped", f"round {rnd}: only {len(committed)} of {len(proxies)} proxies committed to "
                       f"the client set; mode {self.mode.name} releases only with a quorum of {need}", level="warn",
                       round=rnd)
            return None, task
        return {name: groups[name] for name in committed}, {**task, "quorum_tags": tags}

    def _partials_needed(self, n_proxies: int) -> int:
        """Partials a shared aggregate cannot do without: all of them, unless the mode tolerates missing ones
        (replicated sharing); `finish` still decides whether the ones that came suffice."""
        min_partials = getattr(self.mode, "min_partials", None)
        return n_proxies if min_partials is None else int(min_partials(n_proxies))

    def _aggregate(self, rnd: int, task_id: str, contributions: dict[str, dict],
                   staleness: dict[str, int] | None = None) -> tuple[np.ndarray | None, list[str], dict]:
        """Forward each proxy the payloads addressed to it; combine the partials into sum w_i n_i delta_i.

        With `staleness` (async, semi-sync carry) the proxies apply w_i = alpha(s_i) from their own config;
        the caller normalizes with the same public alpha on the mode's grid (`applied_weight`)."""
        length = int(self.weights.size)
        task = self._proxy_task(task_id, length, contributions, staleness)
        kept: dict[str, set[str]] = {}
        groups: dict[str, dict[str, bytes]] = {}
        for cid, c in contributions.items():
            for proxy_name, blob in c["payloads"].items():
                groups.setdefault(proxy_name, {})[cid] = blob
        stats = {
            "bytes_up": int(sum(c["metrics"].get("bytes_up", 0) for c in contributions.values())),
            "protect_seconds": float(np.mean([c["metrics"].get("protect_seconds", 0.0) for c in contributions.values()])),
        }
        shared = len(groups) > 1 and all(len(c["payloads"]) == len(groups) for c in contributions.values())
        need = self._partials_needed(len(groups))
        if shared and hasattr(self.mode, "validate"):
            narrowed = self._agree_on_clients(rnd, task, groups, contributions, kept)
            if narrowed is not None and getattr(self.mode, "needs_quorum", False):
                narrowed, task = self._commit_clients(rnd, task, narrowed, sorted(groups))
            if narrowed is None:
                return None, [], stats
            groups = narrowed
        answered = self._ask_proxies(rnd, wire.AGGREGATE, task, groups, kept=kept)
        lost = [n for n, (status, info, _) in answered.items() if status == wire.REFUSED
                and wire.KEPT_MISSING in str(info.get("message", ""))]
        if lost:  # a proxy that restarted since it validated: the same request, with the bytes
            answered.update(self._ask_proxies(rnd, wire.AGGREGATE, task, {n: groups[n] for n in lost}))
        partials, included_sets, combine = [], [], []
        for name, (status, info, reply) in answered.items():
            self._record_rejections(rnd, name, info.get("rejected") or {}, contributions)
            if status != wire.OK:
                self.event("refused" if status == wire.REFUSED else "error",
                           f"round {rnd}: proxy {name}: {info.get('message', status)}", level="warn", source=name,
                           round=rnd)
                continue
            partials.append(wire.reply_blobs(reply.content)["partial"])
            included_sets.append(list(info["included"]))
            combine.append(wire.reply_metrics(reply.content).get("combine_seconds", 0.0))
        stats["combine_seconds"] = float(max(combine, default=0.0))
        if shared and (len(partials) < need or any(set(s) != set(included_sets[0]) for s in included_sets)):
            self.event("round_skipped", f"round {rnd}: the proxies did not all combine the same clients; additive "
                       "shares only decode as a whole, so this round is dropped", level="warn", round=rnd)
            return None, [], stats
        if not partials:
            self.event("round_skipped", f"round {rnd}: no proxy returned an aggregate", level="warn", round=rnd)
            return None, [], stats
        included = sorted(set(included_sets[0]) if shared else {c for s in included_sets for c in s})
        start = time.perf_counter()
        try:
            total = self.mode.finish(partials, length, self.server_keys)
        except (ValueError, AggregationRefused) as exc:
            self.event("round_skipped", f"round {rnd}: the server refused to finish the aggregate: {exc}",
                       level="error", round=rnd)
            return None, [], stats
        stats["finish_seconds"] = time.perf_counter() - start
        return total, included, stats

    def _record_round(self, rnd: int, started: float, participants: int, stats: dict, **more: Any) -> None:
        finished = time.time()
        if participants > 0:  # a new global model: score it on the public held-out set (not timed)
            more.update(self.server_evaluation(rnd))
        self.store.record_round(
            self.run_id, rnd, started_at=started, finished_at=finished, seconds=finished - started,
            participants=participants, bytes_up=int(stats.get("bytes_up", 0)),
            protect_seconds=float(stats.get("protect_seconds", 0.0)),
            combine_seconds=float(stats.get("combine_seconds", 0.0)),
            finish_seconds=float(stats.get("finish_seconds", 0.0)), **more,
        )

    # ---- the whole run ------------------------------------------------------------------
    def final_evaluation(self, rnd: int) -> tuple[float, float] | None:
        """Clients evaluate the final model on their validation splits (no training, no ε spent)."""
        arrays = self.global_arrays()
        msgs = [Message(self._task_content({"run_id": self.run_id}, arrays), n.node_id, wire.EVALUATE)
                for n in self.roster.clients.values()]
        replies = exchange(self.grid, msgs, timeout=self.cfg.federation.round_timeout)
        evals = [self.trusted_metrics(r) for r in replies.values() if reply_ok(r)[0] == wire.OK]
        return self._store_weighted_eval(rnd, evals, "num_val")

    def run(self) -> dict[str, Any]:
        """Handshake, then rounds: sync, semi-sync (late replies dropped or carried), or async (FedBuff)."""
        fed = self.cfg.federation
        self._open_run()
        heartbeat = self._start_heartbeat()
        if fed.secure == "none":
            self.event("insecure", "secure mode 'none': proxies see every update in the clear. Use it only for "
                       "comparisons, never with real data", level="warn")
        try:
            self.handshake()
            first = self.init_model()
            last = first - 1
            if fed.mode == "async":
                from fedveil.aggregator.async_engine import AsyncRounds

                last = AsyncRounds(self).run(first)
            elif fed.mode == "semi-sync" and fed.late_replies == "carry":
                from fedveil.aggregator.async_engine import SemiSyncRounds

                last = SemiSyncRounds(self).run(first)
            else:
                for rnd in range(first, fed.rounds + 1):
                    self.run_round(rnd)
                    last = rnd
            result = self.final_evaluation(last) if last >= 1 else None
            self.store.finish_run(self.run_id, "completed", message=self._skipped_rounds_note())
            return {"rounds": last, "accuracy": None if result is None else result[0]}
        except BaseException as exc:
            self.store.finish_run(self.run_id, "failed", message=str(exc))
            raise
        finally:
            heartbeat.set()

    def _skipped_rounds_note(self) -> str:
        """A completed run whose rounds produced no aggregate must not read as plain success."""
        rows = self.store.rounds(self.run_id)
        skipped = [r["round"] for r in rows if r["participants"] == 0]
        if not skipped:
            return ""
        return (f"{len(skipped)} of {len(rows)} round(s) produced no aggregate (rounds {', '.join(map(str, skipped))}); "
                "see the run's round_skipped events")

    def _open_run(self) -> None:
        """Close the store's runs whose server died as `interrupted`, then start this run, or with
        `resume` continue it under the same id (its rounds and events stay one history)."""
        for ghost in self.store.mark_interrupted():  # this run too, when it is the one being resumed
            self.progress(f"run {ghost['id']} had lost its server; it is marked interrupted")
        previous = self.store.resume_run(self.run_id) if self.resume else None
        if previous is None:
            fed = self.cfg.federation
            self.store.create_run(self.run_id, mode=fed.mode, secure=fed.secure, name=fed.name,
                                  dataset=self.cfg.data.source, model=self.cfg.model.name, rounds_planned=fed.rounds,
                                  config=self.cfg.model_dump())
        else:
            self.event("resumed", f"run {self.run_id} resumed (it was {previous})")

    def _start_heartbeat(self) -> threading.Event:
        """Beat from a daemon thread, so a long round never looks like a dead server; set the event to stop."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_SECONDS):
                try:
                    self.store.heartbeat(self.run_id)
                except Exception as exc:  # noqa: BLE001 - a busy store must not end the run; the next beat retries
                    log.warning("heartbeat not written: %s", exc)

        self.store.heartbeat(self.run_id)
        threading.Thread(target=beat, name="fedveil-heartbeat", daemon=True).start()
        return stop
