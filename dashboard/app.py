"""fedveil's live dashboard (a Streamlit script).

    python -m streamlit run dashboard/app.py -- --store sqlite:///work/fedveil.db [--password-env VAR]

It reads the metrics store through `MetricsStore`'s public read methods and nothing else: no
client or aggregator code is imported, and nothing is ever written. The store URL comes from
`--store` (or `--workdir`), else from the environment variable FEDVEIL_DASHBOARD_STORE. When the
variable named by `--password-env` (default FEDVEIL_DASHBOARD_PASSWORD) is set, the page asks for
that password first.
"""

from __future__ import annotations

import argparse
import hmac
import os
import sys
import time
from pathlib import Path
from typing import Any

import altair as alt
import streamlit as st

from fedveil.dashboard import views as v
from fedveil.platform.store import MetricsStore, StoreError, store_url

STORE_ENV = "FEDVEIL_DASHBOARD_STORE"
PASSWORD_ENV = "FEDVEIL_DASHBOARD_PASSWORD"
REFRESH_CHOICES = (1, 2, 5, 10, 30, 60)


# ---- configuration -----------------------------------------------------------------------
def _config() -> tuple[str | None, str | None, int]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store")
    parser.add_argument("--workdir")
    parser.add_argument("--password-env")
    parser.add_argument("--refresh", type=int, default=2)
    # Under `streamlit run app.py -- ARGS`, sys.argv is [app.py, *ARGS]; elsewhere (tests) it is
    # somebody else's command line, so unknown arguments are ignored.
    args, _ = parser.parse_known_args(sys.argv[1:])
    url = args.store or (store_url(args.workdir) if args.workdir else None) or os.environ.get(STORE_ENV)
    password = os.environ.get(args.password_env or PASSWORD_ENV) or None
    return url, password, args.refresh if args.refresh in REFRESH_CHOICES else 2


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for display
        return url


def _sqlite_path(url: str) -> Path | None:
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url.removeprefix("sqlite:///").split("?", 1)[0])
    return None


@st.cache_resource(show_spinner=False)
def _favicon() -> Any:
    """A small shield drawn locally: an icon name or emoji would make the browser fetch it from a CDN."""
    from PIL import Image, ImageDraw

    img = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    draw.polygon([(32, 3), (58, 12), (56, 36), (32, 61), (8, 36), (6, 12)], fill=(76, 120, 168, 255))
    draw.rectangle([22, 30, 42, 46], fill=(255, 255, 255, 255))
    draw.arc([24, 18, 40, 38], start=180, end=360, fill=(255, 255, 255, 255), width=4)
    return img


@st.cache_resource(show_spinner=False)
def _open_store(url: str) -> MetricsStore:
    return MetricsStore.open_readonly(url)


# ---- small page helpers --------------------------------------------------------------------
CSS = """
<style>
  .block-container {padding-top: 2.2rem; padding-bottom: 2rem;}
  div[data-testid="stMetric"] {background: rgba(76,120,168,0.06); border: 1px solid rgba(76,120,168,0.18);
      border-radius: 10px; padding: 10px 14px;}
  div[data-testid="stMetricLabel"] p {font-size: 0.85rem; color: #5b6770;}
  div[data-testid="stMetricValue"] {font-size: clamp(1rem, 1.6vw, 1.6rem);}
  h1 {font-size: 1.9rem !important; padding-top: 0 !important;}
</style>
"""

STATUS_COLOR = {"running": "blue", "completed": "green", "failed": "red", "stopped": "orange",
                "interrupted": "gray"}


def _chart(chart: alt.TopLevelMixin) -> None:
    st.altair_chart(chart, width="stretch")


def _empty_state(title: str, body: str) -> None:
    st.title(":material/shield_lock: fedveil", anchor=False)
    st.info(f"**{title}**\n\n{body}", icon=":material/hourglass_empty:")


def _gate(password: str | None) -> None:
    """Stop the script until the right password is entered (constant-time comparison)."""
    if not password or st.session_state.get("_fv_authenticated"):
        return
    st.title(":material/shield_lock: fedveil", anchor=False)
    st.caption("This dashboard is protected. Enter the password you were given.")
    entered = st.text_input("Password", type="password", key="_fv_password")
    if entered:
        if hmac.compare_digest(entered.encode("utf-8"), password.encode("utf-8")):
            st.session_state["_fv_authenticated"] = True
            st.rerun()
        st.error("Wrong password.")
    st.stop()


