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


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    script = tmp_path / "tree.py"
    script.write_text(TREE)
    return script, tmp_path / "pids.txt"


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
def test_stop_all_kills_detached_helpers_that_ignore_sigterm(tmp_path):
    script, pids_file = _tree(tmp_path)
    group = launcher.ProcessGroup(tmp_path, watchdog=False)
    root = group.start("superlink", [sys.executable, str(script), str(pids_file)])
    helpers = _wait_pids(pids_file, 2)
    assert all(os.getsid(p) != os.getsid(root.pid) for p in helpers[:1]), "the executor should be detached"
    started = time.monotonic()
    group.stop_all(grace=1.0)
    assert _wait_gone(helpers + [root.pid], 1) == []
    assert time.monotonic() - started < 15


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_orphans_of_a_crashed_root_are_still_stopped(tmp_path):
    """The 'SuperLink' dies first (kill -9): its detached helpers are re-parented, yet stopped."""
    script, pids_file = _tree(tmp_path)
    group = launcher.ProcessGroup(tmp_path, watchdog=False)
    root = group.start("superlink", [sys.executable, str(script), str(pids_file)])
    helpers = _wait_pids(pids_file, 2)
    group.snapshot()
    os.kill(root.pid, signal.SIGKILL)
    root.wait(timeout=5)
    group.stop_all(grace=1.0)
    assert _wait_gone(helpers, 1) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_watchdog_stops_the_tree_when_the_command_is_killed(tmp_path):
    """kill -9 of the command itself (no cleanup code runs): the watchdog stops what it started."""
    script, pids_file = _tree(tmp_path)
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
