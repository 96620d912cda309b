"""Every process a command starts is stopped, including detached grandchildren that ignore SIGTERM.

Flower's SuperLink starts its executor in a new session and the executor spawns the ServerApp,
which ignores SIGTERM: the fake tree below has the same shape, so these tests fail if stopping
only signals the started process's group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from contextlib import closing
from pathlib import Path

import pytest

from fedveil.platform import launcher, proctree

# A "SuperLink" that starts a detached "executor" (new session), which starts a "ServerApp";
# both helpers ignore SIGTERM. The pids are written to a file, then the parent waits forever.
TREE = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    out = sys.argv[1]
    if len(sys.argv) > 2:  # a helper: ignore SIGTERM, maybe spawn the next level, sleep
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if sys.argv[2] == "executor":
            subprocess.Popen([sys.executable, __file__, out, "serverapp"])
        with open(out, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(600)
    subprocess.Popen([sys.executable, __file__, out, "executor"], start_new_session=True)
    time.sleep(600)
""")


@pytest.fixture
def fake_tree(tmp_path):
    """The fake tree's script and pid file; whatever it started is SIGKILLed after the test, pass or fail."""
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    pids = tmp_path / "pids.txt"
    yield script, pids
    for pid in (pids.read_text().split() if pids.exists() else []):
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_pids(path: Path, count: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            pids = [int(x) for x in path.read_text().split()]
            if len(pids) >= count:
                return pids
        time.sleep(0.1)
    raise AssertionError(f"the fake tree did not start: {path.read_text() if path.exists() else 'no pids'}")


def _running(pid: int) -> bool:
    info = proctree.proc_table().get(pid)
    return info is not None and not info.zombie


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.2)
    return [p for p in pids if _running(p)]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_stop_all_kills_detached_helpers_that_ignore_sigterm(tmp_path, fake_tree):
    script, pids_file = fake_tree
    group = launcher.ProcessGroup(tmp_path, watchdog=False)
    root = group.start("superlink", [sys.executable, str(script), str(pids_file)])
    helpers = _wait_pids(pids_file, 2)
    assert all(os.getsid(p) != os.getsid(root.pid) for p in helpers[:1]), "the executor should be detached"
    started = time.monotonic()
    group.stop_all(grace=1.0)
    assert _wait_gone(helpers + [root.pid], 1) == []
    assert time.monotonic() - started < 15


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_orphans_of_a_crashed_root_are_still_stopped(tmp_path, fake_tree):
    """The 'SuperLink' dies first (kill -9): its detached helpers are re-parented, yet stopped."""
    script, pids_file = fake_tree
    group = launcher.ProcessGroup(tmp_path, watchdog=False)
    root = group.start("superlink", [sys.executable, str(script), str(pids_file)])
    helpers = _wait_pids(pids_file, 2)
    group.snapshot()
    os.kill(root.pid, signal.SIGKILL)
    root.wait(timeout=5)
    group.stop_all(grace=1.0)
    assert _wait_gone(helpers, 1) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_watchdog_stops_the_tree_when_the_command_is_killed(tmp_path, fake_tree):
    """kill -9 of the command itself (no cleanup code runs): the watchdog stops what it started."""
    script, pids_file = fake_tree
    command = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from fedveil.platform import launcher
        group = launcher.ProcessGroup(Path({str(tmp_path)!r}))
        proc = group.start("superlink", [sys.executable, {str(script)!r}, {str(pids_file)!r}])
        print(proc.pid, flush=True)
        time.sleep(600)
    """)
    cmd = subprocess.Popen([sys.executable, "-c", command], stdout=subprocess.PIPE, text=True)
    try:
        root = int(cmd.stdout.readline())
        helpers = _wait_pids(pids_file, 2)
        time.sleep(1.5)  # let the watchdog see the tree
        cmd.kill()
        cmd.wait(timeout=5)
        assert _wait_gone(helpers + [root], 15) == []
    finally:
        if cmd.poll() is None:
            cmd.kill()


# ---- start-up: every failure is an `error:` and a `fix:`, exit 2, and names the real cause ---------
REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "examples" / "federation.toml"


def test_a_superlink_alive_but_closed_to_nodes_counts_as_stopped(tmp_path):
    """SIGTERM puts a SuperLink with open streams into a graceful shutdown that may never end: the
    process lives on, its Fleet port is closed, the ServerApp would skip every remaining round. The
    follower must say so (error + fix) within seconds instead of reporting a 'completed' run."""
    from fedveil.platform.errors import FedveilError
    from fedveil.platform.federation import REFUSED_LIMIT, follow_run
    from fedveil.platform.store import MetricsStore

    url = f"sqlite:///{tmp_path / 'fedveil.db'}"
    store = MetricsStore(url)
    store.create_run("r", mode="sync", secure="none", name="fed")
    store.heartbeat("r")
    closed_port = launcher.free_port()  # nothing listens there
    hung = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])  # alive, like the hung SuperLink
    try:
        start = time.monotonic()
        with pytest.raises(FedveilError) as err:
            follow_run(url, "r", flower_run_id=1, connection="unused", env=dict(os.environ), workdir=tmp_path,
                       superlink=hung, fleet=("127.0.0.1", closed_port))
        assert time.monotonic() - start < REFUSED_LIMIT + 10
        assert "no longer accepts node connections" in err.value.problem and "--resume" in err.value.fix
        # while the port answers, the same follower keeps waiting (a listening socket is a live SuperLink)
        with __import__("socket").create_server(("127.0.0.1", 0)) as listening:
            with pytest.raises(FedveilError, match="did not finish within"):
                follow_run(url, "r", flower_run_id=1, connection="unused", env=dict(os.environ), workdir=tmp_path,
                           superlink=hung, fleet=listening.getsockname()[:2], timeout=REFUSED_LIMIT + 2)
    finally:
        hung.kill()
        hung.wait()
        store.close()


def test_the_follower_asks_flower_for_the_run_only_once_no_serverapp_process_is_left(tmp_path, monkeypatch):
    """`flwr ls` is a cold CLI start (~2 s of CPU): while a ServerApp runs in the SuperLink's tree the
    follower must not start it; once the ServerApp has gone with the run still open, it asks and fails."""
    from fedveil.platform import federation
    from fedveil.platform.errors import FedveilError
    from fedveil.platform.store import MetricsStore

    url = f"sqlite:///{tmp_path / 'fedveil.db'}"
    store = MetricsStore(url)
    store.create_run("r", mode="sync", secure="none", name="fed")
    store.heartbeat("r")
    program = tmp_path / federation.SERVERAPP_PROGRAM
    program.write_text("import time\ntime.sleep(3)\n")
    asked: list[float] = []

    def run_status(*args, **kwargs):
        asked.append(time.monotonic())
        return "finished:failed"

    monkeypatch.setattr(launcher, "run_status", run_status)
    started = time.monotonic()
    superlink = subprocess.Popen(["bash", "-c", f"{sys.executable} {program} & wait; sleep 60"])
    try:
        with pytest.raises(FedveilError, match="ServerApp ended"):
            federation.follow_run(url, "r", flower_run_id=1, connection="unused", env=dict(os.environ),
                                  workdir=tmp_path, superlink=superlink, timeout=30)
        assert len(asked) == 1 and asked[0] - started >= 3.0
    finally:
        superlink.kill()
        superlink.wait()
        store.close()


def fedveil(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return subprocess.run([sys.executable, "-m", "fedveil.platform.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def assert_clean_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert "error: " in done.stderr and "fix: " in done.stderr, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


@pytest.fixture
def held_port():
    """A port another program listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_server_refuses_a_port_in_use_before_claiming_to_listen(tmp_path, held_port):
    done = fedveil("server", "--config", str(CONFIG), "--workdir", str(tmp_path / "srv"),
                   "--superlink", f"127.0.0.1:{held_port}")
    assert_clean_error(done, f"port {held_port}", "already in use", "--superlink")
    assert "listening" not in done.stdout and "registered" not in done.stdout
    assert not (tmp_path / "srv" / "logs" / "superlink.log").exists(), "no SuperLink may be started"


