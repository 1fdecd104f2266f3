"""tf_woodfisher: WoodFisher / OBS pruning and the gRDA optimizer for the tfmot workflow.

Import it before TensorFlow (or set TF_USE_LEGACY_KERAS=1) so that ``tf.keras`` is tf_keras.
"""
from tf_woodfisher._keras import keras, tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from tf_woodfisher import data, fisher, models, optimizers, plots  # noqa: F401
from tf_woodfisher.pruning import PruningReport, find_prunable_weights, one_shot_prune  # noqa: F401
from tf_woodfisher.keras import (GradualSchedule, KeepMasks, OneShotSchedule, PruneWoodFisher,  # noqa: F401
                                 UpdatePruningStep, masks_from_zeros, prune_scope, prune_woodfisher)
from tf_woodfisher.export import TFLiteExport, TFLiteVerificationError, export_tflite  # noqa: F401

__version__ = "0.1.0"
