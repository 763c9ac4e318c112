"""What first touching memory costs on this machine: memory the guest still holds from a recent
free, against memory it gave back to the VM's host (free page reporting, within seconds).

    .venv/bin/python benchmarks/first_touch.py [--gb 2] [--idle 0 3 10]

Allocates and writes ``--gb`` GB once per idle time, after that many seconds of idling, freeing
it each time; the first allocation is fresh memory. Both aggregation tools pay this for every
byte they hold, which is why bench_aggregate.py idles before each measurement.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--idle", type=float, nargs="+", default=[0, 0, 3, 10])
    args = parser.parse_args()
    n = int(args.gb * 1e9) // 8
    for idle in args.idle:
        time.sleep(idle)
        start = time.perf_counter()
        touched = np.empty(n)
        touched[:] = 1.0
        print(f"after {idle:g} s idle: {args.gb:g} GB first touched in {time.perf_counter() - start:.2f} s",
              flush=True)
        del touched


if __name__ == "__main__":
    main()
