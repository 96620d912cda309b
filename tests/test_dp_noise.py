"""DP-SGD noise from a cryptographically secure stream (issue 8, defect 7).

The pure map (AES-256-CTR keystream -> Box-Muller normals) is checked statistically with
tolerances of 5+ standard errors at n = 1e6 (never flaky), and the training loop is checked to
add exactly that stream's draws, in the Opacus path and the fused path, with the accounting
(sigma, q, steps -> epsilon) unchanged.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from opacus.accountants import RDPAccountant
from scipy import stats

from fedveil.clients import training as T
from fedveil.platform import data as D
from fedveil.platform import models as M
from fedveil.platform.errors import ConfigError
from fedveil.secure.noise import SecureGaussian, normals_from_bytes, stream_bytes_for

N = 1_000_000


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_secure_normals_have_mean_0_std_1_and_a_gaussian_shape():
    z = SecureGaussian().standard_normal(N).numpy()
    assert z.shape == (N,) and z.dtype == np.float64 and np.all(np.isfinite(z))
    se = 1 / math.sqrt(N)
    assert abs(z.mean()) < 6 * se  # mean 0
    assert abs(z.std() - 1) < 6 * math.sqrt(0.5) * se  # var of s^2 ~ 2/n
    assert abs(np.mean(z**4) - 3) < 6 * math.sqrt(96) * se  # kurtosis of a normal
    assert abs(np.mean(np.abs(z) > 3) - 0.0026998) < 6 * math.sqrt(0.0027 / N)  # tails are right
    assert stats.kstest(z[:200_000], "norm").pvalue > 1e-6
    # scaled draws: N(0, std^2)
    w = SecureGaussian().normal(2.5, N).numpy()
    assert abs(w.std() - 2.5) < 2.5 * 6 * math.sqrt(0.5) * se


def test_pairs_are_independent_and_draws_never_repeat():
    g = SecureGaussian()
    a, b = g.standard_normal(N).numpy(), g.standard_normal(N).numpy()
    assert not np.array_equal(a, b)  # the stream continues
    assert not np.array_equal(a, SecureGaussian().standard_normal(N).numpy())  # a fresh key, fresh noise
    # the two normals of a Box-Muller pair are uncorrelated
    assert abs(np.corrcoef(a[0::2], a[1::2])[0, 1]) < 6 / math.sqrt(N / 2)


def test_normals_are_box_muller_of_the_aes_ctr_keystream():
    """Known answer: the draws are exactly Box-Muller on the AES-256-CTR encryption of zeros."""
    key = os.urandom(32)
    ks = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(32))
    w = [int.from_bytes(ks[i : i + 8], "little") >> 11 for i in range(0, 32, 8)]
    u = [k * 2.0**-53 for k in w]
    want = []
    for u1, u2 in ((u[0], u[1]), (u[2], u[3])):
        r = math.sqrt(-2 * math.log(1 - u1))
        want += [r * math.cos(2 * math.pi * u2), r * math.sin(2 * math.pi * u2)]
    got = SecureGaussian(key).standard_normal(3).numpy()
    np.testing.assert_allclose(got, want[:3], rtol=1e-12)
    # bytes of zeros give u1 = 0 -> radius sqrt(-2 log 1) = 0: never log(0)
    assert np.array_equal(normals_from_bytes(bytes(stream_bytes_for(4)), 4).numpy(), np.zeros(4))
    with pytest.raises(ValueError, match="random bytes"):
        normals_from_bytes(bytes(15), 2)
    with pytest.raises(ValueError, match="32 bytes"):
        SecureGaussian(b"short")


def test_the_stream_is_the_same_however_it_is_sliced_into_draws():
    """Per-layer draws (many small ones) and one big draw give the same normals, across refills."""
    whole = SecureGaussian.from_seed(3).standard_normal(3 * SecureGaussian.BLOCK + 5).numpy()
    g = SecureGaussian.from_seed(3)
    parts = [g.standard_normal(k).numpy() for k in (1, 7, SecureGaussian.BLOCK, 2 * SecureGaussian.BLOCK - 3)]
    assert np.array_equal(np.concatenate(parts), whole)


def test_seeded_streams_are_reproducible_for_tests_only():
    assert torch.equal(SecureGaussian.from_seed(7).standard_normal(10), SecureGaussian.from_seed(7).standard_normal(10))
    assert not torch.equal(SecureGaussian.from_seed(7).standard_normal(10), SecureGaussian.from_seed(8).standard_normal(10))


@pytest.fixture(scope="module")
def digits():
    return D.load_client_data("digits", 0, 1, "iid", 0.5, 0, 0.2, False)


def _mlp(ds, seed=0):
    torch.manual_seed(seed)
    return M.build_model("mlp", ds.feature_shape, ds.num_classes)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("mode", ["hooks", "ghost", "fused"])
def test_training_adds_exactly_the_secure_streams_noise(digits, mode):
    """One full-batch step, clipping to C tiny, sigma*C = 1: the update is -(noise)/n up to n*C.

    With `reproducible=True` the stream's key derives from seed*2+2, so the noise the optimizer
    added can be compared draw for draw with `SecureGaussian`: the Opacus optimizers and the
    fused step really use the AES-CTR stream, not torch's generator.
    """
    tr, _ = digits
    n, C, sigma, seed = len(tr), 1e-7, 1e7, 5
    model = _mlp(tr)
    w0 = _flat(model).double()
    s = T.TrainSettings(epochs=1, batch_size=n, lr=1.0, momentum=0.0, seed=seed, device="cpu")
    T.train(model, tr, s, T.DPSettings(max_grad_norm=C, grad_sample_mode=mode, reproducible=True), sigma)
    added = -(_flat(model).double() - w0) * n  # = summed clipped grads (|.| <= n*C) + noise
    stream = SecureGaussian.from_seed(seed * 2 + 2)
    want = torch.cat([stream.normal(sigma * C, p.numel()) for p in model.parameters()])
    torch.testing.assert_close(added, want.to(torch.float32).double(), rtol=0, atol=n * C + 1e-3)
    assert abs(added.std().item() - 1.0) < 0.05 and abs(added.mean().item()) < 0.05


def test_torch_noise_source_is_a_different_stream_and_only_an_opt_in(digits):
    tr, _ = digits
    s = T.TrainSettings(epochs=1, batch_size=64, lr=0.1, seed=1, device="cpu")
    a, b = _mlp(tr), _mlp(tr)
    T.train(a, tr, s, T.DPSettings(reproducible=True), 1.0)
    T.train(b, tr, s, T.DPSettings(reproducible=True, noise_source="torch"), 1.0)
    assert not torch.allclose(_flat(a), _flat(b))
    assert T.DPSettings().noise_source == "csprng"
    with pytest.raises(ConfigError, match="noise_source"):
        T.DPSettings(noise_source="mt19937").validate()


def test_dp_training_with_secure_noise_converges_and_accounting_is_unchanged():
    (tr, va) = D.standardize(*D.load_client_data("breast_cancer", 0, 1, "iid", 0.5, 0, 0.2, False))
    s = T.TrainSettings(epochs=4, batch_size=32, lr=0.1, device="cpu")
    results = {}
    for source in ("csprng", "torch"):
        model = _mlp(tr)
        results[source] = T.train(model, tr, s, T.DPSettings(grad_sample_mode="hooks", noise_source=source), 1.0)
        if source == "csprng":
            assert T.evaluate(model, va)[1] > 0.85
    sec, ref = results["csprng"], results["torch"]
    # what the ledger charges (sigma, q, steps) does not depend on where the noise comes from
    assert (sec.noise_multiplier, sec.sample_rate, sec.steps) == (ref.noise_multiplier, ref.sample_rate, ref.steps)
    assert 0 < _eps(sec) == _eps(ref) < math.inf


def _eps(res) -> float:
    acc = RDPAccountant()
    acc.history = [(res.noise_multiplier, res.sample_rate, res.steps)]
    return acc.get_epsilon(1e-5)
