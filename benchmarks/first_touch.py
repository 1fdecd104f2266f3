"""The cost of writing fresh memory once: the floor under any engine that stores the m × d gradient matrix.

ResNet-50's one-shot event (benchmarks/perf_end_to_end.py: m = 64 gradients of its 25.5M prunable weights) must
hold G, 64 × 25,502,912 float32 = 6.5 GB, in memory it has never used. Each case here allocates an array of that
size in a fresh process and writes it once, row by row, as the gradient stage does, after a pause (the VM's host
takes back memory that the guest has freed within seconds, so a pause makes every case start from the same state):

* ``huge``: ``np.empty`` with NumPy's default ``MADV_HUGEPAGE`` advice for large arrays (what
  ``fisher/host.py: aligned_empty`` gets);
* ``small``: ``np.empty`` with that advice switched off (4 KiB pages);
* ``mmap4k``: an anonymous ``mmap`` with ``MADV_NOHUGEPAGE``;
* ``prefault``: ``fisher/host.py: aligned_empty`` as the library calls it: ``huge``, its pages faulted in by
  ``host.prefault`` from one thread per CPU before the rows are written.

The process's system time and page faults are its own (``getrusage``).

    python benchmarks/first_touch.py                      # 3 rounds of the four cases, 25 s pauses (about 12 min)
    python benchmarks/first_touch.py --cases huge prefault --rounds 3
    python benchmarks/first_touch.py --rounds 1 --pause 0 --gb 1   # smoke test

Outputs: benchmarks/results/first_touch.md (or --out).
"""
import argparse
import json
import mmap
import os
import resource
import subprocess
import sys
import time

import numpy as np

import common
import tensorflow as tf
from tf_woodfisher.fisher import host

CASES = ("huge", "small", "mmap4k", "prefault")
RESNET50_G_BYTES = 64 * 25_502_912 * 4


def touch(case, nbytes, rows=64):
    """Allocate ``nbytes`` as ``case`` says and write it once, ``rows`` rows in turn → a dict of the costs."""
    from numpy._core import multiarray  # NumPy's switch of its MADV_HUGEPAGE advice

    before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if case == "prefault":
        array = host.aligned_empty((rows, nbytes // 4 // rows), tf.float32)
    elif case == "mmap4k":
        mapped = mmap.mmap(-1, nbytes)
        mapped.madvise(mmap.MADV_NOHUGEPAGE)
        array = np.frombuffer(mapped, np.float32).reshape(rows, -1)
    else:
        multiarray._set_madvise_hugepage(case == "huge")
        array = np.empty((rows, nbytes // 4 // rows), np.float32)
    for row in array:
        row[:] = 1.0
    after = resource.getrusage(resource.RUSAGE_SELF)
    seconds = time.perf_counter() - started
    return dict(case=case, gb=nbytes / 1e9, seconds=seconds, system_s=after.ru_stime - before.ru_stime,
                faults=after.ru_minflt - before.ru_minflt, gb_per_s=nbytes / 1e9 / seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pause", type=float, default=25.0, help="seconds idle before each case")
    parser.add_argument("--gb", type=float, help="array size in GB (default: ResNet-50's G, 6.53 GB)")
    parser.add_argument("--out", default=common.RESULTS_DIR)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    nbytes = int(args.gb * 1e9) // 256 * 256 if args.gb else RESNET50_G_BYTES
    if args.case:
        print(json.dumps(touch(args.case, nbytes)))
        return
    started, rows = time.perf_counter(), []
    for _ in range(args.rounds):
        for case in args.cases:
            time.sleep(args.pause)
            child = [sys.executable, __file__, "--case", case, "--gb", str(nbytes / 1e9)]
            rows.append(json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout))
            print(json.dumps(rows[-1]), flush=True)
    columns = {"case": "{case}", "GB": "{gb:.2f}", "seconds": "{seconds:.2f}", "system s": "{system_s:.2f}",
               "page faults": "{faults:,}", "GB/s": "{gb_per_s:.2f}"}
    text = "\n".join(["# First write of fresh memory", "", common.produced_by(time.perf_counter() - started), "",
                      f"One array of {nbytes / 1e9:.2f} GB per fresh process, written once row by row after "
                      f"{args.pause:g} s idle:", "",
                      common.markdown_table(list(columns), common.table_cells(columns, rows), "lrrrrr"), ""])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "first_touch.md"), "w") as f:
        f.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
