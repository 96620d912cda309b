"""A metrics store for the dashboard tests, written only through MetricsStore's write methods.

Three runs (newest first as the dashboard lists them):
  * "hospitals-ckks" (sync, ckks, running, 5 of 8 rounds): three hospitals; hospital-c declines
    in round 4 (budget_exhausted); hospital-b drops out in round 3; two rejected envelopes; nodes.
  * "clinics-async" (async, secret-sharing, completed): per-update staleness in client rows.
  * "baseline-plain" (async, none, completed): staleness only in rounds.extra.
"""

from __future__ import annotations

from pathlib import Path

from fedveil.platform.store import MetricsStore, store_url

ORGS = ("hospital-a", "hospital-b", "hospital-c")
BUDGETS = {"hospital-a": 8.0, "hospital-b": 3.0, "hospital-c": 2.2}
EPS_PER_ROUND = {"hospital-a": 0.5, "hospital-b": 0.6, "hospital-c": 0.7}
REJECTIONS = (
    (2, "proxy-1", "envelope from node 7: AAD mismatch (wrong run id)"),
    (4, "proxy-2", "envelope from node 9: reused envelope (replay)"),
)


def _round(store: MetricsStore, run_id: str, rnd: int, t0: float, *, acc: float, loss: float, parts: int,
           nbytes: int, version: int | None = None, extra: dict | None = None) -> None:
    store.record_round(
        run_id, rnd, model_version=rnd if version is None else version,
        started_at=t0 + 10.0 * (rnd - 1), finished_at=t0 + 10.0 * rnd, seconds=10.0, participants=parts,
        accuracy=acc, loss=loss, bytes_up=nbytes, protect_seconds=0.2 + 0.01 * rnd, combine_seconds=0.05,
        finish_seconds=0.1, extra=extra or {},
    )


def build(workdir: str | Path) -> str:
    """Write the fixture store under `workdir` and return its URL."""
    url = store_url(workdir)
    store = MetricsStore(url)
    try:
        # --- oldest: async, plaintext baseline, staleness only in rounds.extra --------------------
        store.create_run("run-plain", mode="async", secure="none", name="baseline-plain", dataset="digits",
                         model="mlp", rounds_planned=3)
        t0 = store.get_run(store.list_runs()[0]["id"])["started_at"]
        for rnd, (acc, loss) in enumerate([(0.60, 1.20), (0.70, 0.90), (0.75, 0.80)], start=1):
            _round(store, "run-plain", rnd, t0, acc=acc, loss=loss, parts=2, nbytes=4096,
                   extra={"staleness": [0, rnd]})
        store.finish_run("run-plain", "completed")

        # --- async secret sharing, staleness per client update -----------------------------------
        store.create_run("run-async", mode="async", secure="secret-sharing", name="clinics-async",
                         dataset="breast_cancer", model="logreg", rounds_planned=4)
        t0 = store.get_run(store.list_runs()[0]["id"])["started_at"]
        stale = {1: (0, 1), 2: (1, 2), 3: (0, 3), 4: (2, 1)}
        for rnd in range(1, 5):
            _round(store, "run-async", rnd, t0, acc=0.80 + 0.03 * rnd, loss=0.6 - 0.1 * rnd, parts=2,
                   nbytes=200_000)
            for org, s in zip(("clinic-x", "clinic-y"), stale[rnd]):
                store.record_client_round("run-async", rnd, org, "ok", num_samples=100, accuracy=0.8,
                                          loss=0.5, epsilon=0.3 * rnd, delta=1e-5, budget=10.0,
                                          noise_multiplier=1.1, sample_rate=0.01, steps=50, accountant="prv",
                                          staleness=s)
        store.finish_run("run-async", "completed")

        # --- newest: the sync CKKS run the dashboard opens on ------------------------------------
        store.create_run("run-ckks", mode="sync", secure="ckks", name="hospitals-ckks", dataset="mnist",
                         model="cnn", rounds_planned=8)
        t0 = store.get_run("run-ckks")["started_at"]
        accs = [0.52, 0.71, 0.80, 0.86, 0.891]
        losses = [1.61, 0.95, 0.62, 0.45, 0.37]
        for rnd in range(1, 6):
            trained = [o for o in ORGS if not (o == "hospital-c" and rnd >= 4) and not (o == "hospital-b" and rnd == 3)]
            _round(store, "run-ckks", rnd, t0, acc=accs[rnd - 1], loss=losses[rnd - 1], parts=len(trained),
                   nbytes=1_048_576 * len(trained))
            for i, org in enumerate(ORGS):
                done = sum(1 for r in range(1, rnd + 1)
                           if not (org == "hospital-c" and r >= 4) and not (org == "hospital-b" and r == 3))
                eps = round(EPS_PER_ROUND[org] * done, 6)
                common = dict(node_id=f"n{i + 1}", delta=1e-5, budget=BUDGETS[org], noise_multiplier=1.0 + 0.1 * i,
                              sample_rate=0.02, accountant="rdp", epsilon=eps)
                if org == "hospital-c" and rnd >= 4:
                    store.record_client_round("run-ckks", rnd, org, "budget_exhausted", **common)
                elif org == "hospital-b" and rnd == 3:
                    store.record_client_round("run-ckks", rnd, org, "dropped", **common)
                else:
                    store.record_client_round("run-ckks", rnd, org, "ok", num_samples=1000 + 100 * i,
                                              accuracy=accs[rnd - 1] - 0.02 * i, loss=losses[rnd - 1] + 0.05 * i,
                                              steps=40, train_seconds=3.0, bytes_up=1_048_576, **common)
        for rnd, source, reason in REJECTIONS:
            store.record_event("run-ckks", "rejected", reason, level="warning", source=source, round=rnd)
        store.record_event("run-ckks", "dropout", "hospital-b missed the deadline", level="warning",
                           source="hospital-b", round=3)
        store.record_event("run-ckks", "budget_exhausted", "hospital-c declined: ε budget 2.2 reached",
                           level="warning", source="hospital-c", round=4)
        store.record_event("run-ckks", "info", "round 5 aggregated", source="server", round=5)
        store.record_event("run-ckks", "error", "proxy-2 restarted", level="error", source="proxy-2", round=4)
        for node_id, role, name, status in (
            ("s0", "server", "server", "online"),
            ("p1", "proxy", "proxy-1", "online"),
            ("p2", "proxy", "proxy-2", "online"),
            ("n1", "client", "hospital-a", "online"),
            ("n2", "client", "hospital-b", "online"),
            ("n3", "client", "hospital-c", "offline"),
        ):
            store.upsert_node("run-ckks", node_id, role=role, name=name, status=status)
    finally:
        store.close()
    return url
