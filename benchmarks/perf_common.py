"""Helpers of the perf_*.py benchmarks: resident memory sampling, matmul throughput, medians, CSV/markdown output.

Timings on a shared machine are noisy: every script reports medians of repeats and ratios against a
baseline measured in the same process, right before the case it is compared with.
"""
import csv
import os
import statistics
import threading
import time

import common
from common import tf

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def rss_bytes():
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


class PeakRSS:
    """Context manager sampling the resident set size every ``interval`` seconds in a thread.

    start: RSS on entry; peak: the largest sample (bytes); delta: peak − start.
    """

    def __init__(self, interval=0.005):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def delta(self):
        return self.peak - self.start


def median_seconds(fn, repeats):
    """Median wall-clock seconds of ``repeats`` calls of ``fn()`` (call it once before to warm up)."""
    seconds = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - tick)
    return statistics.median(seconds)


def matmul_gflops(size=2048, repeats=5, dtype=tf.float32):
    """Median GFLOP/s of a (size × size) @ (size × size) ``tf.matmul`` (2·size³ flops), after a warm-up."""
    a = tf.random.stateless_normal([size, size], seed=[1, 2], dtype=dtype)
    b = tf.random.stateless_normal([size, size], seed=[3, 4], dtype=dtype)
    product = tf.function(tf.matmul)
    product(a, b).numpy()
    return 2 * size ** 3 / median_seconds(lambda: product(a, b).numpy(), repeats) / 1e9


def write_results(name, rows, title, notes, table_header, table_rows, started):
    """Write benchmarks/results/<name>.csv (rows: list of dicts) and <name>.md (title, command, notes, table)."""
    os.makedirs(common.RESULTS_DIR, exist_ok=True)
    with open(os.path.join(common.RESULTS_DIR, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = "\n".join([
        f"# {title}", "",
        f"Produced by `{common.command_line()}` in {(time.perf_counter() - started) / 60:.1f} min "
        f"({common.environment_line()}).", "",
        notes, "",
        common.markdown_table(table_header, table_rows), ""])
    with open(os.path.join(common.RESULTS_DIR, f"{name}.md"), "w") as f:
        f.write(text)
    print("\n" + text, flush=True)
