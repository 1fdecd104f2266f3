"""Gradual pruning of the small CNN on MNIST: tfmot's prune_low_magnitude against tfw.prune_woodfisher.

Trains the small CNN (``tfw.models.small_cnn``, two Conv2D and two Dense layers) on the 5k MNIST
training subset (shuffled with seed 0; the dense weights are cached under benchmarks/out/, which git
ignores), then, for each target sparsity and seed, prunes a copy of it gradually during ``model.fit``:

* ``magnitude``: tfmot's ``prune_low_magnitude`` (every layer pruned to the target: per layer);
* ``woodfisher``: ``tfw.prune_woodfisher(method='woodfisher', mode='global')`` (one global threshold
  on the WoodFisher scores, OBS update of the remaining weights at each pruning event);
* ``magnitude_global``: ``tfw.prune_woodfisher(method='magnitude', mode='global')``, the
  global-magnitude baseline that separates the effect of "global" from that of "WoodFisher".

Every method gets the same schedule (tfmot's cubic PolynomialDecay ramp from 0 to the target, a pruning
event every ``--frequency`` steps during the first ``--ramp-epochs`` epochs; ``tfw.GradualSchedule``
is the same ramp for WoodFisher), the same epochs, optimizer (Adam), batch size and seeds. A seed picks
the data order of the fine-tuning and the Fisher samples; the dense starting model is the same for all.
Each pruned model is exported with ``tfw.export_tflite`` (float32, sparse=True), verified on the 10k
test images. Writes gradual_mnist.csv (one row per run), gradual_mnist.md (tables, with the command at
the top) and gradual_mnist.png (accuracy and ``.tflite`` size against sparsity) to --out.

    python examples/gradual_pruning_mnist.py                  # 90/95/98 %, 3 seeds (about 15 min on 2 cores)
    python examples/gradual_pruning_mnist.py --quick --out /tmp/gradual   # smoke test, about 40 s
"""
import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts' helpers
import common  # noqa: E402  (first: imports tf_woodfisher before TensorFlow)
import tf_woodfisher as tfw  # noqa: E402  (sets TF_USE_LEGACY_KERAS=1: tf.keras is tf_keras)
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402

DEFAULT_OUT = pathlib.Path(common.RESULTS_DIR)
DEFAULT_CACHE = pathlib.Path(common.CACHE_DIR) / "gradual_mnist"  # git-ignored
LOSS = common.LOSS
METHODS = ("magnitude", "woodfisher", "magnitude_global")
LABELS = {"magnitude": "tfmot prune_low_magnitude (per layer)",
          "woodfisher": "tfw.prune_woodfisher WoodFisher (global)",
          "magnitude_global": "tfw.prune_woodfisher magnitude (global)"}
