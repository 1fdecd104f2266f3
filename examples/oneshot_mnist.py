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
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts' helpers
import common  # noqa: E402  (first: imports tf_woodfisher before TensorFlow)
import tf_woodfisher as tfw  # noqa: E402  (sets TF_USE_LEGACY_KERAS=1: tf.keras is tf_keras)

# The configuration of each method (overrides of tfw.WoodFisherConfig, given to tfw.one_shot_prune). WoodFisher:
# the best one found by benchmarks/oneshot_table.py (see BENCHMARKS.md): 8 pruning steps (each removing the same
# fraction of the remaining weights), each with a fresh inverse of the whole-model Fisher block from 400 gradients
# of 10 samples, λ = 1e-4.
CONFIGS = {
    "magnitude": dict(method="magnitude", mode="global"),
    "magnitude_layerwise": dict(method="magnitude", mode="layerwise"),
    "diagonal_fisher": dict(method="diagonal_fisher", mode="global", num_gradients=100, fisher_batch_size=1),
    "woodfisher": dict(method="woodfisher", mode="global", num_gradients=400, fisher_batch_size=10,
                       fisher_block_size="model", damping=1e-4, steps=8),
    "woodfisher_authors": dict(method="woodfisher", mode="global", num_gradients=100, fisher_batch_size=1,
                               damping=1e-5),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help=common.MNIST_HELP)
    parser.add_argument("--weights", help=common.MLPNET_HELP)
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


def main(argv=None):
    args = parse_args(argv)
    common.quiet_tensorflow()
    say = (lambda *a, **k: None) if args.quiet else print
    started = time.perf_counter()

    npz = common.mlpnet_npz(args.weights)
    mnist = common.Mnist(args.data_dir, flatten=True)
    say(f"MNIST: {len(mnist.y_train):,} training samples (Fisher data), {len(mnist.y_test):,} test samples "
        f"from {mnist.source}")
    dense = common.accuracy(tfw.models.mlpnet(npz), mnist.x_test, mnist.y_test)
    common.check_reference_accuracy(dense, what=f"reference MLPNet ({npz})")

    results = {}
    for name in args.method:
        config = CONFIGS[name]
        for target in args.sparsities:
            model = tfw.models.mlpnet(npz)
            report = tfw.one_shot_prune(model, mnist.train, common.LOSS, target, seed=args.seed, verbose=0, **config)
            results[name, target] = (common.accuracy(model, mnist.x_test, mnist.y_test), report)
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
