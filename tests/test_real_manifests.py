"""The three real release manifests (tests/data/real-manifests, sources in its SOURCES.md): parsing, their
quirks, the consensus-mouse scope's exact figures, discovery with its history floor, and planning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl import pipeline, source
from etl.config import Settings
from etl.discovery import discover
from etl.fixtures import BUCKET
from etl.manifest import Manifest, parse_manifest
from etl.mirror import mirror_release
from etl.s3server import S3Server, start_s3_server
from etl.scope import ATLAS, CONSENSUS_MOUSE, Scope, ScopeError, history_floor

REAL = Path(__file__).parent / "data" / "real-manifests"
VERSIONS = ["20231215", "20250531", "20260711"]
# SOURCES.md: datasets, files, bytes of each manifest.
TOTALS = {"20231215": (18, 243, 352_604_088_034), "20250531": (30, 333, 646_792_864_973),
          "20260711": (43, 590, 916_007_501_105)}
CONSENSUS = {"Consensus-WMB-AIBS-10X", "Consensus-WMB-Macosko-10X", "Consensus-WMB-integrated-taxonomy"}
AIBS_GENES = "metadata/WMB-10X/20241115/gene.csv"
AIBS_GENES_BYTES = 2_297_493


def real(version: str) -> Manifest:
    return parse_manifest((REAL / f"{version}.json").read_bytes(), f"{version}.json")


@pytest.mark.parametrize("version", VERSIONS)
def test_real_manifests_parse_whole(version):
    manifest = real(version)
    datasets, files, total = TOTALS[version]
    assert manifest.version == version
    assert (len({f.dataset for f in manifest.files} | {d.dataset for d in manifest.directories}),
            len(manifest.files), manifest.total_bytes) == (datasets, files, total)


def test_real_manifest_quirks_are_parsed():
    newest, oldest = real("20260711"), real("20231215")
    keys = [f.relative_path for f in newest.files]
    # Files below the version directory keep their sub-folder in the key and in no other field.
    assert any("/views/" in k for k in keys) and any("/geojsons/" in k for k in keys)
    assert {"image_volumes", "mapmycells"} <= {f.kind for f in newest.files}
    assert {"csv", "h5ad", "h5", "json", "nii.gz", "db", "geojson"} <= {f.file_type for f in newest.files}
    nii = next(f for f in newest.files if f.file_type == "nii.gz")
    assert nii.tag == nii.name.removesuffix(".nii.gz")
    # An empty {} kind entry: the directory is listed, no file.
    assert ("HMBA-10xMultiome-BG", "image_volumes") in {(d.dataset, d.kind) for d in newest.directories}
    assert not [f for f in newest.files if (f.dataset, f.kind) == ("HMBA-10xMultiome-BG", "image_volumes")]
    # A directory whose total_size is not the sum of its files is taken as listed, not "corrected".
    taxonomy = next(d for d in oldest.directories if d.relative_path == "metadata/WMB-taxonomy/20231215")
    listed = sum(f.size for f in oldest.files if f.relative_path.startswith(taxonomy.relative_path + "/"))
    assert taxonomy.total_size != listed
    # The h5ad normalizations are their own level: raw and log2 of a region have the same size.
    pair = [f for f in newest.files if f.tag == "WMB-10Xv3-MB"]
    assert sorted(f.normalization for f in pair) == ["log2", "raw"] and pair[0].size == pair[1].size


def test_consensus_scope_of_20260711_is_exactly_the_consensus_release():
    manifest = real("20260711")
    scope = Scope.named(CONSENSUS_MOUSE)
    files = scope.warehouse_files(manifest.files)
    assert {f.dataset for f in files} == CONSENSUS | {"WMB-10Xv2", "WMB-10Xv3", "WMB-10X"}
    genes = [f for f in files if f.dataset == "WMB-10X"]
    assert [(f.relative_path, f.size) for f in genes] == [(AIBS_GENES, AIBS_GENES_BYTES)]
    consensus = [f for f in files if f.dataset != "WMB-10X"]
    assert (len(consensus), sum(f.size for f in consensus)) == (92, 350_000_519_009)
    log2 = [f for f in scope.warehouse_files(manifest.select(normalizations=["log2"])) if f.dataset != "WMB-10X"]
    assert (len(log2), sum(f.size for f in log2)) == (59, 176_709_001_641)
    assert scope.mirrored(manifest.files) == files
    # The WMB matrices come in, the WMB metadata (and every other dataset) stays out, apart from the genes.
    assert not [f for f in files if f.dataset == "WMB-10X" and f.tag != "gene"]
    assert {f.relative_path.split("/")[2] for f in files if f.dataset in ("WMB-10Xv2", "WMB-10Xv3")} == {"20230630"}


def test_atlas_scope_mirrors_everything_and_loads_the_consensus_part():
    manifest = real("20260711")
    atlas, consensus = Scope.named(ATLAS), Scope.named(CONSENSUS_MOUSE)
    assert len(atlas.mirrored(manifest.files)) == 590
    assert atlas.warehouse_files(manifest.files) == consensus.warehouse_files(manifest.files)


def test_dataset_patterns_match_draft_names_and_refuse_datasets_without_loader():
    scope = Scope.named(CONSENSUS_MOUSE)
    assert scope.has_loader("Consensus-Mouse-Macosko-10X") and scope.has_loader("Consensus-WMB-AIBS-10X")
    assert not scope.has_loader("WMB-taxonomy")
    with pytest.raises(ScopeError, match="no loader for dataset.*WMB-taxonomy"):
        scope.require_loaders(["Consensus-WMB-AIBS-10X", "WMB-taxonomy"])
    with pytest.raises(ScopeError, match="unknown scope 'everything'"):
        Scope.named("everything")
    only_macosko = Scope.named(CONSENSUS_MOUSE, ["Consensus-WMB-Macosko-*"])
    assert {f.dataset for f in only_macosko.warehouse_files(real("20260711").files)} == {
        "Consensus-WMB-Macosko-10X", "WMB-10Xv2", "WMB-10Xv3", "WMB-10X"}


def test_history_floor_is_the_first_release_holding_the_scope():
    by_release = {v: {f.dataset for f in real(v).files} for v in VERSIONS}
    scope = Scope.named(CONSENSUS_MOUSE)
    assert history_floor(by_release, scope) == "20260711"
    assert history_floor({v: by_release[v] for v in VERSIONS[:2]}, scope) is None
    assert history_floor(by_release, scope, "20250531") == "20250531"
    with pytest.raises(ScopeError, match="ABC_FIRST_RELEASE"):
        history_floor(by_release, scope, "2025-05-31")


@pytest.fixture(scope="module")
def real_bucket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A bucket holding only the three real manifests, under their real keys, served over S3."""
    root = tmp_path_factory.mktemp("real")
    for version in VERSIONS:
        target = root / BUCKET / "releases" / version / "manifest.json"
        target.parent.mkdir(parents=True)
        shutil.copyfile(REAL / f"{version}.json", target)
    server = start_s3_server(root)
    yield server
    server.stop()