# ---- pages ---------------------------------------------------------------------------------
def _overview(run: dict[str, Any], runs: list[dict[str, Any]], rounds: list, clients: list, colors: dict) -> None:
    s = v.run_summary(run, rounds, clients)
    unit = "Model versions" if s.is_async else "Rounds"
    c = st.columns([1.2, 0.8, 1.5, 0.9, 1.0, 1.1])  # room for "completed" and "secret-sharing"
    c[0].metric("Status", s.status)
    c[1].metric("Mode", s.mode)
    c[2].metric("Secure mode", s.secure)
    c[3].metric(unit, s.progress_label)
    c[4].metric("Participants (last)", "—" if s.participants_last is None else str(s.participants_last))
    c[5].metric("Elapsed", v.fmt_duration(s.elapsed_seconds))
    priv = v.privacy_frame(clients)
    declined = v.declined_orgs(clients)
    c = st.columns(6)
    c[0].metric("Accuracy", v.fmt_pct(s.accuracy),
                None if s.accuracy_delta is None else f"{100 * s.accuracy_delta:+.1f} pts")
    c[1].metric("Loss", "—" if s.loss is None else f"{s.loss:.4f}",
                None if s.loss_delta is None else f"{s.loss_delta:+.4f}", delta_color="inverse")
    c[2].metric("Organizations", str(s.organizations))
    used = priv["Used"].dropna()
    c[3].metric("Highest budget use", "—" if used.empty else v.fmt_pct(float(used.max())))
    c[4].metric("Declined", str(len(declined)), help="Organizations that declined because their ε budget ran out")
    c[5].metric("Model version", "—" if s.latest_version is None else str(s.latest_version))
    if s.rounds_planned:
        st.progress(min(1.0, s.rounds_done / s.rounds_planned), text=f"{unit.lower()} {s.progress_label}")
    if s.secure == "none":
        st.warning("Secure mode `none`: the plaintext baseline. Updates are not protected; use it for comparisons only.", icon=":material/warning:")
    if run.get("message"):
        (st.error if s.status == "failed" else st.caption)(f"Run message: {run['message']}")
    left, right = st.columns(2)
    with left:
        st.subheader("Global accuracy")
        _chart(v.metric_chart(v.accuracy_frame(v.rounds_frame(run, rounds)), y="accuracy_pct", y_title="Accuracy (%)",
                              color="series", legend_title="Measured on"))
    with right:
        st.subheader("Privacy budget")
        _chart(v.budget_bars(priv, colors))
    with st.expander(f"All runs in this store ({len(runs)})", expanded=len(runs) > 1):
        st.dataframe(v.runs_frame(runs), hide_index=True, width="stretch")


