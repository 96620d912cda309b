"""Secure-aggregation cost: bytes and time per mode (none, secret-sharing, ckks) for 10 clients.

Run: python benchmarks/secure_agg.py [--sizes 100000 1000000] [--clients 10] [--proxies 2]
Times are single-threaded wall-clock on this machine; client time is per client, proxy time is
summed over proxies (they run in parallel in a deployment), server time is `finish`.
The baseline `none` sends float32, as Flower does, so "x float32" and "x none" are honest ratios
(a float64 baseline made every secure mode look 2x cheaper); its max abs err is float32 rounding.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from fedveil.secure.ckks import CKKSMode, make_ckks_context
from fedveil.secure.envelope import generate_x25519_keypair
from fedveil.secure.modes import Binding, ClientKeyring, PlaintextMode, ProxyKeyring, ServerKeyring
from fedveil.secure.sharing import SecretSharingMode


def bench(mode, name, vectors, proxies, ck, pks, sk, min_aggregate):
    L = next(iter(vectors.values())).size
    b = Binding("bench", f"task-{name}-{L}-{time.perf_counter_ns()}", "", "", name, L)
    groups = mode.assign(list(vectors), proxies, min_aggregate)
    by_proxy: dict[str, dict[str, bytes]] = {}
    t0 = time.perf_counter()
    for cid, v in vectors.items():
        for p, blob in mode.protect(v, groups[cid], replace(b, client_id=cid), ck).items():
            by_proxy.setdefault(p, {})[cid] = blob
    t_client = (time.perf_counter() - t0) / len(vectors)
    sent = sum(len(x) for d in by_proxy.values() for x in d.values())
    t0 = time.perf_counter()
    partials = [mode.combine(pl, b, pks[p], min_aggregate).partial for p, pl in by_proxy.items()]
    t_proxy = time.perf_counter() - t0
    t0 = time.perf_counter()
    total = mode.finish(partials, L, sk)
    t_server = time.perf_counter() - t0
    err = float(np.max(np.abs(total - np.sum(list(vectors.values()), axis=0))))
    return {
        "bytes_client": sent / len(vectors),
        "bytes_total": sent + sum(len(p) for p in partials),
        "client_s": t_client,
        "proxy_s": t_proxy,
        "server_s": t_server,
        "max_err": err,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--proxies", type=int, default=2)
    args = ap.parse_args()
    proxies = [f"proxy-{i}" for i in range(args.proxies)]
    pairs = {p: generate_x25519_keypair() for p in proxies}
    contexts = {}
    for label, params in (("ckks N=8192", (8192, [60, 40, 40, 60], 40)), ("ckks N=4096", (4096, [60, 49], 40))):
        t0 = time.perf_counter()
        contexts[label] = make_ckks_context(*params)
        print(f"{label} {params[1]}: context {time.perf_counter() - t0:.2f}s, public context {len(contexts[label][1])/1e3:.0f} kB")
    pubkeys = {p: pk for p, (_, pk) in pairs.items()}
    modes = [("none (float32)", PlaintextMode(), None), ("secret-sharing", SecretSharingMode(), None)]
    modes += [(label, CKKSMode(), label) for label in contexts]
    rng = np.random.default_rng(0)
    print(f"{args.clients} clients, {args.proxies} proxies, updates U(-1,1) x n_i (n_i in [100,1000))")
    print("| params | mode | bytes/client | x float32 | total bytes | client protect s | proxy combine s | server finish s |"
          " client x none | proxy x none | server x none | max abs err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for L in args.sizes:
        n = rng.integers(100, 1000, size=args.clients)
        vectors = {f"org-{i:02d}": rng.uniform(-1, 1, L) * n[i] for i in range(args.clients)}
        base = None
        for name, mode, ctx in modes:
            secret, public = contexts[ctx] if ctx else (None, None)
            ck = ClientKeyring(pubkeys, public)
            pks = {p: ProxyKeyring(p, sk, public) for p, (sk, _) in pairs.items()}
            r = bench(mode, mode.name, vectors, proxies, ck, pks, ServerKeyring(secret), max(2, args.clients // args.proxies))
            base = base or r
            print(
                f"| {L:,} | {name} | {r['bytes_client']/1e6:.2f} MB | {r['bytes_client']/(4*L):.2f} | {r['bytes_total']/1e6:.1f} MB | "
                f"{r['client_s']:.3f} | {r['proxy_s']:.3f} | {r['server_s']:.3f} | "
                f"{r['client_s']/base['client_s']:.1f} | {r['proxy_s']/base['proxy_s']:.1f} | {r['server_s']/max(base['server_s'],1e-9):.1f} | "
                f"{r['max_err']:.1e} |",
                flush=True,
            )


def replicated_section(sizes: list[int], clients: int) -> None:
    """replicated-sharing (3 proxies, one may die) against secret-sharing (2 proxies) and float32 plaintext.

    Proxy time is the slowest proxy (they combine in parallel); "1 dead" finishes from 2 of 3 partials.
    """
    from fedveil.secure.replicated import ReplicatedSharingMode

    proxies = [f"proxy-{i}" for i in range(3)]
    pairs = {p: generate_x25519_keypair() for p in proxies}
    ck = ClientKeyring({p: pk for p, (_, pk) in pairs.items()})
    pks = {p: ProxyKeyring(p, sk) for p, (sk, _) in pairs.items()}
    rng = np.random.default_rng(1)
    print(f"\nreplicated-sharing: {clients} clients; ratios against float32 plaintext and 2-proxy secret-sharing, same run")
    print("| values | mode | proxies | bytes/client | x float32 | x secret-sharing | client protect s | slowest proxy s |"
          " server finish s | finish x secret-sharing | max abs err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for L in sizes:
        n = rng.integers(100, 1000, size=clients)
        vectors = {f"org-{i:02d}": rng.uniform(-1, 1, L) * n[i] for i in range(clients)}
        expected = np.sum(list(vectors.values()), axis=0)
        rows = []
        for label, mode, used, alive in (("none (float32)", PlaintextMode(), proxies[:1], proxies[:1]),
                                         ("secret-sharing", SecretSharingMode(), proxies[:2], proxies[:2]),
                                         ("replicated-sharing", ReplicatedSharingMode(), proxies, proxies),
                                         ("replicated-sharing, 1 dead", ReplicatedSharingMode(), proxies, proxies[:2])):
            b = Binding("bench", f"rep-{label}-{L}-{time.perf_counter_ns()}", "", "", mode.name, L)
            by_proxy: dict[str, dict[str, bytes]] = {}
            t0 = time.perf_counter()
            for cid, v in vectors.items():
                for p, blob in mode.protect(v, used, replace(b, client_id=cid), ck).items():
                    by_proxy.setdefault(p, {})[cid] = blob
            t_client = (time.perf_counter() - t0) / clients
            sent = sum(len(x) for d in by_proxy.values() for x in d.values()) / clients
            partials, t_proxy = [], 0.0
            for p in alive:
                t0 = time.perf_counter()
                partials.append(mode.combine(by_proxy[p], b, pks[p], 2).partial)
                t_proxy = max(t_proxy, time.perf_counter() - t0)
            t0 = time.perf_counter()
            total = mode.finish(partials, L, ServerKeyring())
            rows.append((label, len(alive), sent, t_client, t_proxy, time.perf_counter() - t0,
                         float(np.max(np.abs(total - expected)))))
        ss = rows[1]
        for label, k, sent, tc, tp, tf, err in rows:
            print(f"| {L:,} | {label} | {k} | {sent / 1e6:.2f} MB | {sent / (4 * L):.2f} | {sent / ss[2]:.2f} | {tc:.3f} | "
                  f"{tp:.3f} | {tf:.4f} | {tf / ss[5]:.1f} | {err:.1e} |", flush=True)


if __name__ == "__main__":
    import sys

    if "--replicated-only" in sys.argv:  # just the replicated-sharing section (no CKKS contexts)
        sys.argv.remove("--replicated-only")
        _args = argparse.ArgumentParser()
        _args.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
        _args.add_argument("--clients", type=int, default=10)
        _ns, _ = _args.parse_known_args()
        replicated_section(_ns.sizes, _ns.clients)
    else:
        main()
