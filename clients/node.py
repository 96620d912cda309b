"""The client role: what an organization's node does with each message from the server.

The server may deviate in anything it sends (DESIGN §2), so everything an organization's
protection and DP guarantee depend on comes from its OWN config (`local_config`), never from the
task: its `[policy]` (allowed secure modes, DP required, largest δ, smallest σ, largest ε per run,
`min_aggregate` floor, budget, allowed models), its accountant, its data section and its
validation split (pinned by a secret kept in its work dir). The task may only ask for something
at least as strict; anything else is declined with status `policy` before any ε is spent.

The server chooses the training recipe (epochs, batch size, lr, optimizer, σ or target ε, model
among the allowed ones): those change ε, and the org's `max_epsilon` per run and budget bound them.

Order inside a train task is the privacy argument (`train_task`, then `release`): check the
policy, evaluate the received model, check the budget, train with DP-SGD, protect the update in
memory, charge the ledger and store the protected reply in one durable transaction, and only then
release it. A retried task gets the stored bytes (see clients/ledger.py).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedveil.clients.ledger import Charge, PrivacyLedger, StoredReply, TaskAlreadyAnswered
from fedveil.clients.training import (DPSettings, TrainSettings, evaluate, plan_noise_multiplier, sample_rate,
                                      steps_per_epoch, train)
from fedveil.platform import config as config_mod
from fedveil.platform import messages as wire
from fedveil.platform.config import FedveilConfig, PolicySection
from fedveil.platform.data import dataset_fingerprint, load_client_data
from fedveil.platform.errors import BudgetExhausted, FedveilError, SecurityError
from fedveil.platform.models import build_configured_model as build_model
from fedveil.platform.models import model_arrays, model_kind, set_model_arrays
from fedveil.platform.params import flatten
from fedveil.platform.provision import load_client_keyring_dir
from fedveil.secure.modes import Binding, ClientKeyring, get_mode

SPLIT_SECRET_BYTES = 32


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

    @property
    def split_secret_path(self) -> Path:
        return self.workdir / "split.secret"


def local_config(identity: ClientIdentity) -> FedveilConfig:
    """The organization's own config file; without one, safe defaults. Never the server's values."""
    if identity.local_config:
        return config_mod.load(identity.local_config)
    return FedveilConfig()


def org_budget(identity: ClientIdentity, own: FedveilConfig) -> float:
    """policy.budget, else the org's own orgs[].budget / privacy.budget (all from its own config)."""
    return own.policy.budget or own.org_budget(identity.org)


