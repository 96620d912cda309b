"""Running a whole federation on one host: what `fedveil demo` and the end-to-end tests do.

It starts a real SuperLink, proxy SuperNodes and client SuperNodes on loopback, submits the run
with `flwr run`, follows progress through the metrics store, and always stops what it started.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import tomli_w

from fedveil.platform import launcher, proctree
from fedveil.platform.config import FedveilConfig, OrgSection
from fedveil.platform.errors import FedveilError
from fedveil.platform.store import MetricsStore, store_url

DEFAULT_ORG_NAMES = ("hospital-a", "hospital-b", "hospital-c", "clinic-d", "lab-e", "bank-f", "lab-g", "clinic-h")


def demo_orgs(count: int) -> list[OrgSection]:
    names = list(DEFAULT_ORG_NAMES[:count]) + [f"org-{i + 1}" for i in range(len(DEFAULT_ORG_NAMES), count)]
    return [OrgSection(name=n) for n in names]


def write_config(cfg: FedveilConfig, path: Path) -> Path:
    """Write the effective config; the server and every local node read the same file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = cfg.model_dump(exclude_none=True)
    path.write_text(tomli_w.dumps(data))
    return path


REFUSED_LIMIT = 3  # consecutive refused Fleet connections, 1 s apart, before the SuperLink counts as stopped
SERVERAPP_PROGRAM = "flwr-serverapp"  # what flower-superexec starts for each run


def follow_run(store_url: str, run_name: str, *, flower_run_id: int, connection: str, env: dict[str, str],
               workdir: Path, superlink: subprocess.Popen, timeout: float | None = None,
               on_round: Callable[[dict], None] | None = None, fleet: tuple[str, int] | None = None) -> dict:
    """Follow a run through the store until it finishes; returns its row.

    Fails clearly, instead of waiting forever, when the SuperLink stops or when Flower reports the
    ServerApp finished without the run being closed in the store (it crashed). A SuperLink that got
    SIGTERM stays alive in a graceful shutdown that never ends, but closes its Fleet port (`fleet`):
    nodes are locked out while the ServerApp would skip every remaining round, so a port refused
    for REFUSED_LIMIT checks in a row counts as stopped too.
    """
    logs = workdir / "logs" / "superlink.log"
    store = MetricsStore(store_url)
    seen_rounds: set[int] = set()
    deadline = None if timeout is None else time.monotonic() + timeout
    last_flower_check = 0.0
    refused = 0
    try:
        while deadline is None or time.monotonic() < deadline:
            run = store.get_run(run_name)
            for row in store.rounds(run_name) if run else []:
                if row["round"] not in seen_rounds:
                    seen_rounds.add(row["round"])
                    if on_round:
                        on_round(row)
            if run is not None and run["status"] != "running":
                return run
            if superlink.poll() is not None:
                raise FedveilError("the SuperLink stopped unexpectedly", f"see {logs}")
            refused = 0 if fleet is None or launcher.accepts_connections(*fleet) else refused + 1
            if refused >= REFUSED_LIMIT:
                raise FedveilError(f"the SuperLink no longer accepts node connections on {fleet[0]}:{fleet[1]} "
                                   "(it is shutting down: was it sent SIGTERM?)",
                                   f"see {logs}; restart the server with --resume to continue the run")
            # `flwr ls` is a cold CLI start (~2 s of CPU, a slow round on a small host): ask Flower only
            # when no ServerApp process is left in the SuperLink's tree (or where /proc cannot tell).
            if time.monotonic() - last_flower_check > 15 and \
                    not proctree.runs_program([superlink.pid], SERVERAPP_PROGRAM):
                last_flower_check = time.monotonic()
                status = launcher.run_status(flower_run_id, connection, env, workdir / "flower-app")
                if status.startswith("finished") and (store.get_run(run_name) or {}).get("status", "running") == "running":
                    raise FedveilError(f"the ServerApp ended ({status}) without finishing the run", f"see {logs}")
            time.sleep(1.0)
        raise FedveilError(f"the run did not finish within {timeout:.0f}s",
                           "raise --timeout, or lower --rounds / the data size")
    finally:
        store.close()


