"""Per-round server checkpoints, written atomically so a crash leaves the previous one intact."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Checkpoint:
    round: int
    weights: np.ndarray  # flat float64 global model
    optimizer: dict[str, np.ndarray]
    meta: dict


def save(directory: Path, ckpt: Checkpoint) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / "latest.npz"
    tmp = directory / "latest.tmp.npz"
    with open(tmp, "wb") as fh:
        np.savez(fh, weights=ckpt.weights, round=np.array(ckpt.round),
                 meta=np.frombuffer(json.dumps(ckpt.meta).encode(), dtype=np.uint8), **ckpt.optimizer)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def load(directory: Path) -> Checkpoint | None:
    path = directory / "latest.npz"
    if not path.exists():
        return None
    with np.load(path) as data:
        optimizer = {k: data[k] for k in data.files if k.startswith("opt_")}
        return Checkpoint(
            round=int(data["round"]),
            weights=data["weights"].astype(np.float64),
            optimizer=optimizer,
            meta=json.loads(data["meta"].tobytes().decode()),
        )
