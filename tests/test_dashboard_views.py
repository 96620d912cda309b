"""The dashboard's pure functions, its process launcher, and its separation from client/aggregator code."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedveil.dashboard import serve as serve_mod
from fedveil.dashboard import views as v

DASHBOARD = Path(v.__file__).resolve().parent


def _cr(org: str, rnd: int, status: str = "ok", **kw) -> dict:
    row = {"org": org, "round": rnd, "status": status, "epsilon": None, "budget": None, "delta": None,
           "noise_multiplier": None, "sample_rate": None, "accountant": None, "accuracy": None, "loss": None,
           "staleness": None}
    row.update(kw)
    return row


# ---- colours ---------------------------------------------------------------------------------
def test_org_colours_are_stable_distinct_and_independent_of_order():
    orgs = [f"org-{i}" for i in range(10)]
    a = v.org_colors(orgs)
    b = v.org_colors(reversed(orgs))
    assert a == b
    assert len(set(a.values())) == 10
    assert set(a.values()) <= set(v.PALETTE)
    # an organization keeps its colour when it is alone on the page (its hashed slot is free)
    alone = v.org_colors(["hospital-a"])["hospital-a"]
    assert alone == v.PALETTE[v._slot("hospital-a")]
    # a subprocess (fresh hash seed) agrees: the mapping does not use Python's salted hash()
    out = subprocess.run(
        [sys.executable, "-c", "from fedveil.dashboard.views import org_colors; print(org_colors(['hospital-a'])['hospital-a'])"],
        capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"},
    )
    assert out.stdout.strip() == alone


def test_more_orgs_than_colours_still_get_a_colour():
    many = v.org_colors(f"o{i}" for i in range(len(v.PALETTE) + 5))
    assert len(many) == len(v.PALETTE) + 5 and set(many.values()) == set(v.PALETTE)


# ---- privacy projection --------------------------------------------------------------------
def test_rounds_left_projects_from_the_average_epsilon_per_trained_round():
    rows = [
        _cr("a", 1, epsilon=0.4, budget=3.0, delta=1e-5, noise_multiplier=1.1, accountant="rdp"),
        _cr("a", 2, epsilon=0.8, budget=3.0, delta=1e-5, noise_multiplier=1.1, accountant="rdp"),
        _cr("a", 3, "dropped", epsilon=0.8, budget=3.0),
        _cr("a", 4, epsilon=1.2, budget=3.0),
        _cr("b", 1, epsilon=1.0, budget=2.0, accountant="prv"),
        _cr("b", 2, epsilon=1.9, budget=2.0),
        _cr("b", 3, "budget_exhausted", budget=2.0),
        _cr("c", 1, epsilon=0.0, budget=5.0),
        _cr("d", 1, epsilon=1.7, budget=2.0),
    ]
    f = v.privacy_frame(rows).set_index("Organization")
    # a: 1.2 spent over 3 trained rounds = 0.4/round; (3.0 - 1.2) / 0.4 = 4.5 -> 4 whole rounds
    assert f.loc["a", "Rounds trained"] == 3
    assert f.loc["a", "ε per round"] == pytest.approx(0.4)
    assert f.loc["a", "Rounds left"] == 4
    assert f.loc["a", "Used"] == pytest.approx(0.4)
    assert f.loc["a", "δ"] == 1e-5 and f.loc["a", "σ"] == 1.1 and f.loc["a", "Accountant"] == "rdp"
    assert f.loc["a", "State"] == "ok"
    # b declined in round 3; its last ε is kept from round 2
    assert f.loc["b", "ε"] == pytest.approx(1.9)
    assert f.loc["b", "Rounds left"] == 0 and f.loc["b", "State"] == "declined"
    assert f.loc["b", "Declined in round"] == 3
    # c has spent nothing yet: no projection
    assert pd_isna(f.loc["c", "Rounds left"])
    # d: 85% used is a warning
    assert f.loc["d", "State"] == "warning" and f.loc["d", "Rounds left"] == 0
    assert v.declined_orgs(rows) == ["b"]


def pd_isna(x) -> bool:
    import pandas as pd

    return bool(pd.isna(x))


def test_epsilon_frame_keeps_only_rows_that_report_epsilon():
    rows = [_cr("a", 1, epsilon=0.5, budget=1.0), _cr("a", 2, "failed"), _cr("b", 1, epsilon=0.2)]
    f = v.epsilon_frame(rows)
    assert list(f["org"]) == ["a", "b"] and list(f["epsilon"]) == [0.5, 0.2]


# ---- system --------------------------------------------------------------------------------
def test_dropouts_count_rows_and_events_once():
    rows = [_cr("a", 2, "dropped"), _cr("a", 3, "ok")]
    events = [
        {"kind": "dropout", "source": "a", "round": 2, "ts": 0, "message": "x"},  # the same dropout
        {"kind": "dropout", "source": "b", "round": 5, "ts": 0, "message": "y"},
        {"kind": "rejected", "source": "p1", "round": 5, "ts": 0, "message": "z"},
    ]
    f = v.dropouts(rows, events)
    assert dict(zip(f["Organization"], f["Dropouts"])) == {"a": 1, "b": 1}


def test_staleness_prefers_client_rows_and_falls_back_to_round_extra():
    rows = [_cr("a", 1, staleness=2), _cr("b", 1, staleness=0)]
    assert sorted(v.staleness_values(rows, [])["staleness"]) == [0, 2]
    rounds = [{"round": 1, "extra": '{"staleness": [1, 3]}'}, {"round": 2, "extra": "not json"}, {"round": 3, "extra": "{}"}]
    assert list(v.staleness_values([_cr("a", 1)], rounds)["staleness"]) == [1, 3]


def test_rejected_frame_and_nodes_frame():
    events = [
        {"kind": "rejected", "source": "proxy-1", "round": 2, "ts": 0.0, "level": "warning", "message": "wrong AAD"},
        {"kind": "info", "source": "server", "round": 2, "ts": 0.0, "level": "info", "message": "ok"},
    ]
    r = v.rejected_frame(events)
    assert list(r.columns) == ["Time", "Round", "Source", "Reason"] and list(r["Reason"]) == ["wrong AAD"]
    n = v.nodes_frame([
        {"node_id": "1", "name": "a", "role": "client", "status": "online", "last_seen": 95.0},
        {"node_id": "2", "name": "b", "role": "client", "status": "offline", "last_seen": 10.0},
    ], now=100.0)
    assert list(n["Online"]) == [True, False] and n["Last seen"][0] == "5.0 s ago"


def test_formatting():
    assert v.fmt_duration(5.25) == "5.2 s" and v.fmt_duration(75) == "1 min 15 s" and v.fmt_duration(7300) == "2 h 01 min"
    assert v.fmt_bytes(512) == "512 B" and v.fmt_bytes(3 * 1024 * 1024) == "3.0 MiB"
    assert v.fmt_pct(0.891) == "89.1%" and v.fmt_pct(None) == "—"


def test_charts_label_their_axes_with_units():
    rows = [_cr("a", r, epsilon=0.3 * r, budget=2.0, accuracy=0.5 + 0.1 * r, loss=1.0 / r) for r in (1, 2, 3)]
    colors = v.org_colors(["a"])
    specs = [
        str(v.epsilon_chart(v.epsilon_frame(rows), colors).to_dict()),
        str(v.budget_bars(v.privacy_frame(rows), colors).to_dict()),
        str(v.metric_chart(v.org_metrics_frame(rows), y="accuracy_pct", y_title="Validation accuracy (%)",
                           color="org", scale=v.org_scale(colors)).to_dict()),
    ]
    assert "Round (#)" in specs[0] and "ε" in specs[0]
    assert "Budget used (% of ε budget)" in specs[1] and "warning (80%)" in specs[1] and "budget (100%)" in specs[1]
    assert "Validation accuracy (%)" in specs[2]
    for spec in specs:
        assert colors["a"] in spec


# ---- serve() ---------------------------------------------------------------------------------
def test_serve_command_keeps_the_password_out_of_argv(monkeypatch):
    seen: dict = {}

    class FakePopen:
        def __init__(self, cmd, env=None, **kw):
            seen.update(cmd=cmd, env=env, kw=kw)
            self.pid = 0

    monkeypatch.setattr(serve_mod.subprocess, "Popen", FakePopen)
    monkeypatch.delenv(serve_mod.PASSWORD_ENV, raising=False)
    proc = serve_mod.serve("sqlite:////tmp/x.db", port=8765, host="127.0.0.1", password="hunter2", background=True)
    assert isinstance(proc, FakePopen)
    cmd = seen["cmd"]
    assert "hunter2" not in " ".join(cmd)
    assert seen["env"][serve_mod.PASSWORD_ENV] == "hunter2"
    assert cmd[:4] == [sys.executable, "-m", "streamlit", "run"] and cmd[4].endswith("app.py")
    joined = " ".join(cmd)
    for flag in ("--server.headless true", "--server.address 127.0.0.1", "--server.port 8765",
                 "--browser.gatherUsageStats false"):
        assert flag in joined
    # the store URL (it may hold a database password) travels by environment, never argv
    assert cmd[cmd.index("--") + 1:] == ["--password-env", serve_mod.PASSWORD_ENV]
    assert "sqlite:////tmp/x.db" not in joined
    assert seen["env"][serve_mod.STORE_ENV] == "sqlite:////tmp/x.db"
    assert seen["kw"]["start_new_session"] is True

    seen.clear()
    serve_mod.serve("sqlite:////tmp/x.db", background=True)
    assert "--password-env" not in seen["cmd"] and "8501" in seen["cmd"]


def test_url_for():
    assert serve_mod.url_for("127.0.0.1", 8501) == "http://127.0.0.1:8501/"
    assert serve_mod.url_for("0.0.0.0", 9000) == "http://127.0.0.1:9000/"


# ---- separation ------------------------------------------------------------------------------
def test_dashboard_imports_no_client_or_aggregator_code():
    code = (
        "import sys, runpy\n"
        "import fedveil.dashboard, fedveil.dashboard.views, fedveil.dashboard.serve\n"
        f"runpy.run_path({str(DASHBOARD / 'app.py')!r}, run_name='not_main')\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('fedveil.clients', 'fedveil.aggregator', 'flwr', 'torch', 'opacus', 'tenseal')))\n"
        "print('BAD', bad)\n"
        "assert 'fedveil.platform.store' in sys.modules\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BAD []" in out.stdout


def test_dashboard_source_only_reads_the_store_through_its_public_api():
    source = "\n".join(p.read_text() for p in DASHBOARD.glob("*.py"))
    assert not re.search(r"from fedveil\.(clients|aggregator)|import fedveil\.(clients|aggregator)", source)
    for forbidden in ("record_round", "record_client_round", "record_event", "create_run", "finish_run",
                      "upsert_node", "create_all", "._select", ".engine", "MetricsStore(url"):
        assert forbidden not in source, forbidden
    assert "MetricsStore.open_readonly(" in source
