"""Masks for gradual pruning of Keras 3 models, without layer wrappers: ``prune``, ``PrunedModel``, ``strip``.

:func:`prune` attaches to a model one 0/1 mask per pruned weight (non-trainable variables), a ``pruning_step``
(training steps seen, as tfmot's) and a ``masks_step`` (the step whose event last set the masks), all held by
a :class:`PrunedModel` around the model: the same layers and variables, not a copy. The masks act through
Keras' own weight constraints: every optimizer step (``optimizer.apply``, in ``model.fit`` and in custom loops
alike) ends with ``weight ← constraint(weight) · mask``, so pruned weights stay exactly zero whatever the
optimizer. :class:`~tf_woodfisher.keras3.PruningCallback` sets the masks at the schedule's pruning steps.
``PrunedModel`` is registered with ``keras.saving.register_keras_serializable``: a ``.keras`` file saved
mid-pruning and loaded with ``keras.saving.load_model`` restores the masks, the step and the schedule.
"""
from __future__ import annotations

from typing import Any, Optional

import keras
import tensorflow as tf

from tf_woodfisher.config import WoodFisherConfig, resolve_config
from tf_woodfisher.keras3.schedules import ConstantSparsity, KeepMasks, PruningSchedule
from tf_woodfisher.keras3.targets import (LayerSelection, as_tf_variable, check_keras3_model, find_prunable_weights,
                                          keras_variables)
from tf_woodfisher.pruning.targets import PruningTarget

__all__ = ["PrunedModel", "masks_from_zeros", "prune", "strip"]

CALLBACK_REQUIRED = (
    "{name!r} is pruned by tf_woodfisher and reached a pruning step of its schedule in training without "
    "tfw3.PruningCallback(): add it to model.fit's callbacks (it runs the WoodFisher pruning events); in a custom "
    "loop call its set_model() and on_train_begin() first, and on_train_batch_begin() before each step. Step:"
)
ATTACHED_TWICE = ("{what} already has WoodFisher masks attached (it is, or is held by, a tfw3.PrunedModel): call "
                  "tfw3.strip() on that PrunedModel before attaching masks again")


class MaskConstraint(keras.constraints.Constraint):
    """A weight's constraint while it is pruned: ``inner(weight) · mask`` (``inner``: the constraint it replaces).

    Keras applies a variable's constraint after every optimizer update, so the pruned entries stay zero. Set on
    the variable only (``variable.constraint``), never in a layer's config: it is not saved, :class:`PrunedModel`
    sets it again when it is loaded.
    """

    def __init__(self, mask, inner=None):
        self.mask, self.inner = mask, inner

    def __call__(self, weight):
        if self.inner is not None:
            weight = self.inner(weight)
        return weight * keras.ops.cast(self.mask, weight.dtype)


def _mask_name(target_name: str) -> str:
    return target_name.replace("/", "__") + "__mask"


