"""Per-sample gradients: the engine a user gets, against the physical floors of the gradient stage.

For each model (random weights, synthetic inputs, cross-entropy) and group size b (``fisher_batch_size``),
m gradients of b samples each, in one process, the timed methods interleaved repeat by repeat (medians):

* ours: the gradient stage as ``one_shot_prune`` runs it on the tfmot path: the gradient function of
  ``tfmot.problem.keras_problem`` (layer rules, checked once against the vectorised path), called through
  ``collect_gradient_columns`` as ``Pruner`` calls it (data pipeline with the default shuffle buffer, the
  planner's chunks, the mask, the m × d NumPy output) — perf_common.UserGradients. Its first call (trace,
  check against the vectorised path, run) is reported apart: the steady state is what every later event of a
  run pays, the first call what a one-shot run pays;
* kernel only: the same compiled gradient function on the same chunks, already in memory (no pipeline, no
  mask, no copy to NumPy): separates the engine's contractions from the stage's plumbing;
* batched floor: one plain ``tf.function`` gradient of the MEAN loss of all m·b samples (the same samples,
  the same prunable weights, inference mode): the forward and backward flops of the stage, no per-sample
  output;
* write floor: allocating and filling a fresh m × d float32 array, the output every engine must write once
  (it binds at b = 1, where m·d is large against the flops);
* floor: the larger of the two; ours / floor ≥ 1 would beat the floor.

    python benchmarks/perf_gradients.py                 # all models, b = 1 and 16 (about 6 min)
    python benchmarks/perf_gradients.py --quick         # half the samples, 3 repeats (about 3 min)
    python benchmarks/perf_gradients.py --models small_cnn resnet20 --group-sizes 1 16 --repeats 5

Outputs: benchmarks/results/perf_gradients.csv and .md (--out to change the name).
"""
import argparse
import statistics
import time

import numpy as np

import common  # first: imports tf_woodfisher before TensorFlow
import tf_woodfisher as tfw
import tensorflow as tf
import tf_keras as keras
from perf_common import UserGradients, batched_gradient_fn, timed, write_floor_seconds

LOGITS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
PROBABILITIES = keras.losses.SparseCategoricalCrossentropy()

# name → (label, builder, input shape, classes, loss, {b: m}, {b: m} with --quick)
MODELS = {
    "mlpnet": ("MLPNet", tfw.models.mlpnet, (784,), 10, LOGITS, {1: 1024, 16: 256}, {1: 512, 16: 64}),
    "small_cnn": ("small CNN", tfw.models.small_cnn, (28, 28, 1), 10, LOGITS, {1: 512, 16: 64}, {1: 256, 16: 32}),
    "resnet20": ("ResNet-20", tfw.models.resnet20, (32, 32, 3), 10, LOGITS, {1: 256, 16: 16}, {1: 128, 16: 8}),
    "resnet50": ("ResNet-50 (224²)", lambda: keras.applications.ResNet50(weights=None), (224, 224, 3), 1000,
                 PROBABILITIES, {1: 4, 16: 1}, {1: 2, 16: 1}),
    "vit_tiny": ("ViT-tiny", tfw.models.vit_tiny, (28, 28, 1), 10, LOGITS, {1: 512, 16: 64}, {1: 256, 16: 32}),
}
CHECK_GROUPS = 4  # groups compared with the plain loop of GradientTape calls
MAX_REPEATS = {"resnet50": 3}  # seconds per repeat: fewer repeats


