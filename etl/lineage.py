"""Lineage per release: every step records what it read and wrote, in PostgreSQL and as OpenLineage events.

Use from any stage (CLI or Airflow task alike)::

    from etl import lineage

    with lineage.step(engine, release="20251031", step="load_metadata",
                      inputs=["metadata/Consensus-WMB-AIBS-10X/20251031/cell_metadata.csv"],
                      input_tables=["abc.cluster"]) as s:
        n = load_cells(...)
        s.wrote("abc.cell", partition="20251031", rows=n)

One ``abc.lineage_run`` per state of the work, however often a task is retried or cleared. Entering
computes the step's state (release, step, target, selection, inputs with their MD5s, tables read,
code version: :func:`run_state`). When a succeeded run already has that state, the execution is that
state again: nothing is recorded nor emitted, a log line names the run that describes it, and only a
failure is recorded (as a failed run, with its START and FAIL events). Otherwise entering records a run
(who ran it: Airflow dag_id/run_id/task_id or the command line, code version, start) with its inputs
and emits an OpenLineage START event; leaving records the outputs with their row counts and emits
COMPLETE, or, when the block raises, records the error and emits FAIL before the exception goes on.
The database refuses a second succeeded run of one state (a unique index, etl/sql/012_lineage_state.sql):
an execution that finishes a state another one finished meanwhile is dropped and emits ABORT.

A run's outputs are what readers read (``published_at``) at its end for a step writing in place, and,
for a ``staged`` step (its outputs go to the release's stage in ``abc_staging``), once that stage is
published (:func:`publish_stage_runs`): a run whose stage is dropped is never the source of published
data. ``inputs`` are bucket keys (source objects), as listed in the release's manifest;
``input_tables`` warehouse tables the step read. The database is the record an auditor queries
(``abc.lineage_sources(relation, release)``, see docs/lineage.md); :mod:`etl.lineage_report` reads it.

Events (built by :mod:`etl.lineage_events`, imported only when a step builds one): outside Airflow
(the CLI) a step emits its own START and COMPLETE/FAIL/ABORT with the plain OpenLineage client,
wherever it is configured (``OPENLINEAGE_URL``, ``OPENLINEAGE__TRANSPORT__*``, ``openlineage.yml``;
the console when nothing is), and an emitter that fails only logs a warning: lineage never fails the
work it describes. Inside an Airflow task, the task's own events are the step's: the task runs its
steps in :func:`reported_by_task` (``@lineage_task``, plugins/abc_lineage.py), so they emit nothing
and hand their datasets and facets to the task, and Airflow's OpenLineage provider sends them in the
task's START/COMPLETE/FAIL through the transport the deployment configures (``[openlineage] transport``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import sqlalchemy as sa
from botocore.client import BaseClient
from sqlalchemy.engine import Engine

from etl.config import Settings
from etl.manifest import Manifest
from etl.publish import LIVE_STATES, stage_owner
from etl.source import list_objects

if TYPE_CHECKING:
    from openlineage.client import OpenLineageClient
    from openlineage.client.event_v2 import RunEvent

    from etl.lineage_events import Events, EventType, TaskLineage

log = logging.getLogger(__name__)

REPO_DIR = Path(__file__).resolve().parent.parent
URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^@\s/]+@")


@functools.cache
def code_version() -> str:
    """The installed package version, plus the git commit (``.dirty`` with local changes) when run from a checkout."""
    try:
        version = importlib.metadata.version("abc-mirror")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(["git", "-C", str(REPO_DIR), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit[:12]}" + (".dirty" if dirty else "")


@dataclass(frozen=True)
class RunContext:
    """Who runs a step: an Airflow task instance or a command line."""

    orchestrator: str
    dag_id: str | None = None
    dag_run_id: str | None = None
    task_id: str | None = None
    try_number: int | None = None
    invocation: str | None = None

    @classmethod
    def cli(cls, argv: list[str] | None = None) -> RunContext:
        """The command line, with any password in a URL (``--database-url``) masked: lineage is for auditors."""
        args = sys.argv if argv is None else argv
        invocation = " ".join([Path(args[0]).name, *args[1:]]) if args else "python"
        return cls("cli", invocation=URL_PASSWORD.sub(r"\1***@", invocation))

    @classmethod
    def from_airflow_or_cli(cls) -> RunContext:
        """The running Airflow task when there is one, else this process's command line."""
        if "airflow.sdk" not in sys.modules:  # a task runs with Airflow loaded; importing it here would configure it
            return cls.cli()
        try:
            from airflow.sdk import get_current_context

            ti = get_current_context()["ti"]
        except Exception:  # not inside an Airflow task (or Airflow not installed)
            return cls.cli()
        return cls("airflow", dag_id=ti.dag_id, dag_run_id=ti.run_id, task_id=ti.task_id,
                   try_number=ti.try_number)

    @property
    def ref(self) -> str:
        if self.orchestrator == "airflow":
            return f"airflow {self.dag_id}/{self.dag_run_id}/{self.task_id} try {self.try_number}"
        return f"cli {self.invocation}"


