"""Full federation rounds on real Flower processes: stock executor against the warm one, per secure mode.

    python benchmarks/demo_rounds.py [--rounds 3] [--hidden 64] [--modes none secret-sharing ckks]
                                     [--executors stock warm] [--idle-seconds 20]

Each row runs the same federation (3 organizations, 2 proxies, breast_cancer, DP-SGD) through a
TLS SuperLink with SuperNode authentication on loopback, exactly as `fedveil demo` does. The only
differences between rows are the secure-aggregation mode and the node executor:

- `stock`: Flower's own path, a new `flwr-clientapp` process per message, 3 s idle sleeps;
- `warm`: fedveil's executor (platform/warm_executor.py), imports once and forks per task, with
  the SuperNode's waits capped (platform/launcher.py).

Reported per row: the median round wall time and the ratio warm/stock measured in the same run;
a split of a task into process start (warm: fork to message pulled, from the executor's trace
lines; stock: a cold interpreter importing what flwr-clientapp and the app import, timed here)
and run (message pulled to reply pushed, warm only); the handler compute the server records
(protect, combine, finish seconds); the CPU an idle node's processes use (% of one core, sampled
from /proc after the run); and the secure/plaintext ratios against `none` with the same executor.
`--hidden 1024 1024` gives an MLP of about 1.08M parameters.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedveil.platform import config as config_mod
from fedveil.platform import launcher, proctree
from fedveil.platform.federation import LocalFederation, demo_orgs
from fedveil.platform.provision import init_federation_keys
from fedveil.platform.store import MetricsStore
from fedveil.platform.warm_executor import TRACE

TRACE_LINE = re.compile(TRACE + r" .*forked=([\d.]+) pulled=([\d.]+) done=([\d.]+)")
COLD_IMPORTS = "import flwr.supernode.cli.flwr_clientapp, fedveil.platform.nodeapp, fedveil.clients.node, torch"


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def idle_cpu(roots: dict[str, int], seconds: float) -> dict[str, float]:
    """% of one core each node's process tree uses while the federation is idle."""
    def tree(root: int) -> list[int]:
        return [root, *proctree.descendants([root])]

    before = {label: {pid: cpu_ticks(pid) for pid in tree(root)} for label, root in roots.items()}
    time.sleep(seconds)
    hz = os.sysconf("SC_CLK_TCK")
    usage = {}
    for label, root in roots.items():
        used = sum(cpu_ticks(pid) - before[label].get(pid, 0) for pid in tree(root))
        usage[label] = 100.0 * used / hz / seconds
    return usage


def cold_start_seconds(repeats: int = 3) -> float:
    """What a stock per-message process pays before it can pull its message: a cold interpreter's imports."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", COLD_IMPORTS], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def task_traces(logs: Path) -> tuple[list[float], list[float]]:
    """(process start, run) seconds of every warm task, from the executor's trace lines."""
    starts, runs = [], []
    for log in logs.glob("*.log"):
        if log.name.startswith(("proxy-", "client-")):
            for match in TRACE_LINE.finditer(log.read_text(errors="replace")):
                forked, pulled, done = map(float, match.groups())
                if pulled > 0:
                    starts.append(pulled - forked)
                    runs.append(done - pulled)
    return starts, runs


def run_mode(mode: str, executor: str, rounds: int, hidden: list[int], root: Path, idle_seconds: float) -> dict:
    cfg = config_mod.with_overrides(config_mod.FedveilConfig(), {
        "federation.secure": mode, "federation.rounds": rounds, "model.hidden": hidden,
        "privacy.budget": 1e6, "orgs": [o.model_dump(exclude_none=True) for o in demo_orgs(3)],
        "proxies.names": ["proxy-1", "proxy-2"],
        # the benchmark's organizations opt in to the plaintext baseline (their default policy declines it)
        "policy.allow_secure": ["none", "secret-sharing", "ckks"],
    })
    tag = f"{mode}-{executor}"
    keys = init_federation_keys(root / f"keys-{tag}", cfg.proxies.names, [o.name for o in cfg.orgs],
                                ckks=mode == "ckks")
    os.environ[launcher.EXECUTOR_ENV] = executor
    fed = LocalFederation(cfg, root / tag, keys_dir=keys, progress=lambda _: None)
    run_name = f"bench-{tag}"
    start = time.perf_counter()
    try:
        fed.start()
        fed.submit(run_name)
        fed.wait(run_name, timeout=3600)
        total = time.perf_counter() - start
        nodes = {name: proc.pid for name, proc in fed.processes.procs if name != "superlink"}
        idle = idle_cpu(nodes, idle_seconds)
    finally:
        fed.stop()
    store = MetricsStore(fed.store_url)
    rows = store.rounds(run_name)
    store.close()
    starts, runs = task_traces(fed.workdir / "logs")

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    return {"mode": mode, "executor": executor, "round_s": med("seconds"), "bytes": med("bytes_up"),
            "total_s": total, "accuracy": rows[-1]["accuracy"], "participants": min(r["participants"] for r in rows),
            "protect_s": med("protect_seconds"), "combine_s": med("combine_seconds"), "finish_s": med("finish_seconds"),
            "task_start_s": statistics.median(starts) if starts else None,
            "task_run_s": statistics.median(runs) if runs else None,
            "idle_cpu_pct": statistics.median(idle.values()), "idle_cpu_max_pct": max(idle.values())}


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, nargs="+", default=[64])
    parser.add_argument("--modes", nargs="+", default=["none", "secret-sharing", "ckks"])
    parser.add_argument("--executors", nargs="+", default=["stock", "warm"], choices=["stock", "warm"])
    parser.add_argument("--idle-seconds", type=float, default=20.0, help="how long to sample idle CPU")
    args = parser.parse_args()
    cold = cold_start_seconds() if "stock" in args.executors else None
    results = []
    with tempfile.TemporaryDirectory(prefix="fedveil-bench-") as tmp:
        for mode in args.modes:  # executors interleaved, so load changes hit both alike
            for executor in args.executors:
                results.append(run_mode(mode, executor, args.rounds, args.hidden, Path(tmp), args.idle_seconds))
                r = results[-1]
                print(f"  done: {mode} / {executor}: median round {r['round_s']:.2f}s", file=sys.stderr, flush=True)
    by = {(r["mode"], r["executor"]): r for r in results}
    print(f"MLP hidden={args.hidden}, {args.rounds} rounds, 3 organizations, 2 proxies, TLS + SuperNode auth; "
          f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if cold is not None:
        print(f"stock process start (cold interpreter importing flwr-clientapp, fedveil, torch): {cold:.2f}s")
    print("| mode | executor | median round s | warm/stock | task start s | task run s | protect s | combine s "
          "| finish s | idle CPU/node % (max) | x none (round) | bytes up/round | final accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        stock = by.get((r["mode"], "stock"))
        base = by.get(("none", r["executor"]), r)
        ratio = f"{r['round_s'] / stock['round_s']:.3f}" if stock and r is not stock else "1"
        start = fmt(cold if r["executor"] == "stock" else r["task_start_s"])
        print(f"| {r['mode']} | {r['executor']} | {r['round_s']:.2f} | {ratio} | {start} | {fmt(r['task_run_s'])} | "
              f"{r['protect_s']:.3f} | "
              f"{r['combine_s']:.3f} | {r['finish_s']:.3f} | {r['idle_cpu_pct']:.1f} ({r['idle_cpu_max_pct']:.1f}) | "
              f"{r['round_s'] / base['round_s']:.2f} | {r['bytes'] / 1e6:.3f} MB | {r['accuracy']:.4f} |")


if __name__ == "__main__":
    main()
