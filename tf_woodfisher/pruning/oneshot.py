"""One-shot pruning of a Keras model: gradients → inverse Fisher → scores → masks and OBS update."""
import dataclasses
import time
import warnings

import numpy as np

from tf_woodfisher._keras import keras
from tf_woodfisher.fisher.gradients import DEFAULT_SHUFFLE_BUFFER
from tf_woodfisher.pruning.pruner import Pruner, PruningConfig, fisher_seed, validate_sparsity
from tf_woodfisher.pruning.targets import find_prunable_weights


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
    gathered_bytes: int = 0  # all-gathered across replicas under a tf.distribute strategy
    reduced_bytes: int = 0  # payload of the sum all-reduces of Gram sums across replicas

    @property
    def sparsity(self):
        """Fraction of zeros over all prunable weights."""
        return sum(layer.zeros for layer in self.layers) / sum(layer.size for layer in self.layers)

    def as_dict(self):
        return {"method": self.method, "mode": self.mode, "target_sparsity": self.target_sparsity,
                "sparsity": self.sparsity, "steps": self.steps, "gradient_seconds": self.gradient_seconds,
                "inverse_seconds": self.inverse_seconds, "total_seconds": self.total_seconds,
                "gathered_bytes": self.gathered_bytes, "reduced_bytes": self.reduced_bytes,
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
    """Sparsity after each of ``steps`` increments from ``start`` to ``target``, each step removing the
    same fraction of the remaining weights (density falls geometrically): much better than equal
    increments of sparsity at high targets (BENCHMARKS.md)."""
    start_density, target_density = 1.0 - start, 1.0 - target
    if target_density >= start_density:
        return [target] * steps
    return [1.0 - start_density * (target_density / start_density) ** ((i + 1) / steps) for i in range(steps)]


def one_shot_prune(model, dataset, loss, target_sparsity, method="woodfisher", mode="global", num_samples=1000,
                   fisher_batch_size=1, block_size=None, damping=1e-5, steps=1, seed=0, update=True,
                   dtype="float32", shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, strategy=None, verbose=1,
                   max_memory=None, gradient_dtype="float32"):
    """Prune ``model``'s weights in place to ``target_sparsity`` and return a :class:`PruningReport`.

    model: a built tf_keras model, plain or wrapped by tfmot (then its masks are set too).
    dataset: a ``tf.data.Dataset`` of (x, y) pairs, batched or not (unused for ``magnitude``).
    loss: a Keras loss (object, name or function) matching the model's outputs.
    target_sparsity: fraction of zeros over all prunable weights (``global``) or in each (``layerwise``).
    method: 'magnitude', 'diagonal_fisher', 'woodfisher' or 'woodtaylor'. mode: 'global' or 'layerwise'.
    num_samples: number m of gradients (Fisher samples); each is the mean over ``fisher_batch_size`` samples.
    block_size: None (one block per weight tensor), an int c (chunks of c weights) or 'model'.
    damping: λ > 0 of F = λI + (1/m)Σggᵀ. steps: reach the target in this many steps, each removing the
    same fraction of the remaining weights and recomputing the gradients on the pruned model first
    (each step draws its own samples).
    update: apply the OBS weight update. dtype: 'float32' or 'float64' for the inverse.
    strategy: a ``tf.distribute`` strategy (default: the current one): gradients are split across its
    replicas by sample and the inverse by block (num_samples must divide evenly), and every worker
    ends with the same masks and weights. Per weight tensor, the gradient rows are all-gathered, or,
    when its blocks are small (c < m/2), their c × c Gram sums are all-reduced, whichever moves fewer
    bytes (``report.gathered_bytes``, ``report.reduced_bytes``). verbose: 0 silent, 1 progress bar and table.
    max_memory: bytes (or '4GB', '512MB') the event's gradients, blocks and vectors may take; None: half
    the memory available now. Over it, the gradients are computed one group of layers at a time
    (recomputed for the update if needed); if no plan fits, a MemoryBudgetError (a ValueError) says
    what would. gradient_dtype: 'float32', or 'bfloat16'/'float16' to store the gradients in half the memory.
    """
    validate_sparsity(target_sparsity)
    if not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"steps must be an int ≥ 1, got {steps!r}")
    config = PruningConfig(method, mode, num_samples, fisher_batch_size, block_size, damping, update, dtype,
                           shuffle_buffer, max_memory, gradient_dtype)
    started = time.perf_counter()
    pruner = Pruner(model, find_prunable_weights(model), dataset, loss, config, strategy)
    start_sparsity = pruner.sparsity()
    exchanged_before = pruner.executor.gathered_bytes, pruner.executor.reduced_bytes
    if start_sparsity > target_sparsity:
        warnings.warn(f"the model is already {start_sparsity:.2%} sparse, above target {target_sparsity:.2%}; "
                      "pruned weights stay pruned", RuntimeWarning, stacklevel=2)
    if verbose and pruner.plan is not None and pruner.plan.streamed:
        print(f"memory plan: {pruner.plan}")
    units = pruner.work_units()
    progbar = keras.utils.Progbar(steps * units, verbose=verbose, unit_name="unit") if verbose else None
    for step, sparsity in enumerate(step_sparsities(start_sparsity, target_sparsity, steps)):
        pruner.prune_to(sparsity, fisher_seed(seed, step),
                        on_progress=(lambda done, base=step * units: progbar.update(base + done)) if progbar else None)
    report = PruningReport(method, mode, float(target_sparsity), steps, layer_sparsities(pruner.weights),
                           pruner.times.gradient_seconds, pruner.times.inverse_seconds,
                           time.perf_counter() - started, pruner.executor.gathered_bytes - exchanged_before[0],
                           pruner.executor.reduced_bytes - exchanged_before[1])
    if verbose:
        print(report)
    return report
