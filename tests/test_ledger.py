"""The durable per-organization privacy ledger (fedveil.clients.ledger)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedveil.clients.ledger import (REPLY_KEEP, Charge, PrivacyLedger, StoredReply, TaskAlreadyAnswered,
                                    compute_epsilon)
from fedveil.platform.errors import BudgetExhausted, FedveilError

DS = "a1b2c3d4e5f60718"
DELTA = 1e-5


def _opacus_eps(history, accountant="rdp", delta=DELTA):
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta)


def test_empty_ledger_is_zero(tmp_path):
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    assert led.epsilon(DS, DELTA) == 0.0 and led.history(DS) == []


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_matches_fresh_opacus_accountant(tmp_path, accountant):
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    hist = [(1.1, 0.05, 40), (0.9, 0.08, 25), (1.1, 0.05, 40), (1.5, 0.02, 100)]
    for i, (s, q, n) in enumerate(hist):
        led.charge(DS, "run1", f"t{i}", s, q, n, DELTA, budget=1e9, accountant=accountant)
    want = _opacus_eps(hist, accountant)
    got = led.epsilon(DS, DELTA, accountant)
    assert got == pytest.approx(want, rel=1e-6 if accountant == "rdp" else 2e-2)
    assert got > 0.5
    # epsilon_after of the last row is what the ledger reported for that charge
    assert led.history(DS)[-1]["epsilon_after"] == pytest.approx(got, rel=1e-6)


def test_composes_across_runs_and_instances(tmp_path):
    path = tmp_path / "org.db"
    e1 = PrivacyLedger(path, "org-a").charge(DS, "run1", "r1", 1.0, 0.05, 100, DELTA, budget=50)
    # a later run, a new process/instance, the same data: the budget composes
    led2 = PrivacyLedger(path, "org-a")
    assert led2.epsilon(DS, DELTA) == pytest.approx(e1)
    e2 = led2.charge(DS, "run2", "r1", 1.0, 0.05, 100, DELTA, budget=50)
    assert e2 > e1 * 1.2
    assert e2 == pytest.approx(_opacus_eps([(1.0, 0.05, 200)]), rel=1e-9)
    # another dataset has its own budget
    assert led2.epsilon("other-data", DELTA) == 0.0
    assert [h["run_id"] for h in led2.history(DS)] == ["run1", "run2"]


def test_preview_does_not_charge(tmp_path):
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    p = led.preview(DS, 1.0, 0.05, 100, DELTA)
    assert p == pytest.approx(_opacus_eps([(1.0, 0.05, 100)]))
    assert led.epsilon(DS, DELTA) == 0.0
    assert led.charge(DS, "r", "t", 1.0, 0.05, 100, DELTA, budget=100) == pytest.approx(p)


def test_budget_exhaustion(tmp_path):
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    one = led.preview(DS, 1.0, 0.05, 100, DELTA)
    two = led.preview(DS, 1.0, 0.05, 200, DELTA)
    budget = (one + two) / 2  # room for one round, not two
    led.charge(DS, "run1", "r1", 1.0, 0.05, 100, DELTA, budget=budget)
    with pytest.raises(BudgetExhausted) as ei:
        led.charge(DS, "run1", "r2", 1.0, 0.05, 100, DELTA, budget=budget)
    msg = str(ei.value)
    assert f"spent epsilon={one:.4g}" in msg and f"budget of {budget:.4g}" in msg and "this round would cost" in msg
    assert "privacy budget in the organization's config" in ei.value.fix
    assert len(led.history(DS)) == 1  # nothing was charged
    assert led.epsilon(DS, DELTA) == pytest.approx(one)
    # a smaller round that fits still goes through
    led.charge(DS, "run1", "r3", 3.0, 0.05, 10, DELTA, budget=budget)
    assert len(led.history(DS)) == 2


def test_a_task_is_charged_once(tmp_path):
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    e = led.charge(DS, "run1", "task-7", 1.0, 0.05, 50, DELTA, budget=10)
    assert led.charge(DS, "run1", "task-7", 1.0, 0.05, 50, DELTA, budget=10) == e
    # a resend asking for other work is still the same task: the recorded charge stands, nothing more is added
    assert led.charge(DS, "run1", "task-7", 1.0, 0.05, 500, DELTA, budget=10) == e
    assert len(led.history(DS)) == 1 and led.epsilon(DS, DELTA) == pytest.approx(e)
    # same task id in another run is a different charge
    led.charge(DS, "run2", "task-7", 1.0, 0.05, 50, DELTA, budget=10)
    assert len(led.history(DS)) == 2


def _reply(value: float) -> StoredReply:
    return StoredReply("ok", {"org": "org-a"}, {"num_samples": 40.0, "val_loss": value},
                       {"proxy-1": bytes([1, 2, 3]) * 100, "proxy-2": b"\x00sealed\xff"}, {"train_loss": value})


def test_commit_release_stores_the_exact_reply_with_its_charge(tmp_path):
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    assert led.stored_reply("run", "t1") is None
    sent = led.commit_release(DS, "run", "t1", Charge(1.0, 0.05, 50, DELTA, 10.0), _reply(0.25))
    assert sent.metrics["epsilon"] == pytest.approx(_opacus_eps([(1.0, 0.05, 50)]))
    # a fresh ledger object (another process after a restart) answers the retry byte for byte
    again = PrivacyLedger(tmp_path / "org.db", "org-a").stored_reply("run", "t1")
    assert again.blobs == sent.blobs and again.metrics == sent.metrics and again.info == sent.info
    assert again.local == {"train_loss": 0.25}
    # a second commit of the same task (a concurrent delivery) gets the first reply back and charges nothing
    other = led.commit_release(DS, "run", "t1", Charge(0.5, 0.5, 500, DELTA, 10.0), _reply(9.0))
    assert other.blobs == sent.blobs and other.metrics == sent.metrics
    assert len(led.history(DS)) == 1
    # DP off: the reply is stored for retries, nothing is charged
    led.commit_release(DS, "run", "t2", None, _reply(0.5))
    assert len(led.history(DS)) == 1 and led.stored_reply("run", "t2").blobs == sent.blobs


def test_a_reply_over_budget_is_neither_charged_nor_stored(tmp_path):
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    with pytest.raises(BudgetExhausted):
        led.commit_release(DS, "run", "t1", Charge(0.3, 0.5, 500, DELTA, 1.0), _reply(0.1))
    assert led.history(DS) == [] and led.stored_reply("run", "t1") is None


def test_a_pruned_reply_is_never_answered_again(tmp_path):
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    for i in range(REPLY_KEEP + 2):
        led.commit_release(DS, "run", f"t{i}", Charge(5.0, 0.01, 1, DELTA, 1e6), _reply(float(i)))
    assert led.stored_reply("run", f"t{REPLY_KEEP + 1}").blobs  # recent replies keep their bytes
    with pytest.raises(TaskAlreadyAnswered, match="new task id"):
        led.stored_reply("run", "t0")
    # a charge written without a reply (a ledger from before replies were stored) is answered the same way
    con = led._connect()
    con.execute("DELETE FROM replies WHERE task_id='t5'")
    con.close()
    with pytest.raises(TaskAlreadyAnswered):
        led.stored_reply("run", "t5")


def test_run_epsilon_counts_only_that_run(tmp_path):
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    led.charge(DS, "run1", "t1", 1.0, 0.05, 100, DELTA, budget=100)
    led.charge(DS, "run2", "t1", 1.0, 0.05, 100, DELTA, budget=100)
    assert led.run_epsilon(DS, "run2", DELTA) == pytest.approx(_opacus_eps([(1.0, 0.05, 100)]))
    assert led.run_epsilon(DS, "run2", DELTA, extra=(1.0, 0.05, 100)) == pytest.approx(led.epsilon(DS, DELTA))


def test_bad_inputs_and_wrong_org(tmp_path):
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    with pytest.raises(FedveilError, match="Sample rate"):
        led.charge(DS, "r", "t", 1.0, 1.5, 10, DELTA, budget=10)
    with pytest.raises(FedveilError, match="accountant"):
        led.epsilon(DS, DELTA, accountant="gdp")
    with pytest.raises(FedveilError, match="belongs to organization 'org-a'"):
        PrivacyLedger(tmp_path / "org.db", "org-b")
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(FedveilError, match="not a readable SQLite ledger"):
        PrivacyLedger(tmp_path / "junk.db", "org-a")


def test_sigma_zero_is_infinite(tmp_path):
    assert compute_epsilon([(0.0, 0.1, 10)], DELTA) == float("inf")
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    with pytest.raises(BudgetExhausted):
        led.charge(DS, "r", "t", 0.0, 0.1, 10, DELTA, budget=100)


_CHILD = textwrap.dedent("""
    import os, sys
    from fedveil.clients.ledger import PrivacyLedger
    path, mode = sys.argv[1], sys.argv[2]
    led = PrivacyLedger(path, "org-a")
    if mode == "exit_after_charge":
        led.charge("DS", "run1", "t0", 1.0, 0.05, 100, 1e-5, budget=100)
        os._exit(0)  # no cleanup, no close: like a crash right after the charge returned
    for i in range(100000):  # charge until killed; report each charge after it returns
        led.charge("DS", "run1", f"t{i}", 1.0, 0.01, 1, 1e-5, budget=1e6)
        sys.stdout.write(f"{i}\\n"); sys.stdout.flush()
