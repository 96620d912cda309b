"""The wire format between the ServerApp and the node ClientApp, in one place.

Flower carries RecordDicts. Byte payloads (sealed envelopes, ciphertexts) travel as uint8 arrays
inside ArrayRecords, because ArrayRecords are chunked and ConfigRecords are not. Small structured
values travel as one JSON string in a ConfigRecord, which keeps the schema in Python, not protobuf.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

# Message types (category.name, as Flower routes them).
HELLO = "query.hello"
TRAIN = "train"
EVALUATE = "evaluate"
AGGREGATE = "query.aggregate"
VALIDATE = "query.validate"
COMMIT = "query.commit"  # quorum modes: each proxy commits once to the aggregate's client set (secure/quorum.py)
# A proxy refuses an aggregate that names a payload as kept (validated earlier) which it no longer has;
# the server then sends the same request with the bytes.
KEPT_MISSING = "is no longer kept here"

# Statuses a client or proxy reply can carry. `budget_exhausted` is a normal outcome, not an error.
OK = "ok"
BUDGET_EXHAUSTED = "budget_exhausted"
ERROR = "error"
REFUSED = "refused"
DROPPED = "dropped"  # EXPERIMENT KNOB `dropout`: the client abandoned the task (no update, no ε spent)
POLICY = "policy"  # the task asks for less than the organization's own [policy]: declined before training, no ε spent


def blobs_record(blobs: Mapping[str, bytes]) -> ArrayRecord:
    """Pack named byte strings into a chunked ArrayRecord."""
    return ArrayRecord({k: Array(np.frombuffer(v, dtype=np.uint8).copy()) for k, v in blobs.items()})


def record_blobs(record: ArrayRecord) -> dict[str, bytes]:
    return {k: record[k].numpy().tobytes() for k in record.keys()}


def json_record(value: Mapping[str, Any]) -> ConfigRecord:
    return ConfigRecord({"json": json.dumps(value)})


def record_json(record: ConfigRecord | None) -> dict[str, Any]:
    if record is None or "json" not in record:
        return {}
    return json.loads(str(record["json"]))


def safe_record_json(record: Any) -> dict[str, Any]:
    """`record_json` for what a node sent: JSON that does not parse, or is not an object, reads as {}.

    The strict reading, which names what is wrong, is `fedveil.aggregator.replies`; this one only
    guarantees that no garbage reply can raise out of a caller that just wants what is usable.
    """
    if not isinstance(record, ConfigRecord) or not isinstance(record.get("json"), str):
        return {}
    try:
        value = json.loads(record["json"])
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def weights_record(arrays: list[np.ndarray]) -> ArrayRecord:
    return ArrayRecord([np.ascontiguousarray(a) for a in arrays])


def record_weights(record: ArrayRecord) -> list[np.ndarray]:
    return record.to_numpy_ndarrays()


def reply_content(status: str, info: Mapping[str, Any], *, metrics: Mapping[str, float] | None = None,
                  blobs: Mapping[str, bytes] | None = None) -> RecordDict:
    """Every reply has a `status` JSON record; metrics and byte payloads are optional."""
    content = RecordDict({"status": json_record({"status": status, **info})})
    if metrics:
        content["metrics"] = MetricRecord({k: float(v) for k, v in metrics.items()})
    if blobs is not None:
        content["payloads"] = blobs_record(blobs)
    return content


def reply_status(content: RecordDict) -> dict[str, Any]:
    """The status JSON of a reply; {} when it is missing, does not parse or is not an object."""
    return safe_record_json(content.get("status") if isinstance(content, RecordDict) else None)


def reply_metrics(content: RecordDict) -> dict[str, float]:
    """The scalar metrics of a reply; non-numeric values (lists, a record of another kind) are left out."""
    rec = content.get("metrics") if isinstance(content, RecordDict) else None
    if not isinstance(rec, MetricRecord):
        return {}
    return {k: float(v) for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def reply_blobs(content: RecordDict) -> dict[str, bytes]:
    """The byte payloads of a reply; {} when the record is missing, of another kind, or unreadable."""
    rec = content.get("payloads") if isinstance(content, RecordDict) else None
    if not isinstance(rec, ArrayRecord):
        return {}
    try:
        return record_blobs(rec)
    except Exception:  # noqa: BLE001 - an Array whose bytes do not match its shape/dtype raises anything numpy raises
        return {}
