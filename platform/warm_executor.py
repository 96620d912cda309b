"""A warm node executor and capped SuperNode waits: fedveil's only coupling to Flower's internals.

Why: stock Flower starts a new `flwr-clientapp` process for every message (about 3 s of flwr,
torch and fedveil imports on a small machine), the SuperNode sleeps 3 s whenever no message is
waiting (right after each reply too) and checks for the ClientApp's reply every 0.5 s. Together
that is ~18 s of a ~2 s round. This module removes both, without touching how a message is run:

- `supernode` entry point (`python -m fedveil.platform.warm_executor supernode [opts] -- ARGS`):
  caps the SuperNode's sleeps, runs Flower's own `flower-supernode` main with ARGS (which include
  `--isolation process`), and supervises one warm executor, restarting it if it dies.
- `executor` entry point: Flower's own SuperExec loop (`run_superexec`) with one executor swapped
  in. The process imports flwr, torch and fedveil once; each ClientApp task runs in a forked child
  that calls Flower's `run_clientapp`: pull Message/Context over the Runtime API, load and run the
  app, push the reply. Message and Context therefore behave exactly as with `flwr-clientapp`, and
  a handler that raises still becomes Flower's error reply. The parent never runs torch ops, so
  forking is safe. A child outliving its message's TTL is killed; SIGTERM stops every child.

Everything here depends on flwr 1.41.x internals. `incompatibility()` says why the installed flwr
does not fit; the launcher then falls back to the stock executor with one warning line, and
tests/test_warm_executor.py fails when any internal this module uses changes.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import inspect
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

SUPPORTED_FLWR = "1.41."
MODULE = "fedveil.platform.warm_executor"

# (module, attribute, parameters the attribute must accept): everything we touch inside flwr.
FLWR_INTERNALS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("flwr.supernode.cli.flower_supernode", "flower_supernode", ()),
    ("flwr.supernode.start_client_internal", "start_client_internal", ("isolation", "runtime_api_address")),
    ("flwr.supernode.start_client_internal", "time", ()),
    ("flwr.supernode.start_client_internal", "_pull_and_store_message", ("state", "receive")),
    ("flwr.supercore.superexec.run_superexec", "time", ()),
    ("flwr.supercore.superexec.run_superexec", "run_superexec",
     ("runtime_api_address", "insecure", "root_certificates_path", "parent_pid", "runtime_dependency_install")),
    ("flwr.supercore.superexec.run_superexec", "get_executor", ("executor_type",)),
    ("flwr.supercore.superexec.run_superexec", "_TASK_POLL_INTERVAL_ENV", ()),
    ("flwr.supercore.superexec.executor", "SubprocessExecutor", ()),
    ("flwr.supercore.superexec.executor", "LaunchResult", ()),
    ("flwr.supercore.superexec.executor", "ExecutionSpec", ()),
    ("flwr.supercore.constant", "TaskType", ()),
    ("flwr.supernode.runtime.run_clientapp", "run_clientapp",
     ("runtime_api_address", "token", "insecure", "certificates", "parent_pid", "runtime_dependency_install")),
    ("flwr.supernode.runtime.run_clientapp", "pull_task_input", ("client",)),
    ("flwr.supernode.runtime.run_clientapp", "push_message", ("client", "message", "context")),
    ("flwr.supercore.exit", "add_exit_handler", ("exit_handler",)),
    ("flwr.supernode.start_client_internal", "pull_objects", ("initial_backoff", "backoff_cap")),
    ("flwr.supercore.inflatable.inflatable_utils", "pull_objects", ("initial_backoff", "backoff_cap")),
    ("flwr.supercore.exit.exit_handler", "registered_exit_handlers", ()),
    ("flwr.supercore.exit.exit_handler", "_lock_handlers", ()),
)

# Imported once in the executor so that forked tasks start warm. Role modules import lazily in
# the ClientApp; importing them here costs memory once instead of seconds per message. A client's
# list includes what its first train task would otherwise import per fork: torch._dynamo (the first
# optimizer, 0.8 s), the data loaders' sklearn and pandas (0.4 s); measured with a forked train task
# of the demo (1.42 s -> 0.25 s). A proxy never trains, so it skips torch (about 300 MB less per proxy).
PRELOAD_COMMON = ("flwr.clientapp", "flwr.supernode.runtime.run_clientapp", "fedveil.platform.nodeapp",
                  "fedveil.secure.modes", "tenseal")
PRELOAD_BY_ROLE = {
    "client": ("torch", "torch._dynamo", "opacus", "sklearn.datasets", "sklearn.model_selection", "pandas",
               "fedveil.clients.node", "fedveil.clients.training"),
    "proxy": ("fedveil.aggregator.proxy",),
}
PRELOAD = PRELOAD_COMMON + tuple(dict.fromkeys(m for mods in PRELOAD_BY_ROLE.values() for m in mods))


def preload_modules(role: str | None) -> tuple[str, ...]:
    """What a node of this role imports before it forks tasks (everything when the role is unknown)."""
    return PRELOAD_COMMON + PRELOAD_BY_ROLE[role] if role in PRELOAD_BY_ROLE else PRELOAD


def node_role(flower_args: Sequence[str]) -> str | None:
    """The `role` in a SuperNode's --node-config, parsed the way Flower parses it; None without one."""
    from flwr.common.config import parse_config_args

    try:
        role = parse_config_args([_option(flower_args, "--node-config", "")]).get("role")
    except Exception:  # noqa: BLE001 - Flower reports a bad --node-config itself; this only picks imports
        return None
    return str(role) if role is not None else None

