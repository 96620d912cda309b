"""The federation config: one TOML file, typed and validated, with CLI flags layered on top.

Every validation error names the offending key (as a dotted TOML path) and how to fix it, so a
user never has to read a pydantic traceback to find a typo in their federation file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedveil.platform.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FederationSection(_Section):
    name: str = "demo"
    rounds: int = Field(5, ge=1, description="synchronous rounds (or async model versions)")
    mode: Literal["sync", "semi-sync", "async"] = "sync"
    secure: Literal["none", "secret-sharing", "replicated-sharing", "ckks"] = "secret-sharing"
    min_aggregate: int = Field(2, ge=1, description="smallest number of clients any aggregate may cover")
    min_clients: int = Field(2, ge=1, description="minimum participation for a round to count")
    clients_per_round: int = Field(0, ge=0, description="clients sampled per round; 0 = all")
    round_timeout: float = Field(300.0, gt=0, description="round deadline in seconds (async: per-task timeout)")
    late_replies: Literal["drop", "carry"] = Field(
        "drop", description="semi-sync: replies after the deadline are dropped, or carried into the next round "
        "with a staleness weight (see [async] staleness)")
    num_samples_tolerance: float = Field(
        0.1, ge=0, le=1, description="how far below the sample count an organization declared at hello a reply's "
        "num_samples may fall (fraction of the declared count); above it, or further below, the update is refused")
    seed: int = 0


class DataSection(_Section):
    source: str = "breast_cancer"
    partition: Literal["iid", "dirichlet", "shards"] = "dirichlet"
    alpha: float = Field(0.5, gt=0)
    shards_per_client: int = Field(2, ge=1)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    label_column: str = "label"


BUILTIN_MODELS: tuple[str, ...] = ("mlp", "cnn", "scatternet")  # built by fedveil.platform.models; nothing imported


class ModelSection(_Section):
    name: str = Field("mlp", description="mlp | cnn | scatternet (fixed wavelet features + small CNN: images of 16x16 or more) | 'package.module:factory'")
    hidden: list[int] = Field(default_factory=lambda: [64])
    activation: Literal["relu", "tanh"] = Field("relu", description="hidden activation (mlp, cnn, scatternet); tanh suits DP-SGD")
    groupnorm: bool | None = Field(None, description="cnn: GroupNorm after each conv (default: only below 16x16)")


class TrainingSection(_Section):
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.1, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    device: str = "auto"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ignored by adam)")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty added to every local step")
    lr_schedule: Literal["constant", "cosine", "step"] = Field(
        "constant", description="client lr by round: constant | cosine (lr -> lr_min over the rounds) | "
        "step (x lr_gamma every lr_step_rounds rounds)")
    lr_min: float = Field(0.0, ge=0, description="cosine: the lr of the last round")
    lr_step_rounds: int = Field(1, ge=1, description="step: rounds between decays")
    lr_gamma: float = Field(0.5, gt=0, le=1, description="step: decay factor")


class PrivacySection(_Section):
    enabled: bool = True
    max_grad_norm: float = Field(1.0, gt=0)
    noise_multiplier: float | None = Field(None, ge=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["rdp", "prv"] = "rdp"
    budget: float = Field(20.0, gt=0, description="default per-organization epsilon budget")
    grad_sample_mode: Literal["auto", "hooks", "ghost", "ew", "functorch"] = "auto"

    @model_validator(mode="after")
    def _sigma_or_target(self) -> "PrivacySection":
        if self.enabled and self.noise_multiplier is None and self.target_epsilon is None:
            self.noise_multiplier = 2.0
        return self


class ServerSection(_Section):
    optimizer: Literal["fedavg", "fedadam", "fedyogi"] = "fedavg"
    lr: float = Field(1.0, gt=0, description="server learning rate")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1, description="fedavg: server momentum (FedAvgM); 0 = plain averaging")
    superlink: str = "127.0.0.1:9092"
    store: str = ""
    checkpoint_dir: str = ""


class SecureSection(_Section):
    frac_bits: int = Field(24, ge=1, le=52, description="fixed-point fraction bits (secret-sharing)")
    clip_range: float = Field(1e4, gt=0, description="bound on |n_i * delta_i| per coordinate (secret-sharing)")
    max_clients: int = Field(256, ge=1, description="most clients one aggregate may hold (overflow bound)")
    keys_dir: str = ""


class AsyncSection(_Section):
    """`[async]`: FedBuff-style asynchronous rounds (federation.mode = "async"), and the staleness
    weighting that semi-sync rounds with `federation.late_replies = "carry"` also use (DESIGN §7)."""

    concurrency: int = Field(0, ge=0, description="clients training at once; 0 = every client")
    buffer_size: int = Field(2, ge=1, description="K: updates per aggregate; must be >= federation.min_aggregate")
    staleness: Literal["constant", "polynomial", "hinge"] = Field(
        "polynomial", description="weight of an update s versions old: 1 | (1+s)^-a | 1 if s<=b else 1/(a(s-b)+1)")
    staleness_exponent: float = Field(0.5, ge=0, description="a of the polynomial weight (1+s)^-a")
    hinge_a: float = Field(10.0, ge=0, description="slope a of the hinge weight")
    hinge_b: int = Field(4, ge=0, description="versions b a hinge-weighted update may lag at full weight")
    max_staleness: int = Field(10, ge=0, description="updates more than this many versions old are dropped")
    server_lr: float = Field(1.0, gt=0, description="eta in w <- w + eta * sum a_i n_i d_i / sum a_i n_i")


class EvaluationSection(_Section):
    """`[evaluation]`: the server scores the global model on a public held-out set after rounds."""

    source: str = Field("auto", description='"auto" (the builtin test split when data.source is builtin, else '
                        'none) | "builtin-test" | "none" | a builtin name | a .csv/.parquet/.npz file')
    every: int = Field(1, ge=1, description="evaluate after every N-th round (and always after the last)")
    batch_size: int = Field(2048, ge=1)
    device: str = "auto"

    def resolved(self, data_source: str) -> str:
        """The held-out source to use, or "" when server-side evaluation is off."""
        from fedveil.platform.data import builtin_key

        key = self.source.strip()
        if key.lower() == "none":
            return ""
        if key.lower() == "auto":
            return "builtin-test" if builtin_key(data_source) else ""
        return key


class ProxySection(_Section):
    names: list[str] = Field(default_factory=lambda: ["proxy-1", "proxy-2"])


class OrgSection(_Section):
    name: str
    data: str = ""
    budget: float | None = Field(None, gt=0)
    device: str = ""
    # EXPERIMENT KNOBS (demo / simulation / benchmarks only, never production settings): they make this
    # organization artificially slow or unreliable, applied by its own node around each train task.
    speed_factor: float = Field(1.0, gt=0, le=1, description="EXPERIMENT KNOB: relative compute speed; 0.2 = "
                                "5x slower (the node waits (1/speed_factor - 1) x its training time)")
    latency: float = Field(0.0, ge=0, description="EXPERIMENT KNOB: seconds added before each train reply")
    dropout: float = Field(0.0, ge=0, lt=1, description="EXPERIMENT KNOB: probability that a train task is "
                           "abandoned (no update, no privacy spent; the server sees a dropout)")


class PolicySection(_Section):
    """`[policy]`: what this organization accepts from the server, read from its OWN config only.

    The server may deviate in anything it sends (DESIGN §2), so a client enforces this before it
    trains, before any ε is spent: a task asking for less is declined with status `policy`. The
    server's copy of this section is never used by a client (clients/node.py `local_config`).
    """

    allow_secure: list[Literal["none", "secret-sharing", "replicated-sharing", "ckks"]] = Field(
        default_factory=lambda: ["secret-sharing", "ckks"],
        description="secure modes this organization releases an update under; 'none' sends it in the clear")
    require_dp: bool = Field(True, description="decline tasks that train without DP-SGD")
    max_delta: float = Field(1e-5, gt=0, lt=1, description="largest δ a task may ask for; ε is accounted at the "
                             "task's δ when it is smaller (stricter)")
    min_noise: float | None = Field(0.5, ge=0, description="smallest noise multiplier σ a task may train with")
    max_epsilon: float | None = Field(None, gt=0, description="largest ε one run (one run id) may spend")
    min_aggregate: int = Field(2, ge=1, description="smallest aggregate a task may announce")
    budget: float | None = Field(None, gt=0, description="ε budget over all runs on this data; default: this "
                                 "organization's orgs.budget or privacy.budget")
    allow_models: list[str] = Field(default_factory=lambda: list(BUILTIN_MODELS), description="model kinds, or "
                                    "'package.module:factory' names, this node may build; any other factory named "
                                    "by the server is never imported")


class FedveilConfig(_Section):
    federation: FederationSection = Field(default_factory=FederationSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    training: TrainingSection = Field(default_factory=TrainingSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    server: ServerSection = Field(default_factory=ServerSection)
    secure: SecureSection = Field(default_factory=SecureSection)
    proxies: ProxySection = Field(default_factory=ProxySection)
    async_: AsyncSection = Field(default_factory=AsyncSection, alias="async")
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    orgs: list[OrgSection] = Field(default_factory=list)
    policy: PolicySection = Field(default_factory=PolicySection)

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_by_name=True,
                              validate_by_alias=True, serialize_by_alias=True)

    @model_validator(mode="after")
    def _consistent(self) -> "FedveilConfig":
        names = [o.name for o in self.orgs]
        if len(set(names)) != len(names):
            raise ValueError("orgs: organization names must be unique")
        if len(set(self.proxies.names)) != len(self.proxies.names):
            raise ValueError("proxies.names: proxy names must be unique")
        if self.federation.secure == "secret-sharing" and len(self.proxies.names) < 2:
            raise ValueError("proxies.names: secret-sharing needs at least 2 proxies")
        if self.federation.secure == "replicated-sharing" and len(self.proxies.names) < 4:
            # a release needs a quorum of q = ceil((k+2)/2) proxies (docs/security.md): with k=3 that is all
            # three, so a proxy dead before the commit would lose the round; k=4 (q=3) survives one
            raise ValueError("proxies.names: replicated-sharing needs at least 4 proxies, so that one may die and a "
                             "quorum of 3 still commits to the client set; add proxies, or use secret-sharing with 2")
        if self.federation.secure in ("secret-sharing", "replicated-sharing"):
            from fedveil.secure.fixedpoint import check_overflow

            weight_bits = 16 if self.federation.mode != "sync" else 0
            check_overflow(self.secure.clip_range, self.secure.frac_bits, self.secure.max_clients,
                           weight_bits=weight_bits)
        if self.federation.min_clients < self.federation.min_aggregate:
            raise ValueError(
                f"federation.min_clients ({self.federation.min_clients}) must be >= federation.min_aggregate "
                f"({self.federation.min_aggregate}), or no round could ever be aggregated"
            )
        if self.async_.buffer_size < self.federation.min_aggregate:
            raise ValueError(
                f"async.buffer_size ({self.async_.buffer_size}) must be >= federation.min_aggregate "
                f"({self.federation.min_aggregate}): no aggregate may cover fewer clients; raise async.buffer_size"
            )
        if self.federation.mode == "async" and self.orgs and self.async_.buffer_size > len(self.orgs):
            raise ValueError(
                f"async.buffer_size ({self.async_.buffer_size}) exceeds the {len(self.orgs)} organizations, and a "
                "buffer holds at most one update per client; lower async.buffer_size or add organizations"
            )
        if self.federation.mode == "async" and 0 < self.async_.concurrency < self.async_.buffer_size:
            raise ValueError(
                f"async.concurrency ({self.async_.concurrency}) is below async.buffer_size "
                f"({self.async_.buffer_size}), so a buffer could never fill; raise async.concurrency (0 = all)"
            )
        return self

    def org(self, name: str) -> OrgSection:
        """An organization's own section, or a default one when the file does not list it."""
        for org in self.orgs:
            if org.name == name:
                return org
        return OrgSection(name=name)

    def org_budget(self, name: str) -> float:
        return self.org(name).budget or self.privacy.budget

    def secure_options(self) -> dict[str, Any]:
        """Options every party passes to `fedveil.secure.modes.get_mode` so they agree on the encoding."""
        # Staleness weights are applied by ckks proxies as plaintext scalars: one spare level lets them
        # multiply at full precision (2^-40) instead of a 2^-8 grid at the lowest level (secure/ckks.py).
        # max_clients bounds each client's CKKS values (max_total / max_clients) so no total can wrap.
        return {"frac_bits": self.secure.frac_bits, "clip": self.secure.clip_range,
                "min_aggregate": self.federation.min_aggregate, "spare_levels": 1 if self.staleness_weighted() else 0,
                "max_clients": self.secure.max_clients}

    def staleness_weighted(self) -> bool:
        """Whether aggregates carry staleness weights: async, or semi-sync carrying late replies. A sync
        round carries none, so a proxy whose own config says sync refuses any staleness or weight."""
        return self.federation.mode == "async" or (
            self.federation.mode == "semi-sync" and self.federation.late_replies == "carry")

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "FedveilConfig":
        return cls.model_validate_json(text)


