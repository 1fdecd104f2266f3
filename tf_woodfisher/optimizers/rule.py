"""The gRDA rule in TensorFlow ops, shared by the tf_keras optimizer and the Keras 3 one (imports neither Keras).

For each variable w (not excluded), with step k = 1, 2, ... and learning rate γ_k:

    a_0 = w_0,   a_k = a_{k-1} − γ_k · d_k,   w_k = sign(a_k) · max(|a_k| − τ_k, 0)
    τ_k = τ_{k-1} + c · γ_k^{μ+½} · (k^μ − (k−1)^μ),   τ_0 = 0

with d_k = g_k, or with heavy-ball momentum β > 0, d_k = b_k = β·b_{k−1} + g_k (b_0 = 0). Excluded variables
take w_k = w_{k−1} − γ_k · d_k (τ = 0, no accumulator). Both optimizers call :func:`threshold_increment` once per
step and :func:`variable_step` once per variable, and check their options with :func:`check_options`.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Optional

import tensorflow as tf

__all__ = ["check_options", "exclude_patterns", "is_excluded", "is_finite", "threshold_increment", "variable_step"]


def _check_hyperparameter(name: str, value: Any, minimum: float, allow_minimum: bool) -> None:
    """Raise ValueError unless ``value`` is a finite real ≥ ``minimum`` (> when not ``allow_minimum``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"GRDA: {name} must be a real number, got {value!r}")
    bound = f">= {minimum}" if allow_minimum else f"> {minimum}"
    if not math.isfinite(value) or value < minimum or (value == minimum and not allow_minimum):
        raise ValueError(f"GRDA: {name} must be finite and {bound}, got {value!r}")


def check_options(learning_rate: Any, c: Any, mu: Any, momentum: Any, options: dict) -> None:
    """Validate gRDA's hyperparameters and refuse the optimizer options it does not support.

    Args:
        learning_rate: a float > 0 (a schedule is not checked here).
        c: threshold scale ≥ 0 (τ is in units of the weights).
        mu: growth exponent > 0.
        momentum: β in [0, 1).
        options: the optimizer's other keywords; ``weight_decay`` and ``use_ema`` are refused (and removed).

    Raises:
        ValueError: naming the hyperparameter or option.
    """
    if isinstance(learning_rate, numbers.Real):
        _check_hyperparameter("learning_rate", learning_rate, 0.0, allow_minimum=False)
    _check_hyperparameter("c", c, 0.0, allow_minimum=True)
    _check_hyperparameter("mu", mu, 0.0, allow_minimum=False)
    _check_hyperparameter("momentum", momentum, 0.0, allow_minimum=True)
    if momentum >= 1:
        raise ValueError(f"GRDA: momentum must be < 1, got {momentum!r}")
    if options.pop("weight_decay", None):
        raise ValueError("GRDA: weight_decay is not supported; the threshold c, mu is the regulariser")
    if options.pop("use_ema", False):
        raise ValueError("GRDA: use_ema is not supported; averaged weights are not sparse")


def exclude_patterns(exclude: Any) -> tuple:
    """``exclude`` (None, a regex string or an iterable of them) as a tuple of valid regex strings.

    Args:
        exclude: None, a regex string, or an iterable of regex strings (matched against variable names).

    Returns:
        The patterns as a tuple of strings (empty for None).

    Raises:
        ValueError: an entry that is not a string or not a valid regex.
    """
    if exclude is None:
        return ()
    patterns = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"GRDA: exclude must hold variable-name regex strings, got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"GRDA: exclude pattern {pattern!r} is not a valid regex: {error}") from None
    return patterns


def is_excluded(patterns: tuple, name: str) -> bool:
    """Whether ``name`` matches one of ``patterns`` (``re.search``).

    Args:
        patterns: regex strings, as returned by :func:`exclude_patterns`.
        name: a variable name (or path).

    Returns:
        True when some pattern is found in ``name``.
    """
    return any(re.search(pattern, name) for pattern in patterns)


def is_finite(gradient) -> tf.Tensor:
    """Scalar bool: every entry of a dense or ``IndexedSlices`` gradient is finite.

    Args:
        gradient: a dense float tensor or ``tf.IndexedSlices`` (its values are checked).

    Returns:
        A scalar bool ``tf.Tensor``.
    """
    values = gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient
    return tf.reduce_all(tf.math.is_finite(values))


def threshold_increment(c: float, mu: float, learning_rate, step) -> tf.Tensor:
    """τ_k − τ_{k−1} = c · γ_k^{μ+½} · (k^μ − (k−1)^μ), float32, for step ``step`` = k ≥ 1 and γ_k = ``learning_rate``.

    k^μ − (k−1)^μ is computed as k^μ · (1 − (1 − 1/k)^μ), which keeps float32 accuracy for large k.

    Args:
        c: threshold scale c ≥ 0.
        mu: growth exponent μ > 0.
        learning_rate: γ_k, a float or scalar tensor (this step's learning rate).
        step: k ≥ 1, an int or scalar tensor.

    Returns:
        A scalar float32 ``tf.Tensor``, the increment of τ in units of the weights.
    """
    k = tf.cast(step, tf.float32)
    lr = tf.cast(learning_rate, tf.float32)
    growth = tf.pow(k, mu) * -tf.math.expm1(mu * tf.math.log1p(-1.0 / k))
    return c * tf.pow(lr, mu + 0.5) * growth


def variable_step(variable: tf.Variable, accumulator: Optional[tf.Variable], buffer: Optional[tf.Variable],
                  gradient, learning_rate, momentum: float, threshold) -> None:
    """One gRDA step of one variable, in place.

    Args:
        variable: the weight (a ``tf.Variable``).
        accumulator: its dual variable a (a ``tf.Variable``), or None for an excluded variable (plain SGD step).
        buffer: its momentum buffer b (a ``tf.Variable``), or None without momentum.
        gradient: a dense tensor or ``tf.IndexedSlices`` of the variable's shape.
        learning_rate: γ_k, this step's learning rate (a float or scalar tensor).
        momentum: β in [0, 1) (used with ``buffer``).
        threshold: τ_k, already advanced for this step (a scalar, in units of the weights).
    """
    lr = tf.cast(learning_rate, variable.dtype)
    direction = gradient
    if buffer is not None:
        beta = tf.cast(momentum, variable.dtype)
        if isinstance(gradient, tf.IndexedSlices):
            buffer.assign(buffer * beta)
            buffer.scatter_add(gradient)
        else:
            buffer.assign(buffer * beta + gradient)
        direction = buffer
    target = variable if accumulator is None else accumulator
    if isinstance(direction, tf.IndexedSlices):
        target.scatter_sub(tf.IndexedSlices(direction.values * lr, direction.indices, direction.dense_shape))
    else:
        target.assign_sub(direction * lr)
    if accumulator is not None:
        tau = tf.cast(threshold, variable.dtype)
        variable.assign(tf.sign(accumulator) * tf.maximum(tf.abs(accumulator) - tau, 0.0))
