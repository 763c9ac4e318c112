"""The release pipeline's steps, shared by the CLI and the Airflow DAGs, still free of Airflow.

Each stage module does its work (``etl.mirror``, ``etl.load``, ``etl.aggregate``); here every step
of a release is run the way production runs it: recorded as a lineage step (``etl.lineage``),
staged, checked (``etl.monitor``), then published in one transaction, metadata and aggregated
expression together. Mirror batches are planned here from the manifest rows discovery recorded,
so that the plan is the same whichever worker computes it, and small enough in count to stay far
below Airflow's cap on mapped tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import Engine

from etl import abc_atlas_cache, alerts, db, lineage, lineage_report, monitor, quality, reuse, source
from etl.catalog import name_some, release_files_on_disk, selected_release_files
from etl.config import Settings, target_name
from etl.discovery import DiscoveryReport, discover, ensure_release_recorded, load_manifest
from etl.load import METADATA_TABLES, PUBLISHED_TABLES, LoadReport, load_release_metadata, publish_staged_metadata
from etl.manifest import Manifest
from etl.mirror import MirrorFailedError, MirrorReport, check_free_space, mirror_release
from etl.publish import (
    EXPRESSION_TABLES,
    analyze_published,
    claim_stage,
    dag_run_owner,
    end_stages_of,
    fail_stage,
    is_staged,
    publish,
    set_stage,
    stage_lock,
    stage_owner,
    staged_table,
)
from etl.scope import Scope
from etl.source import FetchedObject
from etl.transfer import parse_rate

log = logging.getLogger(__name__)

DEFAULT_BATCH_BYTES = 8 << 30
MAX_BATCHES = 256


class PlanError(ValueError):
    pass


@dataclass(frozen=True)
class PlannedFile:
    key: str
    size: int


def require_local_mirror(settings: Settings) -> None:
    """Refuse a release run whose mirror root is an S3 bucket: verify, load and aggregate read local files.

    Copying a release to another bucket is the mirror's job alone (``abc_mirror_release``,
    ``abc-mirror mirror --target s3://...``); loading reads a local (or shared) mirror directory.
    """
    if not settings.mirror_is_local:
        raise PlanError(f"target {settings.mirror_root} is an S3 bucket, but a release run verifies, loads and "
                        "aggregates the files of a local mirror: give a directory (param target or ABC_MIRROR_ROOT). "
                        "To copy a release to another bucket use the DAG abc_mirror_release or "
                        f"`abc-mirror mirror --release ... --target {settings.mirror_root}`")


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


def discover_releases(settings: Settings) -> DiscoveryReport:
    """The watch step: record new releases and dated directories upstream, then announce the new releases."""
    with db.disposing_engine(settings.database_url) as engine:
        report = discover(source.make_client(settings), settings, engine)
        monitor.announce_new_releases(settings, engine)
    return report


def resolve(settings: Settings, requested: str | None) -> str:
    """A release run's first step: refuse an S3 mirror root (:func:`require_local_mirror`), then
    :func:`resolve_release`."""
    require_local_mirror(settings)
    with db.disposing_engine(settings.database_url) as engine:
        return resolve_release(engine, requested)


def plan_mirror(settings: Settings, release: str, datasets: list[str] | None = None, kinds: list[str] | None = None,
                batch_bytes: int | None = None) -> list[list[str]]:
    """The files of ``release`` to mirror in batches (:func:`plan_batches`), after checking once for the whole
    release that the disk holds what is still to fetch: the batches run side by side and share it."""
    with db.disposing_engine(settings.database_url) as engine:
        files = release_files(engine, release, settings.run_scope, datasets, kinds)
        to_fetch = check_free_space(settings, engine, release, [f.key for f in files])
    batches = plan_batches(files, batch_bytes or DEFAULT_BATCH_BYTES)
    log.info("release %s: %d files, %d bytes (%d still to fetch), %d batches", release, len(files),
             sum(f.size for f in files), to_fetch, len(batches))
    return batches


def verify(settings: Settings, release: str, datasets: list[str] | None = None,
           kinds: list[str] | None = None) -> int:
    """How many selected files of ``release`` are mirrored and verified; raises
    :class:`~etl.catalog.NotMirroredError` naming those that are not."""
    with db.disposing_engine(settings.database_url) as engine:
        files = release_files_on_disk(settings, engine, release, datasets, kinds)
    log.info("release %s: %d files mirrored and verified in %s", release, len(files), settings.mirror_root)
    return len(files)


def load_and_plan(settings: Settings, release: str, datasets: list[str] | None = None,
                  kinds: list[str] | None = None) -> list[dict[str, str]]:
    """A release run's load step: publish by reference when nothing in scope changed, else load the
    metadata (kinds permitting) and return the expression files to aggregate, one item each."""
    if kinds and "metadata" not in kinds:
        return []
    shared = share_if_unchanged(settings, release)
    if shared:
        log.info("release %s: scoped files unchanged since %s; published by reference", release, shared.release)
        return []
    load_metadata(settings, release, datasets)
    if kinds and "expression_matrices" not in kinds:
        return []
    return plan_aggregation(settings, release, datasets)


def plan_aggregation(settings: Settings, release: str, datasets: list[str] | None = None) -> list[dict[str, str]]:
    """The expression files of a loaded ``release`` to aggregate, one item each."""
    from etl import aggregate

    with db.copy_connection(settings.database_url) as conn:
        return aggregate.plan_release(settings, conn, release, datasets)


def publish_staged_release(settings: Settings, release: str) -> bool:
    """:func:`publish_release` on a connection of its own; returns whether it published now."""
    with db.copy_connection(settings.database_url) as conn:
        published_now = publish_release(conn, release)
    log.info("release %s: %s", release, "published" if published_now else "already published")
    return published_now


def release_files(engine: Engine, release: str, scope: Scope, datasets: list[str] | None = None,
                  kinds: list[str] | None = None, normalizations: list[str] | None = None) -> list[PlannedFile]:
    """The manifest's files of ``release`` that ``scope`` mirrors, selected exactly as the mirror selects them."""
    with engine.connect() as conn:
        listed = conn.execute(sa.text("SELECT DISTINCT dataset FROM abc.release_file WHERE release = :r"),
                              {"r": release}).scalars().all()
        rows = selected_release_files(conn, release, datasets, kinds, normalizations, scope.mirrors)
    if not scope.holds_data(listed):
        raise PlanError(f"release {release} holds no dataset the warehouse loads ({', '.join(scope.dataset_patterns)}):"
                        " nothing to process (a release before the consensus data; `abc-mirror mirror --scope atlas`"
                        " still copies it)")
    if not rows:
        raise PlanError(f"release {release}: no file of scope {scope.name} matches datasets={datasets or 'all'} "
                        f"kinds={kinds or 'all'}")
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


