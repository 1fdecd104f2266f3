"""The Keras tf_woodfisher and tfmot use: tf_keras (Keras 2), never Keras 3.

Importing this module sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported, so that
``tf.keras`` in the user's process is the same ``tf_keras`` that tfmot 0.8.1 requires.
"""
import os
import sys

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    import warnings

    warnings.warn(
        "TensorFlow was imported before tf_woodfisher without TF_USE_LEGACY_KERAS=1; "
        "tf_woodfisher uses tf_keras (Keras 2) as tfmot does. Build your models with "
        "`tf_keras` (or `tfw.keras`), not Keras 3.",
        stacklevel=3,
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

__all__ = ["tf", "keras"]