@keras.saving.register_keras_serializable(package="tf_woodfisher")
class PrunedModel(keras.Model):
    """A Keras 3 model with WoodFisher masks attached; made by :func:`prune`. Train it with
    :class:`~tf_woodfisher.keras3.PruningCallback` in ``model.fit``'s callbacks.

    It calls the model it holds (same layers, same variables) and, on training calls, counts the training step;
    at a pruning step of its schedule whose masks were not set by the callback it raises
    ``InvalidArgumentError`` (training without the callback would silently never prune).

    Args:
        model: the built Keras 3 model to prune.
        schedule: a :mod:`tf_woodfisher.keras3.schedules` schedule (default ``ConstantSparsity(0.5, 0)``).
        woodfisher_config: the :class:`~tf_woodfisher.WoodFisherConfig` of its events (or its ``to_dict()``).
        pruned_weights: the names of the pruned weights (as :func:`~tf_woodfisher.keras3.find_prunable_weights`
            names them); default all prunable weights.
        **kwargs: Keras model keywords (``name``).

    Attributes:
        model: the model held. masks: one 0/1 variable per pruned weight. pruning_step: training steps seen (int64).
        masks_step: the step whose pruning event last set the masks (-1: none yet).

    Raises:
        ValueError: a tf_keras model, masks attached twice, a name in ``pruned_weights`` that is no prunable weight.
    """

    _tfw3_pruned = True

    def __init__(self, model, schedule: Optional[PruningSchedule] = None, woodfisher_config=None,
                 pruned_weights: Optional[list] = None, **kwargs):
        check_keras3_model(model, "the model to prune")
        if getattr(type(model), "_tfw3_pruned", False):
            raise ValueError(ATTACHED_TWICE.format(what=f"model {model.name!r}"))
        schedule = ConstantSparsity(0.5, 0) if schedule is None else schedule
        if not isinstance(schedule, PruningSchedule):
            raise ValueError(f"schedule must be a tf_woodfisher.keras3 schedule (OneShotSchedule, GradualSchedule, "
                             f"ConstantSparsity, PolynomialDecay, KeepMasks), got {type(schedule).__name__}")
        config = woodfisher_config if isinstance(woodfisher_config, WoodFisherConfig) else \
            WoodFisherConfig.from_dict(woodfisher_config or {})
        kwargs.setdefault("name", f"{model.name}_pruned")
        super().__init__(**kwargs)
        targets = find_prunable_weights(model, warn_unpruned=False)
        if pruned_weights is not None:
            by_name = {t.name: t for t in targets}
            unknown = [n for n in pruned_weights if n not in by_name]
            if unknown:
                raise ValueError(f"pruned_weights {unknown} are not prunable weights of {model.name!r}; they are "
                                 f"{sorted(by_name)}")
            targets = [by_name[n] for n in pruned_weights]
        variables = keras_variables(model, targets)
        held = [t.name for t, v in zip(targets, variables) if isinstance(v.constraint, MaskConstraint)]
        if held:
            raise ValueError(ATTACHED_TWICE.format(what=f"the weight {held[0]!r} of {model.name!r}"))
        self.model = model
        self.schedule = schedule
        self.woodfisher_config = config
        self._names = [t.name for t in targets]
        self._masks = [self.add_weight(shape=tuple(v.shape), initializer="ones", dtype=v.dtype, trainable=False,
                                       name=_mask_name(t.name)) for t, v in zip(targets, variables)]
        self.pruning_step = self.add_weight(shape=(), initializer="zeros", dtype="int64", trainable=False,
                                            name="pruning_step", aggregation="only_first_replica")
        self.masks_step = self.add_weight(shape=(), initializer=keras.initializers.Constant(-1), dtype="int64",
                                          trainable=False, name="masks_step", aggregation="only_first_replica")
        for variable, mask in zip(variables, self._masks):
            variable.constraint = MaskConstraint(mask, variable.constraint)
        self.built = True

    @property
    def masks(self) -> list:
        """The mask variables, one per pruned weight, in the order of :meth:`pruning_targets`."""
        return list(self._masks)

    def pruning_targets(self, layers: LayerSelection = None) -> list:
        """The pruned weights as core targets with their masks (those in the ``layers`` selection).

        Raises:
            ValueError: a selection that holds none of the pruned weights.
        """
        masks = dict(zip(self._names, self._masks))
        found = find_prunable_weights(self.model, layers, warn_unpruned=False)
        targets = [PruningTarget(t.name, t.variable, as_tf_variable(masks[t.name]), t.owner)
                   for t in found if t.name in masks]
        if not targets:
            raise ValueError(f"layers={layers!r} selects none of the weights pruned in {self.name!r}: {self._names}")
        return targets

    def fit(self, *args, **kwargs):
        """``keras.Model.fit``; without a :class:`~tf_woodfisher.keras3.PruningCallback` in ``callbacks`` it stops,
        with a ValueError, before the first pruning step of the schedule (also where XLA drops the graph check)."""
        callbacks = list(kwargs.get("callbacks") or [])
        if len(args) < 6 and not any(getattr(c, "runs_woodfisher_events", False) for c in callbacks):
            kwargs["callbacks"] = callbacks + [_CallbackRequired(self)]
        return super().fit(*args, **kwargs)

    def call(self, inputs, training=None, **kwargs):
        if training:
            self._count_training_step()
        return self.model(inputs, training=training, **kwargs)

    def _count_training_step(self):
        """pruning_step += 1, then fail at a pruning step of the schedule whose masks the callback did not set."""
        step = self.pruning_step.value.assign_add(1)
        should_prune = self.schedule(step)[0]
        set_for_step = tf.equal(self.masks_step.value, step)
        tf.debugging.Assert(tf.logical_or(tf.logical_not(should_prune), set_for_step),
                            [CALLBACK_REQUIRED.format(name=self.name), step])

    def get_config(self) -> dict:
        return {"name": self.name, "model": keras.saving.serialize_keras_object(self.model),
                "schedule": keras.saving.serialize_keras_object(self.schedule),
                "woodfisher_config": self.woodfisher_config.to_dict(), "pruned_weights": list(self._names)}

    @classmethod
    def from_config(cls, config: dict, custom_objects: Optional[dict] = None) -> PrunedModel:
        config = dict(config)
        for key in ("model", "schedule"):
            config[key] = keras.saving.deserialize_keras_object(config[key], custom_objects=custom_objects)
        return cls(**config)


