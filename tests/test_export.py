"""Pseudobulk export of a published release (abc-mirror export): h5ad read back with anndata and parquet
with pandas, every value compared with the warehouse; obs taxonomy with the generated taxonomy files."""

from __future__ import annotations

import json
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from etl import db, export, source
from etl.cli import EXIT_OK, EXIT_UNUSABLE, main
from etl.discovery import discover
from etl.fixtures import MACOSKO, OLD_RELEASE, PRE_CONSENSUS_RELEASE, TAXONOMY, UNCHANGED_RELEASE

RTOL = 1e-6


def _query(database_url: str, statement: str, *params: object) -> pd.DataFrame:
    with db.copy_connection(database_url) as conn:
        cursor = conn.execute(statement, params)
        return pd.DataFrame(cursor.fetchall(), columns=[c.name for c in cursor.description])


def _database_rows(database_url: str, release: str, grouping: str) -> pd.DataFrame:
    """The stored pairs of a grouping as analysts read them (abc.expression_profile), keyed like obs rows."""
    rows = _query(database_url, "SELECT dataset, group_label, region_of_interest_acronym, gene_identifier, n_cells, "
                  "mean, fraction, n_nonzero FROM abc.expression_profile WHERE release = %s AND grouping = %s",
                  release, grouping)
    region = rows["region_of_interest_acronym"] + "/" if grouping == "region_subclass" else ""
    return rows.assign(group=rows["dataset"] + "/" + region + rows["group_label"])


def _taxonomy_csv(generated_bucket, name: str) -> pd.DataFrame:
    return pd.read_csv(generated_bucket.bucket_dir / "metadata" / TAXONOMY / OLD_RELEASE / f"{name}.csv")


def _assert_layers_match(adata: ad.AnnData, rows: pd.DataFrame) -> None:
    """Every layer value equals the database's: its stored pairs, and 0 where it stores none."""
    r = adata.obs_names.get_indexer(rows["group"])
    c = adata.var_names.get_indexer(rows["gene_identifier"])
    assert (r >= 0).all() and (c >= 0).all()
    for layer in ("mean", "fraction", "n_nonzero"):
        expected = np.zeros(adata.shape)
        expected[r, c] = rows[layer].to_numpy()
        matrix = adata.layers[layer]
        assert matrix.has_sorted_indices and matrix.nnz == len(rows)
        np.testing.assert_allclose(matrix.toarray(), expected, rtol=RTOL, atol=0)


