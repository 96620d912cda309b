"""The `fedveil` command. Each subcommand is a thin layer over the platform and role modules.

Expected failures (FedveilError) print the problem and the fix and exit with status 2; a stack
trace is printed only for bugs, and only with --debug.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from fedveil.platform.errors import FedveilError

SECURE_MODES = ("none", "secret-sharing", "replicated-sharing", "ckks")
DEMO_SECURE = "replicated-sharing"  # survives one dead proxy (issue 10)
SUPERNODE_ADMITTED = "SuperNode ID:"  # what flower-supernode prints once the SuperLink has activated it
ROUND_MODES = ("sync", "semi-sync", "async")


def _say(text: str) -> None:
    print(text, flush=True)


# ---- demo -----------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from fedveil.platform import config as config_mod
    from fedveil.platform.federation import LocalFederation, demo_orgs
    from fedveil.platform.store import MetricsStore

    cfg = config_mod.load(args.config)
    # Without a config file the demo tolerates one dead proxy: replicated-sharing over 4 proxies, a
    # quorum of 3 commits (docs/security.md); an explicit --secure, or --proxies 2 or 3, keeps secret-sharing.
    secure = args.secure
    if secure is None and args.config is None:
        secure = DEMO_SECURE if args.proxies is None or args.proxies >= 4 else "secret-sharing"
    proxies = args.proxies
    if proxies is None and args.config is None:
        proxies = 4 if secure == "replicated-sharing" else 2
    overrides: dict[str, Any] = {
        "federation.rounds": args.rounds, "federation.secure": secure, "federation.mode": args.mode,
        "data.source": args.dataset,
    }
    if proxies is not None:
        overrides["proxies.names"] = [f"proxy-{i + 1}" for i in range(proxies)]
    if args.store or os.environ.get("FEDVEIL_STORE_URL"):  # e.g. postgresql://fedveil@db/fedveil (password: PGPASSWORD)
        overrides["server.store"] = args.store or os.environ["FEDVEIL_STORE_URL"]
    if args.config is None and secure == "replicated-sharing":  # the demo's own organizations opt in
        overrides["policy.allow_secure"] = sorted({*cfg.policy.allow_secure, "replicated-sharing"})
    cfg = config_mod.with_overrides(cfg, overrides)
    if args.clients is not None or not cfg.orgs:
        orgs = demo_orgs(args.clients or 3)
        cfg = config_mod.with_overrides(cfg, {"orgs": [o.model_dump(exclude_none=True) for o in orgs]})
    if args.clients is not None and cfg.federation.min_clients > len(cfg.orgs):
        raise FedveilError(f"--clients {len(cfg.orgs)} is below federation.min_clients={cfg.federation.min_clients}",
                           "use more clients or lower federation.min_clients in the config")
    workdir = Path(args.workdir or "fedveil-demo").resolve()
    run_name = f"{cfg.federation.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    keys_dir, temp_keys = _demo_keys(args, cfg)
    fed = LocalFederation(cfg, workdir, keys_dir=keys_dir, progress=_say)
    _check_store(fed.store_url)
    dashboard = None
    _say(f"fedveil demo: {len(cfg.orgs)} organizations, {len(cfg.proxies.names)} proxies, "
         f"{cfg.federation.rounds} {cfg.federation.mode} rounds, secure={cfg.federation.secure}, "
         f"data={cfg.data.source}, work dir {workdir}")
    if cfg.federation.secure == "none":
        _say("WARNING: --secure none sends plaintext updates to the proxies; use it only for comparisons.")
    try:
        fed.start()
        if not args.no_dashboard:
            (workdir / "logs").mkdir(parents=True, exist_ok=True)
            dashboard = _start_dashboard(fed.store_url, args.port, workdir)
        fed.submit(run_name)
        _say(f"run {run_name} submitted; waiting for nodes to join")
        started = time.monotonic()

        def on_round(row: dict) -> None:
            _say(_progress_line(fed.store_url, run_name, cfg, row, time.monotonic() - started))

        run = fed.wait(run_name, timeout=args.timeout, on_round=on_round)
    except BaseException as exc:
        fed.stop()
        _close_unfinished_run(fed.store_url, run_name, "stopped" if isinstance(exc, KeyboardInterrupt) else "failed",
                              "interrupted by the user" if isinstance(exc, KeyboardInterrupt) else str(exc))
        _summary_if_recorded(fed.store_url, run_name)  # a stopped or failed run still says what it reached
        raise
    finally:
        fed.stop()
        if dashboard is not None:
            _stop_process(dashboard)
        if temp_keys is not None:
            temp_keys.cleanup()
    store = MetricsStore(fed.store_url)
    try:
        _print_summary(store, run_name)
    finally:
        store.close()
    return 0 if run["status"] == "completed" else 1


def _check_store(url: str) -> None:
    """Open the store once before starting any process: a missing driver, a refused login or an
    unreachable database is an `error:`/`fix:` now, not a ServerApp failure minutes later."""
    from fedveil.platform.store import MetricsStore

    MetricsStore(url).close()


def _close_unfinished_run(url: str, run_name: str, status: str, message: str) -> None:
    """The ServerApp died with its processes: record how the run ended so the store never shows it running."""
    from fedveil.platform.store import MetricsStore

    store = MetricsStore(url)
    try:
        store.close_if_running(run_name, status, message)
    finally:
        store.close()


def _demo_keys(args: argparse.Namespace, cfg):
    """Key bundles for the demo: the user's (--keys), none (--insecure), or fresh ones in a temp dir."""
    import tempfile

    from fedveil.platform.provision import init_federation_keys

    if args.insecure:
        if cfg.federation.secure != "none":
            raise FedveilError(f"--insecure cannot run secure mode {cfg.federation.secure!r}: it needs proxy keys",
                               "drop --insecure, or use --secure none")
        return None, None
    if args.keys:
        _tls_files(args.keys)  # a missing or partial bundle is an error now, not a Flower message later
        return Path(args.keys).resolve(), None
    temp = tempfile.TemporaryDirectory(prefix="fedveil-demo-keys-")
    init_federation_keys(temp.name, cfg.proxies.names, [o.name for o in cfg.orgs], federation=cfg.federation.name,
                         ckks=cfg.federation.secure == "ckks", overwrite=True)
    _say(f"provisioned TLS, SuperNode, proxy{' and CKKS' if cfg.federation.secure == 'ckks' else ''} keys "
         f"in {temp.name}, one directory per role, each node given only its own (single-host; removed at exit)")
    return Path(temp.name), temp