def mirror(settings: Settings, release: str, *, keys: list[str] | None = None, datasets: list[str] | None = None,
           kinds: list[str] | None = None, normalizations: list[str] | None = None,
           **options: object) -> MirrorReport:
    """Mirror the selected files of ``release`` as the lineage step ``mirror``.

    The step's input is the release manifest and its output the ``abc.mirror_object`` records: each
    file's key, MD5, local path and verification time are there already, which is what
    ``abc.lineage_sources`` joins, so a no-op re-sync of a large release stays cheap. Raises
    :class:`MirrorFailedError` naming the failed files (the report is its ``report``), after
    recording the step as failed; a dry run is not a step and only reports. Once every selected
    file is verified, a local mirror's ``abc_atlas_access`` bookkeeping is rewritten
    (:mod:`etl.abc_atlas_cache`), so the client opens the mirror as its cache.
    """
    engine = db.make_engine(settings.database_url)
    try:
        if options.get("dry_run"):
            return mirror_release(settings, engine, release, keys=keys, datasets=datasets, kinds=kinds,
                                  normalizations=normalizations, **options)
        selection = {"keys": sorted(keys) if keys is not None else None, "datasets": _sorted(datasets),
                     "kinds": _sorted(kinds), "normalizations": _sorted(normalizations),
                     "scope": settings.run_scope.name}
        manifest_key, fetched = _release_manifest(settings, engine, release)
        with lineage.step(engine, release=release, step="mirror", inputs=[manifest_key],
                          bucket=settings.bucket, target=target_name(settings.mirror_root), selection=selection) as s:
            report = mirror_release(settings, engine, release, keys=keys, datasets=datasets, kinds=kinds,
                                    normalizations=normalizations, fetched=fetched, **options)
            s.wrote("abc.mirror_object", partition=release, rows=report.ok)
            if report.failed:
                raise MirrorFailedError(f"release {release}: {len(report.failed)} of {report.selected} files "
                                        f"failed: {name_some(sorted(report.failed))}", report)
        written = abc_atlas_cache.write_client_cache(settings, engine)
        if written is not None:
            log.info("%s", written.line())
        return report
    finally:
        engine.dispose()


