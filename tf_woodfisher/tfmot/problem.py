"""A tf_keras model (plain or wrapped by tfmot) as the core's :class:`PruningProblem`."""
from __future__ import annotations

import dataclasses

from typing import Optional, Sequence

import tensorflow as tf
import tf_keras as keras
import tensorflow_model_optimization as tfmot

from tf_woodfisher import compat
from tf_woodfisher import keras_common as common
from tf_woodfisher.config import WoodFisherConfig
from tf_woodfisher.fisher.gradients import has_sample_weights
from tf_woodfisher.fisher.rules import keeps_samples_apart, make_checked_gradient_fn
from tf_woodfisher.pruning.pruner import PruningProblem
from tf_woodfisher.pruning.targets import PruningTarget
from tf_woodfisher.tfmot.targets import is_pruning_wrapper


def per_sample_loss(loss, output_names: Optional[Sequence[str]] = None, loss_weights=None):
    """(y_true, y_pred) → per-sample losses, from a tf_keras loss (or a list / dict of them per output).

    Args:
        loss: a tf_keras loss name (``'sparse_categorical_crossentropy'``), ``Loss`` object or function, or a
            list / dict of them (one per output, as ``model.compile`` takes them).
        output_names: the model's output names (to check a list or dict against).
        loss_weights: as ``compile``'s ``loss_weights``.

    Returns:
        A :class:`~tf_woodfisher.keras_common.KerasFisherLoss`: (y_true, y_pred) → (n,) losses, one per sample,
        combined over the outputs as Keras combines them (it applies sample weights too).

    Raises:
        TypeError: ``loss`` is none of these.
        ValueError: a list or dict of losses (or weights) that does not match the outputs.
    """
    return common.per_sample_loss(loss, keras.losses, keras.losses.Reduction.NONE, output_names, loss_weights)


def forward_model(model):
    """The model to differentiate: the model itself, or its stripped clone sharing the same variables.

    Args:
        model: a built tf_keras model, plain or holding tfmot pruning wrappers.

    Returns:
        ``model`` when it has no pruning wrapper, else ``strip_pruning(model)``, whose layers share the
        wrapped layers' variables (so gradients bypass the wrappers' masking and step counting).

    Raises:
        ValueError: the model holds wrappers but is not a Sequential or functional model.
    """
    if not any(is_pruning_wrapper(layer) for layer in model.submodules):
        return model
    try:
        return tfmot.sparsity.keras.strip_pruning(model)
    except (ValueError, NotImplementedError) as error:
        raise ValueError(
            f"cannot compute Fisher gradients of {model.name!r}: it holds tfmot pruning wrappers but is not a "
            f"Sequential or functional model, so its wrappers cannot be bypassed ({error})"
        ) from error


def input_rank(model) -> Optional[list]:
    """Ranks (batch axis included) of the model's inputs, when the model knows them.

    Functional and Sequential models say so with their ``inputs``; a subclassed model once it has been called
    on data (its ``save_spec()``) or built with ``build(input_shape)``.

    Args:
        model: a tf_keras model.

    Returns:
        A list with the rank of each input (e.g. [4] for NHWC images), or None when unknown.
    """
    if getattr(model, "inputs", None):
        return [t.shape.rank for t in model.inputs]
    spec = model.save_spec() if hasattr(model, "save_spec") else None
    if spec is not None:
        leaves = tf.nest.flatten(spec[0])
        if leaves and all(t.shape.rank is not None for t in leaves):
            return [t.shape.rank for t in leaves]
    shape = compat.keras_build_input_shape(model)
    if shape is not None:
        shapes = [shape] if isinstance(shape, tf.TensorShape) or (
            isinstance(shape, (list, tuple)) and all(d is None or isinstance(d, int) for d in shape)) else \
            list(shape.values()) if isinstance(shape, dict) else list(shape)
        ranks = [tf.TensorShape(s).rank for s in shapes]
        if ranks and None not in ranks:
            return ranks
    return None


def compiled_loss(model) -> tuple:
    """(loss, loss_weights) given to ``model.compile`` (None, None if it was not compiled with a loss).

    Args:
        model: a tf_keras model.

    Returns:
        The pair ``(loss, loss_weights)``; ``loss_weights`` is None when none were given.

    Raises:
        tf_woodfisher.compat.CompatibilityError: tf_keras no longer keeps the loss weights where expected.
    """
    loss = getattr(model, "loss", None)
    if not loss:
        return None, None
    return loss, compat.keras_compiled_loss_weights(model)


def keras_problem(model, targets: Sequence[PruningTarget], dataset, loss, config: WoodFisherConfig, *,
                  loss_weights=None, batched: Optional[bool] = None) -> PruningProblem:
    """The :class:`PruningProblem` of ``targets`` of ``model`` (plain or tfmot-wrapped).

    Args:
        model: a built tf_keras model.
        targets: from :func:`tf_woodfisher.tfmot.find_prunable_weights`.
        dataset: the Fisher ``tf.data.Dataset`` (unused, may be None, for magnitude pruning).
        loss: a Keras loss (object, name or function) or a list / dict of them per output, matching the
            outputs (unused for magnitude).
        config: decides whether gradients are needed.
        loss_weights: as ``compile``'s: a list or a dict by output name (None: 1 for every output).
        batched: whether ``dataset`` yields batches (None: told from the model's input ranks; an error
            asks for it where they cannot tell).

    Returns:
        The :class:`~tf_woodfisher.pruning.pruner.PruningProblem`, differentiating the stripped model
        (:func:`forward_model`) when gradients are needed.

    Raises:
        ValueError: a method that needs gradients without dataset or loss, an empty dataset, a loss that
            does not fit the model's outputs and the dataset's labels, or batched=None where it cannot be told.
    """
    network = forward_model(model) if config.needs_gradients else model
    names = getattr(model, "output_names", None)  # the names the user compiled with (wrappers rename layers)
    problem = common.model_problem(targets, network, dataset, loss, config,
                                   lambda value: per_sample_loss(value, names, loss_weights), input_rank(network),
                                   batched)
    if problem.dataset is None or has_sample_weights(problem.dataset):
        return problem
    # Layer rules: one batched forward and backward per chunk, checked once against a plain per-group gradient,
    # unless Keras' own layers and losses keep the samples apart by construction.
    check_groups = 0 if keeps_samples_apart(network) and problem.loss.builtin else 4
    return dataclasses.replace(problem, make_gradient_fn=lambda forward, variables, loss_fn: make_checked_gradient_fn(
        network, forward, variables, loss_fn, check_groups=check_groups))
