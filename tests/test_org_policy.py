"""An organization's own privacy policy against a deviating server (issue 8, defects 2, 3 and 5).

Each test plays the server with exactly what it holds: it writes the task config, the global
weights, the run and task ids, the proxy assignment, and it may resend. The organization's node is
the real ClientApp on the in-process grid, with its own config file, ledger and keys. A task that
asks for less than the organization's `[policy]` is declined with status `policy`, before any ε is
spent; a resent task gets the stored bytes; and the honest path still trains.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from fedveil.clients import node
from fedveil.clients.ledger import PrivacyLedger
from fedveil.platform import config as config_mod
from fedveil.platform import messages as wire
from fedveil.platform.federation import write_config
from fedveil.platform.localgrid import LocalGrid, LocalNode
from fedveil.platform.nodeapp import app
from fedveil.platform.provision import init_federation_keys
from fedveil.platform.store import store_url
from tests.conftest import run_federation

ORG = "hospital-a"
PROXIES = ["proxy-1", "proxy-2"]


def server_config(**overrides) -> config_mod.FedveilConfig:
    """What an honest server sends: secret sharing, DP-SGD at σ=1, δ=1e-5, one short epoch."""
    values = {"federation.rounds": 2, "federation.secure": "secret-sharing", "data.source": "breast_cancer",
              "training.epochs": 1, "training.batch_size": 32, "privacy.noise_multiplier": 1.0,
              "orgs": [{"name": n} for n in (ORG, "hospital-b", "hospital-c")]}
    values.update(overrides)
    return config_mod.with_overrides(config_mod.FedveilConfig(), values)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    out = tmp_path_factory.mktemp("keys")
    init_federation_keys(out, PROXIES, [ORG, "hospital-b", "hospital-c"], ckks=False)
    return out


class Org:
    """One organization's node (the real ClientApp) and a server that talks to it with what it holds."""

    def __init__(self, tmp_path: Path, keys_dir: Path | None, own: config_mod.FedveilConfig | None = None):
        self.workdir = tmp_path / "org"
        nc = {"role": "client", "name": ORG, "workdir": str(self.workdir), "index": 0, "num-orgs": 3}
        if own is not None:  # the org's own config file; without one it runs on safe defaults
            nc["config"] = str(write_config(own, tmp_path / "org-config.toml"))
        if keys_dir is not None:
            nc["keys"] = str(keys_dir / ORG)
        self.grid = LocalGrid(app, {101: LocalNode(nc)})
        self.ledger = PrivacyLedger(self.workdir / "privacy-ledger.db", ORG)

    def send(self, kind: str, task: dict, cfg: config_mod.FedveilConfig, arrays=None):
        from flwr.app import Message, RecordDict

        content = RecordDict({"task": wire.json_record({**task, "config": cfg.to_json()})})
        if arrays is not None:
            content["global"] = wire.weights_record(arrays)
        (reply,) = self.grid.send_and_receive([Message(content, 101, kind)], timeout=120)
        assert not reply.has_error(), reply.error
        return reply

    def hello(self, cfg) -> dict:
        return wire.reply_status(self.send(wire.HELLO, {"run_id": "r1"}, cfg).content)

    def weights(self, cfg, seed: int = 0) -> list[np.ndarray]:
        import torch

        info = self.hello(cfg)
        torch.manual_seed(seed)
        return node.model_arrays(node.build_model(cfg, tuple(info["input_shape"]), info["num_classes"]))

    def train(self, cfg, task_id: str = "t1", run_id: str = "r1", arrays=None, proxies=PROXIES):
        arrays = arrays if arrays is not None else self.weights(server_config())
        reply = self.send(wire.TRAIN, {"run_id": run_id, "task_id": task_id, "round": 1, "proxies": proxies},
                          cfg, arrays)
        return wire.reply_status(reply.content), wire.reply_metrics(reply.content), wire.reply_blobs(reply.content)

    def charges(self) -> list[dict]:
        return [row for ds in self.ledger.datasets() for row in self.ledger.history(ds)]

    def close(self) -> None:
        self.grid.shutdown()


@pytest.fixture
def org(tmp_path, keys):
    o = Org(tmp_path, keys, own=server_config())  # the org's file: same federation, default [policy]
    yield o
    o.close()


EVIL = f"fedveil_evil_{uuid.uuid4().hex[:8]}"

DEVIATIONS = {
    "allow_secure": {"federation.secure": "none"},
    "require_dp": {"privacy.enabled": False},
    "max_delta": {"privacy.delta": 0.5},
    "min_noise": {"privacy.noise_multiplier": 0.1},
    "min_aggregate": {"federation.min_aggregate": 1, "federation.min_clients": 1, "async.buffer_size": 1},
    "allow_models": {"model.name": f"{EVIL}:build"},
}


