"""Pruning schedules for Keras 3: tfmot's conventions, without tfmot, serialisable in ``.keras`` files.

A schedule maps the training step (the first training step is 1) to ``(should_prune, sparsity)``, a scalar
bool and a scalar float32 tensor, with the same arithmetic as tfmot's schedules
(:mod:`tf_woodfisher.pruning.schedules`). How many Fisher recomputations each pruning event runs is the
configuration's ``steps`` (:class:`~tf_woodfisher.WoodFisherConfig`), not the schedule's. Each class is
registered with ``keras.saving.register_keras_serializable(package="tf_woodfisher")``.
"""
from __future__ import annotations

import keras
import tensorflow as tf

from tf_woodfisher.config import validate_sparsity
from tf_woodfisher.pruning import schedules as arithmetic

__all__ = ["ConstantSparsity", "GradualSchedule", "KeepMasks", "OneShotSchedule", "PolynomialDecay",
           "PruningSchedule"]


@keras.saving.register_keras_serializable(package="tf_woodfisher")
class PruningSchedule:
    """Base class: ``schedule(step) → (should_prune, sparsity)``; subclasses define ``__call__`` and ``get_config``."""

    def __call__(self, step) -> tuple:
        raise NotImplementedError

    def get_config(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict) -> PruningSchedule:
        return cls(**config)

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.get_config().items())})"


@keras.saving.register_keras_serializable(package="tf_woodfisher")
class ConstantSparsity(PruningSchedule):
    """Prune to ``target_sparsity`` every ``frequency`` steps from ``begin_step`` to ``end_step`` (-1: no end).

    Raises:
        ValueError: a sparsity outside [0, 1) or steps out of range (tfmot's checks).
    """

    def __init__(self, target_sparsity: float, begin_step: int, end_step: int = -1, frequency: int = 100):
        self.target_sparsity = validate_sparsity(target_sparsity, "target_sparsity")
        self.begin_step, self.end_step, self.frequency = arithmetic.validate_steps(begin_step, end_step, frequency,
                                                                                  allow_endless=True)

    def __call__(self, step) -> tuple:
        return (arithmetic.should_prune_in_step(step, self.begin_step, self.end_step, self.frequency),
                tf.constant(self.target_sparsity, tf.float32))

    def get_config(self) -> dict:
        return {"target_sparsity": self.target_sparsity, "begin_step": self.begin_step, "end_step": self.end_step,
                "frequency": self.frequency}


@keras.saving.register_keras_serializable(package="tf_woodfisher")
class PolynomialDecay(PruningSchedule):
    """tfmot's PolynomialDecay: sparsity final + (initial − final)(1 − p)^power, p the fraction of
    [begin_step, end_step] done, an event every ``frequency`` steps in that range.

    Raises:
        ValueError: a sparsity outside [0, 1) or steps out of range (tfmot's checks; end_step cannot be -1).
    """

    def __init__(self, initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int,
                 power: float = 3, frequency: int = 100):
        self.initial_sparsity = validate_sparsity(initial_sparsity, "initial_sparsity")
        self.final_sparsity = validate_sparsity(final_sparsity, "final_sparsity")
        self.begin_step, self.end_step, self.frequency = arithmetic.validate_steps(begin_step, end_step, frequency,
                                                                                  allow_endless=False)
        self.power = power

    def __call__(self, step) -> tuple:
        return (arithmetic.should_prune_in_step(step, self.begin_step, self.end_step, self.frequency),
                arithmetic.polynomial_sparsity(step, self.initial_sparsity, self.final_sparsity, self.begin_step,
                                               self.end_step, self.power))

    def get_config(self) -> dict:
        return {"initial_sparsity": self.initial_sparsity, "final_sparsity": self.final_sparsity,
                "begin_step": self.begin_step, "end_step": self.end_step, "power": self.power,
                "frequency": self.frequency}


@keras.saving.register_keras_serializable(package="tf_woodfisher")
class GradualSchedule(PolynomialDecay):
    """The paper's gradual recipe: the cubic ramp of :class:`PolynomialDecay`, a pruning event every ``frequency``
    steps from ``begin_step`` to ``end_step``, refusing a ramp that misses its target.

    Args:
        initial_sparsity, final_sparsity: in [0, 1).
        begin_step, end_step: training steps of the first and last pruning events.
        power: exponent of the ramp (3: cubic). frequency: steps between events.

    Raises:
        ValueError: ``end_step - begin_step`` is not a multiple of ``frequency`` (the last event would come
            early and ``final_sparsity`` would never be reached), or the checks of :class:`PolynomialDecay`.
    """

    def __init__(self, initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int,
                 power: float = 3, frequency: int = 100):
        super().__init__(initial_sparsity, final_sparsity, begin_step, end_step, power, frequency)
        arithmetic.validate_ramp(self.begin_step, self.end_step, self.frequency, self.final_sparsity)


@keras.saving.register_keras_serializable(package="tf_woodfisher")
class OneShotSchedule(PruningSchedule):
    """Prune once, to ``target_sparsity``, at training step ``step`` (≥ 1, the first training step is 1)."""

    def __init__(self, target_sparsity: float, step: int = 1):
        self.target_sparsity = validate_sparsity(target_sparsity, "target_sparsity")
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 1):
            raise ValueError(f"step must be an int ≥ 1 (the first training step is 1), got {step!r}")
        self.step = step

    def __call__(self, step) -> tuple:
        return tf.equal(tf.cast(step, tf.int64), self.step), tf.constant(self.target_sparsity, tf.float32)

    def get_config(self) -> dict:
        return {"target_sparsity": self.target_sparsity, "step": self.step}


@keras.saving.register_keras_serializable(package="tf_woodfisher")
class KeepMasks(PruningSchedule):
    """Never prune: keep the masks as they are (for fine-tuning a model whose zeros are fixed)."""

    def __call__(self, step) -> tuple:
        return tf.constant(False), tf.constant(0.0, tf.float32)

    def get_config(self) -> dict:
        return {}
