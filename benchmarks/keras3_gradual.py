"""Issue 14: gradual WoodFisher pruning of the small CNN through Keras 3 (tfw3) against tf_keras (tfw).

The gradual example's setting (``examples/gradual_pruning_mnist.py``: its defaults are read from its own argument
parser, its dense model is its cached one) run through both stacks, each in its own process (the legacy-Keras
switch is per process):

* ``tfkeras``: ``tfw.prune_woodfisher(tfw.models.small_cnn(), tfw.GradualSchedule(...))`` +
  ``tfw.UpdatePruningStep``;
* ``keras3``: ``tfw3.prune(tfw3.models.small_cnn(), tfw3.GradualSchedule(...))`` + ``tfw3.PruningCallback``.

Both start from the same dense weights (trained once in the tf_keras process by the example's code, cached under
benchmarks/out/, given to the Keras 3 process as NumPy arrays), see the same batches in the same order (for each
epoch a NumPy permutation from the seed, batched into one ``tf.data.Dataset`` given identically to both ``fit``
calls), the same cubic schedule, epochs, Adam learning rate, batch size, WoodFisher settings (method woodfisher,
mode global, 128 gradients of 16 samples, Fisher blocks of 2000, damping 1e-4) and Fisher seed. Target: the
Keras 3 runs reach the tf_keras runs' mean test accuracy (official 10k MNIST test set) within 0.5 points at 90 %
and 95 % (3 seeds). Writes keras3_gradual.{md,csv} (per target) and keras3_gradual_runs.csv (per run).

    python benchmarks/keras3_gradual.py            # 90 % and 95 %, seeds 0 1 2 (about 15 min on 2 cores)
    python benchmarks/keras3_gradual.py --quick    # 90 %, seed 0, 1 epoch, 16 gradients: a smoke test
"""
import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

STACKS = ("tfkeras", "keras3")
STACK = next((sys.argv[i + 1] for i, a in enumerate(sys.argv[:-1]) if a == "--stack"), None)
if STACK == "keras3":
    import tf_woodfisher.keras3 as tfw3  # noqa: F401  (first: Keras 3 stays Keras 3)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402  (after tfw3 in the Keras 3 process: common.keras is Keras 3; else tf_keras)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

keras, tfw = common.keras, common.tfw
EXAMPLE = pathlib.Path(common.REPO_ROOT) / "examples" / "gradual_pruning_mnist.py"
DEFAULT_CACHE = pathlib.Path(common.CACHE_DIR) / "keras3_gradual"  # git-ignored
TARGET_POINTS = 0.5  # |mean Keras 3 − mean tf_keras| allowed, in points of test accuracy
SETTINGS = ("data_dir", "epochs", "ramp_epochs", "frequency", "batch_size", "prune_lr", "num_gradients",
            "fisher_batch_size", "fisher_block_size", "damping", "steps", "dense_epochs", "lr")
STACK_LABELS = {"tfkeras": "tf_keras: tfw.prune_woodfisher + tfw.UpdatePruningStep",
                "keras3": "Keras 3: tfw3.prune + tfw3.PruningCallback"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", help=common.MNIST_HELP)
    parser.add_argument("--targets", type=float, nargs="+", help="target sparsities (default 0.9 0.95; 0.9 with "
                                                                 "--quick)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0 1 2; 0 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 90 %%, seed 0, the example's --quick "
                                                             "(1 dense epoch, 1 pruning epoch, 16 gradients)")
    parser.add_argument("--out", help=f"folder of the results (default {common.RESULTS_DIR}; with --quick "
                                      f"{DEFAULT_CACHE / 'quick'})")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="dense weights and the processes' rows")
    parser.add_argument("--stack", choices=STACKS, help=argparse.SUPPRESS)  # a child process: one stack's runs
    parser.add_argument("--job", help=argparse.SUPPRESS)  # the child's job file (JSON)
    args = parser.parse_args(argv)
    args.targets = args.targets or ([0.9] if args.quick else [0.9, 0.95])
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    args.out = args.out or str(DEFAULT_CACHE / "quick" if args.quick else common.RESULTS_DIR)
    if not all(0 < t < 1 for t in args.targets):
        parser.error("--targets must lie in (0, 1)")
    return args


