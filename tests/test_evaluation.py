"""Server-side evaluation on the public held-out split, checkpoints per run, and the training knobs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedveil.aggregator import checkpoint
from fedveil.aggregator.optimizers import ServerOptimizer
from fedveil.clients.training import scheduled_lr, task_round
from fedveil.platform import config as config_mod
from fedveil.platform.federation import demo_orgs

from conftest import run_federation


def plain_config(**overrides):
    values = {
        "federation.rounds": 2, "federation.round_timeout": 60, "federation.secure": "none",
        "federation.name": "evalfed", "data.source": "digits", "training.epochs": 1, "training.batch_size": 64,
        "training.lr": 0.1, "privacy.enabled": False, "evaluation.source": "builtin-test",
        "orgs": [o.model_dump(exclude_none=True) for o in demo_orgs(3)],
        # the test organizations opt in to a plaintext, DP-off run (their default policy declines it)
        "policy.allow_secure": ["none", "secret-sharing", "ckks"], "policy.require_dp": False,
    }
    values.update(overrides)
    return config_mod.with_overrides(config_mod.FedveilConfig(), values)


def _independent_accuracy(weights: np.ndarray) -> tuple[float, float]:
    """The held-out score computed without fedveil's engine: sklearn's digits, the fixed split, plain torch."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from fedveil.platform.data import SKLEARN_TEST_FRACTION, SKLEARN_TEST_SEED

    X, y = load_digits(return_X_y=True)
    _, te = train_test_split(np.arange(len(y)), test_size=SKLEARN_TEST_FRACTION, stratify=y,
                             random_state=SKLEARN_TEST_SEED)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    sizes = [p.numel() for p in net.state_dict().values()]
    chunks = np.split(weights, np.cumsum(sizes)[:-1])
    net.load_state_dict({k: torch.tensor(c.reshape(v.shape), dtype=torch.float32)
                         for (k, v), c in zip(net.state_dict().items(), chunks)})
    with torch.no_grad():
        out = net(torch.tensor(X[te] / 16.0, dtype=torch.float32))
        target = torch.tensor(y[te])
        correct = int((out.argmax(1) == target).sum())
        return correct / len(te), float(torch.nn.functional.cross_entropy(out, target))


def test_server_evaluation_equals_an_independent_computation(tmp_path):
    fed, store, _ = run_federation(tmp_path, plain_config())
    rounds = store.rounds("r1")
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        saved = checkpoint.load_round(fed.checkpoint_dir, r["round"])
        acc, loss = _independent_accuracy(saved.weights)
        assert r["server_accuracy"] == pytest.approx(acc, abs=1e-9)
        assert r["server_loss"] == pytest.approx(loss, rel=1e-4)
    assert rounds[-1]["server_accuracy"] > 0.5  # a trained model, not chance (0.1)
    np.testing.assert_array_equal(checkpoint.load_round(fed.checkpoint_dir, 2).weights, fed.weights)
    # the export reports both accuracies, named apart, and says the run was not private
    run = store.export()["runs"][0]
    assert run["private"] is False and run["evaluation_source"] == "builtin-test"
    assert run["rounds"][1]["server_accuracy"] == rounds[1]["server_accuracy"]
    assert "accuracy" in run["rounds"][1] and all("epsilon_as_of_round" in c for c in run["clients"])


def test_checkpoints_are_kept_per_run_with_best_and_last(tmp_path):
    fed1, _, _ = run_federation(tmp_path, plain_config(**{"federation.rounds": 1}), "run-a")
    fed2, store, _ = run_federation(tmp_path, plain_config(**{"federation.rounds": 2}), "run-b")
    assert fed1.checkpoint_dir != fed2.checkpoint_dir
    np.testing.assert_array_equal(checkpoint.load(fed1.checkpoint_dir).weights, fed1.weights)  # not overwritten
    assert checkpoint.saved_rounds(fed2.checkpoint_dir) == [1, 2]
    best, metric = checkpoint.best_round(fed2.checkpoint_dir)
    accs = {r["round"]: r["server_accuracy"] for r in store.rounds("run-b")}
    assert metric == "server_accuracy" and accs[best] == max(accs.values())
    info = checkpoint.model_info(fed2.checkpoint_dir)
    assert info["model"] == "mlp" and info["input_shape"] == [64] and info["num_classes"] == 10
    # the federation's directory resolves to its newest run (resume under a new run id)
    assert checkpoint.load(fed2.checkpoint_dir.parent).round == 2


