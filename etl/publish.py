"""Staging and atomic publication of per-release partitions.

Every warehouse table that holds release data is LIST-partitioned by ``release``. A stage
(metadata load, aggregation) writes a release into standalone staging tables in schema
``abc_staging``; :func:`publish` then swaps them in as the release's partitions and marks the
release published, all in one transaction. Readers therefore see either the previous state or
the whole new release, never a half-loaded one, and a failed or killed load leaves only staging
tables behind, which the next attempt drops and rebuilds.

Each release's current stage is recorded in ``abc.stage``: the run staging it (:func:`stage_owner`),
since when, and its state. Staging and publication of a release run under its stage lock
(:func:`stage_lock`, a session advisory lock), so two runs never drop each other's staging tables:
the second waits, bounded, then fails naming the holder. A stage whose checks or publication fail
is dropped (:func:`fail_stage`), and readers (:func:`staged_or_published`) read staging tables only
of a live stage, and of a published release only in the run that stages it: everyone else reads
the published partitions. A stage owned by one process (the CLI) is live only while that process
holds its owner lock (:func:`hold_owner_lock`), which PostgreSQL releases when the process dies:
a killed run's stage is then never read, and the next run drops it and takes over. A DAG run's
stage outlives its task processes and is dropped when the run fails (:func:`end_stages_of`).
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from etl.config import env

log = logging.getLogger(__name__)

RELEASE_RE = re.compile(r"^[0-9]{8}$")
STAGING_SCHEMA = "abc_staging"
PARTITION_SCHEMA = "abc_part"
# Planner settings for the foreign-key validation ATTACH PARTITION runs (a join of the partition's rows,
# e.g. 7.65 M cells, against abc.cluster). Left alone, PostgreSQL 15 sorts both sides for a merge anti
# join: 14.0 s for 7.65 M cells; a hash anti join on the 6,721 clusters takes 2.5 s
# (benchmarks/attach_fk_plan.sql; RESULTS.md, "Publishing and loading at full size"). Set for the ATTACH
# statements only.
FOREIGN_KEY_CHECK_PLAN = {"enable_mergejoin": "off", "enable_nestloop": "off"}
# The aggregation stage's tables, here so that publishing needs no numerical stack.
EXPRESSION_TABLES = ["expression_gene", "expression_group", "expression_gene_major", "expression_group_major",
                     "expression_file"]


def _check_release(release: str) -> str:
    if not RELEASE_RE.match(release):
        raise ValueError(f"release {release!r} is not YYYYMMDD")
    return release


def staging_name(table: str, release: str) -> str:
    return f"{table}_r{_check_release(release)}"


def staged_table(table: str, release: str) -> sql.Identifier:
    """``abc_staging.<table>_r<release>``: where a stage writes ``release`` before publication."""
    return sql.Identifier(STAGING_SCHEMA, staging_name(table, release))


LIVE_STATES = ("staging", "staged")
# First key of the advisory lock a process holds while it may own stages (the second: its owner's hash).
OWNER_LOCK_CLASS = 0x61626302
_held: dict[str, int] = {}  # releases whose stage lock this process holds -> nesting depth
# The server probes an owner session silent for 30 s, every 10 s, and ends it after 3 unanswered probes
# (the settings apply to TCP connections; a Unix socket's peer cannot vanish with its machine).
OWNER_KEEPALIVES = "-c tcp_keepalives_idle=30 -c tcp_keepalives_interval=10 -c tcp_keepalives_count=3"
_owner_sessions: dict[tuple, psycopg.Connection] = {}  # (pid, host, port, database) -> owner lock session


class StageBusy(RuntimeError):
    """Another run holds or owns the release's stage."""


def dag_run_owner(dag_id: str, run_id: str) -> str:
    """The owner name of the stages an Airflow DAG run makes."""
    return f"{dag_id} run {run_id}"


def stage_owner() -> str:
    """Who stages: ``ABC_STAGE_OWNER``, else the Airflow DAG run (the same for all its tasks and retries;
    Airflow sets ``AIRFLOW_CTX_*`` in a task's environment), else this process."""
    if env("ABC_STAGE_OWNER"):
        return env("ABC_STAGE_OWNER")
    if os.environ.get("AIRFLOW_CTX_DAG_RUN_ID"):
        return dag_run_owner(os.environ.get("AIRFLOW_CTX_DAG_ID", "dag"), os.environ["AIRFLOW_CTX_DAG_RUN_ID"])
    return f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"


