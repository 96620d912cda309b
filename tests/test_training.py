"""Local DP-SGD training (fedveil.clients.training)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from fedveil.clients import training as T
from fedveil.clients.ledger import PrivacyLedger
from fedveil.platform import data as D
from fedveil.platform import models as M
from fedveil.platform.errors import ConfigError


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def digits():
    return D.load_client_data("digits", 0, 1, "iid", 0.5, 0, 0.2, False)


def _mlp(ds, seed=0):
    torch.manual_seed(seed)
    return M.build_model("mlp", ds.feature_shape, ds.num_classes)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_dp_training_improves_accuracy_and_keeps_keys(digits):
    tr, va = digits
    model = _mlp(tr)
    keys = list(model.state_dict())
    _, acc0 = T.evaluate(model, va)
    dp = T.DPSettings(noise_multiplier=1.0, max_grad_norm=1.0)
    res = T.train(model, tr, T.TrainSettings(epochs=4, batch_size=64, lr=0.1), dp, 1.0)
    _, acc1 = T.evaluate(model, va)
    assert acc0 < 0.3 and acc1 > 0.8, (acc0, acc1)
    assert list(model.state_dict()) == keys and not any(k.startswith("_module") for k in keys)
    assert res.noise_multiplier == 1.0 and res.steps == 4 * math.ceil(len(tr) / 64)
    assert res.grad_sample_mode == "fused"  # auto for an all-Linear network
    # no Opacus leftovers: hooks removed, per-sample attributes gone
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
    for p in model.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad") and p.grad is None


def test_cnn_on_digit_images_trains(digits):
    tr, va = D.load_client_data("digits", 0, 1, "iid", 0.5, 0, 0.2, True)
    torch.manual_seed(0)
    model = M.build_model("cnn", tr.feature_shape, 10)
    keys = list(model.state_dict())
    res = T.train(model, tr, T.TrainSettings(epochs=2, batch_size=64, lr=0.1), T.DPSettings(), 1.0)
    assert res.grad_sample_mode == T.AUTO_MODE["conv"]
    assert list(model.state_dict()) == keys
    assert T.evaluate(model, va)[1] > 0.5
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks


@pytest.mark.parametrize("mode", ["ghost", "ew", "fused"])
def test_grad_sample_modes_agree_with_hooks(digits, mode):
    """Same seeds -> same Poisson batches and noise -> every mode must give the same weights."""
    tr, _ = digits
    s = T.TrainSettings(epochs=1, batch_size=64, lr=0.1, seed=3)
    ref = _mlp(tr)
    T.train(ref, tr, s, T.DPSettings(grad_sample_mode="hooks", reproducible=True), 1.0)
    other = _mlp(tr)
    r = T.train(other, tr, s, T.DPSettings(grad_sample_mode=mode, reproducible=True), 1.0)
    assert r.grad_sample_mode == mode
    torch.testing.assert_close(_flat(other), _flat(ref), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_flat(ref), _flat(_mlp(tr)))


@pytest.mark.parametrize("mode", ["hooks", "fused"])
def test_per_sample_clipping_bounds_the_update(digits, mode):
    """sigma=0, one full-batch step, no momentum: the update is lr * mean of clipped grads, so |dw| <= lr*C."""
    tr, _ = digits
    C, lr = 0.01, 1.0
    model = _mlp(tr)
    w0 = _flat(model)
    s = T.TrainSettings(epochs=1, batch_size=len(tr), lr=lr, momentum=0.0, seed=0)
    r = T.train(model, tr, s, T.DPSettings(max_grad_norm=C, grad_sample_mode=mode, reproducible=True), 0.0)
    assert r.steps == 1 and r.sample_rate == 1.0
    step = (_flat(model) - w0).norm().item()
    assert 0 < step <= lr * C * 1.0001
    # without DP the same step is far larger: clipping really happened
    plain = _mlp(tr)
    T.train(plain, tr, s, T.DPSettings(enabled=False), 0.0)
    assert (_flat(plain) - w0).norm().item() > 20 * lr * C


def test_noise_is_not_predictable_from_the_seed(digits):
    tr, _ = digits
    s = T.TrainSettings(epochs=1, batch_size=64, lr=0.1, seed=0)
    a, b = _mlp(tr), _mlp(tr)
    T.train(a, tr, s, T.DPSettings(), 1.0)
    T.train(b, tr, s, T.DPSettings(), 1.0)
    assert not torch.allclose(_flat(a), _flat(b))  # fresh OS randomness each time
    c, d = _mlp(tr), _mlp(tr)
    T.train(c, tr, s, T.DPSettings(reproducible=True), 1.0)
    T.train(d, tr, s, T.DPSettings(reproducible=True), 1.0)
    assert torch.equal(_flat(c), _flat(d))


def test_poisson_rate_is_the_accounted_q_and_ledger_matches_opacus(digits, tmp_path):
    tr, _ = digits
    B = 48
    model = _mlp(tr)
    res = T.train(model, tr, T.TrainSettings(epochs=6, batch_size=B, lr=0.05), T.DPSettings(), 1.1)
    q = B / len(tr)
    assert res.sample_rate == pytest.approx(q)
    # the batches really were drawn at rate q: mean batch size ~ q*n = B (Poisson, many steps)
    mean_batch = res.samples_seen / res.steps
    sd = math.sqrt(B * (1 - q) / res.steps)
    assert abs(mean_batch - B) < 5 * sd, (mean_batch, B)
    led = PrivacyLedger(tmp_path / "org.db", "org-a")
    fp = D.dataset_fingerprint(tr)
    for rnd in range(2):
        eps = led.charge(fp, "run", f"round-{rnd}", res.noise_multiplier, res.sample_rate, res.steps, 1e-5, budget=100)
    for name, acc in [("rdp", RDPAccountant()), ("prv", PRVAccountant())]:
        acc.history = [(1.1, q, res.steps), (1.1, q, res.steps)]
        want = acc.get_epsilon(delta=1e-5)
        assert led.epsilon(fp, 1e-5, name) == pytest.approx(want, rel=1e-6 if name == "rdp" else 2e-2)
    assert eps == pytest.approx(led.epsilon(fp, 1e-5))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_plan_noise_multiplier_hits_target(accountant):
    q, steps, target = 64 / 1500, 10 * 24, 3.0
    sigma = T.plan_noise_multiplier(target, 1e-5, q, steps, accountant)
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = [(sigma, q, steps)]
    eps = acc.get_epsilon(delta=1e-5)
    assert target - 0.05 <= eps <= target
    assert 0.5 < sigma < 3
    with pytest.raises(ConfigError, match="target_epsilon"):
        T.plan_noise_multiplier(-1, 1e-5, q, steps)


def test_resolve_noise_multiplier_plans_over_whole_run():
    s = T.TrainSettings(epochs=2, batch_size=32)
    dp = T.DPSettings(target_epsilon=2.0)
    sigma = T.resolve_noise_multiplier(dp, 1000, s, rounds=10)
    acc = RDPAccountant()
    acc.history = [(sigma, 32 / 1000, 10 * 2 * T.steps_per_epoch(1000, 32))]
    assert acc.get_epsilon(1e-5) <= 2.0
    assert T.resolve_noise_multiplier(T.DPSettings(noise_multiplier=0.7), 1000, s) == 0.7
    assert T.resolve_noise_multiplier(T.DPSettings(enabled=False), 1000, s) == 0.0
    with pytest.raises(ConfigError, match="neither noise_multiplier nor target_epsilon"):
        T.resolve_noise_multiplier(T.DPSettings(), 1000, s)


def test_empty_poisson_batches_still_take_noise_steps():
    rng = np.random.default_rng(0)
    ds = D.Dataset(rng.normal(size=(20, 4)).astype(np.float32), np.arange(20) % 2, 2, "tiny")
    model = M.build_model("mlp", (4,), 2)
    for mode in ("hooks", "fused"):
        w0 = _flat(model)
        res = T.train(model, ds, T.TrainSettings(epochs=3, batch_size=1, lr=0.1), T.DPSettings(grad_sample_mode=mode), 1.0)
        assert res.steps == 60 and res.empty_batches > 0  # P(empty draw) = 0.95^20 = 0.36
        assert not torch.equal(_flat(model), w0)


def test_helpers_and_errors(digits):
    tr, va = digits
    assert T.sample_rate(1000, 32) == 0.032 and T.sample_rate(10, 32) == 1.0
    assert T.steps_per_epoch(1000, 32) == 32
    assert T.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            T.resolve_device("cuda")
    with pytest.raises(ConfigError, match="Unknown device"):
        T.resolve_device("tpu9")
    with pytest.raises(ConfigError, match="grad_sample_mode"):
        T.train(_mlp(tr), tr, T.TrainSettings(), T.DPSettings(grad_sample_mode="magic"), 1.0)
    cnn = M.build_model("cnn", (1, 8, 8), 10)
    img, _ = D.load_client_data("digits", 0, 1, "iid", 0.5, 0, 0.2, True)
    with pytest.raises(ConfigError, match="fused"):
        T.train(cnn, img, T.TrainSettings(), T.DPSettings(grad_sample_mode="fused"), 1.0)
    with pytest.raises(ConfigError, match="optimizer"):
        T.train(_mlp(tr), tr, T.TrainSettings(optimizer="lbfgs"), T.DPSettings(enabled=False), 1.0)
    loss, acc = T.evaluate(_mlp(tr), va)
    assert loss > 1.5 and 0 <= acc <= 1
    # non-private baseline trains well and is deterministic
    a, b = _mlp(tr), _mlp(tr)
    T.train(a, tr, T.TrainSettings(epochs=3, batch_size=32, lr=0.05), T.DPSettings(enabled=False), 0.0)
    T.train(b, tr, T.TrainSettings(epochs=3, batch_size=32, lr=0.05), T.DPSettings(enabled=False), 0.0)
    assert torch.equal(_flat(a), _flat(b)) and T.evaluate(a, va)[1] > 0.93
