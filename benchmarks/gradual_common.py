"""The shared body of the gradual-pruning examples (examples/gradual_pruning_mnist.py and
examples/gradual_pruning_cifar10.py): tfmot's ``prune_low_magnitude`` against ``tfw.prune_woodfisher`` in
``model.fit`` on the same schedule, then a verified sparse ``.tflite`` export.

Here: the options both take (:func:`make_parser`, :func:`finish_args`), one pruning run (:func:`prune_run`),
the summary over seeds (:func:`summarize`), the target lines (:func:`target_lines`), the result tables of the
markdown (:func:`result_sections`), the plot (:func:`plot`) and the files written (:func:`write_outputs`). An
example supplies what differs in a :class:`Setup`: the dense start, which layers are pruned, the training
input, the optimizer, the Fisher data and the test set. Import it after ``common`` (which imports
tf_woodfisher before TensorFlow); the examples put this folder on ``sys.path``.
"""
import argparse
import dataclasses
import pathlib
import time
from typing import Callable, Optional, Sequence

import common  # first: imports tf_woodfisher before TensorFlow
import tf_woodfisher as tfw
import tensorflow as tf
import tf_keras as keras
import numpy as np
import tensorflow_model_optimization as tfmot

METHODS = ("magnitude", "woodfisher", "magnitude_global", "woodfisher_layerwise")
LABELS = {"magnitude": "tfmot prune_low_magnitude (per layer)",
          "woodfisher": "tfw.prune_woodfisher WoodFisher (global)",
          "magnitude_global": "tfw.prune_woodfisher magnitude (global)",
          "woodfisher_layerwise": "tfw.prune_woodfisher WoodFisher (per layer)"}
WOODFISHER = ("woodfisher", "woodfisher_layerwise")  # the methods with Fisher events
BASELINES = ("magnitude", "magnitude_global")
MAX_LAYER_COLUMNS = 6  # more pruned layers than this: their sparsities go to a table of their own (layers as rows)


# ----------------------------------------------------------------------------------------------- options

def _value_text(value):
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) if isinstance(value, list) \
        else str(value)


def make_parser(doc, data_help, full, quick, fixed, quick_help, out_default, cache_default):
    """The options both examples take; the caller adds its own and then calls :func:`finish_args`.

    Args:
        doc: the script's docstring (its first paragraph is the description).
        data_help: help of --data-dir.
        full, quick: {dest: default} of the full run and of --quick for sparsities, seeds, methods, epochs,
            frequency and num_gradients (filled in by :func:`finish_args`, so the help names both).
        fixed: {dest: default} of batch_size, prune_lr, fisher_batch_size, fisher_block_size, damping and steps
            (and optionally fisher_block_order, default 'flat').
        quick_help: help of --quick.
        out_default, cache_default: default folders of the csv/md/png and of the .tflite files.

    Returns:
        An ``argparse.ArgumentParser``.
    """
    def default(name, what=""):
        text = f"default {what or _value_text(full[name])}"
        if full[name] != quick[name]:
            text += f"; {_value_text(quick[name])} with --quick"
        return f"({text})"

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", help=data_help)
    parser.add_argument("--sparsities", type=float, nargs="+", metavar="S",
                        help=f"target sparsities in (0, 1) {default('sparsities')}")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"seeds of the pruning runs {default('seeds')}")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help=f"methods to compare {default('methods')}")
    parser.add_argument("--epochs", type=int, help="epochs of each pruning run: ramp + fine-tuning at the final "
                                                   f"sparsity {default('epochs')}")
    ramp_full, ramp_quick = full.get("ramp_fraction", 0.5), quick.get("ramp_fraction", 0.5)
    parser.add_argument("--ramp-epochs", type=float, help="epochs over which the sparsity ramps up (default: "
                        f"{ramp_full:g} × --epochs" + ("" if ramp_quick == ramp_full else
                                                       f"; {ramp_quick:g} × with --quick") + ")")
    parser.add_argument("--frequency", type=int, help=f"steps between pruning events {default('frequency')}")
    parser.add_argument("--batch-size", type=int, default=fixed["batch_size"])
    parser.add_argument("--prune-lr", type=float, default=fixed["prune_lr"],
                        help="learning rate of the pruning runs")
    wf = parser.add_argument_group("WoodFisher settings")
    wf.add_argument("--num-gradients", type=int, help=f"Fisher gradients per event {default('num_gradients')}")
    wf.add_argument("--fisher-batch-size", type=int, default=fixed["fisher_batch_size"],
                    help="samples averaged into each gradient")
    wf.add_argument("--fisher-block-size", type=block_size, default=fixed["fisher_block_size"],
                    help="Fisher block size: an int, 'layer' (one block per layer) or 'model' (one block for all)")
    wf.add_argument("--fisher-block-order", choices=("flat", "filter"), default=fixed.get("fisher_block_order", "flat"),
                    help="how an int --fisher-block-size cuts a kernel: 'filter' = chunks of whole filters")
    wf.add_argument("--damping", type=float, default=fixed["damping"])
    wf.add_argument("--steps", type=int, default=fixed["steps"], help="Fisher recomputations per pruning event")
    wf.add_argument("--no-update", dest="update", action="store_false",
                    help="WoodFisher scores without the OBS weight update of the remaining weights")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", help=f"folder of the csv/md/png (default {out_default}; with --quick nothing is "
                                      "written unless --out is given)")
    parser.add_argument("--cache-dir", default=str(cache_default), help=".tflite files (and cached weights)")
    parser.add_argument("--resume", action="store_true", help="keep the runs (method, target, seed) already in the "
                        "csv under --out, from a run with the same settings, and run only the others")
    parser.add_argument("--verbose", type=int, default=0, help="Keras fit verbosity")
    parser.set_defaults(_full=full, _quick=quick, _out_default=str(out_default))
    return parser