def _sorted(values: Sequence[str] | None) -> list[str] | None:
    return sorted(values) if values else None


def _release_manifest(settings: Settings, engine: Engine,
                  release: str) -> tuple[str, tuple[FetchedObject, Manifest] | None]:
    """The release's manifest key, recording the release first (from its manifest) when discovery has not; and
    the manifest so fetched, if it was (the mirror does not fetch it again)."""
    with engine.connect() as conn:
        key = conn.execute(sa.text("SELECT manifest_key FROM abc.release WHERE version = :r"), {"r": release}).scalar()
    if key is not None:
        return key, None
    fetched, manifest = load_manifest(source.make_client(settings), settings, release)
    ensure_release_recorded(engine, fetched, manifest)
    return fetched.key, (fetched, manifest)


def mirror_task(settings: Settings, release: str, max_bandwidth: str = "", **options: object) -> dict:
    """An orchestrator's mirror step: run (``max_bandwidth`` as the DAG param gives it, e.g. ``50M``), print the
    report, return a summary (raise naming failed files)."""
    try:
        report = mirror(settings, release, progress=False, max_bandwidth=parse_rate(max_bandwidth), **options)
    except MirrorFailedError as exc:
        print("\n".join(exc.report.lines()))
        raise
    print("\n".join(report.lines()))
    return {"release": release, "target": report.target, "files": report.selected, "ok": report.ok,
            "fetched": report.fetched, "copied": report.copied, "skipped": report.skipped,
            "bytes_fetched": report.bytes_fetched}


def share_if_unchanged(settings: Settings, release: str) -> reuse.Shared | None:
    """Publish ``release`` by reference when its scoped files are a published release's (:mod:`etl.reuse`)."""
    with db.disposing_engine(settings.database_url) as engine:
        return reuse.publish_by_reference(settings, engine, release)


def load_metadata(settings: Settings, release: str, datasets: list[str] | None = None) -> LoadReport:
    """Stage the metadata of ``release`` from its verified mirror files, as the lineage step ``load_metadata``."""
    scope = settings.run_scope
    scope.require_loaders(datasets)
    engine = db.make_engine(settings.database_url)
    try:
        files = release_files_on_disk(settings, engine, release, datasets=datasets, kinds=["metadata"],
                                      keep=scope.feeds_warehouse)
        with lineage.step(engine, release=release, step="load_metadata", inputs=sorted(files),
                          bucket=settings.bucket, selection={"datasets": _sorted(datasets)}, staged=True) as s:
            report = load_release_metadata(engine, release, files, datasets, publish_now=False)
            for table, rows in report.table_rows.items():
                s.wrote(f"abc.{table}", partition=release, rows=rows)
        return report
    finally:
        engine.dispose()


def stage_expression(settings: Settings, release: str, done: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """Merge the aggregated files' partials and stage the expression tables, as the lineage step ``aggregate``.

    ``done`` are :func:`etl.aggregate.aggregate_planned_file` results, each with the bucket ``key`` of its
    matrix, so lineage leads from every expression table to the h5ad files and, through the cell
    and taxonomy tables the step read, to the metadata files.
    """
    from etl import aggregate

    engine = db.make_engine(settings.database_url)
    try:
        with lineage.step(engine, release=release, step="aggregate", inputs=sorted({d["key"] for d in done}),
                          input_tables=["abc.cell", "abc.cell_cluster_membership", "abc.library",
                                        "abc.cluster_membership"], bucket=settings.bucket, staged=True) as s:
            entries = aggregate.stage_items(settings, release, done)
            with db.copy_connection(settings.database_url) as conn:
                for table in EXPRESSION_TABLES:
                    rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                        staged_table(table, release))).fetchone()[0]
                    s.wrote(f"abc.{table}", partition=release, rows=rows)
        return entries
    finally:
        engine.dispose()


