"""``one_shot_prune``: prune a tf_keras model in place, without training, and report what was done."""
from __future__ import annotations

import time
import warnings
from typing import Any, Optional

import tf_keras as keras

from tf_woodfisher.config import WoodFisherConfig, resolve_config, validate_sparsity
from tf_woodfisher.pruning.pruner import Pruner, prune_in_steps
from tf_woodfisher.pruning.report import PruningReport, report_of
from tf_woodfisher.tfmot.problem import keras_problem
from tf_woodfisher.tfmot.targets import LayerSelection, find_prunable_weights, unpruned_weight_count


def one_shot_prune(model, dataset, loss, target_sparsity: float, config: Optional[WoodFisherConfig] = None, *,
                   layers: LayerSelection = None, strategy=None, verbose: int = 1, **overrides: Any) -> PruningReport:
    """Prune ``model``'s weights in place to ``target_sparsity`` and return a :class:`PruningReport`.

    Args:
        model: a built tf_keras model, plain or wrapped by tfmot (then its masks are set too).
        dataset: a ``tf.data.Dataset`` of (x, y) pairs, batched or not (unused for ``magnitude``).
        loss: a Keras loss (object, name or function) matching the model's outputs.
        target_sparsity: fraction of zeros over the pruned weights (``global``) or in each (``layerwise``).
        config: a :class:`~tf_woodfisher.WoodFisherConfig` (default: its defaults).
        layers: which layers to prune (names or glob patterns, layer objects, or a predicate; see
            :func:`~tf_woodfisher.tfmot.find_prunable_weights`); None: every prunable layer. The global
            threshold runs over the selection only.
        strategy: a ``tf.distribute`` strategy (default: the current one): gradients are split across its
            replicas by sample and the inverse by block (num_gradients must divide evenly), and every worker
            ends with the same masks and weights.
        verbose: 0 silent, 1 a Keras progress bar and the per-layer table.
        **overrides: fields of the config (``method='magnitude'``, ``num_gradients=400``, ``steps=8``, ...).

    Returns:
        The :class:`PruningReport` (per-layer sparsity, seconds, bytes exchanged, the config used).

    Raises:
        TypeError: an unknown keyword, or an old keyword whose meaning changed (named with its replacement).
        ValueError: a sparsity outside [0, 1), a config value out of range, an empty or too small dataset,
            a loss that does not fit the outputs, non-finite gradients, no prunable layers, an unbuilt model.
        tf_woodfisher.fisher.memory.MemoryBudgetError: no plan of the event fits ``max_memory``.
    """
    config = resolve_config(config, overrides, "one_shot_prune")
    target_sparsity = validate_sparsity(target_sparsity)
    started = time.perf_counter()
    targets = find_prunable_weights(model, layers)
    pruner = Pruner(keras_problem(model, targets, dataset, loss, config), config, strategy)
    start_sparsity = pruner.sparsity()
    if start_sparsity > target_sparsity:
        warnings.warn(f"the model is already {start_sparsity:.2%} sparse, above target {target_sparsity:.2%}; "
                      "pruned weights stay pruned", RuntimeWarning, stacklevel=2)
    if verbose and pruner.plan is not None and pruner.plan.streamed:
        print(f"memory plan: {pruner.plan}")
    progbar = keras.utils.Progbar(config.steps * pruner.work_units(), verbose=verbose, unit_name="unit") \
        if verbose else None
    stats = prune_in_steps(pruner, target_sparsity, config.seed,
                           on_progress=progbar.update if progbar is not None else None)
    report = report_of(config, target_sparsity, targets, stats, time.perf_counter() - started,
                       unpruned_weight_count(model, targets))
    if verbose:
        print(report)
    return report