def block_size(text):
    """--fisher-block-size: an int ≥ 1, 'layer' (None: one block per layer) or 'model' (one block for all)."""
    if text in ("layer", "none", "None"):
        return None
    if text == "model":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, 'layer' or 'model', got {text!r}") from None


def finish_args(parser, argv=None):
    """Parse ``argv`` and fill in the full-run or --quick defaults, the ramp and --out; exits on bad values."""
    args = parser.parse_args(argv)
    defaults = args._quick if args.quick else args._full
    for name, value in defaults.items():
        if name != "ramp_fraction" and getattr(args, name, None) is None:
            setattr(args, name, list(value) if isinstance(value, (list, tuple)) else value)
    if args.ramp_epochs is None:
        args.ramp_epochs = args.epochs * defaults.get("ramp_fraction", 0.5)
    if args.out is None and not args.quick:
        args.out = args._out_default
    if not all(0 < s < 1 for s in args.sparsities):
        parser.error("sparsities must lie in (0, 1)")
    if not 0 < args.ramp_epochs <= args.epochs:
        parser.error("--ramp-epochs must lie in (0, --epochs]")
    return args


# ----------------------------------------------------------------------------------------------- one run

@dataclasses.dataclass
class Setup:
    """What an example supplies to :func:`prune_run`.

    build: () → the dense starting model (a fresh model holding the start weights).
    fit: (model, callback, seed) → None: runs ``model.fit`` for ``args.epochs`` epochs with ``callback``.
    optimizer: () → a new Keras optimizer for one run.
    fisher: the Fisher data of ``tfw.UpdatePruningStep`` (a ``tf.data.Dataset``).
    x_test, y_test: the test set (accuracy, and the inputs ``tfw.export_tflite`` verifies on).
    num_train: training examples per epoch (for the steps of the ramp).
    layers: names of the layers to prune (each wrapped on its own in a ``clone_model``), or None to wrap the
        whole model as ``prune_low_magnitude(model)`` does.
    """

    build: Callable
    fit: Callable
    optimizer: Callable
    fisher: tf.data.Dataset
    x_test: np.ndarray
    y_test: np.ndarray
    num_train: int
    layers: Optional[Sequence[str]] = None
    export_seeds: Optional[Sequence[int]] = None  # export .tflite files for these seeds only (None: every run)


def schedule_steps(args, num_train):
    """(steps per epoch, end_step): the ramp's last event falls on a multiple of the frequency."""
    return common.ramp_steps(num_train, args.batch_size, args.ramp_epochs, args.frequency)


def woodfisher_settings(method, args):
    """The ``tfw.prune_woodfisher`` overrides of ``method`` (any of METHODS but 'magnitude')."""
    if method not in WOODFISHER:
        return dict(method="magnitude", mode="global")
    return dict(method="woodfisher", mode="layerwise" if method == "woodfisher_layerwise" else "global",
                num_gradients=args.num_gradients, fisher_batch_size=args.fisher_batch_size,
                fisher_block_size=args.fisher_block_size, fisher_block_order=args.fisher_block_order,
                damping=args.damping, steps=args.steps, update=args.update)


