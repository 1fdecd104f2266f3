"""The whole Keras 3 workflow of tf_woodfisher on MNIST: prune, fit, save/load mid-pruning, strip, export.

Trains the small CNN (``tfw3.models.small_cnn``: two Conv2D and two Dense layers, Keras 3) on the MNIST training
set in --data-dir (the 5k subset in ../shared; the dense weights are cached under benchmarks/out/, which git
ignores), then, for each method, prunes a copy of it gradually in ``model.fit`` without layer wrappers:

1. ``tfw3.prune(model, tfw3.GradualSchedule(...), method=...)`` attaches the masks (cubic ramp from 0 to the
   target, an event every --frequency steps over the first 3/4 of the epochs);
2. ``fit`` with ``tfw3.PruningCallback(fisher_data, loss)`` for half the epochs;
3. ``model.save('….keras')`` mid-pruning, ``keras.saving.load_model`` (masks, step and schedule come back),
   and ``fit`` again with a new callback for the other half;
4. ``tfw3.strip`` → a plain Keras 3 model with the zeros; ``tfw3.export_tflite`` → a verified sparse ``.tflite``.

Methods: ``woodfisher`` (global WoodFisher scores and OBS updates) and ``magnitude`` (global magnitude), the same
schedule, epochs and data order. Prints each run's per-layer table and a final table.

    python examples/keras3_pruning_mnist.py                       # 90 %, both methods (a few minutes on 2 cores)
    python examples/keras3_pruning_mnist.py --quick               # smoke test, well under a minute
"""
import argparse
import pathlib
import sys
import tempfile
import time

import tf_woodfisher.keras3 as tfw3  # first: Keras 3 stays Keras 3 (no TF_USE_LEGACY_KERAS)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts' helpers
import common  # noqa: E402  (sees tf_woodfisher.keras3: common.keras is Keras 3)

keras = tfw3.keras
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
CACHE = pathlib.Path(common.CACHE_DIR) / "keras3_pruning_mnist"  # git-ignored
METHODS = {"woodfisher": dict(method="woodfisher", num_gradients=128, fisher_batch_size=16, fisher_block_size=2000,
                              damping=1e-4),
           "magnitude": dict(method="magnitude")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", help=common.MNIST_HELP)
    parser.add_argument("--sparsity", type=float, default=0.9, help="target sparsity in (0, 1)")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=["woodfisher", "magnitude"])
    parser.add_argument("--epochs", type=int, help="epochs of each pruning run (default 4; 2 with --quick)")
    parser.add_argument("--dense-epochs", type=int, help="epochs of the dense model (default 6; 1 with --quick)")
    parser.add_argument("--frequency", type=int, default=20, help="steps between pruning events")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="data order of the pruning runs and Fisher samples")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 dense epoch, 2 pruning epochs, "
                                                             "16 Fisher gradients")
    parser.add_argument("--cache-dir", default=str(CACHE), help="dense weights, .keras and .tflite files")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (2 if args.quick else 4)
    args.dense_epochs = args.dense_epochs or (1 if args.quick else 6)
    if not 0 < args.sparsity < 1:
        parser.error("--sparsity must lie in (0, 1)")
    if args.epochs < 2:
        parser.error("--epochs must be ≥ 2 (the run is saved and reloaded half way)")
    return args


def dense_model(args, data):
    """The trained dense small CNN (Keras 3), from the cache when the same settings trained it before."""
    path = pathlib.Path(args.cache_dir) / f"small_cnn_n{len(data.y_train)}_e{args.dense_epochs}.weights.h5"
    keras.utils.set_random_seed(0)
    model = tfw3.models.small_cnn()

    def train(model):
        model.compile(keras.optimizers.Adam(1e-3), LOSS)
        model.fit(data.x_train, data.y_train, batch_size=args.batch_size, epochs=args.dense_epochs, verbose=0)

    loaded = common.cached_weights(model, path, train)
    print(f"dense small CNN: {'loaded' if loaded else 'trained and saved to'} {path}, test accuracy "
          f"{common.accuracy(model, data.x_test, data.y_test):.2%}", flush=True)
    return model.get_weights()


