"""``prune_woodfisher``: the WoodFisher counterpart of tfmot's ``prune_low_magnitude``."""
import tensorflow_model_optimization as tfmot

from tf_woodfisher._keras import keras, tf
from tf_woodfisher.fisher.gradients import DEFAULT_SHUFFLE_BUFFER, check_loss_on_dataset
from tf_woodfisher.keras.schedules import SCHEDULES, KeepMasks
from tf_woodfisher.keras.wrapper import PruneWoodFisher
from tf_woodfisher.pruning.pruner import PruningConfig
from tf_woodfisher.pruning.scores import needs_gradients
from tf_woodfisher.pruning.targets import PruneLowMagnitude


def prune_scope():
    """A ``custom_object_scope`` to load models saved with tf_woodfisher (and tfmot) wrappers and schedules."""
    return keras.utils.custom_object_scope(
        dict(SCHEDULES, PruneWoodFisher=PruneWoodFisher, PruneLowMagnitude=PruneLowMagnitude))


def _already_wrapped(layers):
    for layer in layers:
        if isinstance(layer, PruneLowMagnitude):
            return layer
        if isinstance(layer, keras.Model):
            inner = _already_wrapped(layer.layers)
            if inner is not None:
                return inner
    return None


def prune_woodfisher(to_prune, pruning_schedule=None, fisher_dataset=None, loss=None, method="woodfisher",
                     mode="global", num_samples=1000, fisher_batch_size=1, block_size=None, damping=1e-5,
                     update=True, dtype="float32", shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, **kwargs):
    """Wrap a layer, a list of layers, or a Sequential/functional model for WoodFisher pruning in ``model.fit``.

    Accepts what ``tfmot.sparsity.keras.prune_low_magnitude`` accepts and returns the same structure,
    with ``PruneWoodFisher`` wrappers (tfmot wrappers, so ``strip_pruning`` and ``PruningSummaries``
    work). Train with ``tfw.UpdatePruningStep()`` in the callbacks: at each pruning step of
    ``pruning_schedule`` (any tfmot ``PruningSchedule``; default ``ConstantSparsity(0.5, 0)``) it
    prunes with WoodFisher scores computed on ``fisher_dataset`` (a ``tf.data.Dataset`` of (x, y))
    and ``loss`` (default: the loss given to ``compile``). The other arguments are those of
    :func:`tf_woodfisher.one_shot_prune`; ``**kwargs`` go to the Keras wrapper (single layer only).
    As with tfmot, the returned model shares its layers with ``to_prune`` and must be compiled again.
    """
    schedule = pruning_schedule or tfmot.sparsity.keras.ConstantSparsity(0.5, 0)
    if not isinstance(schedule, tfmot.sparsity.keras.PruningSchedule):
        raise ValueError(f"pruning_schedule must be a tfmot PruningSchedule, got {type(schedule).__name__}")
    config = PruningConfig(method, mode, num_samples, fisher_batch_size, block_size, damping, update, dtype,
                           shuffle_buffer)
    if needs_gradients(method) and fisher_dataset is None:
        raise ValueError(f"method {method!r} needs fisher_dataset, a tf.data.Dataset of (x, y) pairs")

    def wrap(layer, **wrapper_kwargs):
        wrapper = PruneWoodFisher(layer, schedule, config.to_dict(), **wrapper_kwargs)
        wrapper.fisher_dataset, wrapper.fisher_loss = fisher_dataset, loss
        return wrapper

    if isinstance(to_prune, list):
        layers = to_prune
    elif isinstance(to_prune, keras.Model):
        layers = to_prune.layers
    elif isinstance(to_prune, keras.layers.Layer):
        layers = [to_prune]
    else:
        raise ValueError(f"prune_woodfisher can prune a tf_keras Sequential or functional model, a layer or a list "
                         f"of layers, got {type(to_prune).__name__} (Keras 3 objects are not supported by tfmot)")
    wrapped = _already_wrapped(layers)
    if wrapped is not None:
        raise ValueError(f"layer {wrapped.name!r} is already wrapped for pruning; strip it with "
                         "tfmot.sparsity.keras.strip_pruning() before wrapping again")

    if isinstance(to_prune, keras.Model):
        if not isinstance(to_prune, keras.Sequential) and not to_prune._is_graph_network:
            raise ValueError("Subclassed models are not supported currently: use a Sequential or functional "
                             "model, or call tfw.one_shot_prune for one-shot pruning of a built subclassed model")
        if fisher_dataset is not None:
            check_loss_on_dataset(to_prune, loss, fisher_dataset)

        def clone(layer):
            if isinstance(layer, keras.Model):
                return keras.models.clone_model(layer, input_tensors=None, clone_function=clone)
            return wrap(layer)

        return keras.models.clone_model(to_prune, input_tensors=None, clone_function=clone)
    if isinstance(to_prune, list):
        return [layer if isinstance(layer, keras.layers.InputLayer) else wrap(layer) for layer in to_prune]
    return wrap(to_prune, **kwargs)


def masks_from_zeros(model):
    """Wrap ``model`` so that its current zeros become fixed masks (e.g. after gRDA training).

    Returns a ``prune_woodfisher`` model with the ``KeepMasks`` schedule and masks = (weight ≠ 0):
    fine-tuning it with ``tfw.UpdatePruningStep()`` keeps every zero, and ``strip_pruning`` or
    ``tfw.export_tflite`` give the sparse model.
    """
    wrapped = prune_woodfisher(model, KeepMasks(), method="magnitude")
    for layer in wrapped.submodules:
        if isinstance(layer, PruneWoodFisher):
            for weight, mask, _ in layer.pruning_vars:
                mask.assign(tf.cast(tf.not_equal(weight, 0), mask.dtype))
    return wrapped
