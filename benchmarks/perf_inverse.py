"""Inverse stage: seconds, peak memory and achieved GFLOP/s of InverseFisher.from_gradients(G).diagonal().

G is an m × d float32 matrix shaped like ResNet-20's prunable tensors (d = 270,896 in 22 tensors)
with gradient-like random entries, given as one (m, size) matrix per tensor as the Pruner gives it;
blocks of 100, 1000, 10000 entries, one per tensor ('layer') or
one for the model. Each case runs in a fresh process: a first call (tracing, measured for its peak
resident memory above the RSS with G allocated), then `tf.matmul` throughput (2048², float32) and
the timed repeats. Flops are those of the algorithms run (woodbury.lowrank_flops / explicit_flops).
Where its c × c inverses fit (≤ 2 GB) and time allows (m ≤ 256, or c = 100), the rank-1
Sherman–Morrison recurrence of benchmarks/sherman_morrison.py runs on the same G, once.

    python benchmarks/perf_inverse.py
    python benchmarks/perf_inverse.py --m 1000 --blocks 1000 10000
    python benchmarks/perf_inverse.py --case 1000 1000        # (child) one case, prints JSON

Outputs: benchmarks/results/perf_inverse.csv and .md.
"""
import argparse
import json
import time

import numpy as np

import common  # first: imports tf_woodfisher before TensorFlow
import perf_common
import tf_woodfisher as tfw
import tensorflow as tf
from sherman_morrison import reference_diagonal
from tf_woodfisher.fisher import memory
from tf_woodfisher.fisher.blocks import BlockPartition, explicit_flops, lowrank_flops
from tf_woodfisher.fisher.woodbury import InverseFisher

M_VALUES = (64, 256, 1000)
BLOCKS = ("100", "1000", "10000", "layer", "model")
DAMPING = 1e-5
SM_MAX_BYTES = 2 * 10 ** 9


def block_size(name):
    """'100' → 100, 'layer' → None (one block per tensor), 'model' → 'model'."""
    return int(name) if name.isdigit() else {"layer": None, "model": "model"}[name]


def describe_groups(inverse):
    """'2709×100 explicit' for a few groups, else a count of blocks, groups and low-rank groups."""
    forms = inverse.forms
    if len(forms) <= 2:
        return ", ".join(f"{k}×{c} {form}" for c, k, form, _ in forms)
    lowrank = sum(form == "lowrank" for _, _, form, _ in forms)
    return f"{sum(k for _, k, _, _ in forms)} blocks in {len(forms)} groups ({lowrank} low-rank)"


def resnet20_segments():
    return [w.size for w in tfw.find_prunable_weights(tfw.models.resnet20())]