DENSE_SEED = 0  # initial weights and data order of the dense model, and the shuffling of the 5k subset
TARGET_GAIN = 1.0  # points of accuracy WoodFisher must gain over magnitude at 95 % and 98 %
TARGET_SIZE_RATIO = 0.30  # sparse .tflite / dense .tflite at 90 %


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", help=common.MNIST_HELP)
    parser.add_argument("--sparsities", type=float, nargs="+", metavar="S", help="target sparsities in (0, 1) "
                        "(default 0.9 0.95 0.98; 0.9 with --quick)")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="seeds of the pruning runs (default 0 1 2; 0 with --quick)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="methods to compare (default: all three; "
                        "magnitude and woodfisher with --quick)")
    parser.add_argument("--epochs", type=int, help="epochs of each pruning run: ramp + fine-tuning at the final "
                                                   "sparsity (default 6; 1 with --quick)")
    parser.add_argument("--ramp-epochs", type=float, help="epochs over which the sparsity ramps up (default: half "
                                                          "of --epochs)")
    parser.add_argument("--frequency", type=int, help="steps between pruning events (default 20)")
    parser.add_argument("--dense-epochs", type=int, help="epochs of the dense model (default 10; 1 with --quick)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the dense training")
    parser.add_argument("--prune-lr", type=float, default=5e-4, help="Adam learning rate of the pruning runs")
    wf = parser.add_argument_group("WoodFisher settings")
    wf.add_argument("--num-gradients", type=int, help="Fisher gradients per event (default 128; 16 with --quick)")
    wf.add_argument("--fisher-batch-size", type=int, default=16, help="samples averaged into each gradient")
    wf.add_argument("--fisher-block-size", type=int, default=2000, help="block size of the block-diagonal Fisher")
    wf.add_argument("--damping", type=float, default=1e-4)
    wf.add_argument("--steps", type=int, default=1, help="Fisher recomputations per pruning event")
    parser.add_argument("--quick", action="store_true", help="smoke test: 90 %%, seed 0, 1 dense epoch, 1 pruning "
                                                             "epoch, 16 Fisher gradients")
    parser.add_argument("--out", help=f"folder of the csv/md/png (default {DEFAULT_OUT}; with --quick nothing is "
                                      "written unless --out is given)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="dense weights and .tflite files")
    parser.add_argument("--verbose", type=int, default=0, help="Keras fit verbosity")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(sparsities=[0.9] if quick else [0.9, 0.95, 0.98], seeds=[0] if quick else [0, 1, 2],
                    epochs=1 if quick else 6, frequency=20, dense_epochs=1 if quick else 10,
                    num_gradients=16 if quick else 128,
                    methods=["magnitude", "woodfisher"] if quick else list(METHODS))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.ramp_epochs is None:
        args.ramp_epochs = args.epochs / 2
    if args.out is None and not quick:
        args.out = str(DEFAULT_OUT)
    if not all(0 < s < 1 for s in args.sparsities):
        parser.error("sparsities must lie in (0, 1)")
    if not 0 < args.ramp_epochs <= args.epochs:
        parser.error("--ramp-epochs must lie in (0, --epochs]")
    return args


def kernel_sparsities(model):
    """{layer name: fraction of zeros in its kernel} of a stripped model, and the overall fraction."""
    kernels = {layer.name: layer.kernel for layer in model.layers if hasattr(layer, "kernel")}
    per_layer = {name: common.kernel_sparsity([kernel]) for name, kernel in kernels.items()}
    return per_layer, common.kernel_sparsity(kernels.values())


def dense_model(args, data):
    """The trained dense small CNN, from the cache when the same settings trained it before."""
    x_train, y_train = data["train"]
    key = f"small_cnn_n{len(y_train)}_e{args.dense_epochs}_bs{args.batch_size}_lr{args.lr:g}_seed{DENSE_SEED}"
    path = pathlib.Path(args.cache_dir) / f"{key}.weights.h5"
    keras.utils.set_random_seed(DENSE_SEED)
    model = tfw.models.small_cnn()

    def train(model):
        model.compile(keras.optimizers.Adam(args.lr), LOSS, metrics=["accuracy"])
        model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.dense_epochs, shuffle=True,
                  verbose=args.verbose)

    started = time.perf_counter()
    if common.cached_weights(model, path, train):
        print(f"dense model: loaded {path}", flush=True)
        return model, 0.0
    seconds = time.perf_counter() - started
    print(f"dense model: trained {args.dense_epochs} epochs in {seconds:.1f} s, saved to {path}", flush=True)
    return model, seconds


def schedule_steps(args, num_train):
    """(steps per epoch, end_step): the ramp's last event falls on a multiple of the frequency."""
    return common.ramp_steps(num_train, args.batch_size, args.ramp_epochs, args.frequency)


