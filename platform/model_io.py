"""Taking a model away: export a run's checkpoint as a file plain PyTorch (or ONNX Runtime) loads, and score it.

`fedveil model export` rebuilds the model from the run's `model.json` (aggregator/checkpoint.py) and
writes one of:

* `state_dict`: `torch.save` of the plain tensor dict; load it with `torch.load(path, weights_only=True)`
  into the architecture described by the sidecar `FILE.json`;
* `torchscript`: a scripted module; `torch.jit.load(path)` runs it with no fedveil installed, and
  the same description is embedded as the extra file `fedveil.json`;
* `onnx`: an ONNX graph with a dynamic batch axis (needs the `onnx` package to write).

Every export writes `FILE.json` next to it: model name and arguments, input shape, classes, the
input scaling the model expects (MNIST: (x/255 - 0.1307)/0.3081), run id and round.
`fedveil model evaluate` scores such a file on a data file or a builtin dataset's public test split.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from fedveil.platform.errors import FedveilError

FORMATS: tuple[str, ...] = ("state_dict", "torchscript", "onnx")
EXTRA_FILE = "fedveil.json"


def find_run_dir(workdir: str | Path, run: str | None = None) -> Path:
    """The checkpoint directory of run `run` (default: the newest run) under a work dir."""
    from fedveil.aggregator import checkpoint

    root = Path(workdir)
    if (root / checkpoint.LAST).exists():  # a run directory itself
        return root
    dirs = checkpoint.run_dirs(root / "checkpoints") or checkpoint.run_dirs(root)
    if run is not None:
        dirs = [d for d in dirs if d.name == run]
    if not dirs:
        known = ", ".join(d.name for d in checkpoint.run_dirs(root / "checkpoints")) or "none"
        raise FedveilError(
            f"no checkpoint of {'run ' + repr(run) if run else 'any run'} under {root} (runs with checkpoints: {known})",
            "pass the --workdir of the server or demo (it holds checkpoints/), and a --run id from `fedveil status`",
        )
    if checkpoint.model_info(dirs[-1]) is None:
        raise FedveilError(f"the checkpoint in {dirs[-1]} has no model.json (written by an older fedveil)",
                           "re-run the federation with this release to get an exportable checkpoint")
    return dirs[-1]


def resolve_round(run_dir: Path, which: str = "last") -> tuple[int, str]:
    """(round, why) for `--round N|best|last`."""
    from fedveil.aggregator import checkpoint

    saved = checkpoint.saved_rounds(run_dir)
    if not saved:
        raise FedveilError(f"run directory {run_dir} holds no round checkpoints", "let the run finish at least one round")
    key = str(which).strip().lower()
    if key == "last":
        return saved[-1], "last round"
    if key == "best":
        best = checkpoint.best_round(run_dir)
        if best is None:
            return saved[-1], "last round (no round has a score yet)"
        return best[0], f"best by {best[1]}"
    if not key.isdigit() or int(key) not in saved:
        raise FedveilError(f"--round {which!r} is not a saved round of {run_dir.name} (saved: {saved[0]}..{saved[-1]})",
                           "use a round number from that range, 'best' or 'last'")
    return int(key), f"round {key}"


def build_from_info(info: dict[str, Any]):
    """The untrained architecture described by a model.json / sidecar."""
    from fedveil.platform.models import build_model

    return build_model(info["model"], tuple(info["input_shape"]), int(info["num_classes"]), **info.get("kwargs", {}))


def load_checkpoint_model(run_dir: Path, rnd: int):
    """(model with round `rnd`'s weights, info) from a run's checkpoint directory."""
    import torch

    from fedveil.aggregator import checkpoint

    info = dict(checkpoint.model_info(run_dir) or {})
    model = build_from_info(info)
    weights = checkpoint.load_round(run_dir, rnd).weights
    state, offset = {}, 0
    for key, value in model.state_dict().items():
        size = value.numel()
        state[key] = torch.as_tensor(weights[offset:offset + size].reshape(tuple(value.shape)), dtype=value.dtype)
        offset += size
    if offset != weights.size:
        raise FedveilError(f"the checkpoint of round {rnd} has {weights.size} values, the model {offset}",
                           "the run's model.json does not describe this checkpoint; export from the run that wrote it")
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, info


def export_model(workdir: str | Path, out: str | Path, fmt: str, run: str | None = None,
                 which: str = "last") -> dict[str, Any]:
    """Write the chosen round's model to `out` in `fmt` plus `out.json`; returns the sidecar's content."""
    import torch

    if fmt not in FORMATS:
        raise FedveilError(f"unknown export format {fmt!r}", f"use one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        _require("onnx", "writing ONNX files")
    run_dir = find_run_dir(workdir, run)
    rnd, why = resolve_round(run_dir, which)
    model, info = load_checkpoint_model(run_dir, rnd)
    info.update(round=rnd, selected=why, format=fmt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, *info["input_shape"])
    if fmt == "state_dict":
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out)
    elif fmt == "torchscript":
        try:
            scripted = torch.jit.script(model)
        except Exception:  # noqa: BLE001 - user factories may not script; tracing covers feed-forward models
            scripted = torch.jit.trace(model, example)
        torch.jit.save(scripted, str(out), _extra_files={EXTRA_FILE: json.dumps(info)})
    else:
        torch.onnx.export(model, (example,), str(out), input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    Path(str(out) + ".json").write_text(json.dumps(info, indent=1))
    return info


def _require(module: str, purpose: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise FedveilError(f"{purpose} needs the {module!r} package, which is not installed",
                           f"pip install {module}")


def _sidecar(path: Path) -> dict[str, Any] | None:
    side = Path(str(path) + ".json")
    return json.loads(side.read_text()) if side.exists() else None


def load_predictor(path: str | Path) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """(function from a float32 batch to logits, model description) for an exported file of any format."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FedveilError(f"model file {path} does not exist", "pass the --out file of `fedveil model export`")
    info = _sidecar(path)
    if path.suffix.lower() == ".onnx" or (info or {}).get("format") == "onnx":
        _require("onnxruntime", "scoring ONNX files")
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return (lambda X: session.run(None, {name: X})[0]), info or {}
    if (info or {}).get("format") != "state_dict":
        try:
            extra = {EXTRA_FILE: ""}
            scripted = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        except RuntimeError:
            scripted = None
        if scripted is not None:
            scripted.eval()
            info = info or (json.loads(extra[EXTRA_FILE]) if extra[EXTRA_FILE] else {})
            return _torch_predictor(scripted), info
    if info is None:
        raise FedveilError(f"{path} is a state_dict without its description {path}.json",
                           "keep the .json that `fedveil model export` writes next to the model file")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file
        raise FedveilError(f"{path} is not a model file fedveil can read ({type(exc).__name__}: {exc})",
                           "export it with `fedveil model export --format state_dict|torchscript|onnx`") from exc
    model = build_from_info(info)
    model.load_state_dict(state, strict=True)
    model.eval()
    return _torch_predictor(model), info


def _torch_predictor(model) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    def predict(X: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))).numpy()

    return predict


def evaluate_model(path: str | Path, data: str, label_column: str = "label",
                   batch_size: int = 2048) -> dict[str, Any]:
    """Accuracy and mean cross-entropy of an exported model on a data file or a builtin's public test split."""
    from fedveil.platform.data import builtin_key, load_heldout

    predict, info = load_predictor(path)
    shape = tuple(info.get("input_shape") or ())
    image = len(shape) == 3
    ds = load_heldout(data, image=image, label_column=label_column, num_classes=info.get("num_classes"))
    if shape and ds.feature_shape != shape:
        raise FedveilError(f"{data} has feature shape {ds.feature_shape}, the model expects {shape}",
                           "score the model on data with the features it was trained on")
    logits = np.concatenate([predict(ds.X[i:i + batch_size]) for i in range(0, len(ds), batch_size)])
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return {
        "model": str(path), "data": data, "split": "test" if builtin_key(data) else "file", "rows": int(len(ds)),
        "accuracy": float((logits.argmax(1) == ds.y).mean()),
        "loss": float(-log_probs[np.arange(len(ds)), ds.y].mean()),
        "run_id": info.get("run_id"), "round": info.get("round"),
    }
