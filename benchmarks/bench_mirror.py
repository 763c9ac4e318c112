"""Mirror throughput and no-op re-sync: abc-mirror vs s5cmd, rclone and aws s3, side by side, one run.

Data (generated once into --workdir, deleted at the end unless --keep), served by one
``rclone serve s3`` on loopback:

- bucket ``allen-brain-cell-atlas``: the small generated tree (``etl.fixtures.make_bucket``) plus
  large files of random bytes (``--big`` files of 512 MiB, 4 of 128 MiB, 16 of 8 MiB) listed by a
  real release manifest (``write_manifest``), over 2 GiB in all;
- bucket ``abc-small``: 10,000 objects of 1-4 KiB under one release manifest.

Every tool copies the whole bucket into a fresh directory (abc-mirror through the release
manifest, in the ``atlas`` scope: every file it lists, with its records cleared between runs),
rounds interleaved with a rotating order; then, in as many rounds, each tool copies the small
bucket into a fresh directory and re-syncs that copy with nothing to do.
Each tool runs as a child process under GNU time: wall time, the tool's own peak RSS and CPU
seconds; the rclone server's CPU seconds during the run are read from /proc (it shares the cores).
Before each timed run the page cache is synced and the benchmark waits (``--quiet``, at most
``--max-wait`` s) until other processes use less than half a core, and records what they used
and the load average. The CPU cost of MD5 over every byte (what abc-mirror must do and the peers
do not) is measured once, and abc-mirror's own transfer time from its report separates start-up
and bookkeeping from moving bytes.

    .venv/bin/python benchmarks/bench_mirror.py --rounds 3 [--server URL] [--peer-bin DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
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
REPO = Path(__file__).resolve().parent.parent  # the checkout whose etl abc-mirror runs


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


def run(command: list[str], env: dict[str, str], rss_file: Path,
        stdout: list[str] | None = None) -> tuple[float, float, float]:
    """Run a child under GNU time; (seconds, peak RSS MiB, CPU seconds user+sys). Fails loudly if it fails.

    GNU time forks and execs the tool itself, so the peak RSS is the tool's own, not this process's.
    The child's standard output is appended to ``stdout`` if given (abc-mirror's report line).
    """
    started = time.monotonic()
    done = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", "-o", str(rss_file), *command], env=env,
                          capture_output=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}")
    if stdout is not None:
        stdout.append(done.stdout.decode(errors="replace"))
    rss, user, system = rss_file.read_text().split()[-3:]
    return seconds, int(rss) / 1024, float(user) + float(system)


def _cpu_ticks(pid: int | None = None) -> float:
    """CPU seconds: of process ``pid`` (user + sys), or busy seconds of the whole machine."""
    tick = os.sysconf("SC_CLK_TCK")
    if pid is not None:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / tick
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return (sum(values) - values[3] - values[4]) / tick  # all but idle and iowait


def others_cpu(seconds: float = 2.0) -> float:
    """Cores busy over ``seconds`` while this benchmark's own tools are idle: everyone else's load."""
    before, started = _cpu_ticks(), time.monotonic()
    time.sleep(seconds)
    return (_cpu_ticks() - before) / (time.monotonic() - started)


def wait_quiet(limit: float, max_wait: float) -> float:
    """Wait (at most ``max_wait`` s) until others use under ``limit`` cores; returns what was last measured."""
    deadline = time.monotonic() + max_wait
    busy = others_cpu()
    while busy >= limit and time.monotonic() < deadline:
        busy = others_cpu(5.0)
    return busy


def fetch_seconds(report: str) -> float | None:
    """abc-mirror's own transfer time from its report line (``... bytes fetched in 4.2 s``)."""
    found = re.search(r"bytes fetched in ([0-9.]+) s", report)
    return float(found.group(1)) if found else None


def md5_cpu_seconds(root: Path) -> tuple[float, int]:
    """CPU seconds hashlib's MD5 takes over every file under ``root`` (page cache warm), and the bytes hashed."""
    total, cpu = 0, 0.0
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        started = time.process_time()
        hashlib.md5(data).hexdigest()
        cpu += time.process_time() - started
        total += len(data)
    return cpu, total