@pytest.mark.parametrize("key", sorted(DEVIATIONS))
def test_a_task_asking_for_less_is_declined_before_any_epsilon_is_spent(org, tmp_path, key, monkeypatch):
    # A module the server names as the model factory: importing it would be code execution chosen by the server.
    marker = tmp_path / "imported"
    (tmp_path / f"{EVIL}.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef build(**kw): raise SystemExit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    status, metrics, blobs = org.train(server_config(**DEVIATIONS[key]))
    assert status["status"] == wire.POLICY
    assert f"policy.{key}" in status["message"] and status["policy"] == [key]
    assert "[policy]" in status["message"]  # and the fix: the server's change, or the org's key and flag
    assert blobs == {} and metrics == {}  # nothing about the data leaves: no update, no metric
    assert org.charges() == []  # no ε spent, no ledger row
    assert not marker.exists() and EVIL not in sys.modules
    # the honest task still trains, and is charged once
    status, metrics, blobs = org.train(server_config(), task_id="t2")
    assert status["status"] == wire.OK and set(blobs) == set(PROXIES)
    assert len(org.charges()) == 1 and metrics["epsilon"] > 0


def test_a_planned_sigma_below_the_floor_is_declined(org):
    """A target ε the server picks so large that the planned σ falls below the org's floor."""
    status, _, blobs = org.train(server_config(**{"privacy.noise_multiplier": None, "privacy.target_epsilon": 500.0}))
    assert status["status"] == wire.POLICY and "policy.min_noise" in status["message"]
    assert blobs == {} and org.charges() == []


def test_an_org_without_a_config_file_gets_safe_defaults_not_the_servers(tmp_path, keys):
    """The server's copy of [policy] (here: allow anything) is never used by a client."""
    permissive = {"policy.allow_secure": ["none", "secret-sharing", "ckks"], "policy.require_dp": False,
                  "policy.budget": 1e9, "privacy.budget": 1e9}
    o = Org(tmp_path, keys, own=None)
    try:
        status, _, blobs = o.train(server_config(**{"federation.secure": "none", "privacy.enabled": False,
                                                    **permissive}))
        assert status["status"] == wire.POLICY and {"allow_secure", "require_dp"} <= set(status["policy"])
        assert blobs == {} and o.charges() == []
        info = o.hello(server_config(**permissive))
        assert info["budget"] == config_mod.PrivacySection().budget  # the default, not the server's 1e9
        assert info["policy"]["allow_secure"] == ["secret-sharing", "ckks"]
    finally:
        o.close()


def test_max_epsilon_per_run_is_enforced_from_the_ledger(org):
    cfg = server_config()
    status, metrics, _ = org.train(cfg, task_id="t1", run_id="r1")
    assert status["status"] == wire.OK
    own = server_config(**{"policy.max_epsilon": metrics["epsilon"] * 1.05})  # room for one task per run
    org.grid.nodes[101].node_config["config"] = str(write_config(own, org.workdir.parent / "org-config.toml"))
    status, _, blobs = org.train(cfg, task_id="t2", run_id="r1")
    assert status["status"] == wire.POLICY and "policy.max_epsilon" in status["message"] and blobs == {}
    assert len(org.charges()) == 1
    status, _, _ = org.train(cfg, task_id="t1", run_id="r2")  # a new run has its own per-run cap
    assert status["status"] == wire.OK and len(org.charges()) == 2


def test_a_resent_task_gets_the_same_bytes_and_one_charge(org):
    """Defect 3: averaging k fresh noisy releases of one task would cut the noise variance by k."""
    cfg = server_config()
    first = org.train(cfg, task_id="t1")
    assert first[0]["status"] == wire.OK and "train_loss" not in first[1]
    # The server resends t1 with everything it could change: another global model, σ, proxies order.
    other_model = [a + 0.5 for a in org.weights(cfg, seed=1)]
    again = org.train(server_config(**{"privacy.noise_multiplier": 3.0}), task_id="t1", arrays=other_model,
                      proxies=list(reversed(PROXIES)))
    assert again == first  # status, metrics and every sealed byte identical
    assert len(org.charges()) == 1
    # New work under a new task id is trained with fresh noise and charged again.
    fresh = org.train(cfg, task_id="t2")
    assert fresh[0]["status"] == wire.OK and fresh[2] != first[2]
    assert len(org.charges()) == 2 and fresh[1]["epsilon"] > first[1]["epsilon"]


def test_the_training_loss_stays_with_the_org(org):
    """Defect 5: the mean loss over private training records is not released (it is not noised)."""
    status, metrics, _ = org.train(server_config(), task_id="t1")
    assert status["status"] == wire.OK and "train_loss" not in metrics and "train_loss" not in status
    stored = org.ledger.stored_reply("r1", "t1")
    assert np.isfinite(stored.local["train_loss"]) and "train_loss" not in stored.metrics


def test_the_split_and_the_ledger_key_do_not_follow_the_server(org, tmp_path):
    """The server's seed, val_fraction and model kind move no record between training and validation."""
    a = org.hello(server_config())
    b = org.hello(server_config(**{"federation.seed": 1234, "data.val_fraction": 0.6}))
    assert (a["num_samples"], a["num_val"]) == (b["num_samples"], b["num_val"])
    own = server_config()
    ident = node.ClientIdentity.from_node_config({"name": ORG, "workdir": str(org.workdir), "index": 0,
                                                  "num-orgs": 3})
    tr1, va1 = node.own_datasets(ident, own, "mlp")
    tr2, va2 = node.own_datasets(ident, own, "mlp")
    np.testing.assert_array_equal(va1.X, va2.X)
    # another organization's secret gives another split of the same records (the seed is not public)
    other = node.ClientIdentity.from_node_config({"name": ORG, "workdir": str(tmp_path / "elsewhere"), "index": 0,
                                                  "num-orgs": 3})
    tr3, _ = node.own_datasets(other, own, "mlp")
    assert tr3.origin == tr1.origin and not np.array_equal(tr3.X, tr1.X)


def test_the_ledger_key_is_the_same_for_image_and_flat_forms_of_the_records():
    from fedveil.platform.data import dataset_fingerprint, load_builtin, load_client_data

    flat, _ = load_client_data("digits", 0, 3, "iid", 0.5, 0, 0.2, image=False)
    img, _ = load_client_data("digits", 0, 3, "iid", 0.5, 0, 0.2, image=True)
    assert img.feature_shape == (1, 8, 8) and flat.origin == img.origin
    assert dataset_fingerprint(load_builtin("digits", image=True)) == dataset_fingerprint(load_builtin("digits"))


def test_the_server_records_policy_declines_and_the_orgs_policies(tmp_path, capsys):
    """A server configured with secure = "none" gets a `policy` decline from every organization."""
    cfg = server_config(**{"federation.secure": "none", "federation.rounds": 1})
    fed, store, _ = run_federation(tmp_path, cfg, "r1")
    assert store.rounds("r1")[0]["participants"] == 0
    declines = [e for e in store.events("r1") if e["kind"] == "policy"]
    assert {e["source"] for e in declines} == {ORG, "hospital-b", "hospital-c"}
    assert all("policy.allow_secure" in e["message"] for e in declines)
    rows = store.client_rounds("r1")
    assert {r["status"] for r in rows} == {wire.POLICY}
    clients = [n for n in store.nodes("r1") if n["role"] == "client"]
    assert clients and all(json.loads(n["info"])["policy"]["allow_secure"] == ["secret-sharing", "ckks"]
                           for n in clients)
    for name in (ORG, "hospital-b"):
        assert PrivacyLedger(tmp_path / "orgs" / name / "privacy-ledger.db", name).datasets() == []
    # The dashboard (it reads only the store) shows each organization's policy and its declines.
    from fedveil.dashboard.views import policy_frame

    frame = policy_frame(store.nodes("r1"), store.events("r1")).set_index("Organization")
    assert sorted(frame.index) == [ORG, "hospital-b", "hospital-c"]
    assert (frame["Policy declines"] == 1).all() and (frame["Secure modes"] == "secret-sharing, ckks").all()
    assert frame.loc[ORG, "DP required"] and "policy.allow_secure" in frame.loc[ORG, "Last decline"]
    at = _dashboard(store_url(tmp_path))
    privacy = next(t for t in at.tabs if t.label.endswith("Privacy"))
    shown = next(df.value for df in privacy.dataframe if "Policy declines" in df.value.columns)
    assert sorted(shown["Organization"]) == [ORG, "hospital-b", "hospital-c"]
    assert any("privacy policy" in w.value and ORG in w.value for w in privacy.warning)
    # ... and the run's summary (`fedveil demo`/`server`) says why, once, naming the key and the fix
    from fedveil.platform import cli

    capsys.readouterr()
    cli._print_summary(store, "r1")
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("declined by")]
    assert len(said) == 1 and all(org in said[0] for org in (ORG, "hospital-b", "hospital-c"))
    assert "policy.allow_secure" in said[0] and "--allow-secure" in said[0]