""")


def test_crash_right_after_charge_keeps_it(tmp_path):
    path = tmp_path / "org.db"
    r = subprocess.run([sys.executable, "-c", _CHILD, str(path), "exit_after_charge"], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    led = PrivacyLedger(path, "org-a")
    assert len(led.history("DS")) == 1
    assert led.epsilon("DS", DELTA) == pytest.approx(_opacus_eps([(1.0, 0.05, 100)]))


def test_sigkill_mid_charging_loses_nothing_and_is_not_corrupt(tmp_path):
    path = tmp_path / "org.db"
    PrivacyLedger(path, "org-a")  # create the schema first
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), "loop"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    reported = -1
    try:
        deadline = time.time() + 60
        while reported < 15 and time.time() < deadline:  # let it charge a few times, then kill it mid-flight
            line = proc.stdout.readline()
            if not line:
                break
            reported = int(line)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert reported >= 15, proc.stderr.read().decode()
    con = sqlite3.connect(path)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    led = PrivacyLedger(path, "org-a")
    hist = led.history("DS")
    # every charge the child saw return is there (it may have committed one more before dying)
    assert len(hist) >= reported + 1
    assert [h["task_id"] for h in hist] == [f"t{i}" for i in range(len(hist))]
    assert led.epsilon("DS", DELTA) == pytest.approx(_opacus_eps([(1.0, 0.01, len(hist))]), rel=1e-9)
    # the ledger keeps working after the crash
    led.charge("DS", "run2", "t0", 1.0, 0.01, 1, DELTA, budget=1e6)


def test_ledger_uses_wal_and_full_sync(tmp_path):
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    con = led._connect()
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    con.close()


def test_large_sample_rate_is_accounted(tmp_path):
    """Opacus' fractional RDP orders crash for q > 0.5 (small clients); the ledger must still account."""
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    e = led.charge(DS, "r", "t", 1.0, 0.8, 20, DELTA, budget=1e6)
    acc = RDPAccountant()
    acc.history = [(1.0, 0.8, 20)]
    assert e == pytest.approx(acc.get_epsilon(DELTA, alphas=[float(a) for a in range(2, 256)]))
    assert e > led.preview("x", 1.0, 0.4, 20, DELTA)  # more sampling costs more