def _convergence(run: dict, runs: list, rounds: list, clients: list, colors: dict, store: MetricsStore) -> None:
    axis = st.radio("Horizontal axis", ["Round", "Wall time"], horizontal=True, key="conv_axis")
    x = "round" if axis == "Round" else "wall_s"
    rf = v.rounds_frame(run, rounds)
    left, right = st.columns(2)
    with left:
        st.subheader("Global accuracy")
        _chart(v.metric_chart(v.accuracy_frame(rf), y="accuracy_pct", y_title="Accuracy (%)", x=x, color="series",
                              legend_title="Measured on"))
    with right:
        st.subheader("Global loss")
        _chart(v.metric_chart(rf, y="loss", y_title="Loss (cross-entropy)", x=x))
    st.subheader("Each organization's validation metrics")
    om = v.org_metrics_frame(clients)
    scale = v.org_scale(colors)
    left, right = st.columns(2)
    with left:
        _chart(v.metric_chart(om, y="accuracy_pct", y_title="Validation accuracy (%)", color="org", scale=scale))
    with right:
        _chart(v.metric_chart(om, y="loss", y_title="Validation loss (cross-entropy)", color="org", scale=scale))

    st.subheader("Compare two runs")
    others = [r for r in runs if r["id"] != run["id"]]
    if not others:
        st.caption("Only one run in this store: start another to compare.")
        return
    by_id = {r["id"]: r for r in others}
    other_id = st.selectbox("Compare with", list(by_id), format_func=lambda i: v.run_label(by_id[i]), key="compare")
    other = by_id[other_id]
    both = {
        v.run_label(run): (run, rounds),
        v.run_label(other): (other, store.rounds(other_id)),
    }
    cf = v.compare_frame(both)
    run_scale = alt.Scale(domain=list(both), range=["#4c78a8", "#f58518"])
    left, right = st.columns(2)
    with left:
        _chart(v.metric_chart(cf, y="accuracy_pct", y_title="Accuracy (%)", x=x, color="run", scale=run_scale,
                              legend_title="Run"))
    with right:
        _chart(v.metric_chart(cf, y="loss", y_title="Loss (cross-entropy)", x=x, color="run", scale=run_scale,
                              legend_title="Run"))
    table = []
    for label, (r, rows) in both.items():
        s = v.run_summary(r, rows, [])
        table.append({"Run": label, "Mode": s.mode, "Secure": s.secure, "Rounds": s.rounds_done,
                      "Final accuracy (%)": None if s.accuracy is None else round(100 * s.accuracy, 2),
                      "Final loss": None if s.loss is None else round(s.loss, 4),
                      "Elapsed": v.fmt_duration(s.elapsed_seconds)})
    st.dataframe(table, hide_index=True, width="stretch")


def _privacy(run: dict, rounds: list, clients: list, colors: dict) -> None:
    priv = v.privacy_frame(clients)
    if priv.empty:
        st.info("No organization has reported privacy accounting for this run yet.", icon=":material/lock:")
        return
    declined = v.declined_orgs(clients)
    used = priv["Used"].dropna()
    near = int(((priv["Used"] >= v.WARN_FRACTION) & (priv["State"] != "declined")).sum())
    left_known = priv["Rounds left"].dropna()
    accountants = sorted({a for a in priv["Accountant"] if a})
    c = st.columns(5)
    c[0].metric("Highest budget use", "—" if used.empty else v.fmt_pct(float(used.max())))
    c[1].metric("Near budget (≥80%)", str(near))
    c[2].metric("Declined", str(len(declined)))
    c[3].metric("Fewest rounds left", "—" if left_known.empty else str(int(left_known.min())))
    c[4].metric("Accountant", ", ".join(accountants) or "—")
    if declined:
        detail = ", ".join(
            f"**{o}** (round {int(r)})" if r == r and r is not None else f"**{o}**"
            for o, r in zip(priv.loc[priv["State"] == "declined", "Organization"],
                            priv.loc[priv["State"] == "declined", "Declined in round"])
        )
        st.warning(f"Declined to train because their ε budget ran out: {detail}", icon=":material/block:")
    left, right = st.columns([3, 2])
    with left:
        st.subheader("ε spent per organization (dashed: its budget)")
        _chart(v.epsilon_chart(v.epsilon_frame(clients), colors))
    with right:
        st.subheader("Budget used")
        _chart(v.budget_bars(priv, colors))
    st.subheader("Ledger")
    st.caption("Rounds left are projected from each organization's average ε per trained round so far.")
    shown = priv.drop(columns=["Last status"]).copy()
    shown["Used"] = shown["Used"].map(lambda u: None if u is None or u != u else 100.0 * u)
    st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        column_config={
            "Used": st.column_config.ProgressColumn("Used (% of budget)", format="%.1f%%", min_value=0, max_value=100),
            "ε": st.column_config.NumberColumn(format="%.3f"),
            "ε per round": st.column_config.NumberColumn(format="%.3f"),
            "δ": st.column_config.NumberColumn(format="%.1e"),
            "σ": st.column_config.NumberColumn(format="%.3f"),
            "q": st.column_config.NumberColumn(format="%.4f"),
        },
    )


