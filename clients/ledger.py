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

Retries: the charge and the protected reply it pays for (sealed blobs and released metrics) are
written in ONE transaction (`commit_release`), before anything is released. A task the server
re-sends under the same (run_id, task_id) is answered with exactly those stored bytes, without
training again (`stored_reply`): a fresh noisy release for the same charge would let the server
average k resends and cut the noise variance by k for free. Anything else is new work, charged
again. Only the blobs of the `REPLY_KEEP` most recent replies are kept; a resend of an older task
cannot be answered byte for byte, so it is declined (never trained and released twice).
"""

from __future__ import annotations

import functools
import json
import math
import sqlite3
import time
from collections import OrderedDict
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fedveil.platform.errors import BudgetExhausted, FedveilError

ACCOUNTANTS = ("rdp", "prv")
SCHEMA_VERSION = 2
REPLY_KEEP = 16  # replies whose blobs are kept for byte-identical retries (older ones keep only their record)
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
CREATE TABLE IF NOT EXISTS replies (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id    TEXT    NOT NULL,
    task_id   TEXT    NOT NULL,
    dataset   TEXT    NOT NULL,
    status    TEXT    NOT NULL,
    info      TEXT    NOT NULL,
    metrics   TEXT    NOT NULL,
    local     TEXT    NOT NULL DEFAULT '{}',
    pruned    INTEGER NOT NULL DEFAULT 0,
    ts        REAL    NOT NULL,
    UNIQUE (run_id, task_id)
);
CREATE TABLE IF NOT EXISTS reply_blobs (
    reply_id  INTEGER NOT NULL REFERENCES replies (id) ON DELETE CASCADE,
    name      TEXT    NOT NULL,
    data      BLOB    NOT NULL,
    PRIMARY KEY (reply_id, name)
);
"""


@dataclass(frozen=True)
class Charge:
    """One round's DP-SGD cost: Opacus' history entry (sigma, q, steps), accounted at `delta`."""

    sigma: float
    q: float
    steps: int
    delta: float
    budget: float
    accountant: str = "rdp"


@dataclass(frozen=True)
class StoredReply:
    """What a train task released, byte for byte: status, info, metrics, the protected blobs.

    `local` holds values that are logged on the organization's side only and never released
    (e.g. the training loss, which is not covered by DP).
    """

    status: str
    info: dict
    metrics: dict[str, float]
    blobs: dict[str, bytes]
    local: dict[str, float] = field(default_factory=dict)
    pruned: bool = False


class TaskAlreadyAnswered(FedveilError):
    """The task was answered before, and its reply can no longer be resent byte for byte."""


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
        return _rdp_epsilon(merged, delta)
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(s, q, n) for (s, q), n in merged.items()]
    return float(acc.get_epsilon(delta=delta))


