"""Pruning schedules of the WoodFisher recipes, implementing tfmot's ``PruningSchedule``.

A schedule maps the training step to ``(should_prune, sparsity)``. tf_woodfisher schedules also
declare ``recompute_steps``: how many Fisher recomputations (multi-step pruning) each pruning
event runs. tfmot's own schedules (ConstantSparsity, PolynomialDecay) work unchanged, with one.
"""
import tensorflow_model_optimization as tfmot

from tf_woodfisher._keras import tf

PruningSchedule = tfmot.sparsity.keras.PruningSchedule


def recompute_steps(schedule):
    """Fisher recomputations per pruning event of ``schedule`` (1 for tfmot's schedules)."""
    return int(getattr(schedule, "recompute_steps", 1))


def _validate_recompute_steps(value):
    if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"recompute_steps must be an int ≥ 1, got {value!r}")


class OneShotSchedule(PruningSchedule):
    """Prune once, to ``target_sparsity``, at training step ``step`` (tfmot steps start at 1)."""

    def __init__(self, target_sparsity, step=1, recompute_steps=1):
        self.target_sparsity = target_sparsity
        self.step = step
        self.recompute_steps = recompute_steps
        self._validate_sparsity(target_sparsity, "target_sparsity")
        if not (isinstance(step, int) and step >= 1):
            raise ValueError(f"step must be an int ≥ 1 (tfmot's first training step is 1), got {step!r}")
        _validate_recompute_steps(recompute_steps)

    def __call__(self, step):
        return (tf.equal(tf.cast(step, tf.int64), self.step), tf.constant(self.target_sparsity, tf.float32))

    def get_config(self):
        return {"class_name": type(self).__name__,
                "config": {"target_sparsity": self.target_sparsity, "step": self.step,
                           "recompute_steps": self.recompute_steps}}


class GradualSchedule(tfmot.sparsity.keras.PolynomialDecay):
    """The paper's gradual recipe: the cubic ramp of tfmot's PolynomialDecay (a pruning event every
    ``frequency`` steps from ``begin_step`` to ``end_step``), each event running ``recompute_steps``
    Fisher recomputations.
    """

    def __init__(self, initial_sparsity, final_sparsity, begin_step, end_step, power=3, frequency=100,
                 recompute_steps=1):
        super().__init__(initial_sparsity, final_sparsity, begin_step, end_step, power, frequency)
        if (end_step - begin_step) % frequency:
            raise ValueError(
                f"end_step - begin_step = {end_step - begin_step} is not a multiple of frequency={frequency}: the "
                f"last pruning event would come before end_step and final_sparsity={final_sparsity} would never be "
                f"reached; use end_step={begin_step + (end_step - begin_step) // frequency * frequency}")
        _validate_recompute_steps(recompute_steps)
        self.recompute_steps = recompute_steps

    def get_config(self):
        config = super().get_config()
        config["class_name"] = type(self).__name__
        config["config"]["recompute_steps"] = self.recompute_steps
        return config


class KeepMasks(PruningSchedule):
    """Never prune: keep the masks as they are (for fine-tuning a model whose zeros are fixed)."""

    recompute_steps = 1

    def __call__(self, step):
        return tf.constant(False), tf.constant(0.0, tf.float32)

    def get_config(self):
        return {"class_name": type(self).__name__, "config": {}}


SCHEDULES = {cls.__name__: cls for cls in (OneShotSchedule, GradualSchedule, KeepMasks)}
