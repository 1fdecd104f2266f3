"""``prune_woodfisher``: the WoodFisher counterpart of tfmot's ``prune_low_magnitude``."""
from __future__ import annotations

import warnings
from typing import Any, Optional

import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from tf_woodfisher.config import WoodFisherConfig, resolve_config
from tf_woodfisher.tfmot.policy import check_policy, check_type
from tf_woodfisher.tfmot.schedules import SCHEDULES, KeepMasks
from tf_woodfisher.tfmot.targets import PruneLowMagnitude
from tf_woodfisher.tfmot.wrapper import PruneWoodFisher


def prune_scope():
    """A ``custom_object_scope`` to load models saved with tf_woodfisher (and tfmot) wrappers and schedules.

    Returns:
        The scope (a context manager), knowing ``PruneWoodFisher``, ``PruneLowMagnitude`` and the
        tf_woodfisher schedules: ``with tfw.prune_scope(): keras.models.load_model(path)``.
    """
    return keras.utils.custom_object_scope(
        dict(SCHEDULES, PruneWoodFisher=PruneWoodFisher, PruneLowMagnitude=PruneLowMagnitude))


def strip_pruning(model):
    """tfmot's ``strip_pruning``: the model without pruning wrappers, its weights keeping their zeros.

    Args:
        model: a Sequential or functional tf_keras model holding tfmot (or ``PruneWoodFisher``) wrappers.

    Returns:
        A clone of the model with every wrapper replaced by its inner layer.

    Raises:
        ValueError: as tfmot's ``strip_pruning`` (e.g. for a subclassed model).
    """
    return tfmot.sparsity.keras.strip_pruning(model)


def _already_wrapped(layers):
    for layer in layers:
        if isinstance(layer, PruneLowMagnitude):
            return layer
        if isinstance(layer, keras.Model):
            inner = _already_wrapped(layer.layers)
            if inner is not None:
                return inner
    return None


# Keras layer keywords that tfmot's prune_low_magnitude passes to the wrapper of a single layer.
LAYER_KEYWORDS = ("name", "trainable", "input_shape", "batch_input_shape", "batch_size", "weights",
                  "activity_regularizer")