def aggregate_release(settings: Settings, release: str, datasets: Sequence[str] | None = None,
                      work_dir: Path | None = None, chunk_cells: int | None = None) -> dict[str, int]:
    """The whole aggregation in one process (the CLI's): plan, aggregate every file, stage."""
    from etl import aggregate

    with db.copy_connection(settings.database_url) as conn:
        items = aggregate.plan_release(settings, conn, release, datasets)
    work = Path(work_dir) if work_dir else aggregate.default_work_dir(settings, release)
    return stage_expression(settings, release, [aggregate_item(settings, release, item, work, chunk_cells)
                                                for item in items])


def aggregate_item(settings: Settings, release: str, item: Mapping[str, str], work_dir: Path | None = None,
                   chunk_cells: int | None = None) -> dict[str, str]:
    """One planned file aggregated into its partial (or an earlier release's partial of the same inputs
    reused) in ``work_dir`` (default: beside the mirror); the result keeps the file's bucket key for lineage."""
    from etl import aggregate

    work_dir = work_dir or aggregate.default_work_dir(settings, release)
    engine = db.make_engine(settings.database_url)
    try:
        earlier = [aggregate.partial_path(aggregate.default_work_dir(settings, other), item)
                   for other in reuse.earlier_releases(engine, release)]
    finally:
        engine.dispose()
    done = aggregate.aggregate_planned_file(settings, release, item, work_dir,
                                    chunk_cells or aggregate.DEFAULT_CHUNK_CELLS, earlier)
    return {**done, "key": item["key"]}


@contextmanager
def hold_release(settings: Settings, release: str) -> Iterator[None]:
    """Hold ``release``'s stage lock around several steps of one process (a CLI command), so that a
    second run of the release waits for the whole of this one instead of interleaving with it."""
    with db.copy_connection(settings.database_url) as conn, stage_lock(conn, release):
        yield


def end_failed_run(settings: Settings, dag_id: str, run_id: str) -> list[str]:
    """A DAG run ended failed: fail the stages it leaves live (dropping their tables), so that they are
    never read as their release; a run cleared afterwards loads afresh. Returns those releases."""
    with db.copy_connection(settings.database_url) as conn:
        ended = end_stages_of(conn, dag_run_owner(dag_id, run_id), f"DAG run {dag_id} {run_id} failed")
    for release in ended:
        log.warning("release %s: the stage of failed DAG run %s %s dropped", release, dag_id, run_id)
    return ended


def validate(settings: Settings, release: str) -> list[quality.CheckResult]:
    """Run and store the data-quality checks of the staged release; raise (after alerting) when one fails.

    A failed check fails the stage: its staging tables are dropped (the release keeps what is
    published), and checking this run's failed stage again fails again instead of checking the
    published rows in its place.
    """
    engine = db.make_engine(settings.database_url)
    try:
        if reuse.shared_with(engine, release):
            return []  # published by reference: the shared release's rows passed their checks
        with db.copy_connection(settings.database_url) as conn:
            stage = conn.execute("SELECT owner, state, error FROM abc.stage WHERE release = %s",
                                 (release,)).fetchone()
        if stage is not None and stage[1] == "failed" and stage[0] == stage_owner():
            raise quality.QualityCheckFailed(f"release {release}: this run's stage failed and was dropped "
                                             f"({stage[2]}); load the release again")
        results = monitor.check_release(settings, engine, release)
    finally:
        engine.dispose()
    try:
        quality.require_passing(results, release)
    except quality.QualityCheckFailed as exc:
        with db.copy_connection(settings.database_url) as conn:
            fail_stage(conn, release, str(exc))
        raise
    return results


def validate_and_publish(settings: Settings, release: str) -> bool:
    """Check what is staged for ``release``, then publish it; returns whether it published now."""
    validate(settings, release)
    with db.copy_connection(settings.database_url) as conn:
        return publish_release(conn, release)


