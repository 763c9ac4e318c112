"""The atlas warehouse: engine, numbered SQL migrations and raw COPY connections.

Migrations are plain ``etl/sql/NNN_name.sql`` files, shipped inside the package (package data, read
with ``importlib.resources``) so that an installed copy finds them as well as a checkout. The pending
ones are applied in order in one transaction, under an advisory lock (concurrent ``db upgrade`` runs
wait): a migration that fails leaves none of that run's migrations applied. Each is recorded in
``abc.schema_migration`` with its checksum, so ``abc-mirror db upgrade`` is idempotent and an edited,
already-applied migration is reported instead of silently skipped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

MIGRATIONS = files("etl") / "sql"
DRIVER = "postgresql+psycopg"  # SQLAlchemy's dialect for psycopg 3
MIGRATION_RE = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
# Serialises concurrent `db upgrade` runs (several Airflow workers starting at once).
MIGRATION_LOCK_ID = 0x61626301


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def make_engine(database_url: str) -> Engine:
    """The warehouse engine, on psycopg 3 whatever driver the URL names (``postgresql://``,
    ``postgresql+psycopg2://`` ...): one driver for SQL and COPY alike."""
    return sa.create_engine(make_url(database_url).set(drivername=DRIVER), pool_pre_ping=True)


@contextmanager
def disposing_engine(database_url: str) -> Iterator[Engine]:
    """An engine for one step, its pool closed after it: a task process must not keep idle connections."""
    engine = make_engine(database_url)
    try:
        yield engine
    finally:
        engine.dispose()


def psycopg_dsn(database_url: str | URL) -> str:
    """libpq connection string for psycopg 3 (COPY) from the SQLAlchemy URL."""
    url = make_url(database_url)
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def copy_connection(database_url: str | URL) -> psycopg.Connection:
    """A psycopg 3 connection of its own (an engine's ``url`` or a URL), for COPY ... FROM STDIN at full speed
    and for session state (advisory locks, a stage's transaction) that must not go back to a pool."""
    return psycopg.connect(psycopg_dsn(database_url))


def discover_migrations(directory: Traversable = MIGRATIONS) -> list[Migration]:
    """The ``*.sql`` files of ``directory`` in order; a misnamed file or a shared number is an error."""
    found: list[Migration] = []
    for resource in sorted((r for r in directory.iterdir() if r.name.endswith(".sql")), key=lambda r: r.name):
        match = MIGRATION_RE.match(resource.name)
        if not match:
            raise MigrationError(f"{resource}: migration files are named NNN_lowercase_name.sql")
        found.append(Migration(int(match.group(1)), resource.name.removesuffix(".sql"),
                               resource.read_text(encoding="utf-8")))
    numbers = [m.number for m in found]
    if len(numbers) != len(set(numbers)):
        raise MigrationError(f"{directory}: two migrations share a number: {numbers}")
    return found


def upgrade(engine: Engine, directory: Traversable = MIGRATIONS) -> list[str]:
    """Apply pending migrations in one transaction; return the names applied (empty when up to date)."""
    migrations = discover_migrations(directory)
    applied_now: list[str] = []
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        conn.execute(sa.text("CREATE SCHEMA IF NOT EXISTS abc"))
        conn.execute(sa.text(
            "CREATE TABLE IF NOT EXISTS abc.schema_migration ("
            " number integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        done = {row.number: row for row in conn.execute(
            sa.text("SELECT number, name, checksum FROM abc.schema_migration"))}
        for migration in migrations:
            previous = done.get(migration.number)
            if previous is not None:
                if previous.checksum != migration.checksum:
                    raise MigrationError(
                        f"etl/sql/{migration.name}.sql changed after it was applied; add a new "
                        "migration instead of editing an applied one")
                continue
            conn.exec_driver_sql(migration.sql)
            conn.execute(
                sa.text("INSERT INTO abc.schema_migration (number, name, checksum) "
                        "VALUES (:n, :name, :c)"),
                {"n": migration.number, "name": migration.name, "c": migration.checksum},
            )
            applied_now.append(migration.name)
    return applied_now


def create_database(database_url: str) -> bool:
    """Create the database named in the URL if missing (used by `db upgrade --create`)."""
    url = make_url(database_url)
    admin = make_engine(url.set(database="postgres").render_as_string(hide_password=False))
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            if conn.execute(sa.text("SELECT 1 FROM pg_database WHERE datname = :d"),
                            {"d": url.database}).scalar():
                return False
            quoted = conn.dialect.identifier_preparer.quote(url.database)
            conn.exec_driver_sql(f"CREATE DATABASE {quoted}")
            return True
    finally:
        admin.dispose()


def drop_database(database_url: str) -> None:
    url = make_url(database_url)
    admin = make_engine(url.set(database="postgres").render_as_string(hide_password=False))
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            quoted = conn.dialect.identifier_preparer.quote(url.database)
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
    finally:
        admin.dispose()