def wrap_for_pruning(method, base, ramp, seed, args, setup):
    """(model wrapped for ``method``, its callback): tfmot's or tfw's wrappers on the same ramp."""
    if method == "magnitude":
        schedule = tfmot.sparsity.keras.PolynomialDecay(**ramp)

        def wrap(layer):
            return tfmot.sparsity.keras.prune_low_magnitude(layer, schedule)

        callback = tfmot.sparsity.keras.UpdatePruningStep()
    else:
        schedule = tfw.GradualSchedule(**ramp)
        settings = woodfisher_settings(method, args)

        def wrap(layer):
            return tfw.prune_woodfisher(layer, schedule, seed=100_000 * seed, **settings)

        callback = tfw.UpdatePruningStep(setup.fisher, common.LOSS)
    if setup.layers is None:
        return wrap(base), callback
    names = set(setup.layers)
    model = keras.models.clone_model(base, clone_function=lambda layer: wrap(layer) if layer.name in names else layer)
    return model, callback


def kernel_sparsities(model, names=None):
    """{layer name: fraction of zeros in its kernel} of a stripped model (the layers ``names``, default every
    layer with a kernel), and the fraction over those kernels."""
    kernels = {layer.name: layer.kernel for layer in model.layers
               if hasattr(layer, "kernel") and (names is None or layer.name in names)}
    per_layer = {name: common.kernel_sparsity([kernel]) for name, kernel in kernels.items()}
    return per_layer, common.kernel_sparsity(kernels.values())


def prune_run(method, target, seed, args, setup):
    """One gradual pruning run of ``method`` to ``target`` with ``seed``; returns its result row (a dict)."""
    _, end_step = schedule_steps(args, setup.num_train)
    keras.utils.set_random_seed(1000 + seed)  # the data order of this run
    base = setup.build()
    ramp = dict(initial_sparsity=0.0, final_sparsity=target, begin_step=0, end_step=end_step, power=3,
                frequency=args.frequency)
    model, callback = wrap_for_pruning(method, base, ramp, seed, args, setup)
    model.compile(setup.optimizer(), common.LOSS, metrics=["accuracy"])
    started = time.perf_counter()
    setup.fit(model, callback, seed)
    fit_seconds = time.perf_counter() - started
    events = getattr(callback, "events", None)

    stripped = tfw.strip_pruning(model)
    layers, sparsity = kernel_sparsities(stripped, setup.layers)
    extra = {} if setup.layers is None else {"all_kernels_sparsity": kernel_sparsities(stripped)[1]}
    test_accuracy = common.accuracy(stripped, setup.x_test, setup.y_test)
    row = {"method": method, "target_sparsity": target, "seed": seed, "sparsity": sparsity, **extra,
           "test_accuracy": test_accuracy, **{f"sparsity_{name}": value for name, value in layers.items()},
           **export_fields(model, method, target, seed, args, setup), "fit_seconds": fit_seconds,
           "pruning_events": len(events) if events is not None else count_events(model),
           "woodfisher_event_seconds": sum(e["seconds"] for e in events) if events is not None else float("nan")}
    row["export_seconds"] = row.pop("export_seconds")
    exported = not np.isnan(row["tflite_sparse_bytes"])
    print(f"{method:>16} {target:.0%} seed {seed}: test accuracy {test_accuracy:.2%}, sparsity {sparsity:.2%} "
          f"({', '.join(f'{k} {v:.1%}' for k, v in layers.items())}), fit {fit_seconds:.1f} s"
          + (f" (WoodFisher events {row['woodfisher_event_seconds']:.1f} s)" if method in WOODFISHER else "")
          + (f", .tflite {row['tflite_sparse_bytes']:,} / {row['tflite_dense_bytes']:,} B, argmax agreement "
             f"{row['tflite_argmax_agreement']:.2%}" if exported else ", not exported"),
          flush=True)
    return row


