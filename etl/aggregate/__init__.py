"""Expression aggregated over groups of cells, streamed out of core from the release's h5ad files.

Per metadata dataset, grouping, group and gene we keep four additive statistics of the log2
expression: cells in the group, cells with non-zero expression, sum and sum of squares. Mean,
variance and fraction expressing follow from them, and because they are additive a file's
result merges with the other files' by summing, and coarser groupings roll up from finer ones.

Two groupings are accumulated from the matrices (the *base* groupings): ``cluster`` and
``region_subclass``; ``supertype``, ``subclass`` and ``class`` are rolled up from ``cluster``.

The modules, each one job, in the order the data passes them:

- ``kernels``: the numba kernels (bitmaps and slots, rows read and summed per group);
- ``h5ad``: reading a matrix's CSR X (checked, in chunks or at its rows' byte offsets);
- ``streaming``: one matrix into its base groupings' statistics, in group or in file order;
- ``stats``: groupings and taxonomy, the statistics, their partial files, merge and roll-up;
- ``warehouse``: merged statistics staged (binary COPY) and published;
- ``release``: a loaded release planned into work items, each aggregated, all staged.

This package exports what the rest of abc-mirror uses; the submodules' other public names are
for each other, the tests and the benchmarks.
"""

from etl.aggregate.h5ad import normalization_of
from etl.aggregate.release import (
    aggregate_planned_file,
    default_work_dir,
    partial_path,
    plan_release,
    stage_items,
)
from etl.aggregate.stats import (
    GROUPINGS,
    REGION_SUBCLASS,
    TAXONOMY_LEVELS,
    AggregationError,
    ClusterTaxonomy,
    FileStats,
    GroupStats,
    dataset_stats,
    load_partial,
    save_partial,
)
from etl.aggregate.streaming import DEFAULT_CHUNK_CELLS, aggregate_file, aggregate_matrix
from etl.aggregate.warehouse import merge_and_publish, merge_and_stage, release_taxonomy

__all__ = [
    "DEFAULT_CHUNK_CELLS",
    "GROUPINGS",
    "REGION_SUBCLASS",
    "TAXONOMY_LEVELS",
    "AggregationError",
    "ClusterTaxonomy",
    "FileStats",
    "GroupStats",
    "aggregate_file",
    "aggregate_matrix",
    "aggregate_planned_file",
    "dataset_stats",
    "default_work_dir",
    "load_partial",
    "merge_and_publish",
    "merge_and_stage",
    "normalization_of",
    "partial_path",
    "plan_release",
    "release_taxonomy",
    "save_partial",
    "stage_items",
]
