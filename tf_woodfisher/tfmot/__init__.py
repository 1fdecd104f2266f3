"""The tfmot / tf_keras adapter: WoodFisher pruning of tf_keras models, one-shot and inside ``model.fit``.

Importing it sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported, so that ``tf.keras`` in the
user's process is the same tf_keras that tfmot 0.8.1 requires. It turns tf_keras models (plain or
wrapped by tfmot) into the core's :class:`~tf_woodfisher.pruning.PruningProblem`.
"""
from tf_woodfisher import legacy_keras  # noqa: F401  (first: TF_USE_LEGACY_KERAS=1 before TensorFlow)

import tensorflow as tf
import tf_keras as keras

from tf_woodfisher import compat

from tf_woodfisher.tfmot.callbacks import UpdatePruningStep
from tf_woodfisher.tfmot.oneshot import one_shot_prune, one_shot_sweep
from tf_woodfisher.tfmot.prune import masks_from_zeros, prune_scope, prune_woodfisher, strip_pruning
from tf_woodfisher.tfmot.schedules import GradualSchedule, KeepMasks, OneShotSchedule
from tf_woodfisher.tfmot.targets import find_prunable_weights
from tf_woodfisher.tfmot.wrapper import PruneWoodFisher

compat.check_versions("tensorflow", "tf_keras", "tensorflow_model_optimization")

__all__ = ["GradualSchedule", "KeepMasks", "OneShotSchedule", "PruneWoodFisher", "UpdatePruningStep",
           "find_prunable_weights", "keras", "masks_from_zeros", "one_shot_prune", "one_shot_sweep", "prune_scope",
           "prune_woodfisher", "strip_pruning", "tf"]
