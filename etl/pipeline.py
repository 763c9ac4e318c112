"""Orchestration-level helpers for the release pipeline, still free of Airflow.

The release DAG fans the mirror out over batches of files (one mapped task per batch, a pool
capping how many run at once). Batches are planned here from the manifest rows discovery
recorded, so that the plan is the same whichever worker computes it, and small enough in count
to stay far below Airflow's cap on mapped tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.load import METADATA_TABLES, publish_staged_metadata
from etl.publish import STAGING_SCHEMA, staging_name

DEFAULT_BATCH_BYTES = 8 << 30
MAX_BATCHES = 256


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class PlannedFile:
    key: str
    size: int


def resolve_release(engine: Engine, requested: str | None) -> str:
    """The release to process: the one named, or the newest recorded one for ``latest``/empty."""
    with engine.connect() as conn:
        if requested and requested != "latest":
            found = conn.execute(sa.text("SELECT version FROM abc.release WHERE version = :v"),
                                 {"v": requested}).scalar()
            if found is None:
                raise PlanError(f"release {requested} is not recorded in abc.release: run discovery (abc_watch) first")
            return found
        newest = conn.execute(sa.text("SELECT max(version) FROM abc.release")).scalar()
    if newest is None:
        raise PlanError("no release recorded in abc.release: run discovery (abc_watch) first")
    return newest


def release_files(engine: Engine, release: str, datasets: list[str] | None = None,
                  kinds: list[str] | None = None) -> list[PlannedFile]:
    """The manifest's files of ``release``, selected exactly as the mirror selects them, by key."""
    from etl.mirror import _selected_release_files

    with engine.connect() as conn:
        rows = _selected_release_files(conn, release, datasets, kinds, None)
    if not rows:
        raise PlanError(f"release {release}: no file matches datasets={datasets or 'all'} kinds={kinds or 'all'}")
    return [PlannedFile(row.relative_path, row.size) for row in rows]


def plan_batches(files: list[PlannedFile], batch_bytes: int = DEFAULT_BATCH_BYTES,
                 max_batches: int = MAX_BATCHES) -> list[list[str]]:
    """Split files into batches of about ``batch_bytes`` each, at most ``max_batches`` of them.

    Large files go first, each to the lightest batch so far, so batches come out even and a
    single huge h5ad does not serialise a batch of small CSVs behind it. There are as many
    batches as the byte budget asks, but never more than files nor than ``max_batches``.
    """
    if batch_bytes <= 0 or max_batches <= 0:
        raise PlanError("batch_bytes and max_batches must be positive")
    total = sum(f.size for f in files)
    count = max(1, min(len(files), max_batches, -(-total // batch_bytes)))
    batches: list[list[str]] = [[] for _ in range(count)]
    loads = [0] * count
    for f in sorted(files, key=lambda f: (-f.size, f.key)):
        lightest = loads.index(min(loads))
        batches[lightest].append(f.key)
        loads[lightest] += f.size
    return [sorted(batch) for batch in batches if batch]


def publish_release(conn: psycopg.Connection, release: str) -> bool:
    """Publish the staged metadata of ``release``; a no-op when it is already published and nothing is staged.

    That makes the publish task safe to clear and run again: the first run moved the staging
    tables into place, a second finds nothing staged and the release published. Returns whether
    it published now.
    """
    with conn.transaction():
        status = conn.execute("SELECT status FROM abc.release WHERE version = %s FOR UPDATE", (release,)).fetchone()
        if status is None:
            raise PlanError(f"release {release} is not recorded in abc.release")
        staged = conn.execute("SELECT to_regclass(%s)",
                              (f"{STAGING_SCHEMA}.{staging_name(METADATA_TABLES[-1], release)}",)).fetchone()[0]
        if staged is None:
            if status[0] == "published":
                return False
            raise PlanError(f"release {release} has nothing staged to publish (status {status[0]})")
        publish_staged_metadata(conn, release)
    return True

