"""A model you can take away: `fedveil model export|evaluate` and `fedveil client ledger`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedveil.aggregator import checkpoint
from fedveil.platform import cli, model_io
from fedveil.platform.data import load_heldout

from conftest import run_federation
from test_evaluation import plain_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-round run of the cnn on digits images, with server-side evaluation."""
    path = tmp_path_factory.mktemp("fed")
    cfg = plain_config(**{"model.name": "cnn", "model.activation": "tanh", "federation.rounds": 2})
    fed, store, _ = run_federation(path, cfg, "cnn-run")
    return path, fed, store


def _checkpoint_predictions(fed, rnd: int, X: np.ndarray) -> np.ndarray:
    model, _ = model_io.load_checkpoint_model(fed.checkpoint_dir, rnd)
    with torch.no_grad():
        return model(torch.from_numpy(X)).numpy()


def test_torchscript_export_predicts_like_the_checkpoint_without_fedveil(trained, tmp_path):
    path, fed, store = trained
    out = tmp_path / "model.pt"
    assert cli.main(["model", "export", "--workdir", str(path), "--round", "1", "--format", "torchscript",
                     "--out", str(out)]) == 0
    test = load_heldout("digits", image=True)
    np.save(tmp_path / "x.npy", test.X)
    # a fresh interpreter that never imports fedveil loads and runs it
    code = ("import sys, numpy as np, torch; m = torch.jit.load(sys.argv[1]); "
            "np.save(sys.argv[3], m(torch.from_numpy(np.load(sys.argv[2]))).detach().numpy()); "
            "assert not any(k.startswith('fedveil') for k in sys.modules)")
    subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                   check=True, cwd=tmp_path)
    logits = np.load(tmp_path / "y.npy")
    expected = _checkpoint_predictions(fed, 1, test.X)
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    info = json.loads((tmp_path / "model.pt.json").read_text())
    assert info["round"] == 1 and info["run_id"] == "cnn-run" and info["kwargs"] == {"activation": "tanh"}


def test_state_dict_loads_into_the_rebuilt_model_and_scores_as_reported(trained, tmp_path, capsys):
    path, fed, store = trained
    out = tmp_path / "weights.pt"
    assert cli.main(["model", "export", "--workdir", str(path), "--run", "cnn-run", "--round", "best",
                     "--format", "state_dict", "--out", str(out)]) == 0
    info = json.loads((tmp_path / "weights.pt.json").read_text())
    state = torch.load(out, weights_only=True)
    model = model_io.build_from_info(info)
    model.load_state_dict(state, strict=True)  # every key and shape matches
    rounds = {r["round"]: r["server_accuracy"] for r in store.rounds("cnn-run")}
    assert rounds[info["round"]] == max(rounds.values())  # best = highest held-out accuracy
    capsys.readouterr()
    assert cli.main(["model", "evaluate", "--model", str(out), "--data", "digits", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 360 and result["accuracy"] == pytest.approx(rounds[info["round"]], abs=1e-9)


def test_export_errors_are_clear(trained, tmp_path, capsys):
    path, _, _ = trained
    assert cli.main(["model", "export", "--workdir", str(path), "--round", "9", "--format", "state_dict",
                     "--out", str(tmp_path / "m.pt")]) == 2
    assert "not a saved round" in capsys.readouterr().err
    assert cli.main(["model", "export", "--workdir", str(tmp_path), "--format", "state_dict",
                     "--out", str(tmp_path / "m.pt")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    try:
        import onnx  # noqa: F401
    except ImportError:
        assert cli.main(["model", "export", "--workdir", str(path), "--format", "onnx",
                         "--out", str(tmp_path / "m.onnx")]) == 2
        assert "pip install onnx" in capsys.readouterr().err


def test_client_ledger_shows_the_organizations_own_epsilon(tmp_path, capsys):
    from fedveil.clients.ledger import PrivacyLedger

    ledger = PrivacyLedger(tmp_path / "privacy-ledger.db", "hospital-a")
    eps = [ledger.charge("abc123", run, f"{run}:round-1", 1.0, 0.05, 100, 1e-5, 50.0) for run in ("r1", "r2")]
    assert cli.main(["client", "ledger", "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "hospital-a" in out and "2 charge(s) over 2 run(s)" in out and f"ε = {eps[-1]:.3f}" in out
    assert cli.main(["client", "ledger", "--ledger", str(tmp_path / "missing.db")]) == 2


def test_a_scatternet_exports_with_its_fixed_wavelets(tmp_path):
    """The scatternet's wavelets are not in the checkpoint (nothing trained, nothing sent): the export must
    rebuild them, so plain PyTorch (and ONNX Runtime, where installed) predicts what the checkpoint does."""
    from fedveil.platform.data import input_scaling
    from fedveil.platform.models import build_model, model_arrays

    info = {"run_id": "scat", "model": "scatternet", "kwargs": {"activation": "tanh"}, "input_shape": [1, 28, 28],
            "num_classes": 10, "dataset": "mnist", "input_scaling": input_scaling("mnist")}
    torch.manual_seed(3)
    weights = np.concatenate([a.ravel() for a in model_arrays(build_model("scatternet", (1, 28, 28), 10,
                                                                          activation="tanh"))]).astype(np.float64)
    run_dir = tmp_path / "run"
    checkpoint.save_model_info(run_dir, info)
    checkpoint.save(run_dir, checkpoint.Checkpoint(round=1, weights=weights, optimizer={}, meta={}))
    X = np.random.default_rng(0).normal(size=(16, 1, 28, 28)).astype(np.float32)
    model, _ = model_io.load_checkpoint_model(run_dir, 1)
    with torch.no_grad():
        expected = model(torch.from_numpy(X)).numpy()
    assert cli.main(["model", "export", "--workdir", str(run_dir), "--format", "torchscript",
                     "--out", str(tmp_path / "s.pt")]) == 0
    np.save(tmp_path / "x.npy", X)
    code = ("import sys, numpy as np, torch; m = torch.jit.load(sys.argv[1]); "
            "np.save(sys.argv[3], m(torch.from_numpy(np.load(sys.argv[2]))).detach().numpy())")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.pt"), str(tmp_path / "x.npy"),
                    str(tmp_path / "y.npy")], check=True, cwd=tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), expected, rtol=1e-5, atol=1e-5)
    try:
        import onnxruntime as ort
    except ImportError:
        return
    assert cli.main(["model", "export", "--workdir", str(run_dir), "--format", "onnx",
                     "--out", str(tmp_path / "s.onnx")]) == 0
    got = ort.InferenceSession(str(tmp_path / "s.onnx")).run(None, {"input": X})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
