"""The releases overview: what the "ABC releases" page of the Airflow UI shows, as data.

Every release with its status (:func:`etl.monitor.release_statuses`: files and bytes in scope, each
dataset's state), the state of each stage (seen upstream, mirror, load, expression, checks, publish),
the Airflow DAG runs and lineage runs that worked on it (``abc.lineage_run``: a run's ``dag_id`` and
``dag_run_id`` tie it to the release it recorded a step of), whether its release notes lie beside the
mirror, and the cells per class of every published release (``abc.term_cell_count``, read where a
release's rows are: its own, or those it shares by reference); plus the lag behind upstream. Sizes and
times in human units (:func:`etl.monitor.human_size`, :func:`ago`) are here so that every renderer
says the same. It only reads: the page's database role may be read-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl import diff, monitor
from etl.monitor import Lag, ReleaseStatus, human_size
from etl.scope import Scope

# A stage's state: what the page colours it by.
DONE, PARTIAL, RUNNING, FAILED, WAITING, SKIPPED = "done", "partial", "running", "failed", "waiting", "skipped"
STAGES = ["upstream", "mirror", "load", "expression", "checks", "publish"]
# The lineage steps that load a release's rows, per stage (an expression is staged by ``aggregate``).
STAGE_STEPS = {"load": "load_metadata", "expression": "aggregate"}


@dataclass(frozen=True)
class Stage:
    name: str  # one of STAGES
    state: str  # DONE, PARTIAL, RUNNING, FAILED, WAITING or SKIPPED
    detail: str  # e.g. "412/412 files, 1.2 GB of 1.2 GB", "3 h ago, in 12 min"
    at: datetime | None = None  # when it reached this state, where known


@dataclass(frozen=True)
class StepRun:
    """The latest lineage run of one step of a release."""

    status: str  # running, succeeded, failed
    started_at: datetime
    finished_at: datetime | None
    error: str | None


@dataclass(frozen=True)
class DagRun:
    """An Airflow DAG run that recorded lineage steps of a release."""

    dag_id: str
    run_id: str
    started_at: datetime
    steps: tuple[str, ...]  # its steps, in the order they started
    failed: int  # of its step runs, how many failed (a task retried after a failure counts once per try)


@dataclass(frozen=True)
class ReleaseOverview:
    status: ReleaseStatus
    stages: list[Stage]
    dag_runs: list[DagRun]  # oldest first
    lineage_runs: int
    has_notes: bool  # release notes beside the (local) mirror


@dataclass(frozen=True)
class CellsPerClass:
    """Cells per taxonomy class (all loaded datasets) of every published release, oldest first."""

    releases: list[str]
    classes: list[tuple[str, list[int]]]  # (class name, cells in each of ``releases``), by class name


@dataclass(frozen=True)
class Overview:
    mirror: str
    scope: str
    now: datetime
    lag: Lag
    releases: list[ReleaseOverview]  # oldest first
    cells_per_class: CellsPerClass


def overview(engine: Engine, target: str, scope: Scope, mirror_root: Path | None,
             now: datetime | None = None) -> Overview:
    """Everything the page shows; ``target`` names the mirror as its records do, ``mirror_root`` is its
    directory when local (release notes are read there), None for an S3 mirror."""
    now = now or datetime.now(UTC)
    statuses = monitor.release_statuses(engine, target, scope)
    steps = _latest_step_runs(engine)
    dag_runs, lineage_runs = _dag_runs(engine)
    releases = [ReleaseOverview(r, stages(r, steps.get(r.version, {}), now), dag_runs.get(r.version, []),
                                lineage_runs.get(r.version, 0),
                                mirror_root is not None and diff.release_notes_path(mirror_root, r.version).is_file())
                for r in statuses]
    return Overview(target, scope.name, now, monitor.lag(engine), releases, cells_per_class(engine))


def stages(r: ReleaseStatus, steps: dict[str, StepRun], now: datetime) -> list[Stage]:
    """The state of each of STAGES for release ``r``; ``steps``: the latest lineage run of each of its steps."""
    seen = Stage("upstream", DONE, f"seen {ago(r.discovered_at, now)}", r.discovered_at)
    if r.status == "skipped":
        return [seen] + [Stage(name, SKIPPED, "before the history floor") for name in STAGES[1:]]
    return [seen, _mirror_stage(r), *(_step_stage(name, r, steps.get(STAGE_STEPS[name]), now)
                                      for name in ("load", "expression")),
            _checks_stage(r), _publish_stage(r, now)]


def _mirror_stage(r: ReleaseStatus) -> Stage:
    detail = f"{r.files_ok}/{r.files} files, {human_size(r.bytes_ok)} of {human_size(r.bytes)}"
    if r.files_failed:
        return Stage("mirror", FAILED, f"{r.files_failed} failed; {detail}")
    if r.status == "mirroring":
        return Stage("mirror", RUNNING, detail)
    if r.files and r.files_ok == r.files:
        return Stage("mirror", DONE, detail)
    return Stage("mirror", PARTIAL if r.files_ok else WAITING, detail)


def _step_stage(name: str, r: ReleaseStatus, run: StepRun | None, now: datetime) -> Stage:
    """Load or expression: by reference, else the latest run of its lineage step (a load run by other
    means than a step still sets ``loaded_at``)."""
    if r.shares_data_with:
        return Stage(name, DONE, f"by reference: the rows of {r.shares_data_with}")
    if run is None:
        if name == "load" and r.loaded_at:
            return Stage(name, DONE, f"loaded {ago(r.loaded_at, now)}", r.loaded_at)
        return Stage(name, WAITING, "not yet")
    if run.status == "running":
        return Stage(name, RUNNING, f"started {ago(run.started_at, now)}", run.started_at)
    ended = run.finished_at or run.started_at
    if run.status == "failed":
        return Stage(name, FAILED, f"failed {ago(ended, now)}: {run.error or ''}"[:300], ended)
    return Stage(name, DONE, f"{ago(ended, now)}, in {duration(ended - run.started_at)}", ended)


def _checks_stage(r: ReleaseStatus) -> Stage:
    if r.shares_data_with:
        return Stage("checks", DONE, f"those of {r.shares_data_with}")
    if r.checks == "-":
        return Stage("checks", WAITING, "not run")
    passed, run = (int(n) for n in r.checks.split("/"))
    return Stage("checks", DONE if passed == run else FAILED,
                 f"{passed}/{run} passed" if passed == run else f"{run - passed} of {run} failed")


def _publish_stage(r: ReleaseStatus, now: datetime) -> Stage:
    if r.published_at is None:
        return Stage("publish", FAILED if r.status == "failed" else WAITING,
                     "failed: " + (r.last_error or "")[:300] if r.status == "failed" else "not yet")
    after = f", {duration(r.published_at - r.discovered_at)} after upstream" if r.discovered_at else ""
    return Stage("publish", DONE, f"{ago(r.published_at, now)}{after}", r.published_at)


def ago(when: datetime | None, now: datetime) -> str:
    """``when`` relative to ``now``: "40 s ago", "12 min ago", "3 h ago", "5 d ago"; "-" for None."""
    return "-" if when is None else f"{duration(now - when)} ago"


def duration(delta) -> str:
    """A ``timedelta`` in the largest unit that keeps it above 1.5: s, min, h, then d."""
    seconds = max(0.0, delta.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 1.5 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _latest_step_runs(engine: Engine) -> dict[str, dict[str, StepRun]]:
    """release -> step -> the step's latest lineage run."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("""
            SELECT DISTINCT ON (release, step) release, step, status, started_at, finished_at, error
            FROM abc.lineage_run WHERE step = ANY(:steps)
            ORDER BY release, step, started_at DESC, id DESC"""), {"steps": list(STAGE_STEPS.values())}).all()
    out: dict[str, dict[str, StepRun]] = {}
    for row in rows:
        out.setdefault(row.release, {})[row.step] = StepRun(row.status, row.started_at, row.finished_at, row.error)
    return out


def _dag_runs(engine: Engine) -> tuple[dict[str, list[DagRun]], dict[str, int]]:
    """release -> the Airflow DAG runs that recorded its steps, and release -> its lineage runs (all of them)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("""
            SELECT release, dag_id, dag_run_id, min(started_at) AS started_at, count(*) AS runs,
                   array_agg(step ORDER BY started_at, id) AS steps, count(*) FILTER (WHERE status = 'failed') AS failed
            FROM abc.lineage_run
            GROUP BY release, dag_id, dag_run_id
            ORDER BY release, started_at""")).all()
    dag_runs: dict[str, list[DagRun]] = {}
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.release] = counts.get(row.release, 0) + row.runs
        if row.dag_id and row.dag_run_id:
            dag_runs.setdefault(row.release, []).append(DagRun(row.dag_id, row.dag_run_id, row.started_at,
                                                               tuple(dict.fromkeys(row.steps)), row.failed))
    return dag_runs, counts


def cells_per_class(engine: Engine) -> CellsPerClass:
    """Cells per class of every published release, from the counts per cluster (cells with a cluster)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text("""
            SELECT p.release, t.term_name, sum(t.n_cells)::bigint AS n_cells
            FROM abc.published_release p
            JOIN abc.term_cell_count t ON t.release = p.data_release AND t.term_set_name = 'class'
            GROUP BY 1, 2""")).all()
        releases = conn.execute(sa.text("SELECT release FROM abc.published_release ORDER BY release")).scalars().all()
    cells: dict[str, dict[str, int]] = {}
    for row in rows:
        cells.setdefault(row.term_name, {})[row.release] = row.n_cells
    counted = [r for r in releases if any(r in per_release for per_release in cells.values())]
    return CellsPerClass(counted, [(name, [cells[name].get(r, 0) for r in counted]) for name in sorted(cells)])