def export_fields(model, method, target, seed, args, setup):
    """The .tflite columns of a run's row: ``tfw.export_tflite`` (float32, sparse, verified on the test inputs)
    to <cache-dir>/<method>_s<target>_seed<seed>.tflite, or NaNs when ``setup.export_seeds`` leaves it out."""
    names = ("tflite_dense_bytes", "tflite_sparse_bytes", "tflite_size_ratio", "tflite_argmax_agreement",
             "tflite_max_abs_error", "export_seconds")
    if setup.export_seeds is not None and seed not in setup.export_seeds:
        return dict.fromkeys(names, float("nan"))
    tflite_path = pathlib.Path(args.cache_dir) / f"{method}_s{target:g}_seed{seed}.tflite"
    started = time.perf_counter()
    export = tfw.export_tflite(model, str(tflite_path), sparse=True, quantization=None, check_inputs=setup.x_test)
    return dict(zip(names, (export.dense_bytes, export.bytes, export.size_ratio, export.argmax_agreement,
                            export.max_abs_error, time.perf_counter() - started)))


def count_events(model):
    """Pruning steps tfmot's schedule fired during training (steps 1 … pruning_step)."""
    wrapper = next(layer for layer in model.layers if hasattr(layer, "pruning_step"))
    last = int(wrapper.pruning_step.numpy())
    return sum(bool(wrapper.pruning_schedule(tf.constant(step, tf.int64))[0]) for step in range(1, last + 1))


def run_all(args, setup, previous=None):
    """:func:`prune_run` for every target, method and seed of ``args``, in that order, except those whose row
    is in ``previous`` ({(method, target, seed): row}); returns the rows."""
    previous = previous or {}
    return [previous.get((method, target, seed)) or prune_run(method, target, seed, args, setup)
            for target in args.sparsities for method in args.methods for seed in args.seeds]


def read_rows(path):
    """{(method, target, seed): row} of a csv written by :func:`write_outputs` ({} when there is none)."""
    rows = [{k: v if k == "method" else int(v) if k in ("seed", "pruning_events") else float(v)
             for k, v in row.items()} for row in common.read_csv(path)]
    if not rows:
        return {}
    print(f"resume: {len(rows)} runs in {path}", flush=True)
    return {(row["method"], row["target_sparsity"], row["seed"]): row for row in rows}


# ----------------------------------------------------------------------------------------------- summary, text

def summarize(rows):
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
            "dense_bytes": _exported_mean(group, "tflite_dense_bytes"),
            "sparse_bytes": _exported_mean(group, "tflite_sparse_bytes"),
            "ratio": _exported_mean(group, "tflite_size_ratio"),
            "agreement": min(r["tflite_argmax_agreement"] for r in _exported(group)),
            "exported": len(_exported(group)), "exported_seeds": [r["seed"] for r in _exported(group)],
            "fit_seconds": float(np.mean([r["fit_seconds"] for r in group])),
            "event_seconds": float(np.mean([r["woodfisher_event_seconds"] for r in group])),
            "events": group[0]["pruning_events"],
        }
    return summary


def exported_seeds(summary):
    """The seeds whose runs were exported, over every entry of ``summary``."""
    return {seed for s in summary.values() for seed in s["exported_seeds"]}


def _exported(group):
    return [r for r in group if not np.isnan(r["tflite_sparse_bytes"])]


def _exported_mean(group, key):
    return float(np.mean([r[key] for r in _exported(group)]))


def target_lines(summary, gain_targets, gain, size_ratio=None):
    """Lines stating whether each target is met (only those the run can check): WoodFisher ≥ magnitude +
    ``gain`` points at each of ``gain_targets``; with ``size_ratio``, sparse/dense .tflite ≤ it and
    100% argmax agreement at 90%."""
    lines = []
    for method, target in ((m, t) for m in WOODFISHER for t in gain_targets):
        if ("magnitude", target) in summary and (method, target) in summary:
            difference = summary[method, target]["accuracy"][0] - summary["magnitude", target]["accuracy"][0]
            name = "WoodFisher" + (" (per layer)" if method == "woodfisher_layerwise" else "")
            lines.append(f"{name} − magnitude at {target:.0%}: {common.points(difference)} points "
                         f"(target ≥ +{gain:.1f}): "
                         f"{'met' if 100 * difference >= gain else 'NOT met'}")
    for (method, target), s in sorted(summary.items()):
        if size_ratio is not None and abs(target - 0.9) < 1e-9:
            ok = s["ratio"] <= size_ratio and s["agreement"] == 1.0
            lines.append(f"{method} at 90%: sparse .tflite {s['ratio']:.1%} of dense "
                         f"(target ≤ {size_ratio:.0%}), "
                         f"argmax agreement with Keras on the test set {s['agreement']:.2%} (target 100%): "
                         f"{'met' if ok else 'NOT met'}")
    return lines


def fmt_acc(s):
    """'mean ± sd' of the test accuracy of a summary entry, in percent ('' for None)."""
    return "" if s is None else common.mean_sd_text(*s["accuracy"])