def prune_woodfisher(to_prune, pruning_schedule=None, config: Optional[WoodFisherConfig] = None, *,
                     pruning_policy=None, **overrides: Any):
    """Wrap a layer, a list of layers, or a Sequential/functional model for WoodFisher pruning in ``model.fit``.

    Accepts what ``tfmot.sparsity.keras.prune_low_magnitude`` accepts and returns the same structure,
    with ``PruneWoodFisher`` wrappers (tfmot wrappers, so ``strip_pruning`` and ``PruningSummaries``
    work). Train with ``tfw.UpdatePruningStep(fisher_dataset, loss)`` in the callbacks: at each pruning
    step of ``pruning_schedule`` it prunes with WoodFisher scores computed on its Fisher data. As with
    tfmot, the returned model shares its layers with ``to_prune`` and must be compiled again.

    Args:
        to_prune: a tf_keras layer, a list of layers, or a Sequential/functional model.
        pruning_schedule: any tfmot ``PruningSchedule`` (default ``ConstantSparsity(0.5, 0)``), e.g.
            :class:`~tf_woodfisher.GradualSchedule` or :class:`~tf_woodfisher.OneShotSchedule`.
        config: the :class:`~tf_woodfisher.WoodFisherConfig` of the pruning events (saved with the model).
        pruning_policy: tfmot's ``PruningPolicy`` (e.g. ``PruneForLatencyOnXNNPack()``), as in tfmot: for a
            model, its ``ensure_model_supports_pruning`` must accept the model and only the layers its
            ``allow_pruning`` accepts are wrapped; tfmot does not use it for a layer or a list (a warning says so).
        **overrides: fields of the config, including tfmot's ``block_size``, ``block_pooling_type`` and
            ``sparsity_m_by_n`` (scored as groups by the chosen method; with N:M the masks are set once, at
            training step 1, as in tfmot); and, as in tfmot, Keras layer keywords (``name``, ``trainable``,
            ...) for the wrapper of a single layer.

    Returns:
        The wrapped layer, list of layers or model.

    Raises:
        TypeError: an unknown keyword (e.g. the Fisher data, which goes to ``tfw.UpdatePruningStep``), or a
            ``pruning_policy`` that is not a tfmot ``PruningPolicy``.
        ValueError: a subclassed model, a single layer that is already wrapped (inside a model or a list, a
            wrapped layer is used as it is, as in tfmot), a schedule that is not a tfmot one,
            a Keras 3 object, a config value out of range, a ``pruning_policy`` that rejects the model, or a
            structure that does not fit a wrapped layer's weights (e.g. ``block_size`` on a Conv2D kernel).
    """
    for name in ("fisher_dataset", "loss"):
        if name in overrides:
            raise TypeError(f"prune_woodfisher no longer takes {name}=: pass it to the callback, "
                            f"tfw.UpdatePruningStep({name}=...), which runs the pruning events")
    if pruning_schedule is not None and not isinstance(pruning_schedule, tfmot.sparsity.keras.PruningSchedule):
        if isinstance(pruning_schedule, tf.data.Dataset):
            raise TypeError("prune_woodfisher's second argument is the pruning schedule; the Fisher dataset goes "
                            "to tfw.UpdatePruningStep(fisher_dataset, loss)")
        raise ValueError(f"pruning_schedule must be a tfmot PruningSchedule, got {type(pruning_schedule).__name__}")
    check_type(pruning_policy, "prune_woodfisher")
    schedule = pruning_schedule or tfmot.sparsity.keras.ConstantSparsity(0.5, 0)
    layer_kwargs = {k: overrides.pop(k) for k in LAYER_KEYWORDS if k in overrides}
    config = resolve_config(config, overrides, "prune_woodfisher")

    def wrap(layer, **kwargs):
        return PruneWoodFisher(layer, schedule, config, **kwargs)

    if layer_kwargs and not (isinstance(to_prune, keras.layers.Layer) and not isinstance(to_prune, keras.Model)):
        warnings.warn(f"prune_woodfisher: the layer keywords {sorted(layer_kwargs)} apply to the wrapper of a single "
                      f"layer and are ignored for a {type(to_prune).__name__} (as in tfmot)", RuntimeWarning,
                      stacklevel=2)
    if not isinstance(to_prune, (list, keras.layers.Layer)):
        hint = (" (a Keras 3 object: use tf_woodfisher.keras3 for Keras 3 models)"
                if type(to_prune).__module__.startswith("keras") else "")
        raise ValueError(f"prune_woodfisher can prune a tf_keras Sequential or functional model, a layer or a list "
                         f"of layers, got {type(to_prune).__name__}{hint}")
    if isinstance(to_prune, PruneLowMagnitude):
        raise ValueError(f"layer {to_prune.name!r} is already wrapped for pruning; strip it with "
                         "tfw.strip_pruning() before wrapping again")

    if isinstance(to_prune, keras.Model):
        if not isinstance(to_prune, keras.Sequential) and not to_prune._is_graph_network:
            raise ValueError("Subclassed models are not supported currently: use a Sequential or functional "
                             "model, or call tfw.one_shot_prune for one-shot pruning of a built subclassed model")
        check_policy(pruning_policy, to_prune, "prune_woodfisher")

        def clone(layer):
            if isinstance(layer, keras.Model):
                return keras.models.clone_model(layer, input_tensors=None, clone_function=clone)
            if isinstance(layer, PruneLowMagnitude):
                return layer  # as tfmot: an already wrapped layer is used as it is
            if pruning_policy is not None and not pruning_policy.allow_pruning(layer):
                return layer  # as tfmot: the layer is shared, unwrapped
            return wrap(layer)

        return keras.models.clone_model(to_prune, input_tensors=None, clone_function=clone)
    if pruning_policy is not None:
        warnings.warn(f"pruning_policy={type(pruning_policy).__name__}() is not used for a "
                      f"{'list of layers' if isinstance(to_prune, list) else 'single layer'}: tfmot applies a policy "
                      "to Sequential and functional models only", RuntimeWarning, stacklevel=2)
    if isinstance(to_prune, list):
        return [layer if isinstance(layer, (keras.layers.InputLayer, PruneLowMagnitude)) else wrap(layer)
                for layer in to_prune]  # as tfmot: already wrapped layers are used as they are
    return wrap(to_prune, **layer_kwargs)


def masks_from_zeros(model):
    """Wrap ``model`` so that its current zeros become fixed masks (e.g. after gRDA training).

    Fine-tuning the result with ``tfw.UpdatePruningStep()`` keeps every zero, and ``strip_pruning`` or
    ``tfw.export_tflite`` give the sparse model.

    Args:
        model: a Sequential or functional tf_keras model, not yet wrapped for pruning.

    Returns:
        A ``prune_woodfisher`` model (method ``'magnitude'``) with the ``KeepMasks`` schedule and
        masks = (weight ≠ 0); it shares its layers with ``model`` and must be compiled again.

    Raises:
        ValueError: as :func:`prune_woodfisher` (a subclassed model, ...), or a model that already holds a
            pruning wrapper (its masks are its own: strip it first).
    """
    already = _already_wrapped(getattr(model, "layers", []))
    if already is not None:
        raise ValueError(f"layer {already.name!r} is already wrapped for pruning: its masks are its own; strip the "
                         "model with tfw.strip_pruning() before masks_from_zeros")
    wrapped = prune_woodfisher(model, KeepMasks(), method="magnitude")
    for layer in wrapped.submodules:
        if isinstance(layer, PruneWoodFisher):
            for weight, mask, _ in layer.pruning_vars:
                mask.assign(tf.cast(tf.not_equal(weight, 0), mask.dtype))
    return wrapped
