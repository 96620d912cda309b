"""Fuzzing the server's reading of client and proxy replies with mutated real Flower messages.

Each case starts from a well-formed reply (the RecordDict the node ClientApp builds with
`messages.reply_content`) and applies one mutation to a field, its type, its value or its record
kind, plus harmless extras. Every mutation knows whether it makes the reply bad, and which field
the rejection must name. The parsers and the engine's collection step must never raise; a bad reply
must be refused naming that field, and a good one must be accepted. Seeded, so a failure replays.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedveil.aggregator import replies as boundary
from fedveil.aggregator.engine import Federation, Node, reply_ok
from fedveil.platform import config as config_mod
from fedveil.platform import messages as wire
from fedveil.platform.store import MetricsStore

SEED = 20261204
DECLARED = 120
TOLERANCE = 0.1
PROXIES = ["proxy-1", "proxy-2"]
SENT = ["101", "102", "103", "104"]
LENGTH = 6
CPU_LIMIT = 40.0  # CPU seconds for the whole module (wall time depends on the machine's load); ~8 when measured

TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0


@dataclass
class Case:
    content: RecordDict
    bad: list[str] = field(default_factory=list)  # field prefixes a rejection may name
    flower_error: bool = False
    label: str = ""

    def status_ok(self) -> bool:
        rec = self.content.get("status")
        try:
            return json.loads(rec["json"]).get("status") == wire.OK
        except Exception:  # noqa: BLE001 - a mutated status: not ok
            return False


def _request(dst: int = 101, kind: str = wire.TRAIN) -> Message:
    msg = Message(RecordDict(), dst, kind)
    msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return msg


def _reply(case: Case, request: Message) -> Message:
    if case.flower_error:
        return Message(Error(0, "ClientApp exception: boom"), reply_to=request)
    return Message(case.content, reply_to=request)


def _swap(content: RecordDict, name: str, record) -> None:
    """Replace a record by one of another kind (deleting first, so Flower does not warn per case)."""
    if name in content:
        del content[name]
    if record is not None:
        content[name] = record


BAD_NUMBERS: dict[str, list[float]] = {
    "num_samples": [-1000.0, 0.0, 1e12, DECLARED + 1.0, DECLARED * 0.5, 10.5, 1e300],
    "steps": [1e300, -1.0, 2.5, 1e12],
    "val_accuracy": [1.5, -0.1, 1e9],
    "val_loss": [-3.0],
    "epsilon": [-1.0],
    "delta": [1.0, -1e-5],
    "sample_rate": [2.0, -0.5],
    "bytes_up": [-5.0, 1e20],
    "train_seconds": [-1.0, 1e12],
    "noise_multiplier": [-0.1],
}
GARBAGE_STATUS = ["[1, 2]", "{", "", "null", "42", '"ok"', '{"status": 5}', '{"status": "OK!"}', '{"message": "x"}',
                  '{"status": "ok", "message": 7}', '{"status": ["ok"]}', '{"status": "ok", "name": 3}', "\x00\x01",
                  '{"status": "ok"', "[]", "true", '{"status": "%s"}' % ("x" * 40)]


# ---- client train replies ------------------------------------------------------------------
def good_train(rng: random.Random) -> RecordDict:
    metrics = {"num_samples": float(DECLARED), "num_val": 30.0, "val_accuracy": rng.random(), "val_loss": rng.uniform(0, 3),
               "epsilon": rng.uniform(0, 5), "delta": 1e-5, "budget": 10.0, "noise_multiplier": 1.0,
               "sample_rate": 0.25, "steps": 8.0, "train_loss": rng.uniform(0, 2), "train_seconds": 0.5,
               "protect_seconds": 0.01, "bytes_up": 96.0}
    content = wire.reply_content(wire.OK, {"org": "org", "accountant": "rdp"}, metrics=metrics)
    content["payloads"] = ArrayRecord(dict(_payload_arrays()))  # what blobs_record builds, made once (it is slow)
    return content


@functools.cache
def _payload_arrays() -> tuple[tuple[str, Array], ...]:
    record = wire.blobs_record({p: np.arange(LENGTH, dtype=np.float64).tobytes() for p in PROXIES})
    return tuple((k, record[k]) for k in record.keys())


def _metric_value(rng, c: Case) -> None:
    key = rng.choice(sorted(BAD_NUMBERS) + ["custom"])
    value = rng.choice([math.nan, math.inf, -math.inf] + BAD_NUMBERS.get(key, []))
    c.content["metrics"][key] = value
    c.bad.append(f"metrics.{key}")


def _metric_list(rng, c: Case) -> None:
    key = rng.choice(["num_samples", "val_accuracy", "steps", "custom"])
    c.content["metrics"][key] = [1.0, 2.0] if rng.random() < 0.5 else [3, 4]
    c.bad.append(f"metrics.{key}")


def _metrics_kind(rng, c: Case) -> None:
    _swap(c.content, "metrics", rng.choice([ConfigRecord({"num_samples": 5}), ArrayRecord()]))
    c.bad.append("metrics")


def _metrics_gone(rng, c: Case) -> None:
    if rng.random() < 0.5:
        _swap(c.content, "metrics", None)
    else:
        del c.content["metrics"]["num_samples"]
    c.bad.append("metrics.num_samples")  # an ok reply must carry its n_i


def _status_text(rng, c: Case) -> None:
    text = rng.choice(GARBAGE_STATUS) if rng.random() < 0.8 else "".join(chr(rng.randrange(1, 0x3000)) for _ in range(12))
    c.content["status"]["json"] = text
    c.bad.append("status")


def _status_kind(rng, c: Case) -> None:
    choice = rng.randrange(3)
    if choice == 0:
        c.content["status"]["json"] = rng.choice([12, 1.5, True, b"{}", ["ok"]])
    elif choice == 1:
        _swap(c.content, "status", None)
    else:
        _swap(c.content, "status", MetricRecord({"json": 1.0}))
    c.bad.append("status")


def _payload_names(rng, c: Case) -> None:
    rec = c.content["payloads"]
    blobs = wire.record_blobs(rec)
    kind = rng.randrange(3)
    if kind == 0:  # addressed to a proxy the server never assigned
        blobs[rng.choice(["proxy-9", "", "proxy-1 ", "../proxy-1"])] = blobs.pop(rng.choice(PROXIES))
    elif kind == 1:
        blobs.pop(rng.choice(PROXIES))
    else:
        blobs["proxy-3"] = b"\x01" * 48
    _swap(c.content, "payloads", wire.blobs_record(blobs))
    c.bad.append("payloads")


def _payload_array(rng, c: Case) -> None:
    name = rng.choice(PROXIES)
    kind = rng.randrange(4)
    if kind == 0:
        arr = Array(np.zeros(0, dtype=np.uint8))
    elif kind == 1:
        arr = Array(np.ones(12, dtype=np.float32))
    elif kind == 2:
        arr = Array(np.ones((3, 4), dtype=np.uint8))
    else:
        arr = Array(dtype="uint8", shape=(48,), stype="numpy.ndarray", data=bytes(rng.randrange(256) for _ in range(20)))
    c.content["payloads"][name] = arr
    c.bad.append(f"payloads.{name}")


def _payload_kind(rng, c: Case) -> None:
    _swap(c.content, "payloads", rng.choice([None, ConfigRecord({"proxy-1": b"x"}), MetricRecord({"proxy-1": 1.0})]))
    c.bad.append("payloads")


def _n_within_tolerance(rng, c: Case) -> None:
    c.content["metrics"]["num_samples"] = float(DECLARED - rng.randrange(0, int(TOLERANCE * DECLARED) + 1))


def _other_status(rng, c: Case) -> None:
    status = rng.choice([wire.BUDGET_EXHAUSTED, wire.DROPPED, wire.ERROR, "policy"])
    c.content["status"]["json"] = json.dumps({"status": status, "message": f"declined {rng.random()}"})
    if rng.random() < 0.5:
        _swap(c.content, "payloads", None)


def _unchanged(rng, c: Case) -> None:
    pass


def _flower_error(rng, c: Case) -> None:
    c.flower_error = True


TRAIN_MUTATIONS: list[tuple[Callable, int]] = [
    (_metric_value, 6), (_metric_list, 1), (_metrics_kind, 1), (_metrics_gone, 1), (_status_text, 3), (_status_kind, 1),
    (_payload_names, 2), (_payload_array, 2), (_payload_kind, 1), (_n_within_tolerance, 1), (_other_status, 1),
    (_unchanged, 1), (_flower_error, 1),
]


def _extras(rng, c: Case) -> None:
    """Harmless additions a newer client may send: an unknown finite metric, more status keys."""
    if rng.random() < 0.5:
        c.content["metrics"][f"x_{rng.randrange(100)}"] = rng.uniform(-1e6, 1e6)
    if rng.random() < 0.5:
        info = json.loads(c.content["status"]["json"])
        info.update(note="é" * rng.randrange(5), message="m" * rng.randrange(3000))
        c.content["status"]["json"] = json.dumps(info)


def train_case(rng: random.Random) -> Case:
    c = Case(good_train(rng))
    _extras(rng, c)
    mutate = rng.choices([m for m, _ in TRAIN_MUTATIONS], weights=[w for _, w in TRAIN_MUTATIONS])[0]
    mutate(rng, c)
    c.label = mutate.__name__
    return c


# ---- proxy aggregate / validate replies ----------------------------------------------------------
def good_proxy(rng: random.Random, want_partial: bool, sent: list[str]) -> RecordDict:
    included = list(sent)
    rejected = {}
    if len(sent) > 2 and rng.random() < 0.3:  # a valid verdict that rejects some clients
        rejected = {included.pop(): "wrong length"}
    blobs = {"partial": np.ones(LENGTH).tobytes()} if want_partial else None
    return wire.reply_content(wire.OK, {"role": "proxy", "name": "proxy-1", "included": included, "rejected": rejected},
                              metrics={"combine_seconds": rng.random()}, blobs=blobs)


def _set_info(c: Case, **changes) -> None:
    info = json.loads(c.content["status"]["json"])
    info.update(changes)
    c.content["status"]["json"] = json.dumps(info)


def _verdict_strangers(rng, c: Case) -> None:
    info = json.loads(c.content["status"]["json"])
    if rng.random() < 0.5:
        _set_info(c, included=info["included"] + [rng.choice(["999", "", "101 ", "0"])])
        c.bad.append("status.included")
    else:
        _set_info(c, rejected={**info["rejected"], "555": "nope"})
        c.bad.append("status.rejected")


def _verdict_shape(rng, c: Case) -> None:
    key = rng.choice(["included", "rejected"])
    value = rng.choice(["101,102", 7, {"a": 1}, [101, 102], [["101"]], [None], True] if key == "included"
                       else [["101"], "101", 3, {"101": 5}, {"101": None}])
    _set_info(c, **{key: value})
    c.bad.append(f"status.{key}")


def _verdict_overlap(rng, c: Case) -> None:
    info = json.loads(c.content["status"]["json"])
    if rng.random() < 0.5:
        _set_info(c, rejected={info["included"][0]: "also rejected"})
    else:
        _set_info(c, included=info["included"] + info["included"][:1])
    c.bad.append("status.included")


def _too_few(rng, c: Case) -> None:
    _set_info(c, included=json.loads(c.content["status"]["json"])["included"][:1], rejected={})
    c.bad.append("status.included")


def _partial_bad(rng, c: Case) -> None:
    kind = rng.randrange(3)
    if kind == 0:
        _swap(c.content, "payloads", None)
        c.bad.append("payloads")
    elif kind == 1:
        c.content["payloads"]["partial"] = Array(np.zeros(0, dtype=np.uint8))
        c.bad.append("payloads.partial")
    else:
        _swap(c.content, "payloads", wire.blobs_record({"other": b"xx"}))
        c.bad.append("payloads.partial")


def _combine_seconds(rng, c: Case) -> None:
    c.content["metrics"]["combine_seconds"] = rng.choice([math.nan, math.inf, -1.0])
    c.bad.append("metrics.combine_seconds")


def _refused(rng, c: Case) -> None:
    c.content["status"]["json"] = json.dumps({"status": wire.REFUSED, "role": "proxy", "name": "proxy-1",
                                              "message": "only 1 valid client payload(s)"})
    _swap(c.content, "payloads", None)


PROXY_MUTATIONS: list[tuple[Callable, int]] = [
    (_verdict_strangers, 2), (_verdict_shape, 2), (_verdict_overlap, 1), (_too_few, 1), (_partial_bad, 2),
    (_combine_seconds, 1), (_status_text, 2), (_status_kind, 1), (_refused, 1), (_unchanged, 2), (_flower_error, 1),
]


def proxy_case(rng: random.Random, want_partial: bool, sent: list[str] = SENT) -> Case:
    c = Case(good_proxy(rng, want_partial, sent))
    choices = [(m, w) for m, w in PROXY_MUTATIONS if want_partial or m not in (_partial_bad, _too_few)]
    mutate = rng.choices([m for m, _ in choices], weights=[w for _, w in choices])[0]
    mutate(rng, c)
    c.label = mutate.__name__
    return c


# ---- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clock():
    start = time.process_time()
    yield start
    assert time.process_time() - start < CPU_LIMIT, "the fuzz module must stay bounded in time"


def _federation(tmp_path) -> Federation:
    cfg = config_mod.with_overrides(config_mod.FedveilConfig(), {
        "federation.secure": "none", "federation.min_aggregate": 2, "federation.num_samples_tolerance": TOLERANCE,
        "proxies.names": PROXIES})
    store = MetricsStore(f"sqlite:///{tmp_path / 'fuzz.db'}")
    fed = Federation(grid=None, cfg=cfg, store=store, run_id="fuzz", workdir=tmp_path)  # type: ignore[arg-type]
    store.create_run("fuzz", mode="sync", secure="none")
    for i, cid in enumerate(SENT):
        fed.roster.clients[int(cid)] = Node(int(cid), "client", f"org-{cid}", {"role": "client", "num_samples": DECLARED})
    for i, name in enumerate(PROXIES):
        fed.roster.proxies[i + 1] = Node(i + 1, "proxy", name, {"role": "proxy"})
    fed.weights = np.zeros(LENGTH)
    return fed


def _check_parse(case: Case, parse: Callable[[], object], counts: dict[str, int]) -> None:
    """The parser either returns (good reply) or raises BadReply naming one of the bad fields."""
    try:
        parse()
    except boundary.BadReply as bad:
        assert case.bad or case.flower_error, f"{case.label}: a good reply was refused: {bad}"
        if case.bad:
            assert any(bad.field.startswith(f) for f in case.bad), f"{case.label}: named {bad.field}, expected {case.bad}"
        counts["rejected"] += 1
        return
    assert not case.bad and not case.flower_error, f"{case.label}: a bad reply was accepted ({case.bad})"
    counts["accepted"] += 1


# ---- the tests -------------------------------------------------------------------------------
def test_train_reply_parsers_never_raise_and_refuse_every_bad_reply(clock):
    rng = random.Random(SEED)
    counts = {"rejected": 0, "accepted": 0}
    request = _request()
    for _ in range(7000):
        case = train_case(rng)
        reply = _reply(case, request)
        _check_parse(case, lambda: boundary.parse_train_reply(reply, proxies=PROXIES, declared=DECLARED,
                                                               tolerance=TOLERANCE), counts)
        # the lenient readers any other code may use never raise either
        status, info = reply_ok(reply)
        assert isinstance(status, str) and isinstance(info, dict)
        if not reply.has_error():
            assert isinstance(wire.reply_status(reply.content), dict)
            assert all(isinstance(v, float) for v in wire.reply_metrics(reply.content).values())
            assert all(isinstance(v, bytes) for v in wire.reply_blobs(reply.content).values())
    assert counts["rejected"] > 4000 and counts["accepted"] > 500, counts


@pytest.mark.parametrize("want_partial", [True, False], ids=["aggregate", "validate"])
def test_proxy_reply_parser_never_raises_and_refuses_every_bad_reply(clock, want_partial):
    rng = random.Random(SEED + want_partial)
    counts = {"rejected": 0, "accepted": 0}
    for _ in range(1500):
        case = proxy_case(rng, want_partial)
        reply = _reply(case, _request(1, wire.AGGREGATE))
        _check_parse(case, lambda: boundary.parse_proxy_reply(reply, sent=SENT, want_partial=want_partial,
                                                               min_included=2), counts)
    assert counts["rejected"] > 500 and counts["accepted"] > 100, counts


def test_a_rounds_collection_step_keeps_good_updates_and_records_each_bad_one(tmp_path, clock):
    """`_collect_train_replies` on rounds of four mutated replies: only the bad ones are lost, each with an event."""
    fed = _federation(tmp_path)
    rng = random.Random(SEED + 7)
    sampled = [fed.roster.clients[int(cid)] for cid in SENT]
    fed.assignment = {cid: list(PROXIES) for cid in SENT}
    for rnd in range(1, 101):
        cases = {cid: train_case(rng) for cid in SENT}
        answers = {int(cid): _reply(c, _request(int(cid))) for cid, c in cases.items()}
        contributions = fed._collect_train_replies(rnd, sampled, answers)
        rejected_rows = {r["node_id"] for r in fed.store.client_rounds("fuzz") if r["round"] == rnd
                         and r["status"] == "rejected"}
        events = [e for e in fed.store.events("fuzz") if e["round"] == rnd and e["kind"] == "rejected"]
        for cid, c in cases.items():
            if c.bad:
                assert cid not in contributions and cid in rejected_rows, c.label
                (event,) = [e for e in events if e["source"] == f"org-{cid}"]
                assert any(f in event["message"] for f in c.bad), (c.label, event["message"], c.bad)
            else:
                assert cid not in rejected_rows, c.label
                assert (cid in contributions) == (c.status_ok() and not c.flower_error), c.label
                if cid in contributions:
                    assert 0 < contributions[cid]["n"] <= DECLARED
                    assert set(contributions[cid]["payloads"]) == set(PROXIES)


class AnsweringGrid:
    """Answers every pushed proxy request with the next mutated reply (a proxy tier that lies)."""

    def __init__(self, make: Callable[[Message], Message]) -> None:
        self.make = make
        self.answers: list[Message] = []

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.answers.append(self.make(m))
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        out, self.answers = self.answers, []
        return out


def test_aggregate_survives_lying_proxies_and_uses_only_their_valid_partials(tmp_path, clock):
    """`_aggregate` with two proxies answering mutated replies: never raises; a bad partial is never used."""
    fed = _federation(tmp_path)
    rng = random.Random(SEED + 11)
    groups = {"proxy-1": SENT[:2], "proxy-2": SENT[2:]}
    contributions = {cid: {"name": f"org-{cid}", "n": DECLARED, "metrics": {},
                           "payloads": {p: b"\x00" * 8 * LENGTH for p, g in groups.items() if cid in g}} for cid in SENT}
    verdicts: dict[str, Case] = {}

    def answer(request: Message) -> Message:
        name = "proxy-1" if request.metadata.dst_node_id == 1 else "proxy-2"
        case = proxy_case(rng, request.metadata.message_type == wire.AGGREGATE, groups[name])
        verdicts[name] = case
        return _reply(case, request)

    fed.grid = AnsweringGrid(answer)  # type: ignore[assignment]
    for rnd in range(1, 401):
        verdicts.clear()
        total, included, _ = fed._aggregate(rnd, f"fuzz:round-{rnd}", contributions)
        events = [e for e in fed.store.events("fuzz", limit=20) if e["round"] == rnd and e["kind"] == "rejected"]
        usable = {n for n, c in verdicts.items() if not c.bad and not c.flower_error and c.status_ok()}
        assert set(included) <= {cid for n in usable for cid in groups[n]}, (rnd, included, verdicts)
        for name, case in verdicts.items():
            if case.bad and not case.flower_error:
                assert any(e["source"] == name and any(f in e["message"] for f in case.bad) for e in events), \
                    (case.label, case.bad, [e["message"] for e in events])
        if total is not None:
            assert total.shape == (LENGTH,) and np.all(np.isfinite(total))


GOOD_HELLO = {"status": "ok", "role": "client", "name": "hospital-a", "num_samples": 120, "num_val": 30,
              "input_shape": [30], "num_classes": 2, "epsilon": 0.0, "budget": 10.0}


@pytest.mark.parametrize("change, field", [
    ({"num_samples": float("nan")}, "hello.num_samples"), ({"num_samples": -1}, "hello.num_samples"),
    ({"num_samples": [120]}, "hello.num_samples"), ({"input_shape": "30"}, "hello.input_shape"),
    ({"input_shape": []}, "hello.input_shape"), ({"num_classes": 0}, "hello.num_classes"),
    ({"role": "server"}, "hello.role"), ({"name": ""}, "hello.name"), ({"epsilon": float("inf")}, "hello.epsilon"),
])
def test_a_malformed_hello_is_refused_naming_the_field(change, field):
    info = {**GOOD_HELLO, **change}
    content = RecordDict({"status": ConfigRecord({"json": json.dumps(info)})})
    with pytest.raises(boundary.BadReply) as caught:
        boundary.parse_hello(Message(content, reply_to=_request(101, wire.HELLO)))
    assert caught.value.field.startswith(field), caught.value.problem


def test_a_good_hello_is_typed_so_its_sample_count_bounds_later_replies():
    content = RecordDict({"status": ConfigRecord({"json": json.dumps({**GOOD_HELLO, "num_samples": 120.0})})})
    status, info = boundary.parse_hello(Message(content, reply_to=_request(101, wire.HELLO)))
    assert status == wire.OK and info["num_samples"] == 120 and isinstance(info["num_samples"], int)


# ---- the proxy role answering mutated requests: its reply always passes the server's boundary -------
def _proxy_request(rng: random.Random, kind: str, n: int) -> tuple[Message, list[str]]:
    """A validate/aggregate request as the engine builds it (mode none), then one mutation of its task or payloads."""
    from fedveil.secure.modes import Binding, ClientKeyring, get_mode

    mode = get_mode("none")
    task_id = f"fuzz:round-{n}"
    payloads = {}
    for cid in SENT:
        binding = Binding(run_id="fuzz", task_id=task_id, client_id=cid, proxy_id="", mode="none", length=LENGTH)
        payloads[cid] = mode.protect(np.full(LENGTH, rng.uniform(-1, 1)), ["proxy-1"], binding, ClientKeyring())["proxy-1"]
    task: dict = {"run_id": "fuzz", "task_id": task_id, "mode": "none", "length": LENGTH, "min_aggregate": 2,
                  "options": {}}
    what = rng.randrange(9)
    if what == 0:
        task[rng.choice(list(task))] = rng.choice([None, -1, 0, "x", [1], {"a": 1}, 1e300, True])
    elif what == 1:
        del task[rng.choice(list(task))]
    elif what == 2:
        task[rng.choice(["task_ids", "staleness", "weights"])] = rng.choice([{"101": "other"}, {"101": -5}, [1], "x",
                                                                            {"999": 1}])
    elif what == 3:
        payloads[rng.choice(SENT)] = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    elif what == 4:
        payloads[rng.choice(SENT)] = np.full(LENGTH, np.nan).tobytes()
    elif what == 5:
        payloads = {cid: blob for cid, blob in payloads.items() if rng.random() < 0.4}
    content = RecordDict({"task": wire.json_record(task), "payloads": wire.blobs_record(payloads)})
    if what == 6:
        _swap(content, "payloads", rng.choice([None, ConfigRecord({"101": b"x"})]))
    elif what == 7:
        content["task"]["json"] = rng.choice(["[1]", "{", "null", '{"run_id": 3}'])
    request = Message(content, 1, kind)
    request.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return request, sorted(payloads)


def test_the_proxy_role_answers_every_mutated_request_with_a_reply_the_server_can_read(tmp_path, clock):
    """Requests with mutated tasks and payloads through the real node ClientApp in the proxy role: it never
    raises, and its reply is either a well-formed verdict (naming only clients it was sent) or a status."""
    from flwr.app import Context

    from fedveil.platform.nodeapp import app

    rng = random.Random(SEED + 13)
    context = Context(run_id=1, node_id=1, node_config={"role": "proxy", "name": "proxy-1", "workdir": str(tmp_path),
                                                        "min-aggregate": 2}, state=RecordDict(), run_config={})
    statuses: dict[str, int] = {}
    for n in range(1000):
        kind = rng.choice([wire.AGGREGATE, wire.VALIDATE])
        request, sent = _proxy_request(rng, kind, n)
        reply = app(request, context)
        parsed = boundary.parse_proxy_reply(reply, sent=sent, want_partial=kind == wire.AGGREGATE, min_included=2)
        statuses[parsed.status] = statuses.get(parsed.status, 0) + 1
    assert set(statuses) <= {wire.OK, wire.ERROR, wire.REFUSED} and statuses.get(wire.OK, 0) > 50, statuses
