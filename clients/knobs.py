"""EXPERIMENT KNOBS: make an organization artificially slow or unreliable. Not production settings.

Demos, simulations and benchmarks need heterogeneous clients on one host. Each `[[orgs]]` entry may
set `speed_factor` (relative compute speed, 0.2 = five times slower), `latency` (seconds added to
every train reply) and `dropout` (probability that a train task is abandoned). The organization's own
node applies them around each train task, so the server sees exactly what it would see from a slow
or flaky real client. A dropped task is abandoned *before* training: no update and no privacy spent.
They default to a normal client (1.0, 0.0, 0.0) and do nothing then.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from fedveil.platform.config import FedveilConfig


@dataclass(frozen=True)
class Knobs:
    speed_factor: float = 1.0
    latency: float = 0.0
    dropout: float = 0.0

    @property
    def active(self) -> bool:
        return self.speed_factor != 1.0 or self.latency > 0 or self.dropout > 0


def knobs_for(cfg: FedveilConfig, org: str) -> Knobs:
    o = cfg.org(org)
    return Knobs(float(o.speed_factor), float(o.latency), float(o.dropout))


def drops_out(knobs: Knobs) -> bool:
    """Draw whether this task is abandoned (os.urandom: the server cannot predict it)."""
    if knobs.dropout <= 0:
        return False
    return int.from_bytes(os.urandom(4), "big") / 2**32 < knobs.dropout


def slow_down(knobs: Knobs, busy_seconds: float) -> float:
    """Sleep so the task looks `1/speed_factor` times slower plus `latency`; returns the seconds added."""
    extra = max(0.0, busy_seconds) * (1.0 / knobs.speed_factor - 1.0) + knobs.latency
    if extra > 0:
        time.sleep(extra)
    return extra
