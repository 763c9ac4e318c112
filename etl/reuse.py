"""Unchanged work costs nothing: releases published by reference, aggregations reused file by file.

Most new releases add other datasets and leave the consensus directories as they were, so they
pin the very same keys with the same MD5s. Such a release is published by reference: no copy,
no reload, no re-aggregation; ``abc.release.shares_data_with`` names the release whose rows it
shares (``abc.published_release.data_release`` is where to read them), and a lineage step
``publish_by_reference`` records the files it pins, so lineage and status say what it shares.

When some scoped directories changed (AIBS metadata 20251031 -> 20260415 in 20260711), the
metadata is loaded again, but a matrix file whose inputs are unchanged (the file itself, the
assignments of its cells and the taxonomy) keeps the partial an earlier release aggregated from it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl import lineage
from etl.catalog import selected_release_files
from etl.config import Settings
from etl.load import PUBLISHED_TABLES
from etl.publish import EXPRESSION_TABLES
from etl.scope import Scope

log = logging.getLogger(__name__)


def scoped_files(conn: sa.Connection, release: str, scope: Scope) -> frozenset[tuple[str, str]]:
    """(key, MD5) of every file of ``release`` that feeds the warehouse in ``scope``."""
    return frozenset((row.relative_path, row.md5)
                     for row in selected_release_files(conn, release, keep=scope.feeds_warehouse))


def shared_with(engine: Engine, release: str) -> str | None:
    """The release whose rows ``release`` shares, when it is published by reference."""
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT shares_data_with FROM abc.release WHERE version = :r"),
                            {"r": release}).scalar()


def unchanged_published_release(conn: sa.Connection, release: str, scope: Scope) -> str | None:
    """The release holding the rows of a published release whose scoped files equal ``release``'s, if any."""
    mine = scoped_files(conn, release, scope)
    if not mine:
        return None
    published = conn.execute(sa.text(
        "SELECT release, data_release FROM abc.published_release WHERE release <> :r ORDER BY release DESC"),
        {"r": release}).all()
    return next((row.data_release for row in published if scoped_files(conn, row.release, scope) == mine), None)


class Shared(NamedTuple):
    """A release published by reference: whose rows it shares, and whether this call published it."""

    release: str
    published_now: bool


def publish_by_reference(settings: Settings, engine: Engine, release: str) -> Shared | None:
    """Publish ``release`` as sharing an unchanged published release's rows; None when it cannot.

    A release already published with rows of its own is left alone; one already published by
    reference is reported again (``published_now`` False), so the step is safe to run again.
    """
    scope = settings.run_scope
    with engine.connect() as conn:
        state = conn.execute(sa.text("SELECT status, shares_data_with, manifest_key FROM abc.release "
                                     "WHERE version = :r"), {"r": release}).first()
        if state is None or state.status == "published":
            return Shared(state.shares_data_with, False) if state is not None and state.shares_data_with else None
        shared = unchanged_published_release(conn, release, scope)
        keys = sorted(key for key, _ in scoped_files(conn, release, scope))
    if shared is None:
        return None
    with lineage.step(engine, release=release, step="publish_by_reference", inputs=[state.manifest_key, *keys],
                      bucket=settings.bucket, selection={"shares_data_with": shared}) as s:
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE abc.release SET status = 'published', shares_data_with = :p, "
                                 "loaded_at = now(), published_at = now(), last_error = NULL WHERE version = :r"),
                         {"p": shared, "r": release})
        for table in PUBLISHED_TABLES + EXPRESSION_TABLES:
            s.wrote(f"abc.{table}", partition=release)
    log.info("release %s: scoped files unchanged since %s; published by reference", release, shared)
    return Shared(shared, True)


def earlier_releases(engine: Engine, release: str) -> list[str]:
    """Published releases before ``release`` with rows of their own, newest first: where reusable
    aggregation partials may be (:func:`etl.aggregate.aggregate_planned_file` checks their inputs)."""
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT release FROM abc.published_release WHERE release < :r AND "
                                    "shares_data_with IS NULL ORDER BY release DESC"), {"r": release}).scalars().all()


def place_copy(source: Path, target: Path) -> None:
    """Put ``source``'s bytes at ``target`` atomically: a hard link where the filesystem allows, else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and os.path.samefile(source, target):
        return
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
