"""The one ClientApp every fedveil SuperNode runs; it dispatches by the node's role.

Flower cold-starts this module for every message, so it imports only Flower and the small
wire-format module at the top; the client and proxy roles are imported inside the handlers.
Expected failures become an `error` status with a readable message, never a traceback.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedveil.platform import messages as wire
from fedveil.platform.errors import FedveilError

app = ClientApp()

Handler = Callable[[Message, Context], Message]


def _role(context: Context) -> str:
    return str(context.node_config.get("role", "client"))


def _name(context: Context) -> str:
    return str(context.node_config.get("name", ""))


def _federation(msg: Message):
    from fedveil.platform.config import FedveilConfig

    return FedveilConfig.from_json(_task(msg)["config"])


def _task(msg: Message) -> dict:
    return wire.record_json(msg.content.config_records["task"])


def _reply(msg: Message, status: str, info: dict, **parts) -> Message:
    return Message(wire.reply_content(status, info, **parts), reply_to=msg)


def guarded(role: str | None) -> Callable[[Handler], Handler]:
    """Check the node's role, and turn every failure into an `error` reply the server records."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(msg: Message, context: Context) -> Message:
            actual = _role(context)
            try:
                if role is not None and actual != role:
                    raise FedveilError(f"a {actual} node was sent a {msg.metadata.message_type} message")
                return handler(msg, context)
            except Exception as exc:  # noqa: BLE001 - every failure must reach the server as a status
                text = str(exc) if isinstance(exc, FedveilError) else f"{type(exc).__name__}: {exc}"
                return _reply(msg, wire.ERROR, {"role": actual, "name": _name(context), "message": text})

        return run

    return wrap


def _state_cache(context: Context) -> dict:
    """Per-run cache kept by the SuperNode between messages (e.g. the planned σ)."""
    rec = context.state.config_records.get("fedveil-cache")
    return {} if rec is None else wire.record_json(rec)


def _save_state_cache(context: Context, cache: dict) -> None:
    context.state["fedveil-cache"] = wire.json_record(cache)


@app.query("hello")
@guarded(None)
def hello(msg: Message, context: Context) -> Message:
    """Role discovery and liveness: the server cannot read node_config, so nodes describe themselves."""
    if _role(context) == "proxy":
        from fedveil.secure.modes import available_modes

        info = {"role": "proxy", "name": _name(context), "modes": available_modes(),
                "min_aggregate": int(context.node_config.get("min-aggregate", 2))}
    else:
        from fedveil.clients.node import ClientIdentity, hello as client_hello

        info = client_hello(ClientIdentity.from_node_config(dict(context.node_config)), _federation(msg))
    return _reply(msg, wire.OK, info)


@app.train()
@guarded("client")
def train(msg: Message, context: Context) -> Message:
    """One train task. A resent (run_id, task_id) gets the stored reply, byte for byte, without training;
    new work is checked against the org's policy, trained, protected, then charged and stored in one
    transaction (clients/node.py `release`) before anything leaves."""
    from fedveil.clients import knobs as knobs_mod
    from fedveil.clients.node import ClientIdentity, answered_before, protect, release, train_task

    identity = ClientIdentity.from_node_config(dict(context.node_config))
    task = _task(msg)
    run_id, task_id = str(task["run_id"]), str(task["task_id"])
    stored = answered_before(identity, run_id, task_id)
    if stored is not None:
        return _reply(msg, stored.status, stored.info, metrics=stored.metrics,
                      blobs=stored.blobs if stored.status == wire.OK else None)
    federation = _federation(msg)
    cache = _state_cache(context)
    arrays = wire.record_weights(msg.content.array_records["global"])
    knobs = _experiment_knobs(identity, federation)
    if knobs is not None and knobs_mod.drops_out(knobs):
        knobs_mod.slow_down(knobs, 0.0)
        return _reply(msg, wire.DROPPED, {"org": identity.org, "message": f"{identity.org} abandoned the task "
                                          "(experiment knob orgs.dropout)"})
    busy = time.perf_counter()
    outcome = train_task(identity, federation, arrays, run_id, task_id, cache, proxies=task["proxies"])
    _save_state_cache(context, cache)
    if outcome.status != wire.OK or outcome.vector is None:
        return _reply(msg, outcome.status, outcome.info, metrics=outcome.metrics)
    start = time.perf_counter()
    blobs = protect(identity, federation, outcome.vector, task["proxies"], run_id, task_id, str(context.node_id))
    outcome.metrics["protect_seconds"] = time.perf_counter() - start
    outcome.metrics["bytes_up"] = float(sum(len(b) for b in blobs.values()))
    if knobs is not None:
        outcome.metrics["injected_seconds"] = knobs_mod.slow_down(knobs, time.perf_counter() - busy)
    final = release(identity, outcome, blobs, run_id, task_id)
    return _reply(msg, final.status, final.info, metrics=final.metrics,
                  blobs=final.blobs if final.status == wire.OK else None)


