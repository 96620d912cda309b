"""The one boundary where what a client or proxy sends becomes something the server may use.

A node's reply is input from another party: it may be buggy, or lying. Nothing behind this
module reads a reply's records directly. Every field is checked here for its type, finiteness,
range and length, and against what the server itself sent (the proxies it assigned a client, the
clients it sent a proxy, the sample count the organization declared at hello). A reply that fails
raises `BadReply`, which names the field; the engine then drops that one update with a `rejected`
event and the round goes on. The models are pydantic with `allow_inf_nan=False`, so NaN and inf
are refused as values of every numeric field, not one check at a time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedveil.platform import messages as wire
from fedveil.platform.errors import FedveilError

MAX_INT = 2**31 - 1  # the store's Integer columns
MAX_STEPS = 10**9
MAX_BYTES = 2**40
MAX_BLOB = 2**34  # one payload (an envelope, a ciphertext bundle, a partial): 16 GiB is already absurd
MAX_TEXT = 2000  # a message shown in events is cut here
MAX_NAME = 128


class BadReply(FedveilError):
    """A reply whose `field` is missing, of the wrong type, out of range, or not what the server sent."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}",
                         "the node's software, data or config is faulty, or it is misbehaving; only this update is "
                         "left out. Check the node's logs")


# ---- the models -------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(allow_inf_nan=False, extra="ignore", frozen=True)


Seconds = Field(None, ge=0, le=10**7)


class ReplyMetrics(_Strict):
    """What a client (train, evaluate) or proxy (aggregate) reports in its `metrics` record."""

    num_samples: int | None = Field(None, gt=0, le=MAX_INT)
    num_val: int | None = Field(None, ge=0, le=MAX_INT)
    val_accuracy: float | None = Field(None, ge=0, le=1)
    val_loss: float | None = Field(None, ge=0)
    train_loss: float | None = None
    epsilon: float | None = Field(None, ge=0)
    delta: float | None = Field(None, ge=0, lt=1)
    budget: float | None = Field(None, ge=0)
    noise_multiplier: float | None = Field(None, ge=0)
    sample_rate: float | None = Field(None, ge=0, le=1)
    steps: int | None = Field(None, ge=0, le=MAX_STEPS)
    bytes_up: int | None = Field(None, ge=0, le=MAX_BYTES)
    train_seconds: float | None = Seconds
    protect_seconds: float | None = Seconds
    combine_seconds: float | None = Seconds
    injected_seconds: float | None = Seconds


class StatusInfo(_Strict):
    """The `status` JSON every reply carries. Statuses are short words, so new ones need no change here."""

    model_config = ConfigDict(allow_inf_nan=False, extra="allow", frozen=True)
    status: str = Field(pattern=r"^[a-z_]{1,32}$")
    message: str | None = Field(None, max_length=100_000)
    role: str | None = Field(None, max_length=32)
    name: str | None = Field(None, max_length=MAX_NAME)


class ClientHello(_Strict):
    role: Literal["client"]
    name: str = Field(min_length=1, max_length=MAX_NAME)
    num_samples: int = Field(gt=0, le=MAX_INT)
    num_val: int = Field(0, ge=0, le=MAX_INT)
    input_shape: list[int] = Field(min_length=1, max_length=8)
    num_classes: int = Field(ge=1, le=10**6)
    epsilon: float | None = Field(None, ge=0)
    budget: float | None = Field(None, ge=0)


class ProxyHello(_Strict):
    role: Literal["proxy"]
    name: str = Field(min_length=1, max_length=MAX_NAME)
    modes: list[str] = Field(default_factory=list, max_length=64)
    min_aggregate: int = Field(2, ge=1, le=MAX_INT)


class ProxyVerdict(_Strict):
    """What a proxy says about the clients it was sent: combined (`included`) and refused (`rejected`)."""

    included: list[str] = Field(default_factory=list, max_length=10**6)
    rejected: dict[str, str] = Field(default_factory=dict, max_length=10**6)


# ---- what the engine gets back ----------------------------------------------------------------
@dataclass(frozen=True)
class ClientReply:
    status: str
    info: dict[str, Any]
    metrics: dict[str, float]
    payloads: dict[str, bytes] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return int(self.metrics.get("num_samples", 0))


