"""Federation-level behaviour on the in-process grid: budgets, bad updates, ledgers across runs, resume."""

from __future__ import annotations

import time

import numpy as np
import pytest

from fedveil.aggregator import checkpoint
from fedveil.aggregator.optimizers import ServerOptimizer
from fedveil.aggregator.proxy import ProxyIdentity, aggregate
from fedveil.secure.modes import AggregationRefused
from tests.conftest import run_federation
from tests.test_sync_rounds import small_config


def test_budget_smaller_than_one_round_declines_and_federation_goes_on(tmp_path):
    orgs = [{"name": "hospital-a"}, {"name": "hospital-b"}, {"name": "hospital-c", "budget": 0.05}]
    cfg = small_config(orgs=orgs)
    _, store, _ = run_federation(tmp_path, cfg, "r1")
    rows = store.client_rounds("r1")
    c_rows = [r for r in rows if r["org"] == "hospital-c"]
    assert [r["status"] for r in c_rows] == ["budget_exhausted", "budget_exhausted"]
    assert all(r["epsilon"] == 0.0 for r in c_rows)  # declined before spending anything
    assert [r["participants"] for r in store.rounds("r1")] == [2, 2]
    events = [e for e in store.events("r1") if e["kind"] == "budget_exhausted"]
    assert events and "hospital-c" in events[0]["message"] and "privacy.budget" in events[0]["message"]
    assert store.get_run("r1")["status"] == "completed"


def test_ledger_epsilon_grows_across_runs_on_the_same_workdir(tmp_path):
    cfg = small_config(**{"federation.rounds": 1})
    _, store, _ = run_federation(tmp_path, cfg, "first")
    first = {c["org"]: c["epsilon"] for c in store.latest_client_status("first")}
    _, store, _ = run_federation(tmp_path, cfg, "second")
    second = {c["org"]: c["epsilon"] for c in store.latest_client_status("second")}
    assert set(first) == set(second) == {"hospital-a", "hospital-b", "hospital-c"}
    for org in first:
        assert second[org] > first[org] > 0


def test_nan_update_is_rejected_and_the_round_goes_on(tmp_path, monkeypatch):
    import fedveil.clients.node as node

    real = node.train_task

    def poisoned(identity, *args, **kwargs):
        outcome = real(identity, *args, **kwargs)
        if identity.org == "hospital-b" and outcome.vector is not None:
            outcome.vector = outcome.vector.copy()
            outcome.vector[3] = np.nan
        return outcome

    monkeypatch.setattr(node, "train_task", poisoned)
    cfg = small_config(**{"federation.rounds": 1})
    fed, store, _ = run_federation(tmp_path, cfg, "r1")
    (row,) = store.rounds("r1")
    assert row["participants"] == 2
    assert np.all(np.isfinite(fed.weights))
    errors = [e for e in store.events("r1") if e["kind"] == "error" and "hospital-b" in e["message"]]
    assert errors and "NaN" in errors[0]["message"]


def test_proxy_rejects_non_finite_and_wrong_length_payloads_and_refuses_a_single_client(tmp_path):
    ident = ProxyIdentity(name="proxy-1", workdir=tmp_path, keys_dir="", min_aggregate=2)
    good = np.ones(4, dtype="<f4").tobytes()  # `none` sends float32, as Flower does
    payloads = {"1": good, "2": good, "3": np.array([1, np.nan, 0, 0], dtype="<f4").tobytes(),
                "4": np.ones(3, dtype="<f4").tobytes()}
    result = aggregate(ident, payloads, run_id="r", task_id="t", mode="none", length=4, min_aggregate=2)
    assert result.included == ["1", "2"]
    assert set(result.rejected) == {"3", "4"}
    np.testing.assert_array_equal(np.frombuffer(result.partial), np.full(4, 2.0))
    with pytest.raises(AggregationRefused):
        aggregate(ident, {"1": good}, run_id="r", task_id="t2", mode="none", length=4, min_aggregate=2)


def test_a_server_cannot_lower_the_proxy_floor(tmp_path):
    """A curious server asking for an aggregate of one client is refused by the proxy's own floor."""
    ident = ProxyIdentity(name="proxy-1", workdir=tmp_path, keys_dir="", min_aggregate=2)
    with pytest.raises(AggregationRefused):
        aggregate(ident, {"1": np.ones(4).tobytes()}, run_id="r", task_id="t", mode="none", length=4, min_aggregate=1)