def _dashboard(url: str):
    import os

    from streamlit.testing.v1 import AppTest

    from fedveil.dashboard import views

    os.environ["FEDVEIL_DASHBOARD_STORE"] = url
    os.environ.pop("FEDVEIL_DASHBOARD_PASSWORD", None)
    try:
        at = AppTest.from_file(str(Path(views.__file__).with_name("app.py")), default_timeout=60)
        at.run()
    finally:
        os.environ.pop("FEDVEIL_DASHBOARD_STORE", None)
    assert not at.exception, [e.value for e in at.exception]
    return at


def test_client_policy_flags_override_the_orgs_config(tmp_path):
    from fedveil.platform.cli import build_parser, policy_overrides

    args = build_parser().parse_args(["client", "--config", "x.toml", "--org", ORG, "--allow-secure", "ckks",
                                      "--no-require-dp", "--max-delta", "1e-6", "--min-noise", "0.8",
                                      "--max-epsilon", "3", "--min-aggregate", "3", "--budget", "5",
                                      "--allow-models", "mlp", "--allow-models", "mypkg.models:build"])
    pol = config_mod.with_overrides(server_config(), policy_overrides(args)).policy
    assert pol.allow_secure == ["ckks"] and pol.require_dp is False and pol.max_delta == 1e-6
    assert (pol.min_noise, pol.max_epsilon, pol.min_aggregate, pol.budget) == (0.8, 3.0, 3, 5.0)
    assert pol.allow_models == ["mlp", "mypkg.models:build"]
    # the node reads the flags from the org's effective config, written to its own work dir
    from fedveil.platform.cli import _org_config

    written = _org_config(config_mod.with_overrides(server_config(), policy_overrides(args)), args, tmp_path)
    assert written.parent == tmp_path.resolve() and config_mod.load(written).policy == pol
    assert policy_overrides(build_parser().parse_args(["client", "--config", "x.toml", "--org", ORG])) == {}


