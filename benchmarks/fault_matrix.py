"""The fault matrix: role x fault x phase on a real local federation, measured from the store and the ledgers.

    python benchmarks/fault_matrix.py [--cells CELL ...] [--rounds 3] [--fault-round 2]
                                      [--round-timeout 20] [--pause-seconds 10] [--out FILE]

Every cell starts its own federation exactly as `fedveil demo` does (platform/federation.py
`LocalFederation`: a TLS SuperLink with SuperNode authentication on loopback, one SuperNode per proxy
and per organization, the warm executor), with the demo's defaults: replicated-sharing over 4
proxies with quorum commit, 3 organizations, breast_cancer, the small MLP, DP-SGD. It submits one
run, injects ONE fault into ONE role in round `--fault-round`, follows the run to its end, stops the
federation the way the demo does (`ProcessGroup.stop_all`) and measures.

Cells are `ROLE:FAULT:PHASE` (or `baseline`, no fault; `all` is all 25; the default is the 16 in
DEFAULT_CELLS, ~21 min on 2 busy cores; results and notes in docs/reliability.md "Fault matrix"):

- roles: `server` (the SuperLink; its executor and the ServerApp are its tree), `proxy` (proxy-2's
  SuperNode), `client` (hospital-b's SuperNode);
- faults: `kill9` (SIGKILL to the role's main process, the one the federation started: what an
  operator's `kill -9` or the OOM killer does; its children are left to notice on their own),
  `sigterm` (SIGTERM to the same process: a polite stop), `restart` (SIGKILL, then the same
  command started again 2 s later, and again with `fedveil client`'s backoff while the SuperLink
  refuses it (exit 305); for the server the whole tree is killed, as when its host or
  container restarts, then the SuperLink starts on the same port and database and the run is
  resubmitted with `resume`, which is what `fedveil server --resume` does), `pause`
  (SIGSTOP to every process of the role's tree for `--pause-seconds`, then SIGCONT: a network
  partition or a frozen VM, as the other parties see it);
- phases: `train` (the round's train tasks were delivered to the clients, which are training) and
  `proxy` (the round's `query.validate` tasks were sent to the proxies; commit and aggregate follow).

How the phase is found: the SuperLink's own database (`superlink.db`, Flower's `message_ins` table)
holds every task message from the moment the ServerApp pushes it until its reply is pulled. The
script polls it every 0.1 s and fires when a message of the wanted type and round (`group_id`) is
there (`train`: once at least one train task of the round was delivered, plus `--train-delay`).
What was outstanding at the moment of the fault is recorded with the cell (`at_fault`).

Per cell: did the run complete; rounds aggregated / skipped / never recorded; ledger charges (from
each organization's `privacy-ledger.db`) for a round that produced no aggregate (`charged_lost`);
how long the demo's stop took and whether any process whose command line names the cell's work dir
was still alive 15 s after the run ended (`left`), and what was left of the victim's own process
tree 15 s after the fault (`orphans`); the events of the run by kind; and files in logs/ that hold
a Python traceback. JSON goes to --out or $FEDVEIL_BENCH_OUT; a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from fedveil.platform import config as config_mod
from fedveil.platform import launcher, proctree
from fedveil.platform.federation import LocalFederation, demo_orgs
from fedveil.platform.provision import init_federation_keys
from fedveil.platform.store import MetricsStore

ROLES = {"server": "superlink", "proxy": "proxy-proxy-2", "client": "client-hospital-b"}
FAULTS = ("kill9", "sigterm", "restart", "pause")
PHASES = ("train", "proxy")
ALL_CELLS = ["baseline"] + [f"{r}:{f}:{p}" for r in ROLES for f in FAULTS for p in PHASES]
# The default: 16 of the 25 cells, ~20 min on 2 busy cores. Left out: a server paused in the proxy phase
# (the same frozen coordinator as in train), SIGTERM in the phase where the role is idle (as kill9 there),
# and restart/pause of a proxy in train (it is idle then; the proxy phase is where it matters).
DEFAULT_CELLS = ["baseline",
                 "server:kill9:proxy", "server:sigterm:proxy", "server:restart:train", "server:restart:proxy",
                 "server:pause:train",
                 "proxy:kill9:train", "proxy:kill9:proxy", "proxy:sigterm:proxy", "proxy:restart:proxy",
                 "proxy:pause:proxy",
                 "client:kill9:train", "client:kill9:proxy", "client:sigterm:train", "client:restart:train",
                 "client:pause:train"]
PROXIES = ["proxy-1", "proxy-2", "proxy-3", "proxy-4"]
ORGS = 3
EXIT_LIMIT_S = 15.0


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def demo_config(rounds: int, round_timeout: float, hidden: list[int]) -> config_mod.FedveilConfig:
    """The demo's defaults (platform/cli.py cmd_demo without a config file), fewer rounds, a shorter deadline."""
    cfg = config_mod.FedveilConfig()
    return config_mod.with_overrides(cfg, {
        "federation.rounds": rounds, "federation.secure": "replicated-sharing", "federation.mode": "sync",
        "federation.round_timeout": round_timeout, "data.source": "breast_cancer", "model.hidden": hidden,
        "proxies.names": PROXIES, "policy.allow_secure": sorted({*cfg.policy.allow_secure, "replicated-sharing"}),
        "orgs": [o.model_dump(exclude_none=True) for o in demo_orgs(ORGS)],
    })