def test_export_writes_the_published_grouping_as_anndata_and_parquet(settings, generated_bucket, tmp_path,
                                                                     monkeypatch, capsys):
    discover(source.make_client(settings), settings, db.make_engine(settings.database_url))
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", settings.endpoint_url)
    url = settings.database_url

    def cli(*args: str) -> int:
        arguments = [*args, "--database-url", url]
        monkeypatch.setattr(sys, "argv", ["abc-mirror", *arguments])
        return main(arguments)

    for release in (OLD_RELEASE, UNCHANGED_RELEASE):  # the second is published by reference to the first
        assert cli("mirror", "--release", release, "--target", settings.mirror_root, "--no-progress") == EXIT_OK
        assert cli("load", "--release", release) == EXIT_OK
    capsys.readouterr()
    early = tmp_path / "early.parquet"  # published metadata, expression not aggregated yet
    assert cli("export", "--release", OLD_RELEASE, "--grouping", "class", "--out", str(early)) == EXIT_UNUSABLE
    assert f"release {OLD_RELEASE}: no aggregated expression published" in capsys.readouterr().err
    assert not early.exists()
    assert cli("aggregate", "--release", OLD_RELEASE) == EXIT_OK
    capsys.readouterr()

    membership = _taxonomy_csv(generated_bucket, "cluster_to_cluster_annotation_membership")
    labels = membership.pivot(index="cluster_alias", columns="cluster_annotation_term_set_name",
                              values="cluster_annotation_term_label")
    terms = _taxonomy_csv(generated_bucket, "cluster_annotation_term").set_index("label")
    files = _query(url, "SELECT dataset, source, normalization, n_cells_in_file, n_cells_aggregated "
                   "FROM abc.expression_file WHERE release = %s ORDER BY 1, 2", OLD_RELEASE)
    genes = _query(url, "SELECT dataset, gene_identifier, gene_symbol FROM abc.expression_gene WHERE release = %s",
                   OLD_RELEASE)
    datasets = sorted(files["dataset"].unique())
    assert len(datasets) == 2

    monkeypatch.setattr(export, "BATCH_GROUPS", 7)  # several batches per grouping, appended one by one
    exported = {}
    for grouping in ("cluster", "subclass"):
        path = tmp_path / f"{grouping}.h5ad"
        assert cli("export", "--release", OLD_RELEASE, "--grouping", grouping, "--out", str(path)) == EXIT_OK
        assert f"-> {path}" in capsys.readouterr().out
        adata = exported[grouping] = ad.read_h5ad(path)
        rows = _database_rows(url, OLD_RELEASE, grouping)
        _assert_layers_match(adata, rows)
        assert adata.X is None

        # obs: every group of the grouping in both datasets, its cell count and its taxonomy.
        groups = _query(url, "SELECT dataset || '/' || group_label AS group, n_cells, group_name AS name "
                        "FROM abc.expression_group WHERE release = %s AND grouping = %s",
                        OLD_RELEASE, grouping).set_index("group")
        assert sorted(adata.obs_names) == sorted(groups.index)
        assert (adata.obs["n_cells"] == groups.loc[adata.obs_names, "n_cells"]).all()
        assert (adata.obs[f"{grouping}_name"].astype(str) == groups.loc[adata.obs_names, "name"]).all()
        assert adata.obs.groupby("dataset", observed=True)["n_cells"].sum().to_dict() == \
            files.groupby("dataset")["n_cells_aggregated"].sum().to_dict()
        parent = labels.drop_duplicates(grouping).set_index(grouping, drop=False)
        own = adata.obs[f"{grouping}_label"].astype(str)
        for level in ("class", "subclass", "supertype", "cluster")[:("class", "subclass", "supertype",
                                                                        "cluster").index(grouping) + 1]:
            assert (adata.obs[f"{level}_label"].astype(str) == parent.loc[own, level].to_numpy()).all()
            assert (adata.obs[f"{level}_color"].astype(str)
                    == terms.loc[adata.obs[f"{level}_label"].astype(str), "color_hex_triplet"].to_numpy()).all()
            categories = adata.obs[f"{level}_name"].cat.categories
            assert adata.uns[f"{level}_name_colors"].tolist() == [
                terms.loc[terms["name"] == name, "color_hex_triplet"].iloc[0] for name in categories]
        if grouping == "subclass":  # a finer level varies within a subclass: not in its obs
            assert "supertype_label" not in adata.obs and "cluster_label" not in adata.obs

        # var: every gene of either dataset's matrices, its symbol, and which datasets measure it.
        assert sorted(adata.var_names) == sorted(genes["gene_identifier"].unique())
        symbols = genes.drop_duplicates("gene_identifier").set_index("gene_identifier")["gene_symbol"]
        assert (adata.var["gene_symbol"] == symbols.loc[adata.var_names]).all()
        for dataset in datasets:
            measured = set(genes.loc[genes["dataset"] == dataset, "gene_identifier"])
            assert set(adata.var_names[adata.var[dataset]]) == measured
        assert not adata.var[datasets].all(axis=1).all()  # the datasets' gene sets differ

        # uns: the release, its matrices and the lineage back to the bucket's files.
        assert (adata.uns["release"], adata.uns["data_release"], adata.uns["grouping"]) == \
            (OLD_RELEASE, OLD_RELEASE, grouping)
        assert list(adata.uns["datasets"]) == datasets
        pd.testing.assert_frame_equal(adata.uns["source_files"].reset_index(drop=True), files, check_dtype=False)
        lineage = adata.uns["lineage"]
        aggregated = lineage[lineage["step"] == "aggregate"]
        assert set(aggregated["source_key"]) <= set(generated_bucket.files[OLD_RELEASE])
        assert {str(settings.mirror_path / key) for key in aggregated["source_key"]} == set(files["source"])
        assert aggregated["md5"].str.fullmatch("[0-9a-f]{32}").all()

    # Parquet: one row per stored pair, with the taxonomy; the provenance in the file's metadata.
    path = tmp_path / "region_subclass.parquet"
    assert cli("export", "--release", OLD_RELEASE, "--grouping", "region_subclass", "--out", str(path)) == EXIT_OK
    table = pd.read_parquet(path)
    rows = _database_rows(url, OLD_RELEASE, "region_subclass")
    table = table.assign(group_label=table["subclass_label"])
    keys = ["dataset", "region_of_interest_acronym", "group_label", "gene_identifier"]
    merged = table.merge(rows, on=keys, how="outer", suffixes=("", "_db"), indicator=True)
    assert len(table) == len(rows) and (merged["_merge"] == "both").all()
    for column in ("mean", "fraction", "n_nonzero", "n_cells"):
        np.testing.assert_allclose(merged[column], merged[f"{column}_db"], rtol=RTOL, atol=0)
    classes = labels.drop_duplicates("subclass").set_index("subclass")["class"]
    assert (table["class_label"] == classes.loc[table["subclass_label"]].to_numpy()).all()
    symbols = genes.drop_duplicates("gene_identifier").set_index("gene_identifier")["gene_symbol"]
    assert (table["gene_symbol"] == symbols.loc[table["gene_identifier"]].to_numpy()).all()
    metadata = json.loads(pq.read_schema(path).metadata[b"abc_mirror"])
    assert (metadata["release"], metadata["grouping"]) == (OLD_RELEASE, "region_subclass")
    assert pd.DataFrame(metadata["source_files"]).equals(files)

    # Selected genes (by symbol or identifier) read the gene-major rows: the same values.
    identifier = exported["cluster"].var_names[-1]
    chosen = exported["cluster"].var_names[exported["cluster"].var["gene_symbol"].isin(["Gad1"])
                                           | (exported["cluster"].var_names == identifier)]
    path = tmp_path / "genes.h5ad"
    assert cli("export", "--release", OLD_RELEASE, "--grouping", "cluster", "--genes", "Gad1", identifier,
               "--out", str(path)) == EXIT_OK
    subset = ad.read_h5ad(path)
    assert sorted(subset.var_names) == sorted(chosen) and len(chosen) >= 2
    _assert_layers_match(subset, _database_rows(url, OLD_RELEASE, "cluster").query("gene_identifier in @chosen"))

    # A release published by reference reads its data release's rows; one dataset.
    path = tmp_path / "shared.h5ad"
    assert cli("export", "--release", UNCHANGED_RELEASE, "--grouping", "subclass", "--dataset", MACOSKO,
               "--out", str(path)) == EXIT_OK
    shared = ad.read_h5ad(path)
    assert (shared.uns["release"], shared.uns["data_release"]) == (UNCHANGED_RELEASE, OLD_RELEASE)
    assert set(shared.obs["dataset"]) == {MACOSKO} and len(shared.uns["lineage"]) > 0
    _assert_layers_match(shared, _database_rows(url, OLD_RELEASE, "subclass").query("dataset == @MACOSKO"))

    # Groups with no stored pair (none of their genes expressed) before, between and after the batches.
    group_major = f"abc_part.expression_group_major_r{OLD_RELEASE}"
    with db.copy_connection(url) as conn:
        conn.execute(f"DELETE FROM {group_major} WHERE grouping = 'supertype' AND (group_index = 0 OR dataset = %s "
                     f"AND group_index IN (3, (SELECT max(group_index) FROM {group_major} WHERE dataset = %s "
                     "AND grouping = 'supertype')))",
                     (MACOSKO, MACOSKO))
    path = tmp_path / "gaps.h5ad"
    assert cli("export", "--release", OLD_RELEASE, "--grouping", "supertype", "--out", str(path)) == EXIT_OK
    gaps = ad.read_h5ad(path)
    rows = _database_rows(url, OLD_RELEASE, "supertype")
    _assert_layers_match(gaps, rows)
    empty = gaps.obs_names[gaps.layers["n_nonzero"].getnnz(axis=1) == 0]
    assert len(empty) == 4 and empty[0] == gaps.obs_names[0] and empty[-1] == gaps.obs_names[-1]
    assert len(gaps) == len(_query(url, "SELECT 1 FROM abc.expression_group WHERE release = %s AND grouping = "
                                   "'supertype'", OLD_RELEASE))

    # Bad input: exit 2, naming the problem; no file written.
    for arguments, message in (
            (["--release", "29990101", "--grouping", "cluster"], "release 29990101: unknown"),
            (["--release", PRE_CONSENSUS_RELEASE, "--grouping", "cluster"], f"release {PRE_CONSENSUS_RELEASE}: "
                                                                             "not published (status skipped)"),
            (["--release", OLD_RELEASE, "--grouping", "neighborhood"], "unknown grouping 'neighborhood'"),
            (["--release", OLD_RELEASE, "--grouping", "cluster", "--genes", "Gad1,NoSuchGene"],
             "genes ['NoSuchGene'] are in none of the matrices"),
            (["--release", OLD_RELEASE, "--grouping", "cluster", "--dataset", "Other"],
             "no aggregated expression of datasets ['Other']")):
        bad = tmp_path / "bad.h5ad"
        assert cli("export", *arguments, "--out", str(bad)) == EXIT_UNUSABLE
        assert message in capsys.readouterr().err
        assert not bad.exists() and not bad.with_name("bad.h5ad.partial").exists()
    assert cli("export", "--release", OLD_RELEASE, "--grouping", "cluster", "--out", str(tmp_path / "x.csv")) \
        == EXIT_UNUSABLE
    assert "unknown output format '.csv'" in capsys.readouterr().err