class Tools:
    """The command of each tool copying one bucket of the served endpoint into a directory."""

    def __init__(self, endpoint: str, database_url: str, workers: int, peer_bin: Path) -> None:
        self.endpoint, self.database_url, self.workers, self.peer_bin = endpoint, database_url, workers, peer_bin
        # ABC_SCOPE=atlas: abc-mirror takes every file the manifest lists, as the peers take the whole bucket.
        self.env = {**os.environ, "AWS_ENDPOINT_URL_S3": endpoint, "ABC_DATABASE_URL": database_url,
                    "ABC_SCOPE": "atlas", "RCLONE_S3_PROVIDER": "Other", "RCLONE_S3_ENDPOINT": endpoint,
                    "AWS_EC2_METADATA_DISABLED": "true"}

    def command(self, tool: str, bucket: str, dest: Path, sync: bool) -> tuple[list[str], dict[str, str]]:
        if tool.startswith("abc-mirror"):
            return ([str(BIN / "abc-mirror"), "mirror", "--release", OLD_RELEASE, "--target", str(dest),
                     "--no-progress", "--workers", str(self.workers), "--bucket", bucket, *tool.split()[1:]],
                    {**self.env, "ABC_BUCKET": bucket, "PYTHONPATH": str(REPO)})
        if tool == "s5cmd":
            verb = ["sync"] if sync else ["cp"]
            return [str(self.peer_bin / "s5cmd"), "--endpoint-url", self.endpoint, "--no-sign-request", *verb,
                    f"s3://{bucket}/*", f"{dest}/"], self.env
        if tool == "s5cmd cp + md5sum":  # the peer doing what abc-mirror does: hash every file afterwards (2 cores)
            copy, env = self.command("s5cmd", bucket, dest, sync)
            return ["sh", "-c", f'{" ".join(copy[:-2])} "$0" "$1" && find "$1" -type f -print0 | '
                    'xargs -0 -n 8 -P 2 md5sum > /dev/null', copy[-2], copy[-1]], env
        if tool == "rclone":
            return [str(BIN / "rclone"), "copy", f":s3:{bucket}", str(dest), "--config", os.devnull], self.env
        if tool.endswith(" + sync"):  # a peer made as durable as abc-mirror: its files on disk when it ends
            base, env = self.command(tool.removesuffix(" + sync"), bucket, dest, sync)
            return ["sh", "-c", '"$@" && sync -f "$0"', str(dest), *base], env
        if tool == "aws s3 sync":
            return [str(self.peer_bin / "aws"), "s3", "sync", f"s3://{bucket}", str(dest), "--endpoint-url",
                    self.endpoint, "--no-sign-request", "--only-show-errors"], self.env
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
    parser.add_argument("--tools", default="abc-mirror,abc-mirror --no-fsync,s5cmd,s5cmd cp + md5sum,"
                        "s5cmd cp + md5sum + sync,rclone,rclone + sync,aws s3 sync")
    parser.add_argument("--keep", action="store_true", help="keep the generated data")
    parser.add_argument("--quiet", type=float, default=0.5,
                        help="before each timed run, wait until other processes use fewer cores than this")
    parser.add_argument("--max-wait", type=float, default=120, help="seconds to wait for --quiet at most")
    parser.add_argument("--server", default=SERVER, help="PostgreSQL server for abc-mirror's records "
                        "(database abc_bench_mirror, dropped at the end)")
    parser.add_argument("--peer-bin", type=Path, default=BIN, help="directory of the s5cmd and aws commands")
    args = parser.parse_args()
    tools_order = args.tools.split(",")
    data, out = args.workdir / "served", args.workdir / "out"
    make_data(data, args.big)
    n_big, bytes_big = tree_size(data / BUCKET)
    n_small, _ = tree_size(data / SMALL_BUCKET)
    print(f"large bucket: {n_big} objects, {bytes_big / 2**30:.2f} GiB; small bucket: {n_small} objects", flush=True)

    database_url = f"{args.server}/abc_bench_mirror"
    db.drop_database(database_url)
    db.create_database(database_url)
    db.upgrade(db.make_engine(database_url))
    server = start_s3_server(data)
    tools = Tools(server.endpoint_url, database_url, args.workers, args.peer_bin)
    # (wall s, peak RSS MiB, client CPU s, server CPU s, others' cores before, abc-mirror's own transfer s)
    results: dict[str, list[tuple[float, float, float, float, float, float | None]]] = {t: [] for t in tools_order}
    rss_file = args.workdir / "rss.txt"
    try:
        # Untimed warm-up: the first reads after the server starts are slower for whoever comes first.
        run(*tools.command("s5cmd", BUCKET, out / "warm-up", sync=False), rss_file)
        shutil.rmtree(out / "warm-up")
        md5_cpu, md5_bytes = md5_cpu_seconds(data / BUCKET)
        print(f"MD5 alone (hashlib, one core, page cache warm): {md5_cpu:.2f} CPU-s for {md5_bytes} bytes "
              f"({md5_bytes / md5_cpu / 1e6:.0f} MB/s)", flush=True)
        for round_number in range(args.rounds):
            shift = round_number % len(tools_order)
            for tool in tools_order[shift:] + tools_order[:shift]:
                dest = out / "big"
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir(parents=True)
                tools.forget(dest)
                os.sync()  # no earlier run's dirty pages left for this one to wait on
                command, env = tools.command(tool, BUCKET, dest, sync=False)
                others = wait_quiet(args.quiet, args.max_wait)
                load = os.getloadavg()[0]
                server_before, report = _cpu_ticks(server.process.pid), []
                seconds, rss, cpu = run(command, env, rss_file, report)
                server_cpu = _cpu_ticks(server.process.pid) - server_before
                fetch = fetch_seconds("".join(report)) if tool.startswith("abc-mirror") else None
                got = tree_size(dest)
                print(f"round {round_number + 1} {tool}: {seconds:.2f} s, {bytes_big / seconds / 1e6:.0f} MB/s, "
                      f"peak RSS {rss:.0f} MiB, CPU {cpu:.1f} s, server CPU {server_cpu:.1f} s, "
                      f"{got[0]} files {got[1]} bytes; before: others {others:.2f} cores, load {load:.2f}"
                      + (f"; own transfer time {fetch:.2f} s" if fetch is not None else ""), flush=True)
                results[tool].append((seconds, rss, cpu, server_cpu, others, fetch))
        shutil.rmtree(out / "big", ignore_errors=True)

        # (first copy s, its CPU s, no-op re-sync s, its CPU s, its peak RSS MiB) per round
        small_tools = [t for t in tools_order if " + " not in t and "--" not in t]
        small: dict[str, list[tuple[float, float, float, float, float]]] = {t: [] for t in small_tools}
        for round_number in range(args.rounds):
            shift = round_number % len(small_tools)
            for tool in small_tools[shift:] + small_tools[:shift]:
                dest = out / "small" / f"{tool.replace(' ', '-')}-{round_number}"  # never a directory just deleted
                dest.mkdir(parents=True)
                tools.forget(dest)
                os.sync()
                wait_quiet(args.quiet, args.max_wait)
                first, _, first_cpu = run(*tools.command(tool, SMALL_BUCKET, dest, sync=True), rss_file)
                wait_quiet(args.quiet, args.max_wait)
                noop, rss, noop_cpu = run(*tools.command(tool, SMALL_BUCKET, dest, sync=True), rss_file)
                print(f"round {round_number + 1} small {tool}: first copy {first:.2f} s (CPU {first_cpu:.1f} s), "
                      f"no-op re-sync {noop:.2f} s (CPU {noop_cpu:.1f} s), peak RSS {rss:.0f} MiB; "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
                small[tool].append((first, first_cpu, noop, noop_cpu, rss))
    finally:
        server.stop()
        shutil.rmtree(out, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(data, ignore_errors=True)
        db.drop_database(database_url)

    best = {t: min(x[0] for x in r) for t, r in results.items()}
    medians = {t: statistics.median(x[0] for x in r) for t, r in results.items()}
    # The peers doing abc-mirror's work (every byte checked against an MD5): issue 16's yardstick.
    peers = [t for t in ("rclone", "s5cmd cp + md5sum") if t in best] or [t for t in best if "abc" not in t]
    fastest_best = min((best[t] for t in peers), default=min(best.values()))
    fastest_median = min((medians[t] for t in peers), default=min(medians.values()))
    others = [r[4] for runs in results.values() for r in runs]
    print(f"\n{n_big} objects, {bytes_big / 2**30:.2f} GiB; {args.rounds} interleaved rounds; best and median; "
          f"other processes used {min(others):.2f}-{max(others):.2f} cores before the runs\n")
    print("| tool | each round s | best s | median s | MB/s (median) | client CPU s (median) | client CPU s per GB "
          "| server CPU s (median) | peak RSS MiB | vs same-work peer (best) | vs same-work peer (median) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for tool, runs in results.items():
        median, cpu = medians[tool], statistics.median(r[2] for r in runs)
        print(f"| {tool} | {', '.join(f'{r[0]:.2f}' for r in runs)} | {best[tool]:.2f} | {median:.2f} | "
              f"{bytes_big / median / 1e6:.0f} | {cpu:.1f} | {cpu / (bytes_big / 1e9):.2f} | "
              f"{statistics.median(r[3] for r in runs):.1f} | {max(r[1] for r in runs):.0f} | "
              f"{fastest_best / best[tool]:.2f}× | {fastest_median / median:.2f}× |")
    for tool, runs in results.items():
        own = [r[5] for r in runs if r[5] is not None]
        if own:
            print(f"\n{tool}: own transfer time (its report, after start-up, manifest and records) median "
                  f"{statistics.median(own):.2f} s, best {min(own):.2f} s; the rest of its wall time is "
                  f"start-up and bookkeeping (median {statistics.median(r[0] - r[5] for r in runs if r[5]):.2f} s)")
    print(f"\nMD5 of every byte alone: {md5_cpu:.2f} CPU-s (hashlib)")
    print(f"\n{n_small} objects of 1-4 KiB, {args.rounds} interleaved rounds\n")
    print("| tool | first copy s (each round) | median s | CPU s (median) | no-op re-sync s (each round) | median s "
          "| CPU s (median) | peak RSS MiB (re-sync) |")
    print("| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for tool, runs in small.items():
        print(f"| {tool} | {', '.join(f'{r[0]:.2f}' for r in runs)} | {statistics.median(r[0] for r in runs):.2f} | "
              f"{statistics.median(r[1] for r in runs):.1f} | {', '.join(f'{r[2]:.2f}' for r in runs)} | "
              f"{statistics.median(r[2] for r in runs):.2f} | {statistics.median(r[3] for r in runs):.1f} | "
              f"{max(r[4] for r in runs):.0f} |")


if __name__ == "__main__":
    main()
