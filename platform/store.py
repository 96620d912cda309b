"""The metrics store: the one place where runs, rounds, per-organization privacy and events live.

The ServerApp is the single writer; the dashboard and `fedveil export` only read. SQLite in WAL
mode is the embedded default (a reader never blocks the writer), and any SQLAlchemy URL works
so that a dashboard on another machine can read from PostgreSQL.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import sqlalchemy as sa
from sqlalchemy import event

from fedveil.platform.errors import FedveilError

metadata = sa.MetaData()

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, default=""),
    sa.Column("mode", sa.String(16), nullable=False),
    sa.Column("secure", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("dataset", sa.String(256), nullable=False, default=""),
    sa.Column("model", sa.String(256), nullable=False, default=""),
    sa.Column("rounds_planned", sa.Integer, nullable=False, default=0),
    sa.Column("config", sa.Text, nullable=False, default="{}"),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float),
    sa.Column("message", sa.Text, nullable=False, default=""),
)

rounds = sa.Table(
    "rounds",
    metadata,
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.id"), primary_key=True),
    sa.Column("round", sa.Integer, primary_key=True),
    sa.Column("model_version", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("finished_at", sa.Float, nullable=False),
    sa.Column("seconds", sa.Float, nullable=False),
    sa.Column("participants", sa.Integer, nullable=False),
    sa.Column("accuracy", sa.Float),
    sa.Column("loss", sa.Float),
    sa.Column("bytes_up", sa.Integer, nullable=False, default=0),
    sa.Column("protect_seconds", sa.Float, nullable=False, default=0.0),
    sa.Column("combine_seconds", sa.Float, nullable=False, default=0.0),
    sa.Column("finish_seconds", sa.Float, nullable=False, default=0.0),
    sa.Column("buffer_fill_seconds", sa.Float),
    sa.Column("server_accuracy", sa.Float),  # the server's score on the public held-out set ([evaluation])
    sa.Column("server_loss", sa.Float),
    sa.Column("extra", sa.Text, nullable=False, default="{}"),
)

client_rounds = sa.Table(
    "client_rounds",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), sa.ForeignKey("runs.id"), nullable=False, index=True),
    sa.Column("round", sa.Integer, nullable=False),
    sa.Column("org", sa.String(128), nullable=False),
    sa.Column("node_id", sa.String(32), nullable=False, default=""),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("num_samples", sa.Integer, nullable=False, default=0),
    sa.Column("accuracy", sa.Float),
    sa.Column("loss", sa.Float),
    sa.Column("epsilon", sa.Float),
    sa.Column("delta", sa.Float),
    sa.Column("budget", sa.Float),
    sa.Column("noise_multiplier", sa.Float),
    sa.Column("sample_rate", sa.Float),
    sa.Column("steps", sa.Integer),
    sa.Column("accountant", sa.String(16)),
    sa.Column("train_seconds", sa.Float),
    sa.Column("staleness", sa.Integer),
    sa.Column("bytes_up", sa.Integer, nullable=False, default=0),
    sa.Column("ts", sa.Float, nullable=False),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64), nullable=False, index=True),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("round", sa.Integer),
    sa.Column("level", sa.String(8), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("source", sa.String(128), nullable=False, default=""),
    sa.Column("message", sa.Text, nullable=False),
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("node_id", sa.String(32), primary_key=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
    sa.Column("info", sa.Text, nullable=False, default="{}"),
)

heartbeats = sa.Table(
    "run_heartbeats",  # a table of its own, so stores written before it gain it by create_all
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("beat_at", sa.Float, nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("host", sa.String(256), nullable=False),
)

RUN_STATUSES = ("running", "completed", "failed", "stopped", "interrupted")
HEARTBEAT_SECONDS = 5.0  # how often a running server says it is alive
STALE_AFTER = 60.0  # a `running` run whose last heartbeat is older than this has lost its server


def _server_gone(beat: dict[str, Any] | None, last: float, now: float, stale_after: float) -> bool:
    """Whether a `running` run's server is gone: its process on this host has exited, or (on another
    host, or with no heartbeat at all) it has not been heard of for `stale_after` seconds."""
    if beat is not None and beat["host"] == socket.gethostname():
        return not _process_alive(int(beat["pid"]))
    return now - last > stale_after


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists, owned by someone else
    return True


def store_url(workdir: str | Path) -> str:
    """The default store of a work dir: `DIR/fedveil.db`."""
    return f"sqlite:///{Path(workdir).resolve() / 'fedveil.db'}"


STORE_URL_ENV = "FEDVEIL_STORE_URL"  # where a store URL with a password belongs: never on a command line


def safe_url(url: str) -> str:
    """The URL with its password masked, for messages and logs."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL at all: show nothing secret-looking
        return url.split("@")[-1]