def present_methods(summary, args):
    """The methods of ``args`` that have results, in their order."""
    return [m for m in args.methods if any(key[0] == m for key in summary)]


def result_sections(summary, args, info, targets):
    """The markdown after an example's introduction: the accuracy table (with the differences against the
    baselines), the per-run table, the per-layer sparsities (in the per-run table up to MAX_LAYER_COLUMNS
    layers, else a table of their own), the notes and the ``targets`` lines. ``info`` holds
    ``dense_accuracy`` and ``layer_sizes`` ({pruned layer: kernel weights})."""
    methods = present_methods(summary, args)
    layer_names = list(next(iter(summary.values()))["layers"])
    layer_columns = len(layer_names) <= MAX_LAYER_COLUMNS
    targets_sorted = sorted({key[1] for key in summary})
    lines = [f"## Test accuracy (mean ± sd over {common.plural(len(args.seeds), 'seed')}); dense "
             f"{info['dense_accuracy']:.2%}", ""]
    header = ["method"] + [f"{t:.0%}" for t in targets_sorted]
    table = [[f"{m} — {LABELS[m]}"] + [fmt_acc(summary.get((m, t))) for t in targets_sorted] for m in methods]
    for method, baseline in ((m, b) for m in WOODFISHER for b in BASELINES):
        if baseline in methods and method in methods:
            table.append([f"{method} − {baseline} (points)"] + [
                common.points(summary[method, t]["accuracy"][0] - summary[baseline, t]["accuracy"][0])
                if (method, t) in summary and (baseline, t) in summary else "" for t in targets_sorted])
    lines += [common.markdown_table(header, table), "", "## Per run (means over seeds)", ""]
    header = (["method", "target", "sparsity", "test accuracy"] + (layer_names if layer_columns else [])
              + [".tflite dense (B)", ".tflite sparse (B)", "sparse/dense", "argmax agreement (min)",
                 "events", "fit time (s)", "tfw pruning events (s)"])
    table = []
    runs = [(m, t) for m in methods for t in targets_sorted if (m, t) in summary]
    for m, t in runs:
        s = summary[m, t]
        table.append([m, f"{t:.0%}", f"{s['sparsity']:.2%}", fmt_acc(s)]
                     + ([f"{s['layers'][name]:.1%}" for name in layer_names] if layer_columns else [])
                     + [f"{s['dense_bytes']:,.0f}", f"{s['sparse_bytes']:,.0f}", f"{s['ratio']:.1%}",
                        f"{s['agreement']:.2%}", str(s["events"]), f"{s['fit_seconds']:.1f}",
                        "—" if np.isnan(s["event_seconds"]) else f"{s['event_seconds']:.1f}"])
    lines.append(common.markdown_table(header, table))
    if not layer_columns:
        lines += ["", "## Sparsity per pruned layer (means over seeds)", "",
                  common.markdown_table(["layer", "kernel weights"] + [f"{m} {t:.0%}" for m, t in runs],
                                        [[name, f"{info['layer_sizes'][name]:,}"]
                                         + [f"{summary[key]['layers'][name]:.1%}" for key in runs]
                                         for name in layer_names])]
    lines += ["", ("Layer sizes (kernel weights): " + ", ".join(f"{k} {v:,}" for k, v in info["layer_sizes"].items())
                   + ". " if layer_columns else "")
              + "Fit time = `model.fit` wall time (training and pruning events); tfw pruning events = sum of "
              "`seconds` over `tfw.UpdatePruningStep().events` (for WoodFisher: gradients, inverse Fisher, scores, "
              "OBS update); tfmot's mask updates run inside the training steps and are not timed apart. "
              "The TFLite converter stores a sparse kernel in 1×4 blocks (zeros inside a nonzero block are "
              "stored) when that format keeps most of the sparsity, so a sparser model can give a larger file."
              + ("" if all(s["exported"] == s["n"] for s in summary.values()) else
                 " The .tflite columns are of the runs with seed "
                 f"{', '.join(map(str, sorted(exported_seeds(summary))))} (the other runs are not exported, to save "
                 "time)."),
              "", "## Targets", ""] + [f"* {line}" for line in targets] + [""]
    return lines


def plot(summary, args, info, path, title):
    """Accuracy and .tflite size against sparsity (mean ± sd over seeds); False when matplotlib is missing."""
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
    ax_acc.set(xlabel="target sparsity (%)", ylabel="test accuracy (%)", title=title)
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


