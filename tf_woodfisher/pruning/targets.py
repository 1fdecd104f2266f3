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
        return tuple(self.variable.shape)

    @property
    def size(self) -> int:
        return int(self.variable.shape.num_elements())


def flatten(tensors: Sequence[tf.Tensor], dtype: tf.DType = tf.float32) -> tf.Tensor:
    """Concatenate tensors, cast to ``dtype``, into one flat vector of shape (sum of sizes,)."""
    return tf.concat([tf.reshape(tf.cast(t, dtype), [-1]) for t in tensors], axis=0)


def unflatten(vector: tf.Tensor, targets: Sequence[PruningTarget]) -> list:
    """Split a flat vector into tensors shaped like ``targets``."""
    pieces = tf.split(vector, [t.size for t in targets])
    return [tf.reshape(p, t.shape) for p, t in zip(pieces, targets)]


def current_masks(targets: Sequence[PruningTarget]) -> tf.Tensor:
    """Flat float32 0/1 mask: the mask variable where a target has one, else its nonzero pattern (a plain
    model's zeros count as pruned, so repeated pruning calls and multi-step pruning keep them)."""
    return flatten([t.mask if t.mask is not None else tf.not_equal(t.variable, 0) for t in targets])


def assign_weights(targets: Sequence[PruningTarget], values: tf.Tensor, mask: tf.Tensor) -> None:
    """Write flat ``values`` (d,) and ``mask`` (d,): weight ← value·mask in the weight's own dtype, mask ← mask."""
    for target, value, layer_mask in zip(targets, unflatten(values, targets), unflatten(mask, targets)):
        dtype = target.variable.dtype
        target.variable.assign(tf.cast(value, dtype) * tf.cast(layer_mask, dtype))
        if target.mask is not None:
            target.mask.assign(tf.cast(layer_mask, target.mask.dtype))


def check_unique_names(targets: Sequence[PruningTarget]) -> None:
    """Raise ValueError if two targets share a name (reports key their entries by name)."""
    seen = set()
    for target in targets:
        if target.name in seen:
            raise ValueError(f"two pruned weights are both named {target.name!r}: every target needs a unique name")
        seen.add(target.name)
