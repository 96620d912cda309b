"""End to end: `fedveil demo` starts a real SuperLink, 2 proxies and 3 clients on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

FEDVEIL = [sys.executable, "-m", "fedveil.platform.cli"]


def fedveil(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return subprocess.run(FEDVEIL + list(args), capture_output=True, text=True, timeout=timeout, env=env)


def test_demo_runs_real_processes_and_export_reports_rounds_and_epsilon(tmp_path: Path):
    workdir = tmp_path / "demo"
    done = fedveil("demo", "--rounds", "2", "--clients", "3", "--proxies", "2", "--dataset", "breast_cancer",
                   "--no-dashboard", "--workdir", str(workdir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert ": completed; 2 of 2 round(s) updated the model" in done.stdout
    assert "clients' validation accuracy" in done.stdout and "privacy spent per organization" in done.stdout
    assert (workdir / "fedveil.db").exists()

    exported = fedveil("export", "--workdir", str(workdir))
    assert exported.returncode == 0, exported.stderr
    doc = json.loads(exported.stdout)
    (run,) = doc["runs"]
    assert run["status"] == "completed" and run["mode"] == "sync" and run["secure"] == "secret-sharing"
    assert [r["round"] for r in run["rounds"]] == [1, 2]
    for r in run["rounds"]:
        assert set(r) >= {"round", "accuracy", "loss", "participants", "seconds"}
        assert r["participants"] == 3 and r["accuracy"] is not None and r["accuracy"] > 0.5
    assert sorted(c["org"] for c in run["clients"]) == ["hospital-a", "hospital-b", "hospital-c"]
    for c in run["clients"]:
        assert set(c) >= {"org", "epsilon", "delta", "budget", "status"}
        assert c["epsilon"] > 0 and c["status"] == "ok"

    # Every process the demo started is gone: nothing listens on the SuperLink's port any more.
    leftover = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"processes left running: {leftover.stdout}"


def test_supernode_with_unregistered_key_is_refused_with_a_clear_message(tmp_path: Path):
    from fedveil.platform import launcher
    from fedveil.platform.provision import init_federation_keys

    keys = init_federation_keys(tmp_path / "keys", ["proxy-1"], ["hospital-a"], ckks=False)
    rogue = init_federation_keys(tmp_path / "rogue", ["proxy-1"], ["hospital-a"], ckks=False)
    (rogue / "hospital-a" / "ca.pem").write_bytes((keys / "hospital-a" / "ca.pem").read_bytes())
    cfg = tmp_path / "fed.toml"
    cfg.write_text("[federation]\nname = 'x'\n")
    port = launcher.free_port()
    server = keys / "server"
    tls = launcher.TlsFiles(server / "ca.pem", server / "superlink.pem", server / "superlink.key")
    with launcher.ProcessGroup(tmp_path) as group:
        link = group.start("superlink", launcher.superlink_argv("127.0.0.1", port, tmp_path, tls, auth=True),
                           launcher.flower_env(tmp_path))
        launcher.wait_for_port("127.0.0.1", port, 60, link, "flower-superlink")
        done = fedveil("client", "--config", str(cfg), "--org", "hospital-a", "--data", "breast_cancer",
                       "--keys", str(rogue / "hospital-a"), "--superlink", f"127.0.0.1:{port}",
                       "--workdir", str(tmp_path / "client"), "--connect-timeout", "6", timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert "not registered" in done.stderr and "fix:" in done.stderr


def test_ctrl_c_stops_every_process_the_demo_started(tmp_path: Path):
    import signal
    import time

    workdir = tmp_path / "demo"
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(FEDVEIL + ["demo", "--rounds", "50", "--no-dashboard", "--workdir", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        assert proc.stdout is not None
        for line in proc.stdout:
            if "round   1/50" in line or time.monotonic() > deadline:
                break
        running = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True).stdout.split()
        assert len(running) >= 6, "SuperLink, 2 proxies and 3 clients should be running mid-run"
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=90)
        stderr = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130, stderr
    assert "Traceback" not in stderr and "interrupted" in stderr
    time.sleep(1)
    leftover = subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"processes left running: {leftover.stdout}"
    (run,) = json.loads(fedveil("export", "--workdir", str(workdir)).stdout)["runs"]
    assert run["status"] == "stopped"