# Until a child has pulled its message (and so knows the message's TTL), this bounds its life.
START_LIMIT_S = 120.0
WAKE_SIGNAL = signal.SIGUSR1  # SuperNode -> executor: a message is waiting
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGQUIT}
STOP_GRACE_S = 3.0  # between SIGTERM (error reply, then exit) and SIGKILL
OBJECT_PULL_RETRY_S = 0.05  # a task's retry when the SuperNode has not stored an object yet
TRACE = "fedveil-warm-task"  # prefix of the one line each task prints

log = logging.getLogger("fedveil.warm_executor")


def flwr_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flwr")
    except PackageNotFoundError:
        return ""


def incompatibility() -> str | None:
    """Why the installed flwr cannot run the warm executor, or None when it can."""
    installed = flwr_version()
    if not installed.startswith(SUPPORTED_FLWR):
        return f"flwr {installed or 'is not installed'} is not {SUPPORTED_FLWR}x"
    for module_name, attr, params in FLWR_INTERNALS:
        try:
            obj = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            return f"flwr {installed} lacks {module_name}.{attr} ({exc})"
        if params:
            accepted = inspect.signature(obj).parameters
            missing = [p for p in params if p not in accepted]
            if missing:
                return f"flwr {installed}: {module_name}.{attr} no longer takes {', '.join(missing)}"
    return None


# ---- capped SuperNode waits --------------------------------------------------------------------
class CappedTime:
    """Stands in for `time` inside Flower's SuperNode loop: same module, shorter sleeps.

    Flower sleeps 3 s when no message is waiting and 0.5 s between checks for the ClientApp's
    reply; nothing else in that module sleeps. Sleeps of a second or more become `idle`, shorter
    ones at most `reply`. Once no message has come for `quiet_after` seconds (no run is going on),
    the idle poll slows to `quiet`: every poll is a signed TLS request that the SuperLink serves
    too, so a fast poll from many idle nodes would cost the server more than a core.
    """

    def __init__(self, idle: float, reply: float, quiet: float | None = None, quiet_after: float = 30.0) -> None:
        self.idle, self.reply = idle, reply
        self.quiet, self.quiet_after = (idle if quiet is None else quiet), quiet_after
        self.last_message = time.monotonic()

    def mark(self) -> None:
        """A message arrived: poll fast again."""
        self.last_message = time.monotonic()

    def sleep(self, seconds: float) -> None:
        if seconds < 1.0:
            time.sleep(min(seconds, self.reply))
        elif time.monotonic() - self.last_message < self.quiet_after:
            time.sleep(self.idle)
        else:
            time.sleep(self.quiet)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def fast_object_pulls(pull_objects: Callable[..., Any], backoff: float) -> Callable[..., Any]:
    """Flower's `pull_objects` with retries every `backoff` seconds instead of 1, 2, 4... s.

    A message's objects can be requested before they are stored: the SuperNode creates the task
    before it has pulled the message's objects from the SuperLink, and the SuperLink hands out a
    message before its sender has pushed every object. A stock ClientApp needs seconds to start,
    which hides this; a warm one asks at once and would back off for 1 + 2 s.
    """

    def pull(*args: Any, **kwargs: Any) -> Any:
        kwargs["initial_backoff"] = backoff
        kwargs["backoff_cap"] = backoff
        return pull_objects(*args, **kwargs)

    pull.__wrapped__ = pull_objects  # type: ignore[attr-defined]
    return pull


