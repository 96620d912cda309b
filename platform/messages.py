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

# Statuses a client or proxy reply can carry. `budget_exhausted` is a normal outcome, not an error.
OK = "ok"
BUDGET_EXHAUSTED = "budget_exhausted"
ERROR = "error"
REFUSED = "refused"
DROPPED = "dropped"  # EXPERIMENT KNOB `dropout`: the client abandoned the task (no update, no ε spent)


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
    return record_json(content.config_records.get("status"))


def reply_metrics(content: RecordDict) -> dict[str, float]:
    rec = content.metric_records.get("metrics")
    return {} if rec is None else {k: float(v) for k, v in rec.items()}


def reply_blobs(content: RecordDict) -> dict[str, bytes]:
    rec = content.array_records.get("payloads")
    return {} if rec is None else record_blobs(rec)
