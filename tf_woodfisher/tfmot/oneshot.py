"""``one_shot_prune``: prune a tf_keras model in place, without training, and report what was done;
``one_shot_sweep``: the same at several sparsities from one start, evaluated at each."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import tf_keras as keras

from tf_woodfisher.config import LAYERWISE_METHODS, WoodFisherConfig, resolve_config, validate_sparsity
from tf_woodfisher.batchnorm import batchnorm_layers, recalibrate_batchnorm as recalibrate
from tf_woodfisher.keras_common import run_one_shot, run_sweep
from tf_woodfisher.pruning.report import PruningReport
from tf_woodfisher.tfmot.layerwise import layerwise_prune
from tf_woodfisher.tfmot.policy import policy_targets
from tf_woodfisher.tfmot.problem import keras_problem
from tf_woodfisher.tfmot.targets import LayerSelection, find_prunable_weights, unpruned_weight_count


def one_shot_prune(model, dataset, loss, target_sparsity: float, config: Optional[WoodFisherConfig] = None, *,
                   layers: LayerSelection = None, pruning_policy=None, strategy=None, verbose: int = 1,
                   loss_weights: Any = None, batched: Optional[bool] = None, recalibrate_batchnorm: Any = None,
                   **overrides: Any) -> PruningReport:
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
        recalibrate_batchnorm: training data to re-estimate the BatchNorm statistics on after pruning
            (:func:`~tf_woodfisher.recalibrate_batchnorm`: a batched dataset, arrays, or an iterable of
            batches, all of it used); None (the default): the statistics stay as they are. On the reference
            ResNet-20 it helps only at high sparsity (BENCHMARKS.md).
        **overrides: fields of the config (``method='magnitude'``, ``num_gradients=400``, ``steps=8``, ...),
            including tfmot's structures ``block_size=(r, c)`` (with ``block_pooling_type``) and
            ``sparsity_m_by_n=(n, m)`` (then ``target_sparsity`` must be n/m, the sparsity the pattern fixes).

    Returns:
        The :class:`PruningReport` (per-layer sparsity, seconds, bytes exchanged, the config used; for
        ``obc``/``sparsegpt`` each layer's relative reconstruction error too; the recalibration if any).

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
    if recalibrate_batchnorm is not None:
        _check_batchnorm(model)
    target_sparsity = validate_sparsity(target_sparsity)
    started = time.perf_counter()
    targets = find_prunable_weights(model, layers)
    if pruning_policy is not None:
        targets = policy_targets(pruning_policy, model, targets, "one_shot_prune")
    if config.method in LAYERWISE_METHODS:  # post-training reconstruction from activations (obc, sparsegpt)
        report = layerwise_prune(model, targets, dataset, config, target_sparsity, explicit=layers is not None,
                                 verbose=verbose, started=started, progbar=keras.utils.Progbar,
                                 unpruned=lambda pruned: unpruned_weight_count(model, pruned))
    else:
        problem = keras_problem(model, targets, dataset, loss, config, loss_weights=loss_weights, batched=batched)
        report = run_one_shot(targets, problem, config, target_sparsity, strategy, verbose, keras.utils.Progbar,
                              lambda: unpruned_weight_count(model, targets), started)
    if recalibrate_batchnorm is None:
        return report
    recalibration = recalibrate(model, recalibrate_batchnorm)
    if verbose:
        print(recalibration)
    return dataclasses.replace(report, recalibration=recalibration, total_seconds=time.perf_counter() - started)


def one_shot_sweep(model, dataset, loss, sparsities: Sequence[float], evaluate: Callable[[Any], Any],
                   config: Optional[WoodFisherConfig] = None, *, layers: LayerSelection = None, pruning_policy=None,
                   strategy=None, verbose: int = 1, loss_weights: Any = None, batched: Optional[bool] = None,
                   recalibrate_batchnorm: Any = None, cumulative: bool = False, **overrides: Any) -> list:
    """Prune ``model`` to each of ``sparsities`` from its current weights and evaluate it there.

    Each point is exactly what :func:`one_shot_prune` with the same arguments would give (same masks and
    weights, same seed), followed by ``evaluate(model)``; the model is then restored (weights, masks,
    BatchNorm statistics: every variable), so it ends the sweep as it began. With ``steps=1`` (and a memory
    plan that keeps the statistics, and no N:M pattern) the gradients, inverse Fisher and scores of the
    starting model are computed once for all points: a whole accuracy-against-sparsity curve costs one
    pruning event plus one selection and update per point. Otherwise (``steps`` > 1, ``obc``/``sparsegpt``)
    every point is a full one-shot run.

    With ``cumulative=True`` the sweep is instead one multi-step run through the sparsities in increasing
    order: each point continues from the previous one with ``steps`` events, their Fisher statistics
    recomputed on the pruned model (so point i is an (i+1)·steps-step one-shot pruning, as
    :func:`one_shot_prune` with that many steps would do through those intermediate sparsities); a
    BatchNorm recalibration then stays in place for the next point. A dense grid of sparsities gives the
    multi-step recipe's whole curve for the cost of its last point.

    Args:
        model, dataset, loss, config, layers, pruning_policy, strategy, loss_weights, batched,
            recalibrate_batchnorm, **overrides: as for :func:`one_shot_prune` (the BatchNorm
            recalibration runs at every point, after pruning and before ``evaluate``).
        sparsities: the target sparsities, each in [0, 1), run in the order given.
        evaluate: called as ``evaluate(model)`` with the model pruned to each sparsity (e.g. its test
            accuracy); anything it changes in the model is undone after it returns.
        verbose: 0 silent, 1 one line per point.
        cumulative: see above (not for ``obc``/``sparsegpt``).

    Returns:
        A list of :class:`~tf_woodfisher.pruning.SweepPoint` (sparsity, :class:`PruningReport`, the value
        ``evaluate`` returned), one per sparsity, in order. The first point's report carries the seconds of
        the shared statistics.

    Raises:
        ValueError, TypeError: as :func:`one_shot_prune`; an empty ``sparsities``; decreasing sparsities
            with ``cumulative``, or ``cumulative`` with ``obc``/``sparsegpt``.
    """
    config = resolve_config(config, overrides, "one_shot_sweep")
    if recalibrate_batchnorm is not None:
        _check_batchnorm(model)

    def fisher_problem():
        targets = find_prunable_weights(model, layers)
        if pruning_policy is not None:
            targets = policy_targets(pruning_policy, model, targets, "one_shot_sweep")
        problem = keras_problem(model, targets, dataset, loss, config, loss_weights=loss_weights, batched=batched)
        return targets, problem, unpruned_weight_count(model, targets)

    return run_sweep(config, sparsities, lambda: evaluate(model), model.variables, strategy=strategy,
                     prune_one=lambda sparsity: one_shot_prune(model, dataset, loss, sparsity, config, layers=layers,
                                                               pruning_policy=pruning_policy, verbose=0,
                                                               batched=batched),
                     fisher_problem=fisher_problem, verbose=verbose, cumulative=cumulative,
                     after_prune=None if recalibrate_batchnorm is None else (
                         lambda: recalibrate(model, recalibrate_batchnorm)))


def _check_batchnorm(model):
    """Fail before pruning, not after, when recalibrate_batchnorm= is given for a model without BatchNorm."""
    if not batchnorm_layers(model):
        raise ValueError(f"recalibrate_batchnorm= was given, but model {model.name!r} has no BatchNormalization "
                         "layer to recalibrate: drop the option")