class StoreError(FedveilError):
    """The store cannot be used: `kind` is driver, url, access, login, unreachable or no-tables."""

    def __init__(self, kind: str, problem: str, fix: str) -> None:
        super().__init__(problem, fix)
        self.kind = kind


def explain_store_error(exc: BaseException, url: str) -> StoreError | None:
    """A driver, connection or permission failure as `error:`/`fix:`; None for anything else.

    The dashboard and `fedveil export` used to show these as "no tables yet" or an internal
    error, which sent users after the wrong problem.
    """
    shown = safe_url(url)
    text = str(getattr(exc, "orig", None) or exc)
    low = text.lower()
    if isinstance(exc, (ModuleNotFoundError, sa.exc.NoSuchModuleError)):
        if "psycopg" in low or "postgres" in low or url.startswith("postgres"):
            return StoreError("driver", f"the PostgreSQL driver for {shown} is not installed ({text})",
                                'pip install "fedveil[postgres]" (it installs psycopg)')
        return StoreError("driver", f"no database driver for {shown} ({text})", "install the driver SQLAlchemy names above")
    if isinstance(exc, sa.exc.ArgumentError):
        return StoreError("url", f"{shown} is not a database URL ({text})",
                            "use sqlite:///PATH/fedveil.db or postgresql://USER@HOST:5432/DB")
    if not isinstance(exc, sa.exc.DBAPIError):
        return None
    if "permission denied" in low or "insufficientprivilege" in low or "readonly database" in low:
        return StoreError("access", f"the store {shown} refused access: {text.strip().splitlines()[0]}",
                            "grant this role access to fedveil's tables, e.g. GRANT SELECT ON ALL TABLES IN SCHEMA "
                            "public TO <role> (the writer needs INSERT/UPDATE/DELETE/CREATE too)")
    if "password authentication failed" in low or "no password supplied" in low:
        return StoreError("login", f"the store {shown} rejected the login: {text.strip().splitlines()[0]}",
                            f"put the password in PGPASSWORD or ~/.pgpass, or the full URL in {STORE_URL_ENV} "
                            "(never on the command line)")
    if "no such table" in low or "undefinedtable" in low or ("relation" in low and "does not exist" in low):
        return StoreError("no-tables", f"the store {shown} has no fedveil tables yet",
                          "start a run that writes to it (fedveil demo / fedveil server with this store)")
    if isinstance(exc, sa.exc.OperationalError):
        first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        return StoreError("unreachable", f"cannot reach the store {shown}: {first}",
                            "check that the database server runs and the host, port and database name in the URL")
    return None


