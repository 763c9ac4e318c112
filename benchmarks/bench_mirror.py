"""Mirror throughput and no-op re-sync: abc-mirror vs s5cmd, rclone and aws s3, side by side, one run.

Data (generated once into --workdir, deleted at the end unless --keep), served by one
``rclone serve s3`` on loopback:

- bucket ``allen-brain-cell-atlas``: the small generated tree (``etl.fixtures.make_bucket``) plus
  large files of random bytes (``--big`` files of 512 MiB, 4 of 128 MiB, 16 of 8 MiB) listed by a
  real release manifest (``write_manifest``), over 2 GiB in all;
- bucket ``abc-small``: 10,000 objects of 1-4 KiB under one release manifest.

Every tool copies the whole bucket into a fresh directory (abc-mirror through the release
manifest, with its records cleared between runs), rounds interleaved with a rotating order;
then each tool, on its own complete copy of the small bucket, re-syncs it with nothing to do.
Each tool runs as a child process under GNU time: wall time, the tool's own peak RSS and CPU
seconds (the rclone server's CPU is not included, but it shares the same 2 cores).

    .venv/bin/python benchmarks/bench_mirror.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from etl import db
from etl.fixtures import BUCKET, OLD_RELEASE, FixtureSpec, make_bucket, write_manifest
from etl.s3server import start_s3_server

MiB = 1 << 20
SMALL_BUCKET = "abc-small"
SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"
BIN = Path(sys.executable).parent


def _random_file(path: Path, size: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        for start in range(0, size, 64 * MiB):
            handle.write(rng.bytes(min(64 * MiB, size - start)))


def make_data(root: Path, big: int) -> None:
    """The large tree (real release manifest) and the 10,000-object tree, unless already there."""
    if (root / BUCKET / "releases").exists() and (root / SMALL_BUCKET / "releases").exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    make_bucket(root, FixtureSpec())
    matrices = root / BUCKET / "expression_matrices" / "Bench-Big" / OLD_RELEASE
    for i in range(big):
        _random_file(matrices / f"Bench-Big-R{i}-raw.h5ad", 512 * MiB, i)
    for i in range(4):
        _random_file(matrices / f"Bench-Big-M{i}-log2.h5ad", 128 * MiB, 100 + i)
    for i in range(16):
        _random_file(root / BUCKET / "metadata" / "Bench-Big" / OLD_RELEASE / f"table_{i:02d}.bin", 8 * MiB, 200 + i)
    for release in sorted(p.name for p in (root / BUCKET / "releases").iterdir()):
        write_manifest(root / BUCKET, release)
    small = root / SMALL_BUCKET / "metadata" / "Bench-Small" / OLD_RELEASE
    rng = np.random.default_rng(1)
    for i in range(10_000):
        path = small / f"part{i % 10}" / f"object_{i:05d}.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.bytes(int(rng.integers(1024, 4096))))
    write_manifest(root / SMALL_BUCKET, OLD_RELEASE)


def tree_size(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def run(command: list[str], env: dict[str, str], rss_file: Path) -> tuple[float, float, float]:
    """Run a child under GNU time; (seconds, peak RSS MiB, CPU seconds user+sys). Fails loudly if it fails.

    GNU time forks and execs the tool itself, so the peak RSS is the tool's own, not this process's.
    """
    started = time.monotonic()
    done = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss_file), *command], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}")
    rss, user, system = rss_file.read_text().split()[-3:]
    return seconds, int(rss) / 1024, float(user) + float(system)


class Tools:
    """The command of each tool copying one bucket of the served endpoint into a directory."""

    def __init__(self, endpoint: str, database_url: str, workers: int) -> None:
        self.endpoint, self.database_url, self.workers = endpoint, database_url, workers
        self.env = {**os.environ, "AWS_ENDPOINT_URL_S3": endpoint, "ABC_DATABASE_URL": database_url,
                    "RCLONE_S3_PROVIDER": "Other", "RCLONE_S3_ENDPOINT": endpoint, "AWS_EC2_METADATA_DISABLED": "true"}

    def command(self, tool: str, bucket: str, dest: Path, sync: bool) -> tuple[list[str], dict[str, str]]:
        if tool.startswith("abc-mirror"):
            return ([str(BIN / "abc-mirror"), "mirror", "--release", OLD_RELEASE, "--target", str(dest),
                     "--no-progress", "--workers", str(self.workers), "--bucket", bucket, *tool.split()[1:]],
                    {**self.env, "ABC_BUCKET": bucket})
        if tool == "s5cmd":
            verb = ["sync"] if sync else ["cp"]
            return [str(BIN / "s5cmd"), "--endpoint-url", self.endpoint, "--no-sign-request", *verb,
                    f"s3://{bucket}/*", f"{dest}/"], self.env
        if tool == "s5cmd cp + md5sum":  # the peer doing what abc-mirror does: hash every file afterwards (2 cores)
            copy, env = self.command("s5cmd", bucket, dest, sync)
            return ["sh", "-c", f'{" ".join(copy[:-2])} "$0" "$1" && find "$1" -type f -print0 | '
                    'xargs -0 -n 8 -P 2 md5sum > /dev/null', copy[-2], copy[-1]], env
        if tool == "rclone":
            return [str(BIN / "rclone"), "copy", f":s3:{bucket}", str(dest), "--config", os.devnull], self.env
        if tool == "aws s3 sync":
            return [str(BIN / "aws"), "s3", "sync", f"s3://{bucket}", str(dest), "--endpoint-url", self.endpoint,
                    "--no-sign-request", "--only-show-errors"], self.env
        raise ValueError(tool)

    def forget(self, dest: Path) -> None:
        """Clear abc-mirror's records of a destination, so a fresh copy is really fetched."""
        engine = db.make_engine(self.database_url)
        with engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM abc.mirror_object WHERE target = :t"), {"t": str(dest.resolve())})
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path(__file__).parent / "work" / "mirror")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big", type=int, default=3, help="files of 512 MiB")
    parser.add_argument("--workers", type=int, default=16, help="abc-mirror --workers")
    parser.add_argument("--tools", default="abc-mirror,abc-mirror --no-fsync,s5cmd,s5cmd cp + md5sum,rclone,"
                        "aws s3 sync")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    args = parser.parse_args()
    tools_order = args.tools.split(",")
    data, out = args.workdir / "served", args.workdir / "out"
    make_data(data, args.big)
    n_big, bytes_big = tree_size(data / BUCKET)
    n_small, _ = tree_size(data / SMALL_BUCKET)
    print(f"large bucket: {n_big} objects, {bytes_big / 2**30:.2f} GiB; small bucket: {n_small} objects", flush=True)

    database_url = f"{SERVER}/abc_bench_mirror"
    db.drop_database(database_url)
    db.create_database(database_url)
    db.upgrade(db.make_engine(database_url))
    server = start_s3_server(data)
    tools = Tools(server.endpoint_url, database_url, args.workers)
    results: dict[str, list[tuple[float, float, float]]] = {t: [] for t in tools_order}
    rss_file = args.workdir / "rss.txt"
    try:
        # Untimed warm-up: the first reads after the server starts are slower for whoever comes first.
        run(*tools.command("s5cmd", BUCKET, out / "warm-up", sync=False), rss_file)
        shutil.rmtree(out / "warm-up")
        for round_number in range(args.rounds):
            shift = round_number % len(tools_order)
            for tool in tools_order[shift:] + tools_order[:shift]:
                dest = out / "big"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                tools.forget(dest)
                command, env = tools.command(tool, BUCKET, dest, sync=False)
                seconds, rss, cpu = run(command, env, rss_file)
                got = tree_size(dest)
                print(f"round {round_number + 1} {tool}: {seconds:.2f} s, {bytes_big / seconds / 1e6:.0f} MB/s, "
                      f"peak RSS {rss:.0f} MiB, CPU {cpu:.1f} s, {got[0]} files {got[1]} bytes", flush=True)
                results[tool].append((seconds, rss, cpu))
        shutil.rmtree(out / "big", ignore_errors=True)

        small: dict[str, tuple[float, float, float]] = {}
        for tool in [t for t in tools_order if "md5sum" not in t and "--" not in t]:
            dest = out / "small" / tool.replace(" ", "-")
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            tools.forget(dest)
            first = run(*tools.command(tool, SMALL_BUCKET, dest, sync=True), rss_file)[0]
            noop, rss, _ = run(*tools.command(tool, SMALL_BUCKET, dest, sync=True), rss_file)
            print(f"small {tool}: first copy {first:.2f} s, no-op re-sync {noop:.2f} s, peak RSS {rss:.0f} MiB",
                  flush=True)
            small[tool] = (first, noop, rss)
    finally:
        server.stop()
        shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
        db.drop_database(database_url)

    best = {t: min(x[0] for x in r) for t, r in results.items()}
    peers = [v for t, v in best.items() if not t.startswith("abc-mirror") and "md5sum" not in t]
    fastest_peer = min(peers) if peers else min(best.values())
    print(f"\n{n_big} objects, {bytes_big / 2**30:.2f} GiB; {args.rounds} interleaved rounds; best and median\n")
    print("| tool | best s | MB/s (best) | median s | MB/s (median) | client CPU s (median) | peak RSS MiB | "
          "vs fastest peer (best) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for tool, runs in results.items():
        median = statistics.median(r[0] for r in runs)
        print(f"| {tool} | {best[tool]:.2f} | {bytes_big / best[tool] / 1e6:.0f} | {median:.2f} | "
              f"{bytes_big / median / 1e6:.0f} | {statistics.median(r[2] for r in runs):.1f} | "
              f"{max(r[1] for r in runs):.0f} | {fastest_peer / best[tool]:.2f}× |")
    print(f"\n{n_small} objects of 1-4 KiB\n")
    print("| tool | first copy s | no-op re-sync s | peak RSS MiB (re-sync) |")
    print("| --- | ---: | ---: | ---: |")
    for tool, (first, noop, rss) in small.items():
        print(f"| {tool} | {first:.2f} | {noop:.2f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
