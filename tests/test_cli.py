"""The CLI's contract: clear errors without stack traces for expected failures, stable export JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fedveil.platform.store import MetricsStore, store_url

REPO = Path(__file__).resolve().parents[1]


def fedveil(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return subprocess.run([sys.executable, "-m", "fedveil.platform.cli", *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def assert_clean_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ")
    assert "fix: " in done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


def test_help_works_for_every_command():
    for cmd in ([], ["demo"], ["server"], ["proxy"], ["client"], ["export"], ["status"], ["dashboard"]):
        done = fedveil(*cmd, "--help")
        assert done.returncode == 0, (cmd, done.stderr)
        assert "usage: fedveil" in done.stdout


def test_malformed_config_names_the_key_and_the_fix(tmp_path):
    bad = tmp_path / "fed.toml"
    bad.write_text("[federation]\nrounds = -1\nsecure = 'rot13'\n[training]\nlearning_rate = 3\n")
    done = fedveil("proxy", "--config", str(bad), "--name", "proxy-1")
    assert_clean_error(done, "federation.rounds", "federation.secure", "training.learning_rate")


def test_invalid_toml_syntax_is_a_clear_error(tmp_path):
    bad = tmp_path / "fed.toml"
    bad.write_text("[federation\nrounds = 3\n")
    assert_clean_error(fedveil("proxy", "--config", str(bad), "--name", "proxy-1"), "not valid TOML")


def test_client_with_corrupt_data_fails_at_start_not_mid_round(tmp_path):
    cfg = tmp_path / "fed.toml"
    cfg.write_text("[federation]\nname = 'x'\n")
    corrupt = tmp_path / "records.csv"
    corrupt.write_bytes(b"\x00\x01garbage\xff\xfe,,,\n\x00")
    assert_clean_error(fedveil("client", "--config", str(cfg), "--org", "a", "--data", str(corrupt)), "records.csv")


def test_client_with_wrong_label_column_lists_the_columns(tmp_path):
    cfg = tmp_path / "fed.toml"
    cfg.write_text("[data]\nlabel_column = 'diagnosis'\n")
    data = tmp_path / "records.csv"
    data.write_text("f1,f2,outcome\n1,2,0\n3,4,1\n5,6,0\n7,8,1\n" * 10)
    assert_clean_error(fedveil("client", "--config", str(cfg), "--org", "a", "--data", str(data)), "diagnosis",
                       "outcome")


def test_client_with_missing_file_is_a_clear_error(tmp_path):
    cfg = tmp_path / "fed.toml"
    cfg.write_text("")
    assert_clean_error(fedveil("client", "--config", str(cfg), "--org", "a", "--data", str(tmp_path / "nope.csv")),
                       "nope.csv")


def test_export_without_store_is_a_clear_error(tmp_path):
    assert_clean_error(fedveil("export", "--workdir", str(tmp_path)), "fedveil.db")


def test_export_prints_the_documented_json(tmp_path):
    store = MetricsStore(store_url(tmp_path))
    store.create_run("r1", mode="sync", secure="ckks", rounds_planned=2)
    store.record_round("r1", 1, started_at=0, finished_at=2, seconds=2.0, participants=3, accuracy=0.9, loss=0.3)
    store.record_client_round("r1", 1, "org-a", "ok", epsilon=0.7, delta=1e-5, budget=3.0)
    store.record_client_round("r1", 1, "org-b", "budget_exhausted", epsilon=2.9, delta=1e-5, budget=3.0)
    store.finish_run("r1", "completed")
    store.close()
    done = fedveil("export", "--workdir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    (run,) = doc["runs"]
    assert {k: run[k] for k in ("id", "mode", "secure", "status")} == {
        "id": "r1", "mode": "sync", "secure": "ckks", "status": "completed"}
    (row,) = run["rounds"]
    # Fields are only ever added (docs/export.md); these must keep their names and values.
    assert {k: row[k] for k in ("round", "model_version", "accuracy", "loss", "participants", "seconds",
                                "bytes_up")} == {"round": 1, "model_version": 1, "accuracy": 0.9, "loss": 0.3,
                                                 "participants": 3, "seconds": 2.0, "bytes_up": 0}
    assert row["staleness"] == [] and row["buffer_fill_seconds"] is None  # a sync round: no buffer, no staleness
    by_org = {c["org"]: c for c in run["clients"]}
    assert by_org["org-a"]["epsilon"] == 0.7 and by_org["org-b"]["status"] == "budget_exhausted"
    assert {"org", "epsilon", "delta", "budget", "status"} <= set(by_org["org-a"])


def test_platform_folder_does_not_shadow_the_standard_library():
    """From the repo root, `platform` is still the stdlib module, and torch imports fine."""
    assert not (REPO / "platform" / "__init__.py").exists()
    done = subprocess.run([sys.executable, "-c", "import platform, torch; print(platform.python_version())"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().count(".") == 2


def test_relative_key_paths_survive_the_superlink_running_in_its_work_dir(tmp_path, monkeypatch):
    """`fedveil server --keys keys` starts the SuperLink with cwd = its work dir: paths must be absolute."""
    from fedveil.platform.cli import _tls_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "keys" / "server").mkdir(parents=True)
    for name in ("ca.pem", "superlink.pem", "superlink.key"):  # _tls_files checks they exist
        (tmp_path / "keys" / "server" / name).write_text("x")
    tls = _tls_files("keys")
    for path in (tls.ca_cert, tls.server_cert, tls.server_key):
        assert path.is_absolute() and str(path).startswith(str(tmp_path))
