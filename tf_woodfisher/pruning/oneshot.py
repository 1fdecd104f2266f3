"""One-shot pruning of a Keras model: gradients → inverse Fisher → scores → masks and OBS update."""
import dataclasses
import math
import time
import warnings

import numpy as np
import tensorflow_model_optimization as tfmot

from tf_woodfisher._keras import keras, tf
from tf_woodfisher.fisher.blocks import BlockPartition
from tf_woodfisher.fisher.gradients import DEFAULT_SHUFFLE_BUFFER, collect_gradients
from tf_woodfisher.fisher.woodbury import InverseFisher
from tf_woodfisher.pruning import scores as scoring
from tf_woodfisher.pruning.targets import (assign_weights, current_masks, find_prunable_weights, flatten,
                                           is_pruning_wrapper)


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """One pruned tensor: ``size`` entries of which ``zeros`` are zero."""

    name: str
    shape: tuple
    size: int
    zeros: int

    @property
    def sparsity(self):
        return self.zeros / self.size


@dataclasses.dataclass(frozen=True)
class PruningReport:
    """What a pruning run did. Times are wall-clock seconds, summed over steps."""

    method: str
    mode: str
    target_sparsity: float
    steps: int
    layers: tuple
    gradient_seconds: float
    inverse_seconds: float
    total_seconds: float

    @property
    def sparsity(self):
        """Fraction of zeros over all prunable weights."""
        return sum(layer.zeros for layer in self.layers) / sum(layer.size for layer in self.layers)

    def as_dict(self):
        return {"method": self.method, "mode": self.mode, "target_sparsity": self.target_sparsity,
                "sparsity": self.sparsity, "steps": self.steps, "gradient_seconds": self.gradient_seconds,
                "inverse_seconds": self.inverse_seconds, "total_seconds": self.total_seconds,
                "layers": {layer.name: layer.sparsity for layer in self.layers}}

    def __str__(self):
        width = max(len("total"), *(len(layer.name) for layer in self.layers))
        lines = [f"{'weight':<{width}}  {'shape':>18}  {'size':>10}  {'sparsity':>8}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<{width}}  {str(layer.shape):>18}  {layer.size:>10,d}  {layer.sparsity:>8.2%}")
        total = sum(layer.size for layer in self.layers)
        lines.append(f"{'total':<{width}}  {'':>18}  {total:>10,d}  {self.sparsity:>8.2%}")
        lines.append(
            f"{self.method} ({self.mode}, {self.steps} step{'s' * (self.steps > 1)}): gradients "
            f"{self.gradient_seconds:.2f} s, inverse {self.inverse_seconds:.2f} s, total {self.total_seconds:.2f} s"
        )
        return "\n".join(lines)


def layer_sparsities(weights):
    """LayerSparsity of each PrunableWeight, from the variables' current values."""
    return tuple(
        LayerSparsity(w.name, w.shape, w.size, int(np.sum(w.variable.numpy() == 0))) for w in weights
    )


def step_sparsities(start, target, steps):
    """Sparsity after each of ``steps`` increments from ``start`` to ``target``, equal in sparsity."""
    return [start + (target - start) * (i + 1) / steps for i in range(steps)]


def _validate(target_sparsity, method, mode, damping, steps, num_samples, fisher_batch_size, block_size):
    if not (isinstance(target_sparsity, (int, float)) and 0.0 <= target_sparsity < 1.0):
        raise ValueError(f"target_sparsity must be a number in [0, 1), got {target_sparsity!r}")
    if method not in scoring.METHODS:
        raise ValueError(f"method must be one of {scoring.METHODS}, got {method!r}")
    if mode not in scoring.MODES:
        raise ValueError(f"mode must be one of {scoring.MODES}, got {mode!r}")
    if not (isinstance(damping, (int, float)) and math.isfinite(damping) and damping > 0):
        raise ValueError(f"damping must be a finite number > 0, got {damping!r}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an int ≥ 1, got {steps!r}")
    for name, value in (("num_samples", num_samples), ("fisher_batch_size", fisher_batch_size)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
    if scoring.needs_inverse(method) and num_samples == 1:
        warnings.warn("num_samples=1: the Fisher has rank one, so WoodFisher scores are barely better "
                      "than magnitude; use tens to thousands of samples", RuntimeWarning, stacklevel=3)
    if block_size not in (None, "model") and not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"block_size must be None, 'model' or an int ≥ 1, got {block_size!r}")


def forward_model(model):
    """The model to differentiate: the model itself, or its stripped clone sharing the same variables."""
    wrapped = any(is_pruning_wrapper(layer) for layer in model.submodules)
    if not wrapped:
        return model
    try:
        return tfmot.sparsity.keras.strip_pruning(model)
    except (ValueError, NotImplementedError) as error:
        raise ValueError(
            f"cannot compute Fisher gradients of {model.name!r}: it holds tfmot pruning wrappers but is not a "
            f"Sequential or functional model, so its wrappers cannot be bypassed ({error})"
        ) from error


