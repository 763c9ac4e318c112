"""abc-mirror at two checkouts, alternating on the same served data: did a change make the mirror slower?

Serves ``bench_mirror.py``'s data (large files under a real release manifest, and the 10,000 small
objects) with one ``rclone serve s3``, over HTTP, or over HTTPS (``--tls``) with a CA made for the
run, which both checkouts trust (``AWS_CA_BUNDLE``; ``SSL_CERT_FILE`` for code that read the system
store). Each round runs ``abc-mirror mirror`` of every checkout (``PYTHONPATH``) into a fresh
directory, then the small bucket into a fresh directory and again with nothing to do (a no-op re-sync),
the order alternating from round to round.
Before each run the page cache is synced and the benchmark waits (``--quiet``) for the other
processes on the machine to settle, and records their load.

    .venv/bin/python benchmarks/ab_mirror.py --baseline /work/main --rounds 4 --big 1
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).parent))
from bench_mirror import SMALL_BUCKET, fetch_seconds, make_data, run, tree_size, wait_quiet  # noqa: E402

from etl import db  # noqa: E402
from etl.fixtures import BUCKET, OLD_RELEASE  # noqa: E402
from etl.s3server import make_loopback_pki, start_s3_server  # noqa: E402

HERE = Path(__file__).resolve().parent.parent


def mirror_command(checkout: Path, bucket: str, dest: Path, workers: int) -> list[str]:
    """``abc-mirror mirror`` of the code in ``checkout`` (it must come first on PYTHONPATH)."""
    return [sys.executable, "-P", "-c", "import sys; from etl.cli import main; sys.exit(main())", "mirror",
            "--release", OLD_RELEASE, "--target", str(dest), "--no-progress", "--workers", str(workers),
            "--bucket", bucket]


def forget(database_url: str, dest: Path) -> None:
    """Clear the records of a destination, so a fresh copy is really fetched."""
    engine = db.make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM abc.mirror_object WHERE target = :t"), {"t": str(dest.resolve())})
    engine.dispose()


def _rounds(seconds: list[float]) -> str:
    """Two table cells: each round's seconds, and their median."""
    return f"{', '.join(f'{x:.2f}' for x in seconds)} | {statistics.median(seconds):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the checkout to compare against")
    parser.add_argument("--candidate", type=Path, default=HERE, help="the checkout measured (default: this one)")
    parser.add_argument("--workdir", type=Path, default=Path(__file__).parent / "work" / "mirror")
    parser.add_argument("--server", default="postgresql+psycopg2://postgres@127.0.0.1:5432",
                        help="PostgreSQL server for the records (database abc_ab_mirror, dropped at the end)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--big", type=int, default=1, help="files of 512 MiB")
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a CA made for the run")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--quiet", type=float, default=0.5, help="wait until others use fewer cores than this")
    parser.add_argument("--max-wait", type=float, default=20, help="seconds to wait for --quiet at most")
    args = parser.parse_args()
    checkouts = {"baseline": args.baseline.resolve(), "candidate": args.candidate.resolve()}
    data, out = args.workdir / "served", args.workdir / "ab-out"
    make_data(data, args.big)
    n_big, bytes_big = tree_size(data / BUCKET)
    print(f"large bucket: {n_big} objects, {bytes_big / 2**30:.2f} GiB; {'HTTPS' if args.tls else 'HTTP'}; "
          + ", ".join(f"{name} {path}" for name, path in checkouts.items()), flush=True)

    database_url = f"{args.server}/abc_ab_mirror"
    db.drop_database(database_url)
    db.create_database(database_url)
    db.upgrade(db.make_engine(database_url))
    pki = make_loopback_pki(Path(tempfile.mkdtemp(prefix="abc-ab-pki-"))) if args.tls else None
    server = start_s3_server(data, tls=(pki.chain, pki.key) if pki else None)
    # ABC_SCOPE=atlas: every file the manifest lists (the default scope leaves the large files out).
    env = {**os.environ, "AWS_ENDPOINT_URL_S3": server.endpoint_url, "ABC_DATABASE_URL": database_url,
           "ABC_SCOPE": "atlas", "AWS_EC2_METADATA_DISABLED": "true"}
    if pki:
        env.update(AWS_CA_BUNDLE=str(pki.ca), SSL_CERT_FILE=str(pki.ca))
    rss_file = args.workdir / "rss.txt"
    results: dict[str, list[tuple[float, float, float | None, float]]] = {name: [] for name in checkouts}
    # (first copy s, its CPU s, no-op re-sync s, its CPU s) per round
    small: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in checkouts}
    try:
        names = list(checkouts)
        # Untimed warm-up: the first reads after the server starts are slower for whoever comes first.
        run(mirror_command(checkouts["candidate"], BUCKET, out / "warm-up", args.workers),
            {**env, "PYTHONPATH": str(checkouts["candidate"])}, rss_file)
        shutil.rmtree(out / "warm-up")
        for round_number in range(args.rounds):
            order = names if round_number % 2 == 0 else names[::-1]
            for name in order:
                dest = out / "big"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                forget(database_url, dest)
                os.sync()
                others = wait_quiet(args.quiet, args.max_wait)
                report: list[str] = []
                seconds, _, cpu = run(mirror_command(checkouts[name], BUCKET, dest, args.workers),
                                      {**env, "PYTHONPATH": str(checkouts[name])}, rss_file, report)
                fetch = fetch_seconds("".join(report))
                got = tree_size(dest)
                print(f"round {round_number + 1} {name}: {seconds:.2f} s, {bytes_big / seconds / 1e6:.0f} MB/s, "
                      f"CPU {cpu:.1f} s, own transfer time {fetch} s, {got[0]} files; others {others:.2f} cores, "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                results[name].append((seconds, cpu, fetch, others))
            for name in order:
                # Never a directory just deleted: creating files right after deleting 10,000 costs this ext4 a
                # `recently_deleted` check per file (benchmarks/RESULTS.md), whichever code runs.
                dest = out / "small" / f"{name}-{round_number}"
                dest.mkdir(parents=True)
                forget(database_url, dest)
                os.sync()
                wait_quiet(args.quiet, args.max_wait)
                command, code_env = (mirror_command(checkouts[name], SMALL_BUCKET, dest, args.workers),
                                     {**env, "PYTHONPATH": str(checkouts[name])})
                first, _, first_cpu = run(command, code_env, rss_file)
                wait_quiet(args.quiet, args.max_wait)
                noop, _, noop_cpu = run(command, code_env, rss_file)
                small[name].append((first, first_cpu, noop, noop_cpu))
                print(f"round {round_number + 1} small {name}: first copy {first:.2f} s (CPU {first_cpu:.1f} s), "
                      f"no-op re-sync {noop:.2f} s (CPU {noop_cpu:.1f} s)", flush=True)
    finally:
        server.stop()
        shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
        db.drop_database(database_url)

    print(f"\n{n_big} objects, {bytes_big / 2**30:.2f} GiB over {'HTTPS' if args.tls else 'HTTP'}, "
          f"{args.rounds} alternating rounds\n")
    print("| code | wall s (each round) | median s | median MB/s | median client CPU s | own transfer s (median) "
          "| 10,000 small objects, first copy s (each round) | median s | CPU s (median) "
          "| no-op re-sync s (each round) | median s | CPU s (median) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: |")
    for name, runs in results.items():
        median = statistics.median(r[0] for r in runs)
        own = [r[2] for r in runs if r[2] is not None]
        print(f"| {name} ({checkouts[name]}) | {', '.join(f'{r[0]:.2f}' for r in runs)} | {median:.2f} | "
              f"{bytes_big / median / 1e6:.0f} | {statistics.median(r[1] for r in runs):.1f} | "
              f"{statistics.median(own) if own else float('nan'):.2f} | {_rounds([x[0] for x in small[name]])} | "
              f"{statistics.median(x[1] for x in small[name]):.1f} | {_rounds([x[2] for x in small[name]])} | "
              f"{statistics.median(x[3] for x in small[name]):.1f} |")
    others = [r[3] for runs in results.values() for r in runs]
    print(f"\nother processes used {min(others):.2f}-{max(others):.2f} cores before the runs")


if __name__ == "__main__":
    main()