def gradient_matrix(m, d, seed=0):
    """Gradient-like (m, d) float32: per-column log-normal scales, 10% dead (zero) columns."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((m, d), dtype=np.float32) * 0.05
    g *= rng.lognormal(0.0, 1.0, size=(1, d)).astype(np.float32)
    g[:, rng.random(d) < 0.1] = 0.0
    return g


def flops(inverse, m):
    """Flops of the factorisation: Σ over groups of K × the per-block count of the form used."""
    per_block = {"lowrank": lowrank_flops, "explicit": explicit_flops}
    return sum(count * per_block[form](m, size) for size, count, form, _ in inverse.forms)


def sherman_morrison_feasible(partition, m):
    inverses = sum(g.num_blocks * g.block_size ** 2 * 4 for g in partition.groups)
    return inverses <= SM_MAX_BYTES and (m <= 256 or partition.max_block_size <= 100)


def run_case(m, block, repeats):
    segments = resnet20_segments()
    gradients = [tf.constant(piece) for piece in  # one (m, size) matrix per tensor, as the Pruner passes them
                 np.split(gradient_matrix(m, sum(segments)), np.cumsum(segments)[:-1], axis=1)]
    partition = BlockPartition.from_segments(segments, block_size(block))
    build = lambda: InverseFisher.from_gradients(gradients, partition, DAMPING)  # noqa: E731
    with perf_common.PeakRSS(interval=0.002) as rss:
        inverse = build()
        diagonal = inverse.diagonal().numpy()
    estimate = memory.inverse_bytes(segments, block_size(block), m, 4)[0]
    throughput = perf_common.matmul_gflops()
    seconds = perf_common.median_seconds(lambda: build().diagonal().numpy(), repeats)
    work = flops(inverse, m)
    row = dict(m=m, blocks=block, groups=describe_groups(inverse),
               seconds=seconds, repeats=repeats, gflop=work / 1e9, gflops=work / seconds / 1e9,
               matmul_gflops=throughput, of_matmul=work / seconds / 1e9 / throughput,
               peak_rss_delta_gb=rss.delta / 1e9, planner_estimate_gb=estimate / 1e9,
               sm_seconds=None, sm_ratio=None, sm_max_rel_diff=None)
    if sherman_morrison_feasible(partition, m):
        reference, sm_seconds, _ = reference_diagonal(tf.concat(gradients, axis=1), partition, DAMPING, 1, tf.float32)
        row.update(sm_seconds=sm_seconds[0], sm_ratio=sm_seconds[0] / seconds,
                   sm_max_rel_diff=float(np.max(np.abs(reference - diagonal)) / np.max(np.abs(reference))))
    return row


def run_in_child(m, block, repeats):
    row = perf_common.run_child(f"m={m}, blocks={block}", "--case", m, block, "--repeats", repeats)
    print(f"m={m:5d} blocks={block:>6}: {row['seconds']:.3f} s, {row['gflops']:.1f} GFLOP/s = "
          f"{row['of_matmul']:.0%} of matmul, peak +{row['peak_rss_delta_gb']:.2f} GB"
          + (f", Sherman–Morrison {row['sm_ratio']:.0f}× slower" if row["sm_ratio"] else ""), flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", nargs="+", type=int, default=list(M_VALUES))
    parser.add_argument("--blocks", nargs="+", default=list(BLOCKS), choices=list(BLOCKS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    common.quiet_tensorflow()
    if args.case:
        print(json.dumps(run_case(int(args.case[0]), args.case[1], args.repeats)), flush=True)
        return
    started = time.perf_counter()
    rows = [run_in_child(m, block, args.repeats) for m in args.m for block in args.blocks]
    notes = ("`InverseFisher.from_gradients(G, partition, λ=1e-5).diagonal()` in float32 on an m × 270,896 "
             "gradient-like "
             "matrix with ResNet-20's tensor sizes; median of the repeats after a first call. 'groups' lists K×c and "
             "the form of each group of equal-size blocks. GFLOP/s counts the flops of the algorithm run: "
             "low-rank 2m²c (GGᵀ) + m³/3 (Cholesky) + m²c (L⁻¹G) per block, explicit 2c²m (GᵀG) + c³/3 (Cholesky) "
             "+ c³ (L⁻¹) per block; '% of matmul' divides by the `tf.matmul` (2048², float32) throughput measured "
             "in the same process just before. Peak memory: resident-set growth during the first call above the "
             "RSS with G allocated, against the planner's estimate (memory.inverse_bytes) of the same stage. "
             "Sherman–Morrison: one run of the rank-1 recurrence (eq. 3.4) on the same G; its ratio is its time over "
             "the median above; '—' where its c × c inverses exceed 2 GB or it would take minutes (m = 1000 with "
             "c ≥ 1000).")
    columns = {
        "m": "{m}", "blocks": "{blocks}", "groups (K×c form)": "{groups}", "seconds": "{seconds:.3f}",
        "GFLOP": "{gflop:.1f}", "GFLOP/s": "{gflops:.1f}", "matmul GFLOP/s": "{matmul_gflops:.0f}",
        "% of matmul": "{of_matmul:.0%}", "peak +RSS GB": "{peak_rss_delta_gb:.2f}",
        "planner GB": "{planner_estimate_gb:.2f}",
        "Sherman–Morrison s": lambda r: common.format_optional(r["sm_seconds"], ".2f"),
        "SM / ours": lambda r: common.format_optional(r["sm_ratio"], ".0f") + ("×" if r["sm_ratio"] else ""),
        "SM max rel. diff": lambda r: common.format_optional(r["sm_max_rel_diff"], ".0e")}
    common.write_results("perf_inverse", rows, "Inverse stage: time, memory and throughput of InverseFisher", notes,
                         columns, started)


if __name__ == "__main__":
    main()
