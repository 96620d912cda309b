"""Model zoo (fedveil.platform.models)."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from opacus.validators import ModuleValidator

from fedveil.platform import models as M
from fedveil.platform.errors import ConfigError, FedveilError


@pytest.mark.parametrize(
    "name,shape,k",
    [("mlp", (30,), 2), ("mlp", (1, 8, 8), 10), ("cnn", (1, 8, 8), 10), ("cnn", (1, 28, 28), 10), ("cnn", (28, 28), 10)],
)
def test_shapes_and_opacus_valid(name, shape, k):
    m = M.build_model(name, shape, k)
    x = torch.randn(5, *shape) if len(shape) != 2 else torch.randn(5, 1, *shape)
    assert m(x).shape == (5, k)
    assert ModuleValidator.is_valid(m)


def test_cnn_mnist_matches_opacus_example_size():
    assert M.count_parameters(M.build_model("cnn", (1, 28, 28), 10)) == 26010


def test_mlp_hidden_sizes():
    m = M.build_model("mlp", (20,), 3, hidden=(16, 8))
    assert M.count_parameters(m) == 20 * 16 + 16 + 16 * 8 + 8 + 8 * 3 + 3
    assert M.count_parameters(M.build_model("mlp", (30,), 2)) == 30 * 64 + 64 + 64 * 2 + 2


def test_model_kind():
    assert M.model_kind("cnn") == "image" and M.model_kind("mlp") == "tabular"
    assert M.model_kind("x.y:z") == "any"


def test_cnn_rejects_flat_input():
    with pytest.raises(ConfigError, match="image inputs") as ei:
        M.build_model("cnn", (64,), 10)
    assert "image=True" in ei.value.fix


def test_user_factory(tmp_path, monkeypatch):
    (tmp_path / "orgmodels.py").write_text(textwrap.dedent("""
        import torch
        def build(input_shape, num_classes, width=7):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0], width), torch.nn.ReLU(), torch.nn.Linear(width, num_classes))
        def bad_bn(input_shape, num_classes):
            return torch.nn.Sequential(torch.nn.Linear(input_shape[0], 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, num_classes))
        def not_a_module(input_shape, num_classes):
            return 42
        def wrong_sig():
            return None
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    m = M.build_model("orgmodels:build", (12,), 3, width=5)
    assert m(torch.randn(2, 12)).shape == (2, 3) and m[1].out_features == 5
    with pytest.raises(ConfigError, match="DP-SGD.*BatchNorm|cannot be trained with DP"):
        M.build_model("orgmodels:bad_bn", (12,), 3)
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        M.build_model("orgmodels:not_a_module", (12,), 3)
    with pytest.raises(ConfigError, match="factory.*failed"):
        M.build_model("orgmodels:wrong_sig", (12,), 3)
    sys.modules.pop("orgmodels", None)


@pytest.mark.parametrize(
    "spec,match",
    [("resnet9000", "Unknown model"), ("no_such_pkg_xyz.models:build", "Could not import"), ("json:nope", "no attribute"), (":f", "not 'package.module:factory'")],
)
def test_bad_model_names(spec, match):
    with pytest.raises(FedveilError, match=match) as ei:
        M.build_model(spec, (4,), 2)
    assert ei.value.fix


# --------------------------------------------------------------------------- scatternet


def test_scatternet_trains_and_sends_only_its_head():
    """The wavelets are fixed: no parameter, nothing in the state_dict (so nothing travels or is averaged),
    and the 81 scattering maps per channel feed a CNN that Opacus can train."""
    m = M.build_model("scatternet", (1, 28, 28), 10, activation="tanh")
    assert not list(m.scattering.parameters()) and not m.scattering.state_dict()
    assert all(not k.startswith("scattering") for k in m.state_dict())
    assert M.count_parameters(m) == sum(a.size for a in M.model_arrays(m)) == 33066
    assert m.scattering(torch.randn(2, 3, 28, 28)).shape == (2, 3 * 81, 7, 7)
    assert ModuleValidator.is_valid(m) and M.model_kind("scatternet") == "image"
    with pytest.raises(ConfigError, match="too small for the scatternet"):
        M.build_model("scatternet", (1, 8, 8), 10)


def test_scattering_is_a_wavelet_transform():
    """What makes the features worth having, checked on images with a known answer: the wavelets have no
    DC response (a flat image has only its low-pass channel, equal to the image's value), the low-pass
    averages, and each first-order channel responds to stripes of its own orientation."""
    s = M.Scattering2D()
    flat = s(torch.full((1, 1, 28, 28), 0.7))
    torch.testing.assert_close(flat[0, 0], torch.full((7, 7), 0.7))
    assert flat[0, 1:].abs().max() < 1e-5
    rows, cols = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    xi = 0.75 * torch.pi  # the finest wavelets' frequency
    for angle_index in range(s.L):
        theta = torch.tensor(angle_index * torch.pi / s.L)
        stripes = torch.cos(xi * (rows * torch.cos(theta) + cols * torch.sin(theta)))
        first_order_fine = s(stripes[None, None])[0, 1:1 + s.L, 2:-2, 2:-2].mean(dim=(1, 2))
        assert int(first_order_fine.argmax()) == angle_index
    # modulus and convolutions: scaling the image scales every coefficient
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(s(3.0 * x), 3.0 * s(x), rtol=1e-4, atol=1e-5)
