"""The client role: what an organization's node does with each message from the server.

Order inside a train task is the privacy argument, so it is spelled out in `train_task`:
evaluate the received model, check the budget, train with DP-SGD, charge the ledger durably,
and only then protect and release the update. Nothing leaves before the charge is on disk.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedveil.platform import config as config_mod
from fedveil.platform.config import FedveilConfig
from fedveil.platform.errors import BudgetExhausted, FedveilError


@dataclass(frozen=True)
class ClientIdentity:
    """Who this node is and where its local state lives, from its SuperNode node-config."""

    org: str
    workdir: Path
    data: str
    index: int
    num_orgs: int
    local_config: str
    keys_dir: str

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any]) -> "ClientIdentity":
        org = str(node_config.get("name", "")) or "org"
        return cls(
            org=org,
            workdir=Path(str(node_config.get("workdir", "")) or f"fedveil-{org}"),
            data=str(node_config.get("data", "")),
            index=int(node_config.get("index", 0)),
            num_orgs=int(node_config.get("num-orgs", 1)),
            local_config=str(node_config.get("config", "")),
            keys_dir=str(node_config.get("keys", "")),
        )

    @property
    def ledger_path(self) -> Path:
        return self.workdir / "privacy-ledger.db"


def local_config(identity: ClientIdentity, federation: FedveilConfig) -> FedveilConfig:
    """The organization's own config. Its budget is never taken from the server's copy."""
    if identity.local_config:
        return config_mod.load(identity.local_config)
    return FedveilConfig(privacy=federation.privacy)


def load_datasets(identity: ClientIdentity, cfg: FedveilConfig):
    """The organization's (train, validation) split; errors here are DataError with a fix."""
    from fedveil.platform.data import load_client_data
    from fedveil.platform.models import model_kind

    source = identity.data or cfg.data.source
    return load_client_data(
        source,
        org_index=identity.index,
        num_orgs=identity.num_orgs,
        scheme=cfg.data.partition,
        alpha=cfg.data.alpha,
        seed=cfg.federation.seed,
        val_fraction=cfg.data.val_fraction,
        image=model_kind(cfg.model.name) == "image",
        label_column=cfg.data.label_column,
    )


def build_model(cfg: FedveilConfig, input_shape: tuple[int, ...], num_classes: int):
    from fedveil.platform.models import build_model as _build

    from fedveil.platform.models import model_kwargs

    m = cfg.model
    return _build(m.name, input_shape, num_classes, **model_kwargs(m.name, m.hidden, m.activation, m.groupnorm))


def model_arrays(model) -> list[np.ndarray]:
    return [t.detach().cpu().numpy().copy() for t in model.state_dict().values()]


def set_model_arrays(model, arrays: list[np.ndarray]) -> None:
    import torch

    keys = list(model.state_dict().keys())
    if len(keys) != len(arrays):
        raise FedveilError(
            f"the server's model has {len(arrays)} tensors, this client's has {len(keys)}",
            "make sure every organization uses the same [model] section and data schema",
        )
    model.load_state_dict({k: torch.as_tensor(a) for k, a in zip(keys, arrays)}, strict=True)


def hello(identity: ClientIdentity, federation: FedveilConfig) -> dict[str, Any]:
    """Describe this client to the server: data shape and size, and its privacy standing."""
    from fedveil.clients.ledger import PrivacyLedger
    from fedveil.platform.data import dataset_fingerprint

    cfg = local_config(identity, federation)
    train_ds, val_ds = load_datasets(identity, federation)
    ledger = PrivacyLedger(identity.ledger_path, identity.org)
    dataset_id = dataset_fingerprint(train_ds)
    return {
        "role": "client",
        "name": identity.org,
        "num_samples": int(len(train_ds.y)),
        "num_val": int(len(val_ds.y)),
        "input_shape": list(train_ds.feature_shape),
        "num_classes": int(train_ds.num_classes),
        "epsilon": ledger.epsilon(dataset_id, cfg.privacy.delta, cfg.privacy.accountant),
        "budget": cfg.org_budget(identity.org),
    }