def _policies(nodes: list, events: list) -> None:
    """Each organization's own privacy policy and the tasks it declined by it (status `policy`)."""
    pf = v.policy_frame(nodes, events)
    if pf.empty:
        return
    st.subheader("Organization policies")
    st.caption("Each organization enforces its own policy before it trains; a task asking for less is declined "
               "with status `policy` and spends no ε.")
    declining = pf.loc[pf["Policy declines"] > 0, "Organization"].tolist()
    if declining:
        st.warning(f"Declined tasks by their privacy policy: {', '.join(f'**{o}**' for o in declining)}",
                   icon=":material/policy:")
    st.dataframe(pf, hide_index=True, width="stretch")


def _secure(run: dict, rounds: list, events: list) -> None:
    rf = v.rounds_frame(run, rounds)
    rejected = v.rejected_frame(events)
    c = st.columns(5)
    c[0].metric("Secure mode", run.get("secure", ""))
    c[1].metric("Uploaded (total)", v.fmt_bytes(int(rf["bytes_up"].sum()) if not rf.empty else 0))
    c[2].metric("Per round (mean)", v.fmt_bytes(float(rf["bytes_up"].mean()) if not rf.empty else None))
    total_s = (rf["protect_s"] + rf["combine_s"] + rf["finish_s"]).mean() if not rf.empty else None
    c[3].metric("Crypto time / round", "—" if total_s is None else f"{1000 * total_s:.1f} ms")
    c[4].metric("Rejected envelopes", str(len(rejected)))
    mode = run.get("secure", "")
    blurb = {
        "none": "Plaintext baseline: updates are sealed to a proxy but not otherwise protected.",
        "secret-sharing": "Additive secret sharing over 64-bit integers: each proxy sees only random-looking shares.",
        "replicated-sharing": "Replicated secret sharing over 64-bit integers: any 2 proxies finish a round, so one "
                              "may die; one proxy sees only random-looking shares, two together see updates.",
        "ckks": "CKKS homomorphic encryption: proxies add ciphertexts; the server decrypts only the total.",
    }.get(mode)
    if blurb:
        st.caption(blurb)
    left, right = st.columns(2)
    with left:
        st.subheader("Bytes per round")
        _chart(v.bytes_chart(rf))
    with right:
        st.subheader("Protect, combine and decrypt time")
        _chart(v.timing_chart(rf))
    st.subheader("Rejected envelopes")
    if rejected.empty:
        st.success("No envelope was rejected in this run.", icon=":material/check_circle:")
    else:
        st.dataframe(rejected, hide_index=True, width="stretch")


def _system(run: dict, rounds: list, clients: list, events: list, nodes: list, colors: dict) -> None:
    nf = v.nodes_frame(nodes, run_status=run.get("status"))
    drops = v.dropouts(clients, events)
    stale = v.staleness_values(clients, rounds)
    c = st.columns(5)
    c[0].metric("Nodes online", str(int(nf["Online"].sum())) if not nf.empty else "0")
    c[1].metric("Nodes offline", str(int((~nf["Online"].astype(bool)).sum())) if not nf.empty else "0")
    c[2].metric("Dropouts", str(int(drops["Dropouts"].sum())) if not drops.empty else "0")
    c[3].metric("Errors", str(sum(1 for e in events if e.get("kind") == "error" or e.get("level") == "error")))
    c[4].metric("Median staleness", "—" if stale.empty else f"{stale['staleness'].median():g} versions")
    left, right = st.columns(2)
    with left:
        st.subheader("Nodes")
        if nf.empty:
            st.caption("No node has registered for this run.")
        else:
            st.dataframe(nf, hide_index=True, width="stretch",
                         column_config={"Online": st.column_config.CheckboxColumn("Online")})
        st.subheader("Dropouts")
        _chart(v.dropout_chart(drops, colors))
    with right:
        st.subheader("Staleness of updates" + ("" if v.is_async(run) else " (async runs only)"))
        if stale.empty and not v.is_async(run):
            st.caption("Synchronous run: every update is built on the current model.")
            st.subheader("Round duration")
            _chart(v.metric_chart(v.rounds_frame(run, rounds), y="seconds", y_title="Round duration (s)"))
        else:
            _chart(v.staleness_chart(stale, colors))
    st.subheader("Event log")
    ef = v.events_frame(events)
    kinds = sorted(set(ef["Kind"])) if not ef.empty else []
    chosen = st.multiselect("Kinds", kinds, default=kinds, key="event_kinds")
    st.dataframe(ef[ef["Kind"].isin(chosen)] if kinds else ef, hide_index=True, width="stretch")