def publish_release(conn: psycopg.Connection, release: str) -> bool:
    """Publish what is staged of ``release``, metadata and expression, in one transaction.

    A no-op when nothing is staged and the release is already published, which makes the publish
    task safe to clear and run again: the first run moved the staging tables into place, a second
    finds nothing staged. Returns whether it published now. Runs under the release's stage lock
    and only for the run whose stage it is (``etl.publish.claim_stage``); when publication fails,
    the stage is dropped and the release keeps its published partitions.
    """
    with stage_lock(conn, release):
        claim_stage(conn, release)
        try:
            published = _publish_staged(conn, release)
        except PlanError:
            raise
        except Exception as exc:
            fail_stage(conn, release, f"publication failed: {exc}")
            raise
        analyze_published(conn, published)
    return bool(published)


def _publish_staged(conn: psycopg.Connection, release: str) -> list[str]:
    """Publish what is staged in one transaction; the tables published."""
    with conn.transaction():
        status = conn.execute("SELECT status FROM abc.release WHERE version = %s FOR UPDATE", (release,)).fetchone()
        if status is None:
            raise PlanError(f"release {release} is not recorded in abc.release")
        metadata = is_staged(conn, METADATA_TABLES[-1], release)
        expression = is_staged(conn, EXPRESSION_TABLES[-1], release)
        if not metadata and not expression:
            if status[0] == "published":
                set_stage(conn, release, "published")
                return []
            raise PlanError(f"release {release} has nothing staged to publish (status {status[0]})")
        lineage.publish_stage_runs(conn, release)
        if metadata:
            publish_staged_metadata(conn, release)
        if expression:
            publish(conn, release, EXPRESSION_TABLES)
        set_stage(conn, release, "published")
    return (PUBLISHED_TABLES if metadata else []) + (EXPRESSION_TABLES if expression else [])


class LineageGap(RuntimeError):
    """A published relation of a release has no recorded source objects behind it."""


def check_lineage(settings: Settings, release: str) -> dict[str, int]:
    """Source objects behind each published relation of ``release``; raise when one has none.

    Asks ``abc.lineage_sources`` (the auditor's query, docs/lineage.md) for the cell table and,
    when the release has aggregated expression, ``abc.expression_by_cluster``, and prints the
    release's lineage tree.
    """
    engine = db.make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            has_expression = conn.execute(sa.text(
                "SELECT EXISTS (SELECT 1 FROM abc.expression_group WHERE release = "
                "(SELECT data_release FROM abc.published_release WHERE release = :r))"), {"r": release}).scalar_one()
        relations = ["abc.cell"] + (["abc.expression_by_cluster"] if has_expression else [])
        found = {relation: len({row.source_key for row in lineage_report.sources_of(engine, relation, release)})
                 for relation in relations}
        print("\n".join(lineage_report.tree_lines(engine, release, target_name(settings.mirror_root))))
    finally:
        engine.dispose()
    missing = [relation for relation, n in found.items() if n == 0]
    if missing:
        raise LineageGap(f"release {release}: no source objects recorded behind {', '.join(missing)}")
    return found


def announce_published(settings: Settings, release: str) -> dict:
    """After publishing: diff against the previous release (stored, release notes beside the mirror), then alert.

    Safe to retry or clear: the diff and the release notes are replaced by the same content, and the
    ``published`` alert goes out once per publication of the release (its ``published_at``): not again
    once delivered, and not recorded twice when no webhook is configured. A republished release is
    announced again; an alert the webhook did not take is tried again on the next run.
    """
    engine = db.make_engine(settings.database_url)
    try:
        notes = monitor.record_diff(settings, engine, release)
        with engine.connect() as conn:
            previous = conn.execute(sa.text("SELECT old_release, summary FROM abc.release_diff WHERE new_release = :r "
                                            "ORDER BY old_release DESC LIMIT 1"), {"r": release}).first()
            published_at = conn.execute(sa.text("SELECT published_at FROM abc.release WHERE version = :r"),
                                        {"r": release}).scalar()
        details = {"previous_release": previous.old_release if previous else None,
                   "shares_data_with": reuse.shared_with(engine, release),
                   "published_at": published_at.isoformat() if published_at else None,
                   "diff": previous.summary if previous else None,
                   "release_notes": [str(p) for p in notes] if notes else []}
        alerts.send_once(alerts.Alert("published", f"release {release} published", release, details),
                         settings.webhook_url, engine, {"published_at": details["published_at"]})
    finally:
        engine.dispose()
    return details
