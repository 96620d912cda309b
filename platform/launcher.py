"""Starting and stopping Flower's processes: SuperLink, SuperNodes, and `flwr run`.

Every process is started in its own session so that stopping it also stops the ClientApp
processes it spawned. A SuperLink may ignore SIGTERM, so stopping escalates to SIGKILL after a
grace period, and every child is reaped. Flower's state stays in the work dir (FLWR_HOME), and
telemetry and update checks are off because deployments are often air-gapped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from fedveil.platform import proctree
from fedveil.platform.errors import FedveilError


def flower_env(workdir: Path) -> dict[str, str]:
    """Environment for Flower processes: state in the work dir, no phoning home."""
    env = dict(os.environ)
    # Flower's processes start their helpers (flower-superexec, flwr-clientapp...) by name, so the
    # interpreter's own bin dir must be on PATH even when its environment is not activated.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        FLWR_HOME=str((workdir / "flwr-home").resolve()),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise FedveilError(f"{what or 'process'} exited with code {proc.returncode} while starting",
                               "see its log file in the work dir")
        if accepts_connections(host, port):
            return
        time.sleep(0.2)
    raise FedveilError(f"{what or 'process'} did not open {host}:{port} within {timeout:.0f}s",
                       "check that the port is free, or see its log file in the work dir")


def bin_path(name: str) -> str:
    """A console script from the same environment as this interpreter (works without activating it)."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise FedveilError(f"`{name}` is not installed", "install fedveil with its dependencies: pip install fedveil")
    return found


