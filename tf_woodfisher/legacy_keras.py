"""Sets ``TF_USE_LEGACY_KERAS=1`` before TensorFlow is imported: the first import of every tf_keras-side module.

tfmot 0.8.1 requires tf_keras (Keras 2); with the variable set, ``tf.keras`` in the user's process is
that same tf_keras. If TensorFlow was already imported with Keras 3, a warning says what to do.
"""
import os
import sys

if "tensorflow" in sys.modules and os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    import warnings

    warnings.warn(
        "TensorFlow was imported before tf_woodfisher without TF_USE_LEGACY_KERAS=1; tf_woodfisher's tfmot "
        "path uses tf_keras (Keras 2) as tfmot does. Build your models with `tf_keras` (or `tfw.keras`), not "
        "Keras 3 (for Keras 3 models use tf_woodfisher.keras3).",
        stacklevel=3,
    )
os.environ["TF_USE_LEGACY_KERAS"] = "1"
