"""Per-sample gradients: samples per second of the engine against loops of one-sample gradient calls.

For each model (random weights, synthetic inputs, cross-entropy), in one process, with the timed
methods interleaved repeat by repeat (medians reported):

* eager loop: the plain loop, ``with tf.GradientTape(): loss(model(x_i))`` then ``tape.gradient``
  per sample, rows flattened with NumPy (as a user would write it, and as tests/test_gradients.py checks);
* compiled loop: the same one-sample gradient inside a ``tf.function``, called once per sample;
* engine: the core's ``fisher.gradients.collect_gradients`` (data pipeline, vectorised chunks, mask,
  assembly of the m × d matrix) with one compiled ``make_gradient_fn``, after a first call that
  compiles it (its time is reported apart);
* batched: one gradient of the mean loss of the whole batch — not per-sample, the hardware's reference.

    python benchmarks/perf_gradients.py
    python benchmarks/perf_gradients.py --models small_cnn resnet20 --repeats 5

Outputs: benchmarks/results/perf_gradients.csv and .md.
"""
import argparse
import time

import numpy as np

import common  # first: imports tf_woodfisher before TensorFlow
import tf_woodfisher as tfw
import tensorflow as tf
import tf_keras as keras
from perf_common import LOGITS_LOSS, PROBABILITIES_LOSS, ModelGradients, timed

# name → (builder, input shape, classes, per-sample loss, engine samples, loop samples)
MODELS = {
    "mlpnet": (tfw.models.mlpnet, (784,), 10, LOGITS_LOSS, 1024, 64),
    "small_cnn": (tfw.models.small_cnn, (28, 28, 1), 10, LOGITS_LOSS, 512, 64),
    "resnet20": (tfw.models.resnet20, (32, 32, 3), 10, LOGITS_LOSS, 256, 32),
    "resnet50": (lambda: keras.applications.ResNet50(weights=None), (224, 224, 3), 1000, PROBABILITIES_LOSS, 16, 4),
}


class Methods:
    """The four timed ways to get gradients of one model, each returning the number of samples it did."""

    def __init__(self, name):
        build, shape, classes, self.loss_fn, self.samples, self.loop_samples = MODELS[name]
        self.model = build()
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(self.samples, *shape)).astype(np.float32)
        self.y = rng.integers(0, classes, self.samples)
        self.data = tf.data.Dataset.from_tensor_slices((self.x, self.y))
        self.variables = [w.variable for w in tfw.find_prunable_weights(self.model)]
        self.gradients = ModelGradients(self.model, self.variables, self.loss_fn)
        self.one_sample = tf.function(self._one_sample_gradient)
        self.batch_gradient = tf.function(self._one_sample_gradient)

    def _one_sample_gradient(self, x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(self.loss_fn(y, self.model(x, training=False)))
        return tf.concat([tf.reshape(g, [-1]) for g in tape.gradient(loss, self.variables)], 0)

    def eager_loop(self):
        for i in range(self.loop_samples):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(self.loss_fn(self.y[i:i + 1], self.model(self.x[i:i + 1], training=False)))
            np.concatenate([np.ravel(g) for g in tape.gradient(loss, self.variables)])
        return self.loop_samples

    def compiled_loop(self):
        for i in range(self.loop_samples):
            self.one_sample(self.x[i:i + 1], self.y[i:i + 1]).numpy()
        return self.loop_samples

    def engine(self):
        self.gradients(self.data, self.samples, shuffle_buffer=0).numpy()
        return self.samples

    def batched(self):
        self.batch_gradient(self.x, self.y).numpy()
        return self.samples

    def max_difference(self):
        """max |engine − compiled loop| / max |loop| over the loop's samples."""
        rows = self.gradients(self.data, self.loop_samples, shuffle_buffer=0).numpy()
        loop = np.stack([self.one_sample(self.x[i:i + 1], self.y[i:i + 1]).numpy() for i in range(self.loop_samples)])
        return float(np.max(np.abs(rows - loop)) / np.max(np.abs(loop)))


def measure(name, repeats):
    """Samples per second of every method (median over interleaved repeats) and the engine's first call."""
    methods = Methods(name)
    _, first_call = timed(methods.engine)
    methods_timed = {"eager_loop": methods.eager_loop, "compiled_loop": methods.compiled_loop,
                     "engine": methods.engine, "batched": methods.batched}
    for fn in methods_timed.values():  # warm-up (traces of the loops and the batch)
        fn()
    rates = {key: [] for key in methods_timed}
    for _ in range(repeats):
        for key, fn in methods_timed.items():
            count, seconds = timed(fn)
            rates[key].append(count / seconds)
    row = dict(model=name, weights=sum(int(v.shape.num_elements()) for v in methods.variables),
               engine_samples=methods.samples, loop_samples=methods.loop_samples, repeats=repeats,
               engine_first_call_s=first_call, max_rel_diff=methods.max_difference())
    row.update({f"{key}_per_s": float(np.median(values)) for key, values in rates.items()})
    row["vs_eager_loop"] = row["engine_per_s"] / row["eager_loop_per_s"]
    row["vs_compiled_loop"] = row["engine_per_s"] / row["compiled_loop_per_s"]
    row["of_batched"] = row["engine_per_s"] / row["batched_per_s"]
    print(f"{name}: engine {row['engine_per_s']:.1f}/s = {row['vs_eager_loop']:.1f}× eager loop, "
          f"{row['vs_compiled_loop']:.1f}× compiled loop, {row['of_batched']:.0%} of batched", flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    rows = [measure(name, args.repeats) for name in args.models]
    notes = ("Samples per second, median of interleaved repeats, single-sample gradients (fisher_batch_size=1) "
             "of every prunable tensor in inference mode. Ratios compare the engine with the loops measured in "
             "the same process; 'of batched' is the engine's rate over that of one gradient of the batch's mean "
             "loss (the forward and backward work without per-sample outputs). 'max rel. diff' compares the "
             "engine's rows with the compiled loop's. ResNet-50: its softmax output, cross-entropy on probabilities.")
    columns = {
        "model": "{model}", "prunable weights": "{weights:,}", "eager loop /s": "{eager_loop_per_s:.1f}",
        "compiled loop /s": "{compiled_loop_per_s:.1f}", "engine /s": "{engine_per_s:.1f}",
        "engine / eager loop": "**{vs_eager_loop:.1f}×**", "engine / compiled loop": "{vs_compiled_loop:.1f}×",
        "batched /s": "{batched_per_s:.1f}", "of batched": "{of_batched:.0%}",
        "engine first call s": "{engine_first_call_s:.1f}", "max rel. diff": "{max_rel_diff:.1e}"}
    common.write_results("perf_gradients", rows, "Per-sample gradients: engine against loops of one-sample gradient "
                         "calls", notes, columns, started)


if __name__ == "__main__":
    main()
