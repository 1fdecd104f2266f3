"""``one_shot_prune``: prune a tf_keras model in place, without training, and report what was done."""
from __future__ import annotations

import time
from typing import Any, Optional

import tf_keras as keras

from tf_woodfisher.config import LAYERWISE_METHODS, WoodFisherConfig, resolve_config, validate_sparsity
from tf_woodfisher.keras_common import run_one_shot
from tf_woodfisher.pruning.report import PruningReport
from tf_woodfisher.tfmot.layerwise import layerwise_prune
from tf_woodfisher.tfmot.policy import policy_targets
from tf_woodfisher.tfmot.problem import keras_problem
from tf_woodfisher.tfmot.targets import LayerSelection, find_prunable_weights, unpruned_weight_count


def one_shot_prune(model, dataset, loss, target_sparsity: float, config: Optional[WoodFisherConfig] = None, *,
                   layers: LayerSelection = None, pruning_policy=None, strategy=None, verbose: int = 1,
                   loss_weights: Any = None, batched: Optional[bool] = None, **overrides: Any) -> PruningReport:
    """Prune ``model``'s weights in place to ``target_sparsity`` and return a :class:`PruningReport`.

    Args:
        model: a built tf_keras model, plain or wrapped by tfmot (then its masks are set too).
        dataset: a ``tf.data.Dataset`` of (x, y) pairs or (x, y, sample_weight) triples, batched or not
            (unused for ``magnitude``; with sample weights each gradient is that of its group's weighted mean
            loss, Keras' convention: a zero weight removes a sample); for the
            layer-wise methods ``'obc'`` and ``'sparsegpt'``, calibration inputs x or (x, y), labels ignored
            (:mod:`tf_woodfisher.tfmot.layerwise`).
        loss: a Keras loss (object, name or function), or a list / dict of them (one per output, as
            ``compile`` takes them), matching the model's outputs (unused, may be None, for
            ``magnitude``, ``obc`` and ``sparsegpt``).
        target_sparsity: fraction of zeros over the pruned weights (``global``) or in each (``layerwise``).
        config: a :class:`~tf_woodfisher.WoodFisherConfig` (default: its defaults).
        layers: which layers to prune (names or glob patterns, layer objects, or a predicate; see
            :func:`~tf_woodfisher.tfmot.find_prunable_weights`); None: every prunable layer. The global
            threshold runs over the selection only.
        pruning_policy: tfmot's ``PruningPolicy`` (e.g. ``PruneForLatencyOnXNNPack()``): as with
            ``prune_low_magnitude``, its ``ensure_model_supports_pruning`` must accept the model, and only the
            layers its ``allow_pruning`` accepts are pruned (within ``layers``).
        strategy: a ``tf.distribute`` strategy (default: the current one): gradients are split across its
            replicas by sample and the inverse by block (num_gradients must divide evenly), and every worker
            ends with the same masks and weights.
        verbose: 0 silent, 1 a Keras progress bar and the per-layer table.
        loss_weights: as ``compile``'s, for a multi-output model: a list or a dict by output name.
        batched: whether ``dataset`` yields batches; None: told from the model's input ranks (an error
            asks for it where they cannot tell, e.g. a subclassed model never called on data).
        **overrides: fields of the config (``method='magnitude'``, ``num_gradients=400``, ``steps=8``, ...),
            including tfmot's structures ``block_size=(r, c)`` (with ``block_pooling_type``) and
            ``sparsity_m_by_n=(n, m)`` (then ``target_sparsity`` must be n/m, the sparsity the pattern fixes).

    Returns:
        The :class:`PruningReport` (per-layer sparsity, seconds, bytes exchanged, the config used; for
        ``obc``/``sparsegpt`` each layer's relative reconstruction error too).

    Raises:
        TypeError: an unknown keyword, or an old keyword whose meaning changed (named with its replacement).
        ValueError: a sparsity outside [0, 1), a config value out of range, an empty or too small dataset,
            a loss that does not fit the outputs, non-finite gradients, no prunable layers, an unbuilt model,
            a ``pruning_policy`` that rejects the model, a structure that does not fit a weight (named), or
            a ``target_sparsity`` other than n/m with ``sparsity_m_by_n``, a loss structure (or loss_weights)
            that does not match the outputs, or a dataset whose batching cannot be told (pass ``batched=``).
        tf_woodfisher.fisher.memory.MemoryBudgetError: no plan of the event fits ``max_memory``.
    """
    config = resolve_config(config, overrides, "one_shot_prune")
    target_sparsity = validate_sparsity(target_sparsity)
    started = time.perf_counter()
    targets = find_prunable_weights(model, layers)
    if pruning_policy is not None:
        targets = policy_targets(pruning_policy, model, targets, "one_shot_prune")
    if config.method in LAYERWISE_METHODS:  # post-training reconstruction from activations (obc, sparsegpt)
        return layerwise_prune(model, targets, dataset, config, target_sparsity, explicit=layers is not None,
                               verbose=verbose, started=started, progbar=keras.utils.Progbar,
                               unpruned=lambda pruned: unpruned_weight_count(model, pruned))
    problem = keras_problem(model, targets, dataset, loss, config, loss_weights=loss_weights, batched=batched)
    return run_one_shot(targets, problem, config, target_sparsity, strategy, verbose, keras.utils.Progbar,
                        lambda: unpruned_weight_count(model, targets), started)
