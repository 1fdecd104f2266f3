"""Helpers shared by the benchmark scripts: paths, MNIST, the reference models, accuracy, tables.

The scripts import this module as ``common`` (they run as ``python benchmarks/<script>.py``, so this
folder is on ``sys.path``).
"""
import os
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import tf_woodfisher as tfw  # noqa: E402  (sets TF_USE_LEGACY_KERAS before TensorFlow)
from tf_woodfisher._keras import keras, tf  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
CACHE_DIR = os.path.join(REPO_ROOT, "benchmarks", "out")  # git-ignored
SHARED_DIR = os.path.join(REPO_ROOT, os.pardir, "shared")
DEFAULT_MNIST_DIR = os.path.join(SHARED_DIR, "datasets", "mnist")
DEFAULT_MLPNET_NPZ = os.path.join(SHARED_DIR, "models", "mlpnet_mnist_reference.npz")
MLPNET_REFERENCE_ACCURACY = 0.9397
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def quiet_tensorflow():
    """Silence TensorFlow's Python-side retracing warnings (the C++ logs are cut by TF_CPP_MIN_LOG_LEVEL)."""
    tf.get_logger().setLevel("ERROR")


def mnist_dir(path=None):
    """``path``, else $TFW_MNIST_DIR, else ../shared/datasets/mnist next to the repo if present, else None (tfds)."""
    if path:
        return path
    if os.environ.get(tfw.data.MNIST_ENV_VAR):
        return os.environ[tfw.data.MNIST_ENV_VAR]
    return os.path.normpath(DEFAULT_MNIST_DIR) if os.path.isdir(DEFAULT_MNIST_DIR) else None


def mlpnet_npz(path=None):
    """``path``, else $TFW_MLPNET_NPZ, else ../shared/models/mlpnet_mnist_reference.npz next to the repo."""
    return path or os.environ.get("TFW_MLPNET_NPZ") or os.path.normpath(DEFAULT_MLPNET_NPZ)


class Mnist:
    """The Fisher/training data (training split, shuffled with seed 0) and the official test set."""

    def __init__(self, path=None, flatten=False):
        self.path = mnist_dir(path)
        self.flatten = flatten
        self.x_train, self.y_train = tfw.data.load_mnist("train", self.path, flatten=flatten, shuffle_seed=0)
        self.x_test, self.y_test = tfw.data.load_mnist("test", self.path, flatten=flatten)
        self.train = tf.data.Dataset.from_tensor_slices((self.x_train, self.y_train))


def accuracy(model, x, y, batch_size=2500):
    """Top-1 accuracy of a logits model."""
    logits = np.concatenate([model(x[i:i + batch_size], training=False).numpy() for i in range(0, len(x), batch_size)])
    return float(np.mean(logits.argmax(axis=1) == y))


def check_reference_accuracy(value, expected=MLPNET_REFERENCE_ACCURACY, what="reference MLPNet"):
    """Print the dense accuracy and stop with an error if it is not the published one."""
    print(f"{what}: dense test accuracy {value:.2%} (expected {expected:.2%})", flush=True)
    if abs(value - expected) > 5e-5:
        sys.exit(f"error: the {what} reaches {value:.2%} instead of {expected:.2%}: wrong weights or data")


def mean_sd(values):
    """(mean, sample standard deviation; 0 for one value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def markdown_table(header, rows, align=None):
    """A GitHub markdown table; ``align`` is a string of 'l'/'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def command_line():
    """The command that is running, as it would be typed from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), REPO_ROOT)
    return " ".join(["python", shlex.quote(script)] + [shlex.quote(a) for a in sys.argv[1:]])


def environment_line():
    """One line naming the software and the machine the numbers come from."""
    import platform

    return (f"TensorFlow {tf.__version__} (CPU), tf_keras {keras.__version__}, NumPy {np.__version__}, "
            f"Python {platform.python_version()}, {os.cpu_count()} CPU cores, {time.strftime('%Y-%m-%d')}")