def owned_by_process() -> bool:
    """Whether this process's stages are its own (no ``ABC_STAGE_OWNER``, no DAG run): they live as long as
    it does (:func:`hold_owner_lock`), while a DAG run's stage outlives each of its task processes."""
    return not env("ABC_STAGE_OWNER") and not os.environ.get("AIRFLOW_CTX_DAG_RUN_ID")


def hold_owner_lock(conn: psycopg.Connection) -> psycopg.Connection | None:
    """For a process owning its stages: hold the advisory lock named after its owner on a session of its
    own, open until the process ends, on ``conn``'s database, and return that session. PostgreSQL releases
    the lock when the process dies (kill -9 included) or the server restarts, which is how others tell its
    stages are abandoned; when the process's machine is lost instead, the session's TCP keepalives
    (:data:`OWNER_KEEPALIVES`) end it within about a minute rather than the operating system's two hours."""
    if not owned_by_process():
        return None
    info = conn.info
    key = (os.getpid(), info.host, info.port, info.dbname)
    held = _owner_sessions.get(key)
    if held is not None and not held.closed:
        try:
            held.execute("SELECT 1")
            return held
        except psycopg.Error:  # the server restarted or dropped the session: take the lock again
            held.close()
    session = psycopg.connect(psycopg.conninfo.make_conninfo(info.dsn, password=info.password or None,
                                                             application_name="abc-mirror stage owner",
                                                             options=OWNER_KEEPALIVES),
                              autocommit=True)
    session.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (OWNER_LOCK_CLASS, stage_owner()))
    _owner_sessions[key] = session
    return session


def _stage_alive(conn: psycopg.Connection, owner: str | None, state: str | None, by_process: bool) -> bool:
    """Whether a stage is live: in a live state and, when owned by a process, that process still holds
    its owner lock (this process is alive by definition)."""
    if state not in LIVE_STATES:
        return False
    if not by_process or (owner == stage_owner() and owned_by_process()):
        return True
    return conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2 "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
        "AND classid = CAST(%s AS integer)::oid AND objid = hashtext(%s)::oid)",
        (OWNER_LOCK_CLASS, owner)).fetchone()[0]


def stage_wait_seconds() -> float:
    return float(env("ABC_STAGE_WAIT_SECONDS"))


def _idle(conn: psycopg.Connection) -> None:
    if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
        conn.rollback()
    elif conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        conn.commit()


def _holder(conn: psycopg.Connection, release: str) -> str:
    row = conn.execute("SELECT locked_by, locked_at FROM abc.stage WHERE release = %s", (release,)).fetchone()
    conn.rollback()
    return f"{row[0]} since {row[1]:%Y-%m-%d %H:%M:%S %Z}" if row and row[0] else "another session"


@contextmanager
def stage_lock(conn: psycopg.Connection, release: str, wait: float | None = None) -> Iterator[None]:
    """Hold ``release``'s stage lock (a session advisory lock on ``conn``) for the block.

    Waits at most ``wait`` seconds (``ABC_STAGE_WAIT_SECONDS``, default 900) for another holder,
    then raises :class:`StageBusy` naming it. Reentrant within a process, so a command can hold
    the lock around all its steps. Commits what ``conn`` has pending before taking it.
    """
    _check_release(release)
    if _held.get(release):
        _held[release] += 1
        try:
            yield
        finally:
            _held[release] -= 1
        return
    _idle(conn)
    wait = stage_wait_seconds() if wait is None else wait
    deadline = time.monotonic() + wait
    key = f"abc-mirror stage {release}"
    while not conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()[0]:
        conn.commit()
        if time.monotonic() >= deadline:
            raise StageBusy(f"release {release} is being staged by {_holder(conn, release)}; "
                            f"gave up after waiting {wait:.0f} s")
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
    _held[release] = 1
    try:
        conn.execute("INSERT INTO abc.stage (release, locked_by, locked_at) SELECT version, %s, now() "
                     "FROM abc.release WHERE version = %s ON CONFLICT (release) DO UPDATE "
                     "SET locked_by = excluded.locked_by, locked_at = excluded.locked_at", (stage_owner(), release))
        conn.commit()
        yield
    finally:
        _held.pop(release, None)
        if not conn.closed and not conn.broken:
            try:
                _idle(conn)
                conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
                conn.commit()
            except psycopg.OperationalError:  # the server ended the session (a restart), and the lock with it
                pass