def on_message(*callbacks: Callable[[], None]) -> None:
    """Call `callbacks` whenever Flower's SuperNode loop has stored a message (so a task is waiting)."""
    from flwr.supernode import start_client_internal as sci

    pull_and_store = sci._pull_and_store_message

    def pull_store_and_wake(*args: Any, **kwargs: Any) -> Any:
        run_id = pull_and_store(*args, **kwargs)
        if run_id is not None:
            for callback in callbacks:
                callback()
        return run_id

    sci._pull_and_store_message = pull_store_and_wake  # type: ignore[assignment]


class WakeableTime:
    """Stands in for `time` inside Flower's SuperExec loop: its poll sleep ends early on WAKE_SIGNAL.

    The SuperNode wakes the executor when it stores a message, so a task starts at once while the
    idle poll stays slow and cheap. WAKE_SIGNAL is blocked in this process, so `sigtimedwait` takes
    it (a wake sent while not sleeping stays pending and ends the next sleep at once).
    """

    def sleep(self, seconds: float) -> None:
        signal.sigtimedwait({WAKE_SIGNAL}, seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def cap_supernode_waits(waits: CappedTime) -> CappedTime:
    from flwr.supernode import start_client_internal as sci

    sci.time = waits  # type: ignore[assignment]
    sci.pull_objects = fast_object_pulls(sci.pull_objects, waits.reply)
    return waits


# ---- the executor ------------------------------------------------------------------------------
@dataclass
class Child:
    pid: int
    pipe: int  # read end: the child writes its message's deadline (unix time) once it knows it
    task_id: int
    deadline: float  # time.time() after which the child is stopped
    stopping_since: float = 0.0


class ForkExecutor:
    """Flower `Executor` that forks this warm process for each ClientApp task.

    Other task types (none on a SuperNode today) go to Flower's stock subprocess executor.
    """

    def __init__(self) -> None:
        from flwr.supercore.superexec.executor import SubprocessExecutor

        self.children: dict[int, Child] = {}
        self.stock = SubprocessExecutor()

    def get_eligible_capacity(self, supported_task_types: set, *, insecure: bool = False,
                              root_certificates_path: str | None = None) -> tuple[set, set[str]]:
        return supported_task_types, set()

    def wait_for_capacity(self, task_type: Any = None, *, fab_hash: str | None = None, insecure: bool = False,
                          root_certificates_path: str | None = None) -> None:
        return None

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return self.stock.launch(spec)
        read_end, write_end = os.pipe()
        # Objects that exist now never need the child's garbage collector: without this, the
        # child's first full collection touches every object and copies most of the parent's
        # pages (0.6-0.8 s measured with torch, opacus and tenseal loaded).
        gc.freeze()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            os.close(read_end)
            _serve_task(spec, write_end)
        os.close(write_end)
        os.set_blocking(read_end, False)
        self.children[pid] = Child(pid, read_end, spec.task_id, time.time() + START_LIMIT_S)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Called by Flower's SuperExec loop between polls: reap children, enforce deadlines."""
        now = time.time()
        for child in list(self.children.values()):
            self._read_deadline(child)
            try:
                done, status = os.waitpid(child.pid, os.WNOHANG)
            except ChildProcessError:
                done, status = child.pid, 0
            if done:
                self._forget(child)
                if os.WIFSIGNALED(status):  # a raising handler already got Flower's error reply
                    log.warning("task %s: ClientApp process %s was killed by signal %s", child.task_id,
                                child.pid, os.WTERMSIG(status))
            elif now > child.deadline and not child.stopping_since:
                log.warning("task %s: ClientApp process %s outlived its message's TTL; stopping it",
                            child.task_id, child.pid)
                child.stopping_since = now
                _kill(child.pid, signal.SIGTERM)  # it sends an error reply, then exits
            elif child.stopping_since and now > child.stopping_since + STOP_GRACE_S:
                _kill(child.pid, signal.SIGKILL)

    def close(self, grace: float = STOP_GRACE_S) -> None:
        """Stop every child: SIGTERM, then SIGKILL after `grace` seconds."""
        for child in self.children.values():
            _kill(child.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.children and time.monotonic() < deadline:
            for child in list(self.children.values()):
                try:
                    if os.waitpid(child.pid, os.WNOHANG)[0]:
                        self._forget(child)
                except ChildProcessError:
                    self._forget(child)
            time.sleep(0.05)
        for child in list(self.children.values()):
            _kill(child.pid, signal.SIGKILL)
            try:
                os.waitpid(child.pid, 0)
            except ChildProcessError:
                pass
            self._forget(child)
        self.stock.close()

    def _read_deadline(self, child: Child) -> None:
        try:
            data = os.read(child.pipe, 64)
        except (BlockingIOError, OSError):
            return
        try:
            child.deadline = float(data.decode().split()[-1])
        except (ValueError, IndexError):
            pass

    def _forget(self, child: Child) -> None:
        self.children.pop(child.pid, None)
        try:
            os.close(child.pipe)
        except OSError:
            pass


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class _TaskHooks:
    """What the fork adds around Flower's `run_clientapp`, through the two functions it calls.

    - after the input is pulled: report the message's deadline (created_at + ttl) to the parent,
      and arm a kernel backstop in case the parent is gone;
    - when the task is stopped (SIGTERM from the parent, Ctrl-C) before it replied: push an error
      reply first, so the SuperNode, which waits for a reply to every message, moves on at once
      instead of after Flower's 60 s heartbeat expiry.
    """

    def __init__(self, rc: Any, deadline_pipe: int) -> None:
        self.rc, self.pipe = rc, deadline_pipe
        self.pull_task_input, self.push_message = rc.pull_task_input, rc.push_message
        self.pulled: tuple[Any, Any, Any] | None = None  # (client, message, context)
        self.replied = False
        self.pulled_at = 0.0

    def install(self) -> None:
        from flwr.supercore.inflatable import inflatable_utils

        self.rc.pull_task_input = self.pull
        self.rc.push_message = self.push
        inflatable_utils.pull_objects = fast_object_pulls(inflatable_utils.pull_objects, OBJECT_PULL_RETRY_S)

    def pull(self, client: Any) -> Any:
        from flwr.supercore.exit import add_exit_handler

        pulled = self.pull_task_input(client)
        self.pulled_at = time.time()
        message, context = pulled[0], pulled[1]
        self.pulled = (client, message, context)
        deadline = float(message.metadata.created_at) + float(message.metadata.ttl)
        os.write(self.pipe, f"{deadline}\n".encode())
        signal.alarm(max(1, int(deadline - time.time()) + 5))  # SIG_DFL: the kernel ends us
        add_exit_handler(self.reply_if_stopped)  # runs before run_clientapp's own (LIFO)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a pending stop is handled now
        return pulled

    def push(self, client: Any, message: Any, context: Any) -> None:
        self.replied = True
        self.push_message(client, message, context)

    def reply_if_stopped(self) -> None:
        if self.replied or self.pulled is None:
            return
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode

        client, message, context = self.pulled
        reason = "the node's executor stopped this task before it finished (SIGTERM or TTL)"
        try:
            self.push(client, Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                                      reply_to=message), context)
        except Exception as exc:  # noqa: BLE001 - best effort while stopping
            print(f"fedveil warm executor: could not send the error reply: {exc}", file=sys.stderr, flush=True)


def _serve_task(spec: Any, deadline_pipe: int) -> None:
    """In the forked child: run one task through Flower's own ClientApp path, then exit."""
    code = 1
    forked_at = time.time()
    hooks: _TaskHooks | None = None
    try:
        import flwr.supernode.runtime.run_clientapp as rc
        from flwr.supercore.exit import exit_handler

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGALRM):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(WAKE_SIGNAL, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {WAKE_SIGNAL})
        # A stop before the message is pulled would leave nothing to reply to, and the SuperNode
        # waiting for a reply forever: hold it until the pull is done (the parent SIGKILLs after
        # STOP_GRACE_S if the pull itself hangs).
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        # The parent's exit handlers (close its client, stop its children) are not ours to run.
        exit_handler.registered_exit_handlers.clear()
        exit_handler._lock_handlers = threading.Lock()  # type: ignore[attr-defined]
        hooks = _TaskHooks(rc, deadline_pipe)
        hooks.install()
        certificates = None
        if not spec.insecure and spec.root_certificates_path:
            certificates = Path(spec.root_certificates_path).read_bytes()
        rc.run_clientapp(spec.runtime_api_address, spec.token, spec.insecure, certificates, parent_pid=None,
                         runtime_dependency_install=spec.runtime_dependency_install)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must always end with os._exit
        import traceback

        traceback.print_exc()
    finally:
        # One line per task, parsed by benchmarks/demo_rounds.py: fork-to-input and input-to-reply.
        pulled_at = hooks.pulled_at if hooks else 0.0
        print(f"{TRACE} task={spec.task_id} pid={os.getpid()} executor={os.getppid()} forked={forked_at:.3f} "
              f"pulled={pulled_at:.3f} done={time.time():.3f} code={code}", flush=True)
        sys.stderr.flush()
        os._exit(code)