class Emitter:
    """OpenLineage emission that never raises: a transport that fails only logs a warning."""

    def __init__(self, client: OpenLineageClient | None = None) -> None:
        self._client = client

    @property
    def client(self) -> OpenLineageClient:
        if self._client is None:
            from openlineage.client import OpenLineageClient

            self._client = OpenLineageClient()
        return self._client

    def emit(self, event: RunEvent) -> bool:
        try:
            self.client.emit(event)
            return True
        except Exception as exc:
            log.warning("OpenLineage %s event of %s not emitted: %s", event.eventType.value, event.job.name, exc)
            return False


@functools.cache
def default_emitter() -> Emitter:
    return Emitter()


def warehouse_namespace(engine: Engine) -> str:
    """OpenLineage dataset namespace of the warehouse: ``postgres://host:port``."""
    url = engine.url
    return f"postgres://{url.host or 'localhost'}:{url.port or 5432}"


@dataclass
class Step:
    """A running step: call :meth:`wrote` for each table (partition) it writes.

    ``recorded`` is False while the execution is a state a succeeded run (``run_id``) already describes.
    """

    run_id: int
    run_uuid: str
    release: str
    name: str
    context: RunContext
    inputs: list[str]
    input_tables: list[str]
    state: dict
    recorded: bool = True
    outputs: dict[tuple[str, str], int | None] = field(default_factory=dict)

    @property
    def state_key(self) -> str:
        return state_key(self.state)

    def wrote(self, table: str, partition: str = "", rows: int | None = None) -> None:
        if "." not in table:
            raise ValueError(f"table {table!r}: give it with its schema, e.g. abc.cell")
        self.outputs[(table, partition)] = rows


_task_lineage: ContextVar[TaskLineage | None] = ContextVar("abc_mirror_task_lineage", default=None)


@contextmanager
def reported_by_task() -> Iterator[TaskLineage]:
    """Run steps as part of an Airflow task whose OpenLineage events the provider sends: within the block
    the steps still record themselves in PostgreSQL but emit no event; what they read and wrote is the
    yielded :class:`TaskLineage`'s, for the task's events."""
    from etl.lineage_events import TaskLineage

    task = TaskLineage()
    token = _task_lineage.set(task)
    try:
        yield task
    finally:
        _task_lineage.reset(token)


def run_state(engine: Engine, release: str, name: str, inputs: list[str], input_tables: list[str],
              target: str = "", selection: Mapping[str, object] | None = None) -> dict:
    """What a step's outputs depend on: two executions with the same state write the same data.

    Inputs carry their MD5 (the manifest's for a release file, the manifest's own for the manifest
    key; null for a key the release does not list); ``target`` names where a step writes outside the
    warehouse (the mirror), ``selection`` the options that choose what it does (files, datasets; an
    option left out and one given as None are the same state).
    """
    with engine.connect() as conn:
        md5 = dict(conn.execute(sa.text(
            "SELECT relative_path, md5 FROM abc.release_file WHERE release = :r AND relative_path = ANY(:keys) "
            "UNION ALL SELECT manifest_key, manifest_md5 FROM abc.release WHERE version = :r "
            "AND manifest_key = ANY(:keys)"), {"r": release, "keys": inputs}).all())
    chosen = {option: value for option, value in (selection or {}).items() if value is not None}
    return {"release": release, "step": name, "target": target, "selection": chosen,
            "inputs": {key: md5.get(key) for key in inputs}, "input_tables": sorted(input_tables),
            "code_version": code_version()}


