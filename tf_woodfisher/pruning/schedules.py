"""The arithmetic of pruning schedules (tfmot's conventions), in TensorFlow ops, for every adapter.

A schedule maps the training step (the first training step is 1) to ``(should_prune, sparsity)``. The tfmot
adapter's schedules subclass tfmot's; the Keras 3 adapter's (``tf_woodfisher.keras3.schedules``) are built
on these functions, which reproduce tfmot's ``ConstantSparsity`` and ``PolynomialDecay`` exactly. Imports no
Keras.
"""
from __future__ import annotations

import numbers

import tensorflow as tf

__all__ = ["polynomial_sparsity", "should_prune_in_step", "validate_ramp", "validate_steps"]


def _int(name: str, value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)


def validate_steps(begin_step: int, end_step: int, frequency: int, allow_endless: bool) -> tuple:
    """(begin_step, end_step, frequency) as ints, checked as tfmot checks them.

    Args:
        begin_step: first training step of the range (≥ 0).
        end_step: last training step of the range (≥ begin_step), or -1 (prune forever) when ``allow_endless``.
        frequency: steps between two events (≥ 1).
        allow_endless: whether end_step = -1 is accepted.

    Returns:
        ``(begin_step, end_step, frequency)`` as Python ints.

    Raises:
        ValueError: naming the argument that is out of range (or not an int).
    """
    begin_step, end_step, frequency = _int("begin_step", begin_step), _int("end_step", end_step), \
        _int("frequency", frequency)
    if begin_step < 0:
        raise ValueError(f"begin_step must be >= 0, got {begin_step}")
    if end_step == -1 and not allow_endless:
        raise ValueError("end_step cannot be -1: the ramp needs an end")
    if end_step != -1 and end_step < begin_step:
        raise ValueError(f"end_step must be -1 or >= begin_step = {begin_step}, got {end_step}")
    if frequency <= 0:
        raise ValueError(f"frequency must be > 0, got {frequency}")
    return begin_step, end_step, frequency


def validate_ramp(begin_step: int, end_step: int, frequency: int, final_sparsity: float) -> None:
    """Refuse a ramp whose last event comes before ``end_step`` (so ``final_sparsity`` would never be reached).

    Args:
        begin_step: first training step of the ramp.
        end_step: last training step of the ramp.
        frequency: steps between two events.
        final_sparsity: the sparsity the ramp should reach (for the message).

    Raises:
        ValueError: ``end_step - begin_step`` is not a multiple of ``frequency``; the message gives the fix.
    """
    if (end_step - begin_step) % frequency:
        raise ValueError(
            f"end_step - begin_step = {end_step - begin_step} is not a multiple of frequency={frequency}: the "
            f"last pruning event would come before end_step and final_sparsity={final_sparsity} would never be "
            f"reached; use end_step={begin_step + (end_step - begin_step) // frequency * frequency}")


def should_prune_in_step(step, begin_step: int, end_step: int, frequency: int) -> tf.Tensor:
    """Scalar bool: ``step`` is in [begin_step, end_step] and a multiple of ``frequency`` steps after ``begin_step``.

    As tfmot's ``PruningSchedule._should_prune_in_step``.

    Args:
        step: the training step, an int or integer tensor (cast to int64).
        begin_step: first training step of the range.
        end_step: last training step of the range; -1: no end.
        frequency: steps between two events.

    Returns:
        A scalar bool ``tf.Tensor``.
    """
    step = tf.cast(step, tf.int64)
    in_range = tf.logical_and(step >= begin_step, tf.logical_or(step <= end_step, end_step < 0))
    return tf.logical_and(in_range, tf.equal(tf.math.floormod(step - begin_step, frequency), 0))


def polynomial_sparsity(step, initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int,
                        power: float) -> tf.Tensor:
    """Scalar float32: final + (initial − final)·(1 − p)^power with p = clip((step − begin)/(end − begin), 0, 1).

    As tfmot's ``PolynomialDecay``.

    Args:
        step: the training step, an int or integer tensor (cast to int64).
        initial_sparsity: the sparsity at ``begin_step``, a fraction in [0, 1).
        final_sparsity: the sparsity from ``end_step`` on, a fraction in [0, 1).
        begin_step: first training step of the ramp.
        end_step: last training step of the ramp (end − begin is taken as at least 1).
        power: the exponent of the decay.

    Returns:
        A scalar float32 ``tf.Tensor``, the sparsity at ``step``.
    """
    progress = tf.cast(tf.cast(step, tf.int64) - begin_step, tf.float32) / float(max(end_step - begin_step, 1))
    progress = tf.minimum(1.0, tf.maximum(0.0, progress))
    return (initial_sparsity - final_sparsity) * tf.pow(1.0 - progress, float(power)) + final_sparsity
