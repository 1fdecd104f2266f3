"""gRDA, generalized regularized dual averaging (Chao, Wang, Xing & Cheng, NeurIPS 2020), as a Keras 3 optimizer.

The same rule, options and checks as the tf_keras optimizer ``tf_woodfisher.optimizers.GRDA``: both call
:mod:`tf_woodfisher.optimizers.rule`. TensorFlow backend (``tf.distribute`` strategies included).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from tf_woodfisher.optimizers import rule

__all__ = ["GRDA"]


@keras.saving.register_keras_serializable(package="tf_woodfisher")
class GRDA(keras.optimizers.Optimizer):
    r"""gRDA for Keras 3: dual averaging with a soft threshold that grows with the step count; it trains sparse weights.

    For each variable w (not excluded), with step k = 1, 2, ... and learning rate γ_k:

        a_0 = w_0                                   (copied when the optimizer is built)
        a_k = a_{k-1} − γ_k · g_k
        τ_k = τ_{k-1} + c · γ_k^{μ+½} · (k^μ − (k−1)^μ),   τ_0 = 0
        w_k = sign(a_k) · max(|a_k| − τ_k, 0)

    τ is one scalar shared by all variables, advanced once per step with the same γ_k as the accumulator step,
    so learning-rate schedules work (γ_k = schedule(k − 1), Keras' convention). ``momentum`` β > 0:
    b_k = β·b_{k−1} + g_k, b_0 = 0, and a_k = a_{k−1} − γ_k·b_k. Variables whose ``path`` matches an ``exclude``
    regex (``re.search``, e.g. ``"bias"``) get the same update with τ = 0 (SGD, with momentum when β > 0) and no
    accumulator. A step in which any gradient holds NaN or ±inf is skipped as a whole: variables, accumulators,
    momentum buffers, τ and ``iterations`` stay unchanged. The accumulator is a copy of the weights at ``build``
    time. The state (τ, accumulators, buffers) is in ``optimizer.variables``, saved in ``.keras`` files.

    Args:
        learning_rate: γ, a float > 0 or a ``keras.optimizers.schedules.LearningRateSchedule``.
        c: threshold scale c ≥ 0 (τ is in units of the weights); c = 0 is SGD.
        mu: threshold growth exponent μ > 0 (0.5 < μ < 1 is the intended range; larger is sparser).
        momentum: β in [0, 1).
        exclude: None, a regex string or a list of them; matching variables are not thresholded.
        name: name of the optimizer.
        **kwargs: Keras optimizer options ``clipnorm``, ``clipvalue``, ``global_clipnorm``,
            ``loss_scale_factor``. ``weight_decay``, ``use_ema`` and ``gradient_accumulation_steps`` are refused.

    Raises:
        ValueError: a hyperparameter out of range or not a finite real, an ``exclude`` entry that is not a valid
            regex string, ``weight_decay``, ``use_ema`` or ``gradient_accumulation_steps`` given.
    """

    def __init__(self, learning_rate=0.01, c=0.005, mu=0.51, momentum=0.0, exclude=None, name="GRDA", **kwargs):
        rule.check_options(learning_rate, c, mu, momentum, kwargs)
        if kwargs.pop("gradient_accumulation_steps", None):
            raise ValueError("GRDA: gradient_accumulation_steps is not supported (the threshold counts steps)")
        if kwargs.pop("ema_momentum", 0.99) != 0.99 or kwargs.pop("ema_overwrite_frequency", None) is not None:
            raise ValueError("GRDA: use_ema is not supported; averaged weights are not sparse")
        if isinstance(learning_rate, int) and not isinstance(learning_rate, bool):
            learning_rate = float(learning_rate)
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.c = float(c)
        self.mu = float(mu)
        self.momentum = float(momentum)
        self.exclude = rule.exclude_patterns(exclude)
        self._threshold = self.add_variable(shape=(), dtype="float32", name="threshold",
                                            aggregation="only_first_replica")

    @property
    def threshold(self):
        """τ, the current soft threshold: a scalar float32 variable in units of the weights."""
        return self._threshold

    def is_excluded(self, variable) -> bool:
        """Whether ``variable.path`` (its ``name`` for a plain ``tf.Variable``) matches an ``exclude`` pattern.

        Args:
            variable: a model variable.

        Returns:
            Whether the variable is excluded from thresholding (plain SGD).
        """
        return rule.is_excluded(self.exclude, getattr(variable, "path", variable.name))

    def build(self, variables):
        """Create one accumulator per thresholded variable (initial value: the variable) and momentum buffers."""
        if self.built:
            return
        super().build(variables)
        self._accumulators = [
            None if self.is_excluded(v) else
            self.add_variable_from_reference(v, "accumulator", initializer=_copy_of(v)) for v in variables]
        self._momentums = [self.add_variable_from_reference(v, "momentum") for v in variables] \
            if self.momentum > 0 else [None] * len(variables)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        """All-reduce the gradients across replicas, then one gRDA step of every variable, or none when a gradient
        is not finite (decided on the reduced gradients, so identically on every replica)."""
        variables = [v.value if isinstance(v, keras.Variable) else v for v in trainable_variables]
        grads_and_vars = self._all_reduce_sum_gradients(list(zip(grads, variables)))
        finite = tf.reduce_all([rule.is_finite(g) for g, _ in grads_and_vars])
        tf.__internal__.distribute.interim.maybe_merge_call(
            self._apply_step, self._distribution_strategy, grads_and_vars, learning_rate, finite)

    def _apply_step(self, distribution, grads_and_vars, learning_rate, finite):
        """Advance τ once, update every variable; all gated on ``finite``. ``apply`` counts the step afterwards,
        so a skipped step takes one off ``iterations`` first."""
        extended = distribution.extended
        extended.update(self._threshold.value, self._advance_threshold, args=(learning_rate, finite), group=False)
        for grad, var in grads_and_vars:
            extended.update(var, self._update_if_finite, args=(grad, learning_rate, finite), group=False)
        extended.update(self._iterations.value, lambda step, ok: step.assign_sub(1 - tf.cast(ok, step.dtype)),
                        args=(finite,), group=False)

    def _advance_threshold(self, threshold, learning_rate, finite):
        """τ += c · γ_k^{μ+½} · (k^μ − (k−1)^μ), with k = iterations + 1; unchanged when not ``finite``."""
        increment = rule.threshold_increment(self.c, self.mu, learning_rate, self._iterations + 1)
        threshold.assign_add(tf.where(finite, increment, 0.0))

    def _update_if_finite(self, variable, gradient, learning_rate, finite):
        tf.cond(finite, lambda: self.update_step(gradient, variable, learning_rate), lambda: None)

    def update_step(self, gradient, variable, learning_rate):
        """One gRDA step of one variable, reading the already advanced τ; ``gradient`` dense or IndexedSlices."""
        index = self._get_variable_index(variable)
        accumulator, buffer = self._accumulators[index], self._momentums[index]
        rule.variable_step(variable, None if accumulator is None else accumulator.value,
                           None if buffer is None else buffer.value, gradient, learning_rate, self.momentum,
                           self._threshold.value)

    def get_config(self) -> dict:
        config = super().get_config()
        for name in ("weight_decay", "use_ema", "ema_momentum", "ema_overwrite_frequency",
                     "gradient_accumulation_steps"):
            config.pop(name, None)
        config.update({"c": self.c, "mu": self.mu, "momentum": self.momentum, "exclude": list(self.exclude) or None})
        return config


def _copy_of(variable):
    """An initializer (shape, dtype) → the current value of ``variable``."""
    return lambda shape, dtype=None: tf.identity(variable.value if isinstance(variable, keras.Variable) else variable)
