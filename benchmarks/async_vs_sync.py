"""Async (FedBuff) vs semi-sync vs sync on the same federation: time to accuracy, accuracy at a fixed time.

    python benchmarks/async_vs_sync.py            # ~3-4 min on 2 cores; writes benchmarks/async_vs_sync.json
    python benchmarks/async_vs_sync.py --real     # the same on real processes (~5 min): writes ..._real.json

8 organizations on `digits` (Dirichlet alpha=0.5 label skew), 2 of them 5x slower. Everything runs
on the in-process grid (the real ClientApp, proxies and engine, in threads); heterogeneity is an
INJECTED LATENCY per train task (fast: FAST_S seconds, slow: 5 x FAST_S), not real hardware. The
secure mode is `none` and DP is off, so the comparison measures only the round protocol (the secure
modes aggregate the same numbers, see tests/test_async.py). Every model version is timestamped as it
is produced and evaluated afterwards, centrally, on the union of all organizations' validation
splits (so evaluation costs no federation time).

`--real` runs sync and async as `fedveil demo` does: a SuperLink, 2 proxies and 8 client SuperNodes
(warm executors), each a separate process. The slow organizations' delay is the `latency` knob
(FAST_S or 5 x FAST_S seconds added to each train reply). There the server scores every model
version on digits' public test split as it runs (`[evaluation]`), and the time of a version is its
`finished_at` in the store, counted from the start of the first round (the handshake is excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fedveil.aggregator.engine import Federation  # noqa: E402
from fedveil.platform import config as config_mod  # noqa: E402
from fedveil.platform.federation import demo_orgs  # noqa: E402
from fedveil.platform.localgrid import grid_for_config  # noqa: E402
from fedveil.platform.store import MetricsStore  # noqa: E402

FAST_S = 0.4  # injected seconds per train task for a fast organization
SLOW = ("lab-g", "clinic-h")  # 5x slower
WALL_S = 45.0  # each mode runs about this long


def base_config(mode: str, rounds: int) -> config_mod.FedveilConfig:
    values = {
        "federation.name": f"bench-{mode}", "federation.mode": mode, "federation.rounds": rounds,
        "federation.min_aggregate": 2, "federation.min_clients": 2, "federation.round_timeout": 60.0,
        "federation.secure": "none", "federation.seed": 0,
        "data.source": "digits", "data.partition": "dirichlet", "data.alpha": 0.5,
        "training.epochs": 1, "training.batch_size": 32, "training.lr": 0.1, "privacy.enabled": False,
        "async.buffer_size": 6, "async.concurrency": 0, "async.staleness": "polynomial",
        "async.staleness_exponent": 0.5, "async.max_staleness": 16, "async.server_lr": 1.0,
        "orgs": [o.model_dump(exclude_none=True) for o in demo_orgs(8)],
        # the benchmark's organizations opt in to the plaintext, DP-off baseline (their default policy declines it)
        "policy.allow_secure": ["none", "secret-sharing", "ckks"], "policy.require_dp": False,
    }
    if mode == "semi-sync":
        # deadline a little past the fast clients' time; late (slow) replies carry into the next round
        values.update({"federation.round_timeout": 3 * FAST_S + 0.6, "federation.late_replies": "carry"})
    return config_mod.with_overrides(config_mod.FedveilConfig(), values)


def delays() -> dict:
    def make(seconds):
        return lambda msg: seconds if msg.metadata.message_type == "train" else 0.0

    names = [o.name for o in demo_orgs(8)]
    return {n: make(5 * FAST_S if n in SLOW else FAST_S) for n in names}


def run_mode(mode: str, rounds: int, workdir: Path) -> dict:
    cfg = base_config(mode, rounds)
    store = MetricsStore(f"sqlite:///{workdir / 'fedveil.db'}")
    grid = grid_for_config(cfg, workdir, delays=delays())
    grid._pool = ThreadPoolExecutor(max_workers=16)  # 8 clients + proxies never wait for a worker thread
    fed = Federation(grid, cfg, store, f"bench-{mode}", workdir=workdir, handshake_timeout=60)
    timeline: list[tuple[float, np.ndarray]] = []
    t0 = {"t": None}
    init = fed.init_model

    def timed_init():
        out = init()
        t0["t"] = time.monotonic()
        timeline.append((0.0, fed.weights.copy()))
        return out

    step = fed.optimizer.step

    def timed_step(weights, delta):
        new = step(weights, delta)
        timeline.append((time.monotonic() - t0["t"], new.copy()))
        return new

    fed.init_model = timed_init
    fed.optimizer.step = timed_step
    deadline_hit = {"stop": False}
    try:
        fed.run()
    finally:
        grid.shutdown()
    stale = [c["staleness"] for c in store.client_rounds(f"bench-{mode}") if c["status"] == "ok"
             and c["staleness"] is not None]
    return {"cfg": cfg, "fed": fed, "timeline": timeline, "staleness": stale, "stopped": deadline_hit["stop"]}


def evaluator(cfg):
    """Central evaluation on the union of the 8 organizations' validation splits."""
    from fedveil.clients.node import ClientIdentity, build_model, load_datasets, set_model_arrays
    from fedveil.platform.params import unflatten

    xs, ys = [], []
    for i, org in enumerate(cfg.orgs):
        _, val = load_datasets(ClientIdentity(org.name, Path("."), "", i, len(cfg.orgs), "", ""), cfg)
        xs.append(np.asarray(val.X, dtype=np.float32))
        ys.append(np.asarray(val.y))
    x, y = torch.as_tensor(np.concatenate(xs)), np.concatenate(ys)
    model = build_model(cfg, val.feature_shape, val.num_classes)
    from fedveil.clients.node import model_arrays

    like = model_arrays(model)

    def accuracy(flat: np.ndarray) -> float:
        set_model_arrays(model, unflatten(flat, like))
        model.eval()
        with torch.no_grad():
            pred = model(x).argmax(dim=1).numpy()
        return float((pred == y).mean())

    return accuracy


