"""AppTest of every dashboard tab on a fixture store: the figures shown must match the store."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fixtures_dashboard as fx  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from fedveil.dashboard import views  # noqa: E402
from fedveil.platform.store import MetricsStore, store_url  # noqa: E402

APP = str(Path(views.__file__).with_name("app.py"))
TABS = ("Overview", "Convergence", "Privacy", "Secure aggregation", "System")


@pytest.fixture(scope="module")
def fixture_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fx.build(tmp_path_factory.mktemp("dash"))


@pytest.fixture
def store(fixture_url: str):
    s = MetricsStore.open_readonly(fixture_url)
    yield s
    s.close()


def _app(monkeypatch: pytest.MonkeyPatch, url: str, password: str | None = None) -> AppTest:
    monkeypatch.setenv("FEDVEIL_DASHBOARD_STORE", url)
    if password is None:
        monkeypatch.delenv("FEDVEIL_DASHBOARD_PASSWORD", raising=False)
    else:
        monkeypatch.setenv("FEDVEIL_DASHBOARD_PASSWORD", password)
    at = AppTest.from_file(APP, default_timeout=30)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _tab(at: AppTest, name: str):
    for tab in at.tabs:
        if tab.label.endswith(name):
            return tab
    raise AssertionError(f"no tab {name!r} in {[t.label for t in at.tabs]}")


def _metrics(block) -> dict[str, str]:
    return {m.label: m.value for m in block.metric}


def _frame_with(block, column: str):
    for df in block.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no dataframe with column {column!r}")


def _select_run(at: AppTest, run_id: str) -> None:
    at.selectbox(key="run").select(run_id).run()
    assert not at.exception, [e.value for e in at.exception]


# ---- empty states ----------------------------------------------------------------------------
def test_missing_store_is_a_friendly_empty_state_and_creates_nothing(monkeypatch, tmp_path):
    url = store_url(tmp_path / "nothing-here")
    at = _app(monkeypatch, url)
    text = " ".join(i.value for i in at.info)
    assert "No metrics yet" in text and "fedveil demo" in text
    assert not at.metric and not at.tabs
    assert not (tmp_path / "nothing-here").exists(), "a read-only dashboard must not create the store"


def test_empty_store_says_no_runs_yet(monkeypatch, tmp_path):
    url = store_url(tmp_path)
    MetricsStore(url).close()  # tables, no runs
    at = _app(monkeypatch, url)
    assert "No runs yet" in " ".join(i.value for i in at.info)
    assert not at.tabs


# ---- overview --------------------------------------------------------------------------------
def test_overview_matches_the_newest_run(monkeypatch, fixture_url, store):
    at = _app(monkeypatch, fixture_url)
    assert [t.label.split(": ", 1)[-1] for t in at.tabs] == list(TABS)
    runs = store.list_runs()
    newest = runs[0]
    assert newest["id"] == "run-ckks"
    rounds = store.rounds(newest["id"])
    clients = store.client_rounds(newest["id"])
    m = _metrics(_tab(at, "Overview"))
    assert m["Status"] == newest["status"] == "running"
    assert m["Mode"] == newest["mode"]
    assert m["Secure mode"] == newest["secure"]
    assert m["Rounds"] == f"{len(rounds)} / {newest['rounds_planned']}" == "5 / 8"
    assert m["Participants (last)"] == str(rounds[-1]["participants"]) == "2"
    assert m["Accuracy"] == f"{100 * rounds[-1]['accuracy']:.1f}%" == "89.1%"
    assert m["Loss"] == f"{rounds[-1]['loss']:.4f}"
    assert m["Organizations"] == str(len({c["org"] for c in clients})) == "3"
    assert m["Declined"] == "1"
    assert m["Model version"] == str(rounds[-1]["model_version"])
    assert m["Highest budget use"] == "95.5%"  # hospital-c: 2.1 of 2.2
    assert m["Elapsed"].endswith("s") or "min" in m["Elapsed"]
    table = _frame_with(_tab(at, "Overview"), "Run")
    assert list(table["Run"]) == [r["id"] for r in runs]
    assert list(table["Status"]) == [r["status"] for r in runs]
    assert at.title[0].value.endswith("hospitals-ckks")


def test_run_picker_switches_every_tab_to_the_chosen_run(monkeypatch, fixture_url, store):
    at = _app(monkeypatch, fixture_url)
    _select_run(at, "run-async")
    run = store.get_run("run-async")
    m = _metrics(_tab(at, "Overview"))
    assert m["Mode"] == "async" and m["Secure mode"] == "secret-sharing"
    assert m["Model versions"] == "4 / 4"
    assert m["Status"] == "completed"
    assert m["Elapsed"] == views.fmt_duration(run["finished_at"] - run["started_at"])
    assert _metrics(_tab(at, "Secure aggregation"))["Rejected envelopes"] == "0"
    assert at.title[0].value.endswith("clinics-async")


# ---- convergence -----------------------------------------------------------------------------
def test_convergence_charts_and_run_comparison(monkeypatch, fixture_url, store):
    at = _app(monkeypatch, fixture_url)
    tab = _tab(at, "Convergence")
    assert tab.radio(key="conv_axis").value == "Round"
    charts = at.get("vega_lite_chart")
    assert len(charts) >= 6
    at.radio(key="conv_axis").set_value("Wall time").run()
    assert not at.exception
    assert "Wall time since start (s)" in " ".join(c.proto.spec for c in at.get("vega_lite_chart"))
    at.selectbox(key="compare").select("run-plain").run()
    assert not at.exception
    table = _frame_with(_tab(at, "Convergence"), "Final accuracy (%)")
    assert len(table) == 2
    for rid, (_, row) in zip(("run-ckks", "run-plain"), table.iterrows()):
        last = store.rounds(rid)[-1]
        assert row["Final accuracy (%)"] == pytest.approx(100 * last["accuracy"], abs=0.01)
        assert row["Final loss"] == pytest.approx(last["loss"], abs=1e-4)
        assert row["Rounds"] == len(store.rounds(rid))
        assert rid in row["Run"]


def test_every_chart_uses_the_same_colour_per_organization(monkeypatch, fixture_url, store):
    at = _app(monkeypatch, fixture_url)
    colors = views.org_colors(c["org"] for c in store.client_rounds("run-ckks"))
    assert len(set(colors.values())) == len(colors) == 3
    specs = [c.proto.spec for c in at.get("vega_lite_chart")]
    org_specs = [s for s in specs if "hospital-a" in s]
    assert len(org_specs) >= 4  # budget bars (x2), ε over rounds, per-org accuracy and loss, dropouts
    for spec in org_specs:
        for org, colour in colors.items():
            if org in spec:
                assert colour in spec, (org, colour)


# ---- privacy ---------------------------------------------------------------------------------
def test_privacy_ledger_matches_the_store(monkeypatch, fixture_url, store):
    at = _app(monkeypatch, fixture_url)
    tab = _tab(at, "Privacy")
    ledger = _frame_with(tab, "Rounds left").set_index("Organization")
    latest = {c["org"]: c for c in store.latest_client_status("run-ckks")}
    assert sorted(ledger.index) == sorted(latest) == list(fx.ORGS)
    for org, row in latest.items():
        trained = sum(1 for c in store.client_rounds("run-ckks") if c["org"] == org and c["status"] == "ok")
        assert ledger.loc[org, "ε"] == pytest.approx(row["epsilon"])
        assert ledger.loc[org, "Budget ε"] == pytest.approx(row["budget"])
        assert ledger.loc[org, "δ"] == pytest.approx(row["delta"])
        assert ledger.loc[org, "σ"] == pytest.approx(row["noise_multiplier"])
        assert ledger.loc[org, "Accountant"] == row["accountant"]
        assert ledger.loc[org, "Rounds trained"] == trained
        assert ledger.loc[org, "Used"] == pytest.approx(100 * row["epsilon"] / row["budget"])
        if row["status"] == "budget_exhausted":
            expected_left = 0
        else:
            expected_left = math.floor((row["budget"] - row["epsilon"]) / (row["epsilon"] / trained) + 1e-9)
        assert ledger.loc[org, "Rounds left"] == expected_left
    assert list(ledger["Rounds left"]) == [11, 1, 0]
    assert list(ledger["State"]) == ["ok", "warning", "declined"]
    m = _metrics(tab)
    assert m["Declined"] == "1" and m["Near budget (≥80%)"] == "1" and m["Fewest rounds left"] == "0"
    assert m["Accountant"] == "rdp"
    warning = " ".join(w.value for w in tab.warning)
    assert "hospital-c" in warning and "round 4" in warning and "hospital-a" not in warning


# ---- secure aggregation ----------------------------------------------------------------------
def test_secure_aggregation_bytes_times_and_rejections(monkeypatch, fixture_url, store):
    at = _app(monkeypatch, fixture_url)
    tab = _tab(at, "Secure aggregation")
    rounds = store.rounds("run-ckks")
    m = _metrics(tab)
    assert m["Secure mode"] == "ckks"
    assert m["Uploaded (total)"] == views.fmt_bytes(sum(r["bytes_up"] for r in rounds)) == "12.0 MiB"
    assert m["Per round (mean)"] == views.fmt_bytes(sum(r["bytes_up"] for r in rounds) / len(rounds))
    mean_ms = 1000 * sum(r["protect_seconds"] + r["combine_seconds"] + r["finish_seconds"] for r in rounds) / len(rounds)
    assert m["Crypto time / round"] == f"{mean_ms:.1f} ms"
    rejected = [e for e in store.events("run-ckks") if e["kind"] == "rejected"]
    assert m["Rejected envelopes"] == str(len(rejected)) == "2"
    table = _frame_with(tab, "Reason")
    assert sorted(table["Reason"]) == sorted(e["message"] for e in rejected)
    assert sorted(table["Source"]) == ["proxy-1", "proxy-2"]


# ---- system ----------------------------------------------------------------------------------
def test_system_nodes_dropouts_and_event_log(monkeypatch, fixture_url, store):
    at = _app(monkeypatch, fixture_url)
    tab = _tab(at, "System")
    nodes = store.nodes("run-ckks")
    m = _metrics(tab)
    assert m["Nodes online"] == str(sum(n["status"] == "online" for n in nodes)) == "5"
    assert m["Nodes offline"] == "1"
    assert m["Dropouts"] == "1"  # the dropped client row and its dropout event are one dropout
    assert m["Errors"] == "1"
    assert m["Median staleness"] == "—"
    log = _frame_with(tab, "Message")
    events = store.events("run-ckks")
    assert len(log) == len(events) and set(log["Kind"]) == {e["kind"] for e in events}
    nf = _frame_with(tab, "Last seen")
    assert sorted(nf["Name"]) == sorted(n["name"] for n in nodes)
    at.multiselect(key="event_kinds").set_value(["rejected"]).run()
    assert len(_frame_with(_tab(at, "System"), "Message")) == 2


def test_async_staleness_from_client_rows_and_from_round_extra(monkeypatch, fixture_url, store):
    at = _app(monkeypatch, fixture_url)
    _select_run(at, "run-async")
    stale = [c["staleness"] for c in store.client_rounds("run-async")]
    assert len(stale) == 8
    assert _metrics(_tab(at, "System"))["Median staleness"] == f"{statistics.median(stale):g} versions"
    _select_run(at, "run-plain")
    extra = [s for r in store.rounds("run-plain") for s in json.loads(r["extra"])["staleness"]]
    assert extra and not any(c["staleness"] is not None for c in store.client_rounds("run-plain"))
    assert _metrics(_tab(at, "System"))["Median staleness"] == f"{statistics.median(extra):g} versions" == "0.5 versions"
    assert any("Staleness (model versions behind)" in c.proto.spec for c in at.get("vega_lite_chart"))


# ---- live updates and password -------------------------------------------------------------------
def test_a_new_round_shows_up_on_the_next_refresh(monkeypatch, tmp_path):
    url = fx.build(tmp_path)
    at = _app(monkeypatch, url)
    assert _metrics(_tab(at, "Overview"))["Rounds"] == "5 / 8"
    writer = MetricsStore(url)
    try:
        t0 = writer.get_run("run-ckks")["started_at"]
        writer.record_round("run-ckks", 6, started_at=t0 + 50, finished_at=t0 + 60, seconds=10.0, participants=2,
                            accuracy=0.912, loss=0.31, bytes_up=1000)
    finally:
        writer.close()
    at.run()
    m = _metrics(_tab(at, "Overview"))
    assert m["Rounds"] == "6 / 8" and m["Accuracy"] == "91.2%"


def test_password_gate(monkeypatch, fixture_url):
    at = _app(monkeypatch, fixture_url, password="s3cret-pw")
    assert not at.metric and not at.tabs
    field = at.text_input(key="_fv_password")
    assert field.proto.type == field.proto.PASSWORD
    field.input("wrong").run()
    assert "Wrong password." in [e.value for e in at.error] and not at.tabs
    at.text_input(key="_fv_password").input("s3cret-pw").run()
    assert not at.exception
    assert _metrics(_tab(at, "Overview"))["Status"] == "running"
