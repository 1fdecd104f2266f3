"""Helpers of the perf_*.py benchmarks only: resident memory sampling, matmul throughput, medians.

Timings on a shared machine are noisy: every script reports medians of repeats and ratios against a
baseline measured in the same process, right before the case it is compared with. The helpers that the
examples share (tables, CSV and markdown output, provenance lines) are in common.py.
"""
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

import common  # noqa: F401  (first: imports tf_woodfisher before TensorFlow)
import tf_woodfisher as tfw
import tensorflow as tf
import tf_keras as keras
from tf_woodfisher.fisher.gradients import (collect_gradient_columns, collect_gradients, looks_batched,
                                            make_gradient_fn)

# Per-sample cross-entropies (the numerical core takes (y_true, y_pred) → losses of shape (n,)).
LOGITS_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=keras.losses.Reduction.NONE)

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


def timed(fn):
    """(result of ``fn()``, wall-clock seconds it took)."""
    tick = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - tick


def repeat_seconds(fn, repeats):
    """Wall-clock seconds of each of ``repeats`` calls of ``fn()`` (call it once before to warm up)."""
    return [timed(fn)[1] for _ in range(repeats)]


def median_seconds(fn, repeats):
    """Median wall-clock seconds of ``repeats`` calls of ``fn()`` (call it once before to warm up)."""
    return statistics.median(repeat_seconds(fn, repeats))


def matmul_gflops(size=2048, repeats=5, dtype=tf.float32):
    """Median GFLOP/s of a (size × size) @ (size × size) ``tf.matmul`` (2·size³ flops), after a warm-up."""
    a = tf.random.stateless_normal([size, size], seed=[1, 2], dtype=dtype)
    b = tf.random.stateless_normal([size, size], seed=[3, 4], dtype=dtype)
    product = tf.function(tf.matmul)
    product(a, b).numpy()
    return 2 * size ** 3 / median_seconds(lambda: product(a, b).numpy(), repeats) / 1e9


class ModelGradients:
    """The numerical core's gradient engine (``fisher.gradients.collect_gradients``) for a Keras ``model``
    in inference mode, its gradient function compiled once and reused by every call.

    loss_fn: per-sample losses (y_true, y_pred) → (n,), e.g. LOGITS_LOSS.
    ``self(dataset, num_gradients, **kwargs)``: the (num_gradients, d) matrix of the ``variables``' gradients
    (kwargs: those of collect_gradients, e.g. shuffle_buffer=0).
    """

    def __init__(self, model, variables, loss_fn=LOGITS_LOSS):
        self.forward = lambda x: model(x, training=False)
        self.input_ranks = [t.shape.rank for t in model.inputs]
        self.variables, self.loss_fn = list(variables), loss_fn
        self.gradient_fn = make_gradient_fn(self.forward, self.variables, loss_fn)

    def __call__(self, dataset, num_gradients, **kwargs):
        kwargs.setdefault("batched", looks_batched(dataset, self.input_ranks))  # the core knows no model
        return collect_gradients(self.forward, self.variables, dataset, self.loss_fn, num_gradients,
                                 gradient_fn=self.gradient_fn, **kwargs)


def run_child(what, *args):
    """Run this script again as ``python <script> *args`` (a case in a fresh process, which prints its result
    as one JSON line) and return that result as a dict; exit with the child's output if it fails."""
    command = [sys.executable, sys.argv[0], *map(str, args)]
    print(f"{what}: running {' '.join(command[1:])}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode or not lines:
        sys.exit(f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(lines[-1])


class UserGradients:
    """The gradient stage as ``one_shot_prune`` runs it on the tfmot path: the problem of
    ``tf_woodfisher.tfmot.problem.keras_problem`` (its gradient function: the layer rules, checked once against
    the vectorised path), called as ``Pruner`` calls ``collect_gradient_columns`` (the stage's mask, the
    config's shuffle buffer and gradient dtype, the planner's chunking).

    ``loss``: a Keras loss as the user gives it (e.g. ``SparseCategoricalCrossentropy(from_logits=True)``).
    ``self(num_gradients, fisher_batch_size)``: per variable, its (num_gradients, size) matrix.
    ``self.gradient_fn``: the compiled gradient function, made once and reused by every call (as ``Pruner``
    reuses it across the events of a run); its first call traces it and runs the check.
    """

    def __init__(self, model, dataset, loss, **config):
        from tf_woodfisher.config import WoodFisherConfig
        from tf_woodfisher.fisher.gradients import fisher_loss
        from tf_woodfisher.tfmot.problem import keras_problem

        self.targets = tfw.find_prunable_weights(model)
        self.variables = [t.variable for t in self.targets]
        self.config = WoodFisherConfig(**config)
        self.problem = keras_problem(model, self.targets, dataset, loss, self.config)
        self.gradient_fn = self.problem.make_gradient_fn(self.problem.forward, self.variables,
                                                         fisher_loss(self.problem.loss, self.problem.dataset))
        self.mask = tf.ones([sum(int(v.shape.num_elements()) for v in self.variables)], tf.float32)

    def __call__(self, num_gradients, fisher_batch_size=1, chunk_gradients=None):
        p, c = self.problem, self.config
        return collect_gradient_columns(p.forward, self.variables, p.dataset, p.loss, num_gradients, fisher_batch_size,
                                        self.mask, c.seed, c.shuffle_buffer, chunk_gradients=chunk_gradients,
                                        dtype=c.gradient_dtype, batched=p.batched, gradient_fn=self.gradient_fn)


def batched_gradient_fn(model, variables, loss_fn):
    """The physical floor of a gradient stage: a compiled gradient of the MEAN loss of a batch (x, y) in inference
    mode, ``tape.gradient(mean(loss_fn(y, model(x, training=False))), variables)``, one tensor per variable."""

    @tf.function
    def gradient(x, y):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            loss = tf.reduce_mean(loss_fn(y, model(x, training=False)))
        return tape.gradient(loss, variables)

    return gradient


def write_floor_seconds(rows, cols):
    """Seconds to write a fresh (rows, cols) float32 array (allocate, then fill every entry): the memory-bandwidth
    floor of a stage whose output is that matrix (any engine must write it at least once). A plain ``np.empty``:
    in a steady state, where the memory was freed a moment ago, one writer is the faster way (the library's
    ``fisher.host.aligned_empty`` faults the pages in from several threads first, which pays off on memory the
    system has not used for a while)."""
    tick = time.perf_counter()
    np.empty((rows, cols), np.float32).fill(1.0)
    return time.perf_counter() - tick
