"""Start the Streamlit dashboard in its own process (used by `fedveil dashboard` and `fedveil demo`).

    from fedveil.dashboard.serve import serve, wait_ready, stop
    proc = serve(store_url(workdir), port=8501, background=True)   # returns at once
    wait_ready("127.0.0.1", 8501)                                  # until the page answers
    ...
    stop(proc)                                                     # the whole process group

With `background=False` (the default) `serve` blocks until the server exits (Ctrl-C stops it)
and returns None. Secrets never travel on the command line (where `ps` shows them to every
user): the store URL, which may hold a database password, goes to the child's environment under
FEDVEIL_DASHBOARD_STORE, and a dashboard password under FEDVEIL_DASHBOARD_PASSWORD.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

APP = Path(__file__).resolve().with_name("app.py")
PASSWORD_ENV = "FEDVEIL_DASHBOARD_PASSWORD"
STORE_ENV = "FEDVEIL_DASHBOARD_STORE"  # read by app.py


def command(port: int = 8501, host: str = "127.0.0.1", password_env: str | None = None) -> list[str]:
    """The argv that serves the dashboard: no secret in it, not even the store URL (see `serve`)."""
    cmd = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless", "true",
        "--server.address", host,
        "--server.port", str(int(port)),
        "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
        "--server.runOnSave", "false",
        "--client.toolbarMode", "minimal",
        "--theme.base", "light",
    ]
    if password_env:
        cmd += ["--", "--password-env", password_env]
    return cmd


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("localhost" if host == "::" else host)
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{int(port)}/"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    store_url: str,
    port: int = 8501,
    host: str = "127.0.0.1",
    password: str | None = None,
    background: bool = False,
    *,
    log_file: str | Path | None = None,
) -> subprocess.Popen | None:
    """Serve the dashboard for the store at `store_url` on http://host:port/.

    background=True starts the server in a new process group and returns its Popen at once
    (stop it with `stop(proc)`); its output goes to `log_file`, or is discarded. background=False
    runs it in the foreground until it exits or Ctrl-C, and returns None.
    """
    env = os.environ.copy()
    password_env = None
    if password:
        env[PASSWORD_ENV] = password
        password_env = PASSWORD_ENV
    elif env.get(PASSWORD_ENV):
        password_env = PASSWORD_ENV  # an exported password still protects the page (fail closed)
    env[STORE_ENV] = store_url
    env.setdefault("STREAMLIT_BROWSER_GATHER_USAGE_STATS", "false")
    if not _is_loopback(host) and not password_env:
        print(f"warning: the dashboard listens on {host} without a password; anyone who can reach it can read "
              "the metrics (pass a password, or keep it on 127.0.0.1)", file=sys.stderr)
    cmd = command(port=port, host=host, password_env=password_env)
    if not background:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        try:
            proc.wait()
        except KeyboardInterrupt:
            pass
        finally:
            stop(proc)
        return None
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    try:
        return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        if log_file:
            out.close()  # the child keeps its own descriptor


def wait_ready(host: str = "127.0.0.1", port: int = 8501, timeout: float = 30.0,
               proc: subprocess.Popen | None = None) -> bool:
    """Poll the server's health endpoint until it answers `ok` (False on timeout or if proc exits)."""
    url = url_for(host, port) + "_stcore/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback health check
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    return False


def stop(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """Stop a server started by `serve` and everything in its process group."""
    if proc is None or proc.poll() is not None:
        return
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        return
    if pgid != proc.pid:  # not a group leader (not started by `serve`): never signal our own group
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
