"""The generated bucket follows the real layout and its expression means something."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd

from etl.fixtures import (
    CONSENSUS_WMB,
    MACOSKO,
    NEW_RELEASE,
    OLD_RELEASE,
    TAXONOMY,
    FixtureSpec,
    make_bucket,
    make_taxonomy,
    md5_of_file,
)


def test_same_seed_same_bytes(tmp_path):
    spec = FixtureSpec(cells=600, genes=120, clusters=12, regions=2)
    first = make_bucket(tmp_path / "a", spec)
    second = make_bucket(tmp_path / "b", spec)
    for release in first.releases:
        key = f"releases/{release}/manifest.json"
        assert (first.bucket_dir / key).read_bytes() == (second.bucket_dir / key).read_bytes()
    other = make_bucket(tmp_path / "c", FixtureSpec(seed=1, cells=600, genes=120, clusters=12, regions=2))
    key = f"releases/{OLD_RELEASE}/manifest.json"
    assert md5_of_file(other.bucket_dir / key) != md5_of_file(first.bucket_dir / key)


def test_manifest_schema_and_release_semantics(generated_bucket):
    bucket = generated_bucket.bucket_dir
    old = json.loads((bucket / f"releases/{OLD_RELEASE}/manifest.json").read_text())
    new = json.loads((bucket / f"releases/{NEW_RELEASE}/manifest.json").read_text())
    assert set(old) == {"version", "resource_uri", "directory_listing", "file_listing"}
    assert old["resource_uri"] == "s3://allen-brain-cell-atlas/"
    wmb_dir = old["directory_listing"]["WMB-10Xv3"]["directories"]["expression_matrices"]
    assert wmb_dir["relative_path"] == "expression_matrices/WMB-10Xv3/20230630"
    assert wmb_dir["url"].startswith("https://allen-brain-cell-atlas.s3.us-west-2.amazonaws.com/")
    h5ad = old["file_listing"]["WMB-10Xv3"]["expression_matrices"]["WMB-10Xv3-CTXsp"]
    assert set(h5ad) == {"raw", "log2"}
    assert h5ad["raw"]["files"]["h5ad"]["relative_path"].endswith("WMB-10Xv3-CTXsp-raw.h5ad")
    assert "cell_metadata" in old["file_listing"][MACOSKO]["metadata"]
    assert "cluster_to_cluster_annotation_membership" in old["file_listing"][TAXONOMY]["metadata"]
    # The newer release pins a new directory for the consensus WMB metadata only.
    changed = {(d, k) for d, body in new["directory_listing"].items() for k, v in body["directories"].items()
               if v != old["directory_listing"][d]["directories"][k]}
    assert changed == {(CONSENSUS_WMB, "metadata")}
    old_cells = old["file_listing"][CONSENSUS_WMB]["metadata"]["cell_metadata"]["files"]["csv"]
    new_cells = new["file_listing"][CONSENSUS_WMB]["metadata"]["cell_metadata"]["files"]["csv"]
    assert old_cells["file_hash"] != new_cells["file_hash"]
    old_genes = old["file_listing"][CONSENSUS_WMB]["metadata"]["gene"]["files"]["csv"]
    new_genes = new["file_listing"][CONSENSUS_WMB]["metadata"]["gene"]["files"]["csv"]
    assert old_genes["file_hash"] == new_genes["file_hash"] and old_genes["relative_path"] != new_genes["relative_path"]


def test_matrices_match_metadata_and_markers_mark_clusters(generated_bucket):
    bucket = generated_bucket.bucket_dir
    cells = pd.read_csv(bucket / f"metadata/{CONSENSUS_WMB}/{OLD_RELEASE}/cell_metadata.csv")
    raw = ad.read_h5ad(bucket / "expression_matrices/WMB-10Xv3/20230630/WMB-10Xv3-CTXsp-raw.h5ad")
    log2 = ad.read_h5ad(bucket / "expression_matrices/WMB-10Xv3/20230630/WMB-10Xv3-CTXsp-log2.h5ad")
    assert raw.obs.index.name == "cell_label" and raw.var.index.name == "gene_identifier"
    assert "gene_symbol" in raw.var.columns and raw.X.format == "csr"
    listed = cells[cells.feature_matrix_label == "WMB-10Xv3-CTXsp"].set_index("cell_label")
    # Most matrix cells are listed; the rest were dropped by QC, as in the real data.
    in_metadata = raw.obs.index.isin(listed.index)
    assert 0.9 < in_metadata.mean() < 1.0
    assert set(listed.index) <= set(raw.obs.index)
    counts = raw.X.toarray()
    assert (counts == np.round(counts)).all() and (counts >= 0).all()
    assert (counts > 0).mean() < 0.6  # sparse
    totals = counts.sum(axis=1)
    np.testing.assert_allclose(log2.X.toarray(), np.log2(counts / totals[:, None] * 1e6 + 1), rtol=1e-5)
    np.testing.assert_array_equal(listed.loc[raw.obs.index[in_metadata], "umi_count"], totals[in_metadata])
    means = counts.mean(axis=0)
    assert (counts.var(axis=0)[means > 1] > means[means > 1]).all()  # overdispersed

    # Each cluster's own markers are higher in it than in the other cells.
    spec = generated_bucket.spec
    taxonomy = make_taxonomy(spec)
    cluster = listed.loc[raw.obs.index[in_metadata], "cluster_alias"].to_numpy() - 1
    cpm = counts[in_metadata] / totals[in_metadata, None]
    checked = 0
    for c in np.unique(cluster):
        inside = cluster == c
        if inside.sum() < 5 or (~inside).sum() < 5:
            continue
        markers = taxonomy.markers["cluster"][c]
        assert cpm[inside][:, markers].mean() > 2 * cpm[~inside][:, markers].mean()
        checked += 1
    assert checked >= 3


def test_taxonomy_tables_are_consistent(generated_bucket):
    directory = generated_bucket.bucket_dir / f"metadata/{TAXONOMY}/{OLD_RELEASE}"
    terms = pd.read_csv(directory / "cluster_annotation_term.csv")
    membership = pd.read_csv(directory / "cluster_to_cluster_annotation_membership.csv")
    clusters = pd.read_csv(directory / "cluster.csv")
    sizes = generated_bucket.spec.taxonomy_sizes
    assert terms.groupby("cluster_annotation_term_set_name").size().to_dict() == sizes
    assert len(membership) == 4 * len(clusters)
    parents = terms.set_index("label")["parent_term_label"].dropna()
    assert parents.isin(terms.label).all()
    cells = pd.concat(pd.read_csv(generated_bucket.bucket_dir / f"metadata/{d}/{OLD_RELEASE}/cell_metadata.csv")
                      for d in (MACOSKO, CONSENSUS_WMB))
    assert cells.cluster_alias.isin(clusters.cluster_alias).all()
    assert clusters.number_of_cells.sum() == len(cells)
