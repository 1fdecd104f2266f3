"""Where the test data is, for both test trees (tests/ and tests_keras3/): ../shared next to the repository, or
$TFW_MNIST_DIR, $TFW_MLPNET_NPZ, $TFW_CIFAR10_DIR, $TFW_RESNET20_NPZ. Missing data fails, never skips. Imports
neither Keras (tests_keras3 runs in a Keras 3 process, tests in a tf_keras one)."""
import gc
import os
import pathlib

import pytest

from tf_woodfisher.data import load_mnist  # no Keras

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
DATA_FIXTURES = {"mnist_dir", "mlpnet_npz", "mnist_flat", "mnist_images", "cifar10_dir", "resnet20_npz"}


def _required_path(env_var, default):
    path = pathlib.Path(os.environ.get(env_var) or default)
    if not path.exists():
        pytest.fail(f"test data missing: {path} (set ${env_var})", pytrace=False)
    return path


def mark_data_tests_slow(items):
    """Tests that read ../shared data belong to the slow tier (the fast tier, -m "not slow", needs no data)."""
    for item in items:
        if DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def freeze_imported_objects():
    """Exclude everything alive after collection (TensorFlow, Keras and the test modules: millions of objects)
    from Python's cyclic garbage collector, whose full passes otherwise rescan them while tests trace graphs."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def mnist_dir():
    return str(_required_path("TFW_MNIST_DIR", SHARED / "datasets" / "mnist"))


@pytest.fixture(scope="session")
def mlpnet_npz():
    return str(_required_path("TFW_MLPNET_NPZ", SHARED / "models" / "mlpnet_mnist_reference.npz"))


@pytest.fixture(scope="session")
def cifar10_dir():
    return str(_required_path("TFW_CIFAR10_DIR", SHARED / "datasets" / "cifar10"))


@pytest.fixture(scope="session")
def resnet20_npz():
    return str(_required_path("TFW_RESNET20_NPZ", SHARED / "models" / "resnet20_cifar10_reference.npz"))


@pytest.fixture(scope="session")
def mnist_flat(mnist_dir):
    """((x_train, y_train), (x_test, y_test)), x flattened to 784, train rows shuffled with seed 0."""
    return (load_mnist("train", mnist_dir, flatten=True, shuffle_seed=0), load_mnist("test", mnist_dir, flatten=True))
