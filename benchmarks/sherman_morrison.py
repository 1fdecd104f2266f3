"""The authors' rank-1 Sherman–Morrison recurrence (thesis eq. 3.4) against ``InverseFisher``.

For each diagonal block of the empirical Fisher F = λI + (1/m) Σ g gᵀ the reference keeps the c × c
inverse and applies, for n = 1..m,

    F⁻¹ ← F⁻¹ − (F⁻¹ g_n)(F⁻¹ g_n)ᵀ / (m + g_nᵀ F⁻¹ g_n),     F⁻¹ starts at λ⁻¹ I,

(F⁻¹ is symmetric, so F⁻¹ g gᵀ F⁻¹ = u uᵀ with u = F⁻¹ g). The recurrence over the m gradients is
sequential; the blocks of a group of equal size are processed together as one (K, c, c) variable,
updated in place by row chunks so that a 31360 × 31360 float32 block (3.9 GB) needs no second copy.
It is timed against ``InverseFisher.from_gradients(G, partition, λ).diagonal()`` on the MLPNet with m
real single-sample gradients, and the two diagonals are compared.

    python benchmarks/sherman_morrison.py                # blocks = layers (31360, 800, 200), then c=1000
    python benchmarks/sherman_morrison.py --skip-large   # only fc2, fc3 and the chunked blocks

Outputs under --out (default benchmarks/results): sherman_morrison.csv and sherman_morrison.md.
"""
import argparse
import statistics
import time

import common  # first: imports tf_woodfisher before TensorFlow
import tf_woodfisher as tfw
import tensorflow as tf
import numpy as np
from perf_common import ModelGradients, repeat_seconds, timed
from tf_woodfisher.fisher.blocks import BlockPartition
from tf_woodfisher.fisher.woodbury import InverseFisher

ROW_CHUNK_BYTES = 256 * 2 ** 20  # temporary of one in-place row-chunk update