def loop_rows(model, variables, loss, x, y):
    """Per group (x, y shaped (g, b, ...)), a plain GradientTape of its mean loss: the (g, d) matrix."""
    rows = []
    for i in range(int(x.shape[0])):
        with tf.GradientTape() as tape:
            value = tf.reduce_mean(loss(y[i], model(x[i], training=False)))
        grads = tape.gradient(value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        rows.append(np.concatenate([np.ravel(tf.convert_to_tensor(g).numpy()) for g in grads]))
    return np.stack(rows)


class Case:
    """One model and group size: the timed methods, each returning the seconds it took."""

    def __init__(self, model, name, b, m):
        label, _, shape, classes, loss, _, _ = MODELS[name]
        self.model, self.label, self.b, self.m = model, label, b, m
        rng = np.random.default_rng(0)
        n = m * b
        self.x = rng.normal(size=(n, *shape)).astype(np.float32)
        self.y = rng.integers(0, classes, n).astype(np.int32)
        self.engine = UserGradients(model, tf.data.Dataset.from_tensor_slices((self.x, self.y)), loss)
        self.variables = self.engine.variables
        self.dim = sum(int(v.shape.num_elements()) for v in self.variables)
        self.floor_fn = batched_gradient_fn(model, self.variables, self.engine.problem.loss)
        self.x_all, self.y_all = tf.constant(self.x), tf.constant(self.y)
        from tf_woodfisher.fisher.memory import default_chunk
        self.chunk = default_chunk(self.dim, m, b)
        self.chunks = [(tf.constant(self.x[i * b:(i + self.chunk) * b].reshape(-1, b, *shape)),
                        tf.constant(self.y[i * b:(i + self.chunk) * b].reshape(-1, b)))
                       for i in range(0, m, self.chunk)]

    def ours(self):
        columns = self.engine(self.m, self.b)
        assert int(columns[0].shape[0]) == self.m

    def kernel(self):
        for x, y in self.chunks:
            rows = self.engine.gradient_fn(x, y)
            rows[-1].numpy()  # wait for the chunk (the op outputs come back together)

    def floor(self):
        grads = self.floor_fn(self.x_all, self.y_all)
        grads[-1].numpy()

    def max_difference(self):
        """max |ours − loop| / max |loop| over the first CHECK_GROUPS groups (in order, no shuffling)."""
        x, y = self.chunks[0]
        x, y = x[:CHECK_GROUPS], y[:CHECK_GROUPS]
        ours = np.concatenate([r.numpy() for r in self.engine.gradient_fn(x, y)], axis=1)
        loop = loop_rows(self.model, self.variables, self.engine.problem.loss, x, y)
        return float(np.max(np.abs(ours - loop)) / np.max(np.abs(loop)))

    def coverage(self):
        rules = getattr(self.engine.gradient_fn, "rules", None)
        coverage = getattr(rules, "coverage", None) or [None] * len(self.variables)
        covered = sum(int(v.shape.num_elements()) for v, c in zip(self.variables, coverage) if c is not None)
        return covered / self.dim


def measure(model, name, b, m, repeats):
    case = Case(model, name, b, m)
    n = m * b
    _, first_call = timed(case.ours)
    methods = {"ours": case.ours, "kernel": case.kernel, "batched": case.floor,
               "write": lambda: write_floor_seconds(case.m, case.dim)}
    for fn in methods.values():  # warm-up (the floor's trace, the allocator)
        fn()
    seconds = {key: [] for key in methods}
    cpu = {key: [] for key in methods}
    for _ in range(repeats):
        for key, fn in methods.items():
            start = time.process_time()
            value, elapsed = timed(fn)
            cpu[key].append(time.process_time() - start)
            seconds[key].append(value if key == "write" else elapsed)
    med = {key: statistics.median(values) for key, values in seconds.items()}
    med_cpu = {key: statistics.median(values) for key, values in cpu.items()}
    floor = max(med["batched"], med["write"])
    row = dict(model=case.label, b=b, m=m, samples=n, weights=case.dim, chunk=case.chunk, repeats=repeats,
               rule_share=case.coverage(), first_call_s=first_call, max_rel_diff=case.max_difference(),
               ours_per_s=n / med["ours"], kernel_per_s=n / med["kernel"], batched_per_s=n / med["batched"],
               write_gb_per_s=4 * m * case.dim / med["write"] / 1e9, write_per_s=n / med["write"],
               floor_per_s=n / floor, binding="write" if med["write"] > med["batched"] else "batched",
               first_call_of_floor=floor / first_call)
    row["of_batched"] = med["batched"] / med["ours"]
    row["of_floor"] = floor / med["ours"]
    row["kernel_of_floor"] = floor / med["kernel"]
    row["of_sum"] = (med["batched"] + med["write"]) / med["ours"]  # against doing both, one after the other
    row["cpu_of_batched"] = med_cpu["batched"] / med_cpu["ours"]  # the same in CPU seconds of this process
    print(f"{case.label} b={b} m={m}: ours {row['ours_per_s']:.1f}/s, kernel {row['kernel_per_s']:.1f}/s, "
          f"batched {row['batched_per_s']:.1f}/s, write {row['write_per_s']:.1f}/s → ours/floor "
          f"{row['of_floor']:.2f} ({row['binding']}), ours/batched {row['of_batched']:.2f} (CPU time "
          f"{row['cpu_of_batched']:.2f}), kernel/floor {row['kernel_of_floor']:.2f}, first call "
          f"{first_call:.1f} s, max rel diff {row['max_rel_diff']:.1e}", flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--group-sizes", nargs="+", type=int, default=[1, 16], help="fisher_batch_size values b")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 5, --quick 3)")
    parser.add_argument("--quick", action="store_true", help="half the samples, 3 repeats")
    parser.add_argument("--out", default="perf_gradients", help="name of the results files")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 5)
    common.quiet_tensorflow()
    started = time.perf_counter()
    rows = []
    for name in args.models:
        model = MODELS[name][1]()
        for b in args.group_sizes:
            sizes = MODELS[name][6 if args.quick else 5]
            m = sizes.get(b) or max(1, sizes[1] // b)
            rows.append(measure(model, name, b, m, min(repeats, MAX_REPEATS.get(name, repeats))))
    notes = ("Samples per second (m gradients of b samples: m·b samples), medians of interleaved repeats in one "
             "process, every prunable tensor, inference mode, float32. 'ours': the tfmot path's gradient stage "
             "(perf_common.UserGradients: keras_problem's checked layer-rule function through "
             "collect_gradient_columns, with pipeline, shuffle buffer, planner's chunks, mask and NumPy output), "
             "steady state; 'first call': its first call (trace, check, run) in seconds. 'kernel only': the same "
             "compiled function on the chunks in memory. 'batched': one tf.function gradient of the mean loss of "
             "all m·b samples. 'write': allocating and filling a fresh m × d float32 array (its GB/s). "
             "'floor' = the slower of batched and write; 'ours / floor' its time over ours; 'ours / batched, CPU s' "
             "the same ratio in CPU seconds of this process (less sensitive to other processes' load); "
             "'ours / (batched + write)' against doing the batched gradient's work and the write one after the "
             "other (at b = 1 an engine does both: the batched floor never writes the m × d matrix). "
             "'max rel. diff': "
             f"max |ours − loop| / max |loop| over {CHECK_GROUPS} groups against a plain loop of GradientTape "
             "calls. ResNet-50: its softmax output, cross-entropy on probabilities.")
    columns = {
        "model": "{model}", "b": "{b}", "m": "{m}", "weights": "{weights:,}", "rules": "{rule_share:.0%}",
        "ours /s": "{ours_per_s:,.1f}", "kernel only /s": "{kernel_per_s:,.1f}",
        "batched /s": "{batched_per_s:,.1f}", "write /s (GB/s)": "{write_per_s:,.1f} ({write_gb_per_s:.1f})",
        "ours / batched": "{of_batched:.2f}", "ours / floor": "**{of_floor:.2f}** ({binding})",
        "ours / (batched + write)": "{of_sum:.2f}", "kernel / floor": "{kernel_of_floor:.2f}",
        "ours / batched, CPU s": "{cpu_of_batched:.2f}",
        "first call s": "{first_call_s:.1f}",
        "max rel. diff": "{max_rel_diff:.1e}"}
    common.write_results(args.out, rows, "Per-sample gradients: the engine against the batched-gradient and "
                         "memory-write floors", notes, columns, started)


if __name__ == "__main__":
    main()