def one_shot_prune(model, dataset, loss, target_sparsity, method="woodfisher", mode="global", num_samples=1000,
                   fisher_batch_size=1, block_size=None, damping=1e-5, steps=1, seed=0, update=True,
                   dtype="float32", shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, verbose=1):
    """Prune ``model``'s weights in place to ``target_sparsity`` and return a :class:`PruningReport`.

    model: a built tf_keras model, plain or wrapped by tfmot (then its masks are set too).
    dataset: a ``tf.data.Dataset`` of (x, y) pairs, batched or not (unused for ``magnitude``).
    loss: a Keras loss (object, name or function) matching the model's outputs.
    target_sparsity: fraction of zeros over all prunable weights (``global``) or in each (``layerwise``).
    method: 'magnitude', 'diagonal_fisher', 'woodfisher' or 'woodtaylor'. mode: 'global' or 'layerwise'.
    num_samples: number m of gradients (Fisher samples); each is the mean over ``fisher_batch_size`` samples.
    block_size: None (one block per weight tensor), an int c (chunks of c weights) or 'model'.
    damping: λ > 0 of F = λI + (1/m)Σggᵀ. steps: reach the target in this many equal increments,
    recomputing the gradients on the pruned model before each. update: apply the OBS weight update.
    dtype: 'float32' or 'float64' for the inverse. verbose: 0 silent, 1 progress bar and table.
    """
    _validate(target_sparsity, method, mode, damping, steps, num_samples, fisher_batch_size, block_size)
    started = time.perf_counter()
    weights = find_prunable_weights(model)
    forward = forward_model(model) if scoring.needs_gradients(method) else model
    segments = [w.size for w in weights]
    if isinstance(block_size, int) and block_size > max(segments):
        warnings.warn(f"block_size={block_size} is larger than every prunable tensor (largest: {max(segments)}); "
                      "each tensor is one block, as with block_size=None", RuntimeWarning, stacklevel=2)
    partition = BlockPartition.from_segments(segments, block_size)
    if scoring.needs_gradients(method) and dataset is None:
        raise ValueError(f"method {method!r} needs a Fisher dataset")

    variables = [w.variable for w in weights]
    mask = current_masks(weights)
    start_sparsity = 1.0 - float(tf.reduce_mean(mask))
    if start_sparsity > target_sparsity and mode == "global":
        warnings.warn(f"the model is already {start_sparsity:.2%} sparse, above target {target_sparsity:.2%}; "
                      "pruned weights stay pruned", RuntimeWarning, stacklevel=2)
    assign_weights(weights, flatten(variables), mask)

    work_per_step = (num_samples if scoring.needs_gradients(method) else 0) + (
        len(partition.groups) if scoring.needs_inverse(method) else 0) + 1
    progbar = keras.utils.Progbar(steps * work_per_step, verbose=verbose, unit_name="unit") if verbose else None
    gradient_seconds = inverse_seconds = 0.0
    for step, sparsity in enumerate(step_sparsities(start_sparsity, target_sparsity, steps)):
        done = step * work_per_step
        stats = None
        if scoring.needs_gradients(method):
            tick = time.perf_counter()
            gradients = collect_gradients(
                forward, variables, dataset, loss, num_samples, fisher_batch_size, mask, seed + step, shuffle_buffer,
                on_chunk=(lambda rows, base=done: progbar.update(base + rows)) if progbar else None)
            gradient_seconds += time.perf_counter() - tick
            done += num_samples
            tick = time.perf_counter()
            inverse = None
            if scoring.needs_inverse(method):
                counter = iter(range(done + 1, done + len(partition.groups) + 1))
                inverse = InverseFisher.from_gradients(
                    gradients, partition, damping, dtype,
                    on_group=(lambda: progbar.update(next(counter))) if progbar else None)
            stats = scoring.FisherStatistics.from_gradients(method, gradients, damping, inverse)
            del gradients
            inverse_seconds += time.perf_counter() - tick
        values = flatten(variables)
        new_mask = scoring.select_pruned(scoring.importance_scores(method, values, stats), mask, segments,
                                         sparsity, mode)
        if update:
            tick = time.perf_counter()
            values = scoring.updated_weights(method, values, tf.constant(new_mask == 0), stats)
            inverse_seconds += time.perf_counter() - tick
        mask = tf.constant(new_mask)
        assign_weights(weights, values, mask)
        if progbar:
            progbar.update((step + 1) * work_per_step)

    report = PruningReport(method, mode, float(target_sparsity), steps, layer_sparsities(weights),
                           gradient_seconds, inverse_seconds, time.perf_counter() - started)
    if verbose:
        print(report)
    return report
