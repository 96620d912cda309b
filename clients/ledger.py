"""The durable per-organization privacy ledger.

One SQLite file per organization, one row per charge (dataset fingerprint, run id, task id,
sigma, q, steps, delta, accountant, epsilon after the charge, time). It outlives runs: the
epsilon of a dataset is recomputed from *all* its charges, across runs, with a fresh Opacus
accountant, so budgets compose over the organization's whole history with that data.

Durability: WAL journal with ``synchronous=FULL``, so a committed charge is fsync'd to the
write-ahead log before `charge` returns. The client charges *before* it releases its update
(charge first, then release): a crash after the charge at worst wastes budget, it never
releases an uncharged update. The check-and-insert runs in one ``BEGIN IMMEDIATE``
transaction, so two processes charging the same ledger cannot both slip under the budget.

Idempotency: a charge is keyed by (dataset, run_id, task_id). Retrying the same task (the
server re-sent it, or the client crashed after charging and restarted) returns the recorded
epsilon without charging twice.
"""

from __future__ import annotations

import math
import sqlite3
import time
from collections import OrderedDict
from contextlib import closing
from pathlib import Path

from fedveil.platform.errors import BudgetExhausted, FedveilError

ACCOUNTANTS = ("rdp", "prv")
SCHEMA_VERSION = 1
INTEGER_ALPHAS = [float(a) for a in range(2, 256)]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS charges (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    org           TEXT    NOT NULL,
    dataset       TEXT    NOT NULL,
    run_id        TEXT    NOT NULL,
    task_id       TEXT    NOT NULL,
    sigma         REAL    NOT NULL,
    q             REAL    NOT NULL,
    steps         INTEGER NOT NULL,
    delta         REAL    NOT NULL,
    accountant    TEXT    NOT NULL,
    epsilon_after REAL    NOT NULL,
    budget        REAL,
    ts            REAL    NOT NULL,
    UNIQUE (dataset, run_id, task_id)
);
CREATE INDEX IF NOT EXISTS charges_dataset ON charges (dataset, id);
"""


def compute_epsilon(history, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of a DP-SGD history [(sigma, q, steps), ...] at `delta`, with a fresh Opacus accountant.

    Entries with the same (sigma, q) are merged (composition is commutative, so this is exact
    and keeps PRV fast over long histories). An empty history costs 0; sigma <= 0 costs inf.
    """
    if accountant not in ACCOUNTANTS:
        raise FedveilError(f"Unknown privacy accountant {accountant!r}.", f"Use one of {', '.join(ACCOUNTANTS)}.")
    merged: "OrderedDict[tuple[float, float], int]" = OrderedDict()
    for sigma, q, steps in history:
        if steps <= 0 or q <= 0:
            continue
        if sigma <= 0:
            return math.inf
        key = (float(sigma), float(q))
        merged[key] = merged.get(key, 0) + int(steps)
    if not merged:
        return 0.0
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
    else:
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
    acc.history = [(s, q, n) for (s, q), n in merged.items()]
    if accountant == "rdp" and any(q > 0.5 for (_, q) in merged):
        # Opacus' fractional-order RDP bound fails (math domain error) for q > 0.5; integer
        # orders are valid for every q (a slightly looser, still correct, bound).
        return float(acc.get_epsilon(delta=delta, alphas=INTEGER_ALPHAS))
    return float(acc.get_epsilon(delta=delta))