def _run_is_private(run: dict) -> bool:
    try:
        return bool(json.loads(run.get("config") or "{}").get("privacy", {}).get("enabled", True))
    except ValueError:
        return True


def _epsilon_text(private: bool, epsilon: float | None) -> str:
    """ε as a person should read it: a non-private run is never "ε = 0.000"."""
    if not private:
        return "not private (ε = ∞)"
    return "ε n/a" if epsilon is None else f"max ε {epsilon:.3f}"


def _progress_line(url: str, run_name: str, cfg, row: dict, elapsed: float | None = None) -> str:
    """One line per round: participants, the round's own held-out accuracy (server-side evaluation) or the
    clients' validation accuracy of the previous round's model (named as such), the largest ε so far, time."""
    from fedveil.platform.store import MetricsStore

    unit = "version" if cfg.federation.mode == "async" else "round"
    rnd = int(row["round"])
    parts = [f"  {unit} {rnd:>3}/{cfg.federation.rounds}: {row['participants']} participant(s)"]
    store = MetricsStore.open_readonly(url)
    try:
        if row.get("server_accuracy") is not None:
            parts.append(f"held-out acc {row['server_accuracy']:.4f} loss {row['server_loss']:.4f}")
        previous = next((r for r in store.rounds(run_name) if r["round"] == rnd - 1 and r["accuracy"] is not None), None)
        if previous is not None:
            parts.append(f"clients' val acc {previous['accuracy']:.4f} loss {previous['loss']:.4f} "
                         f"({unit} {rnd - 1} model)")
        eps = [c["epsilon"] for c in store.client_rounds(run_name) if c["round"] <= rnd and c["epsilon"] is not None]
        parts.append(_epsilon_text(cfg.privacy.enabled, max(eps, default=None)))
    finally:
        store.close()
    seconds = f"{row['seconds']:.1f}s" + ("" if elapsed is None else f" (elapsed {elapsed:.0f}s)")
    return " | ".join(parts + [seconds])


def _summary_if_recorded(url: str, run_name: str) -> None:
    """The summary of a run that stopped or failed, when the store holds it (never masks the real error)."""
    from fedveil.platform.store import MetricsStore

    try:
        store = MetricsStore.open_readonly(url)
        try:
            if store.get_run(run_name) is not None:
                _print_summary(store, run_name)
        finally:
            store.close()
    except Exception:  # noqa: BLE001 - no store yet: nothing to summarize
        pass