def test_evaluation_off_and_auto():
    cfg = plain_config(**{"evaluation.source": "auto"})
    assert cfg.evaluation.resolved("digits") == "builtin-test"
    assert cfg.evaluation.resolved("/data/org.csv") == ""
    assert plain_config(**{"evaluation.source": "none"}).evaluation.resolved("digits") == ""


def test_lr_schedules():
    assert scheduled_lr(0.5, "constant", 7, 10) == 0.5
    cos = [scheduled_lr(1.0, "cosine", r, 4, lr_min=0.1) for r in range(1, 5)]
    assert cos[0] == 1.0 and all(a > b for a, b in zip(cos, cos[1:])) and cos[-1] > 0.1
    assert cos[2] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert [scheduled_lr(1.0, "step", r, 6, step_rounds=2, gamma=0.1) for r in (1, 2, 3, 5)] == \
        pytest.approx([1.0, 1.0, 0.1, 0.01])
    assert task_round("fed-1:round-12") == 12 and task_round("fed-1:async-3") is None
    assert scheduled_lr(1.0, "cosine", None, 4) == 1.0  # async: no round, no schedule


def test_server_momentum_is_fedavgm():
    opt = ServerOptimizer("fedavg", lr=0.5, momentum=0.9)
    d1, d2 = np.array([1.0, -1.0]), np.array([0.0, 2.0])
    w1 = opt.step(np.zeros(2), d1)
    np.testing.assert_allclose(w1, 0.5 * d1)
    np.testing.assert_allclose(opt.step(w1, d2), w1 + 0.5 * (0.9 * d1 + d2))
    again = ServerOptimizer("fedavg", lr=0.5, momentum=0.9)
    again.load_state(opt.state())
    np.testing.assert_array_equal(again.m, opt.m)


def test_momentum_and_weight_decay_reach_the_optimizer():
    from fedveil.clients.training import TrainSettings, _make_optimizer

    opt = _make_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainSettings(momentum=0.0, weight_decay=1e-3))
    assert opt.param_groups[0]["momentum"] == 0.0 and opt.param_groups[0]["weight_decay"] == 1e-3
    cfg = plain_config(**{"training.momentum": 0.5})
    assert cfg.training.momentum == 0.5 and config_mod.FedveilConfig().training.momentum == 0.9


class _StoppedFederation:
    """Stands in for LocalFederation: two rounds reach the store, then the user presses Ctrl-C."""

    def __init__(self, cfg, workdir, keys_dir=None, progress=print):
        from fedveil.platform.store import store_url

        self.cfg, self.store_url = cfg, store_url(workdir)

    def start(self):
        pass

    def submit(self, run_name):
        self.run_name = run_name

    def wait(self, run_name, timeout, on_round=None):
        import time

        from fedveil.platform.store import MetricsStore

        assert timeout is None  # no default wall-clock limit
        store = MetricsStore(self.store_url)
        store.create_run(run_name, mode="sync", secure="none", dataset="digits", rounds_planned=10,
                         config=self.cfg.model_dump())
        for rnd, acc in ((1, 0.61), (2, 0.83)):
            now = time.time()
            store.record_round(run_name, rnd, started_at=now, finished_at=now, seconds=1.0, participants=3,
                               server_accuracy=acc, server_loss=1.0 - acc)
            store.record_client_round(run_name, rnd, "hospital-a", "ok", epsilon=0.5 * rnd, delta=1e-5, budget=20.0)
            on_round(store.rounds(run_name)[-1])
        store.close()
        raise KeyboardInterrupt

    def stop(self):
        pass