def staging_tables(conn: psycopg.Connection, release: str) -> list[str]:
    """The names of every table in ``abc_staging`` that holds ``release``."""
    return [r[0] for r in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s AND right(tablename, 10) = %s ORDER BY 1",
        (STAGING_SCHEMA, f"_r{_check_release(release)}")).fetchall()]


def drop_release_staging(conn: psycopg.Connection, release: str) -> list[str]:
    """Drop every staging table of ``release`` (no commit); returns their names."""
    names = staging_tables(conn, release)
    for name in names:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(STAGING_SCHEMA, name)))
    return names


def set_stage(conn: psycopg.Connection, release: str, state: str, error: str | None = None,
              new: bool = False) -> None:
    """Record this run's stage state of ``release`` (no commit); ``new`` restarts ``started_at``."""
    conn.execute(
        "INSERT INTO abc.stage (release, owner, owned_by_process, state, started_at, updated_at, error) "
        "SELECT version, %(o)s, %(p)s, %(s)s, now(), now(), %(e)s FROM abc.release WHERE version = %(r)s "
        "ON CONFLICT (release) DO UPDATE SET owner = excluded.owner, owned_by_process = excluded.owned_by_process, "
        "state = excluded.state, updated_at = now(), error = excluded.error, started_at = CASE WHEN %(new)s "
        "OR abc.stage.owner IS DISTINCT FROM excluded.owner OR abc.stage.state NOT IN ('staging', 'staged') "
        "THEN now() ELSE abc.stage.started_at END",
        {"o": stage_owner(), "p": owned_by_process(), "s": state, "e": error, "r": release, "new": new})


def claim_stage(conn: psycopg.Connection, release: str, new: bool = False) -> None:
    """Make the current stage of ``release`` this run's, under its stage lock; commits.

    ``new`` (a metadata load) starts a stage: any earlier stage's tables are dropped. Otherwise (a
    merge, a publication) the run continues its own stage, or starts one when none is live, and
    raises :class:`StageBusy` when another run's stage is live: that run took the release over. A
    stage whose owning process died (:func:`_stage_alive`) is abandoned: its tables are dropped and
    this run starts afresh.
    """
    hold_owner_lock(conn)
    owner = stage_owner()
    row = conn.execute("SELECT owner, state, started_at, owned_by_process FROM abc.stage WHERE release = %s "
                       "FOR UPDATE", (release,)).fetchone()
    live = row is not None and row[1] in LIVE_STATES
    abandoned = live and row[0] != owner and not _stage_alive(conn, row[0], row[1], row[3])
    if abandoned:
        log.warning("release %s: the stage of %s (since %s) is abandoned, its process is gone; %s takes over",
                    release, row[0], f"{row[2]:%Y-%m-%d %H:%M:%S %Z}", owner)
    elif not new and live and row[0] != owner:
        conn.rollback()
        raise StageBusy(f"release {release} is being staged by {row[0]} since {row[2]:%Y-%m-%d %H:%M:%S %Z}; "
                        f"this run ({owner}) stops (a load of the release takes its stage over)")
    if new or abandoned:
        drop_release_staging(conn, release)
    set_stage(conn, release, "staging", new=new or abandoned or not live)
    conn.commit()


def fail_stage(conn: psycopg.Connection, release: str, error: str) -> None:
    """Drop the staging tables of this run's failed stage of ``release`` and record it failed; commits.

    The release keeps its published partitions. Another run's live stage is left alone.
    """
    _idle(conn)
    with stage_lock(conn, release):
        row = conn.execute("SELECT owner, state, owned_by_process FROM abc.stage WHERE release = %s FOR UPDATE",
                           (release,)).fetchone()
        if row is not None and row[0] != stage_owner() and _stage_alive(conn, *row):
            conn.rollback()
            return
        drop_release_staging(conn, release)
        set_stage(conn, release, "failed", error=error[:2000])
        conn.commit()


def end_stages_of(conn: psycopg.Connection, owner: str, error: str) -> list[str]:
    """Fail every live stage ``owner`` (a DAG run that ended failed) left: drop their tables, so that
    they are never read as their release and the next run starts afresh; commits. Returns the releases."""
    _idle(conn)
    releases = [r[0] for r in conn.execute("SELECT release FROM abc.stage WHERE owner = %s AND state = ANY(%s) "
                                           "ORDER BY release", (owner, list(LIVE_STATES))).fetchall()]
    conn.rollback()
    ended = []
    for release in releases:
        with stage_lock(conn, release):
            row = conn.execute("SELECT owner, state FROM abc.stage WHERE release = %s FOR UPDATE",
                               (release,)).fetchone()
            if row[0] == owner and row[1] in LIVE_STATES:
                drop_release_staging(conn, release)
                conn.execute("UPDATE abc.stage SET state = 'failed', error = %s, updated_at = now() "
                             "WHERE release = %s", (error[:2000], release))
                ended.append(release)
            conn.commit()
    return ended


