"""docs/analysts.md runs as written: its SQL through ``psql`` and its pandas code, as ``abc_reader``.

Two releases go through the CLI (the older one's metadata only, the newer one whole and aggregated,
its diff stored at load), then the doc's blocks run against them with the libpq variables the doc
tells analysts to set (``PGOPTIONS`` makes the session ``abc_reader``). The answers are checked
against the generated source files. R is not installed here: its blocks are checked to hold the
same SQL, not run.
"""

from __future__ import annotations

import glob
import io
import os
import re
import shutil
import subprocess

import pandas as pd
import pytest
import sqlalchemy as sa

from etl import source
from etl.cli import EXIT_OK, main
from etl.discovery import discover
from etl.fixtures import CONSENSUS_WMB, MACOSKO, NEW_RELEASE, OLD_RELEASE, TAXONOMY
from tests.conftest import REPO
from tests.test_monitor import metadata_csv

DOC = REPO / "docs" / "analysts.md"
QUESTIONS = ["gad1", "cells_per_class", "changes"]  # the DataFrames the doc's pandas blocks name


def _blocks(language: str) -> list[str]:
    """The doc's fenced blocks of ``language`` from its SQL part on."""
    text = DOC.read_text().split("## SQL: connect", 1)[1]
    return [m.group(1) for m in re.finditer(rf"```{language}\n(.*?)```", text, re.S)]


def _psql() -> str:
    found = shutil.which("psql") or max(glob.glob("/usr/lib/postgresql/*/bin/psql"), default=None)
    assert found, "psql not found (installed with PostgreSQL; scripts/ensure-postgres.sh)"
    return found


def _libpq_env(database_url: str) -> dict[str, str]:
    """The doc's PG* variables for the test database, the session made ``abc_reader`` as an analyst's login is."""
    url = sa.engine.make_url(database_url)
    env = {"PGHOST": url.host, "PGPORT": str(url.port or 5432), "PGDATABASE": url.database,
           "PGUSER": url.username, "PGOPTIONS": "-c role=abc_reader"}
    return env | ({"PGPASSWORD": url.password} if url.password else {})


def _psql_csv(env: dict[str, str], sql: str) -> subprocess.CompletedProcess:
    return subprocess.run([_psql(), "-X", "--csv", "-v", "ON_ERROR_STOP=1"], input=sql, text=True,
                          capture_output=True, env=os.environ | env)


@pytest.fixture
def loaded(settings, engine, monkeypatch):
    """OLD_RELEASE's metadata published, then NEW_RELEASE published whole (metadata, expression, diff)."""
    discover(source.make_client(settings), settings, engine)
    monkeypatch.setenv("ABC_MIRROR_ROOT", settings.mirror_root)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", settings.endpoint_url)
    url = ["--database-url", settings.database_url]
    mirror = ["mirror", "--target", settings.mirror_root, "--no-progress", *url]
    assert main([*mirror, "--release", OLD_RELEASE, "--kind", "metadata"]) == EXIT_OK
    assert main(["load", "--release", OLD_RELEASE, *url]) == EXIT_OK
    assert main([*mirror, "--release", NEW_RELEASE]) == EXIT_OK
    assert main(["load", "--release", NEW_RELEASE, *url]) == EXIT_OK
    assert main(["aggregate", "--release", NEW_RELEASE, *url]) == EXIT_OK
    return settings


def _expected_cells_per_class(generated_bucket) -> dict[tuple[str, str], int]:
    """(dataset, class name) -> cells of NEW_RELEASE with a cluster, from the generated CSVs."""
    membership = metadata_csv(generated_bucket, NEW_RELEASE, TAXONOMY, "cell_to_cluster_membership")
    terms = metadata_csv(generated_bucket, NEW_RELEASE, TAXONOMY, "cluster_to_cluster_annotation_membership")
    classes = terms[terms.cluster_annotation_term_set_name == "class"][
        ["cluster_alias", "cluster_annotation_term_name"]]
    out = {}
    for dataset in (CONSENSUS_WMB, MACOSKO):
        cells = metadata_csv(generated_bucket, NEW_RELEASE, dataset, "cell_metadata")[["cell_label"]]
        named = cells.merge(membership, on="cell_label").merge(classes, on="cluster_alias")
        out |= {(dataset, name): n for name, n in named["cluster_annotation_term_name"].value_counts().items()}
    return out