def test_discovery_of_the_real_history_skips_releases_before_the_floor(real_bucket, database_url, engine, tmp_path):
    settings = Settings(database_url=database_url, endpoint_url=real_bucket.endpoint_url,
                        mirror_root=str(tmp_path / "mirror"))
    report = discover(source.make_client(settings), settings, engine)
    assert report.new_releases == VERSIONS
    assert (report.floor, report.skipped, report.releases_to_process) == ("20260711", VERSIONS[:2], ["20260711"])
    with engine.connect() as conn:
        status = dict(conn.execute(sa.text("SELECT version, status FROM abc.release")).all())
    assert status == {"20231215": "skipped", "20250531": "skipped", "20260711": "upstream"}
    assert discover(source.make_client(settings), settings, engine).releases_to_process == []

    # Planning: the scheduled run's batches hold the consensus scope, not the 916 GB of the atlas.
    files = pipeline.release_files(engine, "20260711", settings.run_scope)
    assert (len(files), sum(f.size for f in files)) == (93, 350_000_519_009 + AIBS_GENES_BYTES)
    batches = pipeline.plan_batches(files)
    assert sorted(k for batch in batches for k in batch) == sorted(f.key for f in files)
    atlas = pipeline.release_files(engine, "20260711", Scope.named(ATLAS))
    assert (len(atlas), sum(f.size for f in atlas)) == (590, 916_007_501_105)

    dry = mirror_release(settings, engine, "20260711", dry_run=True)
    assert (dry.selected, dry.bytes_to_fetch) == (93, 350_000_519_009 + AIBS_GENES_BYTES)


def test_cli_dry_run_plans_the_scope_and_refuses_a_dataset_without_loader(real_bucket, database_url, engine,
                                                                         tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "etl.cli", *args, "--database-url", database_url],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "AWS_ENDPOINT_URL_S3": real_bucket.endpoint_url})

    settings = Settings(database_url=database_url, endpoint_url=real_bucket.endpoint_url)
    discover(source.make_client(settings), settings, engine)
    planned = cli("mirror", "--release", "20260711", "--dry-run", "--normalization", "log2",
                  "--target", str(tmp_path / "m"))
    assert planned.returncode == 0, planned.stderr
    assert "60 files selected" in planned.stdout and f"({176_709_001_641 + AIBS_GENES_BYTES} bytes)" in planned.stdout
    whole = cli("mirror", "--release", "20260711", "--dry-run", "--scope", "atlas", "--target", str(tmp_path / "m"))
    assert "590 files selected" in whole.stdout and "(916007501105 bytes)" in whole.stdout
    refused = cli("load", "--release", "20260711", "--dataset", "WMB-taxonomy")
    assert refused.returncode == 1 and "no loader for dataset(s) WMB-taxonomy" in refused.stderr