def prune_run(method, target, seed, args, data, dense_weights):
    """One gradual pruning run; returns its result row (a dict)."""
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    _, end_step = schedule_steps(args, len(y_train))
    keras.utils.set_random_seed(1000 + seed)  # the data order of this run
    base = tfw.models.small_cnn()
    base.set_weights(dense_weights)
    ramp = dict(initial_sparsity=0.0, final_sparsity=target, begin_step=0, end_step=end_step, power=3,
                frequency=args.frequency)
    if method == "magnitude":
        model = tfmot.sparsity.keras.prune_low_magnitude(base, tfmot.sparsity.keras.PolynomialDecay(**ramp))
        callback = tfmot.sparsity.keras.UpdatePruningStep()
    else:
        settings = (dict(method="woodfisher", num_gradients=args.num_gradients,
                         fisher_batch_size=args.fisher_batch_size, fisher_block_size=args.fisher_block_size,
                         damping=args.damping, steps=args.steps)
                    if method == "woodfisher" else dict(method="magnitude"))
        model = tfw.prune_woodfisher(base, tfw.GradualSchedule(**ramp), mode="global", seed=100_000 * seed,
                                     **settings)
        callback = tfw.UpdatePruningStep(data["fisher"], LOSS)
    model.compile(keras.optimizers.Adam(args.prune_lr), LOSS, metrics=["accuracy"])
    started = time.perf_counter()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, callbacks=[callback],
              verbose=args.verbose)
    fit_seconds = time.perf_counter() - started
    events = getattr(callback, "events", None)

    stripped = tfw.strip_pruning(model)
    layers, sparsity = kernel_sparsities(stripped)
    test_accuracy = common.accuracy(stripped, x_test, y_test)
    tflite_path = pathlib.Path(args.cache_dir) / f"{method}_s{target:g}_seed{seed}.tflite"
    started = time.perf_counter()
    export = tfw.export_tflite(model, str(tflite_path), sparse=True, quantization=None, check_inputs=x_test)
    export_seconds = time.perf_counter() - started
    row = {"method": method, "target_sparsity": target, "seed": seed, "sparsity": sparsity,
           "test_accuracy": test_accuracy, **{f"sparsity_{name}": value for name, value in layers.items()},
           "tflite_dense_bytes": export.dense_bytes, "tflite_sparse_bytes": export.bytes,
           "tflite_size_ratio": export.size_ratio, "tflite_argmax_agreement": export.argmax_agreement,
           "tflite_max_abs_error": export.max_abs_error, "fit_seconds": fit_seconds,
           "pruning_events": len(events) if events is not None else count_events(model),
           "woodfisher_event_seconds": sum(e["seconds"] for e in events) if events is not None else float("nan"),
           "export_seconds": export_seconds}
    print(f"{method:>16} {target:.0%} seed {seed}: test accuracy {test_accuracy:.2%}, sparsity {sparsity:.2%} "
          f"({', '.join(f'{k} {v:.1%}' for k, v in layers.items())}), fit {fit_seconds:.1f} s"
          + (f" (WoodFisher events {row['woodfisher_event_seconds']:.1f} s)" if method == "woodfisher" else "")
          + f", .tflite {export.bytes:,} / {export.dense_bytes:,} B, argmax agreement {export.argmax_agreement:.2%}",
          flush=True)
    return row


def count_events(model):
    """Pruning steps tfmot's schedule fired during training (steps 1 … pruning_step)."""
    wrapper = next(layer for layer in model.layers if hasattr(layer, "pruning_step"))
    last = int(wrapper.pruning_step.numpy())
    return sum(bool(wrapper.pruning_schedule(tf.constant(step, tf.int64))[0]) for step in range(1, last + 1))


