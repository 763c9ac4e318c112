"""Lineage on a generated release: recorded steps, the auditor's SQL answer, OpenLineage events, the tree."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import jsonschema
import pytest
import sqlalchemy as sa
from openlineage.client import OpenLineageClient
from openlineage.client.transport import Transport
from openlineage.client.transport.file import FileConfig, FileTransport

from etl import db, lineage, lineage_report, pipeline, source
from etl.cli import EXIT_OK, main
from etl.discovery import discover
from etl.fixtures import MACOSKO, OLD_RELEASE, WMB_GENE_KEY
from etl.load import load_release_metadata
from etl.manifest import parse_manifest
from etl.mirror import mirror_release
from etl.publish import fail_stage
from tests.conftest import SERVER_URL

# The RunEvent of the OpenLineage spec (2-0-2), as JSON Schema: the client ships only attrs classes
# generated from the spec, not the spec itself, so the parts our events use are spelled out here.
_FACET = {"type": "object", "required": ["_producer", "_schemaURL"],
          "properties": {"_producer": {"type": "string", "minLength": 1},
                         "_schemaURL": {"type": "string", "pattern": "^https://openlineage.io/spec/"}}}
_DATASET = {"type": "object", "required": ["namespace", "name"],
            "properties": {"namespace": {"type": "string", "minLength": 1}, "name": {"type": "string", "minLength": 1},
                           "facets": {"type": "object", "additionalProperties": _FACET,
                                      "properties": {"version": {"allOf": [_FACET, {
                                          "required": ["datasetVersion"],
                                          "properties": {"datasetVersion": {"type": "string"}}}]}}}}}
RUN_EVENT_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["eventTime", "producer", "schemaURL", "eventType", "run", "job"],
    "properties": {
        "eventTime": {"type": "string", "minLength": 1},
        "producer": {"type": "string", "minLength": 1},
        "schemaURL": {"type": "string", "pattern": "^https://openlineage.io/spec/.*#/\\$defs/RunEvent$"},
        "eventType": {"enum": ["START", "RUNNING", "COMPLETE", "ABORT", "FAIL", "OTHER"]},
        "run": {"type": "object", "required": ["runId"],
                "properties": {"runId": {"type": "string", "format": "uuid"},
                               "facets": {"type": "object", "additionalProperties": _FACET}}},
        "job": {"type": "object", "required": ["namespace", "name"],
                "properties": {"namespace": {"type": "string"}, "name": {"type": "string"},
                               "facets": {"type": "object", "additionalProperties": _FACET}}},
        "inputs": {"type": "array", "items": _DATASET},
        "outputs": {"type": "array", "items": {"allOf": [_DATASET, {"properties": {"outputFacets": {
            "type": "object", "additionalProperties": _FACET,
            "properties": {"outputStatistics": {"allOf": [_FACET, {
                "required": ["rowCount"], "properties": {"rowCount": {"type": "integer", "minimum": 0}}}]}}}}}]}},
    },
}
EXPRESSION_TABLES = ["abc.expression_gene", "abc.expression_group", "abc.expression_gene_major",
                     "abc.expression_group_major"]


def file_emitter(path: Path) -> lineage.Emitter:
    return lineage.Emitter(OpenLineageClient(transport=FileTransport(FileConfig(log_file_path=str(path),
                                                                                append=True))))


class Recording(Transport):
    """Keeps every event emitted, in order."""

    kind = "recording"

    def __init__(self) -> None:
        self.events: list = []

    def emit(self, event) -> None:
        self.events.append(event)

    def runs(self) -> list[tuple[str, str, str]]:
        """(job, event type, runId) of each event."""
        return [(e.job.name.removeprefix("abc_mirror."), e.eventType.value, e.run.runId) for e in self.events]


def recording_emitter() -> tuple[lineage.Emitter, Recording]:
    transport = Recording()
    return lineage.Emitter(OpenLineageClient(transport=transport)), transport


def lineage_runs(engine: sa.Engine, release: str, step: str | None = None) -> list[sa.Row]:
    with engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT id, step, run_uuid::text AS run_uuid, status, state_key, published_at FROM abc.lineage_run "
            "WHERE release = :r AND (CAST(:s AS text) IS NULL OR step = :s) ORDER BY id"),
            {"r": release, "s": step}).all()


def current_writer(engine: sa.Engine, table: str, release: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT run_id FROM abc.lineage_current_writer WHERE table_name = :t "
                                    "AND release = :r"), {"t": table, "r": release}).scalar_one()


def read_events(path: Path) -> list[dict]:
    events = [json.loads(line) for line in path.read_text().splitlines()]
    validator = jsonschema.Draft202012Validator(RUN_EVENT_SCHEMA, format_checker=jsonschema.FormatChecker())
    for event in events:
        validator.validate(event)
        datetime.fromisoformat(event["eventTime"])
    return events


@pytest.fixture
def lineage_graph(settings, engine, generated_bucket, tmp_path):
    """The older release discovered, its metadata mirrored and loaded, and an aggregation step recorded."""
    release = OLD_RELEASE
    events = tmp_path / "events.jsonl"
    emitter = file_emitter(events)
    cli = lineage.RunContext.cli(["abc-mirror", "load", "--release", release])
    discover(source.make_client(settings), settings, engine)
    # Every object under the directories the release pins, also those its manifest does not list.
    manifest = json.loads((generated_bucket.bucket_dir / "releases" / release / "manifest.json").read_text())
    pinned = [generated_bucket.bucket_dir / d["relative_path"] for body in manifest["directory_listing"].values()
              for d in body["directories"].values()]
    objects = sum(1 for directory in pinned for path in directory.rglob("*") if path.is_file())
    assert objects > len(generated_bucket.files[release])
    assert lineage.record_source_objects(engine, source.make_client(settings), settings, release) == objects
    scope = settings.run_scope
    metadata = [k for k in generated_bucket.files[release]
                if k.startswith("metadata/") and (scope.has_loader(k.split("/")[1]) or k == WMB_GENE_KEY)]
    matrices = [k for k in generated_bucket.files[release]
                if k.endswith("-log2.h5ad") and k.split("/")[1] in (MACOSKO, "WMB-10Xv2", "WMB-10Xv3")]
    with lineage.step(engine, release=release, step="mirror", inputs=metadata, run=cli, emitter=emitter) as s:
        report = mirror_release(settings, engine, release, kinds=["metadata"], progress=False)
        s.wrote("abc.mirror_object", rows=report.ok)
    with lineage.step(engine, release=release, step="load_metadata", inputs=metadata, run=cli,
                      emitter=emitter) as s:
        loaded = load_release_metadata(engine, release,
                                       {k: generated_bucket.bucket_dir / k for k in metadata})
        for table, rows in loaded.table_rows.items():
            s.wrote(f"abc.{table}", partition=release, rows=rows)
    airflow = lineage.RunContext("airflow", dag_id="abc_release", dag_run_id="manual__1", task_id="merge",
                                 try_number=1)
    with lineage.step(engine, release=release, step="aggregate", inputs=matrices, run=airflow, emitter=emitter,
                      input_tables=["abc.cell", "abc.cluster_membership"]) as s:
        for table in EXPRESSION_TABLES:
            s.wrote(table, partition=release, rows=7)
    return release, metadata, matrices, events, emitter


def _listed_files(manifest: dict) -> dict[str, tuple[str, int]]:
    """relative_path -> (MD5, size) of every file a release manifest lists, however deep."""
    found = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "relative_path" in node and "file_hash" in node:
                found[node["relative_path"]] = (node["file_hash"], node["size"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(manifest)
    return found


def test_one_sql_statement_names_the_source_files_and_code_version(lineage_graph, engine, settings, generated_bucket):
    release, metadata, matrices, _, _ = lineage_graph
    rows = lineage_report.sources_of(engine, "abc.expression_by_cluster", release)
    by_step = {}
    for row in rows:
        by_step.setdefault(row.step, set()).add(row.source_key)
    # the matrices the aggregation read, and the metadata files behind abc.cell and the taxonomy
    assert by_step == {"aggregate": set(matrices), "load_metadata": set(metadata)}
    assert {row.code_version for row in rows} == {lineage.code_version()}
    manifest = generated_bucket.bucket_dir / "releases" / release / "manifest.json"
    listed = _listed_files(json.loads(manifest.read_text()))
    for row in rows:
        assert row.manifest_key == f"releases/{release}/manifest.json"
        assert (row.md5, row.size) == listed[row.source_key]  # what the release's manifest says of the file
        assert row.etag and row.last_modified
        if row.step == "load_metadata":
            assert row.mirror_path == str(Path(settings.mirror_root).resolve() / row.source_key)
            assert row.verified_at is not None
    assert {row.run_ref for row in rows if row.step == "aggregate"} == {"airflow abc_release/manual__1/merge try 1"}
    assert {row.run_ref for row in rows if row.step == "load_metadata"} == {f"cli abc-mirror load --release {release}"}
    # a table the aggregation did not feed: only the metadata load
    assert {row.step for row in lineage_report.sources_of(engine, "abc.cell_annotated", release)} == {"load_metadata"}


def test_events_are_valid_openlineage_with_inputs_outputs_and_row_counts(lineage_graph, generated_bucket):
    release, metadata, matrices, events_path, _ = lineage_graph
    events = read_events(events_path)
    assert [(e["job"]["name"], e["eventType"]) for e in events] == [
        ("abc_mirror.mirror", "START"), ("abc_mirror.mirror", "COMPLETE"),
        ("abc_mirror.load_metadata", "START"), ("abc_mirror.load_metadata", "COMPLETE"),
        ("abc_mirror.aggregate", "START"), ("abc_mirror.aggregate", "COMPLETE")]
    load_start, load_done = events[2], events[3]
    assert load_start["run"]["runId"] == load_done["run"]["runId"]
    assert {(d["namespace"], d["name"]) for d in load_done["inputs"]} == \
        {("s3://allen-brain-cell-atlas", key) for key in metadata}
    assert all(d["facets"]["version"]["datasetVersion"] == release for d in load_done["inputs"] + load_done["outputs"])
    cells = [d for d in load_done["outputs"] if d["name"].endswith(".abc.cell")]
    expected_cells = sum(len((generated_bucket.bucket_dir / k).read_text().splitlines()) - 1
                         for k in metadata if k.endswith("/cell_metadata.csv"))
    assert cells[0]["outputFacets"]["outputStatistics"]["rowCount"] == expected_cells
    server = sa.engine.make_url(SERVER_URL)
    assert cells[0]["namespace"] == f"postgres://{server.host}:{server.port or 5432}"
    assert cells[0]["outputFacets"]["subset"]["outputCondition"] == {
        "type": "partition", "partitions": [{"dimensions": {"release": release}}]}
    manifest_key = f"releases/{release}/manifest.json"
    manifest_bytes = (generated_bucket.bucket_dir / manifest_key).read_bytes()
    listed_md5 = {f.relative_path: f.md5 for f in parse_manifest(manifest_bytes, manifest_key).files}
    assert {d["name"]: d["facets"]["abcMirror_sourceObject"]["md5"] for d in load_done["inputs"]} == \
        {key: listed_md5[key] for key in metadata}
    assert load_done["run"]["facets"]["abcMirror"]["steps"] == [{
        "step": "load_metadata", "release": release, "codeVersion": lineage.code_version(),
        "manifestKey": manifest_key, "manifestMd5": hashlib.md5(manifest_bytes).hexdigest(),
        "lineageRunId": load_done["run"]["runId"], "recorded": True}]
    aggregate_done = events[5]
    assert {d["name"].split(".", 1)[1] for d in aggregate_done["inputs"] if d["namespace"].startswith("postgres")} \
        == {"abc.cell", "abc.cluster_membership"}


def test_failed_step_is_recorded_and_emits_fail(lineage_graph, engine, tmp_path):
    release = lineage_graph[0]
    events_path = tmp_path / "fail.jsonl"
    with pytest.raises(ValueError, match="bad row"), lineage.step(
            engine, release=release, step="load_metadata", inputs=["metadata/x.csv"], emitter=file_emitter(events_path),
            run=lineage.RunContext.cli(["abc-mirror", "load"])) as s:
        s.wrote("abc.cell", partition=release, rows=1)
        raise ValueError("bad row")
    start, fail = read_events(events_path)
    assert (start["eventType"], fail["eventType"]) == ("START", "FAIL")
    assert fail["run"]["facets"]["errorMessage"]["message"] == "ValueError: bad row"
    with engine.connect() as conn:
        row = conn.exec_driver_sql("SELECT status, error FROM abc.lineage_run ORDER BY id DESC LIMIT 1").one()
    assert tuple(row) == ("failed", "ValueError: bad row")
    # the failed run's output is not what abc.cell holds: the earlier load still answers
    assert {r.step for r in lineage_report.sources_of(engine, "abc.cell", release)} == {"load_metadata"}
    assert "metadata/x.csv" not in {r.source_key for r in lineage_report.sources_of(engine, "abc.cell", release)}


def test_steps_of_an_airflow_task_emit_nothing_and_hand_their_datasets_to_the_task(lineage_graph, engine, tmp_path):
    release, metadata, _, _, _ = lineage_graph
    events_path = tmp_path / "task.jsonl"
    with lineage.reported_by_task() as task:
        with lineage.step(engine, release=release, step="mirror", inputs=metadata[:1],
                          emitter=file_emitter(events_path)) as s:
            s.wrote("abc.mirror_object", partition=release, rows=1)
        with pytest.raises(ValueError, match="bad row"), lineage.step(
                engine, release=release, step="load_metadata", inputs=[*metadata[:1], "metadata/x.csv"],
                emitter=file_emitter(events_path)) as failed:
            failed.wrote("abc.cell", partition=release, rows=1)
            raise ValueError("bad row")
    assert not events_path.exists()  # the task's events (the provider's) carry them
    assert [(d.namespace, d.name) for d in task.inputs()] == [
        ("s3://allen-brain-cell-atlas", metadata[0]), ("s3://allen-brain-cell-atlas", "metadata/x.csv")]
    assert [d.name.split(".", 1)[1] for d in task.outputs()] == ["abc.mirror_object", "abc.cell"]
    steps = task.run_facets()["abcMirror"].steps
    assert [(x["step"], x["lineageRunId"], x["recorded"]) for x in steps] == [
        ("mirror", s.run_uuid, True), ("load_metadata", failed.run_uuid, True)]
    with engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT status FROM abc.lineage_run WHERE id = {failed.run_id}").scalar_one() \
            == "failed"


def test_failing_transport_only_warns(engine, settings, monkeypatch):
    discover(source.make_client(settings), settings, engine)

    class Down(Transport):
        kind = "down"

        def emit(self, event):
            raise ConnectionError("lineage backend down")

    warnings = []
    monkeypatch.setattr(lineage.log, "warning", lambda message, *args: warnings.append(message % args))
    # (discovery recorded the discover step of this manifest: a mirror step is a state not recorded yet)
    with lineage.step(engine, release=OLD_RELEASE, step="mirror", emitter=lineage.Emitter(OpenLineageClient(
            transport=Down())), inputs=[f"releases/{OLD_RELEASE}/manifest.json"]) as s:
        s.wrote("abc.mirror_object", partition=OLD_RELEASE, rows=3)
    assert warnings == [f"OpenLineage {state} event of abc_mirror.mirror not emitted: lineage backend down"
                        for state in ("START", "COMPLETE")]
    with engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT status FROM abc.lineage_run WHERE id = {s.run_id}").scalar_one() \
            == "succeeded"


def test_cli_prints_the_tree(lineage_graph, settings, capsys, monkeypatch):
    release, metadata, matrices, _, _ = lineage_graph
    monkeypatch.setenv("ABC_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    assert main(["lineage", "--release", release]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"release {release} (published)\n└─ manifest releases/{release}/manifest.json md5 ")
    assert "├─ load_metadata [succeeded] cli abc-mirror load --release" in out
    assert "└─ aggregate [succeeded] airflow abc_release/manual__1/merge try 1" in out
    for key in metadata:
        assert f"read {key} (" in out and str(Path(settings.mirror_root).resolve() / key) in out
    assert f"wrote abc.cell [{release}]: " in out
    assert sum(f"read {key}" in out for key in matrices) == len(matrices)


def test_a_step_executed_again_on_its_state_is_not_recorded_nor_emitted_again(lineage_graph, engine, settings,
                                                                               generated_bucket, caplog):
    release, metadata, _, events_path, emitter = lineage_graph
    (load,) = lineage_runs(engine, release, "load_metadata")
    cleared = lineage.RunContext("airflow", dag_id="abc_release", dag_run_id="manual__1", task_id="load_metadata",
                                 try_number=2)
    caplog.set_level(logging.INFO, logger=lineage.log.name)
    with lineage.step(engine, release=release, step="load_metadata", inputs=reversed(metadata), run=cleared,
                      emitter=emitter) as s:
        loaded = load_release_metadata(engine, release,
                                       {k: generated_bucket.bucket_dir / k for k in metadata})
        for table, rows in loaded.table_rows.items():
            s.wrote(f"abc.{table}", partition=release, rows=rows)
    assert not s.recorded and s.run_uuid == load.run_uuid
    assert [r.id for r in lineage_runs(engine, release, "load_metadata")] == [load.id]
    assert len(read_events(events_path)) == 6  # the fixture's three steps, START and COMPLETE each
    assert f"lineage run {load.run_uuid} already describes this state" in caplog.text
    assert {r.run_ref for r in lineage_report.sources_of(engine, "abc.cell", release)} == \
        {f"cli abc-mirror load --release {release}"}


def test_a_failed_attempt_then_a_succeeded_one_only_the_succeeded_one_is_the_source(lineage_graph, engine,
                                                                                    monkeypatch):
    release, metadata, _, _, _ = lineage_graph
    monkeypatch.setattr(lineage, "code_version", lambda: "0.2.0+gnewer")  # a new state of the load: new code
    emitter, recording = recording_emitter()

    def attempt(try_number: int, error: Exception | None = None) -> None:
        context = lineage.RunContext("airflow", dag_id="abc_release", dag_run_id="manual__2",
                                     task_id="load_metadata", try_number=try_number)
        with lineage.step(engine, release=release, step="load_metadata", inputs=metadata, run=context,
                          emitter=emitter) as s:
            s.wrote("abc.cell", partition=release, rows=5)
            if error:
                raise error

    with pytest.raises(OSError, match="disk full"):
        attempt(1, OSError("disk full"))
    attempt(2)
    attempt(3)  # cleared after it succeeded: the same state again
    failed, succeeded = lineage_runs(engine, release, "load_metadata")[1:]
    assert (failed.status, succeeded.status) == ("failed", "succeeded")
    assert failed.state_key == succeeded.state_key and failed.published_at is None
    assert recording.runs() == [("load_metadata", "START", failed.run_uuid), ("load_metadata", "FAIL", failed.run_uuid),
                                ("load_metadata", "START", succeeded.run_uuid),
                                ("load_metadata", "COMPLETE", succeeded.run_uuid)]
    assert current_writer(engine, "abc.cell", release) == succeeded.id
    assert {r.run_ref for r in lineage_report.sources_of(engine, "abc.cell", release) if r.step == "load_metadata"} == \
        {"airflow abc_release/manual__2/load_metadata try 2"}
    tree = lineage_report.tree_lines(engine, release)
    others = tree.index("   └─ 2 other runs, not behind what readers read:")
    assert any(line.startswith("   ├─ load_metadata [succeeded] airflow abc_release/manual__2/load_metadata try 2")
               for line in tree[:others])
    assert tree[others + 1].startswith("      ├─ load_metadata [superseded] cli abc-mirror load")
    assert tree[others + 2].startswith("      └─ load_metadata [failed] airflow abc_release/manual__2/load_metadata "
                                       "try 1") and tree[others + 2].endswith("; error: OSError: disk full")


def test_a_staged_run_is_the_source_once_its_stage_is_published(lineage_graph, engine, settings, monkeypatch):
    release = lineage_graph[0]
    (fixture_load,) = lineage_runs(engine, release, "load_metadata")
    monkeypatch.setattr(lineage, "code_version", lambda: "0.2.0+gnewer")  # a reload by newer code: a new state
    emitter, recording = recording_emitter()
    monkeypatch.setattr(lineage, "default_emitter", lambda: emitter)

    pipeline.load_metadata(settings, release)
    reload = lineage_runs(engine, release, "load_metadata")[-1]
    assert reload.status == "succeeded" and reload.published_at is None
    assert current_writer(engine, "abc.cell", release) == fixture_load.id  # readers read the published load
    assert any(line.startswith("      └─ load_metadata [staged] cli ")
               for line in lineage_report.tree_lines(engine, release))

    with db.copy_connection(settings.database_url) as conn:
        fail_stage(conn, release, "a check failed")
    assert current_writer(engine, "abc.cell", release) == fixture_load.id
    assert any(line.startswith("      └─ load_metadata [not published] cli ")
               for line in lineage_report.tree_lines(engine, release))

    pipeline.load_metadata(settings, release)  # the same state staged again: its run describes it
    assert lineage_runs(engine, release, "load_metadata")[-1].id == reload.id
    with db.copy_connection(settings.database_url) as conn:
        assert pipeline.publish_release(conn, release)
    assert current_writer(engine, "abc.cell", release) == reload.id
    assert recording.runs() == [("load_metadata", "START", reload.run_uuid),
                                ("load_metadata", "COMPLETE", reload.run_uuid)]
    tree = lineage_report.tree_lines(engine, release)
    assert tree[-2] == "   └─ 1 other run, not behind what readers read:"
    assert tree[-1].startswith("      └─ load_metadata [superseded] cli abc-mirror load")


def test_two_executions_finishing_one_state_at_once_leave_one_run(engine, settings):
    discover(source.make_client(settings), settings, engine)
    emitter, recording = recording_emitter()
    both_started = threading.Barrier(2, timeout=60)

    def execute(try_number: int) -> lineage.Step:
        context = lineage.RunContext("airflow", dag_id="abc_release", dag_run_id="manual__1", task_id="mirror",
                                     try_number=try_number)
        with lineage.step(engine, release=OLD_RELEASE, step="mirror", inputs=[f"releases/{OLD_RELEASE}/manifest.json"],
                          run=context, emitter=emitter) as s:
            both_started.wait()  # neither found the state completed: both recorded a run and emitted START
            s.wrote("abc.mirror_object", partition=OLD_RELEASE, rows=3)
        return s

    with ThreadPoolExecutor(2) as pool:
        steps = list(pool.map(execute, [1, 2]))
    (kept,) = lineage_runs(engine, OLD_RELEASE, "mirror")
    assert kept.status == "succeeded" and {s.run_uuid for s in steps} == {kept.run_uuid}
    events = recording.runs()
    started = {run_id for _, kind, run_id in events if kind == "START"}
    assert sorted(kind for _, kind, _ in events) == ["ABORT", "COMPLETE", "START", "START"]
    assert len(started) == 2 and kept.run_uuid in started
    assert {kind: run_id for _, kind, run_id in events if kind != "START"} == \
        {"COMPLETE": kept.run_uuid, "ABORT": (started - {kept.run_uuid}).pop()}
    # The database itself refuses a second succeeded run of one state.
    with pytest.raises(sa.exc.IntegrityError, match="lineage_run_state_key"), engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO abc.lineage_run (run_uuid, release, step, orchestrator, code_version, "
                             "status, state_key) VALUES (:u, :r, 'mirror', 'cli', 'x', 'succeeded', :k)"),
                     {"u": str(uuid.uuid4()), "r": OLD_RELEASE, "k": kept.state_key})


def test_the_cli_run_twice_records_and_emits_each_step_once(settings, engine, generated_bucket, monkeypatch, capsys):
    discover(source.make_client(settings), settings, engine)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", settings.endpoint_url)
    emitter, recording = recording_emitter()
    monkeypatch.setattr(lineage, "default_emitter", lambda: emitter)

    def chain() -> None:
        for command in ("mirror", "load", "aggregate"):
            arguments = [command, "--release", OLD_RELEASE, "--database-url", settings.database_url]
            arguments += ["--target", settings.mirror_root, "--no-progress"] if command == "mirror" else []
            monkeypatch.setattr(sys, "argv", ["abc-mirror", *arguments])
            assert main(arguments) == EXIT_OK, command

    chain()
    runs = lineage_runs(engine, OLD_RELEASE)
    events = recording.runs()
    assert [(r.step, r.status) for r in runs] == [("discover", "succeeded"), ("mirror", "succeeded"),
                                                  ("load_metadata", "succeeded"), ("aggregate", "succeeded")]
    assert events == [(r.step, kind, r.run_uuid) for r in runs[1:] for kind in ("START", "COMPLETE")]
    chain()
    assert [r.id for r in lineage_runs(engine, OLD_RELEASE)] == [r.id for r in runs]
    assert recording.runs() == events
    assert all(r.published_at is not None for r in lineage_runs(engine, OLD_RELEASE))
    tree = lineage_report.tree_lines(engine, OLD_RELEASE)
    assert not any("other run" in line for line in tree)
    assert pipeline.check_lineage(settings, OLD_RELEASE)["abc.expression_by_cluster"] > 0
