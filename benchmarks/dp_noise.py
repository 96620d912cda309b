"""Raw cost of DP-SGD noise: AES-256-CTR + Box-Muller (`fedveil.secure.noise`) vs torch's generator.

Run:  python benchmarks/dp_noise.py                 (CPU, 1 torch thread; ~10 s)
      python benchmarks/dp_noise.py --device cuda   (noise for a model trained on the GPU)

Times exactly what training does per parameter tensor: torch draws N(0, sigma^2) with its own
generator on the training device (Opacus' routine); fedveil makes the AES-256-CTR keystream on
the CPU, moves the 64-bit words to the device, runs Box-Muller there in float64 and casts to
float32 (what `clients/training.py` adds to the gradients). Median of --repeats, interleaved
(each repeat times both back to back), ratio taken within a repeat. The end-to-end effect on DP
training is `python benchmarks/dp_training.py --noise`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fedveil.secure.noise import SecureGaussian


def _timed(fn, device: torch.device, calls: int) -> float:
    """Seconds per call over `calls` back-to-back calls (so the stream's block refills are counted)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls


def measure(n: int, device: torch.device, repeats: int) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    secure = SecureGaussian(device=device)

    def torch_draw():
        return torch.normal(0.0, 1.0, size=(n,), device=device, generator=gen, dtype=torch.float32)

    def secure_draw():
        return secure.normal(1.0, n).to(dtype=torch.float32)

    torch_draw(), secure_draw()  # warm-up (CUDA context, allocator)
    calls = max(1, 2_000_000 // n)
    t_torch, t_secure, ratio = [], [], []
    for _ in range(repeats):
        a, b = _timed(torch_draw, device, calls), _timed(secure_draw, device, calls)
        t_torch.append(a)
        t_secure.append(b)
        ratio.append(b / a)
    return {"n": n, "device": str(device), "torch_per_s": n / statistics.median(t_torch),
            "secure_per_s": n / statistics.median(t_secure), "time_ratio": statistics.median(ratio)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable on a shared host)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sizes", default="10000,100000,1000000,10000000")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, device {name}, torch threads={args.threads}, "
          f"repeats={args.repeats} (interleaved, median)")
    print(f"{'normals':>10} {'torch M/s':>10} {'AES-CTR M/s':>12} {'time vs torch':>14}")
    for n in (int(s) for s in args.sizes.split(",")):
        r = measure(n, device, args.repeats)
        print(f"{n:>10} {r['torch_per_s'] / 1e6:10.1f} {r['secure_per_s'] / 1e6:12.1f} {r['time_ratio']:13.1f}x",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
