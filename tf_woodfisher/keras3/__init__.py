"""tf_woodfisher.keras3: WoodFisher pruning and gRDA for Keras 3 models (TensorFlow backend), without tf_keras or tfmot.

``import tf_woodfisher.keras3 as tfw3`` loads Keras 3 and never tf_keras or tfmot, and sets no
``TF_USE_LEGACY_KERAS``: ``tf.keras`` and ``keras`` stay Keras 3. It is an adapter over the same Keras-free core
as the tf_keras path (``import tf_woodfisher as tfw``): the same :class:`WoodFisherConfig`, methods, modes,
events and :class:`PruningReport`.

- :func:`one_shot_prune`: prune a built model in place, without training.
- :func:`one_shot_sweep`: prune it to several sparsities from one start, evaluating each.
- :func:`prune` + :class:`PruningCallback`: gradual pruning in ``model.fit`` without layer wrappers (masks are
  non-trainable variables of a :class:`PrunedModel`, enforced after every optimizer step), :func:`strip`, and
  ``.keras`` save/load mid-pruning; schedules :class:`OneShotSchedule`, :class:`GradualSchedule`,
  :class:`ConstantSparsity`, :class:`PolynomialDecay`, :class:`KeepMasks`.
- :func:`export_tflite`: a verified (sparse) ``.tflite`` file.
- :class:`tf_woodfisher.keras3.optimizers.GRDA`: gRDA as a Keras 3 optimizer.

Raises:
    ImportError: at import, when Keras runs on another backend than TensorFlow (``KERAS_BACKEND``).
"""
import os

_BACKEND = os.environ.get("KERAS_BACKEND")
if _BACKEND and _BACKEND != "tensorflow":
    raise ImportError(f"tf_woodfisher.keras3 works on Keras 3's TensorFlow backend, but KERAS_BACKEND={_BACKEND!r}: "
                      "set KERAS_BACKEND=tensorflow (before keras is first imported)")

try:
    import keras  # noqa: E402  (Keras 3)
except ImportError as error:  # e.g. a backend chosen in ~/.keras/keras.json whose library is missing
    raise ImportError(f"tf_woodfisher.keras3 could not import Keras 3 ({error}); it works on Keras 3's TensorFlow "
                      "backend: set KERAS_BACKEND=tensorflow (or \"backend\": \"tensorflow\" in "
                      "~/.keras/keras.json)") from error

if keras.backend.backend() != "tensorflow":
    raise ImportError(f"tf_woodfisher.keras3 works on Keras 3's TensorFlow backend, but Keras runs on "
                      f"{keras.backend.backend()!r} (from KERAS_BACKEND or ~/.keras/keras.json): set "
                      "KERAS_BACKEND=tensorflow before keras is first imported")

from tf_woodfisher import compat  # noqa: E402

compat.check_versions("tensorflow", "keras")

from tf_woodfisher.config import WoodFisherConfig  # noqa: E402
from tf_woodfisher.keras3 import models, optimizers  # noqa: E402
from tf_woodfisher.keras3.callbacks import PruningCallback  # noqa: E402
from tf_woodfisher.keras3.export import TFLiteExport, TFLiteVerificationError, export_tflite  # noqa: E402
from tf_woodfisher.keras3.oneshot import one_shot_prune, one_shot_sweep  # noqa: E402
from tf_woodfisher.keras3.pruned import PrunedModel, masks_from_zeros, prune, strip  # noqa: E402
from tf_woodfisher.keras3.schedules import (ConstantSparsity, GradualSchedule, KeepMasks, OneShotSchedule,  # noqa: E402
                                            PolynomialDecay, PruningSchedule)
from tf_woodfisher.keras3.targets import find_prunable_weights  # noqa: E402
from tf_woodfisher.pruning.report import PruningReport  # noqa: E402

__all__ = ["ConstantSparsity", "GradualSchedule", "KeepMasks", "OneShotSchedule", "PolynomialDecay", "PrunedModel",
           "PruningCallback", "PruningReport", "PruningSchedule", "TFLiteExport", "TFLiteVerificationError",
           "WoodFisherConfig", "export_tflite", "find_prunable_weights", "keras", "masks_from_zeros", "models",
           "one_shot_prune", "one_shot_sweep", "optimizers", "prune", "strip"]
