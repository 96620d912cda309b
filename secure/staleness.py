"""Staleness weights alpha(s) for async and semi-sync-carry aggregates, and the rule a proxy checks them by.

The server used to send each client's weight, and a proxy summed with whatever it got: weights
{victim: 1, other: 0} made an "aggregate of two" equal to the victim's update. Now the server
sends only each client's staleness s_i (versions behind), and every party (each proxy from its
own config, the server for its normalization) computes alpha(s_i) with the one function below.
Every alpha is then at least the floor alpha(max_staleness) of the computing party's config and at
most 1, so one client can outweigh another by at most 1 / floor; a staleness outside
[0, max_staleness] is refused, never clamped.

`bounds` is anything with the `[async]` keys (`fedveil.platform.config.AsyncSection` qualifies);
this module stays free of the platform layer.
"""

from __future__ import annotations

import math
from typing import Mapping, Protocol


class StalenessBounds(Protocol):
    """The `[async]` keys that define alpha: function, its parameters, and the largest staleness."""

    staleness: str
    staleness_exponent: float
    hinge_a: float
    hinge_b: int
    max_staleness: int


def staleness_weight(s: int, bounds: StalenessBounds) -> float:
    """alpha(s) for an update s versions old: constant 1, polynomial (1+s)^-a, or hinge (FedBuff / FedAsync).

    Non-increasing in s for every function, so alpha(max_staleness) is the smallest weight allowed.
    """
    s = max(0, int(s))
    if bounds.staleness == "constant":
        return 1.0
    if bounds.staleness == "polynomial":
        return float((1.0 + s) ** (-bounds.staleness_exponent))
    if bounds.staleness == "hinge":
        return 1.0 if s <= bounds.hinge_b else 1.0 / (bounds.hinge_a * (s - bounds.hinge_b) + 1.0)
    raise ValueError(f"unknown staleness function {bounds.staleness!r}")


def weight_floor(bounds: StalenessBounds) -> float:
    """The smallest weight any client may get: alpha(async.max_staleness)."""
    return staleness_weight(bounds.max_staleness, bounds)


def staleness_problem(s: object, bounds: StalenessBounds) -> str | None:
    """Why `s` is not a usable staleness under `bounds` (None when it is): an integer in [0, max_staleness]."""
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s != int(s):
        return f"staleness {s!r} is not a whole number of versions"
    if s < 0:
        return f"staleness {int(s)} is negative"
    if s > bounds.max_staleness:
        return f"staleness {int(s)} exceeds async.max_staleness={bounds.max_staleness} in this party's config"
    return None


def staleness_weights(staleness: Mapping[str, object], client_ids: list[str] | tuple[str, ...],
                      bounds: StalenessBounds) -> tuple[dict[str, float], dict[str, str]]:
    """({client: alpha(s_i)}, {client: reason}) for `client_ids`; a client missing from `staleness` is fresh (s = 0)."""
    weights: dict[str, float] = {}
    refused: dict[str, str] = {}
    for cid in client_ids:
        s = staleness.get(cid, 0)
        problem = staleness_problem(s, bounds)
        if problem is None:
            weights[cid] = staleness_weight(int(s), bounds)
        else:
            refused[cid] = problem
    return weights, refused
