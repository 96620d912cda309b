"""Local training of one organization: DP-SGD with Opacus (or plain SGD for baselines).

How DP-SGD is wired (the pieces `PrivacyEngine.make_private` assembles, used directly so the
sample rate is exactly q = batch_size / n and the data path stays fast):

* **Poisson sampling.** Each step includes every sample independently with probability q
  (`torch.rand(n) < q`, the same rule as Opacus' `UniformWithReplacementSampler`), so batch
  sizes vary and may be empty. An empty batch still takes a noise-only step, as Opacus does.
  One "epoch" is `steps_per_epoch(n, batch_size) = ceil(n / batch_size)` steps.
* **Per-sample clipping + noise.** An Opacus grad-sample module (`hooks`, `ew`, `functorch`
  or `ghost` clipping) computes per-sample gradients or norms; an Opacus `DPOptimizer`
  clips them to C, adds N(0, sigma^2 C^2), and divides by the expected batch size q*n.
* **Accounting is the caller's job.** `train` returns (sigma, q, steps); the client charges
  them to its `PrivacyLedger`, which recomputes epsilon with a fresh Opacus accountant over
  the whole history. `plan_noise_multiplier` plans sigma for a whole run up front.
* **Secret randomness.** Privacy amplification by subsampling assumes nobody can predict
  which samples were drawn, and the noise must be unpredictable too. So with DP on, the
  sampling generator is seeded from `os.urandom`, *not* from the configured seed (which the
  server may know), and the Gaussian noise comes from a cryptographically secure stream:
  AES-256-CTR under a fresh `os.urandom` key (`fedveil.secure.noise.SecureGaussian`), in every
  mode (Opacus' optimizers via `_csprng_optimizer_class`, the fused step, noise-only steps).
  `DPSettings.reproducible=True` derives both from the config seed for tests and benchmarks
  only; it voids the guarantee. `DPSettings.noise_source="torch"` (benchmarks only) draws the
  noise from torch's Mersenne Twister instead, to measure what the secure stream costs.

The model passed in is trained in place: Opacus wraps it (the parameters are shared), and
the hooks and per-sample attributes are removed afterwards, so its `state_dict` keys are
the original ones (no `_module.` prefix).
"""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from fedveil.platform.data import Dataset
from fedveil.platform.errors import ConfigError, FedveilError
from fedveil.platform.models import dataset_tensors as _tensors
from fedveil.platform.models import evaluate, resolve_device  # noqa: F401  (re-exported: training API)
from fedveil.secure.noise import SecureGaussian

GRAD_SAMPLE_MODES = ("auto", "hooks", "ghost", "ew", "functorch", "fused")
NOISE_SOURCES = ("csprng", "torch")

# Measured by benchmarks/dp_training.py on this machine class (CPU, 1 torch thread); see
# docs/benchmarks.md "DP-SGD training". "auto" picks per model family. "fused" is fedveil's
# own ghost-clipping step for networks whose only trainable layers are nn.Linear.
AUTO_MODE = {"conv": "ew", "linear": "fused", "other": "hooks"}


@dataclass
class DPSettings:
    enabled: bool = True
    max_grad_norm: float = 1.0  # clipping norm C
    noise_multiplier: float | None = None  # sigma, or None to derive from target_epsilon
    target_epsilon: float | None = None  # for the whole planned run
    delta: float = 1e-5
    accountant: str = "rdp"  # "rdp" or "prv"
    grad_sample_mode: str = "auto"  # "auto" picks per model (measured best), or "hooks"/"ghost"/"ew"/"functorch"
    reproducible: bool = False  # seed sampling/noise from TrainSettings.seed: tests/benchmarks ONLY, voids DP
    noise_source: str = "csprng"  # "csprng" (AES-256-CTR); "torch" (Mersenne Twister): benchmarks ONLY

    def validate(self) -> None:
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError(f"Unknown privacy accountant {self.accountant!r}.", "Use 'rdp' (default) or 'prv'.")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(
                f"Unknown grad_sample_mode {self.grad_sample_mode!r}.", f"Use one of {', '.join(GRAD_SAMPLE_MODES)}."
            )
        if self.noise_source not in NOISE_SOURCES:
            raise ConfigError(f"Unknown noise_source {self.noise_source!r}.",
                              "Use 'csprng' (the default; 'torch' is for benchmarks only).")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ConfigError(f"max_grad_norm must be > 0, got {self.max_grad_norm}.", "Set the clipping norm C, e.g. 1.0.")
        if not (0 < self.delta < 1):
            raise ConfigError(f"delta must be in (0, 1), got {self.delta}.", "Use a delta below 1/n, e.g. 1e-5.")
        if self.noise_multiplier is not None and self.noise_multiplier < 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}.", "Use e.g. 1.0.")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ConfigError(f"target_epsilon must be > 0, got {self.target_epsilon}.", "Use e.g. 3.0.")