class ShermanMorrison:
    """The eq. 3.4 recurrence for K blocks of size c at once; ``diagonal(blocks, m, λ)`` → (K, c).

    The K inverses are stored as row chunks, one (K, rows, c) variable each, so that every rank-1
    update is an in-place ``assign_sub`` whose temporary is one chunk of u uᵀ: the memory is the K·c²
    entries of the inverses plus one chunk (a 31360 × 31360 float32 block takes 3.9 GB).
    """

    def __init__(self, num_blocks, size, dtype=tf.float32):
        self.num_blocks, self.size, self.dtype = num_blocks, size, dtype
        rows = max(1, min(size, ROW_CHUNK_BYTES // (num_blocks * size * dtype.size)))
        self.chunks = [(begin, min(begin + rows, size)) for begin in range(0, size, rows)]
        self.rows = [tf.Variable(tf.zeros([num_blocks, end - begin, size], dtype), trainable=False)
                     for begin, end in self.chunks]
        spec = [tf.TensorSpec([num_blocks, None, size], dtype), tf.TensorSpec([], dtype), tf.TensorSpec([], dtype)]
        self._run = tf.function(self._recurrence, input_signature=spec)

    def _recurrence(self, blocks, num_gradients, damping):
        """blocks (K, n, c) of gradients g_1..g_n; num_gradients = m of eq. 3.4 (n = m except for a warm-up)."""
        for (begin, end), rows in zip(self.chunks, self.rows):  # F⁻¹_0 = I/λ
            eye_rows = tf.one_hot(tf.range(begin, end), self.size, on_value=1.0 / damping, dtype=self.dtype)
            rows.assign(tf.broadcast_to(eye_rows, tf.shape(rows)))
        for n in tf.range(tf.shape(blocks)[1]):
            gradient = blocks[:, n, :]  # (K, c)
            u = tf.concat([tf.linalg.matvec(rows, gradient) for rows in self.rows], axis=1)  # F⁻¹ g
            scaled = u / (num_gradients + tf.reduce_sum(gradient * u, axis=1, keepdims=True))
            for (begin, end), rows in zip(self.chunks, self.rows):  # F⁻¹ ← F⁻¹ − u uᵀ / (m + gᵀF⁻¹g)
                rows.assign_sub(u[:, begin:end, None] * scaled[:, None, :])
        return tf.concat([tf.linalg.diag_part(rows[:, :, begin:end]) for (begin, end), rows in
                          zip(self.chunks, self.rows)], axis=1)

    def diagonal(self, blocks, num_gradients, damping):
        blocks = tf.convert_to_tensor(blocks, self.dtype)
        return self._run(blocks, tf.constant(num_gradients, self.dtype), tf.constant(damping, self.dtype))


def group_blocks(gradients, group):
    """(K, m, c) gradient blocks of one BlockGroup."""
    return tf.transpose(tf.gather(gradients, group.indices, axis=1), [1, 0, 2])


def reference_diagonal(gradients, partition, damping, repeats, dtype):
    """(flat diag(F⁻¹) from the recurrence, [seconds per repeat], per-group seconds)."""
    m = int(gradients.shape[0])
    engines = [ShermanMorrison(g.num_blocks, g.block_size, dtype) for g in partition.groups]
    blocks = [tf.cast(group_blocks(gradients, g), dtype) for g in partition.groups]
    for engine, b in zip(engines, blocks):  # warm-up: trace and run on 2 gradients (same graph as on m)
        engine.diagonal(b[:, :2], m, damping).numpy()
    group_seconds = [[] for _ in engines]
    for _ in range(repeats):
        diagonals = []
        for i, (engine, b) in enumerate(zip(engines, blocks)):
            diagonal, seconds = timed(lambda: engine.diagonal(b, m, damping).numpy())
            diagonals.append(diagonal)
            group_seconds[i].append(seconds)
    del engines
    flat = np.concatenate([d.reshape(-1) for d in diagonals])[partition.inverse_order]
    totals = [sum(s) for s in zip(*group_seconds)]
    return flat, totals, group_seconds


def woodbury_diagonal(gradients, partition, damping, repeats):
    """(flat diag(F⁻¹) from InverseFisher, [seconds per repeat]) after one warm-up call."""
    run = lambda: InverseFisher.from_gradients(gradients, partition, damping).diagonal().numpy()  # noqa: E731
    return run(), repeat_seconds(run, repeats)


def compare(name, gradients, sizes, block_size, damping, args, ref_repeats):
    partition = BlockPartition.from_segments(sizes, block_size)
    shapes = ", ".join(f"{g.num_blocks}×{g.block_size}" for g in partition.groups)
    print(f"{name}: blocks {shapes}; reference ({common.plural(ref_repeats, 'run')} after a warm-up)...", flush=True)
    ref, ref_seconds, _ = reference_diagonal(gradients, partition, damping, ref_repeats, tf.as_dtype(args.dtype))
    fast, fast_seconds = woodbury_diagonal(gradients, partition, damping, args.fast_repeats)
    ref_time, fast_time = statistics.median(ref_seconds), statistics.median(fast_seconds)
    error = float(np.max(np.abs(ref.astype(np.float64) - fast)) / np.max(np.abs(ref)))
    row = dict(case=name, blocks=shapes, dim=int(partition.dim), reference_runs=ref_repeats,
               reference_seconds=ref_time, woodbury_runs=args.fast_repeats, woodbury_seconds=fast_time,
               speedup=ref_time / fast_time, max_rel_diff=error)
    print(f"  reference {ref_time:.3f} s, InverseFisher {1e3 * fast_time:.2f} ms, speed-up {row['speedup']:.0f}×, "
          f"max |Δdiag| / max |diag| = {error:.2e}", flush=True)
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-gradients", type=int, default=100, help="m single-sample gradients (default 100)")
    parser.add_argument("--damping", type=float, default=1e-5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="of the reference")
    parser.add_argument("--repeats", type=int, default=5, help="timed reference runs of the small cases")
    parser.add_argument("--large-repeats", type=int, default=1,
                        help="timed reference runs of the 31360 × 31360 block (about 2 min each)")
    parser.add_argument("--fast-repeats", type=int, default=20, help="timed InverseFisher runs")
    parser.add_argument("--skip-large", action="store_true", help="leave out the 31360-entry fc1 block")
    parser.add_argument("--out", default=common.RESULTS_DIR)
    parser.add_argument("--data-dir", help=common.MNIST_HELP)
    parser.add_argument("--weights", help=common.MLPNET_HELP)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    mnist = common.Mnist(args.data_dir, flatten=True)
    model = tfw.models.mlpnet(common.mlpnet_npz(args.weights))
    common.check_reference_accuracy(common.accuracy(model, mnist.x_test, mnist.y_test))
    weights = tfw.find_prunable_weights(model)
    gradients = ModelGradients(model, [w.variable for w in weights])(mnist.train, args.num_gradients)
    sizes = [w.size for w in weights]
    print(f"G: {tuple(gradients.shape)} single-sample gradients of {', '.join(w.name for w in weights)}", flush=True)

    rows = []
    offsets = np.cumsum([0] + sizes)
    for weight, begin, end in zip(weights, offsets[:-1], offsets[1:]):
        if weight.size > 10_000 and args.skip_large:
            continue
        repeats = args.large_repeats if weight.size > 10_000 else args.repeats
        rows.append(compare(f"{weight.name} ({weight.size:,})", gradients[:, begin:end], [weight.size], None,
                            args.damping, args, repeats))
    if not args.skip_large:
        total = dict(case="all layers (fisher_block_size=None)", blocks=", ".join(r["blocks"] for r in rows),
                     dim=sum(sizes), reference_runs=min(r["reference_runs"] for r in rows),
                     reference_seconds=sum(r["reference_seconds"] for r in rows))
        partition = BlockPartition.from_segments(sizes, None)
        _, fast_seconds = woodbury_diagonal(gradients, partition, args.damping, args.fast_repeats)
        total.update(woodbury_runs=args.fast_repeats, woodbury_seconds=statistics.median(fast_seconds),
                     max_rel_diff=max(r["max_rel_diff"] for r in rows))
        total["speedup"] = total["reference_seconds"] / total["woodbury_seconds"]
        print(f"all layers: reference {total['reference_seconds']:.1f} s, InverseFisher "
              f"{1e3 * total['woodbury_seconds']:.1f} ms, speed-up {total['speedup']:.0f}×", flush=True)
        rows.append(total)
    rows.append(compare("all layers, fisher_block_size=1000", gradients, sizes, 1000, args.damping, args, args.repeats))

    notes = (
        f"Diagonal of the inverse of F = λI + (1/m) Σ g gᵀ per block, λ = {args.damping:g}, "
        "for the reference MLPNet "
        f"with m = {args.num_gradients} single-sample gradients (cross-entropy, 5k training subset, seed 0). "
        f"Reference: the rank-1 recurrence of eq. 3.4 in TensorFlow ({args.dtype}), one `tf.function` looping "
        "over the m gradients, all blocks of a size batched, the c × c inverse updated in place by row chunks. "
        "Fast path: `InverseFisher.from_gradients(G, partition, λ).diagonal()` (float32; Woodbury/Cholesky "
        "form for every block here, since c ≥ 2m). Times are wall-clock medians after a warm-up call, "
        "both measured in the same process; the difference is max |Δdiag| / max |diag|.")
    columns = {
        "case": "{case}", "blocks (K×c)": "{blocks}",
        "Sherman–Morrison, eq. 3.4": "{reference_seconds:.3f} s (median of {reference_runs})",
        "InverseFisher": lambda r: f"{1e3 * r['woodbury_seconds']:.2f} ms (median of {r['woodbury_runs']})",
        "speed-up": "{speedup:,.0f}×", "max rel. diff of diag": "{max_rel_diff:.1e}"}
    common.write_results("sherman_morrison", rows, "Sherman–Morrison recurrence (eq. 3.4) against InverseFisher",
                         notes, columns, started, out=args.out)
    print(f"wrote sherman_morrison.csv and .md to {args.out} in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