def test_a_stopped_demo_prints_its_summary_and_progress(tmp_path, monkeypatch, capsys):
    from fedveil.platform import cli, federation

    monkeypatch.setattr(federation, "LocalFederation", _StoppedFederation)
    code = cli.main(["demo", "--secure", "none", "--insecure", "--no-dashboard", "--dataset", "digits",
                     "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 130
    assert "round   2/" in out and "held-out acc 0.8300" in out and "max ε 1.000" in out  # the progress line
    assert "clients' val acc" not in out  # none recorded: no accuracy is invented
    assert "stopped (interrupted by the user); 2 of 10 round(s)" in out
    assert "held-out accuracy 0.8300" in out and "ε=1.000" in out


def test_a_non_private_run_says_so(tmp_path):
    from fedveil.platform import cli
    from fedveil.platform.store import MetricsStore

    cfg = plain_config()
    store = MetricsStore(f"sqlite:///{tmp_path / 'fedveil.db'}")
    store.create_run("np", mode="sync", secure="none", rounds_planned=1, config=cfg.model_dump())
    store.record_round("np", 1, started_at=0.0, finished_at=1.0, seconds=1.0, participants=3)
    store.record_client_round("np", 1, "hospital-a", "ok", epsilon=0.0)
    line = cli._progress_line(store.url, "np", cfg, store.rounds("np")[0])
    assert "not private (ε = ∞)" in line and "0.000" not in line
    assert store.export()["runs"][0]["private"] is False


def test_dashboard_names_both_accuracies_apart():
    from fedveil.dashboard import views as v

    rounds = [{"round": 1, "model_version": 1, "participants": 3, "accuracy": None, "loss": None, "started_at": 0.0,
               "finished_at": 1.0, "seconds": 1.0, "server_accuracy": 0.7, "server_loss": 0.9},
              {"round": 2, "model_version": 2, "participants": 3, "accuracy": 0.8, "loss": 0.5, "started_at": 1.0,
               "finished_at": 2.0, "seconds": 1.0, "server_accuracy": 0.9, "server_loss": 0.3}]
    frame = v.accuracy_frame(v.rounds_frame({"started_at": 0.0}, rounds))
    held = frame[frame.series == v.ACCURACY_SERIES["server_accuracy_pct"]]
    val = frame[frame.series == v.ACCURACY_SERIES["accuracy_pct"]]
    assert held.accuracy_pct.tolist() == pytest.approx([70.0, 90.0]) and val.accuracy_pct.tolist() == [80.0]


@pytest.fixture
def bench_accuracy(monkeypatch):
    """benchmarks/accuracy.py as a module (benchmarks/ is not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"
    spec = importlib.util.spec_from_file_location("fedveil_bench_accuracy", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_the_documented_mnist_recipe_is_the_one_the_benchmark_measured(bench_accuracy):
    """examples/mnist.toml is the documented default for image data; docs/benchmarks.md's numbers come from
    benchmarks/accuracy.py's `tuned` recipe. If either changes alone, the docs describe a run nobody made."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    example = config_mod.load(root / "examples" / "mnist.toml")
    measured = bench_accuracy.make_config(
        "mnist", bench_accuracy.RECIPES["tuned"], epsilon=example.privacy.target_epsilon, orgs=len(example.orgs),
        secure=example.federation.secure, seed=example.federation.seed, val_fraction=example.data.val_fraction,
        device="auto")
    for section, keys in {
        "federation": ("rounds", "secure", "seed"),
        "data": ("source", "partition", "alpha", "val_fraction"),
        "model": ("name", "activation", "groupnorm"),
        "training": ("epochs", "batch_size", "lr", "momentum", "lr_schedule", "lr_min", "optimizer"),
        "privacy": ("enabled", "target_epsilon", "delta", "accountant", "max_grad_norm"),
        "server": ("optimizer", "lr", "momentum"),
        "evaluation": ("source",),
    }.items():
        for key in keys:
            got, want = getattr(getattr(example, section), key), getattr(getattr(measured, section), key)
            assert got == pytest.approx(want) if isinstance(want, float) else got == want, f"{section}.{key}"
    assert example.model.name == "scatternet"


def test_the_accuracy_benchmark_summarizes_each_arm_across_splits(bench_accuracy):
    """A recipe is judged on several Dirichlet draws: the summary must group by (arm, ε), not mix them."""
    recipe = {"rounds": 10, "epochs": 1, "batch_size": 512, "lr": 0.5}
    rows = [dict(arm="fed-dp", target_epsilon=3.0, seed=s, accuracy=a, recipe=recipe, wall_seconds=1.0)
            for s, a in ((0, 0.96), (1, 0.95), (2, 0.94))]
    rows.append(dict(arm="fed-dp", target_epsilon=1.0, seed=0, accuracy=0.90, recipe=recipe, wall_seconds=1.0))
    rows.append(dict(arm="fed-dp", target_epsilon=1.0, seed=1, accuracy=0.80, recipe=recipe, wall_seconds=1.0))
    summary = bench_accuracy.across_seeds(rows, "mnist").splitlines()
    assert summary[2] == "| fed-dp | 3.0 | 3 | 95.00% | 94.00% | 96.00% |"
    assert summary[3] == "| fed-dp | 1.0 | 2 | 85.00% | 80.00% | 90.00% |"
    assert bench_accuracy.across_seeds(rows[:1] + rows[3:4], "mnist") == ""  # one split each: no summary

