"""A tf_keras model (plain or wrapped by tfmot) as the core's :class:`PruningProblem`."""
from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf
import tf_keras as keras
import tensorflow_model_optimization as tfmot

from tf_woodfisher.config import WoodFisherConfig
from tf_woodfisher.fisher.gradients import check_loss, first_sample, looks_batched
from tf_woodfisher.pruning.pruner import PruningProblem
from tf_woodfisher.pruning.targets import PruningTarget
from tf_woodfisher.tfmot.targets import is_pruning_wrapper


def per_sample_loss(loss):
    """(y_true, y_pred) → per-sample losses, from a Keras loss name, object or function.

    Raises:
        TypeError: ``loss`` is none of these.
    """
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        config = dict(loss.get_config(), reduction=keras.losses.Reduction.NONE)
        return type(loss).from_config(config)
    if not callable(loss):
        raise TypeError(f"loss must be a Keras loss, a loss name or a callable, got {loss!r}")
    return loss


def forward_model(model):
    """The model to differentiate: the model itself, or its stripped clone sharing the same variables."""
    if not any(is_pruning_wrapper(layer) for layer in model.submodules):
        return model
    try:
        return tfmot.sparsity.keras.strip_pruning(model)
    except (ValueError, NotImplementedError) as error:
        raise ValueError(
            f"cannot compute Fisher gradients of {model.name!r}: it holds tfmot pruning wrappers but is not a "
            f"Sequential or functional model, so its wrappers cannot be bypassed ({error})"
        ) from error


def input_rank(model) -> Optional[int]:
    """Rank (batch axis included) of the model's first input, when the model knows it."""
    if getattr(model, "inputs", None):
        return model.inputs[0].shape.rank
    spec = model.save_spec() if hasattr(model, "save_spec") else None
    if spec is not None:
        first = tf.nest.flatten(spec[0])
        if first and first[0].shape.rank is not None:
            return first[0].shape.rank
    return None


def keras_problem(model, targets: Sequence[PruningTarget], dataset, loss, config: WoodFisherConfig) -> PruningProblem:
    """The :class:`PruningProblem` of ``targets`` of ``model`` (plain or tfmot-wrapped).

    Args:
        model: a built tf_keras model.
        targets: from :func:`tf_woodfisher.tfmot.find_prunable_weights`.
        dataset: the Fisher ``tf.data.Dataset`` (unused, may be None, for magnitude pruning).
        loss: a Keras loss (object, name or function) matching the outputs (unused for magnitude).
        config: decides whether gradients are needed.

    Raises:
        ValueError: a method that needs gradients without dataset or loss, an empty dataset, or a loss
            that does not fit the model's outputs and the dataset's labels.
    """
    if not config.needs_gradients:
        return PruningProblem(targets)
    if dataset is None:
        raise ValueError(f"method {config.method!r} needs a Fisher dataset: a tf.data.Dataset of (x, y) pairs")
    if loss is None:
        raise ValueError(f"method {config.method!r} needs a loss (a Keras loss object, name or function)")
    network = forward_model(model)
    loss_fn = per_sample_loss(loss)
    batched = looks_batched(dataset, input_rank(network))
    forward = lambda x: network(x, training=False)  # noqa: E731
    check_loss(forward, loss_fn, *first_sample(dataset, batched))
    return PruningProblem(targets, forward, loss_fn, dataset, batched)