def _experiment_knobs(identity, federation):
    """EXPERIMENT KNOBS (speed_factor, latency, dropout) for this org, from its own config file, else the run's."""
    from fedveil.clients import knobs as knobs_mod
    from fedveil.clients.node import local_config

    cfg = local_config(identity) if identity.local_config else federation
    knobs = knobs_mod.knobs_for(cfg, identity.org)
    return knobs if knobs.active else None


@app.evaluate()
@guarded("client")
def evaluate(msg: Message, context: Context) -> Message:
    from fedveil.clients.node import ClientIdentity, evaluate_task

    identity = ClientIdentity.from_node_config(dict(context.node_config))
    metrics = evaluate_task(identity, _federation(msg), wire.record_weights(msg.content.array_records["global"]))
    return _reply(msg, wire.OK, {"org": identity.org}, metrics=metrics)


@app.query("validate")
@guarded("proxy")
def validate(msg: Message, context: Context) -> Message:
    """Check payloads without opening them for good, so all proxies can agree on one client set."""
    from fedveil.aggregator.proxy import ProxyIdentity, validate_task
    from fedveil.secure.modes import AggregationRefused

    try:
        rejected, kept = validate_task(ProxyIdentity.from_node_config(dict(context.node_config)), _task(msg),
                                       wire.record_blobs(msg.content.array_records["payloads"]))
    except AggregationRefused as exc:
        return _reply(msg, wire.REFUSED, {"role": "proxy", "name": _name(context), "message": str(exc)})
    return _reply(msg, wire.OK, {"role": "proxy", "name": _name(context), "rejected": rejected, "kept": kept})


@app.query("commit")
@guarded("proxy")
def commit(msg: Message, context: Context) -> Message:
    """Commit once to the aggregate's client set (modes that need a quorum); the reply carries one tag per
    peer, which the server forwards with the aggregate request."""
    from fedveil.aggregator.proxy import ProxyIdentity, commit_task
    from fedveil.secure.modes import AggregationRefused

    try:
        tags = commit_task(ProxyIdentity.from_node_config(dict(context.node_config)), _task(msg))
    except AggregationRefused as exc:
        return _reply(msg, wire.REFUSED, {"role": "proxy", "name": _name(context), "message": str(exc)})
    return _reply(msg, wire.OK, {"role": "proxy", "name": _name(context), "tags": tags})


@app.query("aggregate")
@guarded("proxy")
def aggregate(msg: Message, context: Context) -> Message:
    from fedveil.aggregator.proxy import ProxyIdentity, aggregate_task
    from fedveil.secure.modes import AggregationRefused

    start = time.perf_counter()
    try:
        # the proxy takes weights and encoding options from its own config, never from the task
        result = aggregate_task(ProxyIdentity.from_node_config(dict(context.node_config)), _task(msg),
                                wire.record_blobs(msg.content.array_records["payloads"]))
    except AggregationRefused as exc:
        return _reply(msg, wire.REFUSED, {"role": "proxy", "name": _name(context), "message": str(exc)})
    info = {"role": "proxy", "name": _name(context), "included": result.included, "rejected": result.rejected}
    return _reply(msg, wire.OK, info, metrics={"combine_seconds": time.perf_counter() - start},
                  blobs={"partial": result.partial})
