"""Loss diagnostics of a Fisher pruning event (``WoodFisherConfig(diagnostics=True)``).

For the weight change δw that an event applied (new − old weights over its targets, pruned entries
included), the quadratic model of the event's Fisher predicts the loss increase

    ΔL_pred = ḡᵀδw + ½δwᵀFδw,    F = λI + GᵀG/m block-diagonal,

with G the event's m gradient rows and ḡ their mean (WoodTaylor's model; WoodFisher's assumes ḡ ≈ 0 and
predicts ½δwᵀFδw alone, reported beside it). It is computed from the gradient rows themselves, per block
b as λ‖δw_b‖² + ‖G_bδw_b‖²/m, in chunks of rows, without forming F. The measured change is that of the
mean loss over the same Fisher samples (the num_gradients × fisher_batch_size samples the gradients were
taken on, drawn again from the event's seed), from forward passes before and after the event.

Blocks: those of the event's inverse (``fisher_block_size``, aligned to a structure's groups) for
``woodfisher`` and ``woodtaylor``; single entries for ``diagonal_fisher`` (its F is the diagonal);
``magnitude`` (whose gradients are read only for the diagnostics) uses the blocks of ``fisher_block_size``.
This module imports no Keras.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_woodfisher import compat
from tf_woodfisher.config import WoodFisherConfig
from tf_woodfisher.fisher.blocks import BlockPartition
from tf_woodfisher.fisher.gradients import fisher_batches, fisher_loss
from tf_woodfisher.pruning.report import LossDiagnostics

CHUNK_ENTRIES = 1 << 22  # gradient entries (rows × columns) multiplied at once
LOSS_CHUNK_SAMPLES = 512  # Fisher samples per forward pass of the measured loss


def check_supported(config: WoodFisherConfig, num_replicas: int, plan) -> None:
    """Raise ValueError where ``diagnostics=True`` cannot run: several replicas, or a memory ``plan`` that
    streams the gradients in stages or recomputes them for the update."""
    if num_replicas > 1:
        raise ValueError(f"diagnostics=True is not supported under a tf.distribute strategy with {num_replicas} "
                         "replicas (the gradient rows and the loss are split across them): run it on one device")
    if plan is not None and (plan.streamed or not plan.keep_inverse):
        raise ValueError(f"diagnostics=True keeps the event's m × d gradients until its update, but the memory plan "
                         f"({plan}) streams or recomputes them: raise max_memory, or use diagnostics=False")


def mean_loss_fn(forward: Callable, loss: Callable, dataset) -> Callable:
    """A compiled (x, y) → per-sample losses of the Fisher loss (sample weights applied), for :func:`mean_loss`."""
    per_sample, forward = fisher_loss(compat.user_code(loss), dataset), compat.user_code(forward)
    return compat.function(lambda x, y: per_sample(y, forward(x)), reduce_retracing=True)


def mean_loss(losses_of: Callable, dataset, batched: bool, config: WoodFisherConfig, seed: int) -> float:
    """The mean loss over the Fisher samples of ``seed`` (those :func:`collect_gradient_columns` reads), float64."""
    chunk = max(1, LOSS_CHUNK_SAMPLES // config.fisher_batch_size)
    batches = fisher_batches(dataset, batched, config.num_gradients, config.fisher_batch_size, chunk, seed,
                             config.shuffle_buffer)
    total, count = 0.0, 0
    for x, y in batches:  # (groups, fisher_batch_size, ...) → (samples, ...)
        x, y = tf.nest.map_structure(lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0)), (x, y))
        losses = losses_of(x, y)
        total += float(tf.reduce_sum(tf.cast(losses, tf.float64)))
        count += int(tf.size(losses))
    return total / max(count, 1)


def _block_ids(size: int, block_size, groups) -> tuple:
    """(block of each entry (size,) int64, number of blocks) of one tensor's partition."""
    partition = BlockPartition.from_segments([size], block_size, groups=None if groups is None else [groups])
    ids, first = np.empty(size, np.int64), 0
    for group in partition.groups:
        ids[group.indices] = first + np.arange(group.num_blocks)[:, None]
        first += group.num_blocks
    return ids, first