class PrivacyLedger:
    """Durable privacy ledger of one organization (SQLite file at `path`)."""

    def __init__(self, path: str | Path, org: str):
        self.path = Path(path).expanduser()
        self.org = str(org)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as con:
                con.executescript(_SCHEMA)
                con.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                con.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('org', ?)", (self.org,))
                row = con.execute("SELECT value FROM meta WHERE key='org'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise FedveilError(
                f"Privacy ledger {str(self.path)!r} is not a readable SQLite ledger ({exc}).",
                "Restore it from backup; never delete a ledger to reset a budget (that would void the privacy guarantee).",
            ) from exc
        if row and row[0] != self.org:
            raise FedveilError(
                f"Privacy ledger {str(self.path)!r} belongs to organization {row[0]!r}, not {self.org!r}.",
                "Point each organization at its own ledger file.",
            )

    # ------------------------------------------------------------------ internals
    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=FULL")
        con.execute("PRAGMA foreign_keys=ON")
        return con

    @staticmethod
    def _history(con: sqlite3.Connection, dataset: str) -> list[tuple[float, float, int]]:
        return [tuple(r) for r in con.execute("SELECT sigma, q, steps FROM charges WHERE dataset=? ORDER BY id", (dataset,))]

    @staticmethod
    def _check(sigma: float, q: float, steps: int, delta: float, accountant: str) -> None:
        if accountant not in ACCOUNTANTS:
            raise FedveilError(f"Unknown privacy accountant {accountant!r}.", f"Use one of {', '.join(ACCOUNTANTS)}.")
        if not (0.0 < q <= 1.0):
            raise FedveilError(f"Sample rate q={q} is not in (0, 1].", "q is batch_size / number of training samples.")
        if steps < 0 or int(steps) != steps:
            raise FedveilError(f"Step count {steps} is not a non-negative integer.", "Pass the number of DP-SGD steps taken.")
        if not (0.0 < delta < 1.0):
            raise FedveilError(f"delta={delta} is not in (0, 1).", "Use a delta well below 1/n, e.g. 1e-5.")
        if not (sigma >= 0.0 and math.isfinite(sigma)):
            raise FedveilError(f"Noise multiplier sigma={sigma} is invalid.", "Use a finite sigma >= 0.")

    # ------------------------------------------------------------------ queries
    def epsilon(self, dataset: str, delta: float, accountant: str = "rdp") -> float:
        """Epsilon spent on `dataset` so far, over every run, at `delta`."""
        with closing(self._connect()) as con:
            hist = self._history(con, dataset)
        return compute_epsilon(hist, delta, accountant)

    def preview(self, dataset: str, sigma: float, q: float, steps: int, delta: float, accountant: str = "rdp") -> float:
        """Epsilon on `dataset` if a charge of (sigma, q, steps) were added now."""
        self._check(sigma, q, steps, delta, accountant)
        with closing(self._connect()) as con:
            hist = self._history(con, dataset)
        return compute_epsilon(hist + [(sigma, q, int(steps))], delta, accountant)

    def history(self, dataset: str) -> list[dict]:
        with closing(self._connect()) as con:
            con.row_factory = sqlite3.Row
            rows = con.execute("SELECT * FROM charges WHERE dataset=? ORDER BY id", (dataset,)).fetchall()
        return [dict(r) for r in rows]

    def datasets(self) -> list[str]:
        with closing(self._connect()) as con:
            return [r[0] for r in con.execute("SELECT DISTINCT dataset FROM charges ORDER BY dataset")]

    def remaining(self, dataset: str, delta: float, budget: float, accountant: str = "rdp") -> float:
        return max(0.0, budget - self.epsilon(dataset, delta, accountant))

    # ------------------------------------------------------------------ the charge
    def charge(
        self,
        dataset: str,
        run_id: str,
        task_id: str,
        sigma: float,
        q: float,
        steps: int,
        delta: float,
        budget: float,
        accountant: str = "rdp",
    ) -> float:
        """Charge one round's DP-SGD cost; return epsilon after it. Durable before it returns.

        Raises BudgetExhausted, charging nothing, if the charge would take the dataset's
        epsilon above `budget`. A second call with the same (run_id, task_id) is a retry:
        it returns the recorded epsilon and charges nothing.
        """
        self._check(sigma, q, steps, delta, accountant)
        run_id, task_id = str(run_id), str(task_id)
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")  # serializes concurrent chargers of this ledger
            try:
                prior = con.execute(
                    "SELECT sigma, q, steps, epsilon_after FROM charges WHERE dataset=? AND run_id=? AND task_id=?",
                    (dataset, run_id, task_id),
                ).fetchone()
                if prior is not None:
                    con.execute("ROLLBACK")
                    if (abs(prior[0] - sigma) > 1e-12 or abs(prior[1] - q) > 1e-12 or prior[2] != int(steps)):
                        raise FedveilError(
                            f"Task {task_id!r} of run {run_id!r} was already charged with (sigma={prior[0]}, q={prior[1]}, "
                            f"steps={prior[2]}), and is now charged with (sigma={sigma}, q={q}, steps={steps}).",
                            "A retried task must repeat the same training; use a new task id for new work.",
                        )
                    return float(prior[3])
                hist = self._history(con, dataset)
                spent = compute_epsilon(hist, delta, accountant)
                after = compute_epsilon(hist + [(sigma, q, int(steps))], delta, accountant)
                if after > budget * (1 + 1e-9):
                    con.execute("ROLLBACK")
                    raise BudgetExhausted(
                        f"Privacy budget exhausted for organization {self.org!r} on dataset {dataset}: "
                        f"spent epsilon={spent:.4g}, this round would cost {after - spent:.4g} more "
                        f"(epsilon {after:.4g}) against a budget of {budget:.4g} (delta={delta:g}, {accountant}).",
                        "Raise the privacy budget in the organization's config if policy allows, train on new data "
                        "(a new dataset has its own budget), or use more noise (higher sigma / lower target epsilon), "
                        "fewer local steps or a smaller batch for the remaining rounds.",
                    )
                con.execute(
                    "INSERT INTO charges (org, dataset, run_id, task_id, sigma, q, steps, delta, accountant, "
                    "epsilon_after, budget, ts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (self.org, dataset, run_id, task_id, float(sigma), float(q), int(steps), float(delta),
                     accountant, float(after), float(budget), time.time()),
                )
                con.execute("COMMIT")  # WAL + synchronous=FULL: fsync'd before this returns
                return float(after)
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        finally:
            con.close()
