"""``PruneWoodFisher``: tfmot's pruning wrapper with masks set by WoodFisher pruning events.

It is a subclass of tfmot's ``PruneLowMagnitude``, so ``strip_pruning``, ``PruningSummaries`` and
``UpdatePruningStep`` recognise it. Like tfmot's, it multiplies weights by their masks in every
forward pass and advances ``pruning_step`` on training passes; unlike tfmot's, it never
recomputes masks itself: :class:`tf_woodfisher.keras.UpdatePruningStep` does, at the schedule's
pruning steps.
"""
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl
from tf_keras.src.engine import base_layer_utils

from tf_woodfisher._keras import keras, tf
from tf_woodfisher.keras.schedules import SCHEDULES
from tf_woodfisher.pruning.pruner import PruningConfig
from tf_woodfisher.pruning.targets import PruneLowMagnitude, builtin_prunable_attributes

CALLBACK_REQUIRED = (
    "layer {name!r} is wrapped by tf_woodfisher and was called with training=True without "
    "tfw.UpdatePruningStep(): add it to model.fit's callbacks (it replaces tfmot's UpdatePruningStep and runs "
    "the WoodFisher pruning events); in a custom loop call its set_model() and on_train_begin() first, and "
    "on_train_batch_begin() before each step"
)


class _MaskOnlyPruning(pruning_impl.Pruning):
    """tfmot's Pruning object without its magnitude mask update; masks are only applied."""

    def conditional_mask_update(self):
        return tf.no_op("woodfisher_masks_set_by_callback")


@keras.utils.register_keras_serializable(package="tf_woodfisher")
class PruneWoodFisher(PruneLowMagnitude):
    """Wraps a prunable layer; its masks are set by WoodFisher pruning events.

    layer: the layer to prune. pruning_schedule: a tfmot ``PruningSchedule``. woodfisher_config: a
    dict of :class:`PruningConfig` fields (method, mode, num_samples, ...).
    """

    def __init__(self, layer, pruning_schedule=None, woodfisher_config=None, **kwargs):
        attributes = builtin_prunable_attributes(layer)
        if attributes and not hasattr(layer, "get_prunable_weights"):
            # The same weights as one_shot_prune, including those tfmot leaves unpruned
            # (DepthwiseConv2D, the depthwise kernel of SeparableConv).
            layer.get_prunable_weights = lambda: [getattr(layer, a) for a in attributes]
        schedule = pruning_schedule or tfmot.sparsity.keras.ConstantSparsity(0.5, 0)
        super().__init__(layer, pruning_schedule=schedule, **kwargs)
        self.woodfisher_config = PruningConfig(**(woodfisher_config or {}))
        self.fisher_dataset = None
        self.fisher_loss = None
        self.driven_by_callback = False

    def build(self, input_shape):
        super().build(input_shape)
        self.pruning_obj = _MaskOnlyPruning(
            training_step_fn=lambda: self.pruning_step, pruning_vars=self.pruning_vars,
            pruning_schedule=self.pruning_schedule, block_size=self.block_size,
            block_pooling_type=self.block_pooling_type)

    def call(self, inputs, training=None, **kwargs):
        tracing_for_save = base_layer_utils.call_context().saving  # SavedModel export traces training=True
        if training is True and not self.driven_by_callback and self.pruning_vars and not tracing_for_save:
            raise ValueError(CALLBACK_REQUIRED.format(name=self.name))
        return super().call(inputs, training=training, **kwargs)

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
                "tfw.prune_scope()), use tf.train.Checkpoint, or tfmot.sparsity.keras.strip_pruning() first"
            )
        return super()._trackable_children(save_type, **kwargs)