def state_key(state: Mapping[str, object]) -> str:
    """SHA-256 of ``state`` as canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(json.dumps(state, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _completed_run(engine: Engine, key: str) -> sa.Row | None:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT id, run_uuid FROM abc.lineage_run WHERE state_key = :k "
                                    "AND status = 'succeeded'"), {"k": key}).first()


def _start(engine: Engine, s: Step, started_at: datetime) -> None:
    """Record ``s`` as a new run (with its inputs), giving it its id and runId."""
    run_uuid, context = str(uuid.uuid4()), s.context
    with engine.begin() as conn:
        run_id = conn.execute(sa.text("""
            INSERT INTO abc.lineage_run (run_uuid, release, step, orchestrator, dag_id, dag_run_id, task_id,
                                         try_number, invocation, code_version, started_at, state, state_key)
            VALUES (:u, :r, :s, :o, :dag, :run, :task, :try, :inv, :code, :at, CAST(:state AS jsonb), :key)
            RETURNING id"""),
            {"u": run_uuid, "r": s.release, "s": s.name, "o": context.orchestrator, "dag": context.dag_id,
             "run": context.dag_run_id, "task": context.task_id, "try": context.try_number,
             "inv": context.invocation, "code": s.state["code_version"], "at": started_at,
             "state": json.dumps(s.state), "key": s.state_key}).scalar_one()
        rows = [{"id": run_id, "k": "object", "n": key} for key in s.inputs]
        rows += [{"id": run_id, "k": "table", "n": table} for table in s.input_tables]
        if rows:
            conn.execute(sa.text("INSERT INTO abc.lineage_input (run_id, kind, name) VALUES (:id, :k, :n)"), rows)
    s.run_id, s.run_uuid, s.recorded = run_id, run_uuid, True


def _mark_current(conn: sa.Connection, run_id: int, release: str, staged: bool) -> None:
    """What run ``run_id`` describes is in place: read now, or (``staged``) held by this run's live stage."""
    if not staged:
        conn.execute(sa.text("UPDATE abc.lineage_run SET published_at = now() WHERE id = :id"), {"id": run_id})
        return
    conn.execute(sa.text("""
        UPDATE abc.lineage_run run SET stage_owner = stage.owner, stage_started_at = stage.started_at
        FROM abc.stage WHERE run.id = :id AND stage.release = :r AND stage.owner = :me
                             AND stage.state = ANY(:live)"""),
                 {"id": run_id, "r": release, "me": stage_owner(), "live": list(LIVE_STATES)})


def _finish(engine: Engine, s: Step, error: BaseException | None, staged: bool) -> bool:
    """Record the end of ``s``; False when the database refuses it as a second succeeded run of its state."""
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE abc.lineage_run SET finished_at = now(), status = :st, error = :e "
                                 "WHERE id = :id"),
                         {"id": s.run_id, "st": "failed" if error else "succeeded",
                          "e": f"{type(error).__name__}: {error}" if error else None})
            if s.outputs:
                conn.execute(sa.text("INSERT INTO abc.lineage_output (run_id, table_name, partition, row_count) "
                                     "VALUES (:id, :t, :p, :n)"),
                             [{"id": s.run_id, "t": t, "p": p, "n": n} for (t, p), n in s.outputs.items()])
            if error is None:
                _mark_current(conn, s.run_id, s.release, staged)
    except sa.exc.IntegrityError as exc:
        if getattr(getattr(exc.orig, "diag", None), "constraint_name", None) != "lineage_run_state_key":
            raise
        return False
    return True


