"""The CLI runs the release's steps as the DAG does: lineage recorded, checks before publish, diff at load time."""

from __future__ import annotations

import sys

import sqlalchemy as sa

from etl import quality, source
from etl.cli import EXIT_OK, main
from etl.discovery import discover
from etl.fixtures import CONSENSUS_WMB, MACOSKO, NEW_RELEASE, OLD_RELEASE, PRE_CONSENSUS_RELEASE, UNCHANGED_RELEASE
from tests.conftest import scoped_keys


def test_cli_chain_records_lineage_checks_and_the_diff(settings, engine, generated_bucket, monkeypatch, capsys):
    discover(source.make_client(settings), settings, engine)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", settings.endpoint_url)

    url = settings.database_url.replace("postgres@", "postgres:s3cret@")  # trust auth: ignored, never recorded

    def cli(*args: str) -> int:
        arguments = [*args, "--database-url", url]
        monkeypatch.setattr(sys, "argv", ["abc-mirror", *arguments])  # what lineage records as the invocation
        return main(arguments)

    for release in generated_bucket.consensus_releases:
        assert cli("mirror", "--release", release, "--target", settings.mirror_root, "--no-progress") == EXIT_OK
        assert cli("load", "--release", release) == EXIT_OK
        assert cli("aggregate", "--release", release) == EXIT_OK
    out = capsys.readouterr().out
    assert f"release {NEW_RELEASE} published; data-quality checks passed" in out
    assert f"release {UNCHANGED_RELEASE}: scoped files unchanged since {OLD_RELEASE}; published by reference" in out
    assert f"release notes: {settings.mirror_path / 'releases' / NEW_RELEASE / 'release-notes.md'}" in out

    with engine.connect() as conn:
        sources = conn.execute(sa.text("SELECT DISTINCT step, run_ref, source_key FROM "
                                       "abc.lineage_sources('abc.expression_by_cluster', :r)"),
                               {"r": NEW_RELEASE}).all()
        steps = conn.execute(sa.text("SELECT step, status, orchestrator FROM abc.lineage_run WHERE release = :r "
                                     "ORDER BY id"), {"r": NEW_RELEASE}).all()
        checks = dict(conn.execute(sa.text("SELECT name, passed FROM abc.quality_check WHERE release = :r"),
                                   {"r": NEW_RELEASE}).all())
        diffs = dict(conn.execute(sa.text("SELECT new_release, summary FROM abc.release_diff")).all())
        published = conn.execute(sa.text("SELECT release FROM abc.alert WHERE kind = 'published' "
                                         "ORDER BY release")).scalars().all()
    assert [s.step for s in steps] == ["discover", "mirror", "load_metadata", "aggregate"]
    assert all(s.status == "succeeded" for s in steps) and {s.orchestrator for s in steps[1:]} == {"cli"}
    matrices = {k for k in generated_bucket.files[NEW_RELEASE]
                if k.endswith("-log2.h5ad") and k.split("/")[1] in {MACOSKO, "WMB-10Xv2", "WMB-10Xv3"}}
    cells = {k for k in generated_bucket.files[NEW_RELEASE]
             if k.endswith("/cell_metadata.csv") and settings.run_scope.has_loader(k.split("/")[1])}
    assert len(cells) == 2  # the consensus AIBS and Macosko cells; other datasets' cells are not in scope
    assert {key for step, _, key in sources if step == "aggregate"} <= matrices
    assert {key for step, _, key in sources if step == "load_metadata"} >= cells
    masked = url.replace(":s3cret@", ":***@")
    assert {(step, ref) for step, ref, _ in sources} == {
        ("aggregate", f"cli abc-mirror aggregate --release {NEW_RELEASE} --database-url {masked}"),
        ("load_metadata", f"cli abc-mirror load --release {NEW_RELEASE} --database-url {masked}")}
    assert checks == {name: True for name in quality.CHECKS}  # every check stored, and passed
    changes = generated_bucket.changes[CONSENSUS_WMB]
    assert diffs[NEW_RELEASE][CONSENSUS_WMB]["cell"] == {"added": len(changes.added), "removed": len(changes.removed),
                                                         "reassigned": len(changes.reassigned)}
    assert diffs[UNCHANGED_RELEASE] == {}  # the new dataset it adds is not in scope
    notes = (settings.mirror_path / "releases" / UNCHANGED_RELEASE / "release-notes.md").read_text()
    assert "No change in scope." in notes
    assert published == generated_bucket.consensus_releases

    # The unchanged release shares the older one's rows: nothing copied, reloaded or aggregated.
    with engine.connect() as conn:
        shared = conn.execute(sa.text("SELECT status, shares_data_with FROM abc.release WHERE version = :r"),
                              {"r": UNCHANGED_RELEASE}).one()
        own_rows = conn.execute(sa.text("SELECT count(*) FROM abc.cell WHERE release = :r"),
                                {"r": UNCHANGED_RELEASE}).scalar_one()
        shared_steps = conn.execute(sa.text("SELECT step FROM abc.lineage_run WHERE release = :r ORDER BY id"),
                                    {"r": UNCHANGED_RELEASE}).scalars().all()
        shared_sources = conn.execute(sa.text("SELECT DISTINCT source_key FROM "
                                              "abc.lineage_sources('abc.expression_by_cluster', :r)"),
                                      {"r": UNCHANGED_RELEASE}).scalars().all()
        reader_rows = conn.execute(sa.text(
            "SELECT count(*) FROM abc.expression_by_cluster WHERE release = "
            "(SELECT data_release FROM abc.published_release WHERE release = :r)"), {"r": UNCHANGED_RELEASE}).scalar()
    assert tuple(shared) == ("published", OLD_RELEASE) and own_rows == 0
    assert shared_steps == ["discover", "mirror", "publish_by_reference"]
    assert matrices <= set(shared_sources)
    assert reader_rows > 0
    # The newer release changed the AIBS cells only: the Macosko matrices' partials were reused, not re-read.
    work = settings.mirror_path / ".abc-work"
    macosko = sorted((work / NEW_RELEASE / "aggregate" / MACOSKO).glob("*.npz"))
    assert macosko and all(p.samefile(work / OLD_RELEASE / "aggregate" / MACOSKO / p.name) for p in macosko)
    aibs = sorted((work / NEW_RELEASE / "aggregate" / CONSENSUS_WMB).glob("*.npz"))
    assert aibs and not any(p.samefile(work / OLD_RELEASE / "aggregate" / CONSENSUS_WMB / p.name) for p in aibs)

    # status: every release, its files in scope, and every dataset's state.
    capsys.readouterr()
    assert cli("status", "--target", settings.mirror_root) == EXIT_OK
    status = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in status if line[:8].isdigit()}
    assert rows.keys() == set(generated_bucket.releases)
    assert rows[PRE_CONSENSUS_RELEASE][1] == "skipped"
    assert rows[UNCHANGED_RELEASE][1:4] == ["published", "(=", f"{OLD_RELEASE})"]
    in_scope = len(scoped_keys(generated_bucket, OLD_RELEASE))
    assert rows[OLD_RELEASE][1] == "published" and rows[OLD_RELEASE][4] == f"{in_scope}/0/{in_scope}"
    states = status[status.index("datasets per release (scope consensus-mouse):"):]
    loaded = "Consensus-WMB-AIBS-10X, Consensus-WMB-Macosko-10X, Consensus-WMB-integrated-taxonomy, WMB-10X, " \
             "WMB-10Xv2, WMB-10Xv3"
    others = len({k.split("/")[1] for k in generated_bucket.files[UNCHANGED_RELEASE]}) - 6
    block = states[states.index(f"  {UNCHANGED_RELEASE}:") + 1:][:2]
    assert block == [f"    not in scope: {others} datasets",
                     f"    published by reference (data of {OLD_RELEASE}): {loaded}"]
    assert states[states.index(f"  {OLD_RELEASE}:") + 2] == f"    published: {loaded}"
    assert states[states.index(f"  {PRE_CONSENSUS_RELEASE}:") + 1].startswith("    skipped: ")


def test_mirroring_a_release_discovery_has_not_seen_fetches_its_manifest_once(settings, engine, generated_bucket,
                                                                              monkeypatch):
    """The release is recorded from its manifest before the lineage step starts; the mirror then uses that manifest."""
    from etl import discovery, pipeline

    fetched: list[str] = []
    fetch = discovery.fetch_small_object

    def counted(client, settings, key: str):
        fetched.append(key)
        return fetch(client, settings, key)

    monkeypatch.setattr(discovery, "fetch_small_object", counted)
    report = pipeline.mirror(settings, OLD_RELEASE, kinds=["metadata"], progress=False)
    assert report.failed == {} and report.fetched > 0
    assert fetched == [f"releases/{OLD_RELEASE}/manifest.json"]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM abc.release WHERE version = :r"), {"r": OLD_RELEASE}).scalar()
        steps = conn.execute(sa.text("SELECT step FROM abc.lineage_run WHERE release = :r"), {"r": OLD_RELEASE})
        assert list(steps.scalars()) == ["mirror"]