def test_the_three_questions_run_as_documented(loaded, engine, generated_bucket, monkeypatch):
    sql_blocks, python_blocks, r_blocks = _blocks("sql"), _blocks("python"), _blocks("r")
    assert len(sql_blocks) == len(QUESTIONS) and len(python_blocks) == len(r_blocks) == len(QUESTIONS) + 1
    # The pandas and R blocks ask the very SQL the psql blocks ask.
    assert [re.search(r'pd\.read_sql\("""\n(.*?)""", engine\)', b, re.S).group(1) for b in python_blocks[1:]] \
        == sql_blocks
    assert [re.search(r'dbGetQuery\(con, "\n(.*?)"\)', b, re.S).group(1) for b in r_blocks[1:]] == sql_blocks

    env = _libpq_env(loaded.database_url)
    refused = _psql_csv(env, "SELECT count(*) FROM abc.cell;")
    assert refused.returncode != 0 and "permission denied" in refused.stderr  # the session is abc_reader

    namespace: dict = {}
    with monkeypatch.context() as session:  # undone before the test database is dropped
        for variable, value in env.items():
            session.setenv(variable, value)
        for block in python_blocks:
            exec(block, namespace)  # the doc's code as an analyst pastes it
        namespace["engine"].dispose()
    answers = {}
    for name, sql in zip(QUESTIONS, sql_blocks, strict=True):
        result = _psql_csv(env, sql)
        assert result.returncode == 0, result.stderr
        answers[name] = pd.read_csv(io.StringIO(result.stdout), dtype=namespace[name].dtypes.to_dict())
        pd.testing.assert_frame_equal(answers[name], namespace[name])

    # 1. Gad1: the ten highest means of the release's clusters, as the group-major arrays store them too,
    # each over the cluster's cells in the generated metadata.
    gad1 = answers["gad1"]
    with engine.connect() as conn:
        profile = pd.DataFrame(conn.execute(sa.text(
            "SELECT dataset, group_name AS cluster, mean FROM abc.cluster_profile "
            "WHERE release = :r AND gene_symbol = 'Gad1'"), {"r": NEW_RELEASE}).all())
    top = profile.sort_values(["mean", "dataset", "cluster"], ascending=[False, True, True]).head(10)
    assert len(gad1) == 10 and list(zip(gad1.dataset, gad1.cluster, strict=True)) \
        == list(zip(top.dataset, top.cluster, strict=True))
    assert list(gad1["mean"]) == pytest.approx(list(top["mean"]), rel=1e-12)
    membership = metadata_csv(generated_bucket, NEW_RELEASE, TAXONOMY, "cell_to_cluster_membership")
    terms = metadata_csv(generated_bucket, NEW_RELEASE, TAXONOMY, "cluster_to_cluster_annotation_membership")
    cluster_names = terms[terms.cluster_annotation_term_set_name == "cluster"].set_index(
        "cluster_alias")["cluster_annotation_term_name"]
    for row in gad1.itertuples():
        cells = metadata_csv(generated_bucket, NEW_RELEASE, row.dataset, "cell_metadata")[["cell_label"]]
        clusters = cells.merge(membership, on="cell_label")["cluster_alias"].map(cluster_names)
        assert row.n_cells == (clusters == row.cluster).sum()
        assert 0 < row.fraction <= 1

    # 2. Cells per class, per dataset: the generated CSVs' counts.
    cells_per_class = answers["cells_per_class"]
    assert dict(zip(zip(cells_per_class.dataset, cells_per_class.class_name, strict=True),
                    cells_per_class.n_cells, strict=True)) == _expected_cells_per_class(generated_bucket)

    # 3. What changed: against the older release, the generator's added, removed and re-assigned cells.
    changes = answers["changes"]
    assert set(zip(changes.old_release, changes.new_release, strict=True)) == {(OLD_RELEASE, NEW_RELEASE)}
    wmb_cells = changes[(changes.dataset == CONSENSUS_WMB) & (changes.subject == "cell")]
    expected = generated_bucket.changes[CONSENSUS_WMB]
    assert dict(zip(wmb_cells.change, wmb_cells["items"], strict=True)) == {
        "added": len(expected.added), "removed": len(expected.removed), "reassigned": len(expected.reassigned)}
