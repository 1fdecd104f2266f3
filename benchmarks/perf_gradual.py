"""The cost of WoodFisher in ``model.fit``: a gradual run's fit against tfmot's, in the same process.

The setting of ``examples/gradual_pruning_mnist.py`` (the small CNN on the 5k MNIST subset, 6 epochs of Adam at
batch 64, the cubic ramp to 90% with an event every 20 steps up to step 220: 11 events; WoodFisher with 128
gradients × 16 samples, 2000-weight blocks, λ = 1e-4, global), from random weights (the cost does not depend on
them). Each repeat runs tfmot's ``prune_low_magnitude`` fit and ``tfw.prune_woodfisher``'s fit one after the
other on fresh models, so both see the same machine load; the first repeat also pays the process's one-time
costs (tracing, the rule check) and is reported apart. A fit is timed up to its ``on_train_end``; the teardown
after it (``model.fit`` returning) has its own columns. Per event: its gradient, inverse and scoring seconds
(``tfw.UpdatePruningStep.events``), and the floor of its gradient stage, one plain batched gradient of the mean
loss of the event's 2,048 samples (``perf_common.batched_gradient_fn``).

    python benchmarks/perf_gradual.py              # about 5 min on a 2-core VM without AVX-512 (5 repeats)
    python benchmarks/perf_gradual.py --repeats 3

Outputs: benchmarks/results/perf_gradual.{md,csv}.
"""
import argparse
import statistics
import time

import common  # first: imports tf_woodfisher before TensorFlow
import numpy as np
import tf_woodfisher.fisher.host as host
import tf_woodfisher.fisher.samples as samples
import perf_common
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_woodfisher as tfw
from common import keras

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
RAMP = dict(initial_sparsity=0.0, final_sparsity=0.9, begin_step=0, end_step=220, power=3, frequency=20)
FISHER = dict(num_gradients=128, fisher_batch_size=16, fisher_block_size=2000, damping=1e-4)


class _TrainEnd(keras.callbacks.Callback):
    """Records when ``fit`` calls ``on_train_end``: what follows is the teardown of fit's locals."""

    def on_train_end(self, logs=None):
        self.seconds = time.perf_counter()


def fit(method, x, y, fisher, seed, epochs):
    """(fit seconds to on_train_end, teardown seconds, events) of one gradual run of ``method`` ('tfmot',
    'woodfisher', 'woodfisher_fresh': its events' host buffers are fresh each time, a ``HostBuffers`` pool of
    size 0, for the A/B of ``buffer_reuse.py``, or 'woodfisher_tfdata': its events read the Fisher samples through
    tf.data, none kept in memory, for the A/B of ``sample_cache.py``) from fresh weights. The teardown
    (``model.fit`` returning after ``on_train_end``) is timed apart: there TensorFlow 2.21 destroys the training
    data's iterator, which can wait for one of its threads for tens of seconds after a long fit, whatever the
    pruning method (see BENCHMARKS.md §5)."""
    if method in ("woodfisher_fresh", "woodfisher_tfdata"):
        module, name = (host, "REUSED_BUFFER_BYTES") if method == "woodfisher_fresh" else \
            (samples, "CACHED_SAMPLE_BYTES")  # the pool's limit is read when the Pruner makes it; the other per event
        saved = getattr(module, name)
        setattr(module, name, 0)
        try:
            return fit("woodfisher", x, y, fisher, seed, epochs)
        finally:
            setattr(module, name, saved)
    keras.utils.set_random_seed(seed)
    base = tfw.models.small_cnn()
    if method == "tfmot":
        model = tfmot.sparsity.keras.prune_low_magnitude(base, tfmot.sparsity.keras.PolynomialDecay(**RAMP))
        callback = tfmot.sparsity.keras.UpdatePruningStep()
    else:
        model = tfw.prune_woodfisher(base, tfw.GradualSchedule(**RAMP), method="woodfisher", seed=seed, **FISHER)
        callback = tfw.UpdatePruningStep(fisher, LOSS)
    model.compile(keras.optimizers.Adam(5e-4), LOSS)
    end = _TrainEnd()
    started = time.perf_counter()
    model.fit(x, y, batch_size=64, epochs=epochs, callbacks=[callback, end], verbose=0)
    return end.seconds - started, time.perf_counter() - end.seconds, getattr(callback, "events", [])