def _print_summary(store, run_name: str) -> None:
    run = store.get_run(run_name)
    rounds = store.rounds(run_name)
    private = _run_is_private(run)
    done = [r for r in rounds if r["participants"] > 0]
    _say(f"\nrun {run_name}: {run['status']}" + (f" ({run['message']})" if run["message"] else "")
         + f"; {len(done)} of {run['rounds_planned']} round(s) updated the model")
    held = [r for r in rounds if r.get("server_accuracy") is not None]
    if held:
        best = max(held, key=lambda r: r["server_accuracy"])
        _say(f"held-out accuracy {held[-1]['server_accuracy']:.4f}, loss {held[-1]['server_loss']:.4f} "
             f"(server-side, after round {held[-1]['round']}; best {best['server_accuracy']:.4f} after round "
             f"{best['round']})")
    final = next((r for r in reversed(rounds) if r["accuracy"] is not None), None)
    if final is not None:
        _say(f"clients' validation accuracy {final['accuracy']:.4f}, loss {final['loss']:.4f} "
             f"(model after round {final['round']})")
    if not private:
        _say("privacy: not private (ε = ∞): this run trained without DP-SGD")
    _say("privacy spent per organization (its ledger ε over all runs on this data, as of its last reply; "
         "`fedveil client ledger --workdir ORG_DIR` shows the authoritative ledger):")
    for c in store.latest_client_status(run_name):
        eps = "n/a" if c["epsilon"] is None else f"{c['epsilon']:.3f}"
        _say(f"  {c['org']:<14} ε={eps:<8} δ={c['delta'] if c['delta'] is not None else 'n/a'}  "
             f"budget={c['budget'] if c['budget'] is not None else 'n/a'}  last status={c['status']} "
             f"(round {c['round']})")
    _say_policy_declines(store, run_name)


def _say_policy_declines(store, run_name: str) -> None:
    """A decline by an organization's own policy is its answer, not a fault: say why, once per reason."""
    marker = "declines the task by its privacy policy: "
    reasons: dict[str, set[str]] = {}
    for event in store.events(run_name):
        if event["kind"] == "policy" and marker in event["message"]:
            reasons.setdefault(event["message"].split(marker, 1)[1], set()).add(event["source"])
    for reason, orgs in reasons.items():
        _say(f"declined by the organizations' own policy ({', '.join(sorted(orgs))}): {reason}")


def _start_dashboard(url: str, port: int | None, workdir: Path):
    """Serve the dashboard next to the demo; the demo keeps running if it cannot start."""
    from fedveil.dashboard.serve import serve, url_for, wait_ready
    from fedveil.platform.launcher import free_port

    port = port or free_port()
    proc = serve(url, port=port, background=True, log_file=workdir / "logs" / "dashboard.log")
    if wait_ready("127.0.0.1", port, timeout=60, proc=proc):
        _say(f"dashboard: {url_for('127.0.0.1', port)} (live; stops when the demo ends, or keep it with "
             f"`fedveil dashboard --workdir {workdir}`)")
    else:
        _say(f"warning: the dashboard did not start; see {workdir / 'logs' / 'dashboard.log'}")
    return proc


def _stop_process(proc) -> None:
    from fedveil.dashboard.serve import stop

    stop(proc)


# ---- deployment roles ---------------------------------------------------------------------------
def _run_foreground(argv: list[str], env: dict[str, str], workdir: Path, name: str) -> tuple[int, str, bool]:
    """Run a Flower process in the foreground, echoing its output; stop its whole tree when it ends.

    Returns (exit code, the last lines it printed, whether it was admitted by the SuperLink):
    Flower exits with one code for most start-up failures, so the reason is only in its output.
    """
    import collections
    import threading

    from fedveil.platform import launcher

    tail: collections.deque[str] = collections.deque(maxlen=60)
    admitted = threading.Event()
    with launcher.ProcessGroup(workdir) as group:
        proc = group.start(name, argv, env, capture=True)

        def echo() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                tail.append(line)
                if SUPERNODE_ADMITTED in line:
                    admitted.set()

        reader = threading.Thread(target=echo, daemon=True)
        reader.start()
        code = proc.wait()  # Ctrl-C / SIGTERM: leaving the block stops the whole tree
    reader.join(timeout=5)
    return code, "".join(tail), admitted.is_set()


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise FedveilError(f"server.superlink {address!r} is not HOST:PORT", "set server.superlink = \"host:9092\"")
    return host, int(port)


