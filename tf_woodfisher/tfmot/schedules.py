"""Pruning schedules of the WoodFisher recipes, implementing tfmot's ``PruningSchedule``.

A schedule maps the training step to ``(should_prune, sparsity)``; tfmot's own schedules
(ConstantSparsity, PolynomialDecay) work unchanged. How many Fisher recomputations each pruning
event runs is the configuration's ``steps`` (:class:`~tf_woodfisher.WoodFisherConfig`), not the schedule's.
"""
import warnings

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tf_woodfisher.pruning.schedules import validate_ramp

PruningSchedule = tfmot.sparsity.keras.PruningSchedule


class OneShotSchedule(PruningSchedule):
    """Prune once, to ``target_sparsity``, at training step ``step`` (tfmot steps start at 1).

    Args:
        target_sparsity: in [0, 1).
        step: the training step (≥ 1) whose forward pass first sees the pruned model.

    Raises:
        ValueError: ``target_sparsity`` outside [0, 1), or ``step`` not an int ≥ 1.
    """

    def __init__(self, target_sparsity: float, step: int = 1):
        self.target_sparsity = target_sparsity
        self.step = step
        self._validate_sparsity(target_sparsity, "target_sparsity")
        if not (isinstance(step, int) and step >= 1):
            raise ValueError(f"step must be an int ≥ 1 (tfmot's first training step is 1), got {step!r}")

    def __call__(self, step):
        """Whether to prune at ``step``, and the sparsity.

        Args:
            step: the training step, an int or integer tensor.

        Returns:
            ``(should_prune, sparsity)``: scalar bool tensor (``step == self.step``) and scalar float32
            tensor ``target_sparsity``.
        """
        return (tf.equal(tf.cast(step, tf.int64), self.step), tf.constant(self.target_sparsity, tf.float32))

    def get_config(self):
        return {"class_name": type(self).__name__,
                "config": {"target_sparsity": self.target_sparsity, "step": self.step}}


class GradualSchedule(tfmot.sparsity.keras.PolynomialDecay):
    """The paper's gradual recipe: the cubic ramp of tfmot's PolynomialDecay, refusing a ramp that misses its target.

    A pruning event every ``frequency`` steps from ``begin_step`` to ``end_step``.

    Args:
        initial_sparsity: the sparsity of the first event, in [0, 1).
        final_sparsity: the sparsity of the last event, in [0, 1).
        begin_step: training step of the first pruning event.
        end_step: training step of the last pruning event.
        power: exponent of the ramp (3: cubic).
        frequency: steps between events.

    Raises:
        ValueError: ``end_step - begin_step`` is not a multiple of ``frequency`` (the last event would
            come early and ``final_sparsity`` would never be reached), or tfmot's own checks fail.
    """

    def __init__(self, initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int,
                 power: int = 3, frequency: int = 100):
        super().__init__(initial_sparsity, final_sparsity, begin_step, end_step, power, frequency)
        validate_ramp(begin_step, end_step, frequency, final_sparsity)

    def get_config(self):
        config = super().get_config()
        config["class_name"] = type(self).__name__
        return config


class KeepMasks(PruningSchedule):
    """Never prune: keep the masks as they are (for fine-tuning a model whose zeros are fixed)."""

    def __call__(self, step):
        """Never prune.

        Args:
            step: the training step (unused).

        Returns:
            ``(should_prune, sparsity)``: scalar bool tensor False and scalar float32 tensor 0.
        """
        return tf.constant(False), tf.constant(0.0, tf.float32)

    def get_config(self):
        return {"class_name": type(self).__name__, "config": {}}


SCHEDULES = {cls.__name__: cls for cls in (OneShotSchedule, GradualSchedule, KeepMasks)}


def event_schedule(schedule: PruningSchedule, sparsity_m_by_n=None, warn: bool = False) -> PruningSchedule:
    """The schedule that decides the pruning events: ``schedule``, or tfmot's rule for N:M masks.

    With ``sparsity_m_by_n`` = (n, m), the masks are set once at training step 1 to the pattern's sparsity
    n/m (``OneShotSchedule(n / m, 1)``) whatever ``schedule`` says.

    Args:
        schedule: the wrapper's pruning schedule.
        sparsity_m_by_n: (n, m) or None.
        warn: warn (RuntimeWarning) that ``schedule`` is not used, unless it already is that one-shot schedule.

    Returns:
        ``schedule`` without ``sparsity_m_by_n``, else the :class:`OneShotSchedule` of n/m at step 1.
    """
    if sparsity_m_by_n is None:
        return schedule
    zeros, size = sparsity_m_by_n
    pattern = OneShotSchedule(zeros / size, 1)
    if warn and schedule.get_config() != pattern.get_config():
        warnings.warn(f"sparsity_m_by_n={tuple(sparsity_m_by_n)}: as in tfmot, the masks are set once, at training "
                      f"step 1, to {zeros} zeros in every {size} weights; the pruning schedule "
                      f"{type(schedule).__name__} is not used", RuntimeWarning, stacklevel=3)
    return pattern
