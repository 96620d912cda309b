"""Server checkpoints, kept per run and written atomically so a crash leaves the previous one intact.

Layout of one run's directory (`<checkpoint_dir>/<federation>/<run id>/`):

* `last.npz`: the newest global model with the server optimizer's state (what `--resume` loads);
* `round-00007.npz`: the global model after each round (weights only), so any round can be exported;
* `model.json`: what rebuilding the model needs without the federation (model name and keyword
  arguments, input shape, classes, state_dict keys and shapes, input scaling);
* `index.json`: per round, the scores known so far (`server_accuracy` on the public held-out set,
  `val_accuracy` of the clients); `best_round` prefers the server-side score.

`load(directory)` accepts a run's directory, a federation's directory (its newest run) or a
pre-run-directory checkpoint (`latest.npz`), so resuming keeps working across layouts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LAST = "last.npz"
LEGACY = "latest.npz"
MODEL_INFO = "model.json"
INDEX = "index.json"
BEST_METRICS = ("server_accuracy", "val_accuracy")  # in order of preference


@dataclass
class Checkpoint:
    round: int
    weights: np.ndarray  # flat float64 global model
    optimizer: dict[str, np.ndarray]
    meta: dict


def round_file(directory: Path, rnd: int) -> Path:
    return Path(directory) / f"round-{int(rnd):05d}.npz"


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.stem + ".tmp.npz")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _meta_bytes(meta: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)


def save(directory: Path, ckpt: Checkpoint) -> Path:
    """Write round `ckpt.round` (weights) and `last.npz` (weights + optimizer state); returns last.npz."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = _meta_bytes(ckpt.meta)
    _write_npz(round_file(directory, ckpt.round), weights=ckpt.weights, round=np.array(ckpt.round), meta=meta)
    final = directory / LAST
    _write_npz(final, weights=ckpt.weights, round=np.array(ckpt.round), meta=meta, **ckpt.optimizer)
    return final


def _read(path: Path) -> Checkpoint:
    with np.load(path) as data:
        optimizer = {k: data[k] for k in data.files if k.startswith("opt_")}
        return Checkpoint(
            round=int(data["round"]),
            weights=data["weights"].astype(np.float64),
            optimizer=optimizer,
            meta=json.loads(data["meta"].tobytes().decode()),
        )


def run_dirs(root: Path) -> list[Path]:
    """Run directories under `root` (any depth up to two), oldest first by their last write."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = {p.parent for pattern in (LAST, f"*/{LAST}", f"*/*/{LAST}") for p in root.glob(pattern)}
    return sorted(found, key=lambda d: (d / LAST).stat().st_mtime)


def load(directory: Path) -> Checkpoint | None:
    """The newest checkpoint with optimizer state in a run directory, else in its newest run, else legacy."""
    directory = Path(directory)
    for path in (directory / LAST, directory / LEGACY):
        if path.exists():
            return _read(path)
    runs = [d for d in run_dirs(directory) if d != directory]
    return _read(runs[-1] / LAST) if runs else None


def save_model_info(directory: Path, info: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_json(directory / MODEL_INFO, info)


def model_info(directory: Path) -> dict | None:
    path = Path(directory) / MODEL_INFO
    return json.loads(path.read_text()) if path.exists() else None


def _index(directory: Path) -> dict:
    path = Path(directory) / INDEX
    return json.loads(path.read_text()) if path.exists() else {"scores": {}}


def record_score(directory: Path, rnd: int, metric: str, value: float | None) -> None:
    """Note a score of round `rnd`'s model (known after the round, for client validation even a round later)."""
    if value is None or not np.isfinite(value) or not round_file(directory, rnd).exists():
        return
    index = _index(directory)
    index["scores"].setdefault(str(int(rnd)), {})[metric] = float(value)
    _write_json(Path(directory) / INDEX, index)


def scores(directory: Path) -> dict[int, dict[str, float]]:
    return {int(r): s for r, s in _index(directory)["scores"].items()}


def saved_rounds(directory: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in Path(directory).glob("round-*.npz") if ".tmp" not in p.name)


def best_round(directory: Path) -> tuple[int, str] | None:
    """(round, metric) of the best saved model: by server-side held-out accuracy when the run has it,
    else by the clients' validation accuracy; None when no round has a score yet."""
    known = scores(directory)
    saved = set(saved_rounds(directory))
    for metric in BEST_METRICS:
        rated = [(s[metric], r) for r, s in known.items() if metric in s and r in saved]
        if rated:
            return max(rated, key=lambda t: (t[0], t[1]))[1], metric  # ties: the later round
    return None


def load_round(directory: Path, rnd: int) -> Checkpoint:
    path = round_file(directory, rnd)
    if not path.exists():
        raise FileNotFoundError(str(path))
    return _read(path)