def cmd_server(args: argparse.Namespace) -> int:
    from fedveil.platform import config as config_mod, launcher
    from fedveil.platform.federation import follow_run
    from fedveil.platform.provision import checked_server_bundle
    from fedveil.platform.store import MetricsStore, store_url

    cfg = config_mod.load(args.config)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    host, port = _split_address(args.superlink or cfg.server.superlink)
    env = launcher.flower_env(workdir)
    # The server's own bundle only: refuse a directory holding any proxy's or organization's private key.
    keys = checked_server_bundle(args.keys) if args.keys else None
    tls = _tls_files(keys) if keys else None
    _check_store(cfg.server.store or os.environ.get("FEDVEIL_STORE_URL") or store_url(workdir))
    launcher.check_port_free(host, port, "the SuperLink cannot listen",
                             "stop the program holding it (`ss -ltnp` shows it), or pass another --superlink HOST:PORT")
    with launcher.ProcessGroup(workdir) as group:
        link = group.start("superlink", launcher.superlink_argv(host, port, workdir, tls, auth=tls is not None), env)
        connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        launcher.wait_for_port(connect_host, port, 60, link, "flower-superlink")
        if link.poll() is not None:
            raise FedveilError(f"flower-superlink exited with code {link.returncode} while starting",
                               f"see {workdir / 'logs' / 'superlink.log'}")
        launcher.write_connection(Path(env["FLWR_HOME"]), "fedveil", f"{connect_host}:{port}",
                                  None if tls is None else tls.ca_cert)
        _say(f"SuperLink listening on {host}:{port}; logs in {workdir / 'logs'}")
        if args.keys:
            registered = sorted((keys / "supernodes").glob("*.pub"))
            launcher.register_supernodes(registered, "fedveil", env)  # nodes retry until this is done
            if registered:
                _say(f"registered {len(registered)} SuperNode keys: {', '.join(p.stem for p in registered)}")
            else:
                _say(f"warning: no SuperNode keys in {keys / 'supernodes'}; no node "
                     "can join until one is registered (`flwr supernode register`)")
        url = cfg.server.store or os.environ.get("FEDVEIL_STORE_URL") or store_url(workdir)
        run_name = _server_run_name(url, cfg.federation.name, bool(args.resume))
        run_config = {"config": str(Path(args.config).resolve()), "workdir": str(workdir), "store": url,
                      "run-name": run_name, "resume": bool(args.resume)}
        if args.keys:
            run_config["keys"] = str(keys)
        flower_run_id = launcher.submit_run(workdir, "fedveil", run_config, env)
        _say(f"run {run_name} submitted; waiting for proxies and clients (Ctrl-C to stop)")

        def on_round(row: dict) -> None:
            _say(_progress_line(url, run_name, cfg, row))

        try:
            run = follow_run(url, run_name, flower_run_id=flower_run_id, connection="fedveil", env=env,
                             workdir=workdir, superlink=link, on_round=on_round, fleet=(connect_host, port))
        except KeyboardInterrupt:
            _say("stopping")
            _close_unfinished_run(url, run_name, "stopped", "interrupted by the user")
            _summary_if_recorded(url, run_name)
            return 130
        store = MetricsStore(url)
        try:
            _print_summary(store, run_name)
        finally:
            store.close()
        return 0 if run["status"] == "completed" else 1


def _server_run_name(url: str, federation_name: str, resume: bool) -> str:
    """A new run id, or with --resume the newest unfinished run of this federation: the same id continues.

    The resumed run is marked `running` here, before the ServerApp starts, so that following it does
    not stop at its old `interrupted` status."""
    from fedveil.platform.store import MetricsStore

    if resume:
        store = MetricsStore(url)
        try:
            store.mark_interrupted()
            found = store.latest_unfinished_run(federation_name)
            if found is not None:
                previous = store.resume_run(found)
                _say(f"resuming run {found} (it was {previous})")
                return found
            _say(f"no unfinished run of {federation_name!r} in the store; starting a new one")
        finally:
            store.close()
    return f"{federation_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _tls_files(keys: str):
    from fedveil.platform.launcher import TlsFiles

    from fedveil.platform.launcher import require_files
    from fedveil.platform.provision import server_bundle_root

    root = server_bundle_root(keys)
    tls = TlsFiles(ca_cert=root / "ca.pem", server_cert=root / "superlink.pem", server_key=root / "superlink.key")
    require_files({"the CA certificate": tls.ca_cert, "the SuperLink certificate": tls.server_cert,
                   "the SuperLink key": tls.server_key}, root,
                  "pass --keys the server's bundle (OUT/server from `fedveil keys init`), or run `fedveil keys init`")
    return tls


def cmd_proxy(args: argparse.Namespace) -> int:
    from fedveil.platform import config as config_mod

    cfg = config_mod.load(args.config)
    if args.name not in cfg.proxies.names:
        raise FedveilError(f"proxy {args.name!r} is not listed in proxies.names {cfg.proxies.names}",
                           "add it to [proxies] names in the federation config, or pass a listed --name")
    workdir = Path(args.workdir or f"fedveil-{args.name}").resolve()
    node_config = {"role": "proxy", "name": args.name, "workdir": str(workdir),
                   "min-aggregate": cfg.federation.min_aggregate, "config": str(Path(args.config).resolve())}
    if args.keys:  # only this proxy's keys
        from fedveil.platform.provision import check_node_bundle

        check_node_bundle(args.keys, "proxy", args.name)
    return _start_supernode(args, cfg, workdir, node_config)


