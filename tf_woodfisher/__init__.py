"""tf_woodfisher: WoodFisher / OBS pruning and the gRDA optimizer for TensorFlow.

``import tf_woodfisher as tfw`` is the entry of the tfmot workflow: it sets ``TF_USE_LEGACY_KERAS=1``
before TensorFlow is imported (so ``tf.keras`` is tf_keras, as tfmot 0.8.1 requires) and exposes the
tfmot adapter (``tfw.one_shot_prune``, ``tfw.prune_woodfisher``, ``tfw.UpdatePruningStep``, ...).

The numerical core (``tf_woodfisher.fisher``, ``tf_woodfisher.pruning``, ``tf_woodfisher.config``)
and the Keras 3 entry (``tf_woodfisher.keras3``) can be imported on their own: importing only them
runs this file without any side effect (no environment variable, no tf_keras or tfmot import), and
the names below are then loaded on first use.
"""
import importlib

from tf_woodfisher import compat as _compat

__version__ = "0.1.0"

_PUBLIC = {
    "tf_woodfisher.config": ("WoodFisherConfig",),
    "tf_woodfisher.pruning": ("PruningReport", "SweepPoint"),
    "tf_woodfisher.tfmot": ("GradualSchedule", "KeepMasks", "OneShotSchedule", "PruneWoodFisher", "UpdatePruningStep",
                            "find_prunable_weights", "keras", "masks_from_zeros", "one_shot_prune", "one_shot_sweep",
                            "prune_scope", "prune_woodfisher", "strip_pruning", "tf"),
    "tf_woodfisher.export": ("TFLiteExport", "TFLiteVerificationError", "export_tflite"),
    "tf_woodfisher.batchnorm": ("recalibrate_batchnorm",),
}
_SUBMODULES = ("batchnorm", "compat", "config", "data", "export", "fisher", "models", "optimizers", "plots", "pruning",
               "tfmot")
_OWNER = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_OWNER) + list(_SUBMODULES)


def __getattr__(name):
    if name in _OWNER:
        value = getattr(importlib.import_module(_OWNER[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


if not _compat.imported_as_parent(__name__):
    # ``import tf_woodfisher``: the tfmot entry, loaded now as before (it sets TF_USE_LEGACY_KERAS first).
    importlib.import_module("tf_woodfisher.tfmot")
