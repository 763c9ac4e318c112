"""Monitoring on the two generated releases: diff, release notes, quality checks, status, lag, webhook alerts."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from etl import aggregate, alerts, db, diff, monitor, quality, source
from etl.catalog import cell_assignments
from etl.cli import main
from etl.discovery import discover
from etl.fixtures import (
    CONSENSUS_RELEASES,
    CONSENSUS_WMB,
    MACOSKO,
    NEW_RELEASE,
    OLD_RELEASE,
    TAXONOMY,
)
from etl.load import load_release_metadata
from tests.conftest import scoped_keys


class Webhook:
    """A local HTTP receiver on 127.0.0.1 collecting the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def kinds(self) -> list[str]:
        return [body["kind"] for body in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/hook"


def load(settings, generated_bucket, release: str) -> None:
    # What the consensus scope loads (the other datasets are not loaded).
    files = {k: generated_bucket.bucket_dir / k for k in scoped_keys(generated_bucket, release)
             if k.startswith("metadata/")}
    with db.disposing_engine(settings.database_url) as engine:
        load_release_metadata(engine, release, files)


@pytest.fixture
def both_loaded(settings, engine, generated_bucket):
    discover(source.make_client(settings), settings, engine)
    for release in generated_bucket.consensus_releases:
        load(settings, generated_bucket, release)
    return settings


def manifest_files(generated_bucket, release: str) -> dict[tuple, tuple[str, str]]:
    """(dataset, kind, tag, normalization) -> (key, md5) of the consensus scope, read straight from the
    manifest JSON."""
    manifest = json.loads((generated_bucket.bucket_dir / "releases" / release / "manifest.json").read_text())
    scoped = set(scoped_keys(generated_bucket, release))
    out = {}
    for dataset, kinds in manifest["file_listing"].items():
        for kind, tags in kinds.items():
            for tag, entry in tags.items():
                for norm, sub in ([("", entry)] if "files" in entry else entry.items()):
                    for file_type, f in sub["files"].items():
                        if f["relative_path"] in scoped:
                            out[(dataset, kind, tag, norm, file_type)] = (f["relative_path"], f["file_hash"])
    return out


def metadata_csv(generated_bucket, release: str, dataset: str, stem: str) -> pd.DataFrame:
    (key,) = [k for k in generated_bucket.files[release] if k.startswith(f"metadata/{dataset}/")
              and k.endswith(f"/{stem}.csv")]
    return pd.read_csv(generated_bucket.bucket_dir / key, dtype={"cell_label": str})


def cell_clusters(generated_bucket, release: str) -> pd.Series:
    """cell_label -> cluster_alias of the consensus WMB cells: each cell's row of the taxonomy's
    cell_to_cluster_membership.csv (the real layout)."""
    cells = metadata_csv(generated_bucket, release, CONSENSUS_WMB, "cell_metadata")
    membership = metadata_csv(generated_bucket, release, TAXONOMY, "cell_to_cluster_membership")
    return cells[["cell_label"]].merge(membership, on="cell_label").set_index("cell_label")["cluster_alias"]


def expected_cells_per_class(generated_bucket, release: str) -> dict[str, int]:
    """class name -> cells of the release's consensus datasets, from the generated CSVs."""
    cells = pd.concat([metadata_csv(generated_bucket, release, d, "cell_metadata")[["cell_label"]]
                       for d in (CONSENSUS_WMB, MACOSKO)])
    membership = metadata_csv(generated_bucket, release, TAXONOMY, "cell_to_cluster_membership")
    terms = metadata_csv(generated_bucket, release, TAXONOMY, "cluster_to_cluster_annotation_membership")
    classes = terms[terms.cluster_annotation_term_set_name == "class"][
        ["cluster_alias", "cluster_annotation_term_name"]]
    named = cells.merge(membership, on="cell_label", how="left").merge(classes, on="cluster_alias", how="left")
    return named["cluster_annotation_term_name"].fillna(diff.NO_CLASS).value_counts().to_dict()


def test_cell_diff_matches_the_generator(both_loaded, engine, generated_bucket):
    diff.record(engine, OLD_RELEASE, NEW_RELEASE, both_loaded.run_scope)
    with engine.connect() as conn:
        items = pd.DataFrame(conn.execute(sa.text(
            "SELECT change, item, old_value, new_value FROM abc.release_diff_item WHERE old_release = :o "
            "AND new_release = :n AND subject = 'cell' AND dataset = :d"),
            {"o": OLD_RELEASE, "n": NEW_RELEASE, "d": CONSENSUS_WMB}).all())
    changes = generated_bucket.changes[CONSENSUS_WMB]
    for change, expected in (("reassigned", changes.reassigned), ("removed", changes.removed),
                             ("added", changes.added)):
        assert sorted(items[items.change == change].item) == sorted(expected)
    old, new = cell_clusters(generated_bucket, OLD_RELEASE), cell_clusters(generated_bucket, NEW_RELEASE)
    moved = items[items.change == "reassigned"]
    assert list(moved.old_value) == [str(old[c]) for c in moved.item]
    assert list(moved.new_value) == [str(new[c]) for c in moved.item]
    assert (moved.old_value != moved.new_value).all()
    removed, added = items[items.change == "removed"], items[items.change == "added"]
    assert list(removed.old_value) == [str(old[c]) for c in removed.item] and removed.new_value.isna().all()
    assert list(added.new_value) == [str(new[c]) for c in added.item] and added.old_value.isna().all()


def test_diff_between_loaded_releases_is_stored_and_rendered(both_loaded, engine, generated_bucket, monkeypatch):
    settings = both_loaded
    md, html = monitor.record_diff(settings, engine, NEW_RELEASE, old=OLD_RELEASE)
    assert (md, html) == (settings.mirror_path / "releases" / NEW_RELEASE / "release-notes.md",
                          settings.mirror_path / "releases" / NEW_RELEASE / "release-notes.html")

    old, new = manifest_files(generated_bucket, OLD_RELEASE), manifest_files(generated_bucket, NEW_RELEASE)
    expected_files = {
        "added": len(new.keys() - old.keys()), "removed": len(old.keys() - new.keys()),
        "changed": sum(old[k][1] != new[k][1] for k in old.keys() & new.keys()),
        "moved": sum(old[k][1] == new[k][1] and old[k][0] != new[k][0] for k in old.keys() & new.keys())}
    assert expected_files["changed"] > 0 and expected_files["moved"] > 0  # the fixture exercises both
    changes = generated_bucket.changes[CONSENSUS_WMB]
    # Only Macosko has a gene.csv in the consensus release (AIBS genes are the WMB matrices').
    genes = {r: set(metadata_csv(generated_bucket, r, MACOSKO, "gene").gene_identifier)
             for r in generated_bucket.consensus_releases}
    with engine.connect() as conn:
        summary = conn.execute(sa.text("SELECT summary FROM abc.release_diff WHERE old_release = :o "
                                       "AND new_release = :n"), {"o": OLD_RELEASE, "n": NEW_RELEASE}).scalar_one()
        stored = conn.execute(sa.text("SELECT subject, change, count(*) FROM abc.release_diff_item "
                                      "GROUP BY 1, 2")).all()
    result = diff.record(engine, OLD_RELEASE, NEW_RELEASE, settings.run_scope)
    assert summary == result.summary
    assert {(s, c): n for s, c, n in stored} == {(s, c): result.count(s, c) for by_subject in summary.values()
                                                 for s, by_change in by_subject.items() for c in by_change}
    assert {c: result.count("file", c) for c in expected_files} == expected_files
    assert summary[CONSENSUS_WMB]["cell"] == {"added": len(changes.added), "removed": len(changes.removed),
                                              "reassigned": len(changes.reassigned)}
    assert result.count("cell", "added") == len(changes.added)  # no other dataset's cells changed
    assert result.count("cluster", "added") + result.count("cluster", "removed") == 0
    assert result.count("gene", "added") == len(genes[NEW_RELEASE] - genes[OLD_RELEASE])
    assert result.count("gene", "removed") == len(genes[OLD_RELEASE] - genes[NEW_RELEASE])
    assert summary[CONSENSUS_WMB]["directory"] == {"changed": 1}
    assert summary[TAXONOMY]["directory"] == {"changed": 1}

    notes = md.read_text()
    assert notes.startswith(f"# Release {NEW_RELEASE}: changes since {OLD_RELEASE}\n")
    assert (f"| {CONSENSUS_WMB} | cell | {len(changes.added)} | {len(changes.removed)} | 0 | 0 | "
            f"{len(changes.reassigned)} |") in notes
    assert f"- changed: `{CONSENSUS_WMB}: metadata` {OLD_RELEASE} → {NEW_RELEASE}" in notes
    per_class = result.cells_per_class
    assert {c.class_name: c.old for c in per_class if c.old} == expected_cells_per_class(generated_bucket, OLD_RELEASE)
    assert {c.class_name: c.new for c in per_class if c.new} == expected_cells_per_class(generated_bucket, NEW_RELEASE)
    assert sum(c.new - c.old for c in per_class) == len(changes.added) - len(changes.removed)
    assert [c.class_name for c in per_class] == sorted(c.class_name for c in per_class)
    for c in per_class:
        assert f"| {c.class_name} | {c.old} | {c.new} | {c.new - c.old:+d} |" in notes
    page = html.read_text()
    assert (page.count(f'<rect class="bar" data-release="{NEW_RELEASE}"')
            == page.count(f'<rect class="bar" data-release="{OLD_RELEASE}"') == len(per_class))
    assert "<script" not in page and "http://www.w3.org/2000/svg" in page

    # The notes list the first items of each change by (dataset, item), then how many more.
    monkeypatch.setattr(diff, "LISTED_PER_CHANGE", 2)
    short = diff.release_notes_markdown(diff.record(engine, OLD_RELEASE, NEW_RELEASE,
                                                    settings.run_scope, keep=False))
    moved = sorted((k[0], new[k][0], old[k][0]) for k in old.keys() & new.keys()
                   if old[k][1] == new[k][1] and old[k][0] != new[k][0])
    listed = [line for line in short.splitlines() if line.startswith("- moved: ")]
    assert listed == [f"- moved: `{d}: {key}` {was} → {key}" for d, key, was in moved[:2]] + [
        f"- moved: `… and {len(moved) - 2} more`"]


def test_quality_checks_pass_then_block_publish_and_alert(both_loaded, engine, webhook):
    settings = both_loaded
    results = quality.run_quality_checks(engine, OLD_RELEASE)
    assert [r.name for r in results] == list(quality.CHECKS)
    assert all(r.passed for r in results), results
    quality.require_passing(results, OLD_RELEASE)

    with engine.begin() as conn:
        broken = conn.execute(sa.text("UPDATE abc.gene SET gene_symbol = '' WHERE release = :r AND gene_identifier IN "
                                      "(SELECT gene_identifier FROM abc.gene WHERE release = :r "
                                      "ORDER BY gene_identifier LIMIT 2) RETURNING gene_identifier"),
                              {"r": OLD_RELEASE}).scalars().all()
    settings = settings.with_overrides(webhook_url=webhook.url)
    results = monitor.check_release(settings, engine, OLD_RELEASE)
    failed = [r for r in results if not r.passed]
    assert [(r.name, r.failing) for r in failed] == [("gene_symbol_present", len(broken))]
    assert set(failed[0].details.split(", ")) == set(broken)
    with pytest.raises(quality.QualityCheckFailed, match="gene_symbol_present failed"):
        quality.require_passing(results, OLD_RELEASE)
    (body,) = webhook.received
    assert body["kind"] == "failed_check" and body["release"] == OLD_RELEASE
    assert body["details"]["checks"][0]["name"] == "gene_symbol_present"
    assert body["details"]["checked"]["published_at"]  # the published rows were checked

    # Checked again (a retried task, the monitor's next run): the same failure is not alerted again.
    monitor.check_release(settings, engine, OLD_RELEASE)
    assert webhook.kinds() == ["failed_check"]
    # A new failure of the same release is.
    with engine.begin() as conn:
        more = conn.execute(sa.text("UPDATE abc.gene SET gene_symbol = '' WHERE release = :r AND gene_identifier = "
                                    "(SELECT max(gene_identifier) FROM abc.gene WHERE release = :r) "
                                    "RETURNING gene_identifier"), {"r": OLD_RELEASE}).scalars().all()
    monitor.check_release(settings, engine, OLD_RELEASE)
    monitor.check_release(settings, engine, OLD_RELEASE)
    assert webhook.kinds() == ["failed_check", "failed_check"]
    assert webhook.received[-1]["details"]["checks"][0]["failing"] == len(broken) + len(more)
    results = quality.run_quality_checks(engine, OLD_RELEASE)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM abc.alert WHERE kind = 'failed_check'")).scalar() == 2
        stored = dict(conn.execute(sa.text("SELECT name, passed FROM abc.quality_check WHERE release = :r"),
                                   {"r": OLD_RELEASE}).all())
    assert stored == {r.name: r.passed for r in results}


def test_expression_check_fails_when_aggregated_and_metadata_counts_differ(settings, engine, generated_bucket,
                                                                         tmp_path):
    discover(source.make_client(settings), settings, engine)
    load(settings, generated_bucket, OLD_RELEASE)
    matrices = sorted((generated_bucket.bucket_dir / "expression_matrices" / MACOSKO / OLD_RELEASE).glob("*-log2.h5ad"))
    with db.copy_connection(settings.database_url) as conn:
        taxonomy = aggregate.release_taxonomy(conn, OLD_RELEASE)
        cells = cell_assignments(conn, OLD_RELEASE, MACOSKO)
        partials = [aggregate.aggregate_file(p, cells, taxonomy, tmp_path / f"{p.stem}.npz") for p in matrices]
        aggregate.merge_and_publish(conn, OLD_RELEASE, {MACOSKO: partials}, taxonomy)

    def expression_check() -> quality.CheckResult:
        results = quality.run_quality_checks(engine, OLD_RELEASE)
        return {r.name: r for r in results}["expression_cells_match_metadata"]

    assert expression_check() == quality.CheckResult("expression_cells_match_metadata", True, 0, "")
    with engine.connect() as conn:
        groups = dict(conn.execute(sa.text(
            "SELECT t.cluster_alias, e.group_label || '|' || e.n_cells FROM abc.expression_group e "
            "JOIN abc.cluster_membership t ON t.release = e.release AND t.cluster_annotation_term_set_name = 'cluster' "
            "AND t.cluster_annotation_term_label = e.group_label WHERE e.release = :r AND e.dataset = :d "
            "AND e.grouping = 'cluster' ORDER BY e.n_cells DESC LIMIT 2"), {"r": OLD_RELEASE, "d": MACOSKO}).all())
        (source_alias, source_group), (target_alias, target_group) = groups.items()
        cell = conn.execute(sa.text("SELECT cell_label FROM abc.cell_cluster_membership WHERE release = :r "
                                    "AND cluster_alias = :a AND cell_label IN (SELECT cell_label FROM abc.cell "
                                    "WHERE release = :r AND dataset = :d) LIMIT 1"),
                            {"r": OLD_RELEASE, "a": source_alias, "d": MACOSKO}).scalar_one()
    (source_label, source_n), (target_label, target_n) = (g.split("|") for g in (source_group, target_group))
    expected = {f"{MACOSKO} {source_label}: {source_n} aggregated, {int(source_n) - 1} in metadata",
                f"{MACOSKO} {target_label}: {target_n} aggregated, {int(target_n) + 1} in metadata"}
    # The cell moves to another cluster in the metadata, once through the taxonomy's cell_to_cluster_membership
    # (the consensus layout), once through its own cluster_alias (which wins over the membership row).
    for move, undo in (
            ("UPDATE abc.cell_cluster_membership SET cluster_alias = :to WHERE release = :r AND cell_label = :c",
             "UPDATE abc.cell_cluster_membership SET cluster_alias = :back WHERE release = :r AND cell_label = :c"),
            ("UPDATE abc.cell SET cluster_alias = :to WHERE release = :r AND cell_label = :c",
             "UPDATE abc.cell SET cluster_alias = NULL WHERE release = :r AND cell_label = :c")):
        values = {"to": target_alias, "back": source_alias, "r": OLD_RELEASE, "c": cell}
        with engine.begin() as conn:
            conn.execute(sa.text(move), values)
        failed = expression_check()
        assert (failed.passed, failed.failing) == (False, 2)
        assert set(failed.details.split("; ")) == expected
        with engine.begin() as conn:
            conn.execute(sa.text(undo), values)
        assert expression_check().passed


def test_new_release_and_lag_alerts(settings, engine, generated_bucket, webhook):
    discover(source.make_client(settings), settings, engine)
    load(settings, generated_bucket, OLD_RELEASE)
    settings = settings.with_overrides(webhook_url=webhook.url, max_lag_hours=24.0)

    # Each release from the history floor, once; the one before it is not announced.
    assert monitor.announce_new_releases(settings, engine) == generated_bucket.consensus_releases
    assert monitor.announce_new_releases(settings, engine) == []
    assert [b["release"] for b in webhook.received] == generated_bucket.consensus_releases

    current = monitor.check_lag(settings, engine)
    assert (current.newest_upstream, current.newest_published) == (NEW_RELEASE, OLD_RELEASE)
    assert webhook.kinds() == ["new_release"] * 3  # seen minutes ago: within the allowed lag
    monitor.check_lag(settings, engine, now=datetime.now(UTC) + timedelta(hours=25))
    lag = webhook.received[-1]
    assert lag["kind"] == "lag" and lag["details"]["newest_published"] == OLD_RELEASE
    assert lag["details"]["lag_hours"] > 24
    monitor.check_lag(settings, engine, now=datetime.now(UTC) + timedelta(hours=49))  # still the same lag
    assert webhook.kinds() == ["new_release"] * 3 + ["lag"]

    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM abc.alert WHERE delivered")).scalar_one() == 4


def test_down_webhook_only_warns(engine, monkeypatch):
    warnings = []
    monkeypatch.setattr(alerts.log, "warning", lambda message, *args: warnings.append(message % args))
    alert = alerts.Alert("failed_run", "task abc_release.load failed", OLD_RELEASE)
    assert alerts.send(alert, closed_port_url(), engine) is False
    assert len(warnings) == 1 and "did not take the failed_run alert" in warnings[0]
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT kind, delivered FROM abc.alert")).one() == ("failed_run", False)


def test_status_and_diff_commands(both_loaded, engine, capsys, monkeypatch):
    settings = both_loaded
    monkeypatch.setenv("ABC_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    assert main(["status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["release", "status", "upstream"]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line[:8].isdigit()}
    assert set(CONSENSUS_RELEASES) <= rows.keys() and rows[NEW_RELEASE][1] == "published"
    assert f"lag: newest upstream {NEW_RELEASE}, newest published {NEW_RELEASE}, up to date" in lines

    assert main(["diff", OLD_RELEASE, NEW_RELEASE]) == 0
    out = capsys.readouterr().out
    assert out == (Path(settings.mirror_root).resolve() / "releases" / NEW_RELEASE / "release-notes.md").read_text()

    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM abc.release_diff"))
    assert main(["diff", OLD_RELEASE, NEW_RELEASE, "--no-store"]) == 0
    assert capsys.readouterr().out == out  # the same notes, nothing stored
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM abc.release_diff_item")).scalar_one() == 0
        assert conn.execute(sa.text("SELECT count(*) FROM abc.release_diff")).scalar_one() == 0


def test_a_webhook_that_is_down_is_logged_without_its_secret_path(caplog):
    url = closed_port_url().replace("/hook", "/services/T000/B000/XXXXSECRET")
    with caplog.at_level("WARNING", logger="etl.alerts"):
        assert not alerts.send(alerts.Alert("lag", "behind"), url)
    assert "did not take the lag alert" in caplog.text
    assert "XXXXSECRET" not in caplog.text and "/services" not in caplog.text
    assert "http://127.0.0.1:" in caplog.text and "/***" in caplog.text


def test_published_alert_goes_out_once_per_publication_however_often_notify_runs(both_loaded, engine, webhook):
    from etl import pipeline

    settings = both_loaded.with_overrides(webhook_url=webhook.url)

    def published_rows() -> list[tuple[bool, str]]:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT delivered, payload -> 'details' ->> 'published_at' FROM abc.alert "
                                        "WHERE kind = 'published' AND release = :r ORDER BY id"),
                                {"r": NEW_RELEASE}).all()

    first = pipeline.announce_published(settings, NEW_RELEASE)
    again = pipeline.announce_published(settings, NEW_RELEASE)  # the notify task retried or cleared
    assert webhook.kinds() == ["published"]
    assert [delivered for delivered, _ in published_rows()] == [True]
    assert first == again and first["published_at"]
    assert first["release_notes"] and Path(first["release_notes"][0]).is_file()

    # Published again (e.g. reloaded): a new state of the release, announced once more.
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE abc.release SET published_at = published_at + interval '1 hour' "
                             "WHERE version = :r"), {"r": NEW_RELEASE})
    pipeline.announce_published(settings, NEW_RELEASE)
    pipeline.announce_published(settings, NEW_RELEASE)
    assert webhook.kinds() == ["published", "published"]
    assert len({at for _, at in published_rows()}) == 2


def test_published_alert_without_a_webhook_is_recorded_once(both_loaded, engine):
    from etl import pipeline

    for _ in range(2):
        pipeline.announce_published(both_loaded.with_overrides(webhook_url=None), NEW_RELEASE)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM abc.alert WHERE kind = 'published'")).scalar() == 1