def _rdp_epsilon(merged: "OrderedDict[tuple[float, float], int]", delta: float) -> float:
    """What Opacus' RDPAccountant.get_epsilon computes, with each (sigma, q) curve computed once per process.

    RDP composes linearly in steps, so a history costs sum(steps * curve(sigma, q)); a train task asks
    for the spent, previewed and committed ε of the same history, and each curve over 254 integer
    orders takes ~0.1 s of pure Python in Opacus.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    # Opacus' fractional-order RDP bound fails (math domain error) for q > 0.5; integer orders are
    # valid for every q (a slightly looser, still correct, bound).
    orders = tuple(INTEGER_ALPHAS if any(q > 0.5 for (_, q) in merged) else RDPAccountant.DEFAULT_ALPHAS)
    rdp = sum(steps * _rdp_curve(q, sigma, orders) for (sigma, q), steps in merged.items())
    eps, _ = rdp_analysis.get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=64)
def _rdp_curve(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one subsampled Gaussian step at each order (Opacus' analysis)."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    curve = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders))
    curve = np.asarray(curve, dtype=float)
    curve.setflags(write=False)
    return curve


class PrivacyLedger:
    """Durable privacy ledger of one organization (SQLite file at `path`)."""

    def __init__(self, path: str | Path, org: str):
        self.path = Path(path).expanduser()
        self.org = str(org)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with closing(self._connect()) as con:
                con.executescript(_SCHEMA)
                con.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?) ON CONFLICT(key) DO UPDATE "
                            "SET value=excluded.value WHERE CAST(value AS INTEGER) < CAST(excluded.value AS INTEGER)",
                            (str(SCHEMA_VERSION),))
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

    def run_epsilon(self, dataset: str, run_id: str, delta: float, accountant: str = "rdp",
                    extra: tuple[float, float, int] | None = None) -> float:
        """Epsilon spent on `dataset` by run `run_id` alone (plus `extra`, a charge not yet made)."""
        with closing(self._connect()) as con:
            hist = [tuple(r) for r in con.execute(
                "SELECT sigma, q, steps FROM charges WHERE dataset=? AND run_id=? ORDER BY id", (dataset, str(run_id)))]
        return compute_epsilon(hist + ([extra] if extra else []), delta, accountant)

    # ------------------------------------------------------------------ stored replies
    def stored_reply(self, run_id: str, task_id: str) -> StoredReply | None:
        """The reply released for (run_id, task_id), or None if this task was never answered.

        Raises TaskAlreadyAnswered when the task was charged (or answered) but its blobs are gone
        (pruned, or charged by a ledger from before replies were stored): it must not be trained
        and released a second time.
        """
        run_id, task_id = str(run_id), str(task_id)
        with closing(self._connect()) as con:
            row = con.execute("SELECT id, status, info, metrics, local, pruned FROM replies WHERE run_id=? AND task_id=?",
                              (run_id, task_id)).fetchone()
            charged = con.execute("SELECT 1 FROM charges WHERE run_id=? AND task_id=?", (run_id, task_id)).fetchone()
            blobs = {} if row is None else {
                n: bytes(d) for n, d in con.execute("SELECT name, data FROM reply_blobs WHERE reply_id=?", (row[0],))}
        if row is None and charged is None:
            return None
        if row is None or row[5]:
            raise TaskAlreadyAnswered(
                f"task {task_id!r} of run {run_id!r} was already answered and charged, and its reply is no longer "
                f"stored (only the {REPLY_KEEP} most recent are), so it cannot be resent byte for byte",
                "the server must send new work under a new task id; this organization never trains the same task twice",
            )
        return StoredReply(row[1], json.loads(row[2]), json.loads(row[3]), blobs, json.loads(row[4]))

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
        """Charge one round's DP-SGD cost with nothing to store; return epsilon after it.

        `commit_release` with an empty reply. A second charge of the same (run_id, task_id)
        charges nothing and returns the epsilon recorded by the first: a task is charged once.
        """
        reply = self.commit_release(dataset, run_id, task_id, Charge(sigma, q, int(steps), delta, budget, accountant),
                                    StoredReply("ok", {}, {}, {}))
        return float(reply.metrics["epsilon"])

    def commit_release(self, dataset: str, run_id: str, task_id: str, charge: Charge | None,
                       reply: StoredReply) -> StoredReply:
        """Charge `charge` (None: DP off, nothing to charge) and store `reply` in one durable transaction.

        Returns the reply to release, with `metrics["epsilon"]` set to the epsilon after the
        charge. If (run_id, task_id) was answered before (a concurrent delivery of the same task
        won the race), that stored reply is returned and nothing is charged: the caller must
        release what this returns, never its own `reply`. Raises BudgetExhausted, charging and
        storing nothing, if the charge would take the dataset's epsilon above its budget.
        """
        if charge is not None:
            self._check(charge.sigma, charge.q, charge.steps, charge.delta, charge.accountant)
        run_id, task_id = str(run_id), str(task_id)
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")  # serializes concurrent chargers of this ledger
            try:
                answered = con.execute("SELECT 1 FROM replies WHERE run_id=? AND task_id=?", (run_id, task_id)).fetchone()
                charged = con.execute("SELECT 1 FROM charges WHERE run_id=? AND task_id=?", (run_id, task_id)).fetchone()
                if answered or charged:
                    con.execute("ROLLBACK")
                    prior = self.stored_reply(run_id, task_id)
                    assert prior is not None  # stored_reply raises when there is no reply to resend
                    return prior
                hist = self._history(con, dataset)
                after = compute_epsilon(hist, charge.delta, charge.accountant) if charge else 0.0
                if charge is not None:
                    spent = after
                    after = compute_epsilon(hist + [(charge.sigma, charge.q, int(charge.steps))], charge.delta,
                                            charge.accountant)
                    if after > charge.budget * (1 + 1e-9):
                        con.execute("ROLLBACK")
                        raise BudgetExhausted(
                            f"Privacy budget exhausted for organization {self.org!r} on dataset {dataset}: "
                            f"spent epsilon={spent:.4g}, this round would cost {after - spent:.4g} more "
                            f"(epsilon {after:.4g}) against a budget of {charge.budget:.4g} (delta={charge.delta:g}, "
                            f"{charge.accountant}).",
                            "Raise the privacy budget in the organization's config if policy allows, train on new data "
                            "(a new dataset has its own budget), or use more noise (higher sigma / lower target "
                            "epsilon), fewer local steps or a smaller batch for the remaining rounds.",
                        )
                    con.execute(
                        "INSERT INTO charges (org, dataset, run_id, task_id, sigma, q, steps, delta, accountant, "
                        "epsilon_after, budget, ts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                        (self.org, dataset, run_id, task_id, float(charge.sigma), float(charge.q), int(charge.steps),
                         float(charge.delta), charge.accountant, float(after), float(charge.budget), time.time()),
                    )
                final = replace(reply, metrics={**reply.metrics, "epsilon": float(after)})
                cur = con.execute(
                    "INSERT INTO replies (run_id, task_id, dataset, status, info, metrics, local, ts) "
                    "VALUES (?,?,?,?,?,?,?,?)",
                    (run_id, task_id, dataset, final.status, json.dumps(final.info), json.dumps(final.metrics),
                     json.dumps(final.local), time.time()),
                )
                con.executemany("INSERT INTO reply_blobs (reply_id, name, data) VALUES (?,?,?)",
                                [(cur.lastrowid, n, sqlite3.Binary(b)) for n, b in final.blobs.items()])
                self._prune_blobs(con)
                con.execute("COMMIT")  # WAL + synchronous=FULL: fsync'd before this returns
                return final
            except BaseException:
                if con.in_transaction:
                    con.execute("ROLLBACK")
                raise
        finally:
            con.close()

    @staticmethod
    def _prune_blobs(con: sqlite3.Connection) -> None:
        """Drop the blobs of all but the REPLY_KEEP newest replies; their records stay (see module doc)."""
        old = [r[0] for r in con.execute("SELECT id FROM replies WHERE pruned=0 ORDER BY id DESC LIMIT -1 OFFSET ?",
                                         (REPLY_KEEP,))]
        if old:
            marks = ",".join("?" * len(old))
            con.execute(f"DELETE FROM reply_blobs WHERE reply_id IN ({marks})", old)
            con.execute(f"UPDATE replies SET pruned=1 WHERE id IN ({marks})", old)