@dataclass
class TrainSettings:
    epochs: int = 1
    batch_size: int = 32  # expected batch size; Poisson sample rate q = batch_size / n
    lr: float = 0.1
    optimizer: str = "sgd"  # "sgd" (with `momentum`) or "adam"
    device: str = "auto"  # auto -> cuda if available else cpu
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class TrainResult:
    num_samples: int
    steps: int
    sample_rate: float
    noise_multiplier: float
    train_loss: float
    seconds: float
    grad_sample_mode: str = "none"
    samples_seen: int = 0
    max_grad_norm: float = 0.0
    empty_batches: int = 0  # Poisson draws that selected nobody (noise-only steps)

    @property
    def samples_per_second(self) -> float:
        return self.samples_seen / self.seconds if self.seconds > 0 else float("nan")


# --------------------------------------------------------------------------- planning helpers


def sample_rate(n: int, batch_size: int) -> float:
    """Poisson sampling rate q = batch_size / n (capped at 1)."""
    if n <= 0:
        raise FedveilError("The training set is empty.", "Give this organization some training data.")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be > 0, got {batch_size}.", "Use e.g. 32.")
    return min(1.0, batch_size / n)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Steps in one epoch: ceil(n / batch_size), i.e. each sample is drawn about once."""
    sample_rate(n, batch_size)
    return max(1, math.ceil(n / batch_size))


def plan_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str = "rdp"
) -> float:
    """Smallest sigma (to 0.01 in epsilon) whose total cost after `total_steps` is <= target_epsilon."""
    from opacus.accountants.utils import get_noise_multiplier

    if not target_epsilon > 0:
        raise ConfigError(f"target_epsilon must be > 0, got {target_epsilon}.", "Use e.g. 3.0.")
    if total_steps <= 0:
        raise ConfigError(f"Cannot plan noise for {total_steps} steps.", "Plan at least one round of one step.")
    extra = {}
    if accountant == "rdp" and sample_rate > 0.5:
        from fedveil.clients.ledger import INTEGER_ALPHAS

        extra["alphas"] = INTEGER_ALPHAS  # same orders the ledger uses for q > 0.5
    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=int(total_steps),
                accountant=accountant,
                epsilon_tolerance=0.01,
                **extra,
            )
        )
    except ValueError as exc:
        raise ConfigError(
            f"No noise level reaches epsilon={target_epsilon} at delta={delta} over {total_steps} steps "
            f"with q={sample_rate:.4g} ({exc}).",
            "Raise target_epsilon, or plan fewer rounds/epochs, or a smaller batch size.",
        ) from exc


def resolve_noise_multiplier(dp: DPSettings, n: int, settings: TrainSettings, rounds: int = 1) -> float:
    """sigma for a run: `dp.noise_multiplier` if set, else planned so that `rounds` rounds of
    `settings.epochs` local epochs on n samples cost at most `dp.target_epsilon` in total."""
    dp.validate()
    if not dp.enabled:
        return 0.0
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    if dp.target_epsilon is None:
        raise ConfigError(
            "DP is enabled but neither noise_multiplier nor target_epsilon is set.",
            "Set privacy.noise_multiplier (e.g. 1.0) or privacy.target_epsilon (e.g. 3.0) for the organization.",
        )
    q = sample_rate(n, settings.batch_size)
    total = rounds * settings.epochs * steps_per_epoch(n, settings.batch_size)
    return plan_noise_multiplier(dp.target_epsilon, dp.delta, q, total, dp.accountant)


def choose_grad_sample_mode(model: nn.Module, requested: str = "auto") -> str:
    """The per-sample-gradient mode to use: `requested`, or for "auto" the measured best for
    the model family (convolutional, all-linear, other)."""
    if requested != "auto":
        return requested
    kinds = {type(m) for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))}
    if any(issubclass(k, nn.modules.conv._ConvNd) for k in kinds):
        return AUTO_MODE["conv"]
    if kinds and all(issubclass(k, nn.Linear) for k in kinds):
        return AUTO_MODE["linear"]
    return AUTO_MODE["other"]


# --------------------------------------------------------------------------- training


def scheduled_lr(base_lr: float, schedule: str, rnd: int | None, rounds: int, *, lr_min: float = 0.0,
                 step_rounds: int = 1, gamma: float = 0.5) -> float:
    """The client learning rate of round `rnd` (1-based) of `rounds` (`[training] lr_schedule`).

    The round comes from the task, so every organization applies the same lr in the same round and
    a resumed run continues the schedule. constant: base_lr. cosine: base_lr in round 1, decaying
    towards lr_min (reached one round after the last, so the last round still learns). step: base_lr * gamma ** ((rnd - 1) // step_rounds). Without a round
    number (async tasks) the lr stays at base_lr.
    """
    if schedule == "constant" or rnd is None:
        return float(base_lr)
    r = min(max(int(rnd), 1), max(int(rounds), 1))
    if schedule == "cosine":
        frac = (r - 1) / max(int(rounds), 1)
        return float(lr_min + 0.5 * (base_lr - lr_min) * (1.0 + math.cos(math.pi * frac)))
    if schedule == "step":
        return float(base_lr * gamma ** ((r - 1) // max(int(step_rounds), 1)))
    raise ConfigError(f"Unknown lr_schedule {schedule!r}.", "Use 'constant', 'cosine' or 'step'.")


def task_round(task_id: str) -> int | None:
    """The round number a synchronous train task carries in its id ("RUN:round-N"), else None."""
    import re

    found = re.search(r":round-(\d+)$", task_id)
    return int(found.group(1)) if found else None


def _make_optimizer(params, s: TrainSettings) -> torch.optim.Optimizer:
    """SGD with the configured momentum (`[training] momentum`, default 0.9) or Adam; both with weight decay."""
    name = s.optimizer.strip().lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    raise ConfigError(f"Unknown optimizer {s.optimizer!r}.", "Use 'sgd' or 'adam'.")


def _check_inputs(model: nn.Module, ds: Dataset, settings: TrainSettings) -> None:
    if len(ds) == 0:
        raise FedveilError(f"Training set {ds.name!r} is empty.", "Give this organization some training data.")
    if settings.epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {settings.epochs}.", "Use e.g. 1.")
    if not settings.lr > 0:
        raise ConfigError(f"lr must be > 0, got {settings.lr}.", "Use e.g. 0.1 for SGD.")
    if ds.y.min() < 0 or (ds.num_classes and ds.y.max() >= ds.num_classes):
        raise FedveilError(f"Labels of {ds.name!r} are outside 0..{ds.num_classes - 1}.", "Check num_classes and the label column.")


def train(model: nn.Module, train_ds: Dataset, settings: TrainSettings, dp: DPSettings, noise_multiplier: float) -> TrainResult:
    """Train `model` in place for `settings.epochs` local epochs; DP-SGD when `dp.enabled`.

    `noise_multiplier` is sigma as resolved by the caller (planned over the whole run).
    Returns what the ledger needs: steps, sample rate, sigma.
    """
    _check_inputs(model, train_ds, settings)
    dp.validate()
    device = resolve_device(settings.device)
    home = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    n, B = len(train_ds), settings.batch_size
    q = sample_rate(n, B)
    spe = steps_per_epoch(n, B)
    total_steps = settings.epochs * spe

    mode = choose_grad_sample_mode(model, dp.grad_sample_mode) if dp.enabled else "none"
    if mode == "fused":
        _check_fused(model)
    torch.manual_seed(settings.seed)  # model-side randomness only (e.g. dropout)
    model.to(device)
    was_training = model.training
    model.train()
    X, y = _tensors(train_ds, device)
    criterion = nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    losses: list[float] = []
    seen = 0

    if not dp.enabled:
        gen = torch.Generator(device="cpu").manual_seed(settings.seed)
        opt = _make_optimizer(model.parameters(), settings)
        for _ in range(settings.epochs):
            perm = torch.randperm(n, generator=gen).to(device)
            for i in range(spe):
                idx = perm[i * B : (i + 1) * B]
                opt.zero_grad(set_to_none=True)
                loss = criterion(model(X[idx]), y[idx])
                loss.backward()
                opt.step()
                losses.append(loss.item())
                seen += len(idx)
        model.train(was_training)
        model.to(home)
        return TrainResult(n, total_steps, q, 0.0, _tail_mean(losses, spe), time.perf_counter() - t0, "none", seen, 0.0)

    sigma = float(noise_multiplier)
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}.", "Use e.g. 1.0.")
    C = float(dp.max_grad_norm)

    from opacus.grad_sample import prepare_module

    if dp.reproducible:
        seed_s, seed_n = settings.seed * 2 + 1, settings.seed * 2 + 2
    else:
        seed_s, seed_n = (int.from_bytes(os.urandom(8), "little") >> 1 for _ in range(2))
    sample_gen = torch.Generator(device="cpu").manual_seed(seed_s)
    noise = _noise_source(dp, seed_n, device)

    if mode == "fused":
        try:
            with warnings.catch_warnings():
                losses, seen = _train_fused(model, X, y, settings, sigma, C, q, total_steps, sample_gen, noise)
        finally:
            for p in model.parameters():
                p.grad = None
            model.train(was_training)
            model.to(home)
        return TrainResult(n, total_steps, q, sigma, _tail_mean(losses, spe), time.perf_counter() - t0, mode, seen, C,
                           total_steps - len(losses))

    kwargs = {"batch_first": True, "loss_reduction": "mean"}
    if mode == "ghost":
        kwargs["max_grad_norm"] = C
    try:
        gsm = prepare_module(model, mode, True, **kwargs)
    except NotImplementedError as exc:
        model.to(home)
        raise ConfigError(
            f"grad_sample_mode={mode!r} does not support this model ({exc}).",
            "Use grad_sample_mode='hooks' (or 'auto').",
        ) from exc
    base_opt = _make_optimizer(model.parameters(), settings)
    expected_bs = max(q * n, 1e-12)
    opt = _dp_optimizer_class(mode)(
        optimizer=base_opt,
        noise_multiplier=sigma,
        max_grad_norm=C,
        expected_batch_size=expected_bs,
        loss_reduction="mean",
        noise_fn=noise,
    )
    if mode == "ghost":
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        dp_criterion = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), "mean")
    try:
        with warnings.catch_warnings():
            # Opacus' hooks fire on the first layer whose input needs no grad: expected, harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(total_steps):
                mask = torch.rand(n, generator=sample_gen) < q
                idx = mask.nonzero().squeeze(1).to(device)
                opt.zero_grad(set_to_none=True)
                if len(idx) == 0:
                    _noise_only_step(opt, base_opt, sigma, C, expected_bs, noise)
                    continue
                out = gsm(X[idx])
                if mode == "ghost":
                    loss = dp_criterion(out, y[idx])
                else:
                    loss = criterion(out, y[idx])
                loss.backward()
                opt.step()
                losses.append(loss.item())
                seen += len(idx)
    finally:
        opt.zero_grad(set_to_none=True)
        gsm.cleanup()  # remove hooks and per-sample attributes from the original parameters
        for p in model.parameters():
            for attr in ("summed_grad",):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
        model.train(was_training)
        model.to(home)
    return TrainResult(n, total_steps, q, sigma, _tail_mean(losses, spe), time.perf_counter() - t0, mode, seen, C,
                       total_steps - len(losses))


NoiseFn = Callable[[float, torch.Tensor], torch.Tensor]  # (std, reference) -> N(0, std^2) shaped like reference


def _noise_source(dp: DPSettings, seed: int, device: torch.device) -> NoiseFn:
    """The DP-SGD noise: AES-256-CTR Gaussians (`SecureGaussian`, fresh key unless reproducible),
    or torch's Mersenne Twister through Opacus' own routine when `dp.noise_source == "torch"`
    (benchmarks only: it is what the secure stream is measured against)."""
    if dp.noise_source == "torch":
        from opacus.optimizers.optimizer import _generate_noise

        gen = torch.Generator(device=device).manual_seed(seed)
        return lambda std, ref: _generate_noise(std=std, reference=ref, generator=gen)
    stream = SecureGaussian.from_seed(seed, device) if dp.reproducible else SecureGaussian(device=device)

    def draw(std: float, ref: torch.Tensor) -> torch.Tensor:
        if std == 0:
            return torch.zeros_like(ref)
        return stream.normal(std, ref.numel()).to(device=ref.device, dtype=ref.dtype).view(ref.shape)

    return draw


class _NoiseFromSource:
    """Mixin for an Opacus DPOptimizer class: `add_noise` draws from a `NoiseFn` (the secure
    stream) instead of a torch.Generator. Same loop as Opacus' `add_noise` (std = sigma * C,
    or Opacus' `_adjusted_noise_multiplier` when set), so clipping, scaling and accounting are
    Opacus' own; only where the Gaussian comes from changes."""

    def __init__(self, *args, noise_fn: NoiseFn, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.noise_fn = noise_fn

    def add_noise(self) -> None:
        from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

        std = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier) * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + self.noise_fn(std, p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)


@functools.lru_cache(maxsize=None)
def _dp_optimizer_class(mode: str) -> type:
    """Opacus' flat-clipping optimizer for `mode`, with its noise drawn from a `NoiseFn`."""
    from opacus.optimizers import get_optimizer_class

    base = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode=mode)
    return type(f"SecureNoise{base.__name__}", (_NoiseFromSource, base), {})