# ---- where the round is: Flower's own task table --------------------------------------------------
def outstanding(db: Path) -> list[tuple[str, str, bool]]:
    """(message type, group id = round, delivered) of every task message the SuperLink holds now."""
    if not db.exists():
        return []
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)
        try:
            rows = con.execute("SELECT message_type, group_id, delivered_at FROM message_ins").fetchall()
        finally:
            con.close()
    except sqlite3.Error:
        return []
    return [(str(t), str(g), bool(d)) for t, g, d in rows]


def phase_reached(rows: list[tuple[str, str, bool]], phase: str, rnd: int) -> bool:
    if phase == "train":
        return any(t == "train" and g == str(rnd) and d for t, g, d in rows)
    return any(t == "query.validate" and g == str(rnd) for t, g, d in rows)


def summarize(rows: list[tuple[str, str, bool]]) -> str:
    counts = Counter(f"{t}@{g}" + ("" if d else "(queued)") for t, g, d in rows)
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) or "nothing"


# ---- processes ------------------------------------------------------------------------------------
def tree_of(pid: int) -> dict[int, int]:
    table = proctree.proc_table()
    found = proctree.descendants([pid], table)
    if pid in table:
        found[pid] = table[pid].start
    return found


def signal_all(pids: dict[int, int], sig: int) -> None:
    for pid in proctree.alive(pids):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def short(cmd: str) -> str:
    for name in ("flwr-serverapp", "flower-superexec", "flower-superlink", "flwr-clientapp", "flower-supernode",
                 "warm_executor supernode", "warm_executor", "fedveil.platform.proctree"):
        if name in cmd:
            return name
    return cmd[:60]