def _connect_args(url: str) -> dict[str, Any]:
    """PostgreSQL waits forever for a host that drops packets by default; fail within 10 s instead."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        return {"connect_timeout": 10}
    return {}


def url_from_env(default: str | None = None) -> str | None:
    """The store URL from FEDVEIL_STORE_URL (where a password may live), else `default`."""
    return os.environ.get(STORE_URL_ENV) or default


@contextlib.contextmanager
def explained(url: str) -> Iterator[None]:
    """Turn driver, connection and permission failures into a StoreError (error:/fix:)."""
    try:
        yield
    except FedveilError:
        raise
    except Exception as exc:
        err = explain_store_error(exc, url)
        if err is None:
            raise
        raise err from exc


def _enable_sqlite_wal(engine: sa.Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        cur = dbapi_connection.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.close()


def _add_missing_columns(engine: sa.Engine) -> None:
    """Stores written by an older release lack newer nullable columns: add them (create_all does not)."""
    inspector = sa.inspect(engine)
    with engine.begin() as conn:
        for table in metadata.sorted_tables:
            if not inspector.has_table(table.name):
                continue
            have = {c["name"] for c in inspector.get_columns(table.name)}
            for col in table.columns:
                if col.name not in have and col.nullable and not col.primary_key:
                    kind = col.type.compile(dialect=engine.dialect)
                    conn.execute(sa.text(f'ALTER TABLE {table.name} ADD COLUMN "{col.name}" {kind}'))


def _run_settings(run: dict[str, Any]) -> dict[str, Any]:
    """What the export says about a run's privacy and evaluation, from its stored config."""
    try:
        cfg = json.loads(run.get("config") or "{}")
    except ValueError:
        cfg = {}
    private = bool(cfg.get("privacy", {}).get("enabled", True))
    source = str(cfg.get("evaluation", {}).get("source", "none")).strip()
    if source.lower() == "auto":
        from fedveil.platform.data import builtin_key

        source = "builtin-test" if builtin_key(run.get("dataset") or "") else "none"
    return {"private": private, "evaluation_source": None if source.lower() == "none" else source}


def _rows(result: Iterable[Any]) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in result]