def test_an_async_server_asking_for_dp_off_is_declined_and_stops_sending_work(tmp_path):
    cfg = server_config(**{"federation.mode": "async", "privacy.enabled": False, "federation.rounds": 2,
                           "federation.round_timeout": 30})
    fed, store, grid = run_federation(tmp_path, cfg, "a1")
    declines = [e for e in store.events("a1") if e["kind"] == "policy"]
    assert sorted(e["source"] for e in declines) == sorted([ORG, "hospital-b", "hospital-c"])  # once each
    assert all("policy.require_dp" in e["message"] for e in declines)
    trains = [m for m in grid.sent if m.metadata.message_type == wire.TRAIN]
    assert len(trains) == 3  # a declining organization gets no more work in this run
    assert PrivacyLedger(tmp_path / "orgs" / ORG / "privacy-ledger.db", ORG).datasets() == []


def test_a_bad_policy_flag_is_a_clear_error(tmp_path, capsys):
    from fedveil.platform import cli

    cfg = write_config(server_config(), tmp_path / "federation.toml")
    code = cli.main(["client", "--config", str(cfg), "--org", ORG, "--max-delta", "2", "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "policy.max_delta" in err and "fix:" in err and "Traceback" not in err


def test_an_evaluate_task_never_imports_a_factory_the_policy_does_not_allow(org, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / f"{EVIL}.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef build(**kw): raise SystemExit\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    arrays = org.weights(server_config())
    reply = org.send(wire.EVALUATE, {"run_id": "r1"}, server_config(**{"model.name": f"{EVIL}:build"}), arrays)
    status = wire.reply_status(reply.content)
    assert status["status"] == wire.ERROR and "policy.allow_models" in status["message"]
    assert wire.reply_metrics(reply.content) == {} and not marker.exists() and EVIL not in sys.modules
    reply = org.send(wire.EVALUATE, {"run_id": "r1"}, server_config(), arrays)  # the allowed model still works
    assert wire.reply_status(reply.content)["status"] == wire.OK and "val_accuracy" in wire.reply_metrics(reply.content)


@pytest.mark.parametrize("name", ["federation.toml", "mnist.toml"])
def test_the_shipped_examples_are_accepted_by_an_orgs_default_policy(name):
    """A user who follows the README with an example config must not be declined by their own defaults."""
    from pathlib import Path

    from fedveil.clients.node import policy_breaches
    from fedveil.platform import config as config_mod
    from fedveil.platform.config import PolicySection

    cfg = config_mod.load(Path(__file__).resolve().parent.parent / "examples" / name)
    assert policy_breaches(PolicySection(), cfg) == []
    assert cfg.privacy.enabled and cfg.privacy.delta <= 1e-5