def _check_fused(model: nn.Module) -> None:
    bad = sorted({type(m).__name__ for m in model.modules()
                  if any(p.requires_grad for p in m.parameters(recurse=False)) and not isinstance(m, nn.Linear)})
    if bad:
        raise ConfigError(
            f"grad_sample_mode='fused' only supports networks whose trainable layers are all nn.Linear; found {', '.join(bad)}.",
            "Use grad_sample_mode='auto' (or 'hooks'/'ew').",
        )


def _train_fused(model, X, y, settings, sigma, C, q, total_steps, sample_gen, noise):
    """DP-SGD for all-Linear networks with ghost clipping fused into one backward pass.

    For a Linear layer on (B, in) inputs, sample i's weight gradient is g_i a_i^T, so its
    squared norm is |g_i|^2 |a_i|^2 (+ |g_i|^2 for the bias): one backward pass to the layer
    outputs gives every per-sample norm without materializing per-sample gradients, and the
    clipped sum is (c * G)^T A. Same maths as Opacus flat clipping (clip factor
    min(1, C / (norm + 1e-6))), the same noise source as the Opacus modes, and division by the expected batch
    size q*n, so it is interchangeable with the other modes (tests check it against "hooks").
    """
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and any(p.requires_grad for p in m.parameters())]
    params = [p for p in model.parameters() if p.requires_grad]
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(mod, inp, out):
        captured.append((inp[0], out))

    handles = [m.register_forward_hook(hook) for m in layers]
    opt = _make_optimizer(params, settings)
    n = len(y)
    expected_bs = q * n
    losses: list[float] = []
    seen = 0
    try:
        for _ in range(total_steps):
            idx = (torch.rand(n, generator=sample_gen) < q).nonzero().squeeze(1).to(X.device)
            opt.zero_grad(set_to_none=True)
            grads: dict[torch.Tensor, torch.Tensor] = {}
            if len(idx):
                captured.clear()
                out = model(X[idx])
                per_sample = nn.functional.cross_entropy(out, y[idx], reduction="none")
                acts = list(captured)
                if any(a.dim() != 2 for a, _ in acts):
                    raise ConfigError(
                        "grad_sample_mode='fused' needs 2-D (batch, features) inputs to every Linear layer.",
                        "Use grad_sample_mode='ghost' or 'hooks' for sequence models.",
                    )
                gs = torch.autograd.grad(per_sample.sum(), [z for _, z in acts])
                with torch.no_grad():
                    sq = torch.zeros(len(idx), device=X.device, dtype=out.dtype)
                    for (a, _), g, m in zip(acts, gs, layers):
                        g2 = g.pow(2).sum(1)
                        if m.weight.requires_grad:
                            sq += g2 * a.pow(2).sum(1)
                        if m.bias is not None and m.bias.requires_grad:
                            sq += g2
                    clip = (C / (sq.sqrt() + 1e-6)).clamp(max=1.0)
                    for (a, _), g, m in zip(acts, gs, layers):
                        gc = g * clip[:, None]
                        if m.weight.requires_grad:
                            grads[m.weight] = gc.t() @ a
                        if m.bias is not None and m.bias.requires_grad:
                            grads[m.bias] = gc.sum(0)
                losses.append(per_sample.mean().item())
                seen += len(idx)
            with torch.no_grad():
                for p in params:  # same order and noise source as _NoiseFromSource.add_noise
                    summed = grads.get(p)
                    if summed is None:
                        summed = torch.zeros_like(p)
                    p.grad = ((summed + noise(sigma * C, summed)) / expected_bs).view_as(p)
            opt.step()
    finally:
        for h in handles:
            h.remove()
        captured.clear()
    return losses, seen


def _noise_only_step(opt, base_opt, sigma, C, expected_bs, noise: NoiseFn) -> None:
    """A Poisson draw selected nobody: release only noise, as DP-SGD on an empty batch does."""
    with torch.no_grad():
        for p in opt.params:
            p.grad = noise(sigma * C, torch.zeros_like(p)) / expected_bs
    base_opt.step()
    base_opt.zero_grad(set_to_none=True)
    for p in opt.params:
        p.grad_sample = None


def _tail_mean(losses: list[float], k: int) -> float:
    if not losses:
        return float("nan")
    tail = losses[-k:]
    return float(sum(tail) / len(tail))
