"""Reading the lineage record: the source objects behind a relation of a release, a release's runs as
a tree (``abc-mirror lineage``) and as plain values (the releases page). :mod:`etl.lineage` writes the record."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.lineage import RunContext


def sources_of(engine: Engine, relation: str, release: str) -> list[sa.Row]:
    """``abc.lineage_sources``: the source objects behind ``relation`` (table or view) of ``release``."""
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT * FROM abc.lineage_sources(:rel, :r)"),
                            {"rel": relation, "r": release}).all()


def _release_graph(engine: Engine, release: str, target: str | None = None
                   ) -> tuple[sa.Row | None, list[sa.Row], list[sa.Row], list[sa.Row]]:
    """The release's row, its runs (with their standing), what they read and what they wrote."""
    with engine.connect() as conn:
        rel = conn.execute(sa.text("SELECT * FROM abc.release WHERE version = :r"), {"r": release}).first()
        if rel is None:
            return None, [], [], []
        runs = conn.execute(sa.text(f"SELECT run.*, {RUN_STANDING} AS standing FROM abc.lineage_run run "
                                    "WHERE run.release = :r ORDER BY run.started_at, run.id"), {"r": release}).all()
        inputs = conn.execute(sa.text("""
            SELECT i.run_id, i.kind, i.name, rf.size, rf.md5, so.etag, so.last_modified,
                   mo.local_path, mo.verified_at
            FROM abc.lineage_input i JOIN abc.lineage_run run ON run.id = i.run_id AND run.release = :r
            LEFT JOIN abc.release_file rf ON rf.release = :r AND rf.relative_path = i.name
            LEFT JOIN abc.source_object so ON so.relative_path = i.name
            LEFT JOIN LATERAL (SELECT o.local_path, o.verified_at FROM abc.mirror_object o
                               WHERE o.relative_path = i.name AND o.md5 = rf.md5
                                     AND (CAST(:t AS text) IS NULL OR o.target = :t)
                               ORDER BY o.verified_at DESC LIMIT 1) mo ON true
            ORDER BY i.kind, i.name"""), {"r": release, "t": target}).all()
        outputs = conn.execute(sa.text("""
            SELECT o.* FROM abc.lineage_output o JOIN abc.lineage_run run ON run.id = o.run_id AND run.release = :r
            ORDER BY o.table_name, o.partition"""), {"r": release}).all()
    return rel, runs, inputs, outputs


def tree_lines(engine: Engine, release: str, target: str | None = None) -> list[str]:
    """``abc-mirror lineage``: the release's graph as a tree: manifest, the runs behind what readers read
    with what each read and wrote, then one line for each other run (failed, staged, superseded)."""
    rel, runs, inputs, outputs = _release_graph(engine, release, target)
    if rel is None:
        return [f"release {release} is not recorded"]
    out = [f"release {release} ({rel.status})",
           f"└─ manifest {rel.manifest_key} md5 {rel.manifest_md5}, {rel.n_files} files, {rel.total_bytes} bytes"]
    current = [run for run in runs if run.standing == "current"]
    others = [run for run in runs if run.standing != "current"]
    if not runs:
        out.append("   (no step recorded)")
    for i, run in enumerate(current):
        last = i == len(current) - 1 and not others
        out.append(f"   {'└─' if last else '├─'} {_run_line(run, run.status)}")
        children = [_input_line(x) for x in inputs if x.run_id == run.id]
        children += [f"wrote {o.table_name}" + (f" [{o.partition}]" if o.partition else "")
                     + (f": {o.row_count} rows" if o.row_count is not None else "")
                     for o in outputs if o.run_id == run.id]
        pad = "      " if last else "   │  "
        out += [f"{pad}{'└─' if j == len(children) - 1 else '├─'} {line}" for j, line in enumerate(children)]
    if others:
        out.append(f"   └─ {len(others)} other run{'s' if len(others) > 1 else ''}, not behind what readers read:")
        out += [f"      {'└─' if j == len(others) - 1 else '├─'} {_run_line(run, run.standing)}"
                + (f"; error: {run.error}" if run.error else "") for j, run in enumerate(others)]
    return out


def release_runs(engine: Engine, release: str) -> list[dict] | None:
    """The release's lineage runs as plain values (the releases page's JSON), oldest first: who ran each step,
    its standing (current, superseded, staged, not published, failed, running), what it read and wrote.
    None when the release is not recorded."""
    rel, runs, inputs, outputs = _release_graph(engine, release)
    if rel is None:
        return None

    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return [{"run_id": str(run.run_uuid), "step": run.step, "status": run.status, "standing": run.standing,
             "ran_by": RunContext(**_context_fields(run)).ref, "dag_id": run.dag_id, "dag_run_id": run.dag_run_id,
             "code_version": run.code_version, "started_at": when(run.started_at),
             "finished_at": when(run.finished_at), "error": run.error,
             "inputs": [{"kind": x.kind, "name": x.name, "size": x.size, "md5": x.md5}
                        for x in inputs if x.run_id == run.id],
             "outputs": [{"table": o.table_name, "partition": o.partition, "rows": o.row_count}
                         for o in outputs if o.run_id == run.id]}
            for run in runs]


# A run's standing in its release: 'current' (what it wrote is read now), 'superseded' (a run of the same
# step, target and selection published later), 'staged' (held by the live stage, not yet published),
# 'not published' (its stage was dropped), 'failed' or 'running'.
RUN_STANDING = """CASE
    WHEN run.status <> 'succeeded' THEN run.status
    WHEN run.published_at IS NULL THEN CASE WHEN EXISTS (
        SELECT 1 FROM abc.stage WHERE stage.release = run.release AND stage.owner = run.stage_owner
                                  AND stage.started_at = run.stage_started_at
                                  AND stage.state IN ('staging', 'staged')) THEN 'staged' ELSE 'not published' END
    WHEN EXISTS (
        SELECT 1 FROM abc.lineage_run later
        WHERE later.release = run.release AND later.step = run.step AND later.status = 'succeeded'
              AND later.published_at > run.published_at
              AND later.state - '{inputs,code_version}'::text[] = run.state - '{inputs,code_version}'::text[])
        THEN 'superseded'
    ELSE 'current' END"""


def _run_line(run: sa.Row, label: str) -> str:
    return (f"{run.step} [{label}] {RunContext(**_context_fields(run)).ref}; code {run.code_version}; "
            f"{run.started_at:%Y-%m-%d %H:%M:%S}" + (f" → {run.finished_at:%H:%M:%S}" if run.finished_at else ""))


def _context_fields(run: sa.Row) -> dict:
    return {"orchestrator": run.orchestrator, "dag_id": run.dag_id, "dag_run_id": run.dag_run_id,
            "task_id": run.task_id, "try_number": run.try_number, "invocation": run.invocation}


def _input_line(x: sa.Row) -> str:
    if x.kind == "table":
        return f"read table {x.name}"
    line = f"read {x.name}"
    if x.md5:
        line += f" ({x.size} bytes, md5 {x.md5}"
        line += f", etag {x.etag}" if x.etag else ""
        line += f", modified {x.last_modified:%Y-%m-%d %H:%M:%S}" if x.last_modified else ""
        line += ")"
    if x.local_path:
        line += f" → {x.local_path} verified {x.verified_at:%Y-%m-%d %H:%M:%S}"
    return line
