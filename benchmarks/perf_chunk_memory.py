"""Peak memory of the gradient stage against the memory planner's estimate of it.

For each model and group size b of ``perf_gradients.py`` (same m, random weights, synthetic inputs), in a fresh
process with TensorFlow's CPU allocator switched to its BFC allocator (``TF_CPU_ALLOCATOR_USE_BFC=true``, which
keeps peak statistics), the gradient stage as ``one_shot_prune`` runs it (``perf_common.UserGradients``) is
called once to trace and check it, then once more measured:

* TensorFlow peak: the allocator's peak during the call minus what it held before (the gradient rows of a
  whole chunk, the chunks, the model's activations and output gradients, the contractions' temporaries such
  as a convolution's window rows or transposed copies);
* NumPy peak: ``tracemalloc``'s peak during the call (the m × d host buffer of chunked rows);
* measured = the sum of the two (an upper bound of the joint peak), against the planner's
  ``collection_bytes`` (rows and their copies) plus what it adds once the gradient function has traced:
  ``memory.TRANSIENT_MARGIN`` × the liveness estimate of a chunk's call
  (:func:`tf_woodfisher.fisher.graph_memory.transient_bytes`).

    python benchmarks/perf_chunk_memory.py                       # all models, b = 1 and 16 (about 3 min)
    python benchmarks/perf_chunk_memory.py --models small_cnn --group-sizes 16

Outputs: benchmarks/results/perf_chunk_memory.csv and .md (--out to change the name).
"""
import os

os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")  # before TensorFlow loads, here and in the children

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import common  # noqa: E402  first: imports tf_woodfisher before TensorFlow
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from perf_common import UserGradients, run_child  # noqa: E402
from perf_gradients import MODELS  # noqa: E402

from tf_woodfisher.fisher.memory import TRANSIENT_MARGIN, collection_bytes, default_chunk  # noqa: E402


def child(name, b):
    """One case in this process: prints its result as one JSON line."""
    common.quiet_tensorflow()
    label, builder, shape, classes, loss, sizes, _ = MODELS[name]
    m = sizes.get(b) or max(1, sizes[1] // b)
    model = builder()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(m * b, *shape)).astype(np.float32)
    y = rng.integers(0, classes, m * b).astype(np.int32)
    engine = UserGradients(model, tf.data.Dataset.from_tensor_slices((x, y)), loss)
    dim = sum(int(v.shape.num_elements()) for v in engine.variables)
    chunk = default_chunk(dim, m, b)
    engine(m, b)  # trace, check, first run (its result freed at once)
    traced = engine.gradient_fn.transient_bytes(tf.TensorSpec([chunk, b, *shape], tf.float32),
                                                tf.TensorSpec([chunk, b], tf.int32))
    transient = int(TRANSIENT_MARGIN * traced)  # what the planner counts (pruner.Pruner._count_transient)
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    tracemalloc.start()
    columns = engine(m, b)
    numpy_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    tf_peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    assert sum(int(c.shape[0]) for c in columns[:1]) == m
    rows = collection_bytes(dim, m, 4, b)
    print(json.dumps(dict(model=label, b=b, m=m, weights=dim, chunk=chunk, tf_peak=tf_peak, numpy_peak=numpy_peak,
                          measured=tf_peak + numpy_peak, rows_estimate=rows, traced=traced, transient=transient,
                          estimate=rows + transient)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[1, 16], help="fisher_batch_size values b")
    parser.add_argument("--out", default="perf_chunk_memory", help="name of the results files")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child[0], int(args.child[1]))
    started = time.perf_counter()
    rows = []
    for name in args.models:
        for b in args.group_sizes:
            row = run_child(f"{name} b={b}", "--child", name, b)
            row["of_estimate"] = row["measured"] / row["estimate"]
            row["of_rows_estimate"] = row["measured"] / row["rows_estimate"]
            print(f"{row['model']} b={b}: measured {row['measured'] / 1e6:.0f} MB (TensorFlow "
                  f"{row['tf_peak'] / 1e6:.0f}, NumPy {row['numpy_peak'] / 1e6:.0f}), estimate "
                  f"{row['estimate'] / 1e6:.0f} MB (rows {row['rows_estimate'] / 1e6:.0f}, transient "
                  f"{row['transient'] / 1e6:.0f}) → {row['of_estimate']:.2f}", flush=True)
            rows.append(row)
    notes = ("One fresh process per row, TensorFlow's BFC CPU allocator (TF_CPU_ALLOCATOR_USE_BFC=true) for its peak "
             "statistics; the second call of the gradient stage (perf_common.UserGradients, the planner's chunks) is "
             "measured. 'TensorFlow': the allocator's peak during the call minus what it held before it; 'NumPy': "
             "tracemalloc's peak during the call; 'measured' their sum. 'rows estimate': the planner's "
             "collection_bytes (gradient rows and their copies); 'traced': the liveness estimate of one chunk's call "
             f"(activations, output gradients, contraction temporaries); 'transient': {TRANSIENT_MARGIN} × traced "
             "(memory.TRANSIENT_MARGIN); 'estimate' rows + transient, what the planner counts for the gradient stage. "
             "'measured / estimate' ≤ 1: within the estimate.")
    mb = "{:,.0f}"
    columns = {
        "model": "{model}", "b": "{b}", "m": "{m}", "chunk": "{chunk}", "weights": "{weights:,}",
        "TensorFlow MB": lambda r: mb.format(r["tf_peak"] / 1e6),
        "NumPy MB": lambda r: mb.format(r["numpy_peak"] / 1e6),
        "measured MB": lambda r: mb.format(r["measured"] / 1e6),
        "rows estimate MB": lambda r: mb.format(r["rows_estimate"] / 1e6),
        "traced MB": lambda r: mb.format(r["traced"] / 1e6),
        "transient MB": lambda r: mb.format(r["transient"] / 1e6),
        "estimate MB": lambda r: mb.format(r["estimate"] / 1e6),
        "measured / rows estimate": "{of_rows_estimate:.2f}", "**measured / estimate**": "**{of_estimate:.2f}**"}
    common.write_results(args.out, rows, "Gradient-stage peak memory against the planner's estimate", notes, columns,
                         started)


if __name__ == "__main__":
    sys.exit(main())