def _dead_pid() -> int:
    """The pid of a process that has exited: what a kill -9'd server leaves in its heartbeat."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _kill_server(store, run_id: str) -> None:
    """The store as `kill -9` of the ServerApp leaves it: `running`, beaten last by a process now gone."""
    import socket

    import sqlalchemy as sa

    from fedveil.platform.store import heartbeats, runs

    with store.engine.begin() as conn:
        conn.execute(runs.update().where(runs.c.id == run_id).values(status="running", finished_at=None))
        conn.execute(sa.delete(heartbeats).where(heartbeats.c.run_id == run_id))
        conn.execute(heartbeats.insert().values(run_id=run_id, beat_at=time.time(), pid=_dead_pid(),
                                                host=socket.gethostname()))


def test_resume_continues_the_same_run_from_its_checkpoint(tmp_path):
    """Server killed after round 1 of 2; `--resume` continues run r1 itself: one history, no ghost, no new id."""
    from fedveil.aggregator.serverapp import resolve_run_id

    cfg = small_config(**{"federation.rounds": 1, "federation.name": "fed"})
    fed1, store, _ = run_federation(tmp_path, cfg, "r1")
    saved = checkpoint.load(fed1.checkpoint_dir)
    assert saved is not None and saved.round == 1
    np.testing.assert_array_equal(saved.weights, fed1.weights)
    _kill_server(store, "r1")
    assert store.get_run("r1")["status"] == "interrupted"  # readers see the ghost at once (its pid is gone)

    run_id = resolve_run_id(store, "fed", "", flower_run_id=99, resume=True)
    assert run_id == "r1"
    cfg2 = small_config(**{"federation.rounds": 2, "federation.name": "fed"})
    _, store, _ = run_federation(tmp_path, cfg2, run_id, resume=True)
    assert [r["id"] for r in store.list_runs()] == ["r1"]
    assert [r["round"] for r in store.rounds("r1")] == [1, 2]
    assert store.get_run("r1")["status"] == "completed"
    kinds = [e["kind"] for e in reversed(store.events("r1"))]
    assert "resumed" in kinds
    assert any("resumed from checkpoint after round 1" in e["message"] for e in store.events("r1"))


def test_a_run_whose_server_died_is_marked_interrupted_everywhere(tmp_path, capsys):
    """A ghost reads as `interrupted` in status and export before anything restarts, and a new server
    start closes it so in the store; a live run and a finished one are left alone."""
    from fedveil.aggregator.engine import Federation
    from fedveil.dashboard import views
    from fedveil.platform import cli
    import sqlalchemy as sa

    from fedveil.platform.store import MetricsStore, runs

    url = f"sqlite:///{tmp_path / 'fedveil.db'}"
    store = MetricsStore(url)
    for run_id in ("ghost", "live", "done"):
        store.create_run(run_id, mode="sync", secure="none", name="fed")
        store.heartbeat(run_id)
    store.finish_run("done", "completed")
    _kill_server(store, "ghost")

    assert {r["id"]: r["status"] for r in store.list_runs()} == {"ghost": "interrupted", "live": "running",
                                                                "done": "completed"}
    assert {r["id"]: r["status"] for r in store.export()["runs"]}["ghost"] == "interrupted"
    assert cli.main(["status", "--store", url]) == 0
    assert "ghost: interrupted" in capsys.readouterr().out
    frame = views.runs_frame(MetricsStore.open_readonly(url).list_runs())  # what the dashboard shows
    assert dict(zip(frame["Run"], frame["Status"]))["ghost"] == "interrupted"
    store.upsert_node("ghost", "101", role="client", name="hospital-a", status="online")
    nodes = views.nodes_frame(store.nodes("ghost"), run_status=store.get_run("ghost")["status"])
    assert not nodes["Online"].any()  # nobody has heard from them since the server died

    fed = Federation(None, small_config(), store, "next", workdir=tmp_path)  # type: ignore[arg-type]
    fed._open_run()
    with store.engine.connect() as conn:  # the rows as written, not a reader's view
        raw = dict(conn.execute(sa.select(runs.c.id, runs.c.status)).all())
    assert raw == {"ghost": "interrupted", "live": "running", "done": "completed", "next": "running"}
    (event,) = [e for e in store.events("ghost") if e["kind"] == "interrupted"]
    assert "--resume" in event["message"]


def test_a_run_stopped_by_its_user_is_stopped_not_interrupted(tmp_path):
    """Ctrl-C of `fedveil demo`/`server`: the ServerApp is already gone when the command records the
    stop, so the reader's view says `interrupted`; the raw row is what must be closed."""
    from fedveil.platform import cli
    from fedveil.platform.store import MetricsStore

    url = f"sqlite:///{tmp_path / 'fedveil.db'}"
    store = MetricsStore(url)
    for run_id in ("ctrl-c", "done"):
        store.create_run(run_id, mode="sync", secure="none", name="fed")
        store.heartbeat(run_id)
    store.finish_run("done", "completed")
    _kill_server(store, "ctrl-c")
    assert store.get_run("ctrl-c")["status"] == "interrupted"
    cli._close_unfinished_run(url, "ctrl-c", "stopped", "interrupted by the user")
    cli._close_unfinished_run(url, "done", "stopped", "interrupted by the user")
    assert store.get_run("ctrl-c")["status"] == "stopped" and store.get_run("done")["status"] == "completed"
    assert store.close_if_running("ctrl-c", "failed") is False  # once closed, it stays as the user left it


