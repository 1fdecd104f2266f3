"""Shared fixtures. Data comes from ../shared (or $TFW_MNIST_DIR / $TFW_MLPNET_NPZ); missing data fails, never skips.

Nothing here imports TensorFlow: under pytest-xdist (`-n 2`) the controlling process, which loads this file but runs
no test, then starts in a second instead of the ten TensorFlow and tfmot take."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tf_woodfisher.legacy_keras  # noqa: E402, F401  (TF_USE_LEGACY_KERAS=1 before any test module imports TensorFlow)

import shared_data  # noqa: E402  (the data paths and their fixtures, shared with tests_keras3)

SHARED, DATA_FIXTURES = shared_data.SHARED, shared_data.DATA_FIXTURES
mnist_dir, mlpnet_npz = shared_data.mnist_dir, shared_data.mlpnet_npz
cifar10_dir, resnet20_npz = shared_data.cifar10_dir, shared_data.resnet20_npz
mnist_flat = shared_data.mnist_flat


def pytest_collection_modifyitems(config, items):
    shared_data.mark_data_tests_slow(items)
    shared_data.freeze_imported_objects()


@pytest.fixture(scope="session")
def mnist_images(mnist_dir):
    """The same as mnist_flat with images shaped (28, 28, 1)."""
    from tf_woodfisher.data import load_mnist

    return load_mnist("train", mnist_dir, shuffle_seed=0), load_mnist("test", mnist_dir)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