def preload(modules: Sequence[str] = PRELOAD) -> list[str]:
    """Import what every task needs, once; returns the modules that could not be imported."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a missing optional module only costs speed
            failed.append(f"{name} ({type(exc).__name__})")
    return failed


def _exit_when_orphaned(parent_pid: int, every: float = 0.2) -> None:
    """Stop (SIGINT, as Flower's own monitor does) once the SuperNode that started us has died.

    Flower's check, `kill(parent_pid, 0)`, takes a dead parent that nobody has reaped yet (a zombie)
    for a live one, so an executor outlived a `kill -9`ed SuperNode for as long as its parent's
    parent did not reap it (the whole run, in `fedveil demo`). The kernel re-parents us the moment
    the parent exits, so a changed `getppid()` is its death, zombie or not."""
    def monitor() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every)
        while True:  # again until we are gone: a signal raised before Flower's handlers exist may be lost
            signal.raise_signal(signal.SIGINT)
            time.sleep(1.0)

    threading.Thread(target=monitor, name="fedveil-parent-watch", daemon=True).start()


def run_executor(runtime_api_address: str, parent_pid: int | None, task_poll: float, role: str | None = None) -> None:
    """Flower's SuperExec loop with the fork executor; returns only through Flower's exit path."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {WAKE_SIGNAL})  # before any thread starts: all inherit it
    # A node started in the background by a script (`fedveil client ... &`) inherits SIGINT ignored, and
    # Python then never installs its handler: this executor could not be stopped the way Flower stops it.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(task_poll)
    failed = preload(preload_modules(role))
    gc.collect()
    gc.freeze()
    if failed:
        print(f"fedveil warm executor: could not preload {', '.join(failed)}; those load per task", flush=True)
    import flwr.supercore.superexec.run_superexec as rs

    executor = ForkExecutor()
    rs.get_executor = lambda *args, **kwargs: executor  # type: ignore[assignment]
    rs.time = WakeableTime()  # type: ignore[assignment]
    print(f"fedveil warm executor {os.getpid()} serving {runtime_api_address}", flush=True)
    if parent_pid is not None:
        _exit_when_orphaned(parent_pid)
    rs.run_superexec(runtime_api_address=runtime_api_address, insecure=True, root_certificates_path=None,
                     parent_pid=parent_pid, runtime_dependency_install=False)


# ---- the SuperNode with a supervised warm executor --------------------------------------------
def _option(args: Sequence[str], name: str, default: str) -> str:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return default


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class ExecutorSupervisor:
    """Starts the warm executor once the SuperNode's Runtime API is up, and restarts it if it dies."""

    def __init__(self, runtime_api_address: str, task_poll: float, role: str | None = None) -> None:
        self.address = runtime_api_address
        self.task_poll = task_poll
        self.role = role
        self.proc: subprocess.Popen | None = None
        self.stopping = threading.Event()
        self.restarts = 0

    def argv(self) -> list[str]:
        return [sys.executable, "-m", MODULE, "executor", "--runtime-api-address", self.address,
                "--parent-pid", str(os.getpid()), "--task-poll", str(self.task_poll)] + \
            (["--role", self.role] if self.role else [])

    def run(self) -> None:
        # The executor inherits this thread's signal mask across exec: WAKE_SIGNAL stays blocked from its
        # first instruction, so an early wake-up is held until it waits, never fatal (default action).
        signal.pthread_sigmask(signal.SIG_BLOCK, {WAKE_SIGNAL})
        host, _, port = self.address.rpartition(":")
        while not self.stopping.is_set() and not _port_open(host, int(port)):
            self.stopping.wait(0.1)
        while not self.stopping.is_set():
            self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL)
            code = self.proc.wait()
            if self.stopping.is_set():
                break
            self.restarts += 1
            print(f"fedveil: the warm executor exited with code {code}; restarting it", flush=True)
            self.stopping.wait(0.5)

    def start(self) -> None:
        threading.Thread(target=self.run, name="fedveil-warm-executor", daemon=True).start()

    def wake(self) -> None:
        """A message was stored for this node: have the executor ask for the task now."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            _kill(proc.pid, WAKE_SIGNAL)

    def stop(self) -> None:
        self.stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_supernode(flower_args: list[str], waits: CappedTime, task_poll: float) -> None:
    """Flower's own `flower-supernode` main, with capped waits and a supervised warm executor."""
    from flwr.supercore.exit import add_exit_handler
    from flwr.supernode.cli.flower_supernode import flower_supernode

    if _option(flower_args, "--isolation", "subprocess") != "process":
        flower_args = [*flower_args, "--isolation", "process"]
    cap_supernode_waits(waits)
    host = _option(flower_args, "--host", "127.0.0.1")
    port = _option(flower_args, "--port", "9094")
    supervisor = ExecutorSupervisor(f"{host}:{port}", task_poll, node_role(flower_args))
    on_message(waits.mark, supervisor.wake)
    add_exit_handler(supervisor.stop)
    supervisor.start()
    sys.argv = ["flower-supernode", *flower_args]
    try:
        flower_supernode()
    finally:
        supervisor.stop()


