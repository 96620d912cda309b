"""The model zoo: small Opacus-compatible models, plus user factories.

`build_model("mlp" | "cnn" | "scatternet" | "package.module:factory", input_shape, num_classes, **kwargs)`.
Every model returned passes Opacus' `ModuleValidator` (no BatchNorm; GroupNorm instead), so
DP-SGD works on it without surgery.
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fedveil.platform.config import BUILTIN_MODELS
from fedveil.platform.errors import ConfigError, FedveilError

if TYPE_CHECKING:
    from fedveil.platform.config import FedveilConfig
    from fedveil.platform.data import Dataset

IMAGE_MODELS: tuple[str, ...] = ("cnn", "scatternet")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def _activation(name: str) -> type[nn.Module]:
    try:
        return ACTIVATIONS[name.strip().lower()]
    except KeyError:
        raise ConfigError(f"Unknown activation {name!r}.", f"Use one of {', '.join(ACTIVATIONS)}.") from None


class MLP(nn.Module):
    """Flatten -> [Linear -> activation] * len(hidden) -> Linear."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (64,), dropout: float = 0.0,
                 activation: str = "relu"):
        super().__init__()
        act = _activation(activation)
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, int(h)), act()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            prev = int(h)
        layers.append(nn.Linear(prev, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class CNN(nn.Module):
    """A small CNN for 1-channel images.

    For inputs of at least 16x16 (MNIST) this is the Opacus MNIST example network (26,010
    parameters at 28x28): conv 16@8x8/2 -> maxpool 2/1 -> conv 32@4x4/2 -> maxpool 2/1 -> fc 32 -> fc.
    For small inputs (8x8 digits), where that network's strides would shrink the image to
    nothing, it uses 3x3 convolutions with GroupNorm: conv 16@3x3 -> GN -> conv 32@3x3/2 -> GN -> fc 32 -> fc.
    `activation="tanh"` follows Papernot et al. (2021, "Tempered sigmoid activations for deep learning
    with differential privacy"): bounded activations keep clipped DP-SGD gradients informative.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, groupnorm: bool | None = None,
                 activation: str = "relu"):
        super().__init__()
        act = _activation(activation)
        c, h, w = _chw(input_shape)
        if min(h, w) >= 16:
            gn = bool(groupnorm)
            self.features = nn.Sequential(
                nn.Conv2d(c, 16, 8, stride=2, padding=3),
                *( [nn.GroupNorm(4, 16)] if gn else [] ),
                act(),
                nn.MaxPool2d(2, 1),
                nn.Conv2d(16, 32, 4, stride=2),
                *( [nn.GroupNorm(8, 32)] if gn else [] ),
                act(),
                nn.MaxPool2d(2, 1),
            )
        else:
            gn = True if groupnorm is None else bool(groupnorm)
            self.features = nn.Sequential(
                nn.Conv2d(c, 16, 3, padding=1),
                *( [nn.GroupNorm(4, 16)] if gn else [] ),
                act(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                *( [nn.GroupNorm(8, 32)] if gn else [] ),
                act(),
            )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, c, h, w)).numel()
        if flat == 0:
            raise ConfigError(f"Input shape {tuple(input_shape)} is too small for the cnn model.", "Use 'mlp' for this data.")
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 32), act(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _morlet(sigma: float, theta: float, xi: float, slant: float, radius: int) -> np.ndarray:
    """A zero-mean complex Morlet wavelet on a (2r+1)^2 grid: a Gabor wave along `theta` under a Gaussian
    envelope (wider across the wave by 1/slant), minus the envelope times the wave's mean so it has no
    DC response. The parameters are kymatio's (Andreux et al. 2020), which Tramer & Boneh used."""
    u, v = np.mgrid[-radius:radius + 1, -radius:radius + 1].astype(np.float64)
    along = u * math.cos(theta) + v * math.sin(theta)
    across = -u * math.sin(theta) + v * math.cos(theta)
    envelope = np.exp(-(along ** 2 + (slant * across) ** 2) / (2 * sigma ** 2))
    wave = envelope * np.exp(1j * xi * along)
    return (wave - envelope * (wave.sum() / envelope.sum())) / (2 * math.pi * sigma ** 2 / slant)


def _gaussian(sigma: float, radius: int) -> np.ndarray:
    u, v = np.mgrid[-radius:radius + 1, -radius:radius + 1].astype(np.float64)
    g = np.exp(-(u ** 2 + v ** 2) / (2 * sigma ** 2))
    return g / g.sum()


class Scattering2D(nn.Module):
    """A fixed second-order wavelet scattering transform (Bruna & Mallat 2013), J = 2 scales, L = 8 angles.

    Why: DP-SGD clips and noises every trained coordinate, so features nobody has to learn cost no
    privacy; Tramer & Boneh (2021, "Differentially private learning needs better features") showed a
    small model on scattering features beats end-to-end CNNs at the same ε. On MNIST it lifted the
    federation's DP accuracy most on the splits where the CNN did worst (docs/benchmarks.md).
    Output per input channel: 81 maps (1 low-pass, 16 first-order, 64 second-order) at 1/4 resolution.
    It is plain strided convolutions with truncated (±3σ) Morlet kernels held in non-persistent buffers:
    nothing is trained or sent, and it scripts, traces and exports to ONNX like any CNN.
    """

    J = 2
    L = 8

    def __init__(self) -> None:
        super().__init__()
        slant = 4.0 / self.L
        for j in range(self.J):  # psi{j}: (2L, 1, k, k), the real parts, then the imaginary ones
            sigma = 0.8 * 2 ** j
            radius = math.ceil(3 * sigma / slant)
            waves = np.stack([_morlet(sigma, t * math.pi / self.L, 0.75 * math.pi / 2 ** j, slant, radius)
                              for t in range(self.L)])
            psi = torch.tensor(np.concatenate([waves.real, waves.imag])[:, None], dtype=torch.float32)
            self.register_buffer(f"psi{j}", psi, persistent=False)
        # the low-pass at full and at half resolution (the same Gaussian, sampled on each grid)
        for j in range(self.J):
            sigma = 0.8 * 2 ** (self.J - 1) / 2 ** j
            phi = torch.tensor(_gaussian(sigma, math.ceil(3 * sigma)), dtype=torch.float32)[None, None]
            self.register_buffer(f"phi{j}", phi, persistent=False)

    @staticmethod
    def _conv(x: torch.Tensor, kernel: torch.Tensor, stride: int) -> torch.Tensor:
        pad = kernel.shape[-1] // 2
        return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, stride=stride)

    @staticmethod
    def _modulus(z: torch.Tensor) -> torch.Tensor:
        half = z.shape[1] // 2
        return torch.sqrt(z[:, :half] ** 2 + z[:, half:] ** 2)

    def _lowpass(self, u: torch.Tensor, phi: torch.Tensor, stride: int) -> torch.Tensor:
        n, c, h, w = u.shape
        s = self._conv(u.reshape(n * c, 1, h, w), phi, stride)
        return s.reshape(n, c, s.shape[-2], s.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b * c, 1, h, w)
        u1_fine = self._modulus(self._conv(x, self.psi0, 1))  # scale 0 at full resolution
        u1_coarse = self._modulus(self._conv(x, self.psi1, 2))  # scale 1 at half resolution
        n, k, hf, wf = u1_fine.shape
        u2 = self._modulus(self._conv(u1_fine.reshape(n * k, 1, hf, wf), self.psi1, 2))  # scale 0 -> 1
        u2 = u2.reshape(n, k * u2.shape[1], u2.shape[-2], u2.shape[-1])
        s = torch.cat([self._lowpass(x, self.phi0, 4), self._lowpass(u1_fine, self.phi0, 4),
                       self._lowpass(u1_coarse, self.phi1, 2), self._lowpass(u2, self.phi1, 2)], dim=1)
        return s.reshape(b, c * s.shape[1], s.shape[-2], s.shape[-1])


class ScatterNet(nn.Module):
    """Scattering features, then a small trained CNN: Tramer & Boneh's (2021) ScatterNet+CNN for MNIST.

    scattering (81 maps per channel at 1/4 resolution, fixed) -> GroupNorm(27, no affine: per-sample
    normalization, so DP-SGD needs no batch statistics) -> conv 16@3x3/2 -> act -> conv 32@3x3 -> act ->
    fc 32 -> act -> fc. 33,066 trained parameters at 28x28 (the cnn: 26,010).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, activation: str = "relu"):
        super().__init__()
        act = _activation(activation)
        c, h, w = _chw(input_shape)
        if min(h, w) < 16:
            raise ConfigError(f"Input shape {tuple(input_shape)} is too small for the scatternet model "
                              "(its wavelets need at least 16x16 pixels).", "Use 'cnn' or 'mlp' for this data.")
        self.scattering = Scattering2D()
        channels = 81 * c
        self.features = nn.Sequential(
            nn.GroupNorm(27, channels, affine=False),
            nn.Conv2d(channels, 16, 3, stride=2, padding=1), act(),
            nn.Conv2d(16, 32, 3, padding=1), act(),
        )
        with torch.no_grad():
            flat = self.features(self.scattering(torch.zeros(1, c, h, w))).numel()
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(flat, 32), act(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.scattering(x)))


def _chw(input_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 1 and math.isqrt(shape[0]) ** 2 == shape[0]:
        s = math.isqrt(shape[0])
        raise ConfigError(
            f"The image models ({', '.join(IMAGE_MODELS)}) need image inputs (C, H, W); got flat features of size {shape[0]}.",
            f"Load the data as images (image=True, e.g. shape (1, {s}, {s})), or use the 'mlp' model.",
        )
    raise ConfigError(
        f"The image models ({', '.join(IMAGE_MODELS)}) need image inputs (C, H, W); got input shape {shape}.",
        "Use the 'mlp' model for tabular data.",
    )


def model_kind(name: str) -> str:
    """'image' when the model needs (C, H, W) inputs, 'tabular' for flat features, 'any' for user factories."""
    key = name.strip().lower()
    if key in IMAGE_MODELS:
        return "image"
    if key == "mlp":
        return "tabular"
    return "any"


def model_kwargs(name: str, hidden: Sequence[int] = (64,), activation: str = "relu",
                 groupnorm: bool | None = None) -> dict:
    """The keyword arguments `build_model` takes for a `[model]` section: stored with checkpoints so
    an exported model is rebuilt exactly (the defaults are left out, for older factories' sake)."""
    key = name.strip().lower()
    kwargs: dict = {}
    if key == "mlp":
        kwargs["hidden"] = [int(h) for h in hidden]
    if key in BUILTIN_MODELS and activation != "relu":
        kwargs["activation"] = activation
    if key == "cnn" and groupnorm is not None:
        kwargs["groupnorm"] = bool(groupnorm)
    return kwargs


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    """Build a model by name. Custom models: "package.module:factory", called as
    factory(input_shape=..., num_classes=..., **kwargs) and validated for Opacus."""
    key = name.strip()
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}.", "Check the dataset's labels.")
    if key.lower() == "mlp":
        hidden = kwargs.pop("hidden", kwargs.pop("hidden_sizes", (64,)))
        if isinstance(hidden, int):
            hidden = (hidden,)
        in_features = int(math.prod(input_shape))
        model: nn.Module = MLP(in_features, num_classes, hidden=tuple(hidden), **kwargs)
    elif key.lower() == "cnn":
        model = CNN(input_shape, num_classes, **kwargs)
    elif key.lower() == "scatternet":
        model = ScatterNet(input_shape, num_classes, **kwargs)
    elif ":" in key:
        model = _from_factory(key, input_shape, num_classes, **kwargs)
    else:
        raise ConfigError(
            f"Unknown model {name!r}.",
            f"Use one of {', '.join(BUILTIN_MODELS)}, or 'package.module:factory' for your own model.",
        )
    _validate_for_dp(model, key)
    return model


def _from_factory(spec: str, input_shape, num_classes, **kwargs) -> nn.Module:
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ConfigError(f"Model spec {spec!r} is not 'package.module:factory'.", "Write it as e.g. 'mypkg.models:build'.")
    try:
        module = importlib.import_module(mod_name)
    except Exception as exc:
        raise ConfigError(
            f"Could not import model module {mod_name!r} ({type(exc).__name__}: {exc}).",
            "Make sure the package is installed on every client (pip install it) and the name is spelled right.",
        ) from exc
    factory = module
    try:
        for part in attr.split("."):
            factory = getattr(factory, part)
    except AttributeError:
        raise ConfigError(
            f"Module {mod_name!r} has no attribute {attr!r}.",
            f"Check the factory name after ':' in {spec!r}.",
        ) from None
    if not callable(factory):
        raise ConfigError(f"{spec!r} is not callable.", "Point at a function or class that builds an nn.Module.")
    try:
        model = factory(input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)
    except Exception as exc:
        raise ConfigError(
            f"Model factory {spec!r} failed: {type(exc).__name__}: {exc}.",
            "It is called as factory(input_shape=..., num_classes=...); make it accept those keywords.",
        ) from exc
    if not isinstance(model, nn.Module):
        raise ConfigError(f"Model factory {spec!r} returned {type(model).__name__}, not a torch.nn.Module.", "Return an nn.Module.")
    return model


def _validate_for_dp(model: nn.Module, name: str) -> None:
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        msgs = "; ".join(str(e) for e in errors[:5])
        raise ConfigError(
            f"Model {name!r} cannot be trained with DP-SGD: {msgs}.",
            "Replace BatchNorm with GroupNorm/LayerNorm (opacus.validators.ModuleValidator.fix(model) does it) "
            "and avoid modules Opacus cannot compute per-sample gradients for.",
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_configured_model(cfg: "FedveilConfig", input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model a federation's `[model]` section names: the server and every client build the same one."""
    m = cfg.model
    return build_model(m.name, input_shape, num_classes, **model_kwargs(m.name, m.hidden, m.activation, m.groupnorm))


def model_arrays(model: nn.Module) -> list[np.ndarray]:
    """The state_dict as numpy copies, in order: what travels and what the server averages."""
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_model_arrays(model: nn.Module, arrays: list[np.ndarray]) -> None:
    """Load `model_arrays` output back; a tensor-count mismatch means the parties disagree on the model."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(arrays):
        raise FedveilError(
            f"the server's model has {len(arrays)} tensors, this client's has {len(keys)}",
            "make sure every organization uses the same [model] section and data schema",
        )
    model.load_state_dict({k: torch.as_tensor(a) for k, a in zip(keys, arrays)}, strict=True)


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when there is one; a device that does not exist is a config error, not a crash."""
    key = (name or "auto").strip().lower()
    if key == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(key)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"Unknown device {name!r}.", "Use 'auto', 'cpu', 'cuda' or 'cuda:N'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {name!r} was requested but no CUDA GPU is available.", "Use device='auto' or 'cpu'.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"Device {name!r} does not exist ({torch.cuda.device_count()} GPU(s)).", "Use 'cuda:0' or 'auto'.")
    return dev


def dataset_tensors(ds: "Dataset", device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features float32, labels int64) of a whole dataset on `device`."""
    return torch.from_numpy(np.ascontiguousarray(ds.X, dtype=np.float32)).to(device), torch.from_numpy(
        np.ascontiguousarray(ds.y, dtype=np.int64)
    ).to(device)


@torch.no_grad()
def evaluate(model: nn.Module, ds: "Dataset", device: str | torch.device = "auto",
             batch_size: int = 2048) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of `model` on `ds`; the model is left where it was.

    Shared by the clients' validation and the server's held-out evaluation, so both score alike."""
    if len(ds) == 0:
        return float("nan"), float("nan")
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    home = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    was_training = model.training
    model.to(dev).eval()
    X, y = dataset_tensors(ds, dev)
    total_loss, correct = 0.0, 0
    for i in range(0, len(ds), batch_size):
        out = model(X[i : i + batch_size])
        total_loss += nn.functional.cross_entropy(out, y[i : i + batch_size], reduction="sum").item()
        correct += (out.argmax(1) == y[i : i + batch_size]).sum().item()
    model.train(was_training)
    model.to(home)
    return total_loss / len(ds), correct / len(ds)
