"""The CLI runs the release's steps as the DAG does: lineage recorded, checks before publish, diff at load time."""

from __future__ import annotations

import sys

import sqlalchemy as sa

from etl import source
from etl.cli import EXIT_OK, main
from etl.discovery import discover
from etl.fixtures import CONSENSUS_WMB, NEW_RELEASE, OLD_RELEASE


def test_cli_chain_records_lineage_checks_and_the_diff(settings, engine, generated_bucket, monkeypatch, capsys):
    discover(source.make_client(settings), settings, engine)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", settings.endpoint_url)

    url = settings.database_url.replace("postgres@", "postgres:s3cret@")  # trust auth: ignored, never recorded

    def cli(*args: str) -> int:
        arguments = [*args, "--database-url", url]
        monkeypatch.setattr(sys, "argv", ["abc-mirror", *arguments])  # what lineage records as the invocation
        return main(arguments)

    for release in (OLD_RELEASE, NEW_RELEASE):
        assert cli("mirror", "--release", release, "--target", settings.mirror_root, "--no-progress") == EXIT_OK
        assert cli("load", "--release", release) == EXIT_OK
        assert cli("aggregate", "--release", release) == EXIT_OK
    out = capsys.readouterr().out
    assert f"release {NEW_RELEASE} published; data-quality checks passed" in out
    assert f"release notes: {settings.mirror_path / 'releases' / NEW_RELEASE / 'release-notes.md'}" in out

    with engine.connect() as conn:
        sources = conn.execute(sa.text("SELECT DISTINCT step, run_ref, source_key FROM "
                                       "abc.lineage_sources('abc.expression_by_cluster', :r)"),
                               {"r": NEW_RELEASE}).all()
        steps = conn.execute(sa.text("SELECT step, status, orchestrator FROM abc.lineage_run WHERE release = :r "
                                     "ORDER BY id"), {"r": NEW_RELEASE}).all()
        checks = conn.execute(sa.text("SELECT count(*), bool_and(passed) FROM abc.quality_check "
                                      "WHERE release = :r"), {"r": NEW_RELEASE}).one()
        diff = conn.execute(sa.text("SELECT summary FROM abc.release_diff WHERE old_release = :o "
                                    "AND new_release = :n"), {"o": OLD_RELEASE, "n": NEW_RELEASE}).scalar_one()
        published = conn.execute(sa.text("SELECT release FROM abc.alert WHERE kind = 'published' "
                                         "ORDER BY release")).scalars().all()
    assert [s.step for s in steps] == ["discover", "mirror", "load_metadata", "aggregate"]
    assert all(s.status == "succeeded" for s in steps) and {s.orchestrator for s in steps[1:]} == {"cli"}
    matrices = {k for k in generated_bucket.files[NEW_RELEASE] if k.endswith("-log2.h5ad")}
    cells = {k for k in generated_bucket.files[NEW_RELEASE] if k.endswith("/cell_metadata.csv")}
    assert {key for step, _, key in sources if step == "aggregate"} <= matrices
    assert {key for step, _, key in sources if step == "load_metadata"} >= cells
    masked = url.replace(":s3cret@", ":***@")
    assert {(step, ref) for step, ref, _ in sources} == {
        ("aggregate", f"cli abc-mirror aggregate --release {NEW_RELEASE} --database-url {masked}"),
        ("load_metadata", f"cli abc-mirror load --release {NEW_RELEASE} --database-url {masked}")}
    assert checks == (5, True)
    changes = generated_bucket.changes[CONSENSUS_WMB]
    assert diff[CONSENSUS_WMB]["cell"] == {"added": len(changes.added), "removed": len(changes.removed),
                                           "reassigned": len(changes.reassigned)}
    assert published == [OLD_RELEASE, NEW_RELEASE]
