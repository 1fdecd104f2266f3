"""One-shot pruning of the reference MLPNet on MNIST: global magnitude against WoodFisher.

Loads the WoodFisher authors' MLPNet (784 → 40 → 20 → 10, 93.97% on the MNIST test set), checks its
accuracy, prunes a fresh copy one-shot (no retraining) to each sparsity with each method, and prints
the per-layer sparsity of every run and a final accuracy table. It takes about a minute on a laptop CPU.

    python examples/oneshot_mnist.py                       # 90% and 95%, magnitude and WoodFisher
    python examples/oneshot_mnist.py --sparsities 0.5 0.8 0.98 --method woodfisher diagonal_fisher

MNIST comes from --data-dir, else $TFW_MNIST_DIR, else ../shared/datasets/mnist next to the repository
(when present), else tensorflow-datasets (a download). The folder holds the idx files of the test set and
of a training set (the official one or the 5k subset), which provides the Fisher samples.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import tf_woodfisher as tfw  # noqa: E402  (import before TensorFlow: tf.keras is then tf_keras)
from tf_woodfisher._keras import keras, tf  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO_ROOT, os.pardir, "shared")
REFERENCE_ACCURACY = 0.9397

# The configuration of each method (keyword arguments of tfw.one_shot_prune). WoodFisher: the best one found
# by benchmarks/oneshot_table.py (see BENCHMARKS.md): 8 pruning steps (each removing the same fraction of the
# remaining weights), each with a fresh inverse of the whole-model Fisher block from 400 gradients of 10
# samples, λ = 1e-4.
CONFIGS = {
    "magnitude": dict(method="magnitude", mode="global"),
    "magnitude_layerwise": dict(method="magnitude", mode="layerwise"),
    "diagonal_fisher": dict(method="diagonal_fisher", mode="global", num_samples=100, fisher_batch_size=1),
    "woodfisher": dict(method="woodfisher", mode="global", num_samples=400, fisher_batch_size=10, block_size="model",
                       damping=1e-4, steps=8),
    "woodfisher_authors": dict(method="woodfisher", mode="global", num_samples=100, fisher_batch_size=1, damping=1e-5),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="MNIST idx folder (default: $TFW_MNIST_DIR, ../shared/datasets/mnist, "
                                           "else tensorflow-datasets)")
    parser.add_argument("--weights", help="reference MLPNet .npz (default: $TFW_MLPNET_NPZ, else "
                                          "../shared/models/mlpnet_mnist_reference.npz next to the repository)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95], metavar="S",
                        help="target sparsities in [0, 1) (default: 0.9 0.95)")
    parser.add_argument("--method", nargs="+", default=["magnitude", "woodfisher"], choices=sorted(CONFIGS),
                        help="methods to compare (default: magnitude woodfisher)")
    parser.add_argument("--seed", type=int, default=0, help="picks the Fisher samples (default 0)")
    parser.add_argument("--quiet", action="store_true", help="print only the final accuracy table")
    args = parser.parse_args(argv)
    if not all(0 <= s < 1 for s in args.sparsities):
        parser.error("sparsities must lie in [0, 1)")
    return args


def data_dir(path):
    if path:
        return path
    if os.environ.get(tfw.data.MNIST_ENV_VAR):
        return os.environ[tfw.data.MNIST_ENV_VAR]
    shared = os.path.join(SHARED, "datasets", "mnist")
    return os.path.normpath(shared) if os.path.isdir(shared) else None  # None: tensorflow-datasets


def weights_path(path):
    path = path or os.environ.get("TFW_MLPNET_NPZ") or os.path.join(SHARED, "models", "mlpnet_mnist_reference.npz")
    path = os.path.normpath(path)
    if not os.path.exists(path):
        sys.exit(f"error: no MLPNet weights at {path}: pass --weights or set $TFW_MLPNET_NPZ")
    return path


def accuracy(model, x, y):
    return float(np.mean(model.predict(x, batch_size=5000, verbose=0).argmax(axis=1) == y))


def main(argv=None):
    args = parse_args(argv)
    tf.get_logger().setLevel("ERROR")
    say = (lambda *a, **k: None) if args.quiet else print
    started = time.perf_counter()

    folder, npz = data_dir(args.data_dir), weights_path(args.weights)
    x_train, y_train = tfw.data.load_mnist("train", folder, flatten=True, shuffle_seed=0)
    x_test, y_test = tfw.data.load_mnist("test", folder, flatten=True)
    fisher_data = tf.data.Dataset.from_tensor_slices((x_train, y_train))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    say(f"MNIST: {len(y_train):,} training samples (Fisher data), {len(y_test):,} test samples "
        f"from {folder or 'tensorflow-datasets'}")

    dense = accuracy(tfw.models.mlpnet(npz), x_test, y_test)
    print(f"reference MLPNet ({npz}): dense test accuracy {dense:.2%}")
    if abs(dense - REFERENCE_ACCURACY) > 5e-5:
        sys.exit(f"error: expected {REFERENCE_ACCURACY:.2%}; the weights or the test set are not the reference ones")

    results = {}
    for name in args.method:
        config = CONFIGS[name]
        for target in args.sparsities:
            model = tfw.models.mlpnet(npz)
            report = tfw.one_shot_prune(model, fisher_data, loss, target, seed=args.seed, verbose=0, **config)
            results[name, target] = (accuracy(model, x_test, y_test), report)
            options = ", ".join(f"{k}={v}" for k, v in config.items() if k != "method")
            say(f"\n{name} to {target:.0%} ({options}): test accuracy {results[name, target][0]:.2%}")
            say(report)

    width = max(len("method"), *(len(n) for n in args.method))
    print(f"\nTop-1 test accuracy after one-shot pruning (no retraining); dense {dense:.2%}")
    print(f"{'method':<{width}}  " + "  ".join(f"{s:>7.0%}" for s in args.sparsities))
    for name in args.method:
        print(f"{name:<{width}}  " + "  ".join(f"{results[name, s][0]:>7.2%}" for s in args.sparsities))
    print(f"total time {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