def cmd_client(args: argparse.Namespace) -> int:
    from fedveil.platform import config as config_mod
    from fedveil.clients.node import ClientIdentity, load_datasets

    cfg = config_mod.with_overrides(config_mod.load(args.config), policy_overrides(args))
    workdir = Path(args.workdir or f"fedveil-{args.org}").resolve()
    config_path = _org_config(cfg, args, workdir)
    node_config = {"role": "client", "name": args.org, "workdir": str(workdir), "config": str(config_path),
                   "data": str(Path(args.data).resolve()) if args.data and Path(args.data).exists() else (args.data or ""),
                   "index": args.index, "num-orgs": args.num_orgs}
    # Validate the data now, so a bad file is an error at start-up, not a crash mid-round.
    train, val = load_datasets(ClientIdentity.from_node_config(node_config), cfg)
    if args.keys:  # only this organization's keys, and the manifest it pinned
        from fedveil.platform.provision import check_node_bundle

        check_node_bundle(args.keys, "client", args.org, args.manifest_fingerprint)
    _say(f"{args.org}: {len(train.y)} training and {len(val.y)} validation records, "
         f"{train.num_classes} classes; privacy budget ε={cfg.policy.budget or cfg.org_budget(args.org):g}")
    pol = cfg.policy
    _say(f"{args.org} policy: secure modes {pol.allow_secure}, DP {'required' if pol.require_dp else 'optional'}, "
         f"δ ≤ {pol.max_delta:g}, σ ≥ {pol.min_noise if pol.min_noise is not None else 'any'}, ε per run ≤ "
         f"{pol.max_epsilon if pol.max_epsilon is not None else 'budget'}, aggregates ≥ {pol.min_aggregate}, "
         f"models {pol.allow_models} (tasks asking for less are declined with status `policy`)")
    return _start_supernode(args, cfg, workdir, node_config)


POLICY_FLAGS = {"allow_secure": "policy.allow_secure", "require_dp": "policy.require_dp",
                "max_delta": "policy.max_delta", "min_noise": "policy.min_noise", "max_epsilon": "policy.max_epsilon",
                "min_aggregate": "policy.min_aggregate", "budget": "policy.budget",
                "allow_models": "policy.allow_models"}


def policy_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """`fedveil client` policy flags as dotted config overrides (flags not given are left to the file)."""
    return {key: getattr(args, flag) for flag, key in POLICY_FLAGS.items() if getattr(args, flag, None) is not None}


def _org_config(cfg, args: argparse.Namespace, workdir: Path) -> Path:
    """The org's own config file: --config as it is, or with the policy flags applied, written to its work dir."""
    if not policy_overrides(args):
        return Path(args.config).resolve()
    from fedveil.platform.federation import write_config

    return write_config(cfg, workdir / "org-config.toml").resolve()


def _start_supernode(args: argparse.Namespace, cfg, workdir: Path, node_config: dict) -> int:
    """Start this node's SuperNode; retry with backoff while the SuperLink is unreachable or has not
    admitted its key yet (e.g. the server is still registering keys, or still remembers a crashed
    predecessor), up to --connect-timeout; then fail naming the actual cause."""
    from fedveil.platform import launcher

    workdir.mkdir(parents=True, exist_ok=True)
    role = node_config["role"]
    ca = auth = None
    if args.keys:
        bundle = Path(args.keys).resolve()
        launcher.require_files({"the CA certificate": bundle / "ca.pem", "the SuperNode key": bundle / "supernode.key"},
                               bundle, f"pass --keys the bundle `fedveil keys init` wrote for this {role} "
                               f"(for example keys/{node_config['name']})")
        node_config["keys"] = str(bundle)
        ca, auth = bundle / "ca.pem", bundle / "supernode.key"
    if args.port:
        launcher.check_port_free("127.0.0.1", args.port, f"--port {args.port}",
                                 "pass another --port, or leave it out to use a free port")
    superlink = args.superlink or cfg.server.superlink
    host, port = _split_address(superlink)
    timeout = float(args.connect_timeout)
    deadline = time.monotonic() + timeout
    unreachable_fix = ("start `fedveil server` first, check --superlink / server.superlink and the firewall, "
                       "or raise --connect-timeout")
    _say(f"{role} {node_config['name']} connecting to {superlink} (Ctrl-C to stop)")
    attempt = 0
    while True:
        launcher.wait_reachable(host, port, max(1.0, deadline - time.monotonic()), what="the SuperLink",
                                fix=unreachable_fix, say=_say)
        argv = launcher.supernode_argv(superlink, args.port or launcher.free_port(), node_config, ca_cert=ca,
                                       auth_key=auth)
        code, output, admitted = _run_foreground(argv, launcher.flower_env(workdir), workdir, f"{role}-node")
        if code == 0 or admitted:
            return code
        cause = launcher.classify_node_failure(output)
        left = deadline - time.monotonic()
        if cause in ("unreachable", "not-admitted") and left > 0:
            delay = min(launcher.backoff(attempt), left)
            _say(f"{role} {node_config['name']}: the SuperLink {'is unreachable' if cause == 'unreachable' else 'did not admit this node yet'}; "
                 f"retrying in {delay:.0f}s ({left:.0f}s left of --connect-timeout {timeout:.0f})")
            time.sleep(delay)
            attempt += 1
            continue
        raise _node_failure(cause, role, superlink, timeout)


