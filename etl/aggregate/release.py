"""A mirrored, loaded release aggregated: one work item per (dataset, matrix file), each item's
partial (reused where its inputs are unchanged), then all partials merged and staged; the CLI
and the DAGs run these steps through ``etl.pipeline``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import pandas as pd
import psycopg
from psycopg import sql

from etl import db
from etl.aggregate import warehouse
from etl.aggregate.h5ad import normalization_of
from etl.aggregate.stats import PARTIAL_FORMAT, AggregationError, partial_inputs
from etl.aggregate.streaming import DEFAULT_CHUNK_CELLS, aggregate_file
from etl.catalog import cell_assignments, release_files_on_disk
from etl.config import Settings
from etl.publish import staged_or_published
from etl.reuse import place_copy

log = logging.getLogger(__name__)


def plan_release(settings: Settings, conn: psycopg.Connection, release: str,
                 datasets: Sequence[str] | None = None) -> list[dict[str, str]]:
    """One work item per (metadata dataset, mirrored h5ad file holding its cells), ``-log2`` preferred.

    A cell's ``feature_matrix_label`` names its file's tag; the consensus WMB cells live in the
    WMB-10Xv2/v3 matrices, so items are planned from the loaded cells, not from directory names.
    """
    labels = conn.execute(sql.SQL(
        "SELECT DISTINCT dataset, feature_matrix_label FROM {} WHERE release = %s "
        "AND feature_matrix_label IS NOT NULL").format(staged_or_published(conn, "cell", release)),
        (release,)).fetchall()
    wanted = {(d, label) for d, label in labels if not datasets or d in datasets}
    missing_datasets = set(datasets or []) - {d for d, _ in wanted}
    if missing_datasets or not wanted:
        raise AggregationError(f"release {release}: no loaded cells for datasets "
                               f"{sorted(missing_datasets) or 'any'}; load the release's metadata first")
    engine = db.make_engine(settings.database_url)
    try:
        files = release_files_on_disk(settings, engine, release, kinds=["expression_matrices"],
                                      keep=settings.run_scope.feeds_warehouse)
    finally:
        engine.dispose()
    by_tag: dict[str, tuple[str, Path]] = {}
    for key, path in files.items():
        if not key.endswith(".h5ad"):
            continue
        tag = PurePosixPath(key).name.rsplit("-", 1)[0]
        if tag not in by_tag or normalization_of(path) == "log2":
            by_tag[tag] = (key, path)
    unmatched = sorted(f"{d}:{label}" for d, label in wanted if label not in by_tag)
    if unmatched:
        raise AggregationError(f"release {release}: no mirrored matrix for feature_matrix_label {unmatched[:5]}")
    return [{"dataset": d, "key": by_tag[label][0], "path": str(by_tag[label][1])} for d, label in sorted(wanted)]


def default_work_dir(settings: Settings, release: str) -> Path:
    """Partials go beside the mirror, so every worker that reads the mirror sees them."""
    return settings.mirror_path / ".abc-work" / release / "aggregate"


def partial_path(work_dir: Path, item: Mapping[str, str]) -> Path:
    """Where the partial of a planned item goes: ``<work_dir>/<dataset>/<file name>.npz``."""
    return Path(work_dir) / item["dataset"] / (PurePosixPath(item["key"]).name + ".npz")


def inputs_digest(matrix_md5: str, assignments: pd.DataFrame, taxonomy: pd.DataFrame) -> str:
    """What a file's partial depends on, as one digest: the statistics' definition (PARTIAL_FORMAT), the
    matrix's bytes (MD5), the assignments of its cells and the taxonomy. Equal digests give equal
    partials, so a partial can be reused."""
    digest = hashlib.sha256(f"{PARTIAL_FORMAT}:{matrix_md5}".encode())
    for frame in (assignments, taxonomy):
        ordered = frame.sort_values(list(frame.columns), kind="stable").reset_index(drop=True)
        digest.update(pd.util.hash_pandas_object(ordered, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def aggregate_planned_file(settings: Settings, release: str, item: Mapping[str, str], work_dir: Path,
                   chunk_cells: int = DEFAULT_CHUNK_CELLS, earlier: Sequence[Path] = ()) -> dict[str, str]:
    """Aggregate one planned file for one dataset into its partial; safe to re-run (rewritten whole).

    Only the file's own cells are read from the warehouse (by ``feature_matrix_label``). When one of
    the ``earlier`` partials (other releases' partials of this file) was written from the same inputs
    (:func:`inputs_digest`), it is linked into place instead of reading the matrix again.
    """
    out = partial_path(work_dir, item)
    label = PurePosixPath(item["key"]).name.rsplit("-", 1)[0]
    with db.copy_connection(settings.database_url) as conn:
        assignments = cell_assignments(conn, release, item["dataset"], label)
        taxonomy = warehouse.release_taxonomy(conn, release)
        md5 = conn.execute("SELECT md5 FROM abc.release_file WHERE release = %s AND relative_path = %s",
                           (release, item["key"])).fetchone()
    if md5 is None:
        raise AggregationError(f"release {release}: {item['key']} is not a file of its manifest")
    inputs = inputs_digest(md5[0], assignments, taxonomy)
    for candidate in earlier:
        if candidate.is_file() and partial_inputs(candidate) == inputs:
            place_copy(candidate, out)
            log.info("%s (%s): inputs unchanged; partial %s reused", item["key"], item["dataset"], candidate)
            return {"dataset": item["dataset"], "partial": str(out), "reused": str(candidate)}
    aggregate_file(Path(item["path"]), assignments, taxonomy, out, chunk_cells=chunk_cells, inputs=inputs)
    return {"dataset": item["dataset"], "partial": str(out)}


def stage_items(settings: Settings, release: str, done: Sequence[Mapping[str, str]]) -> dict[str, int]:
    """Merge the partials of the aggregated items per dataset and stage the expression tables."""
    partials: dict[str, list[Path]] = {}
    for item in done:
        partials.setdefault(item["dataset"], []).append(Path(item["partial"]))
    with db.copy_connection(settings.database_url) as conn:
        return warehouse.merge_and_stage(conn, release, partials, warehouse.release_taxonomy(conn, release))
