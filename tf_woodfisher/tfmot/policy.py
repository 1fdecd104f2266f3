"""tfmot's ``PruningPolicy`` in tf_woodfisher's entry points: the layers it lets tfmot prune, the models it refuses.

Both are decided by the policy's own ``allow_pruning`` and ``ensure_model_supports_pruning``.
"""
from __future__ import annotations

from typing import Sequence

import tensorflow_model_optimization as tfmot

from tf_woodfisher.pruning.targets import PruningTarget
from tf_woodfisher.tfmot.targets import is_pruning_wrapper

PruningPolicy = tfmot.sparsity.keras.PruningPolicy


def check_policy(policy, model, where: str) -> None:
    """Raise unless ``policy`` is a tfmot ``PruningPolicy`` that accepts ``model`` (None: nothing to check).

    Args:
        policy: a ``tfmot.sparsity.keras.PruningPolicy`` or None.
        model: the tf_keras model to be pruned.
        where: the entry point's name, for error messages.

    Raises:
        TypeError: ``policy`` is not a ``tfmot.sparsity.keras.PruningPolicy``.
        ValueError: the policy's ``ensure_model_supports_pruning(model)`` refuses the model; the message
            names the policy and gives its reason.
    """
    check_type(policy, where)
    if policy is None:
        return
    try:
        policy.ensure_model_supports_pruning(model)
    except ValueError as error:
        raise ValueError(f"{where}: pruning_policy={type(policy).__name__}() rejects model {model.name!r}: {error}") \
            from error


def check_type(policy, where: str) -> None:
    """Raise TypeError unless ``policy`` is None or a tfmot ``PruningPolicy``.

    Args:
        policy: the ``pruning_policy`` argument.
        where: the entry point's name, for the error message.

    Raises:
        TypeError: ``policy`` is neither None nor a ``tfmot.sparsity.keras.PruningPolicy``.
    """
    if policy is not None and not isinstance(policy, PruningPolicy):
        raise TypeError(f"{where}: pruning_policy must be a tfmot.sparsity.keras.PruningPolicy (e.g. "
                        f"PruneForLatencyOnXNNPack()) or None, got {type(policy).__name__}")


def allowed(policy, layer) -> bool:
    """Whether ``policy`` lets ``layer`` be pruned (a pruning wrapper is judged by the layer it wraps).

    Args:
        policy: a tfmot ``PruningPolicy``.
        layer: a tf_keras layer or tfmot pruning wrapper.

    Returns:
        ``policy.allow_pruning`` of the (inner) layer, as a bool.
    """
    return bool(policy.allow_pruning(layer.layer if is_pruning_wrapper(layer) else layer))


def policy_targets(policy, model, targets: Sequence[PruningTarget], where: str) -> list:
    """The ``targets`` of ``model`` whose layer ``policy`` allows, after the policy has accepted the model.

    Args:
        policy: a tfmot ``PruningPolicy``.
        model: the tf_keras model.
        targets: its prunable weights (from :func:`~tf_woodfisher.tfmot.find_prunable_weights`; each
            ``owner`` is the layer or wrapper holding the weight).
        where: the entry point's name, for error messages.

    Returns:
        The allowed targets, in their order.

    Raises:
        TypeError: ``policy`` is not a tfmot ``PruningPolicy``.
        ValueError: the policy rejects the model, or allows none of the prunable layers.
    """
    check_policy(policy, model, where)
    kept = [t for t in targets if allowed(policy, t.owner)]
    if not kept:
        raise ValueError(f"{where}: pruning_policy={type(policy).__name__}() allows none of the prunable layers of "
                         f"{model.name!r} ({sorted({t.name.rsplit('/', 1)[0] for t in targets})})")
    return kept
