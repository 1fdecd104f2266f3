"""gRDA, generalized regularized dual averaging (Chao, Wang, Xing & Cheng, NeurIPS 2020), for tf_keras."""
import math
import numbers
import re

from tf_woodfisher import legacy_keras  # noqa: F401, I001  (first: TF_USE_LEGACY_KERAS=1 before TensorFlow)
import tensorflow as tf
import tf_keras as keras

__all__ = ["GRDA"]


def _check_hyperparameter(name, value, minimum, allow_minimum):
    """Raise ValueError unless ``value`` is a finite real ≥ ``minimum`` (> when not ``allow_minimum``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"GRDA: {name} must be a real number, got {value!r}")
    bound = f">= {minimum}" if allow_minimum else f"> {minimum}"
    if not math.isfinite(value) or value < minimum or (value == minimum and not allow_minimum):
        raise ValueError(f"GRDA: {name} must be finite and {bound}, got {value!r}")


def _exclude_patterns(exclude):
    """``exclude`` (None, a regex string or an iterable of them) as a tuple of valid regex strings."""
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


def _is_finite(gradient):
    """Scalar bool: every entry of a dense or ``IndexedSlices`` gradient is finite."""
    values = gradient.values if isinstance(gradient, tf.IndexedSlices) else gradient
    return tf.reduce_all(tf.math.is_finite(values))


@keras.saving.register_keras_serializable(package="tf_woodfisher")
class GRDA(keras.optimizers.Optimizer):
    r"""gRDA: dual averaging with a soft threshold that grows with the step count; it trains sparse weights.

    For each variable w (not excluded), with step k = 1, 2, ... and learning rate γ_k:

        a_0 = w_0                                   (copied when the optimizer is built)
        a_k = a_{k-1} − γ_k · g_k
        τ_k = τ_{k-1} + c · γ_k^{μ+½} · (k^μ − (k−1)^μ),   τ_0 = 0
        w_k = sign(a_k) · max(|a_k| − τ_k, 0)

    With a constant γ, τ_k = c · γ^{μ+½} · k^μ. The threshold τ is one scalar shared by all variables
    and advanced once per step, with the same γ_k as the accumulator step, so learning-rate schedules
    work (γ_k = schedule(k − 1), the tf_keras convention). ``momentum`` β > 0 is this package's
    extension (no published form): b_k = β·b_{k−1} + g_k, b_0 = 0, and a_k = a_{k−1} − γ_k·b_k.

    Variables whose name matches an ``exclude`` regex (``re.search`` on ``variable.name``, e.g.
    ``"bias"``, ``"batch_normalization"``) get the same update with τ = 0, i.e. SGD (with heavy-ball
    momentum when β > 0) applied to the variable itself; they have no accumulator.

    Non-finite gradients: a step in which any gradient holds NaN or ±inf is skipped as a whole:
    variables, accumulators, momentum buffers, τ and ``iterations`` stay unchanged.

    The accumulator is a copy of the weights at ``build`` time: if you set the weights of a model
    afterwards (other than by restoring the optimizer state with them), build a new optimizer.

    Args:
      learning_rate: γ, a float > 0 or a ``keras.optimizers.schedules.LearningRateSchedule``.
      c: threshold scale c ≥ 0 (τ is in units of the weights); c = 0 is SGD.
      mu: threshold growth exponent μ > 0 (0.5 < μ < 1 is the intended range; larger is sparser).
      momentum: β in [0, 1).
      exclude: None, a regex string or a list of them; matching variables are not thresholded.
      name: name of the optimizer.
      **kwargs: the tf_keras optimizer options ``clipnorm``, ``clipvalue``, ``global_clipnorm`` and
        ``jit_compile``. ``weight_decay`` and ``use_ema`` are refused: the threshold is the
        regulariser, and averaged weights are not sparse.
    """

    def __init__(self, learning_rate=0.01, c=0.005, mu=0.51, momentum=0.0, exclude=None, name="GRDA", **kwargs):
        if isinstance(learning_rate, numbers.Real):
            _check_hyperparameter("learning_rate", learning_rate, 0.0, allow_minimum=False)
        _check_hyperparameter("c", c, 0.0, allow_minimum=True)
        _check_hyperparameter("mu", mu, 0.0, allow_minimum=False)
        _check_hyperparameter("momentum", momentum, 0.0, allow_minimum=True)
        if momentum >= 1:
            raise ValueError(f"GRDA: momentum must be < 1, got {momentum!r}")
        if kwargs.pop("weight_decay", None):
            raise ValueError("GRDA: weight_decay is not supported; the threshold c, mu is the regulariser")
        if kwargs.pop("use_ema", False):
            raise ValueError("GRDA: use_ema is not supported; averaged weights are not sparse")
        if kwargs.get("mesh") is not None:
            raise ValueError("GRDA: DTensor meshes are not supported")
        super().__init__(name=name, weight_decay=None, use_ema=False, **kwargs)
        if self._run_with_dtensor:
            raise ValueError("GRDA: DTensor strategies are not supported")
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.c = float(c)
        self.mu = float(mu)
        self.momentum = float(momentum)
        self._exclude = self._no_dependency(_exclude_patterns(exclude))
        with tf.init_scope():
            self._threshold = self.add_variable(shape=(), dtype=tf.float32, name="threshold")

    @property
    def threshold(self):
        """τ, the current soft threshold: a scalar float32 variable in units of the weights."""
        return self._threshold

    def is_excluded(self, variable):
        """True when ``variable.name`` matches one of the ``exclude`` patterns (plain SGD, no threshold)."""
        return any(re.search(pattern, variable.name) for pattern in self._exclude)

    def build(self, var_list):
        """Create one accumulator per thresholded variable (initial value: the variable) and momentum buffers."""
        super().build(var_list)
        if getattr(self, "_built", False):
            return
        self._accumulators = [
            None if self.is_excluded(var) else self.add_variable_from_reference(var, "accumulator", initial_value=var)
            for var in var_list
        ]
        self._momentums = [
            self.add_variable_from_reference(var, "momentum") for var in var_list
        ] if self.momentum > 0 else []
        self._built = True

    def _internal_apply_gradients(self, grads_and_vars):
        """Apply one step to all variables, or none when a gradient is not finite (replica context)."""
        finite = tf.reduce_all([_is_finite(grad) for grad, _ in grads_and_vars])
        return tf.__internal__.distribute.interim.maybe_merge_call(
            self._apply_step, self._distribution_strategy, grads_and_vars, finite
        )

    def _apply_step(self, distribution, grads_and_vars, finite):
        """Advance τ once, update every variable, then count the step; all gated on ``finite``."""
        distribution.extended.update(self._threshold, self._advance_threshold, args=(finite,), group=False)
        for grad, var in grads_and_vars:
            distribution.extended.update(var, self._update_if_finite, args=(grad, finite), group=False)
        return distribution.extended.update(
            self.iterations, lambda step, ok: step.assign_add(tf.cast(ok, step.dtype)), args=(finite,), group=False
        )

    def _advance_threshold(self, threshold, finite):
        """τ += c · γ_k^{μ+½} · (k^μ − (k−1)^μ), with k = iterations + 1; unchanged when not ``finite``."""
        k = tf.cast(self.iterations + 1, tf.float32)
        lr = tf.cast(self.learning_rate, tf.float32)
        # k^μ − (k−1)^μ = k^μ · (1 − (1 − 1/k)^μ), in a form that keeps float32 accuracy for large k.
        growth = tf.pow(k, self.mu) * -tf.math.expm1(self.mu * tf.math.log1p(-1.0 / k))
        threshold.assign_add(tf.where(finite, self.c * tf.pow(lr, self.mu + 0.5) * growth, 0.0))

    def _update_if_finite(self, variable, gradient, finite):
        """``update_step`` (XLA-compiled when ``jit_compile``) when ``finite``, else nothing."""

        def step():
            if self.jit_compile:
                self._update_step_xla(gradient, variable, id(self._var_key(variable)))
            else:
                self._update_step(gradient, variable)

        tf.cond(finite, step, lambda: None)

    def update_step(self, gradient, variable):
        """One gRDA step of one variable, reading the already advanced τ; ``gradient`` dense or IndexedSlices."""
        index = self._index_dict[self._var_key(variable)]
        lr = tf.cast(self.learning_rate, variable.dtype)
        direction = gradient
        if self.momentum > 0:
            buffer = self._momentums[index]
            beta = tf.cast(self.momentum, variable.dtype)
            if isinstance(gradient, tf.IndexedSlices):
                buffer.assign(buffer * beta)
                buffer.scatter_add(gradient)
            else:
                buffer.assign(buffer * beta + gradient)
            direction = buffer
        accumulator = self._accumulators[index]
        target = variable if accumulator is None else accumulator
        if isinstance(direction, tf.IndexedSlices):
            target.scatter_sub(tf.IndexedSlices(direction.values * lr, direction.indices, direction.dense_shape))
        else:
            target.assign_sub(direction * lr)
        if accumulator is not None:
            tau = tf.cast(self._threshold, variable.dtype)
            variable.assign(tf.sign(accumulator) * tf.maximum(tf.abs(accumulator) - tau, 0.0))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "learning_rate": self._serialize_hyperparameter(self._learning_rate),
                "c": self.c,
                "mu": self.mu,
                "momentum": self.momentum,
                "exclude": list(self._exclude) or None,
            }
        )
        return config
