"""Pure functions from metrics-store rows to the frames, figures and charts the dashboard shows.

Nothing in here talks to Streamlit or to the store: each function takes the plain dicts that
`MetricsStore`'s read methods return, so every number on the page can be tested on its own.
The dashboard imports no client or aggregator code (see tests/test_dashboard_views.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import altair as alt
import pandas as pd

# Tableau-10 without its grey, plus indigo, olive and cyan: twelve hues that stay apart.
PALETTE: tuple[str, ...] = (
    "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2", "#ff9da6",
    "#9d755d", "#3b3b98", "#bcbd22", "#17becf",
)
WARN_FRACTION = 0.8  # a budget used beyond this is shown as a warning
STATUS_DECLINED = "budget_exhausted"
ONLINE_STATUSES = frozenset({"online", "connected", "active", "alive", "ready", "busy", "training"})


# ---- colours -------------------------------------------------------------------------------
def _slot(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big") % len(PALETTE)


def org_colors(orgs: Iterable[str]) -> dict[str, str]:
    """A deterministic colour per organization.

    Each name hashes to a preferred palette slot, so an organization keeps its colour from run to
    run and on every chart; names that collide move to the next free slot, in name order, so that
    the organizations on one page never share a colour (up to the palette's size).
    """
    taken: set[int] = set()
    out: dict[str, str] = {}
    for org in sorted(set(orgs)):
        slot = _slot(org)
        if len(taken) < len(PALETTE):
            while slot in taken:
                slot = (slot + 1) % len(PALETTE)
        taken.add(slot)
        out[org] = PALETTE[slot]
    return out


def org_scale(colors: dict[str, str]) -> alt.Scale:
    domain = sorted(colors)
    return alt.Scale(domain=domain, range=[colors[o] for o in domain])


# ---- formatting ----------------------------------------------------------------------------
def fmt_duration(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def fmt_pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def is_async(run: dict[str, Any]) -> bool:
    return str(run.get("mode", "")).lower().startswith("async")


def _loads(text: Any) -> dict[str, Any]:
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text or "{}")
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ---- runs and overview ---------------------------------------------------------------------
def run_label(run: dict[str, Any]) -> str:
    name = run.get("name") or run["id"]
    label = name if name == run["id"] else f"{name} · {run['id']}"
    return f"{label} ({run.get('status', '?')})"


def runs_frame(runs: Sequence[dict[str, Any]], now: float | None = None) -> pd.DataFrame:
    now = time.time() if now is None else now
    rows = []
    for r in runs:
        end = r.get("finished_at") or now
        rows.append(
            {
                "Run": r["id"],
                "Name": r.get("name") or "",
                "Status": r.get("status", ""),
                "Mode": r.get("mode", ""),
                "Secure": r.get("secure", ""),
                "Dataset": r.get("dataset") or "",
                "Model": r.get("model") or "",
                "Started": pd.Timestamp(r["started_at"], unit="s", tz="UTC").strftime("%Y-%m-%d %H:%M:%S UTC"),
                "Elapsed": fmt_duration(end - r["started_at"]),
            }
        )
    return pd.DataFrame(rows, columns=["Run", "Name", "Status", "Mode", "Secure", "Dataset", "Model", "Started", "Elapsed"])


@dataclass(frozen=True)
class RunSummary:
    status: str
    mode: str
    secure: str
    is_async: bool
    rounds_done: int
    rounds_planned: int
    latest_version: int | None
    participants_last: int | None
    organizations: int
    elapsed_seconds: float
    accuracy: float | None
    accuracy_delta: float | None
    loss: float | None
    loss_delta: float | None

    @property
    def progress_label(self) -> str:
        planned = f" / {self.rounds_planned}" if self.rounds_planned else ""
        return f"{self.rounds_done}{planned}"


def run_summary(
    run: dict[str, Any], rounds: Sequence[dict[str, Any]], client_rounds: Sequence[dict[str, Any]], now: float | None = None
) -> RunSummary:
    now = time.time() if now is None else now
    end = run.get("finished_at") or now
    last = rounds[-1] if rounds else None
    prev = rounds[-2] if len(rounds) > 1 else None

    def delta(key: str) -> float | None:
        if last is None or prev is None or last.get(key) is None or prev.get(key) is None:
            return None
        return float(last[key]) - float(prev[key])

    return RunSummary(
        status=str(run.get("status", "")),
        mode=str(run.get("mode", "")),
        secure=str(run.get("secure", "")),
        is_async=is_async(run),
        rounds_done=len(rounds),
        rounds_planned=int(run.get("rounds_planned") or 0),
        latest_version=int(last["model_version"]) if last else None,
        participants_last=int(last["participants"]) if last else None,
        organizations=len({c["org"] for c in client_rounds}),
        elapsed_seconds=float(end - run["started_at"]),
        accuracy=None if last is None or last.get("accuracy") is None else float(last["accuracy"]),
        accuracy_delta=delta("accuracy"),
        loss=None if last is None or last.get("loss") is None else float(last["loss"]),
        loss_delta=delta("loss"),
    )


# ---- convergence ---------------------------------------------------------------------------
def rounds_frame(run: dict[str, Any], rounds: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per round (or async model version), with wall time since the run started."""
    cols = [
        "round", "model_version", "participants", "accuracy", "accuracy_pct", "loss", "wall_s", "seconds",
        "bytes_up", "protect_s", "combine_s", "finish_s", "server_accuracy_pct", "server_loss",
    ]
    rows = []
    for r in rounds:
        acc = r.get("accuracy")
        rows.append(
            {
                "round": int(r["round"]),
                "model_version": int(r["model_version"]),
                "participants": int(r["participants"]),
                "accuracy": acc,
                "accuracy_pct": None if acc is None else 100.0 * float(acc),
                "loss": r.get("loss"),
                "wall_s": float(r["finished_at"]) - float(run["started_at"]),
                "seconds": float(r["seconds"]),
                "bytes_up": int(r.get("bytes_up") or 0),
                "protect_s": float(r.get("protect_seconds") or 0.0),
                "combine_s": float(r.get("combine_seconds") or 0.0),
                "finish_s": float(r.get("finish_seconds") or 0.0),
                "server_accuracy_pct": None if r.get("server_accuracy") is None else 100.0 * float(r["server_accuracy"]),
                "server_loss": r.get("server_loss"),
            }
        )
    return pd.DataFrame(rows, columns=cols)


ACCURACY_SERIES = {
    "server_accuracy_pct": "Held-out test set (server-side)",
    "accuracy_pct": "Clients' validation splits (weighted)",
}


def accuracy_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The two global accuracies, named apart, in long form (`series`) for one chart: the server's score
    on the public held-out set, and the clients' weighted validation accuracy of the same model."""
    parts = [
        frame[["round", "model_version", "wall_s", col]].rename(columns={col: "accuracy_pct"}).assign(series=name)
        for col, name in ACCURACY_SERIES.items()
    ]
    out = pd.concat(parts, ignore_index=True)
    return out.dropna(subset=["accuracy_pct"])


def org_metrics_frame(client_rounds: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Each organization's validation accuracy and loss per round (rows that carry them)."""
    rows = [
        {
            "org": c["org"],
            "round": int(c["round"]),
            "accuracy_pct": None if c.get("accuracy") is None else 100.0 * float(c["accuracy"]),
            "loss": c.get("loss"),
            "status": c["status"],
        }
        for c in client_rounds
        if c.get("accuracy") is not None or c.get("loss") is not None
    ]
    return pd.DataFrame(rows, columns=["org", "round", "accuracy_pct", "loss", "status"])


def compare_frame(named_rounds: dict[str, tuple[dict[str, Any], Sequence[dict[str, Any]]]]) -> pd.DataFrame:
    """Rounds of several runs stacked, for a side-by-side comparison: {label: (run, rounds)}."""
    frames = []
    for label, (run, rows) in named_rounds.items():
        f = rounds_frame(run, rows)
        f.insert(0, "run", label)
        frames.append(f)
    if not frames:
        return pd.DataFrame(columns=["run", *rounds_frame({"started_at": 0}, []).columns])
    return pd.concat(frames, ignore_index=True)


# ---- privacy -------------------------------------------------------------------------------
def epsilon_frame(client_rounds: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """ε spent so far by each organization after each round (rows that report ε)."""
    rows = [
        {
            "org": c["org"],
            "round": int(c["round"]),
            "epsilon": float(c["epsilon"]),
            "budget": None if c.get("budget") is None else float(c["budget"]),
            "status": c["status"],
        }
        for c in client_rounds
        if c.get("epsilon") is not None
    ]
    return pd.DataFrame(rows, columns=["org", "round", "epsilon", "budget", "status"])


def privacy_frame(client_rounds: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per organization: ε against its budget, δ, σ, accountant, and the rounds left.

    Rounds left are projected from the average ε per round so far: (budget − ε) / (ε / rounds
    in which the organization trained). An organization that declined (status
    `budget_exhausted`) has 0 rounds left.
    """
    by_org: dict[str, list[dict[str, Any]]] = {}
    for c in client_rounds:
        by_org.setdefault(c["org"], []).append(c)
    rows = []
    for org in sorted(by_org):
        hist = by_org[org]

        def last(key: str) -> Any:
            for c in reversed(hist):
                if c.get(key) is not None:
                    return c[key]
            return None

        eps = last("epsilon")
        budget = last("budget")
        trained = sum(1 for c in hist if c["status"] == "ok")
        declined_rounds = [int(c["round"]) for c in hist if c["status"] == STATUS_DECLINED]
        declined = bool(declined_rounds)
        used = None if eps is None or not budget else round(float(eps) / float(budget), 9)
        per_round = None if eps is None or trained == 0 else float(eps) / trained
        if declined or (used is not None and used >= 1.0):
            left: float | None = 0
        elif eps is None or budget is None or not per_round:
            left = None
        else:
            left = max(0, math.floor((float(budget) - float(eps)) / per_round + 1e-9))
        if declined:
            state = "declined"
        elif used is not None and used >= WARN_FRACTION:
            state = "warning"
        else:
            state = "ok"
        rows.append(
            {
                "Organization": org,
                "ε": None if eps is None else float(eps),
                "Budget ε": None if budget is None else float(budget),
                "Used": used,
                "δ": last("delta"),
                "σ": last("noise_multiplier"),
                "q": last("sample_rate"),
                "Accountant": last("accountant") or "",
                "Rounds trained": trained,
                "ε per round": per_round,
                "Rounds left": left,
                "Declined in round": declined_rounds[0] if declined_rounds else None,
                "State": state,
                "Last status": hist[-1]["status"],
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "Organization", "ε", "Budget ε", "Used", "δ", "σ", "q", "Accountant", "Rounds trained", "ε per round",
            "Rounds left", "Declined in round", "State", "Last status",
        ],
    )


def declined_orgs(client_rounds: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({c["org"] for c in client_rounds if c["status"] == STATUS_DECLINED})


POLICY_COLUMNS = ["Organization", "Secure modes", "DP required", "δ ≤", "σ ≥", "ε per run ≤", "Aggregate ≥",
                  "Budget", "Models", "Policy declines", "Last decline"]


def policy_frame(nodes: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Each organization's own privacy policy (as its node reported it on joining) and its `policy` declines.

    The policy lives in the organization's config, not the server's: this is what each client
    enforces before it trains, so a server asking for less sees declines here.
    """
    declines: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        if e.get("kind") == "policy":
            declines.setdefault(str(e.get("source", "")), []).append(e)

    def _join(values: Any) -> str:
        return ", ".join(str(x) for x in values) if isinstance(values, (list, tuple)) else ""

    rows = []
    for n in nodes:
        if n.get("role") != "client":
            continue
        pol = _loads(_loads(n.get("info")).get("policy"))
        mine = sorted(declines.get(n["name"], []), key=lambda e: e.get("ts", 0))
        rows.append({
            "Organization": n["name"], "Secure modes": _join(pol.get("allow_secure")),
            "DP required": pol.get("require_dp"), "δ ≤": pol.get("max_delta"), "σ ≥": pol.get("min_noise"),
            "ε per run ≤": pol.get("max_epsilon"), "Aggregate ≥": pol.get("min_aggregate"),
            "Budget": pol.get("budget"), "Models": _join(pol.get("allow_models")), "Policy declines": len(mine),
            "Last decline": mine[-1].get("message", "") if mine else "",
        })
    return pd.DataFrame(rows, columns=POLICY_COLUMNS).drop_duplicates("Organization", keep="last")


# ---- secure aggregation and system ---------------------------------------------------------
def events_frame(events: Sequence[dict[str, Any]], kinds: Iterable[str] | None = None) -> pd.DataFrame:
    wanted = None if kinds is None else set(kinds)
    rows = [
        {
            "Time": pd.Timestamp(e["ts"], unit="s", tz="UTC").strftime("%H:%M:%S"),
            "Round": e.get("round"),
            "Level": e.get("level", ""),
            "Kind": e.get("kind", ""),
            "Source": e.get("source", ""),
            "Message": e.get("message", ""),
        }
        for e in events
        if wanted is None or e.get("kind") in wanted
    ]
    return pd.DataFrame(rows, columns=["Time", "Round", "Level", "Kind", "Source", "Message"])


def rejected_frame(events: Sequence[dict[str, Any]]) -> pd.DataFrame:
    f = events_frame(events, kinds={"rejected"})
    return f.rename(columns={"Message": "Reason"})[["Time", "Round", "Source", "Reason"]]


def nodes_frame(nodes: Sequence[dict[str, Any]], now: float | None = None, run_status: str | None = None) -> pd.DataFrame:
    """The run's nodes. In an `interrupted` run nobody has heard from them since its server died, so
    none is shown online (the store still says what they were when last seen)."""
    now = time.time() if now is None else now
    gone = run_status == "interrupted"
    rows = [
        {
            "Node": n["node_id"],
            "Name": n["name"],
            "Role": n["role"],
            "Status": "unknown (server gone)" if gone else n["status"],
            "Online": not gone and str(n["status"]).lower() in ONLINE_STATUSES,
            "Last seen": f"{fmt_duration(now - float(n['last_seen']))} ago",
        }
        for n in nodes
    ]
    return pd.DataFrame(rows, columns=["Node", "Name", "Role", "Status", "Online", "Last seen"])


def dropouts(client_rounds: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Dropouts per organization: client rounds with status `dropped` plus `dropout` events."""
    counts: dict[str, int] = {}
    for c in client_rounds:
        if c["status"] == "dropped":
            counts[c["org"]] = counts.get(c["org"], 0) + 1
    seen = {(c["org"], c["round"]) for c in client_rounds if c["status"] == "dropped"}
    for e in events:
        if e.get("kind") == "dropout":
            who = e.get("source") or "?"
            if (who, e.get("round")) in seen:
                continue
            counts[who] = counts.get(who, 0) + 1
    return pd.DataFrame(sorted(counts.items()), columns=["Organization", "Dropouts"])


def staleness_values(client_rounds: Sequence[dict[str, Any]], rounds: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Per-update staleness (versions) in an async run, from client rows or else `rounds.extra`."""
    rows = [
        {"org": c["org"], "round": int(c["round"]), "staleness": int(c["staleness"])}
        for c in client_rounds
        if c.get("staleness") is not None
    ]
    if not rows:
        for r in rounds:
            for s in _loads(r.get("extra")).get("staleness", []) or []:
                try:
                    rows.append({"org": "", "round": int(r["round"]), "staleness": int(s)})
                except (TypeError, ValueError):
                    continue
    return pd.DataFrame(rows, columns=["org", "round", "staleness"])


# ---- charts --------------------------------------------------------------------------------
def _empty_chart(message: str) -> alt.Chart:
    return (
        alt.Chart(pd.DataFrame({"m": [message]}))
        .mark_text(size=14, color="#888")
        .encode(text="m:N")
        .properties(height=120)
    )


def metric_chart(frame: pd.DataFrame, *, y: str, y_title: str, x: str = "round", color: str | None = None,
                 scale: alt.Scale | None = None, legend_title: str = "Organization") -> alt.Chart:
    """A line of one metric against rounds ('round') or wall time ('wall_s')."""
    data = frame.dropna(subset=[y])
    if data.empty:
        return _empty_chart("no data yet")
    x_title = {"round": "Round (#)", "wall_s": "Wall time since start (s)", "model_version": "Model version (#)"}.get(x, x)
    x_type = "Q" if x == "wall_s" else "Q"
    enc: dict[str, Any] = {
        "x": alt.X(f"{x}:{x_type}", title=x_title, axis=alt.Axis(tickMinStep=1) if x != "wall_s" else alt.Axis()),
        "y": alt.Y(f"{y}:Q", title=y_title, scale=alt.Scale(zero=False)),
        "tooltip": [c for c in data.columns if c in {x, y, "round", "org", "run", "participants"}],
    }
    if color:
        enc["color"] = alt.Color(f"{color}:N", title=legend_title, scale=scale or alt.Undefined)
    else:
        enc["color"] = alt.value(PALETTE[0])
    return alt.Chart(data).mark_line(point=True, strokeWidth=2.5).encode(**enc).properties(height=280)


def epsilon_chart(eps: pd.DataFrame, colors: dict[str, str]) -> alt.Chart:
    """ε per organization over rounds, each with its budget as a dashed line of the same colour."""
    if eps.empty:
        return _empty_chart("no organization reports ε yet")
    scale = org_scale(colors)
    base = alt.Chart(eps)
    lines = base.mark_line(point=True, strokeWidth=2.5).encode(
        x=alt.X("round:Q", title="Round (#)", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("epsilon:Q", title="Privacy loss ε spent (cumulative)"),
        color=alt.Color("org:N", title="Organization", scale=scale),
        tooltip=["org", "round", alt.Tooltip("epsilon:Q", format=".3f"), "budget", "status"],
    )
    budgets = eps.dropna(subset=["budget"]).groupby("org", as_index=False)["budget"].last()
    rules = alt.Chart(budgets).mark_rule(strokeDash=[6, 4], strokeWidth=2).encode(
        y="budget:Q", color=alt.Color("org:N", scale=scale, legend=None),
        tooltip=["org", alt.Tooltip("budget:Q", title="budget ε")],
    )
    return (lines + rules).properties(height=320)


def budget_bars(priv: pd.DataFrame, colors: dict[str, str]) -> alt.Chart:
    """Horizontal gauges: the share of each organization's budget spent, with 80% and 100% marks."""
    data = priv.dropna(subset=["Used"]).copy()
    if data.empty:
        return _empty_chart("no budgets reported yet")
    data["used_pct"] = 100.0 * data["Used"].astype(float)
    data["shown_pct"] = data["used_pct"].clip(upper=100.0)
    data["label"] = [
        f"{o}  ·  ε {e:.2f} / {b:g}" + ("  · declined" if st == "declined" else "")
        for o, e, b, st in zip(data["Organization"], data["ε"], data["Budget ε"], data["State"])
    ]
    scale = org_scale(colors)
    order = [lbl for _, lbl in sorted(zip(data["Organization"], data["label"]))]
    y = alt.Y("label:N", title=None, sort=order, axis=alt.Axis(labelLimit=360, labelFontSize=12, ticks=False,
                                                               domain=False))
    x_scale = alt.Scale(domain=[0, 100], nice=False)
    track = alt.Chart(data).transform_calculate(full="100").mark_bar(color="#e9ecef", cornerRadius=4).encode(
        y=y, x=alt.X("full:Q", scale=x_scale)
    )
    bars = alt.Chart(data).mark_bar(cornerRadius=4).encode(
        y=y,
        x=alt.X("shown_pct:Q", title="Budget used (% of ε budget)", scale=x_scale),
        color=alt.Color("Organization:N", scale=scale, legend=None),
        opacity=alt.condition(alt.datum.State == "declined", alt.value(0.5), alt.value(1.0)),
        tooltip=["Organization", alt.Tooltip("ε:Q", format=".3f"), "Budget ε",
                 alt.Tooltip("used_pct:Q", format=".1f", title="used %"), "Rounds left", "State"],
    )
    pct = alt.Chart(data).mark_text(align="right", dx=-6, color="white", fontWeight="bold", fontSize=11).encode(
        y=y, x=alt.X("shown_pct:Q", scale=x_scale), text=alt.Text("used_pct:Q", format=".0f"),
    ).transform_filter(alt.datum.used_pct >= 12)
    thresholds = pd.DataFrame({"x": [100 * WARN_FRACTION, 100.0], "what": ["warning (80%)", "budget (100%)"]})
    marks = alt.Chart(thresholds).mark_rule(strokeDash=[4, 3], strokeWidth=2).encode(
        x=alt.X("x:Q", scale=x_scale),
        color=alt.Color("what:N", title="Threshold", scale=alt.Scale(
            domain=["warning (80%)", "budget (100%)"], range=["#f2a900", "#d62728"]),
            legend=alt.Legend(orient="bottom", direction="vertical", title=None)),
    )
    return (
        alt.layer(track, bars, pct, marks)
        .resolve_scale(color="independent")
        .properties(height=alt.Step(34), autosize=alt.AutoSizeParams(type="fit-x", contains="padding"))
    )


def bytes_chart(rf: pd.DataFrame) -> alt.Chart:
    if rf.empty:
        return _empty_chart("no rounds yet")
    data = rf.assign(kib=rf["bytes_up"] / 1024.0)
    return alt.Chart(data).mark_bar(color="#4c78a8", cornerRadiusTopLeft=3, cornerRadiusTopRight=3).encode(
        x=alt.X("round:O", title="Round (#)", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("kib:Q", title="Upload to proxies (KiB)"),
        tooltip=["round", alt.Tooltip("kib:Q", format=",.1f", title="KiB"), "participants"],
    ).properties(height=280)


def timing_chart(rf: pd.DataFrame) -> alt.Chart:
    if rf.empty:
        return _empty_chart("no rounds yet")
    long = rf.melt(id_vars=["round"], value_vars=["protect_s", "combine_s", "finish_s"], var_name="phase", value_name="s")
    long["phase"] = long["phase"].map({"protect_s": "protect (clients)", "combine_s": "combine (proxies)",
                                       "finish_s": "finish / decrypt (server)"})
    long["ms"] = 1000.0 * long["s"]
    return alt.Chart(long).mark_bar().encode(
        x=alt.X("round:O", title="Round (#)", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("ms:Q", title="Time (ms)", stack="zero"),
        color=alt.Color("phase:N", title="Phase", scale=alt.Scale(
            domain=["protect (clients)", "combine (proxies)", "finish / decrypt (server)"],
            range=["#72b7b2", "#b279a2", "#eeca3b"])),
        tooltip=["round", "phase", alt.Tooltip("ms:Q", format=",.1f")],
    ).properties(height=280)


def staleness_chart(st_frame: pd.DataFrame, colors: dict[str, str]) -> alt.Chart:
    if st_frame.empty:
        return _empty_chart("no staleness recorded")
    has_org = bool((st_frame["org"] != "").any())
    enc: dict[str, Any] = {
        "x": alt.X("staleness:O", title="Staleness (model versions behind)"),
        "y": alt.Y("count():Q", title="Updates (#)", stack="zero"),
        "tooltip": ["staleness", "count()"],
    }
    if has_org:
        enc["color"] = alt.Color("org:N", title="Organization", scale=org_scale(colors))
    else:
        enc["color"] = alt.value(PALETTE[0])
    return alt.Chart(st_frame).mark_bar().encode(**enc).properties(height=260)


def dropout_chart(drops: pd.DataFrame, colors: dict[str, str]) -> alt.Chart:
    if drops.empty:
        return _empty_chart("no dropouts")
    known = {o: c for o, c in colors.items()}
    for o in drops["Organization"]:
        known.setdefault(o, "#999999")
    return alt.Chart(drops).mark_bar(cornerRadius=3).encode(
        y=alt.Y("Organization:N", title=None),
        x=alt.X("Dropouts:Q", title="Dropouts (#)", axis=alt.Axis(tickMinStep=1)),
        color=alt.Color("Organization:N", scale=org_scale(known), legend=None),
        tooltip=["Organization", "Dropouts"],
    ).properties(height=alt.Step(30), autosize=alt.AutoSizeParams(type="fit-x", contains="padding"))