def _node_failure(cause: str, role: str, superlink: str, timeout: float) -> FedveilError:
    """The error for a SuperNode that never got admitted, naming the cause Flower printed."""
    if cause == "tls":
        return FedveilError(f"TLS with the SuperLink at {superlink} failed: this {role}'s ca.pem does not match "
                            "the server's certificate, or a key file is missing",
                            "use the bundle from the same `fedveil keys init` as the server's --keys")
    if cause == "unreachable":
        return FedveilError(f"the SuperLink at {superlink} did not answer within --connect-timeout {timeout:.0f}s",
                            "start `fedveil server` first, check --superlink and the firewall, or raise "
                            "--connect-timeout")
    if cause == "not-admitted":
        return FedveilError(f"the SuperLink at {superlink} answered but did not admit this {role} within "
                            f"--connect-timeout {timeout:.0f}s: its SuperNode key is not registered there",
                            "ask the server operator to register this node's supernode.pub (`fedveil server --keys` "
                            "registers every key from `fedveil keys init`), or raise --connect-timeout")
    return FedveilError(f"the {role}'s SuperNode stopped before the SuperLink at {superlink} admitted it",
                        "see its output above")


# ---- reading the store ---------------------------------------------------------------------------
def _store_from_args(args: argparse.Namespace):
    from fedveil.platform.store import MetricsStore, store_url

    url = args.store or os.environ.get("FEDVEIL_STORE_URL")
    if url:
        return MetricsStore.open_readonly(url)
    db = Path(args.workdir) / "fedveil.db"
    if not db.exists():
        raise FedveilError(f"no metrics store at {db}", "pass the --workdir of a run, or --store URL")
    return MetricsStore.open_readonly(store_url(args.workdir))


def cmd_export(args: argparse.Namespace) -> int:
    store = _store_from_args(args)
    try:
        print(json.dumps(store.export(), indent=2))
    finally:
        store.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    store = _store_from_args(args)
    try:
        runs = store.list_runs()
        if not runs:
            _say("no runs yet")
        for run in runs:
            rounds = store.rounds(run["id"])
            _say(f"{run['id']}: {run['status']}, {run['mode']}/{run['secure']}, "
                 f"{len(rounds)}/{run['rounds_planned']} rounds")
    finally:
        store.close()
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from fedveil.platform.store import store_url

    from fedveil.dashboard.serve import serve
    from fedveil.platform.store import safe_url

    url = args.store or os.environ.get("FEDVEIL_STORE_URL") or store_url(args.workdir)
    _say(f"dashboard for {safe_url(url)} on http://{args.host}:{args.port} (Ctrl-C to stop)")
    serve(url, port=args.port, host=args.host, password=os.environ.get("FEDVEIL_DASHBOARD_PASSWORD"))
    return 0