def quadratic_terms(columns: Sequence[tf.Tensor], deltas: Sequence[np.ndarray], block_size,
                    groups: Optional[Sequence] = None) -> tuple:
    """(ḡᵀδw, Σ_b ‖G_bδw_b‖²) over the tensors of one stage, in float64.

    Args:
        columns: per tensor, its (m, size) gradient rows (any float dtype).
        deltas: per tensor, its (size,) weight change.
        block_size: the Fisher blocks: None (one per tensor), an int, ``'model'`` (one block over all of them)
            or 1 (the diagonal).
        groups: None, or per tensor the structure's group of each entry (blocks aligned to them).

    Returns:
        (linear term ḡᵀδw, Σ over blocks of ‖G_bδw_b‖², to be divided by m).
    """
    m = int(columns[0].shape[0])
    linear, squares = 0.0, 0.0
    model_rows = np.zeros(m) if block_size == "model" else None  # (Gδw)_r over all tensors: one block
    for index, (rows, delta) in enumerate(zip(columns, deltas)):
        size = int(rows.shape[1])
        delta = tf.constant(np.asarray(delta, np.float32).reshape(1, size))
        ids, count = (None, 1) if block_size == "model" else _block_ids(
            size, block_size, None if groups is None else groups[index])
        step = max(1, CHUNK_ENTRIES // max(size, 1))
        for start in range(0, m, step):
            product = tf.cast(rows[start:start + step], tf.float32) * delta  # (rows, size)
            linear += float(tf.reduce_sum(tf.cast(tf.reduce_sum(product, axis=0), tf.float64)))
            if model_rows is not None:
                model_rows[start:start + step] += tf.reduce_sum(tf.cast(product, tf.float64), axis=1).numpy()
            elif count == size:  # blocks of one entry
                squares += float(tf.reduce_sum(tf.square(tf.cast(product, tf.float64))))
            else:
                sums = tf.math.unsorted_segment_sum(tf.transpose(product), ids, count)  # (blocks, rows)
                squares += float(tf.reduce_sum(tf.square(tf.cast(sums, tf.float64))))
    if model_rows is not None:
        squares = float(np.sum(model_rows ** 2))
    return linear / m, squares


class EventDiagnosis:
    """What the diagnostics of one event (or of the points of a sweep from one start) collect.

    Args:
        config: the event's configuration (damping, block size, Fisher samples).
        start: (d,) the flat weights at the start of the event (masks applied).
        losses_of: :func:`mean_loss_fn` of the problem. dataset, batched: the Fisher data.
        block_size: the Fisher blocks of the diagnostics (see the module docstring).
    """

    def __init__(self, config: WoodFisherConfig, start, losses_of: Callable, dataset, batched: bool, block_size):
        self.config, self.start = config, np.asarray(start, np.float64)
        self.losses_of, self.dataset, self.batched, self.block_size = losses_of, dataset, batched, block_size
        self.stages, self.seed, self.loss_before, self.seconds = {}, None, None, 0.0

    def record(self, offset: int, columns: Sequence[tf.Tensor], seed: int, groups: Optional[Sequence] = None) -> None:
        """Keep one stage's gradient rows (its tensors start at flat ``offset``); the first call measures the
        loss before the event on the Fisher samples of ``seed``."""
        started = time.perf_counter()
        if self.seed is None:
            self.seed = seed
            self.loss_before = mean_loss(self.losses_of, self.dataset, self.batched, self.config, seed)
        self.stages[offset] = (list(columns), groups)
        self.seconds += time.perf_counter() - started

    def measure(self, values) -> Optional[LossDiagnostics]:
        """The :class:`LossDiagnostics` of the weights ``values`` (d,) now in the model (None if nothing was
        recorded)."""
        if self.seed is None:
            return None
        started = time.perf_counter()
        delta = np.asarray(values, np.float64) - self.start
        linear, squares, m = 0.0, 0.0, None
        for offset, (columns, groups) in self.stages.items():
            sizes = [int(c.shape[1]) for c in columns]
            bounds = offset + np.cumsum([0] + sizes)
            stage_linear, stage_squares = quadratic_terms(
                columns, [delta[a:b] for a, b in zip(bounds[:-1], bounds[1:])], self.block_size, groups)
            linear, squares, m = linear + stage_linear, squares + stage_squares, int(columns[0].shape[0])
        quadratic = 0.5 * (self.config.damping * float(np.sum(delta ** 2)) + squares / m)
        after = mean_loss(self.losses_of, self.dataset, self.batched, self.config, self.seed)
        seconds = self.seconds + time.perf_counter() - started
        self.seconds = 0.0  # in a sweep, the first point counts the loss before
        return LossDiagnostics(linear + quadratic, quadratic, after - self.loss_before, self.loss_before, after,
                               seconds)