def summarize(name: str, timeline, accuracy, target: float, at: float) -> dict:
    curve = [(t, accuracy(w)) for t, w in timeline]
    reach = next((t for t, a in curve if a >= target), None)
    at_time = max((a for t, a in curve if t <= at), default=curve[0][1])
    return {"mode": name, "versions": len(curve) - 1, "wall_s": round(curve[-1][0], 2),
            "time_to_target_s": None if reach is None else round(reach, 2), "acc_at_fixed_time": round(at_time, 4),
            "final_acc": round(curve[-1][1], 4), "best_acc": round(max(a for _, a in curve), 4),
            "curve": [(round(t, 2), round(a, 4)) for t, a in curve]}


def print_table(results: dict, target: float, at: float, first_column: str) -> None:
    """Markdown rows for docs/benchmarks.md, each mode against sync measured in the same run."""
    sync = results["sync"]
    print(f"\n| {first_column} | versions | time to {target:.0%} (s) | vs sync | accuracy at {at:.0f} s | vs sync |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        tt = r["time_to_target_s"]
        ratio_t = "n/a" if tt is None or sync["time_to_target_s"] is None else f"{tt / sync['time_to_target_s']:.2f}x"
        ratio_a = f"{r['acc_at_fixed_time'] / sync['acc_at_fixed_time']:.2f}x"
        print(f"| {mode} | {r['versions']} | {tt if tt is not None else 'not reached'} | {ratio_t} | "
              f"{r['acc_at_fixed_time']:.3f} | {ratio_a} |")


def real_config(mode: str, rounds: int) -> config_mod.FedveilConfig:
    """The same federation for real processes: latency knobs instead of the grid's injected delays."""
    cfg = base_config(mode, rounds)
    orgs = [{**o.model_dump(exclude_none=True), "latency": 5 * FAST_S if o.name in SLOW else FAST_S}
            for o in demo_orgs(8)]
    return config_mod.with_overrides(cfg, {"orgs": orgs, "evaluation.source": "builtin-test",
                                           "evaluation.every": 1, "federation.name": f"real-{mode}"})


def run_real(mode: str, rounds: int, workdir: Path) -> list[tuple[float, float]]:
    """(seconds since the first round started, held-out accuracy) of every model version, on real processes."""
    from fedveil.platform.federation import LocalFederation

    cfg = real_config(mode, rounds)
    fed = LocalFederation(cfg, workdir, keys_dir=None, progress=lambda line: None)
    run_name = f"real-{mode}"
    try:
        fed.start()
        fed.submit(run_name)
        run = fed.wait(run_name, timeout=900)
    finally:
        fed.stop()
    if run["status"] != "completed":
        raise SystemExit(f"{mode} on real processes ended {run['status']}: {run.get('message')}")
    store = MetricsStore.open_readonly(fed.store_url)
    try:
        rows = [r for r in store.rounds(run_name) if r["server_accuracy"] is not None]
    finally:
        store.close()
    t0 = min(r["started_at"] for r in rows)
    return [(r["finished_at"] - t0, float(r["server_accuracy"])) for r in rows]


def main_real(target: float, at: float, out: Path) -> int:
    plan = {"sync": int(WALL_S / (5 * FAST_S + 0.5)), "async": int(WALL_S / (FAST_S * 0.9))}
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedveil-bench-real-") as tmp:
        for mode, rounds in plan.items():
            started = time.monotonic()
            curve = run_real(mode, rounds, Path(tmp) / mode)
            results[mode] = summarize(mode, curve, lambda accuracy: accuracy, target, at)  # already scored
            results[mode].update(rounds=rounds, versions=len(curve))  # no initial model in this curve
            print(f"{mode:>9} (real processes): {len(curve)} versions in {time.monotonic() - started:.0f}s "
                  f"(incl. start-up), time to {target:.0%}: {results[mode]['time_to_target_s']}s, "
                  f"final {results[mode]['final_acc']:.3f}", flush=True)
    print_table(results, target, at, "mode (real processes)")
    out.write_text(json.dumps({"target": target, "at": at, "fast_s": FAST_S, "slow": list(SLOW),
                               "evaluation": "server-side, digits public test split", "results": results}, indent=1))
    print(f"\nwrote {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", type=float, default=0.90, help="target accuracy")
    parser.add_argument("--at", type=float, default=20.0, help="fixed wall time (s) for accuracy-at-time")
    parser.add_argument("--out", default=None, help="JSON results (default benchmarks/async_vs_sync[_real].json)")
    parser.add_argument("--real", action="store_true", help="sync and async on real processes (warm SuperNodes)")
    args = parser.parse_args()
    if args.real:
        return main_real(args.target, args.at, Path(args.out or Path(__file__).with_name("async_vs_sync_real.json")))
    args.out = args.out or str(Path(__file__).with_suffix(".json"))
    torch.set_num_threads(1)
    # rounds chosen so each mode runs about WALL_S: a sync round waits for the slow clients (5 x FAST_S),
    # a semi-sync round for its deadline, an async aggregate for K = 6 of the fast clients' updates.
    plan = {"sync": int(WALL_S / (5 * FAST_S + 0.5)), "semi-sync": int(WALL_S / (3 * FAST_S + 0.9)),
            "async": int(WALL_S / (FAST_S * 0.9))}
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedveil-bench-") as tmp:
        for mode, rounds in plan.items():
            started = time.monotonic()
            out = run_mode(mode, rounds, Path(tmp) / mode)
            acc = evaluator(out["cfg"])
            results[mode] = summarize(mode, out["timeline"], acc, args.target, args.at)
            results[mode]["rounds"] = rounds
            if out["staleness"]:
                results[mode]["staleness_median"] = float(np.median(out["staleness"]))
                results[mode]["staleness_max"] = int(max(out["staleness"]))
            print(f"{mode:>9}: {rounds} rounds/aggregates in {time.monotonic() - started:.0f}s, "
                  f"time to {args.target:.0%}: {results[mode]['time_to_target_s']}s, "
                  f"acc at {args.at:.0f}s: {results[mode]['acc_at_fixed_time']:.3f}, "
                  f"final {results[mode]['final_acc']:.3f}", flush=True)
    print_table(results, args.target, args.at, "mode")
    Path(args.out).write_text(json.dumps({"target": args.target, "at": args.at, "fast_s": FAST_S,
                                          "slow": list(SLOW), "results": results}, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
