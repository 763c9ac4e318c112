"""OpenLineage the Airflow way: a real DAG run sends each task's events through the transport the
deployment configures for Airflow's OpenLineage provider, with the task's datasets and our facets."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import sqlalchemy as sa

from etl import lineage, source
from etl.discovery import discover
from etl.fixtures import OLD_RELEASE
from etl.manifest import parse_manifest
from tests.conftest import REPO
from tests.test_monitor import Webhook


def test_a_dag_run_sends_start_and_complete_per_task_with_its_datasets(airflow_home, settings, engine,
                                                                       generated_bucket):
    discover(source.make_client(settings), settings, engine)
    receiver = Webhook()
    url = receiver.url.removesuffix("/hook")
    env = {**os.environ, "PYTHONPATH": str(REPO), "ABC_DATABASE_URL": settings.database_url,
           "AWS_ENDPOINT_URL_S3": settings.endpoint_url, "ABC_MIRROR_ROOT": settings.mirror_root, "ABC_WORKERS": "4",
           "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "http", "url": url}),
           "OPENLINEAGE_URL": url}  # the plain client's too: a step emitting events of its own would reach it
    for name in ("AIRFLOW__OPENLINEAGE__DISABLED", "OPENLINEAGE_DISABLED", "ABC_STAGE_OWNER"):
        env.pop(name, None)
    conf = {"release": OLD_RELEASE, "kinds": ["metadata"], "batch_bytes": 1 << 20}
    try:
        # A process of its own, as a worker runs a task: the provider reads its configuration at start.
        run = subprocess.run([str(Path(sys.executable).parent / "airflow"), "dags", "test", "abc_release",
                              "-c", json.dumps(conf)], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        receiver.close()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    events = defaultdict(list)  # (task, runId) -> event types, in the order received
    completed = {}
    for event in receiver.received:
        job = event["job"]["name"]
        assert not job.startswith("abc_mirror."), f"a step emitted its own event inside Airflow: {job}"
        if job.startswith("abc_release."):
            task = job.removeprefix("abc_release.")
            events[task, event["run"]["runId"]].append(event["eventType"])
            if event["eventType"] == "COMPLETE":
                completed.setdefault(task, []).append(event)
    ran = ["resolve", "plan", "mirror", "verify", "load_metadata", "merge", "validate", "publish", "lineage", "notify"]
    assert {task for task, _ in events} >= set(ran)
    for task in ran:
        assert [kinds for (t, _), kinds in events.items() if t == task] and all(
            kinds == ["START", "COMPLETE"] for (t, _), kinds in events.items() if t == task), (task, events)

    manifest_key = f"releases/{OLD_RELEASE}/manifest.json"
    manifest_bytes = (generated_bucket.bucket_dir / manifest_key).read_bytes()
    listed_md5 = {f.relative_path: f.md5 for f in parse_manifest(manifest_bytes, manifest_key).files}
    server = engine.url
    warehouse = f"postgres://{server.host}:{server.port}"
    with engine.connect() as conn:
        load_run = conn.execute(sa.text("SELECT run_uuid::text, id FROM abc.lineage_run WHERE release = :r AND "
                                        "step = 'load_metadata' AND status = 'succeeded'"), {"r": OLD_RELEASE}).one()
        loaded_keys = set(conn.execute(sa.text("SELECT name FROM abc.lineage_input WHERE run_id = :id AND kind = "
                                               "'object'"), {"id": load_run.id}).scalars())
        cells = conn.execute(sa.text("SELECT count(*) FROM abc.cell WHERE release = :r"), {"r": OLD_RELEASE}).scalar()

    (load,) = completed["load_metadata"]
    inputs = {d["name"]: d for d in load["inputs"]}
    assert {d["namespace"] for d in load["inputs"]} == {"s3://allen-brain-cell-atlas"}
    assert set(inputs) == loaded_keys and any(k.endswith("/cell_metadata.csv") for k in inputs)
    assert {k: d["facets"]["abcMirror_sourceObject"]["md5"] for k, d in inputs.items()} == \
        {k: listed_md5[k] for k in inputs}
    outputs = {d["name"]: d for d in load["outputs"]}
    cell = outputs[f"{server.database}.abc.cell"]
    assert cell["namespace"] == warehouse and cells > 0
    assert cell["outputFacets"]["outputStatistics"]["rowCount"] == cells
    assert cell["outputFacets"]["subset"]["outputCondition"] == {
        "type": "partition", "partitions": [{"dimensions": {"release": OLD_RELEASE}}]}
    assert {d["namespace"] for d in load["outputs"]} == {warehouse}
    (step,) = load["run"]["facets"]["abcMirror"]["steps"]
    assert step == {"step": "load_metadata", "release": OLD_RELEASE, "codeVersion": lineage.code_version(),
                    "manifestKey": manifest_key, "manifestMd5": hashlib.md5(manifest_bytes).hexdigest(),
                    "lineageRunId": load_run.run_uuid, "recorded": True}

    for mirror in completed["mirror"]:
        assert [(d["namespace"], d["name"]) for d in mirror["inputs"]] == [("s3://allen-brain-cell-atlas",
                                                                            manifest_key)]
        assert [d["name"] for d in mirror["outputs"]] == [f"{server.database}.abc.mirror_object"]
    assert completed["validate"][0]["inputs"] == [] and completed["validate"][0]["outputs"] == []

