"""What a pruning event works on: a list of targets, each a weight variable and its mask (or None).

Adapters (``tf_woodfisher.tfmot``, ``tf_woodfisher.keras3``) find a model's prunable weights and
give them here as :class:`PruningTarget`; this module knows no Keras. All flat vectors are the
concatenation of the targets' entries in target order (length d).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import tensorflow as tf


@dataclasses.dataclass(frozen=True, eq=False)
class PruningTarget:
    """One pruned tensor.

    Attributes:
        name: unique name in reports (the adapters use the layer path and the weight name).
        variable: the weight variable, any shape and float dtype.
        mask: a 0/1 variable of the same shape multiplied into the weight in every forward pass
            (a tfmot wrapper's mask, a Keras 3 mask), or None: then the weight's zeros are its mask.
        owner: what the adapter found the weight in (its layer, say); the core never reads it.
    """

    name: str
    variable: tf.Variable
    mask: Optional[tf.Variable] = None
    owner: Any = None

    @property
    def shape(self) -> tuple:
        """The variable's shape, as a tuple of ints."""
        return tuple(self.variable.shape)

    @property
    def size(self) -> int:
        """The variable's number of entries."""
        return int(self.variable.shape.num_elements())


def value_dtype(targets: Sequence[PruningTarget]) -> tf.DType:
    """The dtype pruning events compute the targets' values in: float64 if any target is float64, else float32.

    float64 so that a float64 model keeps its precision (its kept weights are not rounded to float32);
    float32 also for float16/bfloat16 weights and mixed-precision variables.

    Args:
        targets: the pruned tensors.

    Returns:
        ``tf.float64`` or ``tf.float32``.
    """
    wide = any(tf.as_dtype(t.variable.dtype) == tf.float64 for t in targets)
    return tf.float64 if wide else tf.float32


def flatten(tensors: Sequence[tf.Tensor], dtype: tf.DType = tf.float32) -> tf.Tensor:
    """Concatenate tensors, cast to ``dtype``, into one flat vector of shape (sum of sizes,).

    Args:
        tensors: tensors or variables of any shape and numeric or bool dtype, in target order.
        dtype: the dtype of the result.

    Returns:
        (d,) tensor of ``dtype``, d the sum of their sizes, each tensor flattened in row-major order.
    """
    return tf.concat([tf.reshape(tf.cast(t, dtype), [-1]) for t in tensors], axis=0)


def unflatten(vector: tf.Tensor, targets: Sequence[PruningTarget]) -> list:
    """Split a flat vector into tensors shaped like ``targets``.

    Args:
        vector: (d,) tensor, d the targets' total size, in target order.
        targets: the targets whose shapes the pieces take.

    Returns:
        A list of tensors of ``vector``'s dtype, one per target, of its shape.
    """
    pieces = tf.split(vector, [t.size for t in targets])
    return [tf.reshape(p, t.shape) for p, t in zip(pieces, targets)]


def current_masks(targets: Sequence[PruningTarget]) -> tf.Tensor:
    """Flat float32 0/1 mask: the mask variable where a target has one, else its nonzero pattern.

    A plain model's zeros count as pruned, so repeated pruning calls and multi-step pruning keep them.

    Args:
        targets: the pruned tensors.

    Returns:
        (d,) float32 tensor of 0 (pruned) and 1 (kept), in target order.
    """
    return flatten([t.mask if t.mask is not None else tf.not_equal(t.variable, 0) for t in targets])


def assign_weights(targets: Sequence[PruningTarget], values: tf.Tensor, mask: tf.Tensor) -> None:
    """Write flat ``values`` (d,) and ``mask`` (d,): weight ← value·mask in the weight's own dtype, mask ← mask.

    Args:
        targets: the pruned tensors (a target without a mask variable gets only its weight written).
        values: (d,) float new weights, in target order.
        mask: (d,) 0/1 mask, in target order (cast to each mask variable's dtype).
    """
    for target, value, layer_mask in zip(targets, unflatten(values, targets), unflatten(mask, targets)):
        dtype = tf.as_dtype(target.variable.dtype)
        target.variable.assign(tf.cast(value, dtype) * tf.cast(layer_mask, dtype))
        if target.mask is not None:
            target.mask.assign(tf.cast(layer_mask, target.mask.dtype))


def restore_targets(targets: Sequence[PruningTarget], saved: Sequence[tuple]) -> None:
    """Write back what ``[(t.variable.numpy(), t.mask.numpy() or None) for t in targets]`` saved.

    Args:
        targets: the pruned tensors.
        saved: per target, (its weight values, its mask values or None), as arrays of their shapes.
    """
    for target, (value, mask) in zip(targets, saved):
        target.variable.assign(value)
        if target.mask is not None and mask is not None:
            target.mask.assign(mask)


def check_unique_names(targets: Sequence[PruningTarget]) -> None:
    """Raise ValueError if two targets share a name (reports key their entries by name).

    Args:
        targets: the pruned tensors.

    Raises:
        ValueError: two targets share a name (the message names it).
    """
    seen = set()
    for target in targets:
        if target.name in seen:
            raise ValueError(f"two pruned weights are both named {target.name!r}: every target needs a unique name")
        seen.add(target.name)