# ----------------------------------------------------------------------------------------------- one process

def example_settings(job):
    """tf_keras process: the example's resolved defaults (``--quick`` ones with --quick) and its dense model."""
    spec = importlib.util.spec_from_file_location("gradual_pruning_mnist", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example_args = example.parse_args((["--quick"] if job["quick"] else [])
                                      + (["--data-dir", job["data_dir"]] if job["data_dir"] else []))
    mnist = common.Mnist(example_args.data_dir, shuffle_seed=example.DENSE_SEED)
    data = {"train": (mnist.x_train, mnist.y_train), "test": (mnist.x_test, mnist.y_test), "fisher": mnist.train}
    dense, _ = example.dense_model(example_args, data)  # the example's own cache (benchmarks/out/gradual_mnist)
    settings = {name: getattr(example_args, name) for name in SETTINGS}
    settings["dense_seed"] = example.DENSE_SEED
    return settings, dense.get_weights()


def data_order(x, y, seed, settings):
    """The training batches of a run: each epoch a NumPy permutation (from ``seed``), batched; the same for both."""
    rng = np.random.default_rng(1000 + seed)
    epochs = [rng.permutation(len(y)) for _ in range(settings["epochs"])]
    batches = [tf.data.Dataset.from_tensor_slices((x[p], y[p])).batch(settings["batch_size"]) for p in epochs]
    dataset = batches[0]
    for more in batches[1:]:
        dataset = dataset.concatenate(more)
    return dataset


def prune_run(stack, target, seed, settings, data, dense_weights):
    """One gradual pruning run in this process's stack; returns its row."""
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    steps_per_epoch, end_step = common.ramp_steps(len(y_train), settings["batch_size"], settings["ramp_epochs"],
                                                  settings["frequency"])
    ramp = dict(initial_sparsity=0.0, final_sparsity=target, begin_step=0, end_step=end_step, power=3,
                frequency=settings["frequency"])
    woodfisher = dict(method="woodfisher", mode="global", num_gradients=settings["num_gradients"],
                      fisher_batch_size=settings["fisher_batch_size"], fisher_block_size=settings["fisher_block_size"],
                      damping=settings["damping"], steps=settings["steps"], seed=100_000 * seed)
    keras.utils.set_random_seed(1000 + seed)
    api = tfw3 if stack == "keras3" else tfw
    base = api.models.small_cnn()
    base.set_weights(dense_weights)
    if stack == "keras3":
        model = tfw3.prune(base, tfw3.GradualSchedule(**ramp), **woodfisher)
        callback = tfw3.PruningCallback(data["fisher"], common.LOSS)
    else:
        model = tfw.prune_woodfisher(base, tfw.GradualSchedule(**ramp), **woodfisher)
        callback = tfw.UpdatePruningStep(data["fisher"], common.LOSS)
    model.compile(keras.optimizers.Adam(settings["prune_lr"]), common.LOSS)
    batches = data_order(x_train, y_train, seed, settings)
    started = time.perf_counter()
    model.fit(batches, epochs=1, shuffle=False, callbacks=[callback], verbose=0)  # every epoch, in the order given
    fit_seconds = time.perf_counter() - started
    stripped = tfw3.strip(model) if stack == "keras3" else tfw.strip_pruning(model)
    kernels = {layer.name: np.asarray(layer.kernel) for layer in stripped.layers if hasattr(layer, "kernel")}
    row = {"stack": stack, "target_sparsity": target, "seed": seed,
           "sparsity": common.kernel_sparsity(kernels.values()),
           "test_accuracy": common.accuracy(stripped, x_test, y_test), "fit_seconds": fit_seconds,
           "events": len(callback.events), "event_seconds": sum(e["seconds"] for e in callback.events),
           "steps": steps_per_epoch * settings["epochs"], "end_step": end_step,
           **{f"sparsity_{name}": common.kernel_sparsity([k]) for name, k in kernels.items()}}
    print(f"{stack:>8} {target:.0%} seed {seed}: test accuracy {row['test_accuracy']:.2%}, sparsity "
          f"{row['sparsity']:.2%}, fit {fit_seconds:.1f} s ({row['events']} events, {row['event_seconds']:.1f} s)",
          flush=True)
    return row


def child(args):
    """One stack's runs: read the job, write {environment, settings, dense accuracy, rows} next to it."""
    common.quiet_tensorflow()
    job = json.loads(pathlib.Path(args.job).read_text())
    dense_path = pathlib.Path(job["dense"])
    if args.stack == "tfkeras":
        settings, dense_weights = example_settings(job)
        np.savez(dense_path, *dense_weights)
        dense_path.with_suffix(".json").write_text(json.dumps(settings))
    else:  # the tf_keras process's settings and dense weights, as NumPy arrays
        settings = json.loads(dense_path.with_suffix(".json").read_text())
        with np.load(dense_path) as arrays:
            dense_weights = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    mnist = common.Mnist(settings["data_dir"], shuffle_seed=settings["dense_seed"])
    data = {"train": (mnist.x_train, mnist.y_train), "test": (mnist.x_test, mnist.y_test), "fisher": mnist.train}
    dense = (tfw3 if args.stack == "keras3" else tfw).models.small_cnn()
    dense.set_weights(dense_weights)
    dense_accuracy = common.accuracy(dense, mnist.x_test, mnist.y_test)
    print(f"{args.stack}: {common.environment_line()}; dense test accuracy {dense_accuracy:.2%}", flush=True)
    rows = [prune_run(args.stack, target, seed, settings, data, dense_weights)
            for target in job["targets"] for seed in job["seeds"]]
    result = {"environment": common.environment_line(), "settings": settings, "dense_accuracy": dense_accuracy,
              "rows": rows, "num_train": len(mnist.y_train), "num_test": len(mnist.y_test)}
    pathlib.Path(job["result"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------- the parent

def spawn(stack, job, cache):
    """Run one stack's child process (Keras 3 without TF_USE_LEGACY_KERAS) and read what it wrote."""
    job = dict(job, result=str(cache / f"{stack}{'_quick' if job['quick'] else ''}.json"))
    job_path = cache / f"{stack}_job.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ)
    env.pop("TF_USE_LEGACY_KERAS", None)  # set in this process by tf_woodfisher; each child chooses its own
    print(f"--- {STACK_LABELS[stack]}", flush=True)
    subprocess.run([sys.executable, __file__, "--stack", stack, "--job", str(job_path)], env=env, check=True)
    return json.loads(pathlib.Path(job["result"]).read_text())


def summarize(results, targets, seeds):
    """One row per target: mean ± sd per stack, the mean paired difference, fit seconds, whether it is met."""
    rows = []
    for target in targets:
        accuracy = {stack: {r["seed"]: r["test_accuracy"] for r in results[stack]["rows"]
                            if r["target_sparsity"] == target} for stack in STACKS}
        fit = {stack: [r["fit_seconds"] for r in results[stack]["rows"] if r["target_sparsity"] == target]
               for stack in STACKS}
        stats = {stack: common.mean_sd([accuracy[stack][s] for s in seeds]) for stack in STACKS}
        paired = [accuracy["keras3"][s] - accuracy["tfkeras"][s] for s in seeds]
        difference = stats["keras3"][0] - stats["tfkeras"][0]
        rows.append({"target_sparsity": target, "seeds": len(seeds),
                     "tfkeras_mean": stats["tfkeras"][0], "tfkeras_sd": stats["tfkeras"][1],
                     "keras3_mean": stats["keras3"][0], "keras3_sd": stats["keras3"][1],
                     "difference_of_means": difference, "paired_difference_mean": float(np.mean(paired)),
                     "paired_difference_sd": common.mean_sd(paired)[1],
                     "tfkeras_fit_seconds": float(np.mean(fit["tfkeras"])),
                     "keras3_fit_seconds": float(np.mean(fit["keras3"])),
                     "target_met": abs(difference) <= TARGET_POINTS / 100 + 1e-12})
    return rows


def notes(results, args):
    s = results["tfkeras"]["settings"]
    steps = results["tfkeras"]["rows"][0]
    lines = [
        f"* tf_keras process: {results['tfkeras']['environment']}.",
        f"* Keras 3 process: {results['keras3']['environment']}.",
        f"* The setting of `examples/gradual_pruning_mnist.py`{' --quick' if args.quick else ''}: "
        f"`tfw.models.small_cnn()` / `tfw3.models.small_cnn()` from the same dense weights (the example's, "
        f"{common.plural(s['dense_epochs'], 'epoch')} of Adam lr {s['lr']:g}; test accuracy "
        f"{results['tfkeras']['dense_accuracy']:.2%} in tf_keras, {results['keras3']['dense_accuracy']:.2%} in "
        f"Keras 3), trained on the {results['tfkeras']['num_train']:,}-image MNIST subset; accuracy on the official "
        f"{results['tfkeras']['num_test']:,}-image test set.",
        f"* Each run: {common.plural(s['epochs'], 'epoch')} ({steps['steps']} steps) of Adam lr {s['prune_lr']:g}, "
        f"batch {s['batch_size']}, the cubic ramp `GradualSchedule(0, target, 0, {steps['end_step']}, power=3, "
        f"frequency={s['frequency']})` ({common.plural(steps['events'], 'event')}), then fine-tuning at the target; "
        f"`method='woodfisher', mode='global', num_gradients={s['num_gradients']}, "
        f"fisher_batch_size={s['fisher_batch_size']}, fisher_block_size={s['fisher_block_size']}, "
        f"damping={s['damping']:g}, steps={s['steps']}, seed=100000·seed`, Fisher data the training set.",
        "* Data order: for each epoch a NumPy permutation from `default_rng(1000 + seed)`, batched into one "
        "`tf.data.Dataset` that both stacks' `fit` get (no Keras shuffling).",
        f"* Target: |mean Keras 3 − mean tf_keras| ≤ {TARGET_POINTS} points at each target sparsity. Differences and "
        "accuracies in percentage points; paired difference = mean over seeds of (Keras 3 − tf_keras) of the same "
        "seed (equal to the difference of the means), ± its sd. Fit seconds: `model.fit` wall time, pruning "
        "events included. Per run: keras3_gradual_runs.csv.",
    ]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.stack:
        return child(args)
    started = time.perf_counter()
    cache = pathlib.Path(args.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    job = {"quick": args.quick, "data_dir": common.mnist_dir(args.data_dir), "targets": args.targets,
           "seeds": args.seeds, "dense": str(cache / f"dense{'_quick' if args.quick else ''}.npz")}
    results = {stack: spawn(stack, job, cache) for stack in STACKS}  # tf_keras first: it writes the dense weights
    rows = summarize(results, args.targets, args.seeds)
    runs = results["tfkeras"]["rows"] + results["keras3"]["rows"]
    columns = {
        "target": lambda r: f"{r['target_sparsity']:.0%}",
        "tf_keras (tfw)": lambda r: common.mean_sd_text(r["tfkeras_mean"], r["tfkeras_sd"]),
        "Keras 3 (tfw3)": lambda r: common.mean_sd_text(r["keras3_mean"], r["keras3_sd"]),
        "Keras 3 − tf_keras, paired (points)": lambda r: f"{common.points(r['paired_difference_mean'])} ± "
                                                        f"{common.percent(r['paired_difference_sd'])}",
        "fit s (tf_keras / Keras 3)": lambda r: f"{r['tfkeras_fit_seconds']:.1f} / {r['keras3_fit_seconds']:.1f}",
        f"target (≤ {TARGET_POINTS} points)": lambda r: "met" if r["target_met"] else "**NOT met**",
    }
    common.write_results("keras3_gradual", rows, "Gradual WoodFisher pruning of the small CNN: Keras 3 (tfw3) "
                         f"against tf_keras (tfw), test accuracy (%) over {common.plural(len(args.seeds), 'seed')}",
                         notes(results, args), columns, started, out=args.out)
    common.write_csv(os.path.join(args.out, "keras3_gradual_runs.csv"), runs, float_format=".6g")
    print(f"wrote {args.out}/keras3_gradual.md, keras3_gradual.csv, keras3_gradual_runs.csv", flush=True)
    return rows


if __name__ == "__main__":
    main()