class MetricsStore:
    """Typed access to the metrics tables. Writers call `record_*`; readers call the query methods."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        self.url = url
        if url.startswith("sqlite:///") and create:
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        with explained(url):
            self.engine = sa.create_engine(url, future=True, connect_args=_connect_args(url))
            if self.engine.dialect.name == "sqlite":
                _enable_sqlite_wal(self.engine)
            if create:
                metadata.create_all(self.engine)
            _add_missing_columns(self.engine)

    @classmethod
    def open_readonly(cls, url: str) -> "MetricsStore":
        """Open an existing store without creating tables (the dashboard's and export's view)."""
        return cls(url, create=False)

    def close(self) -> None:
        self.engine.dispose()

    # ---- writes (the ServerApp) -------------------------------------------------------
    def create_run(
        self,
        run_id: str,
        *,
        mode: str,
        secure: str,
        name: str = "",
        dataset: str = "",
        model: str = "",
        rounds_planned: int = 0,
        config: dict[str, Any] | None = None,
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(runs).where(runs.c.id == run_id))
            conn.execute(
                runs.insert().values(
                    id=run_id, name=name, mode=mode, secure=secure, status="running", dataset=dataset,
                    model=model, rounds_planned=rounds_planned, config=json.dumps(config or {}),
                    started_at=time.time(), message="",
                )
            )

    def resume_run(self, run_id: str) -> str | None:
        """Mark an existing run `running` again (`--resume`: the same run id continues); its previous
        status, or None when there is no such run. Its heartbeat restarts with this process."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(runs.c.status).where(runs.c.id == run_id)).first()
            if row is None:
                return None
            conn.execute(runs.update().where(runs.c.id == run_id).values(status="running", finished_at=None, message=""))
        self.heartbeat(run_id)
        return str(row[0])

    def heartbeat(self, run_id: str) -> None:
        """Say that this process still runs `run_id` (the engine calls it every HEARTBEAT_SECONDS)."""
        with self.engine.begin() as conn:
            conn.execute(sa.delete(heartbeats).where(heartbeats.c.run_id == run_id))
            conn.execute(heartbeats.insert().values(run_id=run_id, beat_at=time.time(), pid=os.getpid(),
                                                    host=socket.gethostname()))

    def mark_interrupted(self, *, exclude: str | None = None, stale_after: float = STALE_AFTER,
                         now: float | None = None) -> list[dict[str, Any]]:
        """Close every `running` run whose server is gone as `interrupted`; returns the runs closed.

        A server is gone when its heartbeat is older than `stale_after` seconds, when its process
        on this host no longer exists, or when it never beat and started longer ago than that (a
        store written before heartbeats). Called by a server at start, so a killed run does not
        stay `running` forever; `exclude` is the run that server is about to (re)start. Each run
        closed gets an `interrupted` event.
        """
        now = time.time() if now is None else now
        closed = []
        for run in self._select(sa.select(runs).where(runs.c.status == "running")):
            if run["id"] == exclude:
                continue
            beat = self._heartbeat(run["id"])
            last = beat["beat_at"] if beat else run["started_at"]
            if _server_gone(beat, last, now, stale_after):
                message = (f"the server stopped without finishing the run (last sign of life "
                           f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(last))}); resume it with "
                           "`fedveil server --resume`")
                with self.engine.begin() as conn:
                    conn.execute(runs.update().where(runs.c.id == run["id"], runs.c.status == "running")
                                 .values(status="interrupted", finished_at=last, message=message))
                self.record_event(run["id"], "interrupted", message, level="warn")
                closed.append({**run, "status": "interrupted", "finished_at": last, "message": message})
        return closed

    def _heartbeat(self, run_id: str) -> dict[str, Any] | None:
        try:
            found = self._select(sa.select(heartbeats).where(heartbeats.c.run_id == run_id))
        except sa.exc.DBAPIError:  # a read-only view of a store written before heartbeats
            return None
        return found[0] if found else None

    def _effective(self, run: dict[str, Any], now: float | None = None) -> dict[str, Any]:
        """A reader's view of a run: `running` with a stale heartbeat reads as `interrupted`,
        even before a new server start closes it in the store."""
        if run["status"] != "running":
            return run
        beat = self._heartbeat(run["id"])
        if beat is None or not _server_gone(beat, beat["beat_at"], time.time() if now is None else now, STALE_AFTER):
            return run
        return {**run, "status": "interrupted", "finished_at": beat["beat_at"],
                "message": run["message"] or "the server stopped without finishing the run (no heartbeat)"}

    def latest_unfinished_run(self, name: str) -> str | None:
        """The newest run of federation `name` that did not complete: what `--resume` continues."""
        found = self._select(sa.select(runs.c.id).where(runs.c.name == name, runs.c.status != "completed")
                             .order_by(runs.c.started_at.desc()).limit(1))
        return str(found[0]["id"]) if found else None

    def finish_run(self, run_id: str, status: str, message: str = "") -> None:
        self._end_run(runs.c.id == run_id, status, message)

    def close_if_running(self, run_id: str, status: str, message: str = "") -> bool:
        """End a run that the store still has as `running` (its raw row, not the reader's view: a
        server stopped a moment ago already reads as `interrupted`). Returns whether it was closed."""
        return self._end_run(sa.and_(runs.c.id == run_id, runs.c.status == "running"), status, message)

    def _end_run(self, where: Any, status: str, message: str) -> bool:
        if status not in RUN_STATUSES:
            raise ValueError(f"unknown run status {status!r}")
        with self.engine.begin() as conn:
            done = conn.execute(runs.update().where(where).values(status=status, finished_at=time.time(),
                                                                  message=message))
        return bool(done.rowcount)

    def record_round(self, run_id: str, round: int, **values: Any) -> None:
        """Insert or replace one round's (or async model version's) metrics."""
        extra = values.pop("extra", None)
        row = {"run_id": run_id, "round": round, "model_version": values.pop("model_version", round), **values}
        row["extra"] = json.dumps(extra or {})
        with self.engine.begin() as conn:
            conn.execute(sa.delete(rounds).where(rounds.c.run_id == run_id, rounds.c.round == round))
            conn.execute(rounds.insert().values(**row))

    def set_round_evaluation(self, run_id: str, round: int, accuracy: float | None, loss: float | None) -> None:
        """Fill in a round's global accuracy once clients have evaluated the model it produced."""
        with self.engine.begin() as conn:
            conn.execute(
                rounds.update().where(rounds.c.run_id == run_id, rounds.c.round == round).values(accuracy=accuracy, loss=loss)
            )

    def record_client_round(self, run_id: str, round: int, org: str, status: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                client_rounds.insert().values(run_id=run_id, round=round, org=org, status=status, ts=time.time(), **values)
            )

    def record_event(
        self, run_id: str, kind: str, message: str, *, level: str = "info", source: str = "", round: int | None = None
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                events.insert().values(
                    run_id=run_id, ts=time.time(), round=round, level=level, kind=kind, source=source, message=message
                )
            )

    def upsert_node(self, run_id: str, node_id: str, *, role: str, name: str, status: str, info: dict | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(nodes).where(nodes.c.run_id == run_id, nodes.c.node_id == node_id))
            conn.execute(
                nodes.insert().values(
                    run_id=run_id, node_id=node_id, role=role, name=name, status=status, last_seen=time.time(),
                    info=json.dumps(info or {}),
                )
            )

    # ---- reads (dashboard, export) ------------------------------------------------------
    def _select(self, query: Any) -> list[dict[str, Any]]:
        with explained(self.url), self.engine.connect() as conn:
            return _rows(conn.execute(query))

    def list_runs(self) -> list[dict[str, Any]]:
        """All runs, newest first (a run whose server is gone reads as `interrupted`)."""
        return [self._effective(r) for r in self._select(sa.select(runs).order_by(runs.c.started_at.desc()))]

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        found = self._select(sa.select(runs).where(runs.c.id == run_id))
        return self._effective(found[0]) if found else None

    def rounds(self, run_id: str) -> list[dict[str, Any]]:
        return self._select(sa.select(rounds).where(rounds.c.run_id == run_id).order_by(rounds.c.round))

    def client_rounds(self, run_id: str) -> list[dict[str, Any]]:
        return self._select(
            sa.select(client_rounds).where(client_rounds.c.run_id == run_id).order_by(client_rounds.c.round, client_rounds.c.id)
        )

    def events(self, run_id: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        query = sa.select(events).order_by(events.c.id.desc()).limit(limit)
        if run_id is not None:
            query = query.where(events.c.run_id == run_id)
        return self._select(query)

    def nodes(self, run_id: str) -> list[dict[str, Any]]:
        return self._select(sa.select(nodes).where(nodes.c.run_id == run_id).order_by(nodes.c.role, nodes.c.name))

    def latest_client_status(self, run_id: str) -> list[dict[str, Any]]:
        """Each organization's most recent row in a run: its current ε, budget and status."""
        latest: dict[str, dict[str, Any]] = {}
        for row in self.client_rounds(run_id):
            latest[row["org"]] = row
        return [latest[org] for org in sorted(latest)]

    def export(self) -> dict[str, Any]:
        """The stable JSON document behind `fedveil export` (see docs/export.md)."""
        out = []
        for run in reversed(self.list_runs()):
            client_rows = self.client_rounds(run["id"])
            staleness: dict[int, list[int]] = {}
            for c in client_rows:
                if c["status"] == "ok" and c["staleness"] is not None:
                    staleness.setdefault(int(c["round"]), []).append(int(c["staleness"]))
            round_rows = self.rounds(run["id"])
            out.append(
                {
                    "id": run["id"],
                    "name": run["name"],
                    "mode": run["mode"],
                    "secure": run["secure"],
                    "status": run["status"],
                    "dataset": run["dataset"],
                    "model": run["model"],
                    "started_at": run["started_at"],
                    "finished_at": run["finished_at"],
                    "model_version": max((r["model_version"] for r in round_rows if r["participants"] > 0), default=0),
                    "updates": sum(1 for c in client_rows if c["status"] == "ok"),
                    **_run_settings(run),
                    "epsilon_as_of": "each organization's last reply in this run (clients[].epsilon_as_of_round); "
                                     "its own ledger is authoritative: `fedveil client ledger`",
                    "rounds": [
                        {
                            "round": r["round"],
                            "model_version": r["model_version"],
                            "accuracy": r["accuracy"],
                            "loss": r["loss"],
                            "participants": r["participants"],
                            "seconds": r["seconds"],
                            "bytes_up": r["bytes_up"],
                            "buffer_fill_seconds": r["buffer_fill_seconds"],
                            "staleness": sorted(staleness.get(int(r["round"]), [])),
                            "server_accuracy": r["server_accuracy"],
                            "server_loss": r["server_loss"],
                        }
                        for r in round_rows
                    ],
                    "clients": [
                        {
                            "org": c["org"],
                            "epsilon": c["epsilon"],
                            "delta": c["delta"],
                            "budget": c["budget"],
                            "status": c["status"],
                            "rounds": sum(1 for x in client_rows if x["org"] == c["org"] and x["status"] == "ok"),
                            "epsilon_as_of_round": c["round"],
                        }
                        for c in self.latest_client_status(run["id"])
                    ],
                }
            )
        return {"runs": out}
