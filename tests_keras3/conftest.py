"""Fixtures of the Keras 3 tests. They run in their own pytest process (``pytest tests_keras3``): tests/conftest.py
switches its process to tf_keras; the test modules here import only ``tf_woodfisher.keras3`` and Keras 3, so
``keras`` and ``tf.keras`` are Keras 3 here. Data comes from ../shared (or $TFW_MNIST_DIR / $TFW_MLPNET_NPZ);
missing data fails, never skips."""
import os
import pathlib
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
TESTS = pathlib.Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))  # shared_data, grda_reference: helpers that import no Keras

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import shared_data  # noqa: E402

mnist_dir, mlpnet_npz, mnist_flat = shared_data.mnist_dir, shared_data.mlpnet_npz, shared_data.mnist_flat
if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
    raise RuntimeError("tests_keras3 needs Keras 3: unset TF_USE_LEGACY_KERAS")


def pytest_collection_modifyitems(config, items):
    """After the test modules are imported (each imports tf_woodfisher.keras3 or Keras 3 itself; this file imports
    no TensorFlow, so pytest-xdist's controlling process starts fast): check that none loaded tf_keras or tfmot."""
    if any(m.split(".")[0] in ("tf_keras", "tensorflow_model_optimization") for m in sys.modules):
        raise RuntimeError("tests_keras3 must run in its own process, without tf_keras or tfmot: run `pytest "
                           "tests_keras3` separately from `pytest tests`")
    shared_data.mark_data_tests_slow(items)
    shared_data.freeze_imported_objects()


@pytest.fixture
def rng():
    return np.random.default_rng(0)
