"""Faults injected for real (docs/reliability.md): after each, nothing half-written is visible to readers, and a
plain re-run publishes exactly what an undisturbed run publishes, with no row or file lost.

The undisturbed run mirrors, loads and aggregates the first consensus release of the small generated bucket
once per module; each test injects one fault into a run of its own (its own database and mirror), looks at
what a reader sees, re-runs, and compares every published table (row count and a digest of its rows) and
every verified mirrored file with the undisturbed run's. Faults covered by other modules are listed in
docs/reliability.md. With ``ABC_FAULT_REPORT=<path>`` the module writes the table of what it saw there.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import sqlalchemy as sa
from psycopg import sql

from etl import db, diff, source
from etl.abc_atlas_cache import DOWNLOADED_DATA, MANIFEST_LAST_USED
from etl.catalog import NotMirroredError, release_files_on_disk
from etl.cli import EXIT_OK, EXIT_UNUSABLE, main
from etl.config import Settings, target_name
from etl.discovery import discover
from etl.fixtures import BUCKET, CONSENSUS_WMB, OLD_RELEASE, md5_of_file
from etl.load import METADATA_TABLES, LoadError, load_release_metadata
from etl.mirror import mirror_release
from etl.publish import EXPRESSION_TABLES, staged_or_published
from etl.s3server import free_port, start_s3_server
from tests.conftest import REPO, SERVER_URL, scoped_keys

RELEASE = OLD_RELEASE
WAIT_S = 60  # how long a test waits for the moment it injects its fault


@dataclass(frozen=True)
class Published:
    """What readers get of a release: each published table's (rows, digest of its rows), and the verified
    mirrored files (key -> MD5)."""

    tables: dict[str, tuple[int, str]]
    files: dict[str, str]

    def lost(self, other: Published, tables: list[str] | None = None, files: bool = True) -> dict[str, int]:
        """Rows and files of ``self`` missing from ``other`` (only ``tables``, and files when asked)."""
        rows = sum(max(0, self.tables[t][0] - other.tables[t][0]) for t in (self.tables if tables is None else tables))
        missing = len(set(self.files.items()) - set(other.files.items())) if files else 0
        return {"rows": rows, "files": missing}


def published_tables(database_url: str, release: str, tables: list[str]) -> dict[str, tuple[int, str]]:
    """Each published table's row count and a digest of its rows (a matrix's local path reduced to its name)."""
    out = {}
    with db.copy_connection(database_url) as conn:
        for table in tables:
            row = sql.SQL("to_jsonb(t) - 'source' || jsonb_build_object('source', regexp_replace(t.source, '^.*/', ''))"
                          if table == "expression_file" else "to_jsonb(t)")
            count, digest = conn.execute(sql.SQL(
                "SELECT count(*), md5(coalesce(string_agg(r::text, '|' ORDER BY r::text), '')) FROM "
                "(SELECT {} AS r FROM {} t WHERE release = %s) x").format(row, sql.Identifier("abc", table)),
                (release,)).fetchone()
            out[table] = (count, digest)
    return out


def verified_files(engine: sa.Engine, settings: Settings, release: str) -> dict[str, str]:
    """The release's files the mirror recorded as verified in ``settings``' mirror root."""
    with engine.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT o.relative_path, o.md5 FROM abc.mirror_object o JOIN abc.release_file f "
            "ON f.relative_path = o.relative_path AND f.md5 = o.md5 AND f.size = o.size "
            "WHERE o.target = :t AND f.release = :r"), {"t": target_name(settings.mirror_root), "r": release}).all())


def published(settings: Settings, engine: sa.Engine, tables: list[str]) -> Published:
    return Published(published_tables(settings.database_url, RELEASE, tables),
                     verified_files(engine, settings, RELEASE))


def final_paths(settings: Settings) -> dict[str, Path]:
    """Files at their final place in the mirror (``.partial`` files, the work directory, the mirror's copy
    of the manifest and the abc_atlas_access client's bookkeeping are not), by key."""
    root = settings.mirror_path
    paths = {path.relative_to(root).as_posix(): path for path in root.rglob("*") if path.is_file()
             and ".partial" not in path.name} if root.exists() else {}
    return {key: path for key, path in paths.items() if not key.startswith((".abc-work/", "releases/"))
            and key not in (DOWNLOADED_DATA, MANIFEST_LAST_USED)}


def placed_files(settings: Settings, engine: sa.Engine) -> tuple[int, list[str]]:
    """How many files are at their final place, and those whose bytes are not the manifest's: what a reader
    of the mirror directory must never find."""
    with engine.connect() as conn:
        manifest = dict(conn.execute(sa.text("SELECT relative_path, md5 FROM abc.release_file WHERE release = :r"),
                                     {"r": RELEASE}).all())
    placed = final_paths(settings)
    return len(placed), sorted(key for key, path in placed.items() if manifest.get(key) != md5_of_file(path))


def reader_view(settings: Settings, staged: bool = True) -> dict[str, int]:
    """What a reader (another process: the analyst, the diff, the next stage) sees of the release's cells
    and expression: published rows and, with ``staged``, rows where ``staged_or_published`` points and the
    diff's cells (those wait while a publication moves the staged tables)."""
    view = {}
    with db.copy_connection(settings.database_url) as conn:
        for table in ("cell", "expression_group"):
            view[f"published {table}"] = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE release = %s").format(
                sql.Identifier("abc", table)), (RELEASE,)).fetchone()[0]
            if staged:
                view[f"read {table}"] = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE release = %s").format(
                    staged_or_published(conn, table, RELEASE)), (RELEASE,)).fetchone()[0]
    if staged:
        with db.disposing_engine(settings.database_url) as engine:
            view["diff cells"] = sum(c.new for c in diff.record(engine, RELEASE, RELEASE, settings.run_scope,
                                                                 keep=False).cells_per_class)
    return view