def test_node_port_in_use_is_a_clean_error(tmp_path, held_port):
    done = fedveil("proxy", "--config", str(CONFIG), "--name", "proxy-1", "--workdir", str(tmp_path / "p"),
                   "--port", str(held_port), "--superlink", "127.0.0.1:9")
    assert_clean_error(done, f"--port {held_port}", "already in use")


def test_missing_or_partial_keys_dir_names_the_missing_files(tmp_path):
    done = fedveil("proxy", "--config", str(CONFIG), "--name", "proxy-1", "--keys", str(tmp_path / "nope"))
    assert_clean_error(done, "does not exist", "fedveil keys init")
    partial = tmp_path / "bundle"
    partial.mkdir()
    (partial / "ca.pem").write_text("x")
    done = fedveil("client", "--config", str(CONFIG), "--org", "hospital-a", "--data", "breast_cancer",
                   "--keys", str(partial))
    assert_clean_error(done, "supernode.key")
    assert "ca.pem" not in done.stderr.splitlines()[0], "only missing files are named"
    done = fedveil("server", "--config", str(CONFIG), "--keys", str(tmp_path / "nope"), "--workdir", str(tmp_path / "s"),
                   "--superlink", "127.0.0.1:9")
    assert_clean_error(done, "does not exist")


def test_unreachable_superlink_is_retried_then_named_as_the_cause(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    started = time.monotonic()
    done = fedveil("proxy", "--config", str(CONFIG), "--name", "proxy-1", "--workdir", str(tmp_path / "p"),
                   "--superlink", f"127.0.0.1:{closed}", "--connect-timeout", "4")
    took = time.monotonic() - started
    assert_clean_error(done, "unreachable", f"127.0.0.1:{closed}", "--connect-timeout")
    assert "not registered" not in done.stderr, "an unreachable SuperLink is not a key problem"
    assert "retrying" in done.stdout
    assert 4 <= took < 40, took


def test_node_failure_causes_are_told_apart():
    classify = launcher.classify_node_failure
    assert classify("ERROR: Failed to initialize the connection to the SuperLink.\n"
                    "All connection attempts failed\nExit Code: 305") == "unreachable"
    assert classify("Failed to initialize the connection to the SuperLink.\n[code: 7] Node not found\n"
                    "Exit Code: 305") == "not-admitted"
    assert classify("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed\nExit Code: 305") == "tls"
    assert classify("Traceback ... ZeroDivisionError") == "other"


def test_backoff_doubles_and_is_capped():
    assert [launcher.backoff(i) for i in range(6)] == [1, 2, 4, 8, 15, 15]


def test_missing_label_fix_names_a_setting_that_exists(tmp_path):
    """The fix text once named `--label-column`, which `fedveil client` rejects; it must name a real key."""
    csv = tmp_path / "site.csv"
    csv.write_text("age,diag\n" + "".join(f"{i},{i % 2}\n" for i in range(40)))
    done = fedveil("client", "--config", str(CONFIG), "--org", "hospital-a", "--data", str(csv),
                   "--superlink", "127.0.0.1:9")
    assert_clean_error(done, "'label'", "label_column", "[data]")
    assert "--label-column" not in done.stderr
    fixed = tmp_path / "fed.toml"
    import re

    text = re.sub(r"(?m)^label_column\s*=.*$", "", CONFIG.read_text())
    fixed.write_text(text.replace("[data]\n", "[data]\nlabel_column = \"diag\"\n", 1))
    from fedveil.platform import config as config_mod

    assert config_mod.load(fixed).data.label_column == "diag"


# ---- end to end: a real `fedveil demo` / `fedveil server`, stopped by a signal mid-run --------------
def _flower_processes(flwr_home: Path) -> dict[int, str]:
    """Processes that carry this work dir's FLWR_HOME: everything the command started, however
    detached (found independently of fedveil's own process tracking, so this test can fail)."""
    needle = f"FLWR_HOME={flwr_home}".encode()
    found = {}
    for pid in proctree.proc_table():
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
        except OSError:
            continue
    return found


def _rounds_recorded(db: Path) -> int:
    import sqlite3

    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
            return int(con.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
    except sqlite3.Error:  # not created yet
        return 0


def _signal_mid_run(argv: list[str], workdir: Path, sig: int) -> None:
    flwr_home = (workdir / "flwr-home").resolve()
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    cmd = subprocess.Popen([sys.executable, "-m", "fedveil.platform.cli", *argv], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any("flwr-serverapp" in c for c in _flower_processes(flwr_home).values()):
            assert cmd.poll() is None, cmd.stdout.read()
            time.sleep(1)
        running = _flower_processes(flwr_home)
        assert any("flwr-serverapp" in c for c in running.values()), running
        # mid-run: once a round is recorded the ServerApp is inside the run (in the handshake it still exits
        # by itself)
        while time.monotonic() < deadline and _rounds_recorded(workdir / "fedveil.db") < 1:
            assert cmd.poll() is None, cmd.stdout.read()
            time.sleep(0.5)
        assert _rounds_recorded(workdir / "fedveil.db") >= 1
        sent = time.monotonic()
        cmd.send_signal(sig)
        cmd.wait(timeout=30)
        left: dict[int, str] = {}
        while time.monotonic() - sent < 15:
            left = _flower_processes(flwr_home)
            if not left:
                break
            time.sleep(0.5)
        assert left == {}, f"left behind {time.monotonic() - sent:.0f}s after {signal.Signals(sig).name}: {left}"
        assert cmd.returncode == 130, cmd.stdout.read()
    finally:
        if cmd.poll() is None:
            cmd.kill()
        for pid in _flower_processes(flwr_home):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_stopped_by_a_signal_leaves_no_process(tmp_path, sig):
    workdir = tmp_path / "demo"
    _signal_mid_run(["demo", "--clients", "2", "--proxies", "2", "--rounds", "200", "--no-dashboard",
                     "--workdir", str(workdir)], workdir, sig)


def test_registering_a_missing_supernode_key_names_the_file_without_a_traceback(tmp_path):
    from fedveil.platform.errors import FedveilError

    with pytest.raises(FedveilError) as err:
        launcher.register_supernodes([tmp_path / "absent.pub"], "unused", dict(os.environ))
    assert "absent.pub" in err.value.problem and "does not exist" in err.value.problem
    assert "Traceback" not in err.value.problem and "keys init" in err.value.fix
