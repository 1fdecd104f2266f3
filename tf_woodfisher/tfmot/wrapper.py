"""``PruneWoodFisher``: tfmot's pruning wrapper with masks set by WoodFisher pruning events.

It is a subclass of tfmot's ``PruneLowMagnitude``, so ``strip_pruning``, ``PruningSummaries`` and
``UpdatePruningStep`` recognise it. Like tfmot's, it multiplies weights by their masks in every
forward pass and advances ``pruning_step`` on training passes; unlike tfmot's, it never
recomputes masks itself: :class:`tf_woodfisher.UpdatePruningStep` does, at the schedule's pruning
steps, and records the step in the wrapper's ``masks_step`` variable. A training pass at a pruning
step whose masks were not set by that callback (tfmot's callback instead of ours) fails with a
message saying so.
"""
from __future__ import annotations

import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from tf_woodfisher import compat
from tf_woodfisher.config import WoodFisherConfig
from tf_woodfisher.pruning.structures import Structure, group_layout
from tf_woodfisher.tfmot.schedules import SCHEDULES, event_schedule
from tf_woodfisher.tfmot.targets import builtin_prunable, builtin_prunable_variables

PruneLowMagnitude, _Pruning = compat.tfmot_pruning_classes()

CALLBACK_REQUIRED = (
    "layer {name!r} is wrapped by tf_woodfisher and reached a pruning step of its schedule in training without "
    "tfw.UpdatePruningStep(): add it to model.fit's callbacks (it replaces tfmot's UpdatePruningStep and runs "
    "the WoodFisher pruning events); in a custom loop call its set_model() and on_train_begin() first, and "
    "on_train_batch_begin() before each step"
)


class _MaskOnlyPruning(_Pruning):
    """tfmot's Pruning object without its magnitude mask update: masks are only applied, and a pruning
    step of the schedule must find masks set for it by tf_woodfisher's callback."""

    def __init__(self, masks_step, message, **kwargs):
        super().__init__(**kwargs)
        self._masks_step, self._message = masks_step, message

    def conditional_mask_update(self):
        step = self._step_fn()
        should_prune = self._pruning_schedule(step)[0]
        set_for_step = tf.equal(self._masks_step, tf.cast(step, tf.int64))
        return tf.debugging.Assert(tf.logical_or(tf.logical_not(should_prune), set_for_step), [self._message])


@keras.utils.register_keras_serializable(package="tf_woodfisher")
class PruneWoodFisher(PruneLowMagnitude):
    """Wraps a prunable layer; its masks are set by WoodFisher pruning events.

    Args:
        layer: the layer to prune (any layer :func:`~tf_woodfisher.tfmot.find_prunable_weights` prunes).
        pruning_schedule: a tfmot ``PruningSchedule`` (default ``ConstantSparsity(0.5, 0)``).
        woodfisher_config: the :class:`~tf_woodfisher.WoodFisherConfig` of its events (or its ``to_dict()``);
            its ``block_size``, ``block_pooling_type`` and ``sparsity_m_by_n`` are the wrapper's.
        **kwargs: Keras layer keywords (``name``, ...).
    """

    def __init__(self, layer, pruning_schedule=None, woodfisher_config=None, **kwargs):
        config = woodfisher_config if isinstance(woodfisher_config, WoodFisherConfig) else \
            WoodFisherConfig.from_dict(woodfisher_config or {})
        for name in ("block_size", "block_pooling_type", "sparsity_m_by_n"):
            kwargs.pop(name, None)  # a saved tfmot config repeats them; the WoodFisherConfig is their source
        if builtin_prunable(layer) and not hasattr(layer, "get_prunable_weights"):
            # The same weights as one_shot_prune, including those tfmot leaves unpruned
            # (DepthwiseConv2D, the depthwise kernel of SeparableConv, EinsumDense, Bidirectional).
            layer.get_prunable_weights = lambda: builtin_prunable_variables(layer)
        schedule = pruning_schedule or tfmot.sparsity.keras.ConstantSparsity(0.5, 0)
        super().__init__(layer, pruning_schedule=schedule, block_size=config.block_size,
                         block_pooling_type=config.block_pooling_type, sparsity_m_by_n=config.sparsity_m_by_n,
                         **kwargs)
        self.woodfisher_config = config

    def build(self, input_shape):
        structure = Structure.of(self.woodfisher_config)
        if structure is not None:  # refuse a weight the structure does not fit now, naming it (tfmot: at build)
            if not self.layer.built:
                self.layer.build(input_shape)
                self.layer.built = True
            for weight in self.layer.get_prunable_weights():
                group_layout(weight.shape, structure, f"{self.layer.name}/{weight.name.split('/')[-1].split(':')[0]}")
        super().build(input_shape)
        self.masks_step = self.add_weight("masks_step", shape=[], dtype=tf.int64, trainable=False,
                                          initializer=keras.initializers.Constant(-1))
        self.pruning_obj = _MaskOnlyPruning(  # N:M masks come at step 1 only, as in tfmot
            self.masks_step, CALLBACK_REQUIRED.format(name=self.name),
            training_step_fn=lambda: self.pruning_step, pruning_vars=self.pruning_vars,
            pruning_schedule=event_schedule(self.pruning_schedule, self.sparsity_m_by_n), block_size=self.block_size,
            block_pooling_type=self.block_pooling_type, sparsity_m_by_n=self.sparsity_m_by_n)

    def get_config(self):
        config = super().get_config()
        config["woodfisher_config"] = self.woodfisher_config.to_dict()
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        custom = dict(SCHEDULES, ConstantSparsity=tfmot.sparsity.keras.ConstantSparsity,
                      PolynomialDecay=tfmot.sparsity.keras.PolynomialDecay)
        config["pruning_schedule"] = keras.utils.deserialize_keras_object(
            config["pruning_schedule"], custom_objects=custom)
        config["layer"] = keras.layers.deserialize(config["layer"])
        return cls(**config)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        if save_type == "savedmodel":
            raise ValueError(
                f"cannot save {self.name!r} as a SavedModel: SavedModel reloads pruning wrappers as generic layers "
                "and the sparsity is lost on further training. Save as '.keras' or '.h5' (load inside "
                "tfw.prune_scope()), use tf.train.Checkpoint, or tfw.strip_pruning() first"
            )
        return super()._trackable_children(save_type, **kwargs)

