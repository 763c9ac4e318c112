"""The generated bucket follows the real layout and its expression means something."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from etl.fixtures import (
    CONSENSUS_DATASETS,
    CONSENSUS_WMB,
    HMBA_BG,
    MACOSKO,
    NEW_DATASET,
    NEW_RELEASE,
    OLD_RELEASE,
    PRE_CONSENSUS_RELEASE,
    TAXONOMY,
    UNCHANGED_RELEASE,
    WMB_GENE_COLUMNS,
    WMB_GENE_KEY,
    WMB_TAXONOMY,
    FixtureSpec,
    make_bucket,
    make_taxonomy,
    md5_of_file,
)


def _manifest(generated_bucket, release):
    return json.loads((generated_bucket.bucket_dir / f"releases/{release}/manifest.json").read_text())


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
    # The newer release pins new directories for the consensus WMB cells and the taxonomy only (and
    # lists the dataset UNCHANGED_RELEASE added).
    changed = {(d, k) for d, body in new["directory_listing"].items() for k, v in body["directories"].items()
               if v != old["directory_listing"].get(d, {}).get("directories", {}).get(k)}
    assert changed == {(CONSENSUS_WMB, "metadata"), (TAXONOMY, "metadata"), (NEW_DATASET, "metadata")}

    def entry(doc, dataset, stem):
        return doc["file_listing"][dataset]["metadata"][stem]["files"]["csv"]

    for dataset, stem in ((CONSENSUS_WMB, "cell_metadata"), (TAXONOMY, "cell_to_cluster_membership"),
                          (TAXONOMY, "cluster"), (TAXONOMY, "cell_2d_embedding_coordinates")):
        assert entry(old, dataset, stem)["file_hash"] != entry(new, dataset, stem)["file_hash"]
    # The files that did not change are the same bytes under a new key.
    for dataset, stem in ((CONSENSUS_WMB, "donor"), (CONSENSUS_WMB, "library"), (CONSENSUS_WMB, "value_sets"),
                          (TAXONOMY, "cluster_annotation_term"),
                          (TAXONOMY, "cluster_to_cluster_annotation_membership")):
        before, after = entry(old, dataset, stem), entry(new, dataset, stem)
        assert before["file_hash"] == after["file_hash"] and before["relative_path"] != after["relative_path"]


def test_metadata_files_and_columns_are_the_real_ones(generated_bucket):
    """File names and column names (in order) of the real consensus release (docs/layout.md)."""
    bucket = generated_bucket.bucket_dir
    manifest = json.loads((bucket / f"releases/{OLD_RELEASE}/manifest.json").read_text())
    stems = {d: set(manifest["file_listing"][d]["metadata"]) for d in (MACOSKO, CONSENSUS_WMB, TAXONOMY)}
    assert stems[CONSENSUS_WMB] == {"cell_metadata", "donor", "library", "value_sets", "example_gene_expression"}
    assert stems[MACOSKO] == {"cell_metadata", "donor", "gene", "library", "value_sets", "example_gene_expression"}
    example = manifest["file_listing"][MACOSKO]["metadata"]["example_gene_expression"]["files"]["csv"]
    assert example["relative_path"] == f"metadata/{MACOSKO}/{OLD_RELEASE}/views/example_gene_expression.csv"
    neighborhoods = {s for s in stems[TAXONOMY] if s.endswith("_cell_2d_embedding_coordinates")}
    assert neighborhoods and stems[TAXONOMY] - neighborhoods == {
        "cell_2d_embedding_coordinates", "cell_to_cluster_membership", "cluster", "cluster_annotation_term",
        "cluster_annotation_term_set", "cluster_to_cluster_annotation_membership"}

    def header(dataset, stem):
        return list(pd.read_csv(bucket / f"metadata/{dataset}/{OLD_RELEASE}/{stem}.csv", nrows=0).columns)

    cell_columns = ["cell_label", "cell_barcode", "barcoded_cell_sample_label", "library_label", "dataset_label",
                    "feature_matrix_label"]
    assert header(MACOSKO, "cell_metadata") == header(CONSENSUS_WMB, "cell_metadata") == cell_columns
    assert header(MACOSKO, "library") == ["library_label", "region_of_interest_acronym",
                                          "anatomical_division_label", "donor_label"]
    assert header(CONSENSUS_WMB, "library") == ["library_label", "library_method", "alignment_id",
                                                "region_of_interest_acronym", "anatomical_division_label",
                                                "donor_label"]
    assert header(MACOSKO, "donor") == ["donor_label", "donor_sex", "origin_dataset"]
    assert header(CONSENSUS_WMB, "donor") == ["donor_label", "donor_sex", "donor_age", "origin_dataset"]
    assert header(MACOSKO, "gene") == ["gene_identifier", "gene_symbol"]
    assert header(CONSENSUS_WMB, "value_sets") == ["label", "field", "table", "description", "order",
                                                   "external_identifier", "parent_label", "color_hex_triplet",
                                                   "comment"]
    assert header(TAXONOMY, "cell_to_cluster_membership") == ["cell_label", "cluster_alias"]
    assert header(TAXONOMY, "cell_2d_embedding_coordinates") == ["cell_label", "x", "y"]
    assert header(TAXONOMY, "cluster") == ["label", "cluster_alias", "number_of_cells"]
    assert header(TAXONOMY, "cluster_annotation_term_set") == ["label", "name", "description", "order",
                                                               "parent_term_set_label"]
    assert header(TAXONOMY, "cluster_annotation_term") == [
        "label", "name", "cluster_annotation_term_set_label", "cluster_annotation_term_set_name",
        "color_hex_triplet", "term_order", "term_set_order", "parent_term_label", "parent_term_name",
        "parent_term_set_label"]
    assert header(TAXONOMY, "cluster_to_cluster_annotation_membership") == [
        "cluster_annotation_term_label", "cluster_annotation_term_set_name", "cluster_annotation_term_name",
        "cluster_alias", "cluster_annotation_term_set_label"]
    sets = pd.read_csv(bucket / f"metadata/{TAXONOMY}/{OLD_RELEASE}/cluster_annotation_term_set.csv")
    assert sets.label.tolist() == ["CCN20251031_NEUR"] + [f"CCN20251031_LEVEL_{i}" for i in range(5)]
    assert sets.name.tolist() == ["neurotransmitter", "neighborhood", "class", "subclass", "supertype", "cluster"]
    # AIBS cells carry their chemistry's dataset label; Macosko cells their directory's.
    aibs = pd.read_csv(bucket / f"metadata/{CONSENSUS_WMB}/{OLD_RELEASE}/cell_metadata.csv")
    assert set(aibs.dataset_label) == {"WMB-10Xv2", "WMB-10Xv3"}
    assert (aibs.feature_matrix_label.str.rsplit("-", n=1).str[0].str[:9] == aibs.dataset_label).all()
    macosko = pd.read_csv(bucket / f"metadata/{MACOSKO}/{OLD_RELEASE}/cell_metadata.csv")
    assert set(macosko.dataset_label) == {MACOSKO}
    # Every cell's library is in library.csv, whose donors are in donor.csv.
    for dataset, cells in ((MACOSKO, macosko), (CONSENSUS_WMB, aibs)):
        libraries = pd.read_csv(bucket / f"metadata/{dataset}/{OLD_RELEASE}/library.csv")
        donors = pd.read_csv(bucket / f"metadata/{dataset}/{OLD_RELEASE}/donor.csv")
        assert cells.library_label.isin(libraries.library_label).all()
        assert libraries.donor_label.isin(donors.donor_label).all()


def test_matrices_match_metadata_and_markers_mark_clusters(generated_bucket):
    bucket = generated_bucket.bucket_dir
    cells = pd.read_csv(bucket / f"metadata/{CONSENSUS_WMB}/{OLD_RELEASE}/cell_metadata.csv").merge(
        pd.read_csv(bucket / f"metadata/{TAXONOMY}/{OLD_RELEASE}/cell_to_cluster_membership.csv"), on="cell_label")
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
    means = counts.mean(axis=0)
    # Overdispersed (at means near 1, a few hundred cells' variance is too noisy to tell).
    assert (counts.var(axis=0)[means > 2] > means[means > 2]).all()

    # Each cluster's own markers are higher in it than in the other cells.
    spec = generated_bucket.spec
    taxonomy = make_taxonomy(spec)
    cluster = taxonomy.alias_index(listed.loc[raw.obs.index[in_metadata], "cluster_alias"].to_numpy())
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
    sizes = generated_bucket.spec.term_set_sizes
    per_set = terms.groupby("cluster_annotation_term_set_name").size().to_dict()
    assert per_set == sizes and min(sizes.values()) >= 2
    codes = {"neurotransmitter": "NEUR", "neighborhood": "NEIGH", "class": "CLAS", "subclass": "SUBC",
             "supertype": "SUPT", "cluster": "CLUS"}
    for level, code in codes.items():
        in_set = terms[terms.cluster_annotation_term_set_name == level]
        assert in_set.label.str.fullmatch(rf"CS20251031_{code}_\d{{4}}").all()
    assert "NN" in set(terms[terms.cluster_annotation_term_set_name == "neurotransmitter"].name)
    # cluster_alias values are distinct, non-contiguous integers (not 1..n).
    aliases = clusters.cluster_alias
    assert aliases.is_unique and sorted(aliases) != list(range(1, len(aliases) + 1))
    # Every cluster has one term of each of the six sets (neurotransmitter, neighborhood .. cluster).
    assert len(membership) == 6 * len(clusters)
    assert (membership.groupby("cluster_alias").cluster_annotation_term_set_name.nunique() == 6).all()
    assert membership.cluster_annotation_term_label.isin(terms.label).all()
    parents = terms.set_index("label")["parent_term_label"].dropna()
    assert parents.isin(terms.label).all()
    cells = pd.concat(pd.read_csv(generated_bucket.bucket_dir / f"metadata/{d}/{OLD_RELEASE}/cell_metadata.csv")
                      for d in (MACOSKO, CONSENSUS_WMB))
    assigned = pd.read_csv(directory / "cell_to_cluster_membership.csv")
    assert sorted(assigned.cell_label) == sorted(cells.cell_label)
    assert assigned.cluster_alias.isin(clusters.cluster_alias).all()
    assert (clusters.set_index("cluster_alias").number_of_cells
            == assigned.cluster_alias.value_counts().reindex(clusters.cluster_alias, fill_value=0)).all()
    assert clusters.number_of_cells.sum() == len(cells)
    embedding = pd.read_csv(directory / "cell_2d_embedding_coordinates.csv")
    assert sorted(embedding.cell_label) == sorted(cells.cell_label)
    # Each neighborhood's embedding holds exactly the cells of its clusters.
    neighborhood = membership[membership.cluster_annotation_term_set_name == "neighborhood"].set_index(
        "cluster_alias").cluster_annotation_term_name
    of_cell = assigned.set_index("cell_label").cluster_alias.map(neighborhood)
    for name in neighborhood.unique():
        part = pd.read_csv(directory / f"{name}_cell_2d_embedding_coordinates.csv")
        assert sorted(part.cell_label) == sorted(of_cell[of_cell == name].index)


def test_newer_release_changes_are_in_the_real_files(generated_bucket):
    """Re-assigned cells change cluster in cell_to_cluster_membership; dropped and added cells leave
    and enter cell_metadata.csv (and the taxonomy's files)."""
    bucket = generated_bucket.bucket_dir
    changes = generated_bucket.changes[CONSENSUS_WMB]

    def read(dataset, release, stem):
        return pd.read_csv(bucket / f"metadata/{dataset}/{release}/{stem}.csv")

    old_cluster = read(TAXONOMY, OLD_RELEASE, "cell_to_cluster_membership").set_index("cell_label").cluster_alias
    new_cluster = read(TAXONOMY, NEW_RELEASE, "cell_to_cluster_membership").set_index("cell_label").cluster_alias
    both = old_cluster.index.intersection(new_cluster.index)
    assert sorted(both[old_cluster[both] != new_cluster[both]]) == changes.reassigned
    old_cells = set(read(CONSENSUS_WMB, OLD_RELEASE, "cell_metadata").cell_label)
    new_cells = set(read(CONSENSUS_WMB, NEW_RELEASE, "cell_metadata").cell_label)
    assert sorted(old_cells - new_cells) == changes.removed and sorted(new_cells - old_cells) == changes.added
    assert set(old_cluster.index) - set(new_cluster.index) == set(changes.removed)
    assert set(new_cluster.index) - set(old_cluster.index) == set(changes.added)


def test_taxonomy_sizes_follow_the_real_ones():
    assert FixtureSpec(clusters=6721).term_set_sizes == {
        "neurotransmitter": 22, "neighborhood": 9, "class": 43, "subclass": 414, "supertype": 1386, "cluster": 6721}
    for clusters in (6, 12, 48, 500, 3000):
        sizes = FixtureSpec(clusters=clusters).term_set_sizes
        assert 2 <= sizes["neurotransmitter"] <= 22 and 2 <= sizes["neighborhood"] <= 9
        assert 2 <= sizes["class"] <= sizes["subclass"] <= sizes["supertype"] <= sizes["cluster"] == clusters
    taxonomy = make_taxonomy(FixtureSpec(clusters=500))
    assert taxonomy.neurotransmitter_names[-1] == "NN" and len(set(taxonomy.cluster_alias)) == 500
    assert (taxonomy.alias_index(taxonomy.cluster_alias[::-1]) == np.arange(500)[::-1]).all()


def test_release_history(generated_bucket):
    """Four releases: none with consensus data, the one that adds them, one that adds another dataset
    only, and one that re-versions the AIBS cells and the taxonomy."""
    assert generated_bucket.releases == [PRE_CONSENSUS_RELEASE, OLD_RELEASE, UNCHANGED_RELEASE, NEW_RELEASE]
    assert generated_bucket.consensus_releases == [OLD_RELEASE, UNCHANGED_RELEASE, NEW_RELEASE]
    pre, old, unchanged = (_manifest(generated_bucket, r) for r in (PRE_CONSENSUS_RELEASE, OLD_RELEASE,
                                                                     UNCHANGED_RELEASE))
    assert not set(CONSENSUS_DATASETS) & set(pre["directory_listing"])
    assert {"WMB-10Xv2", "WMB-10Xv3", WMB_TAXONOMY} <= set(pre["directory_listing"])
    assert WMB_GENE_KEY in generated_bucket.files[PRE_CONSENSUS_RELEASE]
    assert set(CONSENSUS_DATASETS) <= set(old["directory_listing"])
    # UNCHANGED_RELEASE adds one dataset directory, dated itself, and keeps every other one (same keys,
    # same bytes).
    assert set(unchanged["directory_listing"]) - set(old["directory_listing"]) == {NEW_DATASET}
    assert unchanged["directory_listing"][NEW_DATASET]["directories"]["metadata"]["version"] == UNCHANGED_RELEASE
    for dataset in old["directory_listing"]:
        assert unchanged["directory_listing"][dataset] == old["directory_listing"][dataset]
        assert unchanged["file_listing"][dataset] == old["file_listing"][dataset]
    assert set(generated_bucket.files[UNCHANGED_RELEASE]) - set(generated_bucket.files[OLD_RELEASE]) == {
        k for k in generated_bucket.files[UNCHANGED_RELEASE] if k.startswith(f"metadata/{NEW_DATASET}/")}


def test_whole_atlas_quirks(generated_bucket):
    """The other datasets carry the real manifests' quirks."""
    manifest = _manifest(generated_bucket, NEW_RELEASE)
    keys = generated_bucket.files[NEW_RELEASE]
    kinds = {kind for body in manifest["directory_listing"].values() for kind in body["directories"]}
    assert kinds == {"metadata", "expression_matrices", "image_volumes", "mapmycells"}
    extensions = {ext for kinds_ in manifest["file_listing"].values() for tags in kinds_.values()
                  for entry in tags.values() for sub in ([entry] if "files" in entry else entry.values())
                  for ext in sub["files"]}
    assert extensions == {"csv", "h5ad", "h5", "json", "nii.gz", "db", "geojson"}
    assert any("/views/" in k for k in keys) and any("/geojsons/" in k and k.endswith(".geojson") for k in keys)
    ccf = manifest["file_listing"]["Allen-CCF-2020"]["image_volumes"]
    assert ccf["annotation_25"]["files"]["nii.gz"]["relative_path"].endswith("/annotation_25.nii.gz")
    # An empty kind entry whose directory is listed (its files lie deeper than the listing).
    assert manifest["file_listing"][HMBA_BG]["image_volumes"] == {}
    assert manifest["directory_listing"][HMBA_BG]["directories"]["image_volumes"]["total_size"] > 0
    # A directory whose total_size is not the sum of its listed files.
    listed = sum(e["files"]["csv"]["size"] for e in manifest["file_listing"][WMB_TAXONOMY]["metadata"].values())
    assert manifest["directory_listing"][WMB_TAXONOMY]["directories"]["metadata"]["total_size"] != listed
    # Every listed file exists with its size and MD5.
    for key in keys:
        assert (generated_bucket.bucket_dir / key).is_file()
    # WMB-taxonomy's cluster_alias values overlap the consensus taxonomy's.
    bucket = generated_bucket.bucket_dir
    ours = pd.read_csv(bucket / f"metadata/{TAXONOMY}/{OLD_RELEASE}/cluster.csv").cluster_alias
    theirs = pd.read_csv(bucket / f"metadata/{WMB_TAXONOMY}/20231215/cluster.csv").cluster_alias
    assert set(ours) & set(theirs) and set(theirs) - set(ours)


def test_gene_sets_differ(generated_bucket):
    """Macosko's gene.csv and WMB-10X's gene.csv are overlapping, different sets; each dataset's matrices
    carry its own set."""
    bucket = generated_bucket.bucket_dir
    wmb = pd.read_csv(bucket / WMB_GENE_KEY)
    macosko = pd.read_csv(bucket / f"metadata/{MACOSKO}/{OLD_RELEASE}/gene.csv")
    assert list(wmb.columns) == WMB_GENE_COLUMNS
    assert len(wmb) == generated_bucket.spec.genes and 0.5 * len(wmb) < len(macosko) < 0.8 * len(wmb)
    shared = set(wmb.gene_identifier) & set(macosko.gene_identifier)
    assert shared and set(macosko.gene_identifier) - shared and set(wmb.gene_identifier) - shared
    assert {"Snap25", "Gad1", "Olig2", "Mbp"} <= set(wmb.gene_symbol) & set(macosko.gene_symbol)
    for key, genes in (("expression_matrices/WMB-10Xv2/20230630/WMB-10Xv2-HPF-raw.h5ad", wmb),
                       (f"expression_matrices/{MACOSKO}/{OLD_RELEASE}/Macosko-10X-HPF-log2.h5ad", macosko)):
        var = ad.read_h5ad(bucket / key, backed="r").var
        assert list(var.index) == list(genes.gene_identifier)
        assert list(var.gene_symbol) == list(genes.gene_symbol)


def test_example_gene_expression(generated_bucket):
    bucket = generated_bucket.bucket_dir
    for dataset, release in ((CONSENSUS_WMB, OLD_RELEASE), (CONSENSUS_WMB, NEW_RELEASE), (MACOSKO, OLD_RELEASE)):
        example = pd.read_csv(bucket / f"metadata/{dataset}/{release}/views/example_gene_expression.csv")
        cells = pd.read_csv(bucket / f"metadata/{dataset}/{release}/cell_metadata.csv")
        assert example.columns[0] == "cell_label" and len(example.columns) > 3
        assert example.cell_label.tolist() == cells.cell_label.tolist()
        assert example.drop(columns="cell_label").notna().all().all()
        assert (example.drop(columns="cell_label") > 0).any().any()


def test_large_csv_tables_are_written_as_pandas_writes_them(tmp_path):
    from etl.fixtures.csv_writer import write_csv

    n = 20_000  # above the size where the direct writer takes over
    frame = pd.DataFrame({"cell_label": [f"c{i:06d}-x" for i in range(n)], "x": np.linspace(-1.5, 3.0, n),
                          "cluster_alias": np.arange(n) * 7, "empty": [None if i % 3 else "v" for i in range(n)]})
    frame.loc[5, "x"] = np.nan
    write_csv(frame, tmp_path / "direct.csv")
    frame.to_csv(tmp_path / "pandas.csv", index=False, lineterminator="\n")
    assert (tmp_path / "direct.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()
    quoted = frame.assign(cell_label=frame.cell_label.str.replace("-x", ",x"))  # needs quoting: pandas writes it
    write_csv(quoted, tmp_path / "quoted.csv")
    assert pd.read_csv(tmp_path / "quoted.csv").cell_label.tolist() == quoted.cell_label.tolist()


def test_direct_csv_writer_formats_every_kind_of_value_as_pandas(tmp_path, monkeypatch):
    """Floats in every regime of Python's repr (the fixed-point fast path and the others), integers,
    booleans, categoricals and text with missing values, in several blocks; a field to quote in a late
    block hands the whole table to pandas."""
    from etl.fixtures import csv_writer

    monkeypatch.setattr(csv_writer, "CSV_BLOCK_ROWS", 4096)
    rng = np.random.default_rng(3)
    n = 30_000
    special = [0.0, -0.0, 1e-05, -5e-05, 0.0001, 9.9e-05, 3.0, -7.0, 123456789.123456, 999999999.999999, 1e9,
               1e15, 1e16, 1.5e300, 1e-300, np.inf, -np.inf, np.nan, 0.1 + 0.2, 2.5e-07]
    floats = np.concatenate([special, np.round(rng.normal(0, 10, n - len(special)), 6)])
    floats[len(special)::7] = np.round(floats[len(special)::7], 4)
    floats[len(special)::11] = rng.normal(0, 1e-3, len(floats[len(special)::11]))  # not rounded
    text = np.array([f"label-{i}" for i in range(n)], dtype=object)
    text[::13] = None
    columns = {
        "value": rng.permutation(floats),
        "count": rng.integers(-10**12, 10**12, n),
        "small": rng.integers(0, 200, n).astype(np.int16),
        "flag": rng.random(n) < 0.5,
        "region": pd.Categorical.from_codes(rng.integers(-1, 3, n), ["HPF", "", "Isocortex"]),
        "text": text,
        "cell_label": np.array([f"AC{i:08d}-1" for i in range(n)], dtype="S"),  # bytes: how labels are kept
    }
    csv_writer.write_columns(tmp_path / "direct.csv", columns)  # raises if it would leave any of it to pandas
    frame = pd.DataFrame({**columns, "cell_label": columns["cell_label"].astype("U")})
    frame.to_csv(tmp_path / "pandas.csv", index=False, lineterminator="\n")
    assert (tmp_path / "direct.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()
    late = frame.assign(text=frame.text.where(frame.index != n - 2, 'say "hi", then\nleave'))
    with pytest.raises(csv_writer.LeftToPandas):
        csv_writer.write_columns(tmp_path / "partial.csv", {**columns, "text": late.text.to_numpy()})
    csv_writer.write_csv(late, tmp_path / "late.csv")
    late.to_csv(tmp_path / "late-pandas.csv", index=False, lineterminator="\n")
    assert (tmp_path / "late.csv").read_bytes() == (tmp_path / "late-pandas.csv").read_bytes()


def test_generated_tables_keep_their_bytes():
    """The consensus CSVs of one spec (above the direct writer's size; metadata only, to stay quick) are,
    byte for byte, what the generator wrote when pandas' to_csv wrote every table (main at b57ea58):
    the fast writers changed no byte. A deliberate change of the generated data changes this digest:
    record the new one."""
    import hashlib
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        bucket = make_bucket(Path(tmp), FixtureSpec(seed=31, cells=24000, genes=150, clusters=40, regions=2,
                                                    metadata_only=True))
        files = sorted(bucket.bucket_dir.glob("metadata/Consensus-*/**/*.csv"))
        lines = [f"{p.relative_to(bucket.bucket_dir).as_posix()} {md5_of_file(p)}" for p in files]
    assert len(lines) == 32
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == \
        "3acaffd7d208bdad7344dc3e5b56742c27d6ddb600574b81cbfca50b174c9389"
