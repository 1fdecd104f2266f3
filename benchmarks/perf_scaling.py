"""Scaling of one pruning event with m (gradients) and d (weights), against the formulas of BENCHMARKS.md.

* Inverse stage, one low-rank block of d entries: seconds ≈ α·(3m²d + m³/3)/P + β·m·d, with P the
  `tf.matmul` throughput (2048², float32) measured in the same process before each point: the flops of
  GGᵀ, the Cholesky factor and L⁻¹G at a fraction 1/α of matmul speed, plus β seconds per entry of G for
  the passes that are bound by memory (the cast, the squared column norms); G takes 4·m·d bytes.
* Gradient stage: seconds ≈ t₀ + t₁·m, t₁ the per-sample cost of the model, t₀ the fixed cost of a call.

α, β, t₀ and t₁ are fitted on all the points of their stage (least relative squares); the ratio of each
measurement to the fitted formula then shows how well the formula describes every point of the sweep
(1.00 = exactly). Log-log slopes of each sweep are reported too.

    python benchmarks/perf_scaling.py

Outputs: benchmarks/results/perf_scaling.csv and .md.
"""
import argparse
import time

import numpy as np

import common  # first: imports tf_woodfisher before TensorFlow
import perf_common
import tf_woodfisher as tfw
import tensorflow as tf
from perf_inverse import gradient_matrix
from tf_woodfisher.fisher.blocks import BlockPartition, lowrank_flops
from tf_woodfisher.fisher.woodbury import InverseFisher

DAMPING = 1e-5
D_FIXED, M_FIXED = 270_896, 256  # ResNet-20's prunable weights; the middle of issue 6's m range
M_SWEEP = (128, 256, 512, 1024)
D_SWEEP = (67_724, 135_448, 270_896, 541_792)
GRADIENT_M_SWEEP = (128, 256, 512, 1024, 2048)


def inverse_seconds(m, d, repeats):
    """Median seconds of InverseFisher.from_gradients(G).diagonal() for one (m, d) low-rank block."""
    gradients = tf.constant(gradient_matrix(m, d))
    partition = BlockPartition.from_segments([d], "model")
    run = lambda: InverseFisher.from_gradients(gradients, partition, DAMPING).diagonal().numpy()  # noqa: E731
    run()
    return perf_common.median_seconds(run, repeats)


def slope(xs, ys):
    """Least-squares slope of log y against log x."""
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def inverse_rows(repeats):
    rows = []
    for sweep, points in (("m", [(m, D_FIXED) for m in M_SWEEP]), ("d", [(M_FIXED, d) for d in D_SWEEP])):
        for m, d in points:
            throughput = perf_common.matmul_gflops()
            seconds = inverse_seconds(m, d, repeats)
            rows.append(dict(stage="inverse", sweep=sweep, m=m, d=d, seconds=seconds, matmul_gflops=throughput,
                             terms=(lowrank_flops(m, d) / (throughput * 1e9), m * d), gradient_bytes=4 * m * d))
            print(f"inverse m={m:5d} d={d:7d}: {seconds:.3f} s", flush=True)
    return rows


def gradient_rows(repeats):
    model = tfw.models.small_cnn()
    variables = [w.variable for w in tfw.find_prunable_weights(model)]
    d = sum(int(v.shape.num_elements()) for v in variables)
    rng = np.random.default_rng(0)
    count = max(GRADIENT_M_SWEEP)
    data = tf.data.Dataset.from_tensor_slices((rng.random((count, 28, 28, 1), np.float32),
                                               rng.integers(0, 10, count)))
    gradients = perf_common.ModelGradients(model, variables)
    gradients(data, min(GRADIENT_M_SWEEP), shuffle_buffer=0)  # trace once
    rows = []
    for m in GRADIENT_M_SWEEP:
        seconds = perf_common.median_seconds(lambda: gradients(data, m, shuffle_buffer=0).numpy(), repeats)
        rows.append(dict(stage="gradients (small CNN)", sweep="m", m=m, d=d, seconds=seconds, matmul_gflops=None,
                         terms=(1.0, m), gradient_bytes=4 * m * d))
        print(f"gradients m={m:4d}: {seconds:.3f} s", flush=True)
    return rows


def fit(rows):
    """Coefficients of seconds ≈ Σ coefficient·term minimising the relative errors (least squares of
    measured/formula − 1); sets each row's 'formula_seconds' and 'ratio'."""
    seconds = np.array([r["seconds"] for r in rows])
    coefficients = np.linalg.lstsq(np.array([r["terms"] for r in rows]) / seconds[:, None], np.ones(len(rows)),
                                   rcond=None)[0]
    for r in rows:
        r["formula_seconds"] = float(np.dot(coefficients, r.pop("terms")))
        r["ratio"] = r["seconds"] / r["formula_seconds"]
    return coefficients


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    inverse, gradients = inverse_rows(args.repeats), gradient_rows(args.repeats)
    alpha, beta = fit(inverse)
    fixed, per_sample = fit(gradients)
    rows = inverse + gradients
    slopes = {}
    for stage, sweep in {(r["stage"], r["sweep"]) for r in rows}:
        chosen = [r for r in rows if r["stage"] == stage and r["sweep"] == sweep]
        slopes[stage, sweep] = slope([r[sweep] for r in chosen], [r["seconds"] for r in chosen])
    notes = ("Inverse: `InverseFisher.from_gradients(G, one block of d entries, λ=1e-5).diagonal()` in float32 on "
             "gradient-like random G (low-rank form), median of the repeats after a first call. Fitted formula: "
             f"seconds = α·(3m²d + m³/3)/P + β·m·d with α = {alpha:.2f} (the flops run at {1 / alpha:.0%} of the "
             f"`tf.matmul` throughput P measured before each point) and β = {beta * 1e9:.2f} ns per entry of G. "
             "Gradients: `collect_gradients` of the small CNN's prunable weights on random 28×28 inputs, median "
             f"of the repeats; fitted formula: seconds = t₀ + t₁·m with t₀ = {fixed * 1e3:.0f} ms and "
             f"t₁ = {per_sample * 1e3:.3f} ms per sample. Log-log slopes of seconds over each sweep: "
             + "; ".join(f"{stage} vs {sweep}: {value:.2f}" for (stage, sweep), value in sorted(slopes.items()))
             + " (they approach 2 in m and 1 in d for the inverse and 1 in m for the gradients as the leading "
             "terms dominate). Gradient memory is 4·m·d bytes (column 'G bytes').")
    columns = {
        "stage": "{stage}", "sweep": "{sweep}", "m": "{m}", "d": "{d:,}", "seconds": "{seconds:.3f}",
        "fitted formula s": "{formula_seconds:.3f}", "measured / formula": "{ratio:.2f}",
        "matmul GFLOP/s": lambda r: common.format_optional(r["matmul_gflops"], ".0f"),
        "G bytes": lambda r: f"{r['gradient_bytes'] / 1e6:.0f} MB"}
    common.write_results("perf_scaling", rows, "Scaling of the inverse and gradient stages with m and d", notes,
                         columns, started)


if __name__ == "__main__":
    main()
