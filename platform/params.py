"""Model parameters as numpy arrays, and the flat vector the secure modes work on.

The secure modes see one flat float64 vector per client; the engines see per-layer arrays.
These two small functions are the only bridge, so the layout is defined in one place.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate layers into one float64 vector (layer order is the model's state order)."""
    if not arrays:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def unflatten(vector: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Split a flat vector back into arrays shaped (and typed) like `like`."""
    sizes = [int(np.prod(a.shape)) for a in like]
    if int(vector.size) != sum(sizes):
        raise ValueError(f"vector has {vector.size} values, the model has {sum(sizes)}")
    out, offset = [], 0
    for a, size in zip(like, sizes):
        out.append(vector[offset : offset + size].reshape(a.shape).astype(a.dtype, copy=False))
        offset += size
    return out
