"""A release's stage: a failed or another run's stage is never read as the release; one run stages a release."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from etl import aggregate, db, diff, monitor, pipeline, quality, source
from etl.catalog import cell_assignments
from etl.cli import EXIT_OK, main
from etl.discovery import discover
from etl.fixtures import OLD_RELEASE
from etl.publish import (
    StageBusy,
    hold_owner_lock,
    reads_staged,
    stage_lock,
    staged_or_published,
    staging_tables,
)

REPO = Path(__file__).resolve().parent.parent


def _mirrored_release(settings, engine, monkeypatch) -> str:
    """OLD_RELEASE discovered and mirrored through the CLI; the database URL."""
    discover(source.make_client(settings), settings, engine)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", settings.endpoint_url)
    url = settings.database_url
    assert main(["mirror", "--release", OLD_RELEASE, "--target", settings.mirror_root, "--no-progress",
                 "--database-url", url]) == EXIT_OK
    return url


def _published_release(settings, engine, monkeypatch) -> None:
    url = _mirrored_release(settings, engine, monkeypatch)
    assert main(["load", "--release", OLD_RELEASE, "--database-url", url]) == EXIT_OK


def _readers(settings, release: str) -> dict:
    with db.disposing_engine(settings.database_url) as engine:
        per_class = {c.class_name: c.new for c in diff.record(engine, release, release,
                                                                 settings.run_scope, keep=False).cells_per_class}
    with db.copy_connection(settings.database_url) as conn:
        datasets = [r[0] for r in conn.execute("SELECT DISTINCT dataset FROM abc.cell WHERE release = %s",
                                               (release,)).fetchall()]
        cells = {d: len(cell_assignments(conn, release, d)) for d in datasets}
        planned = aggregate.plan_release(settings, conn, release)
    return {"cells": sum(per_class.values()), "cells_per_class": per_class, "assignments": cells,
            "planned": sorted(i["key"] for i in planned)}


def _break_staged_cells(settings, release: str) -> None:
    """What a bad reload stages: half of its cells missing."""
    with psycopg.connect(db.psycopg_dsn(settings.database_url), autocommit=True) as conn:
        conn.execute(f"DELETE FROM abc_staging.cell_r{release} WHERE cell_label IN "
                     f"(SELECT cell_label FROM abc_staging.cell_r{release} ORDER BY cell_label "
                     f"LIMIT (SELECT count(*) / 2 FROM abc_staging.cell_r{release}))")


def test_failed_reload_of_a_published_release_is_dropped_and_never_read(settings, engine, monkeypatch):
    _published_release(settings, engine, monkeypatch)
    before = _readers(settings, OLD_RELEASE)
    assert before["cells"] > 0 and before["planned"]

    pipeline.load_metadata(settings, OLD_RELEASE)  # a reload, staged
    _break_staged_cells(settings, OLD_RELEASE)
    monkeypatch.setitem(quality.CHECKS, "injected_failure",
                        ("fails on purpose", "SELECT count(*), 'injected' FROM {cell} WHERE release = %(r)s"))
    with pytest.raises(quality.QualityCheckFailed):
        pipeline.validate_and_publish(settings, OLD_RELEASE)
    # A retry fails again instead of checking the published rows.
    with pytest.raises(quality.QualityCheckFailed, match="stage failed"):
        pipeline.validate(settings, OLD_RELEASE)

    with db.copy_connection(settings.database_url) as conn:
        assert staging_tables(conn, OLD_RELEASE) == []
    with engine.connect() as conn:
        status = conn.execute(sa.text("SELECT status FROM abc.release WHERE version = :r"), {"r": OLD_RELEASE}).scalar()
        stage = conn.execute(sa.text("SELECT state FROM abc.stage WHERE release = :r"), {"r": OLD_RELEASE}).scalar()
    assert (status, stage) == ("published", "failed")
    monkeypatch.delitem(quality.CHECKS, "injected_failure")
    assert _readers(settings, OLD_RELEASE) == before
    lines = "\n".join(monitor.release_status_lines(engine, "mirror", settings.run_scope))
    assert f"{OLD_RELEASE}" in lines and "published" in lines


def test_a_live_stage_of_a_published_release_is_read_only_by_its_run(settings, engine, monkeypatch):
    _published_release(settings, engine, monkeypatch)
    before = _readers(settings, OLD_RELEASE)
    monkeypatch.setenv("ABC_STAGE_OWNER", "test run A")
    pipeline.load_metadata(settings, OLD_RELEASE)  # run A stages a reload and has not checked it yet
    _break_staged_cells(settings, OLD_RELEASE)
    staged = _readers(settings, OLD_RELEASE)
    assert staged["cells"] < before["cells"]  # run A reads what it staged
    monkeypatch.setenv("ABC_STAGE_OWNER", "someone else")
    assert _readers(settings, OLD_RELEASE) == before  # everyone else reads the published release
    with db.copy_connection(settings.database_url) as conn, pytest.raises(StageBusy, match="staged by test run A"):
        pipeline.publish_release(conn, OLD_RELEASE)  # nor may they publish run A's stage


def _cli_load(settings, release: str, wait: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ABC_MIRROR_ROOT": settings.mirror_root,
           "AWS_ENDPOINT_URL_S3": settings.endpoint_url, "ABC_STAGE_WAIT_SECONDS": str(wait)}
    env.pop("ABC_STAGE_OWNER", None)
    return subprocess.Popen([sys.executable, "-c", "import sys; from etl.cli import main; sys.exit(main(sys.argv[1:]))",
                             "load", "--release", release, "--database-url", settings.database_url],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _cells(engine) -> tuple[int, int]:
    with engine.connect() as conn:
        return tuple(conn.execute(sa.text("SELECT count(*), count(DISTINCT (dataset, cell_label)) FROM abc.cell "
                                          "WHERE release = :r"), {"r": OLD_RELEASE}).one())


def test_a_second_run_waits_bounded_then_names_the_holder(settings, engine, monkeypatch):
    _published_release(settings, engine, monkeypatch)
    single = _cells(engine)
    monkeypatch.setenv("ABC_STAGE_OWNER", "the scheduled run")
    with db.copy_connection(settings.database_url) as holder, stage_lock(holder, OLD_RELEASE):
        second = _cli_load(settings, OLD_RELEASE, wait=2)
        out, err = second.communicate(timeout=300)
    assert second.returncode != 0, out
    assert f"release {OLD_RELEASE} is being staged by the scheduled run since" in err
    assert _cells(engine) == single


def test_two_loads_of_a_release_at_once_end_as_one(settings, engine, monkeypatch):
    _published_release(settings, engine, monkeypatch)
    single = _cells(engine)
    runs = [_cli_load(settings, OLD_RELEASE, wait=300) for _ in range(2)]
    results = [(run.wait(timeout=600), *run.communicate()) for run in runs]
    for code, out, err in results:
        assert code == EXIT_OK, err
        assert f"release {OLD_RELEASE} published; data-quality checks passed" in out
    assert _cells(engine) == single
    with db.copy_connection(settings.database_url) as conn:
        assert staging_tables(conn, OLD_RELEASE) == []


STAGE_THEN_SLEEP = ("import sys, time; from etl import pipeline; from etl.config import Settings; "
                    "pipeline.load_metadata(Settings.from_env(), sys.argv[1]); print('staged', flush=True); "
                    "time.sleep(600)")


def _cells_read(settings, release: str) -> tuple[int, int]:
    """Cells a reader sees of ``release``: through the diff, and where staged_or_published points."""
    with db.disposing_engine(settings.database_url) as engine:
        through_diff = sum(c.new for c in diff.record(engine, release, release, settings.run_scope,
                                                      keep=False).cells_per_class)
    with db.copy_connection(settings.database_url) as conn:
        table = staged_or_published(conn, "cell", release)
        read = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE release = %s").format(table),
                            (release,)).fetchone()[0]
    return through_diff, read


def test_a_killed_runs_stage_is_abandoned_never_read_and_taken_over(settings, engine, monkeypatch):
    url = _mirrored_release(settings, engine, monkeypatch)
    env = {**os.environ, "PYTHONPATH": str(REPO), "ABC_DATABASE_URL": url, "ABC_MIRROR_ROOT": settings.mirror_root,
           "AWS_ENDPOINT_URL_S3": settings.endpoint_url, "OPENLINEAGE_DISABLED": "true"}
    env.pop("ABC_STAGE_OWNER", None)
    run = subprocess.Popen([sys.executable, "-c", STAGE_THEN_SLEEP, OLD_RELEASE], env=env, stdout=subprocess.PIPE,
                           text=True)
    try:
        assert run.stdout.readline() == "staged\n"
        staged = _cells_read(settings, OLD_RELEASE)
        assert staged[0] == staged[1] > 0  # while its run lives, an unpublished release's stage is what is read
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
        run.stdout.close()

    with db.copy_connection(url) as conn:
        owner, state = conn.execute("SELECT owner, state FROM abc.stage WHERE release = %s",
                                    (OLD_RELEASE,)).fetchone()
        assert owner.endswith(f" pid {run.pid}") and state == "staged"  # the row still says so
        deadline = time.monotonic() + 30
        while reads_staged(conn, OLD_RELEASE):  # PostgreSQL ends the dead process's sessions
            conn.rollback()
            assert time.monotonic() < deadline, "the killed run's stage is still read after 30 s"
            time.sleep(0.1)
    assert _cells_read(settings, OLD_RELEASE) == (0, 0)

    # The next run takes the stage over instead of waiting for a run that is gone: nothing of it is published.
    with db.copy_connection(url) as conn, pytest.raises(pipeline.PlanError, match="nothing staged to publish"):
        pipeline.publish_release(conn, OLD_RELEASE)
    with db.copy_connection(url) as conn:
        assert staging_tables(conn, OLD_RELEASE) == []
    assert main(["load", "--release", OLD_RELEASE, "--database-url", url]) == EXIT_OK
    assert _cells_read(settings, OLD_RELEASE) == (staged[0], staged[0])


def test_a_process_owner_lock_session_is_probed_by_the_server(settings, monkeypatch):
    """A lost machine's stage expires within about a minute: the server itself probes the owner session."""
    monkeypatch.delenv("ABC_STAGE_OWNER", raising=False)
    with db.copy_connection(settings.database_url) as conn:
        session = hold_owner_lock(conn)
        assert session is not None and hold_owner_lock(conn) is session  # one session per process and database
        assert session.info.host in ("127.0.0.1", "localhost")  # over TCP, where the keepalives apply
        shown = {name: session.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]
                 for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")}
        assert shown == {"tcp_keepalives_idle": "30", "tcp_keepalives_interval": "10", "tcp_keepalives_count": "3"}
        held = conn.execute("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                            "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = "
                            "'abc-mirror stage owner'").fetchone()[0]
        assert held == 1