def summarize(rows, args):
    """{(method, target): aggregated dict} over seeds."""
    groups = {}
    for row in rows:
        groups.setdefault((row["method"], row["target_sparsity"]), []).append(row)
    summary = {}
    for key, group in groups.items():
        acc_mean, acc_sd = common.mean_sd([r["test_accuracy"] for r in group])
        layer_keys = [k for k in group[0] if k.startswith("sparsity_")]
        summary[key] = {
            "accuracy": (acc_mean, acc_sd), "n": len(group),
            "sparsity": float(np.mean([r["sparsity"] for r in group])),
            "layers": {k[len("sparsity_"):]: float(np.mean([r[k] for r in group])) for k in layer_keys},
            "dense_bytes": float(np.mean([r["tflite_dense_bytes"] for r in group])),
            "sparse_bytes": float(np.mean([r["tflite_sparse_bytes"] for r in group])),
            "ratio": float(np.mean([r["tflite_size_ratio"] for r in group])),
            "agreement": min(r["tflite_argmax_agreement"] for r in group),
            "fit_seconds": float(np.mean([r["fit_seconds"] for r in group])),
            "event_seconds": float(np.mean([r["woodfisher_event_seconds"] for r in group])),
            "events": group[0]["pruning_events"],
        }
    return summary


def targets(summary, args):
    """Lines stating whether each target of the benchmark is met (only those the run can check)."""
    lines = []
    for target in (0.95, 0.98):
        if ("magnitude", target) in summary and ("woodfisher", target) in summary:
            gain = summary["woodfisher", target]["accuracy"][0] - summary["magnitude", target]["accuracy"][0]
            lines.append(f"WoodFisher − magnitude at {target:.0%}: {common.points(gain)} points "
                         f"(target ≥ +{TARGET_GAIN:.1f}): "
                         f"{'met' if 100 * gain >= TARGET_GAIN else 'NOT met'}")
    for (method, target), s in sorted(summary.items()):
        if abs(target - 0.9) < 1e-9:
            ok = s["ratio"] <= TARGET_SIZE_RATIO and s["agreement"] == 1.0
            lines.append(f"{method} at 90%: sparse .tflite {s['ratio']:.1%} of dense "
                         f"(target ≤ {TARGET_SIZE_RATIO:.0%}), "
                         f"argmax agreement with Keras on the test set {s['agreement']:.2%} (target 100%): "
                         f"{'met' if ok else 'NOT met'}")
    return lines


