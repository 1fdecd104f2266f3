"""Pruning schedules of the WoodFisher recipes, implementing tfmot's ``PruningSchedule``.

A schedule maps the training step to ``(should_prune, sparsity)``; tfmot's own schedules
(ConstantSparsity, PolynomialDecay) work unchanged. How many Fisher recomputations each pruning
event runs is the configuration's ``steps`` (:class:`~tf_woodfisher.WoodFisherConfig`), not the schedule's.
"""
import tensorflow as tf
import tensorflow_model_optimization as tfmot

PruningSchedule = tfmot.sparsity.keras.PruningSchedule


class OneShotSchedule(PruningSchedule):
    """Prune once, to ``target_sparsity``, at training step ``step`` (tfmot steps start at 1).

    Args:
        target_sparsity: in [0, 1).
        step: the training step (≥ 1) whose forward pass first sees the pruned model.
    """

    def __init__(self, target_sparsity: float, step: int = 1):
        self.target_sparsity = target_sparsity
        self.step = step
        self._validate_sparsity(target_sparsity, "target_sparsity")
        if not (isinstance(step, int) and step >= 1):
            raise ValueError(f"step must be an int ≥ 1 (tfmot's first training step is 1), got {step!r}")

    def __call__(self, step):
        return (tf.equal(tf.cast(step, tf.int64), self.step), tf.constant(self.target_sparsity, tf.float32))

    def get_config(self):
        return {"class_name": type(self).__name__,
                "config": {"target_sparsity": self.target_sparsity, "step": self.step}}


class GradualSchedule(tfmot.sparsity.keras.PolynomialDecay):
    """The paper's gradual recipe: the cubic ramp of tfmot's PolynomialDecay, a pruning event every
    ``frequency`` steps from ``begin_step`` to ``end_step``, refusing a ramp that misses its target.

    Args:
        initial_sparsity, final_sparsity: in [0, 1).
        begin_step, end_step: training steps of the first and last pruning events.
        power: exponent of the ramp (3: cubic). frequency: steps between events.

    Raises:
        ValueError: ``end_step - begin_step`` is not a multiple of ``frequency`` (the last event would
            come early and ``final_sparsity`` would never be reached), or tfmot's own checks fail.
    """

    def __init__(self, initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int,
                 power: int = 3, frequency: int = 100):
        super().__init__(initial_sparsity, final_sparsity, begin_step, end_step, power, frequency)
        if (end_step - begin_step) % frequency:
            raise ValueError(
                f"end_step - begin_step = {end_step - begin_step} is not a multiple of frequency={frequency}: the "
                f"last pruning event would come before end_step and final_sparsity={final_sparsity} would never be "
                f"reached; use end_step={begin_step + (end_step - begin_step) // frequency * frequency}")

    def get_config(self):
        config = super().get_config()
        config["class_name"] = type(self).__name__
        return config


class KeepMasks(PruningSchedule):
    """Never prune: keep the masks as they are (for fine-tuning a model whose zeros are fixed)."""

    def __call__(self, step):
        return tf.constant(False), tf.constant(0.0, tf.float32)

    def get_config(self):
        return {"class_name": type(self).__name__, "config": {}}


SCHEDULES = {cls.__name__: cls for cls in (OneShotSchedule, GradualSchedule, KeepMasks)}