def prune_run(name, args, data, dense_weights, folder):
    """One gradual pruning run of ``name``, through save/load, strip and export; returns its result row."""
    steps_per_epoch, end_step = common.ramp_steps(len(data.y_train), args.batch_size, 0.75 * args.epochs,
                                                  args.frequency)
    keras.utils.set_random_seed(1000 + args.seed)
    model = tfw3.models.small_cnn()
    model.set_weights(dense_weights)
    settings = dict(METHODS[name], **({"num_gradients": 16} if args.quick and name == "woodfisher" else {}))
    schedule = tfw3.GradualSchedule(0.0, args.sparsity, begin_step=0, end_step=end_step, frequency=args.frequency)
    pruned = tfw3.prune(model, schedule, mode="global", seed=args.seed, **settings)
    pruned.compile(keras.optimizers.Adam(5e-4), LOSS)
    fit = dict(batch_size=args.batch_size, shuffle=True, verbose=0)
    started = time.perf_counter()
    first = tfw3.PruningCallback(data.train, LOSS)
    pruned.fit(data.x_train, data.y_train, epochs=args.epochs // 2, callbacks=[first], **fit)

    path = folder / f"{name}_mid_pruning.keras"
    pruned.save(path)
    pruned = keras.saving.load_model(path)  # masks, pruning_step, schedule, config and optimizer state
    print(f"{name}: saved and reloaded {path.name} at step {int(pruned.pruning_step.numpy())} "
          f"(sparsity {first.events[-1]['sparsity']:.2%}, {len(first.events)} events so far)", flush=True)
    second = tfw3.PruningCallback(data.train)  # the loss: the one compiled into the file
    pruned.fit(data.x_train, data.y_train, epochs=args.epochs - args.epochs // 2, callbacks=[second], **fit)
    fit_seconds = time.perf_counter() - started

    stripped = tfw3.strip(pruned)
    events = first.events + second.events
    print(f"\n{name} ({len(events)} events, the last at step {events[-1]['step']}):")
    print(common.markdown_table(["weight", "sparsity"], [[n, common.percent(s, sign=True)]
                                                         for n, s in events[-1]["layers"].items()]))
    export = tfw3.export_tflite(stripped, str(folder / f"{name}.tflite"), check_inputs=data.x_test)
    stripped.save(folder / f"{name}_stripped.keras")
    kernels = common.prunable_kernels(stripped)
    return {"method": name, "sparsity": common.kernel_sparsity(kernels),
            "accuracy": common.accuracy(stripped, data.x_test, data.y_test), "events": len(events),
            "event_seconds": sum(e["seconds"] for e in events), "fit_seconds": fit_seconds,
            "tflite_bytes": export.bytes, "size_ratio": export.size_ratio, "agreement": export.argmax_agreement}


def main(argv=None):
    args = parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    data = common.Mnist(args.data_dir, shuffle_seed=0)
    print(f"MNIST from {data.source}: {len(data.y_train):,} training and {len(data.y_test):,} test images")
    pathlib.Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    dense_weights = dense_model(args, data)
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as tmp:
        rows = [prune_run(name, args, data, dense_weights, pathlib.Path(tmp)) for name in args.methods]
    header = ["method", "sparsity", "test accuracy", "events", "event s", "fit s", ".tflite bytes",
              "of dense", "argmax agreement"]
    cells = [[r["method"], common.percent(r["sparsity"], sign=True), common.percent(r["accuracy"], sign=True),
              r["events"], f"{r['event_seconds']:.1f}", f"{r['fit_seconds']:.1f}", f"{r['tflite_bytes']:,}",
              common.percent(r["size_ratio"], sign=True), common.percent(r["agreement"], sign=True)] for r in rows]
    print(f"\nGradual pruning of the small CNN to {args.sparsity:.0%} with tf_woodfisher.keras3 "
          f"({common.plural(args.epochs, 'epoch')}, seed {args.seed}):\n")
    print(common.markdown_table(header, cells))
    print("\n" + common.produced_by(time.perf_counter() - started))
    return rows


if __name__ == "__main__":
    main()
