"""Shared fixtures. Data comes from ../shared (or $TFW_MNIST_DIR / $TFW_MLPNET_NPZ); missing data fails, never skips."""
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import tf_woodfisher as tfw  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


def _required_path(env_var, default):
    path = pathlib.Path(os.environ.get(env_var) or default)
    if not path.exists():
        pytest.fail(f"test data missing: {path} (set ${env_var})", pytrace=False)
    return path


DATA_FIXTURES = {"mnist_dir", "mlpnet_npz", "mnist_flat", "mnist_images", "cifar10_dir", "resnet20_npz"}


def pytest_collection_modifyitems(config, items):
    """Tests that read ../shared data belong to the slow tier (the fast tier, -m "not slow", needs no data)."""
    for item in items:
        if DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
    return (tfw.data.load_mnist("train", mnist_dir, flatten=True, shuffle_seed=0),
            tfw.data.load_mnist("test", mnist_dir, flatten=True))


@pytest.fixture(scope="session")
def mnist_images(mnist_dir):
    """The same as mnist_flat with images shaped (28, 28, 1)."""
    return (tfw.data.load_mnist("train", mnist_dir, shuffle_seed=0),
            tfw.data.load_mnist("test", mnist_dir))


@pytest.fixture
def rng():
    return np.random.default_rng(0)