class _CallbackRequired(keras.callbacks.Callback):
    """Added by :meth:`PrunedModel.fit` when the callbacks hold no PruningCallback: raises before a pruning step."""

    def __init__(self, pruned: PrunedModel):
        super().__init__()
        self.pruned = pruned

    def on_train_begin(self, logs=None):
        self._step = int(self.pruned.pruning_step.numpy())
        self._per_call = int(getattr(self.pruned, "steps_per_execution", 1) or 1)

    def on_train_batch_begin(self, batch, logs=None):
        steps = range(self._step + 1, self._step + self._per_call + 1)
        self._step += self._per_call
        with tf.device("/cpu:0"):
            prunes = [s for s in steps if bool(self.pruned.schedule(tf.constant(s, tf.int64))[0])]
        if prunes and int(self.pruned.masks_step.numpy()) != prunes[0]:
            raise ValueError(f"{CALLBACK_REQUIRED.format(name=self.pruned.name)} {prunes[0]}")


def prune(model, schedule: Optional[PruningSchedule] = None, config: Optional[WoodFisherConfig] = None, *,
          layers: LayerSelection = None, **overrides: Any) -> PrunedModel:
    """Attach WoodFisher masks to a Keras 3 model for gradual pruning in ``model.fit`` (no layer wrappers).

    Compile and fit the returned :class:`PrunedModel` with ``tfw3.PruningCallback(fisher_dataset, loss)`` in the
    callbacks: at each pruning step of ``schedule`` it prunes with WoodFisher scores computed on its Fisher data.
    The returned model holds ``model`` (its layers and variables, not a copy); :func:`strip` gives it back.

    Args:
        model: a built Keras 3 model (Sequential, functional or subclassed).
        schedule: when and how far to prune: :class:`~tf_woodfisher.keras3.GradualSchedule`,
            :class:`~tf_woodfisher.keras3.OneShotSchedule`, ``ConstantSparsity``, ``PolynomialDecay`` or
            ``KeepMasks`` (default ``ConstantSparsity(0.5, 0)``).
        config: the :class:`~tf_woodfisher.WoodFisherConfig` of the pruning events (saved with the model).
        layers: which layers to prune (as :func:`~tf_woodfisher.keras3.find_prunable_weights`); None: every
            prunable layer.
        **overrides: fields of the config (``method='woodfisher'``, ``num_gradients=256``, ...).

    Returns:
        The :class:`PrunedModel` (made under ``model.distribute_strategy``'s scope).

    Raises:
        TypeError: an unknown keyword, or the Fisher data or loss (they go to ``tfw3.PruningCallback``).
        ValueError: a tf_keras model (use ``import tf_woodfisher as tfw``), masks attached twice, a schedule that
            is not a tf_woodfisher.keras3 schedule (a tfmot one, say), no prunable layers, a config out of range.
    """
    for name in ("fisher_dataset", "loss"):
        if name in overrides:
            raise TypeError(f"tfw3.prune does not take {name}=: pass it to the callback, "
                            f"tfw3.PruningCallback({name}=...), which runs the pruning events")
    if isinstance(schedule, tf.data.Dataset):
        raise TypeError("tfw3.prune's second argument is the pruning schedule; the Fisher dataset goes to "
                        "tfw3.PruningCallback(fisher_dataset, loss)")
    config = resolve_config(config, overrides, "tfw3.prune")
    if getattr(type(model), "_tfw3_pruned", False):
        raise ValueError(ATTACHED_TWICE.format(what=f"model {model.name!r}"))
    check_keras3_model(model, "the model to prune")
    targets = find_prunable_weights(model, layers)
    with model.distribute_strategy.scope():
        return PrunedModel(model, schedule, config, [t.name for t in targets])


def strip(model):
    """The plain Keras 3 model, with its pruned weights' zeros and without masks.

    Args:
        model: a :class:`PrunedModel` (its held model is returned, weights multiplied by the masks once more and
            its own constraints back in place; do not train the PrunedModel afterwards) or a plain Keras 3 model
            (returned as it is).

    Raises:
        ValueError: a tf_keras model.
    """
    if not getattr(type(model), "_tfw3_pruned", False):
        check_keras3_model(model)
        return model
    inner = model.model
    targets = model.pruning_targets()
    for target, variable in zip(targets, keras_variables(inner, targets)):
        if isinstance(variable.constraint, MaskConstraint):
            variable.assign(variable * keras.ops.cast(variable.constraint.mask, variable.dtype))
            variable.constraint = variable.constraint.inner
    return inner


def masks_from_zeros(model) -> PrunedModel:
    """Attach masks that keep ``model``'s current zeros (after gRDA training, say): a :func:`prune` model with
    the :class:`~tf_woodfisher.keras3.KeepMasks` schedule and masks = (weight ≠ 0). Fine-tuning it with
    ``tfw3.PruningCallback()`` keeps every zero; :func:`strip` or ``tfw3.export_tflite`` give the sparse model."""
    pruned = prune(model, KeepMasks(), method="magnitude")
    for target in pruned.pruning_targets():
        target.mask.assign(tf.cast(tf.not_equal(target.variable, 0), target.mask.dtype))
    return pruned