@dataclass(frozen=True)
class ProxyReply:
    status: str
    info: dict[str, Any]
    included: list[str]
    rejected: dict[str, str]
    partial: bytes | None
    combine_seconds: float


# ---- low-level readers: records of the right kind, or BadReply ---------------------------------
def _loc(prefix: str, err: dict) -> str:
    return ".".join([prefix, *(str(p) for p in err.get("loc", ()))]).rstrip(".")


def _validate(model: type[BaseModel], value: Any, prefix: str) -> BaseModel:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        got = first.get("input")
        shown = repr(got) if isinstance(got, (int, float, str, bool)) or got is None else type(got).__name__
        raise BadReply(_loc(prefix, first), f"{first['msg']} (got {shown[:80]})") from None


def _content(reply: Message) -> RecordDict:
    if not isinstance(reply, Message):
        raise BadReply("message", f"not a Flower Message ({type(reply).__name__})")
    if reply.has_error():
        raise BadReply("error", f"node error: {str(reply.error.reason)[:MAX_TEXT]}")
    if not reply.has_content() or not isinstance(reply.content, RecordDict):
        raise BadReply("content", "the reply has no RecordDict content")
    return reply.content


def _record(content: RecordDict, name: str, kind: type, required: bool) -> Any:
    rec = content.get(name)
    if rec is None:
        if required:
            raise BadReply(name, f"missing (a {kind.__name__} named {name!r} is required)")
        return None
    if not isinstance(rec, kind):
        raise BadReply(name, f"a {type(rec).__name__}, expected a {kind.__name__}")
    return rec


