"""Fixed-point codec between float64 vectors and the ring Z_2^64 (numpy uint64, wrap-around).

encode: clip to [-clip, clip], then round(x * 2^f) as a two's-complement int64 viewed as uint64.
decode: interpret uint64 as int64 (two's complement), divide by 2^(f + extra_bits).

Overflow bound (what `check_overflow` enforces). The vectors that reach the codec are already
weighted by the client's sample count n_i, and proxies may multiply each client's shares by an
integer weight round(alpha_i * 2^q). With |delta| <= clip per coordinate, the decoded total is
exact as long as

    sum_i round(alpha_i 2^q) * n_i * clip * 2^f  <=  max_factor * 2^q * max_weight_sum * clip * 2^f  <  2^63

where max_weight_sum bounds sum_i n_i (e.g. 100 clients x 1000 samples = 1e5, about 2^17) and
max_factor bounds alpha_i (1 for FedAvg / staleness weights <= 1). With the defaults f = 24, q = 16
and clip = 1 that leaves 63 - 24 - 16 = 23 bits for sum_i n_i: up to about 8.4e6 samples per
aggregate. Without proxy weights (q = 0) it is 39 bits. Rounding adds at most 1/2 ulp (2^-f-1)
per client, so the absolute error of the total is <= m * 2^-(f+1) for m clients (3e-6 at m = 100 in
the worst case, typically far less because rounding errors cancel).
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_FRAC_BITS = 24
RING_BITS = 64


def _check_frac_bits(frac_bits: int) -> int:
    f = int(frac_bits)
    if not 0 <= f <= 52:
        raise ValueError(f"secure.frac_bits must be between 0 and 52, got {frac_bits}")
    return f


def encode(values: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS, clip: float | None = None) -> np.ndarray:
    """float64 -> uint64 in Z_2^64 with `frac_bits` fractional bits, after clipping to [-clip, clip]."""
    f = _check_frac_bits(frac_bits)
    x = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise ValueError("update contains NaN or infinite values")
    if clip is not None:
        if not (clip > 0 and math.isfinite(clip)):
            raise ValueError(f"secure.clip_range must be a positive finite number, got {clip}")
        x = np.clip(x, -clip, clip)
    scaled = np.rint(x * float(2**f))
    limit = float(2**62)  # keep one bit of headroom below 2^63 for a single value
    if scaled.size and float(np.max(np.abs(scaled))) >= limit:
        raise ValueError(
            f"value {float(np.max(np.abs(x))):.3g} does not fit the fixed-point ring with secure.frac_bits={f}; "
            "lower secure.frac_bits or set a smaller secure.clip_range"
        )
    return scaled.astype(np.int64).view(np.uint64)


def decode(encoded: np.ndarray, frac_bits: int = DEFAULT_FRAC_BITS, extra_bits: int = 0) -> np.ndarray:
    """uint64 in Z_2^64 -> float64, two's-complement; divides by 2^(frac_bits + extra_bits)."""
    f = _check_frac_bits(frac_bits)
    arr = np.asarray(encoded, dtype=np.uint64).ravel()
    return arr.view(np.int64).astype(np.float64) / float(2 ** (f + int(extra_bits)))


def worst_case_bits(clip: float, frac_bits: int, max_weight_sum: float, max_factor: float = 1.0, weight_bits: int = 0) -> float:
    """log2 of the largest |encoded total| the configuration allows (must stay below 63)."""
    bound = float(clip) * float(max_weight_sum) * float(max_factor) * 2.0 ** (int(frac_bits) + int(weight_bits))
    return math.log2(bound) if bound > 0 else -math.inf


def check_overflow(
    clip: float,
    frac_bits: int,
    max_weight_sum: float,
    max_factor: float = 1.0,
    weight_bits: int = 0,
) -> None:
    """Raise ValueError if the worst-case aggregate could wrap 2^63 in Z_2^64.

    clip: bound on |delta| per coordinate (secure.clip_range); max_weight_sum: bound on sum_i n_i over
    one aggregate; max_factor: bound on the proxies' public per-client factors (staleness weights);
    weight_bits: the q in the integer weights round(w * 2^q) applied by the proxies.
    """
    _check_frac_bits(frac_bits)
    for name, value in (("secure.clip_range", clip), ("max_weight_sum", max_weight_sum), ("max_factor", max_factor)):
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive finite number, got {value}")
    bits = worst_case_bits(clip, frac_bits, max_weight_sum, max_factor, weight_bits)
    if bits >= RING_BITS - 1:
        raise ValueError(
            f"secure-sharing configuration could overflow Z_2^64: clip {clip} x weight sum {max_weight_sum:g} x "
            f"factor {max_factor:g} x 2^(frac_bits {frac_bits} + weight_bits {weight_bits}) needs {bits:.1f} bits "
            f"(> 63). Lower secure.frac_bits or secure.clip_range (or the weight precision)."
        )
