import numpy as np
import pytest

from fedveil.secure import fixedpoint as fp


def test_roundtrip_precision():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1000, 1000, 10_000)
    y = fp.decode(fp.encode(x, 24), 24)
    assert np.max(np.abs(x - y)) <= 2.0**-25 + 1e-12


def test_negative_two_complement_and_wrapping_sum():
    a = fp.encode(np.array([-1.5, 2.25]), 24)
    b = fp.encode(np.array([0.5, -3.0]), 24)
    assert a.dtype == np.uint64
    np.testing.assert_allclose(fp.decode(a + b, 24), [-1.0, -0.75])


def test_clip():
    np.testing.assert_allclose(fp.decode(fp.encode(np.array([-5.0, 5.0, 0.5]), 16, clip=1.0), 16), [-1, 1, 0.5])


def test_non_finite_and_unrepresentable_rejected():
    with pytest.raises(ValueError):
        fp.encode(np.array([np.nan]))
    with pytest.raises(ValueError, match="secure.frac_bits"):
        fp.encode(np.array([2.0**40]), 24)


def test_extra_bits_decode():
    assert fp.decode(fp.encode(np.array([3.0]), 10) * np.uint64(4), 10, extra_bits=2)[0] == 3.0


def test_check_overflow_accepts_and_refuses():
    fp.check_overflow(clip=1.0, frac_bits=24, max_weight_sum=1e5, max_factor=1.0, weight_bits=16)
    with pytest.raises(ValueError, match=r"secure\.frac_bits.*secure\.clip_range"):
        fp.check_overflow(clip=10.0, frac_bits=40, max_weight_sum=1e5, weight_bits=16)
    with pytest.raises(ValueError):
        fp.check_overflow(clip=1.0, frac_bits=24, max_weight_sum=2.0**39)  # exactly at 2^63
    fp.check_overflow(clip=1.0, frac_bits=24, max_weight_sum=2.0**38)