def reads_staged(conn: psycopg.Connection, release: str) -> bool:
    """Whether readers read the release's staging tables: its stage is live (and its owner alive) and,
    once the release is published, this run is the one staging it."""
    row = conn.execute("SELECT s.owner, s.state, s.owned_by_process, r.status FROM abc.stage s "
                       "JOIN abc.release r ON r.version = s.release WHERE s.release = %s", (release,)).fetchone()
    if row is None or not _stage_alive(conn, *row[:3]):
        return False
    return row[3] != "published" or row[0] == stage_owner()


def read_state(conn: psycopg.Connection, release: str) -> dict[str, str | None]:
    """What readers of ``release`` read now (:func:`staged_or_published`), as an alert names the state it
    is about: the live stage of a run (its owner) or the publication (its time, None when unpublished)."""
    if reads_staged(conn, release):
        owner = conn.execute("SELECT owner FROM abc.stage WHERE release = %s", (release,)).fetchone()[0]
        return {"stage_owner": owner}
    published = conn.execute("SELECT published_at FROM abc.release WHERE version = %s", (release,)).fetchone()
    return {"published_at": published[0].isoformat() if published and published[0] else None}


def is_staged(conn: psycopg.Connection, table: str, release: str) -> bool:
    """Whether a stage has written ``table`` of ``release`` and it is not published yet."""
    name = f"{STAGING_SCHEMA}.{staging_name(table, release)}"
    return conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0] is not None


def staged_or_published(conn: psycopg.Connection, table: str, release: str) -> sql.Identifier:
    """The release's staging table while its stage is live (:func:`reads_staged`), else the published
    table: so that the run's checks and next stage read what its last stage wrote, and everyone
    else reads a published release as published, never a failed or abandoned stage.

    A published release is read from its partition (``abc_part.<table>_r<release>``, the staging
    table :func:`publish` attached), not through ``abc.<table>``: the partition keeps the statistics
    ANALYZE took when it was staged, while the partitioned parent has none (autovacuum never analyzes
    it), so joins through the parent are planned for billions of rows. A release with no partition
    (never published, e.g. not aggregated) reads the parent, which holds none of its rows.
    """
    if is_staged(conn, table, release) and reads_staged(conn, release):
        return staged_table(table, release)
    partition = f"{PARTITION_SCHEMA}.{staging_name(table, release)}"
    if conn.execute("SELECT to_regclass(%s)", (partition,)).fetchone()[0] is not None:
        return sql.Identifier(PARTITION_SCHEMA, staging_name(table, release))
    return sql.Identifier("abc", table)


def create_staging_table(conn: psycopg.Connection, table: str, release: str) -> sql.Identifier:
    """(Re)create an empty staging table shaped like ``abc.<table>`` for one release.

    The CHECK constraint on ``release`` lets ATTACH PARTITION skip its validation scan.
    """
    name = staging_name(table, release)
    target = sql.Identifier(STAGING_SCHEMA, name)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(STAGING_SCHEMA)))
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(target))
    conn.execute(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)").format(
        target, sql.Identifier("abc", table)))
    conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK (release = {})").format(
        target, sql.Identifier(f"{name}_release_check"), sql.Literal(release)))
    return target


def index_staging_table(conn: psycopg.Connection, table: str, release: str) -> None:
    """Build, after the bulk load, the keys and indexes ``abc.<table>`` has, so ATTACH reuses them.

    Loading first and indexing once afterwards is much faster than maintaining indexes row by row.
    """
    name = staging_name(table, release)
    staged = sql.Identifier(STAGING_SCHEMA, name)
    parent = f"abc.{table}"
    keys = conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = %s::regclass AND contype IN ('p', 'u')", (parent,)).fetchall()
    for constraint, definition in keys:
        conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} ").format(
            staged, sql.Identifier(f"{name}_{constraint}"[:63])) + sql.SQL(definition))
    indexes = conn.execute(
        "SELECT c.relname, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid "
        "WHERE i.indrelid = %s::regclass "
        "AND NOT EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.indexrelid)", (parent,)).fetchall()
    for index_name, definition in indexes:
        on_parent = f"ON ONLY {parent} "
        if on_parent not in definition:
            raise RuntimeError(f"unexpected index definition on {parent}: {definition}")
        head, tail = definition.split(on_parent, 1)
        unique = "UNIQUE " if head.startswith("CREATE UNIQUE") else ""
        conn.execute(sql.SQL("CREATE {}INDEX {} ON {} ").format(
            sql.SQL(unique), sql.Identifier(f"{name}_{index_name}"[:63]), staged) + sql.SQL(tail))