def _format_error(err: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in err.get("loc", ())) or "(file)"
    kind = err.get("type", "")
    msg = err.get("msg", "invalid value")
    if kind == "extra_forbidden":
        return f"{key}: unknown key; remove it or check its spelling (see examples/federation.toml)"
    if kind == "missing":
        return f"{key}: required key is missing; add it"
    given = err.get("input")
    shown = "" if isinstance(given, (dict, list)) else f" (got {given!r})"
    return f"{key}: {msg.removeprefix('Value error, ')}{shown}"


def validate(data: dict[str, Any], source: str = "config") -> FedveilConfig:
    """Validate a parsed config dict, turning pydantic's errors into one readable ConfigError."""
    try:
        return FedveilConfig.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e) for e in exc.errors()]
        raise ConfigError(
            f"{source} is invalid:\n  - " + "\n  - ".join(lines),
            "edit the keys listed above; examples/federation.toml documents every key",
        ) from None


def load(path: str | Path | None) -> FedveilConfig:
    """Read and validate a federation TOML file (None gives the defaults)."""
    if path is None:
        return FedveilConfig()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist", "pass --config with the path to your federation TOML")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}", "fix the syntax at the position shown") from None
    return validate(data, source=str(p))


def with_overrides(cfg: FedveilConfig, overrides: dict[str, Any]) -> FedveilConfig:
    """Apply dotted-key overrides (from CLI flags) and re-validate the whole config."""
    data = json.loads(cfg.model_dump_json())
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate(data, source="config with command-line overrides")