# ---- argument parsing --------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedveil", description="Federated, privacy-preserving learning.")
    parser.add_argument("--debug", action="store_true", help="show stack traces for unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run a whole federation on this machine, on loopback")
    demo.add_argument("--config", help="federation TOML (defaults are used if omitted)")
    demo.add_argument("--rounds", type=int, help="number of rounds (default: config or 5)")
    demo.add_argument("--clients", type=int, help="number of organizations (default 3)")
    demo.add_argument("--proxies", type=int,
                      help="number of proxy aggregators (default 4 for replicated-sharing, else 2)")
    demo.add_argument("--dataset", help="breast_cancer, digits, wine, mnist (default: breast_cancer)")
    demo.add_argument("--secure", choices=SECURE_MODES,
                      help="secure aggregation mode (default replicated-sharing: survives one dead proxy)")
    demo.add_argument("--mode", choices=ROUND_MODES, help="round mode")
    demo.add_argument("--workdir", help="where the store, logs and ledgers go (default ./fedveil-demo)")
    demo.add_argument("--store", help="SQLAlchemy URL of the metrics store, e.g. postgresql://USER@HOST/DB "
                                      "(default: WORKDIR/fedveil.db; or FEDVEIL_STORE_URL; password via PGPASSWORD)")
    demo.add_argument("--no-dashboard", action="store_true", help="do not serve the dashboard")
    demo.add_argument("--port", type=int, help="dashboard port (default: a free port)")
    demo.add_argument("--timeout", type=float, default=None,
                      help="give up after this many seconds (default: none; the run ends when its rounds do)")
    demo.add_argument("--keys", help="use bundles from `fedveil keys init` instead of fresh temporary ones")
    demo.add_argument("--insecure", action="store_true",
                      help="no TLS, no SuperNode authentication (only with --secure none)")
    demo.set_defaults(func=cmd_demo)

    server = sub.add_parser("server", help="run the SuperLink and the federation's ServerApp")
    server.add_argument("--config", required=True, help="federation TOML")
    server.add_argument("--workdir", default="fedveil-server", help="store, checkpoints and logs")
    server.add_argument("--superlink", help="HOST:PORT to listen on (default: server.superlink)")
    server.add_argument("--keys", help="bundle root from `fedveil keys init` (enables TLS and node auth)")
    server.add_argument("--resume", action="store_true",
                        help="continue the newest unfinished run of this federation (same run id) from its last checkpoint")
    server.set_defaults(func=cmd_server)

    for name, helptext in (("proxy", "run a proxy aggregator node"), ("client", "run an organization's client node")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", required=True, help="federation TOML")
        p.add_argument("--superlink", help="HOST:PORT of the SuperLink (default: server.superlink)")
        p.add_argument("--workdir", help="local state (replay guard or privacy ledger)")
        p.add_argument("--keys", help="this node's key bundle from `fedveil keys init`")
        p.add_argument("--port", type=int, help="local port for the SuperNode's ClientApp API")
        p.add_argument("--connect-timeout", type=float, default=300,
                       help="keep retrying this many seconds while the SuperLink is unreachable or has not "
                            "admitted this node's key yet (default 300)")
        if name == "proxy":
            p.add_argument("--name", required=True, help="proxy name, as listed in proxies.names")
            p.set_defaults(func=cmd_proxy)
        else:
            p.add_argument("--org", required=True, help="organization name")
            p.add_argument("--data", help="CSV, Parquet or NPZ file, or a built-in dataset name")
            p.add_argument("--index", type=int, default=0, help="partition index for built-in datasets")
            p.add_argument("--num-orgs", type=int, default=1, help="partition count for built-in datasets")
            p.add_argument("--manifest-fingerprint",
                           help="refuse to start unless the manifest in --keys has this SHA-256 (checked out of band)")
            _add_policy_flags(p)
            p.set_defaults(func=cmd_client)

    for name, func, helptext in (("export", cmd_export, "print the store as JSON (stable format, docs/export.md)"),
                                 ("status", cmd_status, "summarize the runs in a store")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--workdir", default="fedveil-demo", help="work dir holding fedveil.db")
        p.add_argument("--store", help="SQLAlchemy URL of the store (instead of --workdir)")
        p.set_defaults(func=func)

    dash = sub.add_parser("dashboard", help="serve the live Streamlit dashboard")
    dash.add_argument("--workdir", default="fedveil-demo", help="work dir holding fedveil.db")
    dash.add_argument("--store", help="SQLAlchemy URL of the store")
    dash.add_argument("--port", type=int, default=8501)
    dash.add_argument("--host", default="127.0.0.1")
    dash.set_defaults(func=cmd_dashboard)
    _add_keys_parser(sub)
    _add_model_parser(sub)
    return parser


def _add_policy_flags(p: argparse.ArgumentParser) -> None:
    """The organization's privacy policy ([policy] in its own config); each flag overrides that key."""
    g = p.add_argument_group("privacy policy (what this organization accepts from the server; default: its config)")
    g.add_argument("--allow-secure", action="append", choices=SECURE_MODES, metavar="MODE",
                   help="a secure mode this organization accepts (repeat; default secret-sharing and ckks)")
    g.add_argument("--require-dp", action=argparse.BooleanOptionalAction, default=None,
                   help="decline tasks without DP-SGD (default: yes)")
    g.add_argument("--max-delta", type=float, help="largest δ a task may ask for (default 1e-5)")
    g.add_argument("--min-noise", type=float, help="smallest noise multiplier σ a task may train with (default 0.5)")
    g.add_argument("--max-epsilon", type=float, help="largest ε one run may spend (default: only the budget)")
    g.add_argument("--min-aggregate", type=int, help="smallest aggregate a task may announce (default 2)")
    g.add_argument("--budget", type=float, help="ε budget over all runs on this data")
    g.add_argument("--allow-models", action="append", metavar="MODEL",
                   help="a model this node may build: mlp, cnn or 'package.module:factory' (repeat; default mlp, cnn)")


# ---- models you can take away, and an organization's own ledger -------------------------------
def cmd_model_export(args: argparse.Namespace) -> int:
    from fedveil.platform.model_io import export_model

    info = export_model(args.workdir, args.out, args.format, run=args.run, which=args.round)
    _say(f"wrote {args.out} ({args.format}): run {info['run_id']}, round {info['round']} ({info['selected']}), "
         f"model {info['model']} input {tuple(info['input_shape'])} -> {info['num_classes']} classes")
    _say(f"inputs must be scaled as in training: {info['input_scaling']}; description in {args.out}.json")
    return 0


def cmd_model_evaluate(args: argparse.Namespace) -> int:
    from fedveil.platform.model_io import evaluate_model

    result = evaluate_model(args.model, args.data, label_column=args.label_column)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _say(f"{args.model} on {args.data} ({result['split']}, {result['rows']} rows): "
             f"accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}")
    return 0


def _add_model_parser(sub) -> None:
    from fedveil.platform.model_io import FORMATS

    model = sub.add_parser("model", help="export a run's global model, or score an exported model")
    msub = model.add_subparsers(dest="model_command", required=True)
    exp = msub.add_parser("export", help="write a checkpoint as a file plain PyTorch / ONNX Runtime loads")
    exp.add_argument("--workdir", default="fedveil-demo", help="the server's or demo's work dir (holds checkpoints/)")
    exp.add_argument("--run", help="run id (default: the newest run with checkpoints)")
    exp.add_argument("--round", default="last", help="N, best (by held-out accuracy, else client validation) or last")
    exp.add_argument("--format", choices=FORMATS, default="torchscript")
    exp.add_argument("--out", required=True, help="file to write (a description goes to FILE.json)")
    exp.set_defaults(func=cmd_model_export)
    ev = msub.add_parser("evaluate", help="score an exported model on a data file or a builtin's test split")
    ev.add_argument("--model", required=True, help="a file written by `fedveil model export`")
    ev.add_argument("--data", required=True, help="a .csv/.parquet/.npz file, or a builtin name (its test split)")
    ev.add_argument("--label-column", default="label", help="label column of a CSV/Parquet file")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(func=cmd_model_evaluate)


def _client_ledger_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedveil client ledger",
                                     description="show an organization its own privacy ledger (authoritative ε)")
    parser.add_argument("--debug", action="store_true", help="show stack traces for unexpected errors")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workdir", help="the organization's work dir (holds privacy-ledger.db); a demo work dir "
                       "shows every organization's")
    where.add_argument("--ledger", help="path of a privacy-ledger.db")
    parser.set_defaults(func=cmd_client_ledger)
    return parser