@dataclass
class TrainOutcome:
    status: str
    info: dict[str, Any]
    metrics: dict[str, float]
    vector: np.ndarray | None  # n_i * delta_i, flat float64, only when status == ok


def _noise_multiplier(federation: FedveilConfig, q: float, steps_per_round: int, state_cache: dict) -> float:
    """σ as configured, or planned once per run from the target ε over all planned steps."""
    from fedveil.clients.training import plan_noise_multiplier

    priv = federation.privacy
    if priv.noise_multiplier is not None and priv.target_epsilon is None:
        return float(priv.noise_multiplier)
    total_steps = steps_per_round * federation.federation.rounds
    key = f"sigma:{priv.target_epsilon}:{priv.delta}:{q:.8f}:{total_steps}:{priv.accountant}"
    if key not in state_cache:
        state_cache[key] = plan_noise_multiplier(priv.target_epsilon, priv.delta, q, total_steps, priv.accountant)
    return float(state_cache[key])


def train_task(
    identity: ClientIdentity,
    federation: FedveilConfig,
    global_arrays: list[np.ndarray],
    run_id: str,
    task_id: str,
    state_cache: dict,
) -> TrainOutcome:
    """One train task, in the order the privacy argument needs (see module docstring)."""
    from fedveil.clients.ledger import PrivacyLedger
    from fedveil.clients.training import DPSettings, TrainSettings, evaluate, sample_rate, steps_per_epoch, train
    from fedveil.platform.data import dataset_fingerprint

    cfg = local_config(identity, federation)
    budget = cfg.org_budget(identity.org)
    priv = federation.privacy
    train_ds, val_ds = load_datasets(identity, federation)
    model = build_model(federation, train_ds.feature_shape, train_ds.num_classes)
    set_model_arrays(model, global_arrays)

    # 1. Evaluate the received global model before training (saves a round trip).
    val_loss, val_acc = evaluate(model, val_ds)
    metrics = {"val_loss": val_loss, "val_accuracy": val_acc, "num_samples": float(len(train_ds.y))}

    # 2. Would this round exceed the budget? Then decline: a normal status, not an error.
    ledger = PrivacyLedger(identity.ledger_path, identity.org)
    dataset_id = dataset_fingerprint(train_ds)
    n = len(train_ds.y)
    q = sample_rate(n, federation.training.batch_size)
    steps = steps_per_epoch(n, federation.training.batch_size) * federation.training.epochs
    spent = ledger.epsilon(dataset_id, priv.delta, priv.accountant)
    info: dict[str, Any] = {"org": identity.org, "accountant": priv.accountant, "dataset": dataset_id}
    sigma = 0.0
    if priv.enabled:
        sigma = _noise_multiplier(federation, q, steps, state_cache)
        after = ledger.preview(dataset_id, sigma, q, steps, priv.delta, priv.accountant)
        if after > budget:
            info["message"] = (
                f"{identity.org} declines: this round would raise ε from {spent:.3f} to {after:.3f}, "
                f"over its budget of {budget:g}. Raise privacy.budget for this organization to continue."
            )
            metrics.update(epsilon=spent, delta=priv.delta, budget=budget, noise_multiplier=sigma, sample_rate=q)
            return TrainOutcome("budget_exhausted", info, metrics, None)

    # 3. Train locally with DP-SGD and form the weighted update n_i * delta_i.
    from fedveil.clients.training import scheduled_lr, task_round

    tr = federation.training
    settings = TrainSettings(
        epochs=tr.epochs,
        batch_size=tr.batch_size,
        lr=scheduled_lr(tr.lr, tr.lr_schedule, task_round(task_id), federation.federation.rounds, lr_min=tr.lr_min,
                        step_rounds=tr.lr_step_rounds, gamma=tr.lr_gamma),
        optimizer=tr.optimizer,
        device=cfg.org(identity.org).device or tr.device,
        seed=federation.federation.seed + zlib.crc32(task_id.encode()) % 100_000,
        momentum=tr.momentum,
        weight_decay=tr.weight_decay,
    )
    dp = DPSettings(
        enabled=priv.enabled,
        max_grad_norm=priv.max_grad_norm,
        noise_multiplier=sigma,
        delta=priv.delta,
        accountant=priv.accountant,
        grad_sample_mode=priv.grad_sample_mode,
    )
    result = train(model, train_ds, settings, dp, sigma)
    from fedveil.platform.params import flatten

    delta_vec = flatten(model_arrays(model)) - flatten(global_arrays)
    if not np.all(np.isfinite(delta_vec)):
        info["message"] = f"{identity.org}: local training diverged (NaN/inf update); lower training.lr"
        return TrainOutcome("error", info, metrics, None)

    # 4. Charge the ledger durably *before* anything is released.
    epsilon = spent
    if priv.enabled:
        try:
            epsilon = ledger.charge(
                dataset_id, run_id, task_id, result.noise_multiplier, result.sample_rate, result.steps,
                priv.delta, budget, priv.accountant,
            )
        except BudgetExhausted as exc:
            info["message"] = str(exc)
            metrics.update(epsilon=spent, delta=priv.delta, budget=budget)
            return TrainOutcome("budget_exhausted", info, metrics, None)
    metrics.update(
        epsilon=epsilon, delta=priv.delta, budget=budget, noise_multiplier=result.noise_multiplier,
        sample_rate=result.sample_rate, steps=float(result.steps), train_loss=result.train_loss,
        train_seconds=result.seconds,
    )
    return TrainOutcome("ok", info, metrics, delta_vec * float(n))


