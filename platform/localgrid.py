"""An in-process Grid for tests and benchmarks: real ClientApps and the real ServerApp engine, in threads.

It implements Flower's `Grid` interface, so the engine under test is the one that runs in a
deployment; only the transport differs. Each node can be given a deterministic delay or be
marked dead, which is how tests exercise deadlines and dropouts without real processes.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


@dataclass
class LocalNode:
    """One simulated SuperNode: its node-config and experiment knobs."""

    node_config: dict[str, Any]
    delay: float | Callable[[Message], float] = 0.0
    dead: bool = False
    state: RecordDict = field(default_factory=RecordDict)


class LocalGrid(Grid):
    """Runs `app` for each message on a thread; one message at a time per node, like a SuperNode."""

    def __init__(self, app: ClientApp, nodes: dict[int, LocalNode], run_id: int = 1, run_config: dict | None = None,
                 workers: int = 8) -> None:
        self.app = app
        self.nodes = nodes
        self._run = Run.create_empty(run_id)
        self._run_config = run_config or {}
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._locks = {nid: threading.Lock() for nid in nodes}
        self._replies: dict[str, Message] = {}
        self._cond = threading.Condition()
        self.sent: list[Message] = []
        # Flower stamps new Messages with the identity of the task running in this process.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            msg.metadata.__dict__["_src_node_id"] = 0
            self.sent.append(msg)
            ids.append(mid)
            node = self.nodes.get(msg.metadata.dst_node_id)
            if node is not None and not node.dead:
                self._pool.submit(self._deliver, msg, msg.metadata.dst_node_id, node)
        return ids

    def _deliver(self, msg: Message, node_id: int, node: LocalNode) -> None:
        delay = node.delay(msg) if callable(node.delay) else node.delay
        with self._locks[node_id]:
            if delay:
                time.sleep(delay)
            context = Context(run_id=self._run.run_id, node_id=node_id, node_config=node.node_config,
                              state=node.state, run_config=self._run_config)
            reply = self.app(msg, context)
        reply.metadata.__dict__["_src_node_id"] = node_id
        with self._cond:
            self._replies[msg.metadata.message_id] = reply
            self._cond.notify_all()

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._cond:
            found = [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]
        return found

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = list(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Message] = []
        pending = set(ids)
        while pending and (deadline is None or time.monotonic() < deadline):
            got = list(self.pull_messages(pending))
            out.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            time.sleep(0.01)
        return out

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def grid_for_config(cfg, workdir: Path, *, delays: dict[str, float | Callable[[Message], float]] | None = None,
                    dead: set[str] | None = None, keys_dir: Path | None = None) -> LocalGrid:
    """A LocalGrid with one node per proxy and organization of `cfg` (proxies 1.., clients 101..).

    Node configs match what `fedveil demo` gives real SuperNodes, including each organization's
    own copy of the config file (its budget never comes from the server).
    """
    from fedveil.platform.federation import write_config
    from fedveil.platform.nodeapp import app

    delays = delays or {}
    dead = dead or set()
    config_path = write_config(cfg, workdir / "federation.toml")
    nodes: dict[int, LocalNode] = {}
    for i, name in enumerate(cfg.proxies.names):
        nc: dict[str, Any] = {"role": "proxy", "name": name, "workdir": str(workdir / "proxies" / name),
                              "min-aggregate": cfg.federation.min_aggregate, "config": str(config_path)}
        if keys_dir is not None:
            nc["keys"] = str(keys_dir / name)
        nodes[1 + i] = LocalNode(nc, delay=delays.get(name, 0.0), dead=name in dead)
    for i, org in enumerate(cfg.orgs):
        nc = {"role": "client", "name": org.name, "workdir": str(workdir / "orgs" / org.name), "data": org.data,
              "index": i, "num-orgs": len(cfg.orgs), "config": str(config_path)}
        if keys_dir is not None:
            nc["keys"] = str(keys_dir / org.name)
        nodes[101 + i] = LocalNode(nc, delay=delays.get(org.name, 0.0), dead=org.name in dead)
    return LocalGrid(app, nodes)