@contextmanager
def step(engine: Engine, *, release: str, step: str, inputs: Iterable[str] = (), input_tables: Iterable[str] = (),
         run: RunContext | None = None, emitter: Emitter | None = None, bucket: str | None = None,
         target: str = "", selection: Mapping[str, object] | None = None, staged: bool = False) -> Iterator[Step]:
    """Record and emit one step of ``release`` once per state; see the module docstring.

    ``target`` and ``selection`` go into the state (:func:`run_state`); ``staged``: the step writes the
    release's stage, and what it wrote is read once the stage is published. Within
    :func:`reported_by_task` the step emits nothing: its datasets and facets go to the task's events.
    """
    inputs, input_tables = list(dict.fromkeys(inputs)), list(dict.fromkeys(input_tables))
    state = run_state(engine, release, step, inputs, input_tables, target, selection)
    s = Step(0, "", release, step, run or RunContext.from_airflow_or_cli(), inputs, input_tables, state)
    with engine.connect() as conn:
        manifest = conn.execute(sa.text("SELECT manifest_key, manifest_md5 FROM abc.release WHERE version = :r"),
                                {"r": release}).first()
    described = (s, bucket or Settings.from_env().bucket, engine.url.database or "abc", warehouse_namespace(engine),
                 manifest)

    @functools.cache
    def events() -> Events:
        from etl.lineage_events import Events

        return Events(*described)

    task = _task_lineage.get()
    if task is not None:
        task.add(events())
    emitter = emitter or default_emitter()

    starting: list[threading.Thread] = []

    def emit(state: EventType, error: BaseException | None = None, at: datetime | None = None) -> None:
        if task is None:
            emitter.emit(events().event(state, error, at))

    def send(state: EventType, error: BaseException | None = None, at: datetime | None = None) -> None:
        for thread in starting:  # events go out in order
            thread.join()
        starting.clear()
        emit(state, error, at)

    def send_start(at: datetime) -> None:
        """START goes out from a thread of its own while the step's work begins: building the first event
        imports the OpenLineage client (0.13-0.20 s of a CLI mirror's start-up, benchmarks/RESULTS.md). The next
        event waits for it; so does the interpreter's exit."""
        if task is None:
            starting.append(threading.Thread(target=emit, args=("START", None, at), name="lineage-start"))
            starting[-1].start()

    started_at = datetime.now(UTC)
    done = _completed_run(engine, s.state_key)
    if done is None:
        _start(engine, s, started_at)
        send_start(started_at)
    else:
        s.run_id, s.run_uuid, s.recorded = done.id, str(done.run_uuid), False
        log.info("%s of release %s: lineage run %s already describes this state (%s); recorded again only if "
                 "this execution fails", step, release, s.run_uuid, s.state_key[:12])
    try:
        yield s
    except BaseException as exc:
        try:
            if not s.recorded:  # the state was reached before, this execution of it failed: record the attempt
                _start(engine, s, started_at)
                send("START", at=started_at)
            _finish(engine, s, exc, staged)
        except sa.exc.SQLAlchemyError as unrecorded:  # e.g. the server restarting: the step's own error goes on
            log.warning("lineage run %s (%s of %s) not marked failed: %s", s.run_id, step, release, unrecorded)
        if s.recorded:
            send("FAIL", exc)
        raise
    if s.recorded and _finish(engine, s, None, staged):
        send("COMPLETE")
        return
    if s.recorded:  # another execution succeeded with this state meanwhile: the database kept its run
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM abc.lineage_run WHERE id = :id"), {"id": s.run_id})
        send("ABORT")
        refused, done = s.run_uuid, _completed_run(engine, s.state_key)
        s.run_id, s.run_uuid, s.recorded = done.id, str(done.run_uuid), False
        log.info("%s of release %s: lineage run %s finished this state first; run %s dropped (ABORT)",
                 step, release, s.run_uuid, refused)
    with engine.begin() as conn:
        _mark_current(conn, s.run_id, release, staged)


def publish_stage_runs(conn: psycopg.Connection, release: str) -> None:
    """The runs whose outputs the release's stage holds are read from now on: call in the transaction
    that publishes the stage, before it is marked published."""
    conn.execute("UPDATE abc.lineage_run run SET published_at = now() FROM abc.stage "
                 "WHERE stage.release = %s AND run.release = stage.release AND run.status = 'succeeded' "
                 "AND run.stage_owner = stage.owner AND run.stage_started_at = stage.started_at", (release,))


def record_source_objects(engine: Engine, client: BaseClient, settings: Settings, release: str) -> int:
    """List the directories ``release`` pins and record each object's size, ETag and Last-Modified.

    One listing per directory (no request per object); returns the number of objects recorded.
    """
    with engine.connect() as conn:
        prefixes = conn.execute(sa.text("SELECT relative_path FROM abc.release_directory WHERE release = :r"),
                                {"r": release}).scalars().all()
    rows = [{"k": obj["Key"], "s": obj["Size"], "e": obj.get("ETag", "").strip('"') or None,
             "m": obj.get("LastModified")}
            for prefix in prefixes for obj in list_objects(client, settings.bucket, prefix.rstrip("/") + "/")]
    if rows:
        with engine.begin() as conn:
            conn.execute(sa.text("""
                INSERT INTO abc.source_object (relative_path, size, etag, last_modified) VALUES (:k, :s, :e, :m)
                ON CONFLICT (relative_path) DO UPDATE SET size = EXCLUDED.size, etag = EXCLUDED.etag,
                    last_modified = EXCLUDED.last_modified, listed_at = now()"""), rows)
    return len(rows)


def record_discovery(engine: Engine, client: BaseClient, settings: Settings, manifest_key: str,
                     manifest: Manifest) -> None:
    """The discovery step of a release: its manifest in, its file listing and source objects out."""
    with step(engine, release=manifest.version, step="discover", inputs=[manifest_key], bucket=settings.bucket) as s:
        s.wrote("abc.release_file", partition=manifest.version, rows=len(manifest.files))
        s.wrote("abc.release_directory", partition=manifest.version, rows=len(manifest.directories))
        s.wrote("abc.source_object", rows=record_source_objects(engine, client, settings, manifest.version))