def write_outputs(args, name, rows, text, plot_files):
    """Print the markdown ``text`` and, with ``args.out``, write <out>/<name>.csv, .md and (``plot_files(path)``
    → whether it plotted) .png."""
    print("\n" + text)
    if not args.out:
        return
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common.write_csv(out / f"{name}.csv", rows, float_format=".6g")
    (out / f"{name}.md").write_text(text)
    plotted = plot_files(out / f"{name}.png")
    print(f"wrote {out / f'{name}.csv'}, {out / f'{name}.md'}" + (f", {out / f'{name}.png'}" if plotted else ""),
          flush=True)



def announce(args, what, source, num_train, num_test):
    """Print the data line of an example, create --cache-dir; returns (steps per epoch, end_step)."""
    steps_per_epoch, end_step = schedule_steps(args, num_train)
    print(f"{what} from {source}: {num_train:,} training, {num_test:,} test images; {steps_per_epoch} steps per "
          f"epoch, ramp to step {end_step}, pruning every {args.frequency} steps", flush=True)
    pathlib.Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    return steps_per_epoch, end_step


def run_info(argv, script, started, dense, names=None, **fields):
    """The ``info`` of :func:`result_sections` and an example's markdown: the command, the environment,
    ``layer_sizes`` ({layer: kernel weights} of the layers ``names`` of ``dense``, default those with a
    kernel), ``num_kernel`` (their sum), ``total_seconds`` since ``started`` and ``fields``."""
    sizes = {layer.name: int(layer.kernel.shape.num_elements()) for layer in dense.layers
             if hasattr(layer, "kernel") and (names is None or layer.name in names)}
    return {"command": common.command_line(argv, script=script), "environment": common.environment_line(),
            **fields, "layer_sizes": sizes, "num_kernel": sum(sizes.values()),
            "total_seconds": time.perf_counter() - started}


def run_and_report(args, setup, markdown, name, plot_title, script, argv, started, dense, pruned=None, **fields):
    """Every run (:func:`run_all`), the summary, the markdown (``markdown(summary, args, info)``), the files
    <out>/<name>.csv/.md/.png (plot titled ``plot_title``) and the total time: the body of an example after
    its setup. ``script``, ``argv``, ``started``, ``dense``, ``pruned`` (as ``names``) and ``fields``: see
    :func:`run_info`. Returns (rows, summary)."""
    previous = read_rows(pathlib.Path(args.out) / f"{name}.csv") if args.resume and args.out else None
    rows = run_all(args, setup, previous)
    summary = summarize(rows)
    info = run_info(argv, script, started, dense, pruned, **fields)
    write_outputs(args, name, rows, markdown(summary, args, info),
                  lambda path: plot(summary, args, info, path, plot_title))
    print(f"total time {time.perf_counter() - started:.0f} s", flush=True)
    return rows, summary


def header(title, info):
    """The first lines of an example's markdown: the title, the command, the environment and run time."""
    return [f"# {title}", "", "```", info["command"], "```", "",
            f"{info['environment']}. Total run time {info['total_seconds'] / 60:.1f} min.", ""]


def woodfisher_call(args, wrapped):
    """The markdown of the ``tfw.prune_woodfisher`` call of the runs, on ``wrapped`` ('model', 'layer')."""
    return (f"`tfw.prune_woodfisher({wrapped}, schedule, method='woodfisher', mode='global', "
            f"num_gradients={args.num_gradients}, fisher_batch_size={args.fisher_batch_size}, "
            f"fisher_block_size={args.fisher_block_size!r}, "
            + ("" if args.fisher_block_order == "flat" else f"fisher_block_order={args.fisher_block_order!r}, ")
            + f"damping={args.damping:g}, steps={args.steps}, "
            f"update={args.update})`")


def update_text(args):
    """What each WoodFisher event does to the remaining weights, for the markdown."""
    return "OBS update" if args.update else "no OBS weight update"


def ramp_text(args, info):
    """The sentence of the markdown that describes the ramp."""
    steps_per_epoch, end_step = info["steps_per_epoch"], info["end_step"]
    return (f"Sparsity follows the cubic ramp (tfmot `PolynomialDecay`, power 3; `tfw.GradualSchedule` for tfw) "
            f"from 0 to the target, a pruning event every {args.frequency} steps up to step {end_step} "
            f"({end_step / steps_per_epoch:.1f} epochs), then fine-tuning at the target to the end.")