def markdown(rows, summary, args, info):
    methods = [m for m in args.methods if any(key[0] == m for key in summary)]
    layer_names = list(next(iter(summary.values()))["layers"])
    seeds = ", ".join(str(s) for s in args.seeds)
    steps_per_epoch, end_step = info["steps_per_epoch"], info["end_step"]
    lines = [
        "# Gradual pruning of the small CNN on MNIST: tfmot magnitude vs WoodFisher",
        "",
        "```",
        info["command"],
        "```",
        "",
        f"{info['environment']}. Total run time {info['total_seconds'] / 60:.1f} min.",
        "",
        f"* Data: the 5k MNIST training subset ({info['num_train']:,} images, shuffled with seed {DENSE_SEED}) for "
        f"training and Fisher samples; accuracy on the official {info['num_test']:,}-image test set.",
        f"* Dense model: `tfw.models.small_cnn()` (two Conv2D, two Dense; {info['num_kernel']:,} kernel weights), "
        f"Adam lr {args.lr:g}, batch {args.batch_size}, {common.plural(args.dense_epochs, 'epoch')}: test accuracy "
        f"{info['dense_accuracy']:.2%}. It is the starting point of every run.",
        f"* Pruning runs: {common.plural(args.epochs, 'epoch')} ({steps_per_epoch} steps each), "
        f"Adam lr {args.prune_lr:g}, batch "
        f"{args.batch_size}. Sparsity follows the cubic ramp (tfmot `PolynomialDecay`, power 3; "
        f"`tfw.GradualSchedule` for tfw) from 0 to the target, a pruning event every {args.frequency} steps up to "
        f"step {end_step} ({end_step / steps_per_epoch:.1f} epochs), then fine-tuning at the target to the end. "
        f"Seeds {seeds}: a seed sets the data order and the Fisher samples.",
        f"* WoodFisher: `tfw.prune_woodfisher(model, schedule, method='woodfisher', mode='global', "
        f"num_gradients={args.num_gradients}, fisher_batch_size={args.fisher_batch_size}, "
        f"fisher_block_size={args.fisher_block_size}, damping={args.damping:g}, steps={args.steps})` "
        "(Fisher data: `tfw.UpdatePruningStep(fisher_dataset, loss)`), one global threshold over all kernels, "
        "OBS update at each event.",
        "* Magnitude: `tfmot.sparsity.keras.prune_low_magnitude`, which prunes every layer to the target "
        "(per layer)." + (" `magnitude_global`: `tfw.prune_woodfisher(method='magnitude', mode='global')`, "
                          "one global magnitude threshold." if "magnitude_global" in methods else ""),
        "* Sparsity: fraction of zeros in the Dense and Conv2D kernels (biases are not pruned). `.tflite`: "
        "`tfw.export_tflite(model, path, sparse=True)` (float32), verified under XNNPACK against the Keras model "
        "on the test images; dense = the same conversion without `EXPERIMENTAL_SPARSITY`.",
        "",
        f"## Test accuracy (mean ± sd over {common.plural(len(args.seeds), 'seed')}); dense "
        f"{info['dense_accuracy']:.2%}",
        "",
    ]
    targets_sorted = sorted({key[1] for key in summary})
    header = ["method"] + [f"{t:.0%}" for t in targets_sorted]
    table = [[f"{m} — {LABELS[m]}"] + [fmt_acc(summary.get((m, t))) for t in targets_sorted] for m in methods]
    for baseline in ("magnitude", "magnitude_global"):
        if baseline in methods and "woodfisher" in methods:
            table.append([f"woodfisher − {baseline} (points)"] + [
                common.points(summary["woodfisher", t]["accuracy"][0] - summary[baseline, t]["accuracy"][0])
                if ("woodfisher", t) in summary and (baseline, t) in summary else "" for t in targets_sorted])
    lines += [common.markdown_table(header, table), "", "## Per run (means over seeds)", ""]
    header = (["method", "target", "sparsity", "test accuracy"] + [f"{name}" for name in layer_names]
              + [".tflite dense (B)", ".tflite sparse (B)", "sparse/dense", "argmax agreement (min)",
                 "events", "fit time (s)", "tfw pruning events (s)"])
    table = []
    for m in methods:
        for t in targets_sorted:
            s = summary.get((m, t))
            if s is None:
                continue
            table.append([m, f"{t:.0%}", f"{s['sparsity']:.2%}", fmt_acc(s)]
                         + [f"{s['layers'][name]:.1%}" for name in layer_names]
                         + [f"{s['dense_bytes']:,.0f}", f"{s['sparse_bytes']:,.0f}", f"{s['ratio']:.1%}",
                            f"{s['agreement']:.2%}", str(s["events"]), f"{s['fit_seconds']:.1f}",
                            "—" if np.isnan(s["event_seconds"]) else f"{s['event_seconds']:.1f}"])
    lines.append(common.markdown_table(header, table))
    lines += ["", "Layer sizes (kernel weights): " + ", ".join(f"{k} {v:,}" for k, v in info["layer_sizes"].items())
              + ". Fit time = `model.fit` wall time (training and pruning events); tfw pruning events = sum of "
              "`seconds` over `tfw.UpdatePruningStep().events` (for WoodFisher: gradients, inverse Fisher, scores, "
              "OBS update); tfmot's mask updates run inside the training steps and are not timed apart. "
              "The TFLite converter stores a sparse kernel in 1×4 blocks (zeros inside a nonzero block are "
              "stored) when that format keeps most of the sparsity, so a sparser model can give a larger file.",
              "", "## Targets", ""] + [f"* {line}" for line in targets(summary, args)] + [""]
    return "\n".join(lines)


def fmt_acc(s):
    """'mean ± sd' of the test accuracy of a summary entry, in percent ('' for None)."""
    return "" if s is None else common.mean_sd_text(*s["accuracy"])


