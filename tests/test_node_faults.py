"""Faults found by the fault matrix (benchmarks/fault_matrix.py, docs/reliability.md "Fault matrix")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedveil.platform import launcher


def _state(pid: int) -> str:
    """The process's state letter (R, S, Z...), or '' once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_warm_executor_exits_when_its_supernode_is_killed_and_not_yet_reaped(tmp_path: Path, sigint: str):
    """kill -9 of a SuperNode left its warm executor running until the demo ended (fault matrix, proxy/client
    kill9): nobody reaps a dead node before the end, and Flower's parent check (`kill(pid, 0)`) takes the
    zombie for a live parent. The executor must notice that it was re-parented instead."""
    port = launcher.free_port()  # nothing listens there: the executor just waits for its SuperNode's Runtime API
    node = ("import os, subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-m', 'fedveil.platform.warm_executor', 'executor',\n"
            f"    '--runtime-api-address', '127.0.0.1:{port}', '--parent-pid', str(os.getpid())],\n"
            "    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            "print(p.pid, flush=True)\n"
            "time.sleep(600)\n")
    # "ignored": a node started in the background by a script (`fedveil client ... &`) inherits SIGINT ignored
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint == "ignored" else None
    parent = subprocess.Popen([sys.executable, "-c", node], stdout=subprocess.PIPE, text=True, cwd=tmp_path,
                              env=launcher.flower_env(tmp_path), preexec_fn=ignore)
    executor = int(parent.stdout.readline())
    try:
        time.sleep(1.0)
        os.kill(parent.pid, signal.SIGKILL)  # and not waited for: a zombie, like a dead node in the demo
        time.sleep(0.5)
        assert _state(parent.pid) == "Z"
        deadline = time.monotonic() + 45  # preloading torch & co. takes seconds on a busy 2-core host
        while _state(executor) not in ("", "Z") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _state(executor) in ("", "Z"), "the warm executor outlived its killed SuperNode"
    finally:
        if _state(executor) not in ("", "Z"):
            os.kill(executor, signal.SIGKILL)
        parent.wait(timeout=10)
