"""The metrics store on a real PostgreSQL server: a federation writes into it, export and the
dashboard read it back, and grant or connection problems are `error:`/`fix:` lines.

The server is a throwaway cluster (initdb + pg_ctl) on a loopback port in a temp dir, run as the
`postgres` user when the tests run as root (PostgreSQL refuses root). scripts/install_postgres.sh
(run by `make test`) installs the server package on a fresh machine; without it these tests skip
and say why. Passwords travel only through the environment (PGPASSWORD, FEDVEIL_STORE_URL).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

psycopg = pytest.importorskip("psycopg", reason='the PostgreSQL driver is missing: pip install "fedveil[postgres]"')

from fedveil.platform.store import MetricsStore, StoreError  # noqa: E402
from tests.conftest import run_federation  # noqa: E402
from tests.test_sync_rounds import small_config  # noqa: E402

PASSWORD = "pw-only-in-the-environment"
READER_PASSWORD = "reader-pw"


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: [int(x) for x in p.split("/")[4].split(".") if x.isdigit()])
    return candidates[-1] if candidates else None


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL will not run as root: drop to the `postgres` user the server package creates."""
    if os.geteuid() != 0:
        return argv
    runuser = shutil.which("runuser")
    if runuser is None:
        pytest.skip("running as root without runuser: cannot start PostgreSQL as an unprivileged user")
    return [runuser, "-u", "postgres", "--", *argv]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A fresh cluster with superuser `fedveil` (password from PGPASSWORD only) and database `fedveil`."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed: run scripts/install_postgres.sh (as root) or install 'postgresql'")
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
    base = Path(tempfile.mkdtemp(prefix="fedveil-pg-"))
    base.chmod(0o755)
    data, pwfile = base / "data", base / "pwfile"
    data.mkdir()
    pwfile.write_text(PASSWORD + "\n")
    if os.geteuid() == 0:
        for path in (base, data, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    port = _free_port()
    run = dict(capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    done = subprocess.run(_as_postgres([initdb, "-D", str(data), "-U", "fedveil", "--auth=scram-sha-256",
                                        f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"]), **run)
    assert done.returncode == 0, done.stdout + done.stderr
    options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    done = subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-o", options,
                                        "-w", "-t", "60", "start"]), **run)
    assert done.returncode == 0, done.stdout + done.stderr + (base / "server.log").read_text()
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user="fedveil", password=PASSWORD, dbname="postgres",
                             autocommit=True) as conn:
            conn.execute("CREATE DATABASE fedveil")
            conn.execute(f"CREATE ROLE reader LOGIN PASSWORD '{READER_PASSWORD}'")  # no grants on purpose
        yield {"port": port, "url": f"postgresql://fedveil@127.0.0.1:{port}/fedveil",
               "reader_url": f"postgresql://reader@127.0.0.1:{port}/fedveil"}
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]), **run)
        shutil.rmtree(base, ignore_errors=True)