def node_config_arg(values: Mapping[str, Any]) -> str:
    """Flower's --node-config syntax: space-separated key=value with TOML-quoted strings."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            parts.append(f"{key}={'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            parts.append(f"{key}={value}")
        else:
            text = str(value)
            if "'" in text or " " in text:
                raise FedveilError(f"node-config value {text!r} for {key} contains a quote or space",
                                   "use paths without spaces or quotes for fedveil work dirs")
            parts.append(f"{key}='{text}'")
    return " ".join(parts)


@dataclass
class TlsFiles:
    """Certificates and SuperNode auth material for a TLS-enabled SuperLink (from `fedveil keys`)."""

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None


@dataclass
class ProcessGroup:
    """The processes a command started; `stop_all` always stops every one of them *and their trees*.

    Flower detaches some of its helpers (the SuperLink's executor and the ServerApp it spawns run in
    a session of their own), so the group remembers every descendant it has seen and stops them all,
    SIGKILL after `grace` (see fedveil.platform.proctree). A watchdog process does the same if the
    command dies without calling `stop_all` (kill -9).
    """

    workdir: Path
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)
    watchdog: bool = True
    seen: dict[int, int] = field(default_factory=dict)
    _dog: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _tracker: threading.Thread | None = field(default=None, init=False, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def start(self, name: str, argv: list[str], env: Mapping[str, str] | None = None, *,
              capture: bool = False) -> subprocess.Popen:
        """Start `argv` in a new session, logging to logs/NAME.log (or to a pipe, with capture=True)."""
        self._start_tracking()
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        if capture:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=dict(env or os.environ), start_new_session=True, cwd=self.workdir, text=True,
                                    bufsize=1)
        else:
            with open(logs / f"{name}.log", "ab") as log:
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=dict(env or os.environ), start_new_session=True, cwd=self.workdir)
        self.procs.append((name, proc))
        proctree.watch(self._dog, proc.pid)
        return proc

    def _start_tracking(self) -> None:
        if self._tracker is not None:
            return
        self._stopping.clear()
        proctree.become_subreaper()
        if self.watchdog:
            self._dog = proctree.start_watchdog()
        self._tracker = threading.Thread(target=self._track, name="fedveil-proctree", daemon=True)
        self._tracker.start()

    def _track(self, every: float = 1.0) -> None:
        """Remember the tree's members while they can still be found by parent id."""
        while not self._stopping.wait(every):
            self.snapshot()

    def snapshot(self) -> dict[int, int]:
        """Add the current descendants of the started processes to `seen`; returns them all."""
        with self._lock:
            table = proctree.proc_table()
            roots = [p.pid for _, p in self.procs] + list(proctree.alive(self.seen, table))
            self.seen.update(proctree.descendants(roots, table))
            return dict(self.seen)

    def alive(self) -> list[str]:
        return [name for name, p in self.procs if p.poll() is None]

    def stop_all(self, grace: float = 5.0) -> None:
        """SIGTERM every started process and its whole tree; SIGKILL what is left after `grace` s.

        A second Ctrl-C or SIGTERM while stopping is ignored: interrupting the stop is what used to
        leave processes behind, and it ends within grace + 5 s anyway.
        """
        with _signals_deferred():
            self._stop_all(grace)

    def _stop_all(self, grace: float) -> None:
        self._stopping.set()
        roots = [p.pid for _, p in self.procs]
        table = proctree.proc_table()
        tracked = {**self.snapshot(), **{pid: table[pid].start for pid in roots if pid in table}}
        for pid in roots:  # the tree is known before anything exits; groups also work where /proc does not
            _signal_group(pid, signal.SIGTERM)
        proctree.stop_tree(tracked, roots=roots, grace=grace, no_reap=roots)
        for _, proc in self.procs:
            _signal_group(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        self.seen.clear()
        if self._tracker is not None:
            self._tracker.join(timeout=5)
            self._tracker = None
        proctree.release(self._dog)
        self._dog = None

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ignore SIGINT/SIGTERM in the block (main thread only; elsewhere signals are not ours to set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _signal_group(pid: int, sig: int) -> None:
    """Signal a started process's whole session (it started it with start_new_session)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


FLWR_IN_MEMORY_STATE = ":flwr-in-memory:"  # flwr.supercore.constant.FLWR_IN_MEMORY_DB_NAME


def superlink_argv(host: str, port: int, workdir: Path, tls: TlsFiles | None = None,
                   auth: bool = False, persist: bool = True) -> list[str]:
    """`persist`: keep the SuperLink's state (registered keys, runs, every message until its reply is
    pulled) in WORKDIR/superlink.db, as a real server must across restarts. A single-host demo keeps
    it in memory instead: SQLite's per-message commits cost ~1.5-2 s a round on 2 cores
    (docs/benchmarks.md), and the run's own history is in fedveil's store either way."""
    database = str(workdir / "superlink.db") if persist else FLWR_IN_MEMORY_STATE
    argv = [bin_path("flower-superlink"), "--host", host, "--port", str(port),
            "--database", database, "--disable-runtime-dependency-installation"]
    if tls is None:
        argv.append("--insecure")
    else:
        argv += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                 "--ssl-keyfile", str(tls.server_key)]
        if auth:
            argv.append("--enable-supernode-auth")
    return argv


# How a SuperNode runs its ClientApp tasks: "warm" (fedveil's executor: imports once, forks per
# task, capped waits; see platform/warm_executor.py) or "stock" (a new flwr-clientapp per message).
# FEDVEIL_EXECUTOR=stock selects Flower's own path, e.g. to compare the two (benchmarks/demo_rounds.py).
EXECUTOR_ENV = "FEDVEIL_EXECUTOR"
# The one place the warm SuperNode's waits are set (Flower's own: 3 s idle, 0.5 s reply, 1 s task).
NODE_IDLE_POLL_S = 0.2  # SuperNode: next fetch from the SuperLink when nothing was waiting
NODE_QUIET_POLL_S, NODE_QUIET_AFTER_S = 1.0, 30.0  # ...but this slow once no message came for 30 s
NODE_REPLY_POLL_S = 0.05  # SuperNode: next check for the ClientApp's reply (in-process state)
EXECUTOR_TASK_POLL_S = 1.0  # executor: idle AcquireTask poll; the SuperNode wakes it when a message arrives
_warned_stock: list[str] = []


def node_executor(requested: str | None = None) -> str:
    """"warm" or "stock" for this host; warns once (never slow silently) when warm cannot run."""
    choice = (requested or os.environ.get(EXECUTOR_ENV) or "warm").strip().lower()
    if choice not in ("warm", "stock"):
        raise FedveilError(f"{EXECUTOR_ENV}={choice!r} is not an executor", f"set {EXECUTOR_ENV} to warm or stock")
    if choice == "stock":
        return choice
    from fedveil.platform import warm_executor

    reason = warm_executor.incompatibility()
    if reason is None:
        return "warm"
    if not _warned_stock:
        _warned_stock.append(reason)
        print(f"warning: fedveil's warm node executor is off ({reason}); SuperNodes use Flower's stock executor, "
              "which starts a process per message (rounds take ~10x longer)", file=sys.stderr, flush=True)
    return "stock"


def supernode_argv(superlink: str, port: int, node_config: Mapping[str, Any], *, ca_cert: Path | None = None,
                   auth_key: Path | None = None, executor: str | None = None) -> list[str]:
    args = ["--superlink", superlink, "--port", str(port), "--host", "127.0.0.1",
            "--node-config", node_config_arg(node_config), "--max-wait-time", "300"]
    args += ["--insecure"] if ca_cert is None else ["--root-certificates", str(ca_cert)]
    if auth_key is not None:
        args += ["--auth-supernode-private-key", str(auth_key)]
    if node_executor(executor) == "stock":
        return [bin_path("flower-supernode"), *args]
    return [sys.executable, "-m", "fedveil.platform.warm_executor", "supernode",
            "--idle-poll", str(NODE_IDLE_POLL_S), "--reply-poll", str(NODE_REPLY_POLL_S),
            "--quiet-poll", str(NODE_QUIET_POLL_S), "--quiet-after", str(NODE_QUIET_AFTER_S),
            "--task-poll", str(EXECUTOR_TASK_POLL_S), "--", *args, "--isolation", "process"]


def write_connection(flwr_home: Path, name: str, address: str, ca_cert: Path | None = None) -> None:
    """Register a SuperLink connection in FLWR_HOME/config.toml, where `flwr run` looks it up."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    lines = [f'[superlink]\ndefault = "{name}"\n', f"[superlink.{name}]", f'address = "{address}"']
    lines += ['insecure = true'] if ca_cert is None else [f'root-certificates = "{ca_cert}"']
    path.write_text("\n".join(lines) + "\n")


# Flower's own `flwr supernode register`, run for every key in one interpreter: each CLI start costs
# ~0.6 s of CPU on this class of host, and the demo registers every node at once while they start.
_REGISTER_EACH = """
import sys
import click
from flwr.cli.app import app
connection = sys.argv[1]
for key in sys.argv[2:]:
    try:
        app(["supernode", "register", key, connection, "--format", "json"], prog_name="flwr", standalone_mode=False)
    except click.ClickException as exc:
        sys.exit(f"registering {key} failed: {exc.format_message()}")
    except SystemExit as exc:
        if exc.code:
            print(f"registering {key} failed", file=sys.stderr, flush=True)
            raise
"""


def register_supernodes(public_keys: list[Path], connection: str, env: Mapping[str, str]) -> None:
    """Register several keys with one process (nodes are refused until their key is in)."""
    if not public_keys:
        return
    out = subprocess.run([sys.executable, "-c", _REGISTER_EACH, connection, *map(str, public_keys)],
                         env=dict(env), capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        detail = (out.stdout + out.stderr).strip()[-800:]
        raise FedveilError(f"could not register the SuperNode keys {', '.join(map(str, public_keys))}: {detail}",
                           "check that the SuperLink runs with TLS and that the keys came from `fedveil keys init`")


def prepare_app(workdir: Path) -> Path:
    """Copy the thin Flower App template into the work dir (flwr run bundles a directory)."""
    target = workdir / "flower-app"
    target.mkdir(parents=True, exist_ok=True)
    template = Path(__file__).parent / "flower_app"  # fedveil.platform is a namespace package
    for name in ("pyproject.toml", "fedveil_app.py"):
        (target / name).write_text((template / name).read_text())
    return target


def submit_run(workdir: Path, connection: str, run_config: Mapping[str, Any], env: Mapping[str, str]) -> int:
    """`flwr run` the fedveil app on a SuperLink; returns Flower's run id."""
    app = prepare_app(workdir)
    overrides = workdir / "run-config.toml"
    overrides.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()))
    out = subprocess.run([bin_path("flwr"), "run", str(app), connection, "--run-config", str(overrides),
                          "--format", "json"], env=dict(env), capture_output=True, text=True, timeout=180)
    try:
        data = json.loads(out.stdout)
    except json.JSONDecodeError:
        data = {}
    if out.returncode != 0 or not data.get("success", False):
        detail = (data.get("error-message") or out.stderr or out.stdout).strip()[-1500:]
        raise FedveilError(f"`flwr run` failed: {detail}", "check that the SuperLink is running and reachable")
    return int(data.get("run-id", 0))