def fit_data(data_dir=None):
    """(x, y, fisher) of every fit here: the 5k MNIST training subset (its folder: --data-dir, else
    $TFW_MNIST_DIR, else ../shared) and the Fisher dataset over the same images."""
    x, y = tfw.data.load_mnist("train", common.mnist_dir(data_dir), shuffle_seed=0)
    return x, y, tf.data.Dataset.from_tensor_slices((x, y))


def floor_seconds(x, y, repeats=5):
    """Median seconds of one batched gradient of the mean loss of 2,048 samples over the small CNN's kernels."""
    model = tfw.models.small_cnn()
    variables = [t.variable for t in tfw.find_prunable_weights(model)]
    gradient = perf_common.batched_gradient_fn(model, variables, LOSS)
    n = FISHER["num_gradients"] * FISHER["fisher_batch_size"]
    xs, ys = tf.constant(x[:n]), tf.constant(y[:n])
    gradient(xs, ys)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        gradient(xs, ys)[-1].numpy()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help=common.MNIST_HELP)
    parser.add_argument("--repeats", type=int, default=5, help="repeats after the first (default 5)")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    x, y, fisher = fit_data(args.data_dir)
    rows = []
    for repeat in range(args.repeats + 1):
        tfmot_seconds, tfmot_teardown, _ = fit("tfmot", x, y, fisher, repeat, args.epochs)
        wf_seconds, wf_teardown, events = fit("woodfisher", x, y, fisher, repeat, args.epochs)
        stats = [e["stats"] for e in events]
        event_seconds = sum(e["seconds"] for e in events)
        row = dict(repeat="first (one-time costs)" if repeat == 0 else str(repeat), tfmot_fit_s=tfmot_seconds,
                   woodfisher_fit_s=wf_seconds, ratio=wf_seconds / tfmot_seconds, events=len(events),
                   event_s=event_seconds, first_event_s=events[0]["seconds"], outside_s=wf_seconds - event_seconds,
                   later_event_s=float(np.median([e["seconds"] for e in events[1:]])),
                   gradient_s=float(np.median([s.gradient_seconds for s in stats[1:]])),
                   inverse_s=float(np.median([s.inverse_seconds for s in stats[1:]])),
                   scoring_s=float(np.median([s.scoring_seconds for s in stats[1:]])),
                   tfmot_teardown_s=tfmot_teardown, woodfisher_teardown_s=wf_teardown,
                   wall_ratio=(wf_seconds + wf_teardown) / (tfmot_seconds + tfmot_teardown))
        rows.append(row)
        print(row, flush=True)
    floor = floor_seconds(x, y)
    steady = rows[1:] or rows
    for row in rows:
        row["floor_s"] = floor
    notes = (f"One process, {args.repeats} repeats after the first; each repeat runs tfmot's fit, then WoodFisher's, "
             f"on fresh models (seed = repeat). A fit is timed from its call to its `on_train_end`; the teardown "
             f"after it (TensorFlow destroying the training data's iterator) is its own column. Median over the "
             f"repeats after the first: WoodFisher fit / tfmot fit "
             f"**{statistics.median(r['ratio'] for r in steady):.2f}** (target ≤ 1.5; with the teardowns "
             f"{statistics.median(r['wall_ratio'] for r in steady):.2f}); a later event "
             f"{statistics.median(r['later_event_s'] for r in steady):.3f} s, its gradient stage "
             f"{statistics.median(r['gradient_s'] for r in steady):.3f} s against {floor:.3f} s for one batched "
             "gradient of the same 2,048 samples (the floor). Event columns: medians over the events after the first.")
    columns = {"repeat": "{repeat}", "tfmot fit s": "{tfmot_fit_s:.2f}", "WoodFisher fit s": "{woodfisher_fit_s:.2f}",
               "ratio": "**{ratio:.2f}**", "events": "{events}", "all events s": "{event_s:.2f}",
               "WoodFisher fit outside events s": "{outside_s:.2f}",
               "first event s": "{first_event_s:.3f}", "later event s": "{later_event_s:.3f}",
               "gradients s": "{gradient_s:.3f}", "inverse s": "{inverse_s:.3f}", "scoring s": "{scoring_s:.3f}",
               "batched floor s": "{floor_s:.3f}", "teardown s (tfmot / WoodFisher)":
               "{tfmot_teardown_s:.2f} / {woodfisher_teardown_s:.2f}", "ratio with teardowns": "{wall_ratio:.2f}"}
    common.write_results("perf_gradual", rows, "WoodFisher in model.fit: the fit against tfmot's, same process",
                         notes, columns, started)


if __name__ == "__main__":
    main()
