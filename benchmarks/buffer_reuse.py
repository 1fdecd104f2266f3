"""What reusing the events' host buffers (``tf_woodfisher.fisher.host.HostBuffers``) saves in a gradual fit.

The setting of ``perf_gradual.py`` (the small CNN, 6 epochs, 11 events of 128 gradients × 16 samples, blocks of
2,000). In one process, after a first fit that pays the one-time costs, WoodFisher fits with the Pruner's pool
('reuse', the library's behaviour) and with a pool of size 0 ('fresh': every event allocates its gradient rows
and their (K, m, c) blocks anew, as before the pool) alternate, the order swapped every repeat. Besides each fit
and its events, the time spent writing those buffers is measured per call (``_store_rows`` for the rows,
``transposed_blocks`` for the blocks, wrapped by this script): the first event of a fit writes fresh memory
either way, the later ones write the previous event's buffers with reuse. Since the gradient rows of a whole chunk
are kept as TensorFlow computed them (``fisher.memory.whole_chunk``: here 128 × 108,432 float32, 55 MB, one chunk),
no row buffer is written in this setting, so both modes differ in the blocks only.

    python benchmarks/buffer_reuse.py              # about 3 min on 2 cores
    python benchmarks/buffer_reuse.py --repeats 3

Outputs: benchmarks/results/buffer_reuse.{md,csv}.
"""
import argparse
import statistics
import time

import common  # first: imports tf_woodfisher before TensorFlow
import perf_gradual
from tf_woodfisher.fisher import gradients, woodbury

MODES = {"reuse": "woodfisher", "fresh": "woodfisher_fresh"}


class BufferWrites:
    """Wraps the two functions that write the events' host buffers and records each call's seconds."""

    def __init__(self):
        self.seconds = []
        self._originals = (gradients._store_rows, woodbury.transposed_blocks)
        gradients._store_rows = self._timed(gradients._store_rows)
        woodbury.transposed_blocks = self._timed(woodbury.transposed_blocks)

    def _timed(self, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - started)
        return timed

    def close(self):
        gradients._store_rows, woodbury.transposed_blocks = self._originals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help=common.MNIST_HELP)
    parser.add_argument("--repeats", type=int, default=5, help="fits of each mode after the first (default 5)")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    x, y, fisher = perf_gradual.fit_data(args.data_dir)
    perf_gradual.fit("woodfisher", x, y, fisher, 0, args.epochs)  # the process's one-time costs
    writes, rows = BufferWrites(), []
    try:
        for repeat in range(args.repeats):
            for mode in (("reuse", "fresh") if repeat % 2 == 0 else ("fresh", "reuse")):
                writes.seconds.clear()
                seconds, _, events = perf_gradual.fit(MODES[mode], x, y, fisher, repeat, args.epochs)
                per_event = len(writes.seconds) // len(events)  # the same buffer writes in every event
                rows.append(dict(repeat=repeat, mode=mode, fit_s=seconds, event_s=sum(e["seconds"] for e in events),
                                 later_event_s=sum(e["seconds"] for e in events[1:]),
                                 first_writes_s=sum(writes.seconds[:per_event]),
                                 later_writes_s=sum(writes.seconds[per_event:])))
                print(rows[-1], flush=True)
    finally:
        writes.close()
    median = {mode: {key: statistics.median(r[key] for r in rows if r["mode"] == mode)
                     for key in ("fit_s", "event_s", "later_event_s", "first_writes_s", "later_writes_s")}
              for mode in MODES}
    reuse, fresh = median["reuse"], median["fresh"]
    notes = (f"One process, {args.repeats} fits of each mode after a first one, alternating. Medians, reuse against "
             f"fresh: buffer writes in the 10 later events {reuse['later_writes_s']:.3f} s against "
             f"{fresh['later_writes_s']:.3f} s; the 10 later events {reuse['later_event_s']:.2f} s against "
             f"{fresh['later_event_s']:.2f} s; all 11 events {reuse['event_s']:.2f} s against "
             f"{fresh['event_s']:.2f} s; the fit **{reuse['fit_s']:.2f} s against {fresh['fit_s']:.2f} s**. "
             "The first event writes fresh memory in both modes (its buffer writes are their own column).")
    columns = {"repeat": "{repeat}", "mode": "{mode}", "fit s": "{fit_s:.2f}", "all events s": "{event_s:.2f}",
               "later events s": "{later_event_s:.2f}", "first event's buffer writes s": "{first_writes_s:.3f}",
               "later events' buffer writes s": "{later_writes_s:.3f}"}
    common.write_results("buffer_reuse", rows, "Reusing the events' host buffers in a gradual fit", notes, columns,
                         started)


if __name__ == "__main__":
    main()