def run_status(run_id: int, connection: str, env: Mapping[str, str], app_dir: Path) -> str:
    """Flower's status for a run (e.g. 'running', 'finished:completed', 'finished:failed')."""
    out = subprocess.run([bin_path("flwr"), "ls", str(app_dir), connection, "--run-id", str(run_id), "--format", "json"],
                         env=dict(env), capture_output=True, text=True, timeout=60)
    try:
        runs = json.loads(out.stdout).get("runs", [])
    except json.JSONDecodeError:
        return "unknown"
    return str(runs[0].get("status", "unknown")) if runs else "unknown"


# ---- start-up checks: say what is wrong before Flower does it with a traceback --------------------
def accepts_connections(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something listens on host:port (a TCP connect, closed at once)."""
    connect_host = "127.0.0.1" if host in ("", "0.0.0.0") else host  # noqa: S104 - a probe address only
    with socket.socket(socket.AF_INET6 if ":" in connect_host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        return s.connect_ex((connect_host, port)) == 0


def port_in_use(host: str, port: int) -> bool:
    """Whether another program holds `port` on `host` (we try to bind it, as the server would)."""
    bind_host = "0.0.0.0" if host in ("", "0.0.0.0") else host  # noqa: S104 - only a probe, closed at once
    with socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT from our own last run is fine
        try:
            s.bind((bind_host, port))
        except OSError:
            return True
    return False


def check_port_free(host: str, port: int, what: str, fix: str) -> None:
    """Fail before starting anything when `port` is taken, instead of a Flower traceback later."""
    if port_in_use(host, port):
        raise FedveilError(f"{what}: port {port} on {host or '0.0.0.0'} is already in use by another program", fix)


def require_files(files: Mapping[str, Path], where: Path, fix: str) -> None:
    """Fail with the missing key/cert file names, before Flower reports only the first one vaguely."""
    if not where.is_dir():
        raise FedveilError(f"the key directory {where} does not exist", fix)
    missing = [f"{label} ({path.name})" for label, path in files.items() if not path.is_file()]
    if missing:
        raise FedveilError(f"{where} lacks {', '.join(missing)}", fix)


def probe(host: str, port: int, timeout: float = 3.0) -> str:
    """'' when host:port accepts a TCP connection, else why not (refused, timed out, unknown host)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return ""
    except socket.gaierror as exc:
        return f"cannot resolve {host!r} ({exc.strerror})"
    except socket.timeout:
        return f"no answer within {timeout:.0f}s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def backoff(attempt: int, first: float = 1.0, most: float = 15.0) -> float:
    """Seconds to wait before retry `attempt` (0, 1, ...): doubling, capped, so a late server is found fast."""
    return min(most, first * (2 ** attempt))


def wait_reachable(host: str, port: int, timeout: float, *, what: str, fix: str,
                   say: Callable[[str], None] | None = None) -> None:
    """Retry with backoff until host:port accepts connections; fail after `timeout` s naming the cause."""
    deadline = time.monotonic() + timeout
    attempt = 0
    while True:
        reason = probe(host, port, timeout=min(3.0, max(0.5, deadline - time.monotonic())))
        if not reason:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise FedveilError(f"{what} at {host}:{port} is unreachable after {timeout:.0f}s: {reason}", fix)
        delay = min(backoff(attempt), left)
        if say is not None and (attempt in (0, 3) or attempt % 10 == 9):
            say(f"{what} at {host}:{port} is not reachable yet ({reason}); retrying for "
                           f"{left:.0f}s more")
        time.sleep(delay)
        attempt += 1


# What flower-supernode prints when it gives up on the SuperLink (Exit Code 305), sorted by cause.
NODE_FAILURE_CAUSES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("tls", ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "SSL", "does not point to a file")),
    ("unreachable", ("Connection refused", "ConnectError", "connection attempts failed", "timed out",
                     "ConnectTimeout", "Name or service not known", "Service Unavailable", "Bad Gateway")),
    ("not-admitted", ("[code:", "Precondition Failed", "Unauthorized", "Forbidden",
                      "Failed to initialize the connection", "Exit Code: 305")),
)


def classify_node_failure(output: str) -> str:
    """Why a SuperNode stopped before it was admitted: 'tls', 'unreachable', 'not-admitted' or 'other'."""
    for cause, needles in NODE_FAILURE_CAUSES:
        if any(n in output for n in needles):
            return cause
    return "other"