def test_a_silent_server_on_another_host_is_interrupted_after_the_stale_limit(tmp_path):
    from fedveil.platform.store import STALE_AFTER, MetricsStore, heartbeats

    store = MetricsStore(f"sqlite:///{tmp_path / 'fedveil.db'}")
    store.create_run("far", mode="sync", secure="none", name="fed")
    with store.engine.begin() as conn:
        conn.execute(heartbeats.insert().values(run_id="far", beat_at=time.time(), pid=1, host="elsewhere"))
    assert store.mark_interrupted(now=time.time() + STALE_AFTER / 2) == []
    (closed,) = store.mark_interrupted(now=time.time() + STALE_AFTER + 1)
    assert closed["id"] == "far" and store.get_run("far")["status"] == "interrupted"


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi"])
def test_adaptive_server_optimizers_follow_reddi_et_al(kind):
    opt = ServerOptimizer(kind, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    w = np.zeros(3)
    d1, d2 = np.array([1.0, -2.0, 0.5]), np.array([0.5, 0.5, -1.0])
    m = 0.1 * d1
    v = 0.01 * d1**2 if kind == "fedadam" else -(0.01) * d1**2 * np.sign(-(d1**2))
    expected1 = 0.1 * m / (np.sqrt(v) + 1e-3)
    w1 = opt.step(w, d1)
    np.testing.assert_allclose(w1, expected1)
    m = 0.9 * m + 0.1 * d2
    v = 0.99 * v + 0.01 * d2**2 if kind == "fedadam" else v - 0.01 * d2**2 * np.sign(v - d2**2)
    np.testing.assert_allclose(opt.step(w1, d2), expected1 + 0.1 * m / (np.sqrt(v) + 1e-3))
    restored = ServerOptimizer(kind, lr=0.1)
    restored.load_state(opt.state())
    np.testing.assert_array_equal(restored.m, opt.m)


def test_fedavg_server_step_is_plain_averaging():
    opt = ServerOptimizer("fedavg", lr=1.0)
    np.testing.assert_array_equal(opt.step(np.ones(2), np.array([0.5, -1.0])), np.array([1.5, 0.0]))


# ---- a client sending garbage costs only its own update (issue 10, item 1) ------------------------
def _rename_payload(content):
    from fedveil.platform import messages as wire

    blobs = wire.record_blobs(content["payloads"])
    del content["payloads"]
    content["payloads"] = wire.blobs_record({"proxy-9": blob for blob in blobs.values()})


def _set_metric(key, value):
    return lambda content: content["metrics"].__setitem__(key, value)


def _set_status(text):
    return lambda content: content["status"].__setitem__("json", text)


BAD_INPUTS = {
    "num_samples=nan": (_set_metric("num_samples", float("nan")), "metrics.num_samples"),
    "num_samples=inf": (_set_metric("num_samples", float("inf")), "metrics.num_samples"),
    "num_samples=-1000": (_set_metric("num_samples", -1000.0), "metrics.num_samples"),
    "num_samples=1e12": (_set_metric("num_samples", 1e12), "metrics.num_samples"),
    "status-is-a-list": (_set_status('["ok"]'), "status.json"),
    "status-does-not-parse": (_set_status('{"status": "ok"'), "status.json"),
    "steps=1e300": (_set_metric("steps", 1e300), "metrics.steps"),
    "unknown-proxy": (_rename_payload, "payloads"),
}


@pytest.mark.parametrize("bad", sorted(BAD_INPUTS))
def test_a_bad_reply_costs_only_its_own_update(tmp_path, monkeypatch, bad):
    """hospital-b's train reply is mangled after its ClientApp built it; the run completes without it."""
    import fedveil.platform.nodeapp as nodeapp

    mutate, field = BAD_INPUTS[bad]
    real_app = nodeapp.app

    def lying_app(msg, context):
        reply = real_app(msg, context)
        if context.node_config.get("name") == "hospital-b" and msg.metadata.message_type == "train":
            mutate(reply.content)
        return reply

    monkeypatch.setattr(nodeapp, "app", lying_app)
    cfg = small_config(**{"federation.rounds": 1})
    fed, store, _ = run_federation(tmp_path, cfg, "r1")
    assert store.get_run("r1")["status"] == "completed"
    assert [r["participants"] for r in store.rounds("r1")] == [2]
    assert np.all(np.isfinite(fed.weights))
    assert [r["status"] for r in store.client_rounds("r1") if r["org"] == "hospital-b"] == ["rejected"]
    (event,) = [e for e in store.events("r1") if e["kind"] == "rejected"]
    assert event["source"] == "hospital-b" and field in event["message"], event["message"]


def test_a_sample_count_beyond_the_tolerance_is_refused_and_within_it_accepted(tmp_path, monkeypatch):
    """n_i may shrink by federation.num_samples_tolerance of what the org declared at hello, never grow."""
    import fedveil.platform.nodeapp as nodeapp

    real_app = nodeapp.app

    def shrinking_app(msg, context):
        reply = real_app(msg, context)
        if msg.metadata.message_type == "train" and "metrics" in reply.content:
            n = reply.content["metrics"]["num_samples"]
            factor = {"hospital-a": 0.95, "hospital-b": 0.5}.get(context.node_config.get("name"), 1.0)
            reply.content["metrics"]["num_samples"] = float(int(n * factor))
        return reply

    monkeypatch.setattr(nodeapp, "app", shrinking_app)
    cfg = small_config(**{"federation.rounds": 1, "federation.num_samples_tolerance": 0.1})
    _, store, _ = run_federation(tmp_path, cfg, "r1")
    status = {r["org"]: r["status"] for r in store.client_rounds("r1")}
    assert status == {"hospital-a": "ok", "hospital-b": "rejected", "hospital-c": "ok"}
    (event,) = [e for e in store.events("r1") if e["kind"] == "rejected"]
    assert "num_samples_tolerance" in event["message"] and "declared at hello" in event["message"]


def test_fedveil_server_resume_picks_the_unfinished_run_and_keeps_its_id(tmp_path, capsys):
    """`fedveil server --resume` submits the newest unfinished run of the federation under its own id,
    already `running` so that following it does not stop at its old status."""
    from fedveil.platform import cli
    from fedveil.platform.store import MetricsStore

    url = f"sqlite:///{tmp_path / 'fedveil.db'}"
    store = MetricsStore(url)
    store.create_run("fed-old", mode="sync", secure="none", name="fed")
    store.finish_run("fed-old", "completed")
    store.create_run("other-1", mode="sync", secure="none", name="other")
    store.create_run("fed-killed", mode="sync", secure="none", name="fed")
    _kill_server(store, "fed-killed")

    assert cli._server_run_name(url, "fed", resume=True) == "fed-killed"
    assert store.get_run("fed-killed")["status"] == "running"  # beaten by this (live) process now
    assert "resuming run fed-killed (it was interrupted)" in capsys.readouterr().out
    assert [e["kind"] for e in store.events("fed-killed")] == ["interrupted"]
    fresh = cli._server_run_name(url, "new-fed", resume=True)
    assert fresh.startswith("new-fed-") and store.get_run(fresh) is None
    assert cli._server_run_name(url, "fed", resume=False).startswith("fed-2")


def test_async_rounds_drop_a_bad_reply_and_keep_buffering(tmp_path, monkeypatch):
    """Async (FedBuff) reads replies through the same boundary: hospital-b's NaN count never enters a buffer."""
    import fedveil.platform.nodeapp as nodeapp
    from tests.test_async import async_config

    real_app = nodeapp.app

    def lying_app(msg, context):
        reply = real_app(msg, context)
        if context.node_config.get("name") == "hospital-b" and msg.metadata.message_type == "train":
            reply.content["metrics"]["num_samples"] = float("nan")
        return reply

    monkeypatch.setattr(nodeapp, "app", lying_app)
    fed, store, _ = run_federation(tmp_path, async_config(**{"federation.rounds": 2}), "r1")
    assert store.get_run("r1")["status"] == "completed"
    assert [r["participants"] for r in store.rounds("r1")] == [2, 2]
    assert {r["status"] for r in store.client_rounds("r1") if r["org"] == "hospital-b"} == {"rejected"}
    events = [e for e in store.events("r1") if e["kind"] == "rejected"]
    assert events and all(e["source"] == "hospital-b" and "metrics.num_samples" in e["message"] for e in events)
    assert np.all(np.isfinite(fed.weights))


def test_the_serverapp_resumes_the_killed_run_under_its_own_id(tmp_path):
    """The real ServerApp entry point, twice on the in-process grid: a new Flower run with `resume`
    continues the fedveil run the killed one left, instead of starting `run-<new flower id>`."""
    from flwr.app import Context, RecordDict

    from fedveil.aggregator import serverapp
    from fedveil.platform.federation import write_config
    from fedveil.platform.localgrid import grid_for_config
    from fedveil.platform.store import MetricsStore, store_url

    def serve(rounds: int, flower_run_id: int, resume: bool) -> None:
        cfg = small_config(**{"federation.rounds": rounds, "federation.name": "fed"})
        path = write_config(cfg, tmp_path / f"server-{flower_run_id}.toml")
        grid = grid_for_config(cfg, tmp_path)
        context = Context(run_id=flower_run_id, node_id=0, node_config={}, state=RecordDict(),
                          run_config={"config": str(path), "workdir": str(tmp_path), "resume": resume})
        try:
            serverapp.main(grid, context)
        finally:
            grid.shutdown()

    serve(1, flower_run_id=7, resume=False)
    store = MetricsStore(store_url(tmp_path))
    _kill_server(store, "run-7")
    serve(2, flower_run_id=8, resume=True)
    assert [(r["id"], r["status"]) for r in store.list_runs()] == [("run-7", "completed")]
    assert [r["round"] for r in store.rounds("run-7")] == [1, 2]
    resumed = [e["message"] for e in store.events("run-7") if e["kind"] in ("interrupted", "resumed")]
    assert resumed[0] == "run run-7 resumed (it was interrupted)" and "--resume" in resumed[1]  # newest first


def test_a_run_whose_rounds_were_skipped_does_not_read_as_plain_success(tmp_path):
    """Every round short of min_clients (one org's budget is too small for a round): the run completes, and says which
    rounds produced no aggregate; an honest run keeps an empty message."""
    from tests.conftest import run_federation
    from tests.test_sync_rounds import small_config

    orgs = [{"name": "hospital-a"}, {"name": "hospital-b"}, {"name": "hospital-c", "budget": 0.01}]
    cfg = small_config(**{"federation.rounds": 2, "federation.min_clients": 3, "orgs": orgs})
    _, store, _ = run_federation(tmp_path / "skip", cfg)
    run = store.get_run("r1")
    assert run["status"] == "completed"
    assert "2 of 2 round(s) produced no aggregate (rounds 1, 2)" in run["message"]
    assert sorted(e["round"] for e in store.events("r1") if e["kind"] == "round_skipped") == [1, 2]
