"""10,000 small objects, in process: one thread driving every connection vs a batch of files to each thread.

The mirror fetches small files (≤ ``SMALL_FILE``) through ``Transfer.download_small``, in the batches of
``etl.mirror.small_batches``. Over plain-HTTP GETs it gives them, ``LOOP_BATCH`` at a time, to one thread that
drives ``--workers`` keep-alive connections (``etl.transfer.small_files``); with botocore's GETs it gives a
batch of ``SMALL_BATCH`` files to each of ``--workers`` threads, each fetching its files one after another.
Both are measured here on the same plain-HTTP GETs (the second by turning the loop off), alternating, each
round into a fresh directory, against ``bench_mirror.py``'s 10,000-object bucket served by ``rclone serve s3``:
no process start, no database, only the transfer. Per run: wall seconds, this process's user and system CPU
seconds, the server's CPU seconds and the number of filesystem syncs.

    .venv/bin/python benchmarks/bench_small_files.py --rounds 7 [--churn 50000]

Files created within minutes of many others being deleted are slower to create (see ``churn``): wait a few
minutes after deleting many files (this benchmark deletes its own at the end) unless that is what is measured.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_mirror import SMALL_BUCKET, _cpu_ticks, make_data, wait_quiet  # noqa: E402

from etl import source  # noqa: E402
from etl.config import Settings  # noqa: E402
from etl.fixtures import OLD_RELEASE  # noqa: E402
from etl.manifest import parse_manifest  # noqa: E402
from etl.mirror import small_batches  # noqa: E402
from etl.s3server import start_s3_server  # noqa: E402
from etl.transfer import FileJob, Transfer  # noqa: E402

WAYS = ("one thread, selector loop", "a batch to each thread")


class _ThreadPerConnection(Transfer):
    """The transfer with the selector loop turned off: what botocore's GETs get."""

    @property
    def small_files_in_one_thread(self) -> bool:
        return False


def _jobs(served: Path, dest: Path) -> list[tuple[FileJob, Path]]:
    """Every file of the small bucket's release manifest, as the mirror hands them to the transfer."""
    key = f"releases/{OLD_RELEASE}/manifest.json"
    manifest = parse_manifest((served / key).read_bytes(), key)
    return [(FileJob(f.relative_path, f.size, f.md5), dest / f.relative_path) for f in manifest.files]


def _fetch(way: str, endpoint: str, jobs: list[tuple[FileJob, Path]], workers: int) -> tuple[list, int]:
    """Fetch every job the way the mirror does (``etl.mirror``): results, and the filesystem syncs made."""
    client = source.make_client(Settings(endpoint_url=endpoint))
    transfer = (Transfer if way == WAYS[0] else _ThreadPerConnection)(client, SMALL_BUCKET, workers=workers)
    try:
        one_thread = transfer.small_files_in_one_thread
        with ThreadPoolExecutor(1 if one_thread else workers) as pool:
            results = [r for part in pool.map(transfer.download_small, small_batches(jobs, workers, one_thread))
                       for r in part]
        return results, transfer.group_sync.syncs
    finally:
        transfer.close()


def churn(root: Path, files: int) -> None:
    """Create ``files`` empty files and delete them: for a while after, each file this ext4 creates pays a
    ``recently_deleted`` check (kernel CPU), as on a mirror where many files were just deleted."""
    root.mkdir(parents=True)
    for i in range(files):
        (root / str(i)).touch()
    os.sync()
    shutil.rmtree(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(__file__).parent / "work" / "mirror")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--workers", type=int, default=16, help="connections (abc-mirror --workers)")
    parser.add_argument("--max-wait", type=float, default=30, help="seconds to wait for a quiet machine at most")
    parser.add_argument("--churn", type=int, default=0, help="files created and deleted just before each run")
    args = parser.parse_args()
    data, out = args.workdir / "served", args.workdir / "small-files-out"
    make_data(data, big=3)
    server = start_s3_server(data)
    runs: dict[str, list[tuple[float, float, float, float, int]]] = {way: [] for way in WAYS}
    try:
        for round_number in range(args.rounds):
            for way in WAYS if round_number % 2 == 0 else WAYS[::-1]:
                # A fresh directory, never one just deleted: creating files right after deleting many costs this
                # ext4 a `recently_deleted` check per file (benchmarks/RESULTS.md).
                dest = out / f"{round_number}-{WAYS.index(way)}"
                jobs = _jobs(data / SMALL_BUCKET, dest)
                if args.churn:
                    churn(out / f"churn-{round_number}-{WAYS.index(way)}", args.churn)
                others = wait_quiet(0.5, args.max_wait)
                server_before, before = _cpu_ticks(server.process.pid), resource.getrusage(resource.RUSAGE_SELF)
                started = time.monotonic()
                results, syncs = _fetch(way, server.endpoint_url, jobs, args.workers)
                seconds = time.monotonic() - started
                after = resource.getrusage(resource.RUSAGE_SELF)
                server_cpu = _cpu_ticks(server.process.pid) - server_before
                failed = [r for r in results if not isinstance(r, str)]
                placed = sum(1 for path in dest.rglob("*") if path.is_file())
                if failed or placed != len(jobs) or any(
                        hashlib.md5(path.read_bytes()).hexdigest() != job.md5 for job, path in jobs):
                    raise RuntimeError(f"{way}: {len(failed)} failed, {placed} of {len(jobs)} placed: {failed[:3]}")
                user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
                runs[way].append((seconds, user, system, server_cpu, syncs))
                print(f"round {round_number + 1} {way}: {seconds:.2f} s, user {user:.2f} s, system {system:.2f} s, "
                      f"server {server_cpu:.2f} CPU-s, {syncs} syncs, {len(jobs)} files; others {others:.2f} cores",
                      flush=True)
    finally:
        server.stop()
        shutil.rmtree(out, ignore_errors=True)

    print(f"\n{len(jobs)} objects of 1-4 KiB, {args.workers} connections, {args.rounds} alternating rounds, medians\n")
    print("| way | wall s (each round) | wall s | user CPU s | system CPU s | server CPU s | syncs |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for way, rows in runs.items():
        print(f"| {way} | {', '.join(f'{r[0]:.2f}' for r in rows)} | "
              + " | ".join(f"{statistics.median(r[i] for r in rows):.2f}" for i in range(4))
              + f" | {statistics.median(r[4] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
