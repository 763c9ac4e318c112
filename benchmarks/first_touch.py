"""What first touching memory costs on this machine: right after a free and after idle seconds,
in transparent huge pages (what numpy asks for, for large arrays) and in 4 KB pages.

    .venv/bin/python benchmarks/first_touch.py [--gb 2] [--idle 0 3 10] [--pages huge small]

Allocates and writes ``--gb`` GB once per idle time and kind of page, after that many seconds
of idling, freeing it each time; the first allocation is fresh memory. Both aggregation tools
pay this for every byte they hold, which is why bench_aggregate.py idles before each
measurement, and why etl.aggregate writes its output in 4 KB pages.
"""

from __future__ import annotations

import argparse
import mmap
import time

import numpy as np

ADVICE = {"huge": mmap.MADV_HUGEPAGE, "small": mmap.MADV_NOHUGEPAGE}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--idle", type=float, nargs="+", default=[0, 0, 3, 10])
    parser.add_argument("--pages", choices=sorted(ADVICE), nargs="+", default=["huge", "small"])
    args = parser.parse_args()
    size = int(args.gb * 1e9) // 8 * 8
    for idle in args.idle:
        for pages in args.pages:
            time.sleep(idle)
            memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            memory.madvise(ADVICE[pages])
            touched = np.frombuffer(memory, np.float64)
            start = time.perf_counter()
            touched[:] = 1.0
            print(f"after {idle:g} s idle, {pages} pages: {args.gb:g} GB first touched in "
                  f"{time.perf_counter() - start:.2f} s", flush=True)
            del touched
            memory.close()


if __name__ == "__main__":
    main()