def _without_isolation(args: list[str]) -> list[str]:
    """Flower's stock SuperNode starts its own executor only in its default (subprocess) isolation."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--isolation":
            skip = True
        elif not arg.startswith("--isolation="):
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser("supernode", help="run flower-supernode (ARGS after --) with a warm executor")
    node.add_argument("--idle-poll", type=float, default=0.2)
    node.add_argument("--quiet-poll", type=float, default=1.0)
    node.add_argument("--quiet-after", type=float, default=30.0)
    node.add_argument("--reply-poll", type=float, default=0.05)
    node.add_argument("--task-poll", type=float, default=1.0)
    node.add_argument("flower_args", nargs=argparse.REMAINDER)
    ex = sub.add_parser("executor", help="serve a SuperNode's ClientApp tasks from one warm process")
    ex.add_argument("--runtime-api-address", required=True)
    ex.add_argument("--parent-pid", type=int, default=None)
    ex.add_argument("--task-poll", type=float, default=1.0)
    ex.add_argument("--role", default=None, help="the node's role (client, proxy): which modules to preload")
    args = parser.parse_args(argv)
    if args.command == "executor":
        run_executor(args.runtime_api_address, args.parent_pid, args.task_poll, args.role)
        return
    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    reason = incompatibility()
    if reason is not None:  # the launcher checks first; this only guards a direct call
        print(f"warning: fedveil's warm executor is off ({reason}); using Flower's stock executor", flush=True)
        os.execv(sys.executable, [sys.executable, "-c", "from flwr.supernode.cli import flower_supernode; "
                                  "import sys; sys.argv[0] = 'flower-supernode'; flower_supernode()",
                                  *_without_isolation(flower_args)])
    run_supernode(flower_args, CappedTime(args.idle_poll, args.reply_poll, args.quiet_poll, args.quiet_after),
                  args.task_poll)


if __name__ == "__main__":
    main()