def _ledger_summary(path: Path) -> dict[str, Any]:
    """Per dataset of a ledger: charges, runs, and ε recomputed over all of them at the charges' δ."""
    import sqlite3
    from contextlib import closing

    from fedveil.clients.ledger import PrivacyLedger

    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            org = con.execute("SELECT value FROM meta WHERE key='org'").fetchone()[0]
    except (sqlite3.DatabaseError, TypeError) as exc:
        raise FedveilError(f"{path} is not a fedveil privacy ledger ({exc})",
                           "pass the privacy-ledger.db of an organization's work dir") from None
    ledger = PrivacyLedger(path, org)
    datasets = []
    for dataset in ledger.datasets():
        rows = ledger.history(dataset)
        delta = min(float(r["delta"]) for r in rows)  # the strictest δ any charge was made at
        accountant = str(rows[-1]["accountant"])
        datasets.append({"dataset": dataset, "entries": len(rows), "runs": len({r["run_id"] for r in rows}),
                         "delta": delta, "accountant": accountant,
                         "epsilon": ledger.epsilon(dataset, delta, accountant)})
    return {"org": org, "datasets": datasets}


def cmd_client_ledger(args: argparse.Namespace) -> int:
    ledger_summary = _ledger_summary

    if args.ledger:
        paths = [Path(args.ledger)]
    else:
        root = Path(args.workdir or ".")
        paths = [root / "privacy-ledger.db"] if (root / "privacy-ledger.db").exists() else \
            sorted(root.glob("orgs/*/privacy-ledger.db"))
    if not paths or not all(p.is_file() for p in paths):
        raise FedveilError(f"no privacy ledger at {paths[0] if paths else Path(args.workdir or '.')}",
                           "pass the organization's --workdir (it holds privacy-ledger.db) or --ledger PATH")
    for path in paths:
        summary = ledger_summary(path)
        _say(f"{summary['org']}: ledger {path}")
        if not summary["datasets"]:
            _say("  no charges yet (ε = 0 on every dataset)")
        for d in summary["datasets"]:
            _say(f"  dataset {d['dataset']}: {d['entries']} charge(s) over {d['runs']} run(s), "
                 f"ε = {d['epsilon']:.3f} at δ = {d['delta']:g} ({d['accountant']})")
    return 0


def _add_keys_parser(sub) -> None:
    try:
        from fedveil.platform.provision import add_keys_parser
    except ImportError:
        return
    add_keys_parser(sub)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (e.g. from a service manager) stops cleanly, like Ctrl-C: every started process is stopped."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["client", "ledger"]:  # `fedveil client` runs a node; `client ledger` only reads its ledger
        parser = _client_ledger_parser()
        args = parser.parse_args(argv[2:])
    else:
        parser = build_parser()
        args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return int(args.func(args) or 0)
    except FedveilError as exc:
        print(f"error: {exc.problem}", file=sys.stderr)
        if exc.fix:
            print(f"fix: {exc.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; stopped every process this command started", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug: say so plainly, trace only on request
        if args.debug:
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the trace)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
