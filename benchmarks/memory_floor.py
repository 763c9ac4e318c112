"""The memory floor of one command: run it under decreasing memory limits until it fails.

Each attempt runs in a fresh cgroup (v1 memory controller, ``/sys/fs/cgroup/memory``; needs root)
whose ``memory.limit_in_bytes`` is the limit. The kernel reclaims page cache first and OOM-kills
the process when its resident memory cannot fit, so the lowest limit at which the command still
succeeds is the RAM the stage needs (page cache it can do without). PostgreSQL's own memory is
not counted: the server is not in the cgroup. ``{n}`` in the command is replaced by the attempt
number, so each attempt can use a fresh directory or database.

    sudo .venv/bin/python benchmarks/memory_floor.py --limits 2048,1024,512,384,256 -- \
        .venv/bin/abc-mirror load --release 20251031 ...
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
import uuid
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")


def run_limited(command: list[str], limit_mib: int) -> dict:
    """Run ``command`` with ``limit_mib`` of memory; its exit code, wall time, the cgroup's peak and OOM kills."""
    group = CGROUP_ROOT / f"abc-floor-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit_mib * 2**20))
        (group / "memory.swappiness").write_text("0")
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))
        output, _ = process.communicate()
        seconds = time.perf_counter() - started
        oom = dict(line.split() for line in (group / "memory.oom_control").read_text().splitlines())
        return {"limit_mib": limit_mib, "exit": process.returncode, "seconds": round(seconds, 1),
                "peak_mib": int((group / "memory.max_usage_in_bytes").read_text()) // 2**20,
                "oom_kills": int(oom.get("oom_kill", 0)), "tail": output.decode(errors="replace")[-600:]}
    finally:
        group.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limits", required=True, help="MiB, comma-separated, tried in this order")
    parser.add_argument("--stop-at-failure", action="store_true", help="stop after the first failing limit")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    print("| limit (MiB) | exit | seconds | cgroup peak (MiB, incl. page cache) | OOM kills |")
    print("|---:|---:|---:|---:|---:|")
    for n, limit in enumerate(int(x) for x in args.limits.split(",")):
        result = run_limited([part.replace("{n}", str(n)) for part in command], limit)
        print(f"| {limit} | {result['exit']} | {result['seconds']} | {result['peak_mib']} | {result['oom_kills']} |",
              flush=True)
        if result["exit"] != 0:
            print("    " + result["tail"].replace("\n", "\n    "))
            if args.stop_at_failure:
                break


if __name__ == "__main__":
    main()
