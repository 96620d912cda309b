"""The CUDA path, once: DP-SGD (Opacus) and non-private training of the MNIST CNN on the GPU.

Run:  python benchmarks/gpu_check.py [--n 20000] [--epochs 1]

Prints the device, samples/s for non-private and DP-SGD training on the same data and model,
their ratio, and the accuracy of each on the official MNIST test split, as JSON. It needs a CUDA
device (it says so and exits 2 without one): CPU throughput is measured by dp_training.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from fedveil.clients import training as T
from fedveil.platform import data as D
from fedveil.platform import models as M


def _accuracy(model: torch.nn.Module, ds: D.Dataset, device: torch.device) -> float:
    model.eval().to(device)
    with torch.no_grad():
        X = torch.as_tensor(ds.X, device=device)
        y = torch.as_tensor(ds.y, device=device)
        pred = torch.cat([model(X[i:i + 4096]).argmax(1) for i in range(0, len(y), 4096)])
    return float((pred == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000, help="training images")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device\nfix: run this on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    full = D.load_builtin("mnist", image=True)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(full.y))
    train_ds, test_ds = full.subset(idx[: args.n], "train"), full.subset(idx[-10000:], "held-out")
    warm = M.build_model("cnn", train_ds.feature_shape, train_ds.num_classes)  # CUDA context and kernels, untimed
    T.train(warm, train_ds.subset(np.arange(512), "warm-up"), T.TrainSettings(batch_size=256, device="cuda"),
            T.DPSettings(enabled=False), 0.0)
    out = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "n": args.n, "epochs": args.epochs}
    for label, dp in (("non_private", T.DPSettings(enabled=False)),
                      ("dp_sgd", T.DPSettings(enabled=True, max_grad_norm=1.0, noise_multiplier=1.0))):
        torch.manual_seed(0)
        model = M.build_model("cnn", train_ds.feature_shape, train_ds.num_classes)
        settings = T.TrainSettings(epochs=args.epochs, batch_size=args.batch, lr=0.5 if dp.enabled else 0.05,
                                   optimizer="sgd", device="cuda", seed=0)
        t0 = time.perf_counter()
        result = T.train(model, train_ds, settings, dp, dp.noise_multiplier or 0.0)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        out[label] = {"samples_per_s": result.samples_seen / seconds, "seconds": seconds,
                      "accuracy": _accuracy(model, test_ds, device), "mode": result.grad_sample_mode}
    out["dp_over_non_private"] = out["dp_sgd"]["samples_per_s"] / out["non_private"]["samples_per_s"]
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
