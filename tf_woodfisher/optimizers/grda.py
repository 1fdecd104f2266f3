"""gRDA, generalized regularized dual averaging (Chao, Wang, Xing & Cheng, NeurIPS 2020), for tf_keras."""
from tf_woodfisher import legacy_keras  # noqa: F401, I001  (first: TF_USE_LEGACY_KERAS=1 before TensorFlow)
import tensorflow as tf
import tf_keras as keras

from tf_woodfisher.optimizers import rule

__all__ = ["GRDA"]


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

    Raises:
      ValueError: a hyperparameter out of range or not a finite real, an ``exclude`` entry that is not a
        valid regex string, ``weight_decay`` or ``use_ema`` given, or a DTensor mesh or strategy.
    """

    def __init__(self, learning_rate=0.01, c=0.005, mu=0.51, momentum=0.0, exclude=None, name="GRDA", **kwargs):
        rule.check_options(learning_rate, c, mu, momentum, kwargs)
        if kwargs.get("mesh") is not None:
            raise ValueError("GRDA: DTensor meshes are not supported")
        super().__init__(name=name, weight_decay=None, use_ema=False, **kwargs)
        if self._run_with_dtensor:
            raise ValueError("GRDA: DTensor strategies are not supported")
        self._learning_rate = self._build_learning_rate(learning_rate)
        self.c = float(c)
        self.mu = float(mu)
        self.momentum = float(momentum)
        self._exclude = self._no_dependency(rule.exclude_patterns(exclude))
        with tf.init_scope():
            self._threshold = self.add_variable(shape=(), dtype=tf.float32, name="threshold")

    @property
    def threshold(self):
        """τ, the current soft threshold: a scalar float32 variable in units of the weights."""
        return self._threshold

    def is_excluded(self, variable):
        """True when ``variable.name`` matches one of the ``exclude`` patterns (plain SGD, no threshold).

        Args:
            variable: a model variable (its ``name`` is searched with ``re.search``).

        Returns:
            Whether the variable is excluded from thresholding.
        """
        return rule.is_excluded(self._exclude, variable.name)

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
        finite = tf.reduce_all([rule.is_finite(grad) for grad, _ in grads_and_vars])
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
        increment = rule.threshold_increment(self.c, self.mu, self.learning_rate, self.iterations + 1)
        threshold.assign_add(tf.where(finite, increment, 0.0))

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
        rule.variable_step(variable, self._accumulators[index], self._momentums[index] if self.momentum > 0 else None,
                           gradient, self.learning_rate, self.momentum, self._threshold)

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
