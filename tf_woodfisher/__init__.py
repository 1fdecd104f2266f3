"""tf_woodfisher: WoodFisher / OBS pruning and the gRDA optimizer for the tfmot workflow."""
from tf_woodfisher._keras import keras, tf  # noqa: F401  (sets TF_USE_LEGACY_KERAS first)
from tf_woodfisher import data, models  # noqa: F401

__version__ = "0.1.0"