NOTHING_READ = {"published cell": 0, "read cell": 0, "published expression_group": 0, "read expression_group": 0,
                "diff cells": 0}


# -- the report -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    fault: str
    injected: str
    readers_during: str
    rerun: str
    lost: dict[str, int]
    test: str


OUTCOMES: list[Outcome] = []


@pytest.fixture(scope="module", autouse=True)
def fault_report() -> Iterator[None]:
    """Write the outcomes seen to ``ABC_FAULT_REPORT`` (a markdown table) when it is set."""
    yield
    path = os.environ.get("ABC_FAULT_REPORT")
    if not path or not OUTCOMES:
        return
    lines = ["| fault | how injected | what readers see during | what the re-run yields | rows, files lost | test |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {o.fault} | {o.injected} | {o.readers_during} | {o.rerun} | {o.lost['rows']}, {o.lost['files']} "
              f"| `tests/test_faults.py::{o.test}` |" for o in OUTCOMES]
    survived = sum(o.lost == {"rows": 0, "files": 0} for o in OUTCOMES)
    lines.append(f"\n{len(OUTCOMES)} faults injected, {survived} survived with nothing lost.")
    Path(path).write_text("\n".join(lines) + "\n")


def record(request: pytest.FixtureRequest, fault: str, injected: str, readers_during: str, rerun: str,
           lost: dict[str, int]) -> None:
    OUTCOMES.append(Outcome(fault, injected, readers_during, rerun, lost, request.node.name))


# -- runs -------------------------------------------------------------------------------------------------

def run_env(settings: Settings) -> dict[str, str]:
    """The environment of a run of ``settings`` (a CLI process, or this one through ``in_env``)."""
    return {"PYTHONPATH": str(REPO), "ABC_DATABASE_URL": settings.database_url,
            "ABC_MIRROR_ROOT": settings.mirror_root, "AWS_ENDPOINT_URL_S3": settings.endpoint_url,
            "OPENLINEAGE_DISABLED": "true", "ABC_WORKERS": "4"}


