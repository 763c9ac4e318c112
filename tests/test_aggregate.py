"""Aggregated expression: every statistic against scanpy / pandas on the dense matrix, and publication."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import psycopg
import pytest
import scanpy as sc
import scipy.sparse as sp

from etl import aggregate, db
from etl.aggregate import AggregationError, ClusterTaxonomy, h5ad, kernels
from etl.fixtures import CONSENSUS_WMB, MACOSKO, OLD_RELEASE, TAXONOMY, WMB_MATRIX_VERSION, GeneratedBucket

RTOL = 1e-6
RELEASE = OLD_RELEASE


def _membership(bucket: GeneratedBucket) -> pd.DataFrame:
    return pd.read_csv(bucket.bucket_dir / "metadata" / TAXONOMY / OLD_RELEASE
                       / "cluster_to_cluster_annotation_membership.csv")


def _assignments(bucket: GeneratedBucket, dataset: str) -> pd.DataFrame:
    """Cells of a dataset with their cluster (the taxonomy's cell_to_cluster_membership.csv) and region
    (their library's, library.csv), as the real consensus release keeps them."""
    metadata = bucket.bucket_dir / "metadata"
    cells = pd.read_csv(metadata / dataset / OLD_RELEASE / "cell_metadata.csv",
                        usecols=["cell_label", "library_label", "feature_matrix_label"])
    library = pd.read_csv(metadata / dataset / OLD_RELEASE / "library.csv",
                          usecols=["library_label", "region_of_interest_acronym"])
    cluster = pd.read_csv(metadata / TAXONOMY / OLD_RELEASE / "cell_to_cluster_membership.csv")
    cells = cells.merge(cluster, on="cell_label", how="left").merge(library, on="library_label", how="left")
    return cells[["cell_label", "cluster_alias", "region_of_interest_acronym", "feature_matrix_label"]]


def _matrices(bucket: GeneratedBucket, dataset: str, normalization: str) -> list[Path]:
    if dataset == MACOSKO:
        directories = [bucket.bucket_dir / "expression_matrices" / MACOSKO / OLD_RELEASE]
    else:
        directories = [bucket.bucket_dir / "expression_matrices" / d / WMB_MATRIX_VERSION
                       for d in ("WMB-10Xv2", "WMB-10Xv3")]
    return sorted(p for d in directories for p in d.glob(f"*-{normalization}.h5ad"))


@pytest.fixture(scope="module")
def macosko_partials(generated_bucket, tmp_path_factory) -> list[Path]:
    work = tmp_path_factory.mktemp("partials")
    assignments = _assignments(generated_bucket, MACOSKO)
    taxonomy = _membership(generated_bucket)
    # A small chunk makes every file span several chunks.
    return [aggregate.aggregate_file(path, assignments, taxonomy, work / f"{path.stem}.npz", chunk_cells=97)
            for path in _matrices(generated_bucket, MACOSKO, "log2")]


@pytest.fixture(scope="module")
def reference(generated_bucket) -> ad.AnnData:
    """The Macosko log2 matrices in memory, QC'd-out cells dropped, with taxonomy and region columns."""
    adata = ad.concat([ad.read_h5ad(p) for p in _matrices(generated_bucket, MACOSKO, "log2")], merge="same")
    cells = _assignments(generated_bucket, MACOSKO).set_index("cell_label")
    adata = adata[adata.obs_names.isin(cells.index)].copy()
    taxonomy = ClusterTaxonomy(_membership(generated_bucket))
    alias = cells.loc[adata.obs_names, "cluster_alias"].astype(str).to_numpy()
    for level in aggregate.TAXONOMY_LEVELS:
        adata.obs[level] = pd.Categorical(taxonomy.labels[level].loc[alias].to_numpy())
    adata.obs["region"] = cells.loc[adata.obs_names, "region_of_interest_acronym"].to_numpy()
    return adata


def _as_frame(stats: aggregate.GroupStats) -> dict[str, pd.DataFrame]:
    """Dense groups x genes frames of every statistic, indexed like scanpy's output."""
    keys = stats.groups["group_label"]
    if stats.grouping == aggregate.REGION_SUBCLASS:
        keys = stats.groups["region_of_interest_acronym"] + "|" + keys
    frames = {name: pd.DataFrame(stats.matrix(name).toarray(), index=keys.to_numpy())
              for name in ("n_nonzero", "sum", "sum_sq")}
    n_cells = stats.groups["n_cells"].to_numpy()[:, None]
    frames["mean"] = frames["sum"] / n_cells
    frames["var"] = (frames["sum_sq"] - frames["sum"] ** 2 / n_cells) / (n_cells - 1)
    frames["n_cells"] = pd.DataFrame(n_cells, index=keys.to_numpy())
    return frames


@pytest.mark.parametrize("level", aggregate.TAXONOMY_LEVELS)
def test_taxonomy_levels_match_scanpy(macosko_partials, reference, generated_bucket, level):
    files = [aggregate.load_partial(p) for p in macosko_partials]
    (stats,) = aggregate.dataset_stats(files, _membership(generated_bucket), groupings=[level])
    ours = _as_frame(stats)
    expected = sc.get.aggregate(reference, by=level, func=["sum", "mean", "count_nonzero"])
    order = expected.obs_names
    assert sorted(ours["sum"].index) == sorted(order)
    for ours_name, theirs in (("sum", "sum"), ("mean", "mean"), ("n_nonzero", "count_nonzero")):
        np.testing.assert_allclose(ours[ours_name].loc[order].to_numpy(), expected.layers[theirs],
                                   rtol=RTOL, atol=1e-12, err_msg=f"{level} {ours_name}")
    # scanpy squares float32 data in float32 (its variance is off by up to 1e-2 relative): use float64 pandas.
    dense = pd.DataFrame(reference.X.toarray().astype(np.float64))
    grouped = (dense ** 2).groupby(reference.obs[level].to_numpy())
    np.testing.assert_allclose(ours["sum_sq"].loc[order].to_numpy(), grouped.sum().loc[order].to_numpy(),
                               rtol=RTOL, atol=1e-12)
    variance = dense.groupby(reference.obs[level].to_numpy()).var(ddof=1).loc[order].to_numpy()
    np.testing.assert_allclose(ours["var"].loc[order].to_numpy(), variance, rtol=RTOL, atol=1e-9)
    np.testing.assert_array_equal(ours["n_cells"].loc[order].to_numpy().ravel(),
                                  reference.obs[level].value_counts().loc[order].to_numpy())


def test_region_subclass_matches_pandas_groupby(macosko_partials, reference, generated_bucket):
    files = [aggregate.load_partial(p) for p in macosko_partials]
    (stats,) = aggregate.dataset_stats(files, _membership(generated_bucket),
                                       groupings=[aggregate.REGION_SUBCLASS])
    ours = _as_frame(stats)
    dense = pd.DataFrame(reference.X.toarray().astype(np.float64))
    key = (reference.obs["region"].astype(str) + "|" + reference.obs["subclass"].astype(str)).to_numpy()
    grouped = dense.groupby(key)
    assert reference.obs["region"].nunique() > 1 and len(grouped) > reference.obs["subclass"].nunique()
    expected = {"sum": grouped.sum(), "mean": grouped.mean(), "var": grouped.var(ddof=1),
                "n_nonzero": (dense != 0).groupby(key).sum(), "sum_sq": (dense ** 2).groupby(key).sum()}
    for name, frame in expected.items():
        np.testing.assert_allclose(ours[name].loc[frame.index].to_numpy(), frame.to_numpy(),
                                   rtol=RTOL, atol=1e-12, err_msg=name)
    assert ours["n_cells"].loc[grouped.size().index].to_numpy().ravel().tolist() == grouped.size().tolist()


def test_qc_dropped_cells_are_excluded(macosko_partials, generated_bucket):
    listed = set(_assignments(generated_bucket, MACOSKO)["cell_label"])
    for partial_path, matrix in zip(macosko_partials, _matrices(generated_bucket, MACOSKO, "log2"), strict=True):
        file_stats = aggregate.load_partial(partial_path)
        labels = ad.read_h5ad(matrix, backed="r").obs_names
        in_metadata = int(labels.isin(listed).sum())
        assert 0 < in_metadata < len(labels)  # the fixture holds cells the metadata dropped
        assert file_stats.n_cells_aggregated == in_metadata
        assert file_stats.stats["cluster"].groups["n_cells"].sum() == in_metadata
        assert file_stats.stats[aggregate.REGION_SUBCLASS].groups["n_cells"].sum() == in_metadata


@pytest.mark.parametrize("group_order", [True, False])
def test_raw_counts_give_the_log2_statistics(generated_bucket, macosko_partials, group_order):
    """Where only -raw exists, log2(CPM+1) is computed from the counts (in the kernel in group
    order, per chunk in file order): same result as the -log2 file."""
    raw = _matrices(generated_bucket, MACOSKO, "raw")[0]
    from_raw = aggregate.aggregate_matrix(raw, _assignments(generated_bucket, MACOSKO), _membership(generated_bucket),
                                          chunk_cells=250, group_order=group_order)
    from_log2 = aggregate.load_partial(macosko_partials[0])
    assert from_raw.normalization == "raw"
    for grouping in ("cluster", aggregate.REGION_SUBCLASS):
        a, b = from_raw.stats[grouping], from_log2.stats[grouping]
        np.testing.assert_array_equal(a.indptr, b.indptr)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.n_nonzero, b.n_nonzero)
        np.testing.assert_allclose(a.sum, b.sum, rtol=RTOL)
        np.testing.assert_allclose(a.sum_sq, b.sum_sq, rtol=RTOL)


def test_chunk_size_does_not_change_the_result(generated_bucket, macosko_partials):
    path = _matrices(generated_bucket, MACOSKO, "log2")[0]
    one_chunk = aggregate.aggregate_matrix(path, _assignments(generated_bucket, MACOSKO), _membership(generated_bucket),
                                           chunk_cells=1_000_000)
    small = aggregate.load_partial(macosko_partials[0])
    for grouping, stats in one_chunk.stats.items():
        np.testing.assert_array_equal(stats.indices, small.stats[grouping].indices)
        np.testing.assert_allclose(stats.sum, small.stats[grouping].sum, rtol=1e-12)


def test_threads_do_not_change_the_result(generated_bucket):
    """Threads take disjoint runs of groups, each in row order: the same sums, bit for bit."""
    import numba

    path = _matrices(generated_bucket, MACOSKO, "log2")[0]
    runs = []
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            runs.append(aggregate.aggregate_matrix(path, _assignments(generated_bucket, MACOSKO),
                                                   _membership(generated_bucket), chunk_cells=50))
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    one, many = runs
    for grouping, stats in one.stats.items():
        np.testing.assert_array_equal(stats.indptr, many.stats[grouping].indptr)
        np.testing.assert_array_equal(stats.indices, many.stats[grouping].indices)
        np.testing.assert_array_equal(stats.sums, many.stats[grouping].sums)
        np.testing.assert_array_equal(stats.nonzero, many.stats[grouping].nonzero)


@pytest.mark.parametrize("layout", ["chunked", "contiguous", "gzip"])
def test_chunks_are_the_rows_of_x(generated_bucket, tmp_path, layout):
    """Unfiltered X is read straight from the file's bytes, filtered X through HDF5: same rows."""
    path = _matrices(generated_bucket, MACOSKO, "log2")[0]
    expected = ad.read_h5ad(path).X.tocsr()
    if layout != "chunked":
        path = tmp_path / path.name
        ad.AnnData(expected).write_h5ad(path, compression="gzip" if layout == "gzip" else None)
        if layout == "contiguous":  # anndata writes chunked; rewrite X's arrays without chunks
            with h5py.File(path, "a") as store:
                for name in ("indices", "data"):
                    values = store["X"][name][:]
                    del store["X"][name]
                    store["X"].create_dataset(name, data=values)
    with h5py.File(path, "r") as store:
        direct = h5ad.FileRanges.of(store["X"]["data"], -1)
    assert (direct is None) == (layout == "gzip")
    buffers = {}
    for with_data in (False, True):  # the second pass reuses the first one's buffers
        with h5py.File(path, "r", rdcc_nbytes=0) as store:
            rows = [sp.csr_matrix((data.copy() if with_data else np.ones(len(indices)), indices.copy(),
                                   indptr.copy()), shape=(len(indptr) - 1, expected.shape[1]))
                    for _, indptr, indices, data in h5ad.chunks(
                        store, store["X"]["indptr"][:].astype(np.int64), 37, with_data, buffers)]
        reference = expected if with_data else expected.astype(bool).astype(float)
        assert (sp.vstack(rows) != reference).nnz == 0
    if direct is not None:  # rows in any order (as the group-ordered path reads them), at their file offsets
        shuffled = np.random.default_rng(3).permutation(expected.shape[0])
        with h5py.File(path, "r") as store:
            fd = os.open(path, os.O_RDONLY)
            try:
                ranges = {name: h5ad.FileRanges.of(store["X"][name], fd) for name in ("indices", "data")}
                indptr = store["X"]["indptr"][:].astype(np.int64)
                lengths = np.diff(indptr)[shuffled]
                out = {name: [] for name in ranges}
                for name, r in ranges.items():
                    buffer = np.empty(lengths.max(), r.dtype)
                    for row in shuffled:
                        assert kernels.read_row(r.reader, indptr, row, buffer) == -1
                        out[name].append(buffer[:indptr[row + 1] - indptr[row]].copy())
            finally:
                os.close(fd)
        read = sp.csr_matrix((np.concatenate(out["data"]), np.concatenate(out["indices"]),
                              np.concatenate([[0], np.cumsum(lengths)])), shape=expected.shape)
        assert (read != expected[shuffled]).nnz == 0


@pytest.mark.parametrize("chunk_cells", [13, 97, 1_000_000])
def test_group_order_and_file_order_agree(generated_bucket, tmp_path, chunk_cells):
    """Rows read group by group (scattered reads; a group carried across batches when it spans
    them) or in two sequential passes: the same statistics; pairs whose values are all explicit
    zeros are left out by both."""
    path = tmp_path / _matrices(generated_bucket, MACOSKO, "log2")[0].name
    path.write_bytes(_matrices(generated_bucket, MACOSKO, "log2")[0].read_bytes())
    with h5py.File(path, "a") as store:
        store["X"]["data"][::5] = 0.0
    args = (path, _assignments(generated_bucket, MACOSKO), _membership(generated_bucket))
    by_group = aggregate.aggregate_matrix(*args, chunk_cells=chunk_cells, group_order=True)
    by_file = aggregate.aggregate_matrix(*args, chunk_cells=chunk_cells, group_order=False)
    for grouping, stats in by_group.stats.items():
        other = by_file.stats[grouping]
        assert stats.n_pairs > 0 and stats.nonzero.min() > 0
        if chunk_cells == 13:
            assert stats.groups["n_cells"].max() > 2 * chunk_cells  # groups span batches
        np.testing.assert_array_equal(stats.indptr, other.indptr)
        np.testing.assert_array_equal(stats.indices, other.indices)
        np.testing.assert_array_equal(stats.nonzero, other.nonzero)
        np.testing.assert_allclose(stats.sums, other.sums, rtol=1e-12)


def test_compressed_x_cannot_be_read_in_group_order(generated_bucket, tmp_path):
    path = tmp_path / _matrices(generated_bucket, MACOSKO, "log2")[0].name
    ad.read_h5ad(_matrices(generated_bucket, MACOSKO, "log2")[0]).write_h5ad(path, compression="gzip")
    args = (path, _assignments(generated_bucket, MACOSKO), _membership(generated_bucket))
    with pytest.raises(AggregationError, match=f"{path.name}: X is stored filtered"):
        aggregate.aggregate_matrix(*args, group_order=True)
    assert aggregate.aggregate_matrix(*args).stats["cluster"].n_pairs > 0  # the default reads it in file order


@pytest.mark.parametrize("group_order", [True, False])
@pytest.mark.parametrize("listed", [True, False])
def test_gene_index_out_of_range_is_reported_by_file(generated_bucket, tmp_path, listed, group_order):
    """In a cell that is aggregated or in one the metadata does not list: the file is bad either way."""
    source = _matrices(generated_bucket, MACOSKO, "log2")[0]
    broken = tmp_path / source.name
    broken.write_bytes(source.read_bytes())
    assignments = _assignments(generated_bucket, MACOSKO)
    with h5py.File(broken, "a") as store:
        labels = store["obs"][store["obs"].attrs["_index"]].asstr()[:]
        row = int(np.flatnonzero(np.isin(labels, assignments["cell_label"]) == listed)[0])
        position = int(store["X"]["indptr"][row])
        store["X"]["indices"][position] = len(store["var"][store["var"].attrs["_index"]])
    with pytest.raises(AggregationError, match=f"{broken.name}: X/indices holds a gene index outside"):
        aggregate.aggregate_matrix(broken, assignments, _membership(generated_bucket), group_order=group_order)


@pytest.mark.parametrize("group_order", [True, False])
def test_bad_indptr_is_reported_by_file(generated_bucket, tmp_path, group_order):
    source = _matrices(generated_bucket, MACOSKO, "log2")[0]
    broken = tmp_path / source.name
    broken.write_bytes(source.read_bytes())
    with h5py.File(broken, "a") as store:
        store["X"]["indptr"][3] = store["X"]["indptr"][5] + 1  # row 3 ends before it starts
    with pytest.raises(AggregationError, match=f"{broken.name}: X/indptr is not a row index"):
        aggregate.aggregate_matrix(broken, _assignments(generated_bucket, MACOSKO), _membership(generated_bucket),
                                   group_order=group_order)


@pytest.mark.parametrize("group_order", [True, False])
def test_values_past_the_end_of_the_file_are_reported_by_file(generated_bucket, monkeypatch, group_order):
    """X/data's chunks where the file no longer reaches (a file cut short while it is read): the
    error names the file and the byte, whichever way the rows are read."""
    path = _matrices(generated_bucket, MACOSKO, "log2")[0]
    size = path.stat().st_size
    ranges_of = h5ad.FileRanges.of.__func__

    def data_past_the_end(cls, dataset, fd):
        ranges = ranges_of(cls, dataset, fd)
        if dataset.name.endswith("/data"):
            ranges.offsets = ranges.offsets + size
        return ranges

    monkeypatch.setattr(h5ad.FileRanges, "of", classmethod(data_past_the_end))
    with pytest.raises(AggregationError, match=rf"{path.name}: unreadable h5ad: file ends at byte \d+, inside X"):
        aggregate.aggregate_matrix(path, _assignments(generated_bucket, MACOSKO), _membership(generated_bucket),
                                   group_order=group_order)


@pytest.mark.parametrize("parts", [1, 2, 3, 7])
def test_group_runs_cover_every_grouped_row_once(parts):
    rng = np.random.default_rng(parts)
    row_group = rng.integers(-1, 12, 500).astype(np.int32)
    indptr = np.concatenate([[0], np.cumsum(rng.integers(0, 40, 500))]).astype(np.int64)
    order, bounds = kernels.group_order(row_group, indptr, parts)
    assert bounds[0] == (row_group < 0).sum() and bounds[-1] == len(row_group)
    assert np.all(np.diff(bounds) >= 0)
    covered = np.concatenate([order[bounds[p]:bounds[p + 1]] for p in range(parts)])
    np.testing.assert_array_equal(np.sort(covered), np.flatnonzero(row_group >= 0))
    groups_of_part = [set(row_group[order[bounds[p]:bounds[p + 1]]]) for p in range(parts)]
    for p in range(parts):
        for q in range(p + 1, parts):
            assert not groups_of_part[p] & groups_of_part[q]
    assert all(np.all(np.diff(order[bounds[p]:bounds[p + 1]][row_group[order[bounds[p]:bounds[p + 1]]]
                                                          == g]) > 0)
               for p in range(parts) for g in groups_of_part[p])  # a group's rows in file order


def test_bad_matrix_is_reported_by_file(generated_bucket, tmp_path):
    source = _matrices(generated_bucket, MACOSKO, "log2")[0]
    broken = tmp_path / source.name
    broken.write_bytes(source.read_bytes())
    with h5py.File(broken, "a") as store:
        store["X"].attrs["encoding-type"] = "csc_matrix"
    with pytest.raises(AggregationError, match=f"{broken.name}.*CSR"):
        aggregate.aggregate_matrix(broken, _assignments(generated_bucket, MACOSKO), _membership(generated_bucket))
    truncated = tmp_path / "truncated-log2.h5ad"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    with pytest.raises(AggregationError, match="truncated-log2.h5ad"):
        aggregate.aggregate_matrix(truncated, _assignments(generated_bucket, MACOSKO), _membership(generated_bucket))
    with pytest.raises(AggregationError, match="not a -log2.h5ad or -raw.h5ad"):
        aggregate.normalization_of(tmp_path / "cells.h5ad")


def test_unknown_cluster_alias_is_an_error(generated_bucket):
    path = _matrices(generated_bucket, MACOSKO, "log2")[0]
    assignments = _assignments(generated_bucket, MACOSKO)
    in_file = assignments["cell_label"].isin(ad.read_h5ad(path, backed="r").obs_names)
    assignments.loc[in_file.idxmax(), "cluster_alias"] = 999_999
    with pytest.raises(AggregationError, match="cluster_alias the taxonomy does not know.*999999"):
        aggregate.aggregate_matrix(path, assignments, _membership(generated_bucket))


# --- publication --------------------------------------------------------------------------------

def _publish(generated_bucket, database_url, work: Path, datasets: list[str]) -> dict[str, int]:
    taxonomy = _membership(generated_bucket)
    partials = {}
    for dataset in datasets:
        assignments = _assignments(generated_bucket, dataset)
        partials[dataset] = [aggregate.aggregate_file(p, assignments, taxonomy, work / dataset / f"{p.stem}.npz")
                             for p in _matrices(generated_bucket, dataset, "log2")]
    with db.copy_connection(database_url) as conn:
        return aggregate.merge_and_publish(conn, RELEASE, partials, taxonomy)


def test_published_views_answer_the_analyst_queries(generated_bucket, database_url, tmp_path, reference):
    entries = _publish(generated_bucket, database_url, tmp_path, [MACOSKO, CONSENSUS_WMB])
    assert set(entries) == {MACOSKO, CONSENSUS_WMB} and min(entries.values()) > 0
    expected = sc.get.aggregate(reference, by="cluster", func=["mean", "count_nonzero"])
    gad1 = list(expected.var_names[reference.var["gene_symbol"] == "Gad1"])[0]
    gad1_position = expected.var_names.get_loc(gad1)
    names = ClusterTaxonomy(_membership(generated_bucket)).names
    with db.copy_connection(database_url) as conn:
        rows = conn.execute(
            "SELECT group_label, group_name, mean, fraction, n_cells FROM abc.expression_by_cluster "
            "WHERE release = %s AND dataset = %s AND gene_symbol = 'Gad1'", (RELEASE, MACOSKO)).fetchall()
        where = {label: (name, mean, fraction, n) for label, name, mean, fraction, n in rows}
        means = expected.layers["mean"][:, gad1_position]
        counts = expected.layers["count_nonzero"][:, gad1_position]
        sizes = reference.obs["cluster"].value_counts()
        expressing = [c for c, m in zip(expected.obs_names, means, strict=True) if m > 0]
        assert sorted(where) == sorted(expressing)  # clusters without Gad1 have no row
        for cluster, mean, count in zip(expected.obs_names, means, counts, strict=True):
            if mean > 0:
                name, got_mean, fraction, n_cells = where[cluster]
                assert name == names[cluster] and n_cells == sizes[cluster]
                assert got_mean == pytest.approx(mean, rel=RTOL)
                assert fraction == pytest.approx(count / sizes[cluster], rel=RTOL)

        cluster = sizes.index[0]
        top = conn.execute(
            "SELECT gene_identifier, mean FROM abc.cluster_profile WHERE release = %s AND dataset = %s "
            "AND group_name = %s ORDER BY mean DESC, gene_identifier LIMIT 50",
            (RELEASE, MACOSKO, names[cluster])).fetchall()
        row = pd.Series(expected.layers["mean"][expected.obs_names.get_loc(cluster)], index=expected.var_names)
        row = row[row > 0].sort_values(ascending=False, kind="stable")
        assert [g for g, _ in top] == list(pd.DataFrame({"g": row.index, "m": row.to_numpy()})
                                           .sort_values(["m", "g"], ascending=[False, True])["g"][:50])
        assert [m for _, m in top] == pytest.approx(sorted(row.to_numpy(), reverse=True)[:50], rel=RTOL)

        # Both access paths hold the same rows.
        for by_gene, profile in (("expression_by_subclass", "subclass_profile"),
                                 ("expression_by_region_subclass", "region_subclass_profile")):
            query = ("SELECT dataset, group_label, region_of_interest_acronym, gene_identifier, n_cells, n_nonzero, "
                     "sum, sum_sq FROM abc.{} WHERE release = %s ORDER BY 1, 2, 3, 4")
            assert conn.execute(query.format(by_gene), (RELEASE,)).fetchall() == \
                conn.execute(query.format(profile), (RELEASE,)).fetchall()
        files = conn.execute("SELECT dataset, count(*), sum(n_cells_aggregated) FROM abc.expression_file "
                             "WHERE release = %s GROUP BY 1 ORDER BY 1", (RELEASE,)).fetchall()
        wmb_cells = len(_assignments(generated_bucket, CONSENSUS_WMB))
        assert files == sorted([(MACOSKO, 3, len(reference)),
                                (CONSENSUS_WMB, len(_matrices(generated_bucket, CONSENSUS_WMB, "log2")), wmb_cells)])

        # Analysts (abc_reader) read the expression views, and only the views.
        with conn.transaction():
            conn.execute("SET LOCAL ROLE abc_reader")
            assert conn.execute("SELECT count(*) FROM abc.expression_by_cluster WHERE gene_symbol = 'Gad1' "
                                "AND dataset = %s", (MACOSKO,)).fetchone()[0] == len(rows)
            assert conn.execute("SELECT count(*) FROM abc.cluster_profile").fetchone()[0] > 0
        for statement in ("SELECT count(*) FROM abc.expression_gene_major", "DELETE FROM abc.expression_group"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                conn.execute("SET LOCAL ROLE abc_reader")
                conn.execute(statement)


def test_publishing_again_replaces_and_keeps_other_datasets(generated_bucket, database_url, tmp_path):
    def counts() -> list[tuple]:
        with db.copy_connection(database_url) as conn:
            return conn.execute("SELECT dataset, grouping, count(*), sum(array_length(group_index, 1)) "
                                "FROM abc.expression_gene_major GROUP BY 1, 2 ORDER BY 1, 2").fetchall()

    _publish(generated_bucket, database_url, tmp_path / "a", [MACOSKO, CONSENSUS_WMB])
    before = counts()
    _publish(generated_bucket, database_url, tmp_path / "b", [MACOSKO])
    assert counts() == before
    assert {row[0] for row in before} == {MACOSKO, CONSENSUS_WMB}