def fedveil(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1", **env)
    return subprocess.run([sys.executable, "-m", "fedveil.platform.cli", *args], capture_output=True, text=True,
                          timeout=120, env=full, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def federation_in_postgres(postgres, tmp_path_factory):
    """A short in-process federation (2 rounds, 3 organizations) written into PostgreSQL."""
    os.environ["PGPASSWORD"] = PASSWORD  # libpq reads it; the URL carries no password
    try:
        fed, store, _ = run_federation(tmp_path_factory.mktemp("pgfed"), small_config(), "pg-run",
                                       store_url=postgres["url"])
        store.close()
    finally:
        del os.environ["PGPASSWORD"]
    return postgres


def test_federation_writes_to_postgres_and_export_reads_it_back(federation_in_postgres):
    url = federation_in_postgres["url"]
    # The URL on the command line has no password; the password comes from the environment.
    done = fedveil("export", "--store", url, env={"PGPASSWORD": PASSWORD})
    assert done.returncode == 0, done.stderr
    import json

    runs = {r["id"]: r for r in json.loads(done.stdout)["runs"]}
    run = runs["pg-run"]
    assert run["status"] == "completed"
    assert [r["round"] for r in run["rounds"]] == [1, 2]
    assert {c["org"] for c in run["clients"]} == {"hospital-a", "hospital-b", "hospital-c"}
    assert all(c["rounds"] == 2 and c["epsilon"] > 0 for c in run["clients"])
    # The whole URL, password included, may also come from FEDVEIL_STORE_URL (no --store at all).
    secret_url = url.replace("fedveil@", f"fedveil:{PASSWORD}@")
    done = fedveil("status", env={"FEDVEIL_STORE_URL": secret_url})
    assert done.returncode == 0, done.stderr
    assert "pg-run: completed" in done.stdout and "2/2 rounds" in done.stdout


def test_dashboard_reads_the_run_from_postgres(federation_in_postgres, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from fedveil.dashboard import views

    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    monkeypatch.setenv("FEDVEIL_DASHBOARD_STORE", federation_in_postgres["url"])
    monkeypatch.delenv("FEDVEIL_DASHBOARD_PASSWORD", raising=False)
    at = AppTest.from_file(str(Path(views.__file__).with_name("app.py")), default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    metrics = {m.label: m.value for tab in at.tabs for m in tab.metric}
    assert metrics["Status"] == "completed"
    assert metrics["Rounds"] == "2 / 2"
    assert metrics["Organizations"] == "3"


def test_reader_without_grants_gets_error_and_fix_not_an_empty_store(federation_in_postgres, monkeypatch):
    url = federation_in_postgres["reader_url"]
    done = fedveil("export", "--store", url, env={"PGPASSWORD": READER_PASSWORD})
    assert done.returncode == 2, done.stdout + done.stderr
    assert "permission denied" in done.stderr and "GRANT SELECT" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    # The dashboard says the same instead of "no fedveil tables yet".
    from streamlit.testing.v1 import AppTest

    from fedveil.dashboard import views

    monkeypatch.setenv("PGPASSWORD", READER_PASSWORD)
    monkeypatch.setenv("FEDVEIL_DASHBOARD_STORE", url)
    monkeypatch.delenv("FEDVEIL_DASHBOARD_PASSWORD", raising=False)
    at = AppTest.from_file(str(Path(views.__file__).with_name("app.py")), default_timeout=60)
    at.run()
    shown = " ".join(e.value for e in at.error)
    assert "refused access" in shown and "GRANT SELECT" in shown, shown
    assert "no fedveil tables" not in " ".join(i.value for i in at.info)
    # After the grant the same reader sees the run.
    with psycopg.connect(host="127.0.0.1", port=federation_in_postgres["port"], user="fedveil", password=PASSWORD,
                         dbname="fedveil", autocommit=True) as conn:
        conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO reader")
    done = fedveil("export", "--store", url, env={"PGPASSWORD": READER_PASSWORD})
    assert done.returncode == 0 and "pg-run" in done.stdout, done.stderr


def test_wrong_password_says_where_the_password_goes(federation_in_postgres):
    done = fedveil("status", "--store", federation_in_postgres["url"], env={"PGPASSWORD": "wrong"})
    assert done.returncode == 2, done.stderr
    assert "rejected the login" in done.stderr and "PGPASSWORD" in done.stderr and "wrong" not in done.stderr


# ---- no server needed ------------------------------------------------------------------------------
def test_unreachable_database_is_error_and_fix_with_the_password_masked():
    port = _free_port()  # nobody listens
    started = time.monotonic()
    done = fedveil("export", "--store", f"postgresql://fedveil:{PASSWORD}@127.0.0.1:{port}/fedveil", env={})
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: cannot reach the store") and "fix: " in done.stderr, done.stderr
    assert PASSWORD not in done.stderr and "***" in done.stderr
    assert "internal error" not in done.stderr and time.monotonic() - started < 60


def test_dashboard_command_line_carries_no_store_url(monkeypatch):
    """`ps` shows every user a command line: the store URL (maybe with a password) goes by environment."""
    from fedveil.dashboard import serve

    captured = {}

    class FakePopen:
        def __init__(self, cmd, env=None, **kwargs):
            captured.update(cmd=cmd, env=env)
            self.pid = os.getpid()

    monkeypatch.setattr(serve.subprocess, "Popen", FakePopen)
    url = f"postgresql://fedveil:{PASSWORD}@db.example:5432/fedveil"
    serve.serve(url, port=8599, background=True)
    assert not any(PASSWORD in arg or "postgresql" in arg for arg in captured["cmd"]), captured["cmd"]
    assert captured["env"][serve.STORE_ENV] == url


def test_store_error_kinds():
    with pytest.raises(StoreError) as err:
        MetricsStore("not a url at all")
    assert err.value.kind == "url" and "postgresql://" in err.value.fix