# ---- the live body -------------------------------------------------------------------------
def _body(url: str) -> None:
    path = _sqlite_path(url)
    if path is not None and not path.exists():
        _empty_state("No metrics yet",
                     f"The store `{path}` does not exist yet. Start a run (for example `fedveil demo`) and "
                     "this page fills in by itself.")
        return
    try:
        store = _open_store(url)
        runs = store.list_runs()
    except StoreError as exc:
        if exc.kind != "no-tables":  # a driver, login, grant or network problem is not "no data yet"
            _open_store.clear()
            st.title(":material/shield_lock: fedveil", anchor=False)
            st.error(f"**error:** {exc.problem}\n\n**fix:** {exc.fix}")
            return
        _empty_state("No metrics yet",
                     "The store has no fedveil tables yet. Start a run and this page fills in by itself.")
        return
    except Exception as exc:  # noqa: BLE001 - an unreadable or uninitialised store is an empty state
        _empty_state("No metrics yet",
                     "The store has no fedveil tables yet. Start a run and this page fills in by itself.")
        with st.expander("Details"):
            st.code(f"{type(exc).__name__}: {exc}")
        return
    if not runs:
        _empty_state("No runs yet",
                     "The metrics store is empty. Start a run (for example `fedveil demo`) and this page "
                     "fills in by itself as rounds complete.")
        return

    by_id = {r["id"]: r for r in runs}
    head, pick = st.columns([3, 2], vertical_alignment="bottom")
    with pick:
        run_id = st.selectbox("Run", list(by_id), format_func=lambda i: v.run_label(by_id[i]), key="run")
    run = by_id.get(run_id) or runs[0]
    with head:
        title = run.get("name") or run["id"]
        st.title(f":material/shield_lock: fedveil · {title}", anchor=False)
        bits = [f":{STATUS_COLOR.get(run['status'], 'gray')}-badge[{run['status']}]",
                f"mode **{run['mode']}**", f"secure **{run['secure']}**"]
        if run.get("dataset"):
            bits.append(f"data **{run['dataset']}**")
        if run.get("model"):
            bits.append(f"model **{run['model']}**")
        st.markdown(" · ".join(bits))

    rounds = store.rounds(run["id"])
    clients = store.client_rounds(run["id"])
    events = store.events(run["id"])
    nodes = store.nodes(run["id"])
    colors = v.org_colors(c["org"] for c in clients)

    tabs = st.tabs([":material/dashboard: Overview", ":material/trending_up: Convergence", ":material/lock: Privacy",
                    ":material/enhanced_encryption: Secure aggregation", ":material/dns: System"])
    with tabs[0]:
        _overview(run, runs, rounds, clients, colors)
    with tabs[1]:
        _convergence(run, runs, rounds, clients, colors, store)
    with tabs[2]:
        _privacy(run, rounds, clients, colors)
        _policies(nodes, events)
    with tabs[3]:
        _secure(run, rounds, events)
    with tabs[4]:
        _system(run, rounds, clients, events, nodes, colors)
    st.caption(f"Updated {time.strftime('%H:%M:%S')} · read-only view of {_safe_url(url)}")


def main() -> None:
    st.set_page_config(page_title="fedveil dashboard", page_icon=_favicon(), layout="wide")
    st.markdown(CSS, unsafe_allow_html=True)
    url, password, refresh = _config()
    _gate(password)
    with st.sidebar:
        st.markdown("### :material/shield_lock: fedveil")
        st.caption("Federated learning with differential privacy and secure aggregation.")
        live = st.toggle("Live refresh", value=True, key="live")
        every = st.select_slider("Refresh every (s)", REFRESH_CHOICES, value=refresh, key="every", disabled=not live)
        st.caption(f"Store: `{_safe_url(url)}`" if url else "No store configured.")
        st.caption("Read-only: this page never writes to the store.")
    if not url:
        _empty_state("No store configured",
                     "Start the dashboard with `fedveil dashboard --workdir DIR` or `--store URL`.")
        return
    st.fragment(run_every=f"{every}s" if live else None)(_body)(url)


if __name__ == "__main__":
    main()