@contextlib.contextmanager
def in_env(settings: Settings) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in run_env(settings).items():
            patch.setenv(name, value)
        patch.delenv("ABC_STAGE_OWNER", raising=False)
        yield


def cli(settings: Settings, *args: str) -> subprocess.Popen:
    """``abc-mirror ARGS`` as a process of its own (the one a fault kills)."""
    env = {**os.environ, **run_env(settings)}
    env.pop("ABC_STAGE_OWNER", None)
    return subprocess.Popen([sys.executable, "-m", "etl.cli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run(settings: Settings, *args: str) -> int:
    """``abc-mirror ARGS`` in this process: the plain re-run."""
    with in_env(settings):
        return main([*args, "--database-url", settings.database_url])


def mirror(settings: Settings, *extra: str) -> int:
    return run(settings, "mirror", "--release", RELEASE, "--target", settings.mirror_root, "--no-progress", *extra)


def wait_for(condition: Callable[[], bool], what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the run ended (exit {process.returncode}) before {what}: {err[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {WAIT_S} s")
        time.sleep(0.02)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.communicate()


def backend_waiting(database_url: str, query_like: str, wait_event_type: str | None = None) -> Callable[[], bool]:
    """Whether a session of the database runs a statement like ``query_like`` (waiting on ``wait_event_type``)."""
    def check() -> bool:
        with db.copy_connection(database_url) as conn:
            return conn.execute("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database() "
                                "AND pid <> pg_backend_pid() AND state = 'active' AND query ILIKE %s "
                                "AND (%s::text IS NULL OR wait_event_type = %s))",
                                (query_like, wait_event_type, wait_event_type)).fetchone()[0]
    return check


@pytest.fixture(scope="module")
def undisturbed(s3_server, tmp_path_factory) -> Published:
    """The release as a run without faults publishes it: mirrored, loaded and aggregated."""
    url = sa.engine.make_url(SERVER_URL).set(database=f"abc_test_{uuid.uuid4().hex[:10]}").render_as_string(
        hide_password=False)
    db.create_database(url)
    engine = db.make_engine(url)
    try:
        db.upgrade(engine)
        settings = Settings(database_url=url, endpoint_url=s3_server.endpoint_url,
                            mirror_root=str(tmp_path_factory.mktemp("undisturbed") / "mirror"), workers=4)
        discover(source.make_client(settings), settings, engine)
        assert mirror(settings) == EXIT_OK
        assert run(settings, "load", "--release", RELEASE) == EXIT_OK
        assert run(settings, "aggregate", "--release", RELEASE) == EXIT_OK
        result = published(settings, engine, METADATA_TABLES + EXPRESSION_TABLES)
    finally:
        engine.dispose()
        db.drop_database(url)
    assert all(rows > 0 for rows, _ in result.tables.values()) and result.files
    return result


@pytest.fixture
def discovered(settings: Settings, engine: sa.Engine) -> Settings:
    discover(source.make_client(settings), settings, engine)
    return settings


@pytest.fixture
def mirrored(discovered: Settings) -> Settings:
    assert mirror(discovered) == EXIT_OK
    return discovered


# -- kill -9 ----------------------------------------------------------------------------------------------

FEED_LOAD = ("import json, sys; from pathlib import Path; from etl.db import make_engine; "
             "from etl.load import load_release_metadata; "
             "files = {k: Path(v) for k, v in json.loads(sys.argv[3]).items()}; "
             "load_release_metadata(make_engine(sys.argv[1]), sys.argv[2], files)")


def _feed_fifo(fifo: Path, data: bytes, fed: threading.Event, stop: threading.Event) -> None:
    """Serve ``data`` through the named pipe: to the openings that read only the header and to the one that
    reads on (the COPY), its header and first half; then nothing more (``fed``) until ``stop``."""
    header = data[:data.index(b"\n") + 1]
    while not stop.is_set():
        try:
            with open(fifo, "wb") as pipe:
                pipe.write(header)
                pipe.flush()
                pipe.write(data[len(header):len(data) // 2])
                pipe.flush()
                fed.set()
                stop.wait()
        except BrokenPipeError:  # a reader of the header only, or the killed COPY
            fed.clear()


def test_load_killed_mid_copy(request, mirrored, engine, undisturbed, tmp_path):
    settings = mirrored
    files = release_files_on_disk(settings, engine, RELEASE, kinds=["metadata"],
                                  keep=settings.run_scope.feeds_warehouse)
    (cells,) = [k for k in files if k.startswith(f"metadata/{CONSENSUS_WMB}/") and k.endswith("/cell_metadata.csv")]
    fifo = tmp_path / "cell_metadata.csv"
    os.mkfifo(fifo)
    fed, stop = threading.Event(), threading.Event()
    feeder = threading.Thread(target=_feed_fifo, args=(fifo, files[cells].read_bytes(), fed, stop), daemon=True)
    feeder.start()
    feed = {**{k: str(v) for k, v in files.items()}, cells: str(fifo)}
    loader = subprocess.Popen([sys.executable, "-c", FEED_LOAD, settings.database_url, RELEASE, json.dumps(feed)],
                              cwd=REPO, env={**os.environ, **run_env(settings)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        copying = backend_waiting(settings.database_url, "COPY %cell_r%", "Client")
        wait_for(lambda: fed.is_set() and copying(), "COPY of half of cell_metadata.csv", loader)
        during = reader_view(settings)
    finally:
        kill(loader)
        stop.set()
        with contextlib.suppress(OSError):  # let the feeder's last open return
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        feeder.join(timeout=10)
    after = reader_view(settings)
    assert during == after == NOTHING_READ

    assert run(settings, "load", "--release", RELEASE) == EXIT_OK
    again = published(settings, engine, METADATA_TABLES)
    assert again.tables == {t: undisturbed.tables[t] for t in METADATA_TABLES}
    record(request, "kill -9 of the load mid-COPY",
           "cell_metadata.csv fed through a named pipe that stops at half its bytes; the loader is killed while "
           "its COPY waits for the rest", "no cell of the release (published, staged or in a diff)",
           "`abc-mirror load` publishes every metadata table as the undisturbed run",
           undisturbed.lost(again, METADATA_TABLES, files=False))


def test_aggregation_killed_mid_file(request, mirrored, engine, undisturbed):
    from etl.aggregate import default_work_dir

    settings = mirrored
    assert run(settings, "load", "--release", RELEASE) == EXIT_OK
    work = default_work_dir(settings, RELEASE)
    aggregation = cli(settings, "aggregate", "--release", RELEASE, "--chunk-cells", "32")
    try:
        wait_for(lambda: len(list(work.rglob("*.h5ad.npz"))) >= 2, "two files aggregated", aggregation)
        during = reader_view(settings)
    finally:
        kill(aggregation)
    partials = len(list(work.rglob("*.h5ad.npz")))
    after = reader_view(settings)
    published_cells = undisturbed.tables["cell"][0]
    expected = {**NOTHING_READ, "published cell": published_cells, "read cell": published_cells,
                "diff cells": published_cells}
    assert during == after == expected  # the cells, no expression
    with db.copy_connection(settings.database_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'abc_staging'").fetchone()[0] == 0

    assert run(settings, "aggregate", "--release", RELEASE) == EXIT_OK
    again = published(settings, engine, METADATA_TABLES + EXPRESSION_TABLES)
    assert again.tables == undisturbed.tables
    record(request, "kill -9 of the aggregation mid-file",
           f"`abc-mirror aggregate` (32-cell chunks) killed once two files' partials were written ({partials} "
           "when killed)", "the published cells, no expression of the release",
           "`abc-mirror aggregate` publishes the same expression tables", undisturbed.lost(again, files=False))


def test_publication_killed(request, mirrored, engine, undisturbed):
    settings = mirrored
    with db.copy_connection(settings.database_url) as blocker:
        # Attaching the cell partition waits here: the loader is inside its publishing transaction.
        blocker.execute("LOCK TABLE abc.cell IN EXCLUSIVE MODE")
        loader = cli(settings, "load", "--release", RELEASE)
        try:
            wait_for(backend_waiting(settings.database_url, "%ATTACH PARTITION%", "Lock"), "publication", loader)
            during = reader_view(settings, staged=False)
        finally:
            kill(loader)
            blocker.rollback()
    after = reader_view(settings)
    with db.copy_connection(settings.database_url) as conn:
        staged = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'abc_staging'").fetchone()[0]
    assert staged > 0  # the killed run's stage is still there, and not read
    assert during == {"published cell": 0, "published expression_group": 0} and after == NOTHING_READ

    assert run(settings, "load", "--release", RELEASE) == EXIT_OK
    again = published(settings, engine, METADATA_TABLES)
    assert again.tables == {t: undisturbed.tables[t] for t in METADATA_TABLES}
    record(request, "kill -9 of the publication",
           "`abc-mirror load` killed inside its publishing transaction (attaching the cell partition waits for "
           "a lock the test holds)", "nothing published of the release (readers of its stage wait for the "
           "publication); once killed, nothing: its staged tables belong to a dead run",
           "`abc-mirror load` takes the stage over and publishes the same metadata",
           undisturbed.lost(again, METADATA_TABLES, files=False))


# -- PostgreSQL restarted -----------------------------------------------------------------------------------

@dataclass
class Cluster:
    data: Path
    url: str

    def pg_ctl(self, *args: str) -> None:
        binary = shutil.which("pg_ctl") or sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1]
        owner = pwd.getpwuid(self.data.stat().st_uid).pw_name
        prefix = ["runuser", "-u", owner, "--"] if os.getuid() == 0 else []
        subprocess.run([*prefix, str(binary), "-D", str(self.data), "-l", str(self.data.parent / "server.log"),
                        *args], check=True, capture_output=True, timeout=120)


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL cluster of this test's own (scripts/ensure-postgres.sh), so that restarting it
    disturbs no other test."""
    state = Path(tempfile.mkdtemp(prefix="abc-faults-pg-"))
    state.chmod(0o755)
    env = {**os.environ, "ABC_PG_DIR": str(state), "ABC_PG_PORT": str(free_port())}
    made = subprocess.run(["bash", str(REPO / "scripts" / "ensure-postgres.sh"), "abc_faults"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    cluster = Cluster(state / "data", made.stdout.strip())
    try:
        yield cluster
    finally:
        cluster.pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(state, ignore_errors=True)


def test_postgres_restarted_mid_load(request, own_cluster, s3_server, undisturbed, tmp_path):
    db.create_database(own_cluster.url)
    engine = db.make_engine(own_cluster.url)
    settings = Settings(database_url=own_cluster.url, endpoint_url=s3_server.endpoint_url,
                        mirror_root=str(tmp_path / "mirror"), workers=4)
    try:
        db.upgrade(engine)
        discover(source.make_client(settings), settings, engine)
        assert mirror(settings) == EXIT_OK
        blocker = db.copy_connection(settings.database_url)
        # The load stages the taxonomy, genes, donors and libraries, then waits here for abc.cell.
        blocker.execute("LOCK TABLE abc.cell IN ACCESS EXCLUSIVE MODE")
        loader = cli(settings, "load", "--release", RELEASE)
        try:
            wait_for(backend_waiting(settings.database_url, "CREATE TABLE%cell_r%", "Lock"), "load of abc.cell",
                     loader)
            own_cluster.pg_ctl("-m", "fast", "-w", "restart")
            out, err = loader.communicate(timeout=WAIT_S)
        finally:
            if loader.poll() is None:
                kill(loader)
            blocker.close()
        assert loader.returncode == EXIT_UNUSABLE and "error: database unreachable" in err, err
        assert "Traceback" not in err
        after = reader_view(settings)
        assert after == NOTHING_READ

        assert run(settings, "load", "--release", RELEASE) == EXIT_OK
        again = published(settings, engine, METADATA_TABLES)
    finally:
        engine.dispose()
    assert again.tables == {t: undisturbed.tables[t] for t in METADATA_TABLES}
    record(request, "PostgreSQL restarted mid-load",
           "`pg_ctl restart -m fast` of a throwaway cluster while `abc-mirror load` has staged seven tables "
           "and waits for abc.cell", f"nothing of the release; the load exits {EXIT_UNUSABLE}: database unreachable",
           "`abc-mirror load` publishes the same metadata", undisturbed.lost(again, METADATA_TABLES, files=False))


# -- the S3 server and the disk -----------------------------------------------------------------------------

def test_s3_server_stopped_mid_transfer_and_back(request, discovered, engine, undisturbed, generated_bucket):
    server = start_s3_server(generated_bucket.root)
    settings = replace(discovered, endpoint_url=server.endpoint_url)
    try:
        transfer = cli(settings, "mirror", "--release", RELEASE, "--target", settings.mirror_root, "--no-progress",
                       "--max-bandwidth", "8M", "--part-size", "1", "--workers", "2")
        wait_for(lambda: final_paths(settings) and any(settings.mirror_path.rglob("*.partial")),
                 "a file placed and another in transfer", transfer)
        server.process.kill()
        server.process.wait()
        time.sleep(1.0)
        placed, bad = placed_files(settings, engine)
        server = start_s3_server(generated_bucket.root, port=server.port)
        out, err = transfer.communicate(timeout=120)
    finally:
        server.stop()
    assert bad == [] and 0 < placed < len(undisturbed.files)
    first_exit = transfer.returncode
    rerun = "the same run resumes and completes" if first_exit == EXIT_OK else f"exit {first_exit}; re-run completes"
    if first_exit != EXIT_OK:
        assert mirror(settings) == EXIT_OK
    again = published(settings, engine, [])
    assert again.files == undisturbed.files and placed_files(settings, engine)[1] == []
    record(request, "the S3 server stopped mid-transfer and back",
           "`rclone serve s3` killed -9 while `abc-mirror mirror` (8 MB/s) has files placed and others in "
           "transfer, started again on its port after 1 s", f"only whole, verified files at their place ({placed} of "
           f"{len(undisturbed.files)}); the others as .partial", rerun,
           undisturbed.lost(again, []))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: room for the release's 20 MB, not for much more."""
    if os.getuid() != 0:
        pytest.skip("mounting a size-limited tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_disk_fills_up_mid_transfer(request, discovered, engine, undisturbed, small_disk):
    settings = replace(discovered, mirror_root=str(small_disk / "mirror"))
    transfer = cli(settings, "mirror", "--release", RELEASE, "--target", settings.mirror_root, "--no-progress",
                   "--max-bandwidth", "8M", "--workers", "2")
    ballast = small_disk / "ballast"
    try:
        wait_for(lambda: final_paths(settings) and any(settings.mirror_path.rglob("*.partial")),
                 "a file placed and another in transfer", transfer)
        with open(ballast, "wb") as fill, contextlib.suppress(OSError):  # another writer takes the rest of the disk
            while True:
                fill.write(bytes(1 << 20))
                fill.flush()
        out, err = transfer.communicate(timeout=120)
    finally:
        if transfer.poll() is None:
            kill(transfer)
    assert transfer.returncode != EXIT_OK and "No space left on device" in out + err
    placed, bad = placed_files(settings, engine)
    assert bad == [] and 0 < placed < len(undisturbed.files)
    assert len(verified_files(engine, settings, RELEASE)) == placed
    with pytest.raises(NotMirroredError):
        release_files_on_disk(settings, engine, RELEASE)

    ballast.unlink()
    assert mirror(settings) == EXIT_OK
    again = published(settings, engine, [])
    assert again.files == undisturbed.files and placed_files(settings, engine)[1] == []
    record(request, "the disk fills up mid-transfer",
           "a 24 MiB tmpfs as the mirror; another writer fills it while `abc-mirror mirror` (8 MB/s) has files "
           "placed and others in transfer",
           f"the mirror fails the files it cannot write (\"No space left on device\", exit 1); only verified "
           f"files at their place ({placed} of {len(undisturbed.files)}); loading refuses the release",
           "once space is freed, `abc-mirror mirror` completes", undisturbed.lost(again, []))


# -- bad bytes in the bucket, bad rows in a file ----------------------------------------------------------

def test_truncated_object_in_the_bucket(request, discovered, engine, undisturbed, generated_bucket, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(generated_bucket.root, served)
    key = f"metadata/{CONSENSUS_WMB}/{RELEASE}/cell_metadata.csv"
    whole = (served / BUCKET / key).read_bytes()
    (served / BUCKET / key).write_bytes(whole[:len(whole) // 2])
    server = start_s3_server(served)
    try:
        settings = replace(discovered, endpoint_url=server.endpoint_url)
        report = mirror_release(settings, engine, RELEASE, kinds=["metadata"], progress=False)
        assert list(report.failed) == [key] and "the manifest says" in report.failed[key]
        assert placed_files(settings, engine)[1] == []
        with in_env(settings):
            assert main(["load", "--release", RELEASE]) == EXIT_UNUSABLE
        during = reader_view(settings)
        assert during == NOTHING_READ

    finally:
        server.stop()
    (served / BUCKET / key).write_bytes(whole)  # the object is whole again
    server = start_s3_server(served)
    try:
        settings = replace(discovered, endpoint_url=server.endpoint_url)
        assert mirror(settings) == EXIT_OK
        assert run(settings, "load", "--release", RELEASE) == EXIT_OK
    finally:
        server.stop()
    again = published(settings, engine, METADATA_TABLES)
    assert again.tables == {t: undisturbed.tables[t] for t in METADATA_TABLES}
    assert again.files == undisturbed.files
    record(request, "a truncated object in the bucket",
           "cell_metadata.csv served cut to half its bytes, the manifest unchanged",
           f"the file is never placed ({report.failed[key]}); `abc-mirror load` refuses the release (exit 2); "
           "nothing of it is read", "once the object is whole, `abc-mirror mirror` and `load` publish the same",
           undisturbed.lost(again, METADATA_TABLES))


def test_bad_row_at_the_end_of_a_csv(request, discovered, engine, undisturbed, generated_bucket, tmp_path):
    settings = discovered
    keys = [k for k in scoped_keys(generated_bucket, RELEASE) if k.startswith("metadata/")]
    files = {}
    for key in keys:
        files[key] = tmp_path.joinpath(*key.split("/"))
        files[key].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(generated_bucket.bucket_dir / key, files[key])
    (cells,) = [k for k in keys if k.startswith(f"metadata/{CONSENSUS_WMB}/") and k.endswith("/cell_metadata.csv")]
    lines = files[cells].read_bytes().splitlines(keepends=True)
    fields = lines[-1].split(b",")
    fields[0] = b""  # the last cell loses its cell_label
    lines[-1] = b",".join(fields)
    files[cells].write_bytes(b"".join(lines))

    with pytest.raises(LoadError, match=rf"cell_metadata.csv: line {len(lines)}: null value in column \"cell_label\""):
        load_release_metadata(engine, RELEASE, files)
    during = reader_view(settings)
    with db.copy_connection(settings.database_url) as conn:
        staged = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'abc_staging'").fetchone()[0]
    assert during == NOTHING_READ and staged == 0

    load_release_metadata(engine, RELEASE, {k: generated_bucket.bucket_dir / k for k in keys})
    again = published(settings, engine, METADATA_TABLES)
    assert again.tables == {t: undisturbed.tables[t] for t in METADATA_TABLES}
    record(request, "a bad row at the end of a CSV",
           f"the last of {len(lines) - 1} rows of cell_metadata.csv without cell_label",
           f"the load fails naming the file and line {len(lines)}; nothing of the release, no staging table",
           "the load of the good file publishes the same metadata",
           undisturbed.lost(again, METADATA_TABLES, files=False))