def analyze_published(conn: psycopg.Connection, tables: list[str]) -> list[str]:
    """ANALYZE those partitioned tables ``abc.<table>`` whose statistics have fallen behind; commits.

    Autovacuum analyses partitions, never their partitioned parent, and a query whose release is known
    only when it runs (every ``abc.current_*`` view) is planned with the parent's statistics: without
    them its joins get default selectivities and, at millions of cells, plans that never finish. But in
    PostgreSQL before 18 an ANALYZE of a parent also analyses every partition again, so its cost grows with
    the releases kept (:func:`parents_to_analyze` says which are due). Run after the commit, not in the
    publishing transaction, whose locks would keep readers waiting. Returns the tables analysed.
    """
    _idle(conn)
    due = parents_to_analyze(conn, tables)
    for table in due:
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier("abc", table)))
        conn.commit()
    return due


def parents_to_analyze(conn: psycopg.Connection, tables: list[str]) -> list[str]:
    """The parents with partitions and no statistics, or statistics taken when they had under half their
    partitions now: their estimates per release are then off by at most 2x, and the releases kept cost
    O(1) ANALYZEs of a partition per publication, amortised, instead of all of them every time."""
    rows = conn.execute(
        "SELECT c.relname, (SELECT count(*) FROM pg_inherits i WHERE i.inhparent = c.oid), "
        "(SELECT CASE WHEN s.n_distinct > 0 THEN s.n_distinct END FROM pg_stats s "
        " WHERE s.schemaname = 'abc' AND s.tablename = c.relname AND s.attname = 'release' AND s.inherited) "
        "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'abc' AND c.relname = ANY(%s)", (tables,)).fetchall()
    partitions = {name: (count, analysed) for name, count, analysed in rows}
    return [t for t in tables if partitions[t][0] > 0
            and (partitions[t][1] is None or 2 * partitions[t][1] <= partitions[t][0])]


def publish(conn: psycopg.Connection, release: str, tables: list[str]) -> None:
    """Swap the staged tables in as ``release``'s partitions, atomically.

    Run inside one transaction (psycopg's ``conn.transaction()``); an old partition of the
    same release is detached and dropped first, so publishing twice never duplicates rows.
    Tables are attached in the order given: parents of foreign keys first. ATTACH validates each
    foreign key of the new partition with one anti-join of its rows against the referenced table;
    :data:`FOREIGN_KEY_CHECK_PLAN` holds that join to a hash of the (small) referenced side.
    """
    _check_release(release)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(PARTITION_SCHEMA)))
    for table in reversed(tables):
        old = sql.Identifier(PARTITION_SCHEMA, staging_name(table, release))
        exists = conn.execute("SELECT to_regclass(%s)", (f"{PARTITION_SCHEMA}.{staging_name(table, release)}",))
        if exists.fetchone()[0] is not None:
            conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(sql.Identifier("abc", table), old))
            conn.execute(sql.SQL("DROP TABLE {}").format(old))
    for setting, value in FOREIGN_KEY_CHECK_PLAN.items():
        conn.execute("SELECT set_config(%s, %s, true)", (setting, value))
    for table in tables:
        staged = staged_table(table, release)
        conn.execute(sql.SQL("ALTER TABLE {} SET SCHEMA {}").format(staged, sql.Identifier(PARTITION_SCHEMA)))
        conn.execute(sql.SQL("ALTER TABLE {} ATTACH PARTITION {} FOR VALUES IN ({})").format(
            sql.Identifier("abc", table), sql.Identifier(PARTITION_SCHEMA, staging_name(table, release)),
            sql.Literal(release)))
    for setting in FOREIGN_KEY_CHECK_PLAN:
        conn.execute(sql.SQL("RESET {}").format(sql.Identifier(setting)))