def split_secret(identity: ClientIdentity) -> bytes:
    """A random secret created once in the org's work dir; it pins the validation split.

    Created atomically (written to a temp file, then hard-linked into place, which fails if another
    process won the race), so every process of this organization reads the same secret.
    """
    path = identity.split_secret_path
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(SPLIT_SECRET_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    secret = path.read_bytes()
    if len(secret) != SPLIT_SECRET_BYTES:
        raise FedveilError(f"{path} holds {len(secret)} bytes, not a {SPLIT_SECRET_BYTES}-byte split secret",
                           "restore it from backup (removing it moves records between training and validation)")
    return secret


def org_split_seed(identity: ClientIdentity, own: FedveilConfig) -> int:
    """The validation split's seed: HMAC of the org's data source under its own secret, never the server's seed."""
    source = identity.data or own.data.source
    mac = hmac.new(split_secret(identity), f"fedveil-split|{source}|{identity.index}".encode(), hashlib.sha256)
    return int.from_bytes(mac.digest()[:8], "big")


def load_datasets(identity: ClientIdentity, cfg: FedveilConfig, *, model_name: str | None = None,
                  split_seed: int | None = None):
    """The organization's (train, validation) split; errors here are DataError with a fix.

    `cfg` should be the org's own config (`own_datasets` does that and pins the split); `model_name`
    (default cfg.model.name) only decides the shape, image or flat, never which records are used.
    """

    source = identity.data or cfg.data.source
    return load_client_data(
        source,
        org_index=identity.index,
        num_orgs=identity.num_orgs,
        scheme=cfg.data.partition,
        alpha=cfg.data.alpha,
        seed=cfg.federation.seed,
        val_fraction=cfg.data.val_fraction,
        image=model_kind(model_name or cfg.model.name) == "image",
        label_column=cfg.data.label_column,
        split_seed=split_seed,
    )


def own_datasets(identity: ClientIdentity, own: FedveilConfig, model_name: str | None = None):
    """The org's split from its own config and secret; the server only picks image or flat (allowed models)."""
    return load_datasets(identity, own, model_name=model_name, split_seed=org_split_seed(identity, own))


# ---- the organization's privacy policy ----------------------------------------------------------
@dataclass(frozen=True)
class PolicyBreach:
    """One way a task asks for less than the org's policy: the key, what is wrong, and the fix."""

    key: str
    problem: str
    fix: str

    def text(self) -> str:
        return f"{self.problem} (policy.{self.key}); {self.fix}"


def model_allowed(policy: PolicySection, name: str) -> bool:
    """Built-in kinds compare case-insensitively; a factory only by its exact 'package.module:factory'."""
    allowed = {m.strip() for m in policy.allow_models}
    return name.strip() in allowed or name.strip().lower() in {m.lower() for m in allowed if ":" not in m}


def policy_breaches(policy: PolicySection, task: FedveilConfig) -> list[PolicyBreach]:
    """What the task's config asks for that the org's policy forbids (checked before anything runs)."""
    fed, priv = task.federation, task.privacy
    out = []
    if fed.secure not in policy.allow_secure:
        out.append(PolicyBreach("allow_secure", f"the task asks for secure mode {fed.secure!r}, this organization "
                                f"allows {policy.allow_secure}", "the server must use one of those modes, or the "
                                "organization adds it to [policy] allow_secure (--allow-secure)"))
    if policy.require_dp and not priv.enabled:
        out.append(PolicyBreach("require_dp", "the task asks to train without DP-SGD", "the server must enable "
                                "privacy, or the organization sets [policy] require_dp = false (--no-require-dp)"))
    if priv.enabled and priv.delta > policy.max_delta:
        out.append(PolicyBreach("max_delta", f"the task asks for δ={priv.delta:g}, above this organization's "
                                f"largest δ {policy.max_delta:g}", "the server must lower privacy.delta, or the "
                                "organization raises [policy] max_delta (--max-delta)"))
    if priv.enabled and policy.min_noise is not None and priv.target_epsilon is None \
            and (priv.noise_multiplier or 0.0) < policy.min_noise:
        out.append(_sigma_breach(priv.noise_multiplier or 0.0, policy.min_noise))
    if fed.min_aggregate < policy.min_aggregate:
        out.append(PolicyBreach("min_aggregate", f"the task allows aggregates of {fed.min_aggregate} client(s), "
                                f"below this organization's floor of {policy.min_aggregate}", "the server must raise "
                                "federation.min_aggregate, or the organization lowers [policy] min_aggregate"))
    if not model_allowed(policy, task.model.name):
        out.append(PolicyBreach("allow_models", f"the task asks for model {task.model.name!r}, which this "
                                f"organization does not allow ({policy.allow_models}); it is not imported",
                                "the server must use an allowed model, or the organization adds it to [policy] "
                                "allow_models (--allow-models)"))
    return out


def _sigma_breach(sigma: float, floor: float) -> PolicyBreach:
    return PolicyBreach("min_noise", f"the task trains with noise multiplier σ={sigma:.4g}, below this "
                        f"organization's floor of {floor:g}", "the server must raise privacy.noise_multiplier (or "
                        "lower target_epsilon), or the organization lowers [policy] min_noise (--min-noise)")


def policy_outcome(identity: ClientIdentity, breaches: list[PolicyBreach]) -> "TrainOutcome":
    """A `policy` decline: a normal status (no ε spent, nothing released), naming every key."""
    message = f"{identity.org} declines the task by its privacy policy: " + "; ".join(b.text() for b in breaches)
    info = {"org": identity.org, "message": message, "policy": [b.key for b in breaches]}
    return TrainOutcome(wire.POLICY, info, {}, None)


class PolicyRefused(FedveilError):
    """A message asks for something the org's policy forbids (e.g. a model factory it does not allow)."""


def hello(identity: ClientIdentity, federation: FedveilConfig) -> dict[str, Any]:
    """Describe this client to the server: data shape and size, its privacy standing and its policy.

    The server's model name only shapes the data when the policy allows it (a factory it does not
    allow is never imported); `policy_conflicts` tells the operator early what this org would decline.
    """

    own = local_config(identity)
    policy = own.policy
    model_name = federation.model.name if model_allowed(policy, federation.model.name) else "mlp"
    train_ds, val_ds = own_datasets(identity, own, model_name)
    ledger = PrivacyLedger(identity.ledger_path, identity.org)
    dataset_id = dataset_fingerprint(train_ds)
    return {
        "role": "client",
        "name": identity.org,
        "num_samples": int(len(train_ds.y)),
        "num_val": int(len(val_ds.y)),
        "input_shape": list(train_ds.feature_shape),
        "num_classes": int(train_ds.num_classes),
        "epsilon": ledger.epsilon(dataset_id, policy.max_delta, own.privacy.accountant),
        "budget": org_budget(identity, own),
        "accountant": own.privacy.accountant,
        "policy": {**policy.model_dump(), "budget": org_budget(identity, own)},
        "policy_conflicts": [b.key for b in policy_breaches(policy, federation)],
    }


@dataclass
class TrainOutcome:
    status: str
    info: dict[str, Any]
    metrics: dict[str, float]
    vector: np.ndarray | None  # n_i * delta_i, flat float64, only when status == ok
    dataset: str = ""
    charge: "Charge | None" = None  # committed with the reply by `release` (None: DP off, nothing to charge)
    local: dict[str, float] = field(default_factory=dict)  # logged by the org only, never released


def _noise_multiplier(federation: FedveilConfig, delta: float, accountant: str, q: float, steps_per_round: int,
                      state_cache: dict) -> float:
    """σ as the task sets it, or planned once per run from the task's target ε over all planned steps."""

    priv = federation.privacy
    if priv.noise_multiplier is not None and priv.target_epsilon is None:
        return float(priv.noise_multiplier)
    total_steps = steps_per_round * federation.federation.rounds
    key = f"sigma:{priv.target_epsilon}:{delta}:{q:.8f}:{total_steps}:{accountant}"
    if key not in state_cache:
        state_cache[key] = plan_noise_multiplier(priv.target_epsilon, delta, q, total_steps, accountant)
    return float(state_cache[key])


def train_task(
    identity: ClientIdentity,
    federation: FedveilConfig,
    global_arrays: list[np.ndarray],
    run_id: str,
    task_id: str,
    state_cache: dict,
    proxies: list[str] | None = None,
) -> TrainOutcome:
    """One train task, up to the protected-but-unreleased update (see module docstring).

    Returns status `policy` or `budget_exhausted` before anything is trained or spent; with
    status ok, `release` must commit the charge with the protected reply before it leaves.
    """

    # 0. The org's own policy, before any data is touched or any model is built (no factory import).
    own = local_config(identity)
    policy = own.policy
    breaches = policy_breaches(policy, federation)
    if breaches:
        return policy_outcome(identity, breaches)
    if proxies is not None:
        check_protection_ready(identity, federation, proxies)
    budget = org_budget(identity, own)
    priv = federation.privacy
    delta, accountant = priv.delta, own.privacy.accountant  # δ ≤ policy.max_delta (stricter); own accountant
    train_ds, val_ds = own_datasets(identity, own, federation.model.name)
    ledger = PrivacyLedger(identity.ledger_path, identity.org)
    dataset_id = dataset_fingerprint(train_ds)
    n = len(train_ds.y)
    q = sample_rate(n, federation.training.batch_size)
    steps = steps_per_epoch(n, federation.training.batch_size) * federation.training.epochs
    sigma = _noise_multiplier(federation, delta, accountant, q, steps, state_cache) if priv.enabled else 0.0
    if priv.enabled and policy.min_noise is not None and sigma < policy.min_noise:
        return policy_outcome(identity, [_sigma_breach(sigma, policy.min_noise)])
    if priv.enabled and policy.max_epsilon is not None:
        run_eps = ledger.run_epsilon(dataset_id, run_id, delta, accountant, extra=(sigma, q, steps))
        if run_eps > policy.max_epsilon:
            return policy_outcome(identity, [PolicyBreach(
                "max_epsilon", f"this task would take run {run_id!r} to ε={run_eps:.3f} (δ={delta:g}), over this "
                f"organization's largest ε per run {policy.max_epsilon:g}", "the server must use more noise, fewer "
                "steps or rounds, or the organization raises [policy] max_epsilon (--max-epsilon)")])

    model = build_model(federation, train_ds.feature_shape, train_ds.num_classes)
    set_model_arrays(model, global_arrays)

    # 1. Evaluate the received global model before training (saves a round trip).
    val_loss, val_acc = evaluate(model, val_ds)
    metrics = {"val_loss": val_loss, "val_accuracy": val_acc, "num_samples": float(n)}

    # 2. Would this round exceed the budget? Then decline: a normal status, not an error.
    spent = ledger.epsilon(dataset_id, delta, accountant)
    info: dict[str, Any] = {"org": identity.org, "accountant": accountant, "dataset": dataset_id}
    if priv.enabled:
        after = ledger.preview(dataset_id, sigma, q, steps, delta, accountant)
        if after > budget:
            info["message"] = (
                f"{identity.org} declines: this round would raise ε from {spent:.3f} to {after:.3f}, "
                f"over its budget of {budget:g}. Raise privacy.budget for this organization to continue."
            )
            metrics.update(epsilon=spent, delta=delta, budget=budget, noise_multiplier=sigma, sample_rate=q)
            return TrainOutcome(wire.BUDGET_EXHAUSTED, info, metrics, None)

    # 3. Train locally with DP-SGD and form the weighted update n_i * delta_i.
    settings = TrainSettings(
        epochs=federation.training.epochs,
        batch_size=federation.training.batch_size,
        lr=federation.training.lr,
        optimizer=federation.training.optimizer,
        device=own.org(identity.org).device or federation.training.device,
        seed=federation.federation.seed + zlib.crc32(task_id.encode()) % 100_000,
    )
    dp = DPSettings(
        enabled=priv.enabled,
        max_grad_norm=priv.max_grad_norm,
        noise_multiplier=sigma,
        delta=delta,
        accountant=accountant,
        grad_sample_mode=priv.grad_sample_mode,
    )
    result = train(model, train_ds, settings, dp, sigma)

    delta_vec = flatten(model_arrays(model)) - flatten(global_arrays)
    if not np.all(np.isfinite(delta_vec)):
        info["message"] = f"{identity.org}: local training diverged (NaN/inf update); lower training.lr"
        return TrainOutcome(wire.ERROR, info, metrics, None)

    # 4. The charge is committed with the protected reply (`release`); ε below is the ledger's after it.
    charge = Charge(result.noise_multiplier, result.sample_rate, int(result.steps), delta, budget, accountant) \
        if priv.enabled else None
    # The mean training loss is computed on private training records without noise: it stays local
    # (stored in the org's ledger with the reply, logged), never released (docs/privacy.md).
    metrics.update(
        epsilon=spent, delta=delta, budget=budget, noise_multiplier=result.noise_multiplier,
        sample_rate=result.sample_rate, steps=float(result.steps), train_seconds=result.seconds,
    )
    return TrainOutcome(wire.OK, info, metrics, delta_vec * float(n), dataset=dataset_id, charge=charge,
                        local={"train_loss": float(result.train_loss)})


def answered_before(identity: ClientIdentity, run_id: str, task_id: str):
    """The stored reply of a task already answered (resend it byte for byte), else None.

    A task answered before whose reply can no longer be resent comes back as a `policy` decline:
    it is never trained and released a second time.
    """

    try:
        return PrivacyLedger(identity.ledger_path, identity.org).stored_reply(run_id, task_id)
    except TaskAlreadyAnswered as exc:
        return StoredReply(wire.POLICY, {"org": identity.org, "message": f"{identity.org} declines: {exc.problem}; "
                                         f"{exc.fix}", "policy": ["retry"]}, {}, {})


def release(identity: ClientIdentity, outcome: TrainOutcome, blobs: dict[str, bytes], run_id: str, task_id: str):
    """Charge the ledger and store the protected reply in one durable transaction; return what to send.

    What this returns is the only thing that may leave: if a concurrent delivery of the same task
    committed first, it is that stored reply, and this one is discarded unreleased.
    """
    import logging


    ledger = PrivacyLedger(identity.ledger_path, identity.org)
    reply = StoredReply(outcome.status, outcome.info, outcome.metrics, blobs, outcome.local)
    try:
        final = ledger.commit_release(outcome.dataset, run_id, task_id, outcome.charge, reply)
    except BudgetExhausted as exc:
        return StoredReply(wire.BUDGET_EXHAUSTED, {**outcome.info, "message": str(exc)},
                           {k: v for k, v in outcome.metrics.items() if k in ("epsilon", "delta", "budget")}, {})
    logging.getLogger(__name__).info("%s: task %s of run %s released; local train loss %.4f (not released)",
                                     identity.org, task_id, run_id, outcome.local.get("train_loss", float("nan")))
    return final


def evaluate_task(identity: ClientIdentity, federation: FedveilConfig, global_arrays: list[np.ndarray]) -> dict[str, float]:
    """Evaluate the final global model on the local validation split."""

    own = local_config(identity)
    if not model_allowed(own.policy, federation.model.name):
        raise PolicyRefused(f"{identity.org} declines to evaluate model {federation.model.name!r}: its policy allows "
                            f"{own.policy.allow_models} (policy.allow_models); it is not imported",
                            "the server must use an allowed model, or the organization adds it to [policy] allow_models")
    _, val_ds = own_datasets(identity, own, federation.model.name)
    model = build_model(federation, val_ds.feature_shape, val_ds.num_classes)
    set_model_arrays(model, global_arrays)
    loss, acc = evaluate(model, val_ds)
    return {"val_loss": loss, "val_accuracy": acc, "num_val": float(len(val_ds.y))}


def client_keyring(identity: ClientIdentity):
    """The proxies' public keys and CKKS public context, from provisioning (never from the server)."""
    if not identity.keys_dir:
        return ClientKeyring()
    return load_client_keyring_dir(identity.keys_dir)


def check_protection_ready(identity: ClientIdentity, federation: FedveilConfig, proxies: list[str]) -> None:
    """Fail before training (and before any ε is spent) if this client could not protect its update."""
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

    mode_name = federation.federation.secure
    binding = Binding(run_id=run_id, task_id=task_id, client_id=client_id, proxy_id="", mode=mode_name,
                      length=int(vector.size))
    mode = get_mode(mode_name, **federation.secure_options())
    return mode.protect(vector, proxies, binding, client_keyring(identity))