def read_status(content: RecordDict) -> dict[str, Any]:
    """The `status` JSON object, checked: it parses, it is an object, `status` is a short word."""
    rec = _record(content, "status", ConfigRecord, required=True)
    text = rec.get("json")
    if not isinstance(text, str):
        raise BadReply("status.json", f"a {type(text).__name__}, expected a JSON string")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BadReply("status.json", f"does not parse as JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BadReply("status.json", f"a JSON {type(value).__name__}, expected an object")
    _validate(StatusInfo, value, "status")
    if value.get("message") is not None:
        value["message"] = value["message"][:MAX_TEXT]
    return value


def read_metrics(content: RecordDict) -> dict[str, float]:
    """The `metrics` record: every value a finite number, the known ones in range ({} when absent)."""
    rec = _record(content, "metrics", MetricRecord, required=False)
    if rec is None:
        return {}
    out: dict[str, float] = {}
    for key, value in rec.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadReply(f"metrics.{key}", f"a {type(value).__name__}, expected one number")
        if not math.isfinite(float(value)):
            raise BadReply(f"metrics.{key}", f"{value} is not a finite number")
        out[key] = float(value)
    _validate(ReplyMetrics, out, "metrics")
    return out


def read_blobs(content: RecordDict, required: bool) -> dict[str, bytes]:
    """The `payloads` record: named 1-D uint8 arrays, each non-empty and of a sane size."""
    rec = _record(content, "payloads", ArrayRecord, required=required)
    if rec is None:
        return {}
    out: dict[str, bytes] = {}
    for key in rec.keys():
        arr = rec[key]
        if arr.dtype != "uint8" or len(arr.shape) != 1:
            raise BadReply(f"payloads.{key}", f"a {arr.dtype} array of shape {tuple(arr.shape)}, expected 1-D uint8")
        try:
            data = arr.numpy()
        except Exception as exc:  # noqa: BLE001 - numpy raises many kinds on a corrupt .npy body
            raise BadReply(f"payloads.{key}", f"unreadable array ({type(exc).__name__})") from None
        if data.dtype != np.uint8 or data.ndim != 1 or not 0 < data.size <= MAX_BLOB:
            raise BadReply(f"payloads.{key}",
                           f"{data.dtype} array of {data.size} values; expected 1 to {MAX_BLOB} bytes")
        out[key] = data.tobytes()
    return out


# ---- the replies, one parser each ------------------------------------------------------------
def check_num_samples(n: int, declared: int | None, tolerance: float) -> None:
    """A client's n_i weights the server's division: at most what it declared at hello, and not far below.

    A count above the declared size, or a change beyond `federation.num_samples_tolerance` (a
    fraction of the declared size), is refused: a lying n_i would skew every other update's weight.
    """
    if declared is None:
        return
    if n > declared:
        raise BadReply("metrics.num_samples", f"{n} exceeds the {declared} samples declared at hello")
    if declared - n > tolerance * declared:
        raise BadReply("metrics.num_samples", f"{n} differs from the {declared} samples declared at hello by more "
                       f"than federation.num_samples_tolerance={tolerance:g}")


def parse_train_reply(reply: Message, *, proxies: Iterable[str], declared: int | None,
                      tolerance: float) -> ClientReply:
    """A client's train reply. An `ok` one must carry its n_i and one payload for exactly the proxies assigned."""
    content = _content(reply)
    info = read_status(content)
    metrics = read_metrics(content)
    status = info["status"]
    if "num_samples" in metrics:
        check_num_samples(int(metrics["num_samples"]), declared, tolerance)
    if status != wire.OK:
        return ClientReply(status, info, metrics)
    if "num_samples" not in metrics:
        raise BadReply("metrics.num_samples", "missing from an ok reply")
    payloads = read_blobs(content, required=True)
    expected = set(proxies)
    if set(payloads) != expected:
        unknown, missing = sorted(set(payloads) - expected), sorted(expected - set(payloads))
        raise BadReply("payloads", "addressed to proxies the server did not assign: " + str(unknown) if unknown
                       else f"no payload for assigned proxies {missing}")
    return ClientReply(status, info, metrics, payloads)


def parse_eval_reply(reply: Message, *, declared: int | None = None, tolerance: float = 0.0) -> ClientReply:
    """Any client reply read only for its evaluation metrics (status and metrics, no payloads)."""
    content = _content(reply)
    info = read_status(content)
    metrics = read_metrics(content)
    if "num_samples" in metrics:
        check_num_samples(int(metrics["num_samples"]), declared, tolerance)
    return ClientReply(info["status"], info, metrics)


def parse_hello(reply: Message) -> tuple[str, dict[str, Any]]:
    """(status, info) of a hello reply; an ok one is a well-formed client or proxy description."""
    info = read_status(_content(reply))
    if info["status"] == wire.OK:
        model = _validate(ProxyHello if info.get("role") == "proxy" else ClientHello, info, "hello")
        info = {**info, **model.model_dump()}  # typed values: a count sent as 150.0 is kept as 150
    return info["status"], info


def parse_proxy_reply(reply: Message, *, sent: Iterable[str], want_partial: bool, min_included: int = 1) -> ProxyReply:
    """A proxy's validate/aggregate reply: it may only speak of the clients it was sent.

    `included` and `rejected` name only those clients, each once, never both; an `ok` aggregate
    carries a non-empty `partial` over at least `min_included` clients.
    """
    content = _content(reply)
    info = read_status(content)
    metrics = read_metrics(content)
    given = {k: info[k] for k in ("included", "rejected") if info.get(k) is not None}
    verdict = _validate(ProxyVerdict, given, "status")
    sent_ids = set(sent)
    for where, ids in (("status.included", verdict.included), ("status.rejected", list(verdict.rejected))):
        strangers = sorted(set(ids) - sent_ids)
        if strangers:
            raise BadReply(where, f"names client(s) {strangers[:5]} that the server did not send this proxy")
    if len(set(verdict.included)) != len(verdict.included):
        raise BadReply("status.included", "lists a client twice")
    both = sorted(set(verdict.included) & set(verdict.rejected))
    if both:
        raise BadReply("status.included", f"client(s) {both[:5]} are both included and rejected")
    partial = None
    if info["status"] == wire.OK and want_partial:
        blobs = read_blobs(content, required=True)
        if "partial" not in blobs:
            raise BadReply("payloads.partial", "missing from an ok aggregate reply")
        partial = blobs["partial"]
        if len(verdict.included) < min_included:
            raise BadReply("status.included", f"{len(verdict.included)} client(s), fewer than min_aggregate="
                           f"{min_included}")
    rejected = {cid: reason[:MAX_TEXT] for cid, reason in verdict.rejected.items()}
    clean = {**info, "included": list(verdict.included), "rejected": rejected}
    return ProxyReply(info["status"], clean, list(verdict.included), rejected, partial,
                      float(metrics.get("combine_seconds", 0.0)))