def plot(summary, args, info, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no plot", flush=True)
        return False
    fig, (ax_acc, ax_size) = plt.subplots(1, 2, figsize=(10, 4))
    for method in args.methods:
        keys = sorted(t for m, t in summary if m == method)
        if not keys:
            continue
        x = [100 * t for t in keys]
        mean = [100 * summary[method, t]["accuracy"][0] for t in keys]
        sd = [100 * summary[method, t]["accuracy"][1] for t in keys]
        ax_acc.errorbar(x, mean, yerr=sd, marker="o", capsize=3, label=LABELS[method])
        ax_size.plot(x, [summary[method, t]["sparse_bytes"] / 1024 for t in keys], marker="o", label=LABELS[method])
    ax_acc.axhline(100 * info["dense_accuracy"], color="gray", linestyle="--", label="dense")
    ax_acc.set(xlabel="target sparsity (%)", ylabel="test accuracy (%)",
               title=f"small CNN, MNIST 5k, {args.epochs} epochs of gradual pruning")
    dense_kb = np.mean([s["dense_bytes"] for s in summary.values()]) / 1024
    ax_size.axhline(dense_kb, color="gray", linestyle="--", label="dense .tflite")
    ax_size.set(xlabel="target sparsity (%)", ylabel=".tflite size (KiB)", title="float32 .tflite, sparse=True",
                ylim=(0, None))
    ax_acc.legend(fontsize=8)
    ax_size.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    args = parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    mnist = common.Mnist(args.data_dir, shuffle_seed=DENSE_SEED)
    (x_train, y_train), (x_test, y_test) = (mnist.x_train, mnist.y_train), (mnist.x_test, mnist.y_test)
    data = {"train": (x_train, y_train), "test": (x_test, y_test), "fisher": mnist.train}
    steps_per_epoch, end_step = schedule_steps(args, len(y_train))
    print(f"MNIST from {mnist.source}: {len(y_train):,} training, {len(y_test):,} test images; "
          f"{steps_per_epoch} steps per epoch, ramp to step {end_step}, pruning every {args.frequency} steps",
          flush=True)
    pathlib.Path(args.cache_dir).mkdir(parents=True, exist_ok=True)

    dense, dense_seconds = dense_model(args, data)
    dense_accuracy = common.accuracy(dense, x_test, y_test)
    dense_weights = dense.get_weights()
    print(f"dense model: test accuracy {dense_accuracy:.2%}", flush=True)

    rows = []
    for target in args.sparsities:
        for method in args.methods:
            for seed in args.seeds:
                rows.append(prune_run(method, target, seed, args, data, dense_weights))

    summary = summarize(rows, args)
    info = {"command": common.command_line(argv, script=__file__), "environment": common.environment_line(),
            "num_train": len(y_train),
            "num_test": len(y_test), "dense_accuracy": dense_accuracy, "dense_seconds": dense_seconds,
            "steps_per_epoch": steps_per_epoch, "end_step": end_step,
            "layer_sizes": {layer.name: int(layer.kernel.shape.num_elements())
                            for layer in dense.layers if hasattr(layer, "kernel")},
            "total_seconds": time.perf_counter() - started}
    info["num_kernel"] = sum(info["layer_sizes"].values())
    text = markdown(rows, summary, args, info)
    print("\n" + text)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        common.write_csv(out / "gradual_mnist.csv", rows, float_format=".6g")
        (out / "gradual_mnist.md").write_text(text)
        plotted = plot(summary, args, info, out / "gradual_mnist.png")
        print(f"wrote {out / 'gradual_mnist.csv'}, {out / 'gradual_mnist.md'}"
              + (f", {out / 'gradual_mnist.png'}" if plotted else ""), flush=True)
    print(f"total time {time.perf_counter() - started:.0f} s", flush=True)
    return rows, summary


if __name__ == "__main__":
    main()