@dataclass
class LocalFederation:
    """A federation on loopback: one SuperLink, the configured proxies and one SuperNode per org."""

    cfg: FedveilConfig
    workdir: Path
    keys_dir: Path | None = None
    progress: Callable[[str], None] = print
    persist_superlink: bool = False  # see launcher.superlink_argv; benchmarks/fault_matrix.py reads it
    processes: launcher.ProcessGroup = field(init=False)

    def __post_init__(self) -> None:
        self.workdir = self.workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.processes = launcher.ProcessGroup(self.workdir)
        self.env = launcher.flower_env(self.workdir)
        self.config_path = write_config(self.cfg, self.workdir / "federation.toml")
        self.store_url = self.cfg.server.store or store_url(self.workdir)

    def start(self) -> None:
        port = launcher.free_port()
        self.address = f"127.0.0.1:{port}"
        self.fleet = ("127.0.0.1", port)
        tls = None
        if self.keys_dir is not None:
            server = self.keys_dir / "server"
            tls = launcher.TlsFiles(server / "ca.pem", server / "superlink.pem", server / "superlink.key")
        argv = launcher.superlink_argv("127.0.0.1", port, self.workdir, tls, auth=tls is not None,
                                       persist=self.persist_superlink)
        self.superlink = self.processes.start("superlink", argv, self.env)
        launcher.wait_for_port("127.0.0.1", port, 60, self.superlink, "flower-superlink")
        launcher.write_connection(Path(self.env["FLWR_HOME"]), "fedveil-local", self.address,
                                  None if tls is None else tls.ca_cert)
        self.progress(f"SuperLink on {self.address}" + (" (TLS, SuperNode authentication)" if tls else " (insecure)"))
        if self.keys_dir is not None:
            names = list(self.cfg.proxies.names) + [o.name for o in self.cfg.orgs]
            launcher.register_supernodes([self.keys_dir / n / "supernode.pub" for n in names], "fedveil-local",
                                         self.env)
        for name in self.cfg.proxies.names:
            self._supernode(f"proxy-{name}", {
                "role": "proxy", "name": name, "workdir": str(self.workdir / "proxies" / name),
                "min-aggregate": self.cfg.federation.min_aggregate, "config": str(self.config_path),
            })
        for i, org in enumerate(self.cfg.orgs):
            self._supernode(f"client-{org.name}", {
                "role": "client", "name": org.name, "workdir": str(self.workdir / "orgs" / org.name),
                "config": str(self.config_path), "data": org.data, "index": i, "num-orgs": len(self.cfg.orgs),
            })
        self.progress(f"started {len(self.cfg.proxies.names)} proxies and {len(self.cfg.orgs)} clients")

    def _supernode(self, label: str, node_config: dict[str, Any]) -> None:
        ca = auth = None
        if self.keys_dir is not None:
            bundle = self.keys_dir / node_config["name"]
            node_config["keys"] = str(bundle)
            ca, auth = bundle / "ca.pem", bundle / "supernode.key"
        argv = launcher.supernode_argv(self.address, launcher.free_port(), node_config, ca_cert=ca, auth_key=auth)
        self.processes.start(label, argv, self.env)

    def submit(self, run_name: str, resume: bool = False) -> int:
        run_config = {"config": str(self.config_path), "workdir": str(self.workdir), "store": self.store_url,
                      "run-name": run_name, "resume": resume}
        if self.keys_dir is not None:
            run_config["keys"] = str(self.keys_dir / "server")
        self.flower_run_id = launcher.submit_run(self.workdir, "fedveil-local", run_config, self.env)
        return self.flower_run_id

    def wait(self, run_name: str, timeout: float, on_round: Callable[[dict], None] | None = None) -> dict:
        """Follow the run in the store until it finishes; fail clearly if the ServerApp dies."""
        return follow_run(self.store_url, run_name, flower_run_id=self.flower_run_id, connection="fedveil-local",
                          env=self.env, workdir=self.workdir, superlink=self.superlink, timeout=timeout,
                          on_round=on_round, fleet=self.fleet)

    def stop(self) -> None:
        self.processes.stop_all()