def processes_naming(text: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `text` (our work dir), except ourselves."""
    table = proctree.proc_table()
    own = os.getpid()
    return [pid for pid, info in table.items() if pid != own and not info.zombie and text in cmdline(pid)]


class Cell:
    def __init__(self, name: str, root: Path, keys: Path, args: argparse.Namespace):
        self.name, self.args = name, args
        self.role, self.fault, self.phase = (name.split(":") + [None, None])[:3] if name != "baseline" else (None,) * 3
        self.cfg = demo_config(args.rounds, args.round_timeout, args.hidden)
        self.workdir = root / name.replace(":", "-")
        self.keys = keys
        self.run_name = f"fault-{name.replace(':', '-')}"
        self.result: dict[str, Any] = {"cell": name, "role": self.role, "fault": self.fault, "phase": self.phase}

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        shutil.rmtree(self.workdir, ignore_errors=True)  # --keep reuses a root: a cell starts from nothing
        fed = LocalFederation(self.cfg, self.workdir, keys_dir=self.keys, progress=lambda _: None,
                              persist_superlink=True)  # phases are read from superlink.db; restarts reuse it
        self.fed = fed
        started = time.monotonic()
        victim_tree: dict[int, int] = {}
        fault_at = None
        end_reason = ""
        try:
            fed.start()
            fed.submit(self.run_name)
            db = self.workdir / "superlink.db"
            deadline = time.monotonic() + self.args.cell_timeout
            fired = self.role is None
            while True:
                now = time.monotonic()
                if not fired:
                    rows = outstanding(db)
                    if phase_reached(rows, self.phase, self.args.fault_round):
                        if self.phase == "train" and self.args.train_delay > 0:
                            time.sleep(self.args.train_delay)
                            rows = outstanding(db)
                        self.result["at_fault"] = summarize(rows)
                        fault_at = self.fault_at = time.monotonic()
                        self.result["fault_at_s"] = round(fault_at - started, 1)
                        victim_tree = self.inject()
                        fired = True
                        deadline = time.monotonic() + self.args.cell_timeout
                        continue
                self.retry_restart()
                status = self.run_status()
                if status not in ("running", None):
                    end_reason = f"run {status}"
                    break
                if fault_at is not None and not self.superlink_alive() and self.fault != "restart" \
                        and time.monotonic() - fault_at > self.args.dead_server_wait:
                    end_reason = f"SuperLink down for {self.args.dead_server_wait:.0f}s; run left `{status}`"
                    break
                if now > deadline:
                    end_reason = f"gave up after {self.args.cell_timeout:.0f}s (run still `{status}`)"
                    break
                if fired and self.role is not None and "orphans" not in self.result and fault_at is not None \
                        and time.monotonic() - fault_at >= EXIT_LIMIT_S:
                    self.check_orphans(victim_tree)
                time.sleep(0.1 if not fired else 0.5)
            if fired and self.role is not None and "orphans" not in self.result:
                left = EXIT_LIMIT_S - (time.monotonic() - (fault_at or time.monotonic()))
                if left > 0:
                    time.sleep(left)
                self.check_orphans(victim_tree)
        except Exception as exc:  # noqa: BLE001 - a cell that cannot even start is a result too
            end_reason = f"harness: {type(exc).__name__}: {exc}"
        finally:
            ended = time.monotonic()
            fed.stop()
            self.result["stop_s"] = round(time.monotonic() - ended, 1)
            self.result["run_s"] = round(ended - started, 1)
            self.check_left(ended)
        self.result["end"] = end_reason
        self.measure()
        return self.result

    def superlink_alive(self) -> bool:
        return any(name == "superlink" and p.poll() is None for name, p in self.fed.processes.procs)

    def run_status(self) -> str | None:
        store = MetricsStore(self.fed.store_url)
        try:
            run = store.get_run(self.run_name)
        finally:
            store.close()
        return None if run is None else str(run["status"])

    def main_process(self) -> subprocess.Popen:
        label = ROLES[self.role]
        return [p for name, p in self.fed.processes.procs if name == label and p.poll() is None][-1]

    # -- the fault ----------------------------------------------------------------------------------
    def inject(self) -> dict[int, int]:
        proc = self.main_process()
        tree = tree_of(proc.pid)
        self.result["victim_tree"] = sorted(Counter(short(cmdline(p)) for p in tree).items())
        log(f"  {self.name}: fault at {self.result['fault_at_s']}s, outstanding: {self.result['at_fault']}")
        if self.fault == "kill9":
            os.kill(proc.pid, signal.SIGKILL)
        elif self.fault == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)
        elif self.fault == "pause":
            signal_all(tree, signal.SIGSTOP)
            time.sleep(self.args.pause_seconds)
            signal_all(tree, signal.SIGCONT)
        elif self.fault == "restart":
            # The server's host or container restarts: its whole tree dies (a lone SuperLink kill leaves the
            # ServerApp running, which would then reconnect next to the resumed one; see docs/reliability.md).
            signal_all(tree if self.role == "server" else {proc.pid: tree[proc.pid]}, signal.SIGKILL)
            proc.wait(timeout=10)
            time.sleep(2.0)
            self.restart(proc)
        return tree

    def restart(self, old: subprocess.Popen) -> None:
        label = ROLES[self.role]
        new = self.fed.processes.start(label, list(old.args), self.fed.env)
        if self.role != "server":
            self.restarted = {"argv": list(old.args), "proc": new, "attempt": 0, "at": time.monotonic()}
            self.result["restart_attempts"] = 1
            return
        self.fed.superlink = new
        port = int(self.fed.address.rsplit(":", 1)[1])
        launcher.wait_for_port("127.0.0.1", port, 60, new, "flower-superlink")
        self.fed.submit(self.run_name, resume=True)  # what `fedveil server --resume` does
        self.result["resubmitted"] = True

    def retry_restart(self) -> None:
        """A restarted SuperNode with the same key is refused (Flower: 'could not be activated', exit 305) while
        the SuperLink still counts its predecessor as alive; `fedveil client`/`proxy` retry that with backoff
        until --connect-timeout (platform/cli.py `_start_supernode`), so the harness does the same."""
        info = getattr(self, "restarted", None)
        if info is None or info["proc"].poll() is None:
            if info is not None and "rejoined_s" not in self.result and time.monotonic() - info["at"] > 10:
                self.result["rejoined_s"] = round(info["at"] - self.fault_at, 1)  # alive 10 s: it was admitted
            return
        if time.monotonic() - self.fault_at > self.args.cell_timeout or \
                time.monotonic() - info["at"] < launcher.backoff(info["attempt"]):
            return
        info["attempt"] += 1
        info["proc"] = self.fed.processes.start(ROLES[self.role], info["argv"], self.fed.env)
        info["at"] = time.monotonic()
        self.result["restart_attempts"] = info["attempt"] + 1

    def check_orphans(self, tree: dict[int, int]) -> None:
        """What is left of the victim's process tree 15 s after the fault (a paused one was resumed)."""
        if self.fault == "pause":
            self.result["orphans"] = []
            return
        left = proctree.alive(tree)
        self.result["orphans"] = [short(cmdline(p)) for p in sorted(left)]

    def check_left(self, ended: float) -> None:
        """Any process naming the work dir still alive 15 s after the run ended; those are stopped here."""
        while time.monotonic() - ended < EXIT_LIMIT_S:
            if not processes_naming(str(self.workdir)):
                break
            time.sleep(0.5)
        left = processes_naming(str(self.workdir))
        self.result["left"] = [short(cmdline(p)) for p in left]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # -- the outcome --------------------------------------------------------------------------------
    def measure(self) -> None:
        store = MetricsStore(self.fed.store_url)
        try:
            run = store.get_run(self.run_name)
            rounds = store.rounds(self.run_name) if run else []
            events = store.events(self.run_name, limit=10000) if run else []
        finally:
            store.close()
        self.result["status"] = None if run is None else run["status"]
        self.result["message"] = "" if run is None else (run.get("message") or "")[:200]
        aggregated = sorted(r["round"] for r in rounds if r["participants"] > 0)
        skipped = sorted(r["round"] for r in rounds if r["participants"] == 0)
        self.result["aggregated"], self.result["skipped"] = aggregated, skipped
        self.result["missing"] = [r for r in range(1, self.args.rounds + 1) if r not in aggregated + skipped]
        self.result["participants"] = {r["round"]: r["participants"] for r in rounds}
        self.result["events"] = dict(Counter(e["kind"] for e in events))
        self.result["event_notes"] = [f"[{e['kind']}] {e['message'][:160]}" for e in events
                                      if e["level"] in ("warn", "error") and e["kind"] != "insecure"][:12]
        charges: dict[str, list[int]] = {}
        for org in self.cfg.orgs:
            charges[org.name] = self.ledger_rounds(self.workdir / "orgs" / org.name / "privacy-ledger.db")
        self.result["charges"] = charges
        self.result["charged_lost"] = sorted(f"{org}@{r}" for org, rs in charges.items() for r in rs
                                             if r not in aggregated)
        self.result["tracebacks"] = self.tracebacks()

    def ledger_rounds(self, path: Path) -> list[int]:
        if not path.exists():
            return []
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = con.execute("SELECT task_id FROM charges WHERE run_id = ?", (self.run_name,)).fetchall()
        finally:
            con.close()
        found = []
        for (task_id,) in rows:
            m = re.search(r":round-(\d+)$", task_id)
            found.append(int(m.group(1)) if m else -1)
        return sorted(found)

    def tracebacks(self) -> dict[str, str]:
        """logs/*.log that hold a Python traceback: the exception line after the last one."""
        found = {}
        for path in sorted((self.workdir / "logs").glob("*.log")):
            text = path.read_text(errors="replace")
            if "Traceback (most recent call last)" not in text:
                continue
            tail = text.rsplit("Traceback (most recent call last)", 1)[1].splitlines()
            last = next((ln.strip() for ln in tail[1:] if ln and not ln.startswith((" ", "\t"))), "?")
            found[path.stem] = f"{text.count('Traceback (most recent call last)')}x, last: {last[:160]}"
        return found


def verdict(r: dict[str, Any], rounds: int) -> str:
    ok = (r.get("status") == "completed" and not r.get("charged_lost") and not r.get("left")
          and not r.get("orphans"))
    return "ok" if ok else "FAIL"


def table(results: list[dict[str, Any]], rounds: int) -> str:
    lines = ["| role | fault | phase | run | rounds aggregated / skipped / missing; clients per round "
             "| charged ε for a round without aggregate | victim's tree 15 s after "
             "| left 15 s after the run (stop s) | events | tracebacks in logs | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        agg = f"{len(r.get('aggregated', []))} / {len(r.get('skipped', []))} / {len(r.get('missing', []))}"
        parts = r.get("participants") or {}
        if parts:
            agg += "; clients " + ",".join(str(parts.get(k, parts.get(str(k), "-"))) for k in range(1, rounds + 1))
        lost = ", ".join(r.get("charged_lost") or []) or "none"
        orphans = "-" if r.get("role") is None else (", ".join(r.get("orphans") or []) or "none")
        left = (", ".join(r.get("left") or []) or "none") + f" ({r.get('stop_s', '?')})"
        ev = ", ".join(f"{k} {v}" for k, v in sorted(r.get("events", {}).items()) if k not in ("info", "insecure"))
        tb = ", ".join(sorted(r.get("tracebacks", {}))) or "none"
        run = str(r.get("status"))
        if r.get("restart_attempts"):
            run += f" ({r['restart_attempts']} starts" + (f", admitted {r['rejoined_s']} s after the kill)"
                                                          if "rejoined_s" in r else ", never admitted)")
        lines.append(f"| {r.get('role') or 'baseline'} | {r.get('fault') or '-'} | {r.get('phase') or '-'} | "
                     f"{run} | {agg} | {lost} | {orphans} | {left} | {ev or '-'} | {tb} | "
                     f"{verdict(r, rounds)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=DEFAULT_CELLS,
                        help="`all`, baseline and/or ROLE:FAULT:PHASE; ROLE:FAULT or ROLE expands over the rest "
                             "(default: 16 cells, see DEFAULT_CELLS)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fault-round", type=int, default=2)
    parser.add_argument("--round-timeout", type=float, default=20.0,
                        help="federation.round_timeout: how long a round waits for a dead node (demo: 300)")
    parser.add_argument("--pause-seconds", type=float, default=10.0, help="shorter than --round-timeout: a blip")
    parser.add_argument("--train-delay", type=float, default=0.3, help="s after the first train task is delivered")
    parser.add_argument("--cell-timeout", type=float, default=240.0, help="give up on a run this long after the fault")
    parser.add_argument("--dead-server-wait", type=float, default=45.0,
                        help="with the SuperLink dead (and not restarted), wait this long for the run to end")
    parser.add_argument("--hidden", type=int, nargs="+", default=[64])
    parser.add_argument("--out", default=os.environ.get("FEDVEIL_BENCH_OUT"))
    parser.add_argument("--keep", help="keep the work dirs under this directory (default: a temp dir, removed)")
    args = parser.parse_args()
    cells = []
    for spec in args.cells:
        parts = spec.split(":")
        if spec == "all":
            cells += ALL_CELLS
            continue
        if spec == "baseline":
            cells.append(spec)
            continue
        if parts[0] not in ROLES or len(parts) > 3 or (len(parts) > 1 and parts[1] not in FAULTS) \
                or (len(parts) > 2 and parts[2] not in PHASES):
            parser.error(f"unknown cell {spec!r}: use baseline or ROLE[:FAULT[:PHASE]] with ROLE in {list(ROLES)}, "
                         f"FAULT in {list(FAULTS)}, PHASE in {list(PHASES)}")
        cells += [c for c in ALL_CELLS if c.split(":")[:len(parts)] == parts]
    os.environ.setdefault(launcher.EXECUTOR_ENV, "warm")
    results = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedveil-faults-") as tmp:
        root = Path(args.keep).resolve() if args.keep else Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        keys = init_federation_keys(root / "keys", PROXIES, [o.name for o in demo_orgs(ORGS)], ckks=False,
                                    overwrite=True)
        for name in cells:
            t = time.monotonic()
            log(f"cell {name} ...")
            results.append(Cell(name, root, keys, args).run())
            r = results[-1]
            log(f"  {name}: {r.get('status')} aggregated {r.get('aggregated')} skipped {r.get('skipped')} "
                f"charged_lost {r.get('charged_lost')} orphans {r.get('orphans')} left {r.get('left')} "
                f"({time.monotonic() - t:.0f}s; {r.get('end')})")
    total = time.monotonic() - started
    header = (f"{len(results)} cells, {args.rounds} rounds each, fault in round {args.fault_round}; "
              f"replicated-sharing over {len(PROXIES)} proxies (quorum commit), {ORGS} organizations, breast_cancer, "
              f"MLP hidden={args.hidden}, round_timeout {args.round_timeout:.0f}s, pause {args.pause_seconds:.0f}s; "
              f"{total / 60:.1f} min on {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    print(header)
    print(table(results, args.rounds))
    if args.out:
        Path(args.out).write_text(json.dumps({"header": header, "args": vars(args), "cells": results}, indent=1,
                                             default=str))
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
