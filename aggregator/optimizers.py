"""Server optimizers applied to the aggregate update (Reddi et al., 2020, "Adaptive Federated Optimization").

Flower's FedAdam/FedYogi strategies compute the average themselves from plaintext replies; here the
average arrives from the proxies already aggregated, so the server only needs the update rule.
All state is flat float64 vectors so it checkpoints as plain arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ServerOptimizer:
    """w <- step(w, mean_delta). `kind` is fedavg, fedadam or fedyogi.

    fedavg with `momentum` > 0 is FedAvgM (Hsu et al., 2019): m <- momentum * m + mean_delta,
    w <- w + lr * m. Under DP the aggregate is noisy and clients are label-skewed; momentum
    averages the noise over rounds and damps the client drift.
    """

    kind: str = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    momentum: float = 0.0
    m: np.ndarray | None = field(default=None, repr=False)
    v: np.ndarray | None = field(default=None, repr=False)

    def step(self, weights: np.ndarray, mean_delta: np.ndarray) -> np.ndarray:
        if self.kind == "fedavg":
            if self.momentum <= 0:
                return weights + self.lr * mean_delta
            self.m = mean_delta.copy() if self.m is None else self.momentum * self.m + mean_delta
            return weights + self.lr * self.m
        if self.m is None or self.v is None:
            self.m = np.zeros_like(mean_delta)
            self.v = np.zeros_like(mean_delta)
        self.m = self.beta1 * self.m + (1.0 - self.beta1) * mean_delta
        sq = mean_delta**2
        if self.kind == "fedadam":
            self.v = self.beta2 * self.v + (1.0 - self.beta2) * sq
        elif self.kind == "fedyogi":
            self.v = self.v - (1.0 - self.beta2) * sq * np.sign(self.v - sq)
        else:
            raise ValueError(f"unknown server optimizer {self.kind!r}")
        return weights + self.lr * self.m / (np.sqrt(self.v) + self.tau)

    def state(self) -> dict[str, np.ndarray]:
        """Arrays to checkpoint so that a resumed run continues with the same moments."""
        state = {} if self.m is None else {"opt_m": self.m}
        if self.v is not None:
            state["opt_v"] = self.v
        return state

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if "opt_m" in arrays:
            self.m = np.asarray(arrays["opt_m"], dtype=np.float64)
        if "opt_v" in arrays:
            self.v = np.asarray(arrays["opt_v"], dtype=np.float64)
