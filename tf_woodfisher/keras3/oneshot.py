"""``one_shot_prune`` for Keras 3 models, and the Keras 3 model as the core's :class:`PruningProblem`."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import keras
import tensorflow as tf

from tf_woodfisher import compat
from tf_woodfisher import keras_common as common
from tf_woodfisher.fisher.gradients import make_gradient_fn
from tf_woodfisher.config import LAYERWISE_METHODS, WoodFisherConfig, resolve_config, validate_sparsity
from tf_woodfisher.keras3.layerwise import layerwise_prune
from tf_woodfisher.keras3.targets import (LayerSelection, as_tf_variable, find_prunable_weights, input_rank,
                                         unpruned_weight_count)
from tf_woodfisher.pruning.pruner import PruningProblem
from tf_woodfisher.pruning.report import PruningReport
from tf_woodfisher.pruning.targets import PruningTarget


def per_sample_loss(loss: Any):
    """(y_true, y_pred) → per-sample losses, from a Keras 3 loss name, object (rebuilt with ``reduction=None``)
    or function.

    Raises:
        TypeError: ``loss`` is none of these.
    """
    return common.per_sample_loss(loss, keras.losses, None)


def forward_model(model):
    """The model to differentiate: a :class:`~tf_woodfisher.keras3.PrunedModel`'s inner model (so Fisher passes
    count no training step), else the model itself."""
    return model.model if getattr(type(model), "_tfw3_pruned", False) else model


def gradient_fn(forward, variables, loss_fn):
    """:func:`tf_woodfisher.fisher.gradients.make_gradient_fn`, except that with oneDNN on and no GPU, groups of one
    sample are given to it as groups of two copies of the sample (the same mean loss, so the same gradient, twice
    the work): TensorFlow 2.21's oneDNN batch matmul corrupts memory on the rank-4 operands with a unit group axis
    that vectorising Keras 3's EinsumDense and MultiHeadAttention on sequences creates (see
    :func:`tf_woodfisher.compat.onednn_enabled`)."""
    compiled = make_gradient_fn(forward, variables, loss_fn)
    if not compat.onednn_enabled() or tf.config.list_logical_devices("GPU"):  # GPU matmuls do not use oneDNN
        return compiled

    def gradients(x, y):
        if tf.nest.flatten(x)[0].shape[1] == 1:
            x, y = tf.nest.map_structure(lambda t: tf.concat([t, t], axis=1), (x, y))
        return compiled(x, y)

    return gradients


def keras3_problem(model, targets: Sequence[PruningTarget], dataset, loss, config: WoodFisherConfig) -> PruningProblem:
    """The :class:`PruningProblem` of ``targets`` of a Keras 3 ``model``: its forward pass in inference mode
    (``model(x, training=False)``), the per-sample loss of ``loss``, the Fisher ``dataset`` (batched or not,
    told apart by the model's input rank).

    Raises:
        ValueError: a method that needs gradients without dataset or loss, an empty dataset, or a loss
            that does not fit the model's outputs and the dataset's labels.
    """
    network = forward_model(model)
    problem = common.model_problem(targets, network, dataset, loss, config, per_sample_loss, input_rank(network))
    return dataclasses.replace(problem, make_gradient_fn=gradient_fn)


def one_shot_prune(model, dataset, loss, target_sparsity: float, config: Optional[WoodFisherConfig] = None, *,
                   layers: LayerSelection = None, strategy=None, verbose: int = 1, **overrides: Any) -> PruningReport:
    """Prune a Keras 3 ``model``'s weights in place to ``target_sparsity`` and return a :class:`PruningReport`.

    The same methods, modes, configuration and report as ``tfw.one_shot_prune`` (the tf_keras path).

    Args:
        model: a built Keras 3 model (Sequential, functional or subclassed), or a
            :class:`~tf_woodfisher.keras3.PrunedModel` (then its masks are set too).
        dataset: a ``tf.data.Dataset`` of (x, y) pairs, batched or not (unused for ``magnitude``); for the
            layer-wise methods ``'obc'`` and ``'sparsegpt'``, calibration inputs x or (x, y), labels ignored
            (:mod:`tf_woodfisher.keras_layerwise`).
        loss: a Keras 3 loss (object, name or function) matching the model's outputs (unused, may be None, for
            ``magnitude``, ``obc`` and ``sparsegpt``).
        target_sparsity: fraction of zeros over the pruned weights (``global``) or in each (``layerwise``).
        config: a :class:`~tf_woodfisher.WoodFisherConfig` (default: its defaults).
        layers: which layers to prune (names or glob patterns, layer objects, or a predicate; see
            :func:`~tf_woodfisher.keras3.find_prunable_weights`); None: every prunable layer.
        strategy: a ``tf.distribute`` strategy (default: the current one): gradients are split across its
            replicas by sample and the inverse by block (num_gradients must divide evenly).
        verbose: 0 silent, 1 a Keras progress bar and the per-layer table.
        **overrides: fields of the config (``method='magnitude'``, ``num_gradients=400``, ``steps=8``, ...).

    Returns:
        The :class:`PruningReport` (per-layer sparsity, seconds, bytes exchanged, the config used; for
        ``obc``/``sparsegpt`` each layer's relative reconstruction error too).

    Raises:
        TypeError: an unknown keyword.
        ValueError: a tf_keras model (use ``import tf_woodfisher as tfw``), a sparsity outside [0, 1), a config
            value out of range, an empty or too small dataset, a loss that does not fit the outputs, non-finite
            gradients, no prunable layers, an unbuilt model; for ``obc``/``sparsegpt``, no calibration data, a layer
            selected with ``layers=`` that the method cannot reconstruct (named), N:M on a depthwise kernel, a
            target other than n/m with ``sparsity_m_by_n``.
        tf_woodfisher.fisher.memory.MemoryBudgetError: no plan of the event fits ``max_memory``.
    """
    config = resolve_config(config, overrides, "tfw3.one_shot_prune")
    target_sparsity = validate_sparsity(target_sparsity)
    started = time.perf_counter()
    targets = find_prunable_weights(model, layers)
    if config.method in LAYERWISE_METHODS:  # post-training reconstruction from activations (obc, sparsegpt)
        network = forward_model(model)
        return layerwise_prune(network, targets, dataset, config, target_sparsity, explicit=layers is not None,
                               verbose=verbose, started=started, progbar=keras.utils.Progbar,
                               unpruned=lambda pruned: unpruned_weight_count(network, pruned))
    problem = keras3_problem(model, targets, dataset, loss, config)
    return common.run_one_shot(targets, problem, config, target_sparsity, strategy, verbose, keras.utils.Progbar,
                               lambda: unpruned_weight_count(forward_model(model), targets), started)


def one_shot_sweep(model, dataset, loss, sparsities: Sequence[float], evaluate: Callable[[Any], Any],
                   config: Optional[WoodFisherConfig] = None, *, layers: LayerSelection = None, strategy=None,
                   verbose: int = 1, cumulative: bool = False, **overrides: Any) -> list:
    """Prune a Keras 3 ``model`` to each of ``sparsities`` from its current weights and evaluate it there.

    The same as ``tfw.one_shot_sweep`` (the tf_keras path), without its BatchNorm recalibration: each point is
    what :func:`one_shot_prune` with the same arguments gives, followed by ``evaluate(model)``; every variable
    of the model is restored afterwards; with ``steps=1`` the statistics are computed once for all points;
    ``cumulative=True`` makes it one multi-step run through the sparsities.

    Args:
        model, dataset, loss, config, layers, strategy, **overrides: as for :func:`one_shot_prune`.
        sparsities: the target sparsities, each in [0, 1), run in the order given.
        evaluate: called as ``evaluate(model)`` with the model pruned to each sparsity.
        verbose: 0 silent, 1 one line per point.
        cumulative: one multi-step run through non-decreasing sparsities (not for ``obc``/``sparsegpt``).

    Returns:
        A list of :class:`~tf_woodfisher.pruning.SweepPoint` (sparsity, report, the value ``evaluate``
        returned), one per sparsity, in order.

    Raises:
        ValueError, TypeError: as :func:`one_shot_prune`; an empty ``sparsities``; decreasing sparsities with
            ``cumulative``, or ``cumulative`` with ``obc``/``sparsegpt``.
    """
    config = resolve_config(config, overrides, "tfw3.one_shot_sweep")

    def fisher_problem():
        targets = find_prunable_weights(model, layers)
        return (targets, keras3_problem(model, targets, dataset, loss, config),
                unpruned_weight_count(forward_model(model), targets))

    return common.run_sweep(config, sparsities, lambda: evaluate(model), [as_tf_variable(v) for v in model.variables],
                            strategy=strategy, fisher_problem=fisher_problem, verbose=verbose, cumulative=cumulative,
                            prune_one=lambda sparsity: one_shot_prune(model, dataset, loss, sparsity, config,
                                                                      layers=layers, verbose=0))