def evaluate_task(identity: ClientIdentity, federation: FedveilConfig, global_arrays: list[np.ndarray]) -> dict[str, float]:
    """Evaluate the final global model on the local validation split."""
    from fedveil.clients.training import evaluate

    _, val_ds = load_datasets(identity, federation)
    model = build_model(federation, val_ds.feature_shape, val_ds.num_classes)
    set_model_arrays(model, global_arrays)
    loss, acc = evaluate(model, val_ds)
    return {"val_loss": loss, "val_accuracy": acc, "num_val": float(len(val_ds.y))}


def client_keyring(identity: ClientIdentity):
    """The proxies' public keys and CKKS public context, from provisioning (never from the server)."""
    from fedveil.secure.modes import ClientKeyring

    if not identity.keys_dir:
        return ClientKeyring()
    from fedveil.platform.provision import load_client_keyring_dir

    return load_client_keyring_dir(identity.keys_dir)


def check_protection_ready(identity: ClientIdentity, federation: FedveilConfig, proxies: list[str]) -> None:
    """Fail before training (and before any ε is spent) if this client could not protect its update."""
    from fedveil.platform.errors import SecurityError

    mode = federation.federation.secure
    if mode == "none":
        return
    keys = client_keyring(identity)
    missing = [p for p in proxies if p not in keys.proxy_public_keys]
    if missing:
        raise SecurityError(f"{identity.org} has no provisioned public key for proxies {missing}",
                            "run `fedveil keys init` and give this organization its bundle (--keys); proxy keys are "
                            "never taken from the server")
    if mode == "ckks" and keys.ckks_public_context is None:
        raise SecurityError(f"{identity.org} has no CKKS public context", "re-run `fedveil keys init` without --no-ckks")


def protect(identity: ClientIdentity, federation: FedveilConfig, vector: np.ndarray, proxies: list[str],
            run_id: str, task_id: str, client_id: str) -> dict[str, bytes]:
    """Seal/share/encrypt the weighted update for the proxies the server assigned."""
    from fedveil.secure.modes import Binding, get_mode

    mode_name = federation.federation.secure
    binding = Binding(run_id=run_id, task_id=task_id, client_id=client_id, proxy_id="", mode=mode_name,
                      length=int(vector.size))
    mode = get_mode(mode_name, **federation.secure_options())
    return mode.protect(vector, proxies, binding, client_keyring(identity))
