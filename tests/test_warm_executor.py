"""The warm node executor (platform/warm_executor.py) and the launcher's choice of executor.

The guard tests fail when flwr's internals that the warm executor relies on change, so an upgrade
cannot silently break it or make it slow. The slow test runs a real SuperLink and one warm
SuperNode with a tiny probe app, so every claim is checked against Flower's own runtime.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fedveil.platform import launcher, warm_executor
from fedveil.platform.errors import FedveilError


# ---- the coupling guard ------------------------------------------------------------------------
def test_installed_flwr_has_every_internal_the_warm_executor_uses():
    assert warm_executor.incompatibility() is None


def test_the_waits_we_cap_are_still_the_ones_in_flwrs_supernode_loop():
    """CappedTime maps >= 1 s sleeps to the idle poll and shorter ones to the reply poll."""
    from flwr.supernode import start_client_internal as sci

    source = inspect.getsource(sci)
    sleeps = sorted(set(__import__("re").findall(r"time\.sleep\(([^)]*)\)", source)))
    assert sleeps == ["0.5", "3"], f"flwr's SuperNode sleeps changed: {sleeps}; revisit CappedTime"


def test_flwrs_superexec_loop_still_reconciles_and_takes_its_executor_from_get_executor():
    from flwr.supercore.superexec import run_superexec as rs
    from flwr.supernode.runtime import run_clientapp as rc

    loop = inspect.getsource(rs.run_superexec)
    assert "get_executor(" in loop and "executor.reconcile()" in loop and "launch_task(" in loop
    assert __import__("re").findall(r"time\.sleep\(([^)]*)\)", inspect.getsource(rs)) == ["task_poll_interval"]
    from flwr.supernode import start_client_internal as sci

    assert "run_id = _pull_and_store_message(" in inspect.getsource(sci.start_client_internal)
    body = inspect.getsource(rc.run_clientapp)
    assert "pull_task_input(client)" in body and "push_message(client, reply_message, context)" in body


def test_a_different_flwr_falls_back_to_the_stock_executor_with_one_warning(monkeypatch, capsys):
    monkeypatch.setattr(warm_executor, "flwr_version", lambda: "1.42.0")
    monkeypatch.setattr(launcher, "_warned_stock", [])
    monkeypatch.delenv(launcher.EXECUTOR_ENV, raising=False)
    first = launcher.supernode_argv("127.0.0.1:9092", 9094, {"role": "proxy"})
    second = launcher.supernode_argv("127.0.0.1:9092", 9095, {"role": "proxy"})
    assert Path(first[0]).name == "flower-supernode" and Path(second[0]).name == "flower-supernode"
    assert "--isolation" not in first
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1.42.0" in warnings[0] and "stock" in warnings[0]


def test_the_launcher_starts_supernodes_warm_with_process_isolation_and_its_own_poll_values(monkeypatch):
    monkeypatch.delenv(launcher.EXECUTOR_ENV, raising=False)
    argv = launcher.supernode_argv("10.0.0.1:9092", 9094, {"role": "client", "name": "a"})
    assert argv[1:4] == ["-m", "fedveil.platform.warm_executor", "supernode"]
    flower_args = argv[argv.index("--") + 1:]
    assert flower_args[flower_args.index("--isolation") + 1] == "process"
    assert flower_args[flower_args.index("--superlink") + 1] == "10.0.0.1:9092"
    assert float(argv[argv.index("--idle-poll") + 1]) == launcher.NODE_IDLE_POLL_S <= 0.2
    monkeypatch.setenv(launcher.EXECUTOR_ENV, "stock")
    assert Path(launcher.supernode_argv("10.0.0.1:9092", 9094, {"role": "client"})[0]).name == "flower-supernode"


def test_an_unknown_executor_choice_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(launcher.EXECUTOR_ENV, "turbo")
    with pytest.raises(FedveilError) as err:
        launcher.supernode_argv("127.0.0.1:9092", 9094, {"role": "client"})
    assert "turbo" in err.value.problem and "warm or stock" in err.value.fix


def test_capped_time_shortens_flowers_idle_and_reply_sleeps(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr(warm_executor.time, "sleep", slept.append)
    capped = warm_executor.CappedTime(idle=0.2, reply=0.05, quiet=1.0, quiet_after=30.0)
    capped.sleep(3)
    capped.sleep(0.5)
    capped.sleep(0.01)
    assert slept == [0.2, 0.05, 0.01]
    capped.last_message -= 31  # no message for 31 s: poll slowly...
    capped.sleep(3)
    capped.mark()  # ...until one comes
    capped.sleep(3)
    assert slept[3:] == [1.0, 0.2]
    assert capped.monotonic is warm_executor.time.monotonic  # everything else is the real module


def test_the_executors_poll_sleep_ends_at_once_when_the_supernode_wakes_it():
    wake = {warm_executor.WAKE_SIGNAL}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, wake)
    try:
        # To this thread, where it is blocked (another thread would take its default action: exit).
        signal.pthread_kill(threading.main_thread().ident, warm_executor.WAKE_SIGNAL)  # held, not lost
        start = time.monotonic()
        warm_executor.WakeableTime().sleep(5.0)
        assert time.monotonic() - start < 1.0
        start = time.monotonic()
        warm_executor.WakeableTime().sleep(0.3)  # no wake pending: the full poll interval
        assert time.monotonic() - start >= 0.29
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def test_fast_object_pulls_overrides_flowers_one_second_backoff():
    seen = {}

    def pull_objects(ids, fn, *, initial_backoff=1, backoff_cap=10, max_time=None):
        seen.update(initial_backoff=initial_backoff, backoff_cap=backoff_cap, ids=ids)
        return "ok"

    assert warm_executor.fast_object_pulls(pull_objects, 0.05)(["a"], None, max_time=5) == "ok"
    assert seen == {"initial_backoff": 0.05, "backoff_cap": 0.05, "ids": ["a"]}


# ---- what a node imports before it forks ------------------------------------------------------
FORKED_TRAIN_TASK = '''
import json, os, sys
from pathlib import Path
from fedveil.platform.warm_executor import preload, preload_modules
assert preload(preload_modules("client")) == []
import numpy as np
from fedveil.clients.node import ClientIdentity, train_task
from fedveil.platform import config as config_mod
cfg = config_mod.with_overrides(config_mod.FedveilConfig(), {
    "data.source": "breast_cancer", "training.epochs": 1, "privacy.noise_multiplier": 1.0})
ident = ClientIdentity.from_node_config({"name": "org-a", "workdir": sys.argv[1], "index": 0, "num-orgs": 2})
before = set(sys.modules)
read, write = os.pipe()
if os.fork() == 0:  # as the warm executor serves a task: a forked child of the preloaded process
    out = train_task(ident, cfg, [np.zeros((64, 30), np.float32), np.zeros(64, np.float32),
                                  np.zeros((2, 64), np.float32), np.zeros(2, np.float32)], "run", "task", {})
    os.write(write, json.dumps({"status": out.status, "new": sorted(set(sys.modules) - before)}).encode())
    os._exit(0)
os.close(write)
print(os.read(read, 1 << 20).decode())
'''


def test_a_client_preloads_what_its_forked_train_task_would_import(tmp_path: Path):
    """Every module a train task imports after the fork is imported again in every task (about 1.2 s
    of torch._dynamo, sklearn and pandas before this list covered them), so a forked task imports
    next to nothing."""
    out = subprocess.run([os.sys.executable, "-c", FORKED_TRAIN_TASK, str(tmp_path / "org")], capture_output=True,
                         text=True, timeout=240, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["status"] == "ok"
    heavy = [m for m in result["new"] if m.split(".")[0] in {"pandas", "scipy", "opacus", "flwr", "tenseal"}
             or m.startswith("torch._dynamo") or m.startswith("sklearn.model_selection")]
    assert not heavy and len(result["new"]) < 25, result["new"]


def test_a_proxy_preloads_no_torch_and_the_role_comes_from_the_node_config():
    assert warm_executor.node_role(["--superlink", "x", "--node-config", 'role="proxy" name="p-1"']) == "proxy"
    assert warm_executor.node_role(["--node-config=role='client' name='org-a' index=0"]) == "client"
    assert warm_executor.node_role(["--superlink", "x"]) is None
    proxy = warm_executor.preload_modules("proxy")
    assert not any(m.split(".")[0] in {"torch", "opacus", "sklearn", "pandas"} for m in proxy)
    assert "fedveil.aggregator.proxy" in proxy and "torch._dynamo" in warm_executor.preload_modules("client")
    assert set(warm_executor.preload_modules(None)) >= set(proxy) | set(warm_executor.preload_modules("client"))
    supervisor = warm_executor.ExecutorSupervisor("127.0.0.1:1", 1.0, "proxy")
    assert supervisor.argv()[-2:] == ["--role", "proxy"]


# ---- a real SuperLink and one warm SuperNode ----------------------------------------------------
PROBE_APP = '''
import json, os, time
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

client = ClientApp()
server = ServerApp()


@client.query("probe")
def probe(msg, context):
    todo = msg.content["do"]
    if todo["action"] == "crash":
        raise RuntimeError("probe crash")
    if todo["action"] == "sleep":
        time.sleep(float(todo["seconds"]))
    return Message(RecordDict({"me": ConfigRecord({"pid": os.getpid(), "ppid": os.getppid()})}), reply_to=msg)


@server.main()
def main(grid, context):
    out = Path(context.run_config["out"])
    while not (nodes := list(grid.get_node_ids())):
        time.sleep(0.1)
    for step in context.run_config["steps"].split(","):
        action, _, seconds = step.partition(":")
        msg = Message(RecordDict({"do": ConfigRecord({"action": action, "seconds": float(seconds or 0)})}),
                      dst_node_id=nodes[0], message_type="query.probe", ttl=120)
        ids = list(grid.push_messages([msg]))
        started, result = time.monotonic(), {"timeout": True}
        while time.monotonic() - started < 90 and result.get("timeout"):
            for reply in grid.pull_messages(ids):
                result = {"error": reply.error.reason} if reply.has_error() else dict(reply.content["me"])
            time.sleep(0.05)
        result["seconds"] = time.monotonic() - started
        with out.open("a") as f:
            f.write(json.dumps(result) + "\\n")
'''

PROBE_PYPROJECT = '''
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "probe-app"
version = "0.1.0"
license = "Apache-2.0"
dependencies = ["flwr>=1.41,<1.42"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedveil"

[tool.flwr.app.components]
serverapp = "probe_app:server"
clientapp = "probe_app:client"

[tool.flwr.app.config]
out = ""
steps = ""
'''


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return found


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _results(path: Path, count: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count:
            return [json.loads(line) for line in lines]
        time.sleep(0.2)
    raise AssertionError(f"only {path.read_text() if path.exists() else 'no'} results after {timeout}s")


@pytest.mark.slow
def test_warm_node_serves_tasks_from_one_executor_survives_a_crash_and_a_sigterm(tmp_path: Path, monkeypatch):
    monkeypatch.delenv(launcher.EXECUTOR_ENV, raising=False)
    app = tmp_path / "probe"
    app.mkdir()
    (app / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (app / "probe_app.py").write_text(PROBE_APP)
    out = tmp_path / "results.jsonl"
    env = launcher.flower_env(tmp_path)
    port = launcher.free_port()
    with launcher.ProcessGroup(tmp_path) as procs:
        link = procs.start("superlink", launcher.superlink_argv("127.0.0.1", port, tmp_path), env)
        launcher.wait_for_port("127.0.0.1", port, 60, link, "flower-superlink")
        launcher.write_connection(Path(env["FLWR_HOME"]), "probe", f"127.0.0.1:{port}")
        node = procs.start("node", launcher.supernode_argv(f"127.0.0.1:{port}", launcher.free_port(),
                                                           {"role": "client"}), env)
        steps = "echo,crash,echo,sleep:60,echo"
        submitted = subprocess.run([launcher.bin_path("flwr"), "run", str(app), "probe", "--run-config",
                                    f"out='{out}' steps='{steps}'"], env=env, capture_output=True, text=True,
                                   timeout=120)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr

        echo, crash, echo_again = _results(out, 3, 180)
        executor = echo["ppid"]
        assert "fedveil.platform.warm_executor executor" in _cmdline(executor)  # no flwr-clientapp
        for _ in range(3):  # wake-ups at any moment only end a poll early; they never kill the executor
            os.kill(executor, warm_executor.WAKE_SIGNAL)
            time.sleep(0.1)
        assert _running(executor)
        assert echo_again["ppid"] == executor and echo_again["pid"] != echo["pid"]  # one warm parent, a fork per task
        assert "probe crash" in crash["error"]  # Flower's own error reply for a raising handler

        deadline = time.monotonic() + 60
        while not (task := _children(executor)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert task, "the sleeping task never started"
        os.kill(executor, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (_running(executor) or _running(task[0])) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(executor) and not _running(task[0]), "SIGTERM left the executor or its task running"

        stopped, after_restart = _results(out, 5, 120)[3:]
        assert "stopped this task" in stopped["error"] and stopped["seconds"] < 30  # no 60 s heartbeat wait
        assert after_restart.get("ppid") not in (None, executor)  # served by the restarted executor
        assert node.poll() is None
