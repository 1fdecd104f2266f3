"""gRDA against SGD on MNIST (5k training subset): sparsity reached and test accuracy, and WoodFisher at that sparsity.

Trains the small CNN and the MLPNet from scratch, from the same initial weights, with plain SGD (no
momentum) and with gRDA at the same learning-rate schedule (constant, divided by 10 for the last 20 % of
the epochs), batch size and epochs: a μ sweep at fixed c, then a c sweep at fixed μ. Biases are excluded
from gRDA's threshold (plain SGD). Reports:

* kernel sparsity: the fraction of exact zeros in the prunable kernels (Dense and Conv2D kernels);
* all-parameter sparsity: the same over every trainable parameter (biases included);
* test accuracy on the official 10k MNIST test set;
* WoodFisher accuracy at the same sparsity: the SGD model of the same run (same architecture),
  pruned gradually by ``tfw.prune_woodfisher(method='woodfisher', mode='global')`` to the gRDA run's
  kernel sparsity (``tfw.GradualSchedule`` cubic ramp over the first half of --woodfisher-epochs,
  then fine-tuning at that sparsity; SGD with the learning-rate schedule of the other runs, compressed
  to --woodfisher-epochs), for the gRDA rows at least
  --woodfisher-min-sparsity sparse (75 %; the others get '—').

Writes grda_mnist.md (table), grda_mnist.csv (one row per run), grda_mnist_curves.csv (kernel sparsity
per epoch) and grda_mnist.png (its plots; skipped when matplotlib is missing) to --out. The trained SGD
weights are cached in --cache-dir (git-ignored), so that --woodfisher-only can redo the WoodFisher
column from the csv files of an earlier full run without training the gRDA models again.

    python examples/grda_mnist.py --data-dir /path/to/mnist     # full run (~12 min on 2 CPU cores)
    python examples/grda_mnist.py --data-dir /path/to/mnist --woodfisher-only   # WoodFisher column only
    python examples/grda_mnist.py --quick                       # 2 epochs, 3 runs per model, writes nothing
"""
import argparse
import csv
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts' helpers
import common  # noqa: E402  (first: imports tf_woodfisher before TensorFlow)
from common import percent, points  # noqa: E402
import tf_woodfisher as tfw  # noqa: E402  (sets TF_USE_LEGACY_KERAS=1: tf.keras is tf_keras)
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402
import numpy as np  # noqa: E402

REPO_ROOT = pathlib.Path(common.REPO_ROOT)
DEFAULT_OUT = pathlib.Path(common.RESULTS_DIR)
DEFAULT_CACHE = pathlib.Path(common.CACHE_DIR) / "grda_mnist"  # git-ignored
LOSS = common.LOSS
TARGET_SPARSITY, TARGET_ACCURACY_GAP = 0.90, 1.0  # on the CNN: ≥ 90 % kernel sparsity within 1 point of SGD
ARCHITECTURES = {"CNN": (tfw.models.small_cnn, False), "MLPNet": (tfw.models.mlpnet, True)}  # builder, flatten


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help=common.MNIST_HELP)
    parser.add_argument("--epochs", type=int, help="training epochs of every run (default 40; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 epochs, SGD and gRDA μ ∈ {0.51, 0.65}")
    parser.add_argument("--out", help=f"output folder (default {DEFAULT_OUT}; with --quick nothing is written "
                                      "unless --out is given)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate of SGD and gRDA (default 0.1)")
    parser.add_argument("--lr-drop-epoch", type=int, help="divide the learning rate by 10 after this many epochs "
                                                          "(default: 80 %% of --epochs; 0: constant)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--c", type=float, default=0.01, help="gRDA c of the μ sweep (default 0.01)")
    parser.add_argument("--mu", type=float, default=0.6, help="gRDA μ of the c sweep (default 0.6)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and data order")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="trained SGD weights (default %(default)s)")
    wf = parser.add_argument_group("WoodFisher column (gradual WoodFisher pruning of the SGD model)")
    wf.add_argument("--woodfisher-only", action="store_true",
                    help="read the gRDA and SGD rows from grda_mnist.csv and grda_mnist_curves.csv in --out (an "
                         "earlier full run), compute only the WoodFisher column (SGD weights from --cache-dir, "
                         "retrained when missing) and rewrite the outputs")
    wf.add_argument("--no-woodfisher", action="store_true", help="leave the WoodFisher column empty")
    wf.add_argument("--woodfisher-seeds", type=int, default=1,
                    help="WoodFisher runs per row, with different data orders and Fisher samples; the column shows "
                         "their mean (± sample sd when > 1)")
    wf.add_argument("--woodfisher-min-sparsity", type=float,
                    help="gRDA rows at least this sparse (kernel sparsity, fraction) get a WoodFisher run "
                         "(default 0.75; 0 with --quick)")
    wf.add_argument("--woodfisher-epochs", type=int,
                    help="epochs of each WoodFisher run, ramp + fine-tuning (default: 20 %% of --epochs, at least 1)")
    wf.add_argument("--woodfisher-ramp-epochs", type=float,
                    help="epochs over which the sparsity ramps up (default: half of --woodfisher-epochs)")
    wf.add_argument("--woodfisher-lr", type=float,
                    help="SGD learning rate of the WoodFisher runs (default: --lr)")
    wf.add_argument("--woodfisher-lr-drop-epoch", type=int,
                    help="divide the WoodFisher learning rate by 10 after this many epochs (default: 80 %% of "
                         "--woodfisher-epochs, as in the gRDA runs; 0: constant)")
    wf.add_argument("--frequency", type=int, default=20, help="steps between WoodFisher pruning events")
    wf.add_argument("--num-gradients", type=int, help="Fisher gradients per event (default 128; 16 with --quick)")
    wf.add_argument("--fisher-batch-size", type=int, default=16, help="samples averaged into each Fisher gradient")
    wf.add_argument("--fisher-block-size", type=int, default=2000, help="block size of the block-diagonal Fisher")
    wf.add_argument("--damping", type=float, default=1e-4)
    args = parser.parse_args(argv)
    if args.woodfisher_only and args.no_woodfisher:
        parser.error("--woodfisher-only and --no-woodfisher exclude each other")
    if args.woodfisher_only and args.quick and args.out is None:
        parser.error("--woodfisher-only needs the csv files of a full run: give --out")
    if args.epochs is None:
        args.epochs = 2 if args.quick else 40
    if args.lr_drop_epoch is None:
        args.lr_drop_epoch = int(0.8 * args.epochs)
    if args.out is None and not args.quick:
        args.out = str(DEFAULT_OUT)
    if args.woodfisher_min_sparsity is None:
        args.woodfisher_min_sparsity = 0.0 if args.quick else 0.75
    if args.num_gradients is None:
        args.num_gradients = 16 if args.quick else 128
    return args


def resolve_woodfisher_defaults(args):
    """Fill the WoodFisher settings that depend on --epochs and --lr (known only after reading the csv
    with --woodfisher-only)."""
    if args.woodfisher_epochs is None:
        args.woodfisher_epochs = max(1, round(0.2 * args.epochs))
    if args.woodfisher_ramp_epochs is None:
        args.woodfisher_ramp_epochs = args.woodfisher_epochs / 2
    if args.woodfisher_lr is None:
        args.woodfisher_lr = args.lr
    if args.woodfisher_lr_drop_epoch is None:
        args.woodfisher_lr_drop_epoch = int(0.8 * args.woodfisher_epochs)
    if not 0 < args.woodfisher_ramp_epochs <= args.woodfisher_epochs:
        sys.exit("error: --woodfisher-ramp-epochs must lie in (0, --woodfisher-epochs]")


def run_grid(args):
    """The runs of one model: dicts with ``optimizer`` ('SGD' or 'gRDA'), ``c`` and ``mu`` (None for SGD)."""
    sgd = [{"optimizer": "SGD", "c": None, "mu": None}]
    if args.quick:
        return sgd + [{"optimizer": "gRDA", "c": args.c, "mu": mu} for mu in (0.51, 0.65)]
    grda = [(args.c, mu) for mu in (0.51, 0.55, 0.6, 0.65)] + [(c, args.mu) for c in (0.005, 0.01, 0.02, 0.03)]
    unique = list(dict.fromkeys(grda))  # the μ and c sweeps share one run
    return sgd + [{"optimizer": "gRDA", "c": c, "mu": mu} for c, mu in unique]


def learning_rate(args, steps_per_epoch, woodfisher=False):
    """``args.lr``, divided by 10 after ``args.lr_drop_epoch`` epochs (a schedule over optimizer steps);
    with ``woodfisher``, the same from ``args.woodfisher_lr``, ``args.woodfisher_lr_drop_epoch`` and
    ``args.woodfisher_epochs``."""
    lr, drop, epochs = ((args.woodfisher_lr, args.woodfisher_lr_drop_epoch, args.woodfisher_epochs) if woodfisher
                        else (args.lr, args.lr_drop_epoch, args.epochs))
    if drop <= 0 or drop >= epochs:
        return lr
    return keras.optimizers.schedules.PiecewiseConstantDecay([drop * steps_per_epoch], [lr, lr / 10])


class KernelSparsityHistory(keras.callbacks.Callback):
    """Records the kernel sparsity (fraction) at the end of every epoch in ``self.values``."""

    def on_train_begin(self, logs=None):
        self.values = []

    def on_epoch_end(self, epoch, logs=None):
        self.values.append(common.kernel_sparsity(common.prunable_kernels(self.model)))


def woodfisher_schedule_steps(args, num_train):
    """(steps per epoch, end_step) of the WoodFisher ramp; its last event falls on a multiple of --frequency."""
    return common.ramp_steps(num_train, args.batch_size, args.woodfisher_ramp_epochs, args.frequency,
                             what="the WoodFisher ramp")


def woodfisher_same_sparsity(model_name, kernel_sparsity, train, test, args, dense_weights, seed=0):
    """Test accuracy of WoodFisher gradual pruning of ``model_name`` to ``kernel_sparsity``.

    Starts from ``dense_weights`` (the SGD model of the run), prunes the Dense/Conv2D kernels with one
    global threshold on the WoodFisher scores (OBS update at each event) along tfw.GradualSchedule's
    cubic ramp from 0 to ``kernel_sparsity`` over --woodfisher-ramp-epochs, then fine-tunes at that
    sparsity up to --woodfisher-epochs; plain SGD at --woodfisher-lr (÷10 after --woodfisher-lr-drop-epoch),
    batch --batch-size. ``seed`` (0, 1, ...) picks the data order and the Fisher samples.
    Returns a dict: woodfisher_accuracy, woodfisher_sparsity (reached), woodfisher_seconds (fit),
    woodfisher_event_seconds (pruning events within the fit) and woodfisher_events.
    """
    builder, _ = ARCHITECTURES[model_name]
    steps_per_epoch, end_step = woodfisher_schedule_steps(args, len(train[1]))
    keras.utils.set_random_seed(args.seed + 1 + seed)  # data order of the fine-tuning
    base = builder()
    base.set_weights(dense_weights)
    schedule = tfw.GradualSchedule(initial_sparsity=0.0, final_sparsity=float(kernel_sparsity), begin_step=0,
                                   end_step=end_step, power=3, frequency=args.frequency)
    model = tfw.prune_woodfisher(base, schedule, method="woodfisher", mode="global", num_gradients=args.num_gradients,
                                 fisher_batch_size=args.fisher_batch_size, fisher_block_size=args.fisher_block_size,
                                 damping=args.damping, seed=args.seed + 100_000 * seed)
    model.compile(keras.optimizers.SGD(learning_rate(args, steps_per_epoch, woodfisher=True)), LOSS,
                  metrics=["accuracy"])
    callback = tfw.UpdatePruningStep(tf.data.Dataset.from_tensor_slices(train), LOSS)
    start = time.perf_counter()
    model.fit(*train, batch_size=args.batch_size, epochs=args.woodfisher_epochs, shuffle=True, verbose=0,
              callbacks=[callback])
    seconds = time.perf_counter() - start
    stripped = tfw.strip_pruning(model)
    return {"woodfisher_accuracy": common.accuracy(stripped, *test),
            "woodfisher_sparsity": common.kernel_sparsity(common.prunable_kernels(stripped)),
            "woodfisher_seconds": seconds,
            "woodfisher_event_seconds": sum(e["seconds"] for e in callback.events),
            "woodfisher_events": len(callback.events)}


def train_one(model_name, run, train, test, initial_weights, args):
    """Train one model with one optimizer; returns the result row (with its per-epoch kernel sparsity)
    and the trained model."""
    builder, _ = ARCHITECTURES[model_name]
    keras.utils.set_random_seed(args.seed)
    model = builder()
    model.set_weights(initial_weights)
    lr = learning_rate(args, steps_per_epoch=-(-len(train[1]) // args.batch_size))
    if run["optimizer"] == "SGD":
        optimizer = keras.optimizers.SGD(lr)
    else:
        optimizer = tfw.optimizers.GRDA(lr, c=run["c"], mu=run["mu"], exclude="bias")
    model.compile(optimizer, LOSS, metrics=["accuracy"])
    history = KernelSparsityHistory()
    start = time.perf_counter()
    model.fit(*train, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=0, callbacks=[history])
    seconds = time.perf_counter() - start
    accuracy = common.accuracy(model, *test)
    row = dict(model=model_name, **run, lr=args.lr, lr_drop_epoch=args.lr_drop_epoch,
               batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
               kernel_sparsity=history.values[-1], all_sparsity=common.kernel_sparsity(model.trainable_variables),
               test_accuracy=accuracy, seconds=seconds, curve=history.values)
    return row, model


def sgd_cache_path(model_name, args):
    drop = args.lr_drop_epoch if 0 < args.lr_drop_epoch < args.epochs else 0
    name = (f"{model_name}_sgd_n{args.num_train}_e{args.epochs}_lr{args.lr:g}_drop{drop}_bs{args.batch_size}"
            f"_seed{args.seed}")
    return pathlib.Path(args.cache_dir) / f"{name}.weights.h5"


def cached_sgd_weights(model_name, train, test, initial_weights, args, sgd_row):
    """The weights of the run's SGD model: from --cache-dir, else trained again (and cached).

    Returns (weights, note): the note says where they came from and, when retrained, whether the test
    accuracy matches ``sgd_row`` (the SGD row of the csv).
    """
    path = sgd_cache_path(model_name, args)
    builder, _ = ARCHITECTURES[model_name]
    if path.exists():
        model = builder()
        model.load_weights(str(path))
        print(f"{model_name}: SGD weights loaded from {path}", flush=True)
        return model.get_weights(), "cached"
    print(f"{model_name}: no cached SGD weights ({path}): training the SGD run again", flush=True)
    row, model = train_one(model_name, {"optimizer": "SGD", "c": None, "mu": None}, train, test, initial_weights,
                           args)
    common.save_weights(model, path)
    same = abs(row["test_accuracy"] - sgd_row["test_accuracy"]) < 5e-5
    print(f"{model_name}: retrained SGD test accuracy {percent(row['test_accuracy'])} % "
          f"({'the same as' if same else 'DIFFERENT from'} the csv's {percent(sgd_row['test_accuracy'])} %)",
          flush=True)
    return model.get_weights(), ("retrained, same test accuracy as the csv" if same else
                                 f"retrained: test accuracy {percent(row['test_accuracy'])} %, not the csv's "
                                 f"{percent(sgd_row['test_accuracy'])} %")


def add_woodfisher_column(name, model_rows, train, test, args, dense_weights):
    """Fill the WoodFisher fields of the gRDA rows of one model (None where skipped); with several
    --woodfisher-seeds, accuracy and sparsity are means, times are per run."""
    fields = ("woodfisher_accuracy", "woodfisher_accuracy_sd", "woodfisher_accuracies", "woodfisher_sparsity",
              "woodfisher_seconds", "woodfisher_event_seconds", "woodfisher_events")
    for row in model_rows:
        row.update(dict.fromkeys(fields))
        if (row["optimizer"] == "SGD" or args.no_woodfisher
                or row["kernel_sparsity"] < args.woodfisher_min_sparsity or row["kernel_sparsity"] <= 0):
            continue
        runs = []
        for seed in range(args.woodfisher_seeds):
            runs.append(woodfisher_same_sparsity(name, row["kernel_sparsity"], train, test, args, dense_weights, seed))
            run = runs[-1]
            print(f"{name:7s} WoodFisher to {percent(row['kernel_sparsity'])} % (gRDA c={row['c']}, μ={row['mu']}), "
                  f"seed {seed}: sparsity {percent(run['woodfisher_sparsity'])} %, test acc "
                  f"{percent(run['woodfisher_accuracy'])} % vs gRDA {percent(row['test_accuracy'])} % "
                  f"({run['woodfisher_seconds']:.0f} s, of which {run['woodfisher_event_seconds']:.0f} s in "
                  f"{run['woodfisher_events']} pruning events)", flush=True)
        accuracies = [r["woodfisher_accuracy"] for r in runs]
        row.update({key: common.mean_sd([r[key] for r in runs])[0] for key in
                    ("woodfisher_accuracy", "woodfisher_sparsity", "woodfisher_seconds", "woodfisher_event_seconds")})
        row.update(woodfisher_accuracy_sd=common.mean_sd(accuracies)[1] if len(runs) > 1 else None,
                   woodfisher_accuracies=" ".join(f"{a:.4f}" for a in accuracies),
                   woodfisher_events=runs[0]["woodfisher_events"])


RESULTS_HEADER = ["Model", "Optimizer", "c", "μ", "Kernel sparsity %", "All-param sparsity %", "Test acc. %",
                  "Δ acc. vs SGD (pt)", "WoodFisher acc. at same sparsity %", "WoodFisher − gRDA (pt)",
                  "Train time (s)", "WoodFisher time (s)"]


def markdown_table(rows):
    """The results as a markdown table (percentages; Δ are test-accuracy differences in points)."""
    table = []
    for r in rows:
        wf = r.get("woodfisher_accuracy")
        table.append([
            r["model"], r["optimizer"], "—" if r["c"] is None else r["c"], "—" if r["mu"] is None else r["mu"],
            percent(r["kernel_sparsity"]), percent(r["all_sparsity"]), percent(r["test_accuracy"]),
            "—" if r["optimizer"] == "SGD" else points(r["delta_vs_sgd"]),
            common.mean_sd_text(wf, r.get("woodfisher_accuracy_sd")),
            points(None if wf is None else wf - r["test_accuracy"]), f"{r['seconds']:.0f}",
            "—" if r.get("woodfisher_seconds") is None else f"{r['woodfisher_seconds']:.0f}"])
    return common.markdown_table(RESULTS_HEADER, table, align="l" * len(RESULTS_HEADER))


def target_verdict(rows):
    """One line saying which CNN gRDA runs reach ≥ 90 % kernel sparsity within 1 point of SGD."""
    sgd = next(r for r in rows if r["model"] == "CNN" and r["optimizer"] == "SGD")
    hits = [r for r in rows if r["model"] == "CNN" and r["optimizer"] == "gRDA"
            and r["kernel_sparsity"] >= TARGET_SPARSITY
            and 100 * (sgd["test_accuracy"] - r["test_accuracy"]) <= TARGET_ACCURACY_GAP]
    if not hits:
        return "Target (CNN: ≥ 90 % kernel sparsity within 1.0 point of SGD): **not met** by any run."
    runs = ", ".join(f"c={r['c']}, μ={r['mu']} ({percent(r['kernel_sparsity'])} % sparse, "
                     f"{percent(r['test_accuracy'])} %)" for r in hits)
    return f"Target (CNN: ≥ 90 % kernel sparsity within 1.0 point of SGD, {percent(sgd['test_accuracy'])} %): " \
           f"**met** by {runs}."


CSV_FIELDS = ["model", "optimizer", "c", "mu", "lr", "lr_drop_epoch", "batch_size", "epochs", "seed",
              "kernel_sparsity", "all_sparsity", "test_accuracy", "delta_vs_sgd", "woodfisher_accuracy",
              "woodfisher_accuracy_sd", "woodfisher_accuracies", "woodfisher_sparsity", "seconds",
              "woodfisher_seconds", "woodfisher_event_seconds", "woodfisher_events"]


def read_results(out, args):
    """The rows (with curves) of an earlier run from ``out``/grda_mnist{,_curves}.csv, and the line of its
    md saying which command trained them. Sets --epochs, --lr, --lr-drop-epoch, --batch-size and --seed
    to the values of that run."""
    path = out / "grda_mnist.csv"
    if not path.exists():
        sys.exit(f"error: --woodfisher-only reads {path}, which does not exist: run without --woodfisher-only first")

    def number(value, kind=float):
        return None if value in ("", None) else kind(value)

    with open(path, newline="") as f:
        rows = [dict(r) for r in csv.DictReader(f)]
    for r in rows:
        for key in ("c", "mu", "lr", "kernel_sparsity", "all_sparsity", "test_accuracy", "delta_vs_sgd", "seconds"):
            r[key] = number(r.get(key))
        for key in ("lr_drop_epoch", "batch_size", "epochs", "seed"):
            r[key] = number(r.get(key), int)
    first = rows[0]
    args.epochs, args.lr, args.lr_drop_epoch, args.batch_size = (first["epochs"], first["lr"], first["lr_drop_epoch"],
                                                                  first["batch_size"])
    if first["seed"] is not None:
        args.seed = first["seed"]
    curves = {}
    with open(out / "grda_mnist_curves.csv", newline="") as f:
        for r in csv.DictReader(f):
            key = (r["model"], r["optimizer"], number(r["c"]), number(r["mu"]))
            curves.setdefault(key, []).append(float(r["kernel_sparsity"]))
    for r in rows:
        r["curve"] = curves[r["model"], r["optimizer"], r["c"], r["mu"]]
    previous = "an earlier full run of this script (command unknown)"
    md = out / "grda_mnist.md"
    if md.exists():
        for line in md.read_text().splitlines():
            for prefix in ("* SGD and gRDA rows: ", "Command: "):
                if line.startswith(prefix):
                    previous = line[len(prefix):].rstrip(".")
                    break
            else:
                continue
            break
    return rows, previous


def write_outputs(rows, args, out, wall_seconds, argv=None, previous=None):
    common.write_csv(out / "grda_mnist.csv", rows, CSV_FIELDS, float_format=".6g")
    common.write_csv(out / "grda_mnist_curves.csv",
                     [dict(model=r["model"], optimizer=r["optimizer"], c=r["c"], mu=r["mu"], epoch=epoch,
                           kernel_sparsity=value) for r in rows for epoch, value in enumerate(r["curve"], 1)],
                     float_format=".6g")
    command = (f"`{common.command_line(argv, script=__file__)}` — {wall_seconds / 60:.1f} min "
               f"({common.environment_line()})")
    if previous is None:
        header = [f"Command: {command}."]
    else:
        header = ["Commands:", "", f"* SGD and gRDA rows: {previous}.",
                  f"* WoodFisher column (`--woodfisher-only`: the other columns are read from the csv files of that "
                  f"run): {command}."]
    lr_drop = f" (÷10 after epoch {args.lr_drop_epoch})" if 0 < args.lr_drop_epoch < args.epochs else ""
    text = [
        "# gRDA vs SGD on MNIST (5k training subset), and WoodFisher at the same sparsity", "", *header, "",
        f"Training: 5,000 MNIST training images (shuffled, seed {args.seed}), {args.epochs} epochs, batch "
        f"{args.batch_size}, learning rate {args.lr} for both optimizers{lr_drop}, no momentum, no weight decay, no "
        "augmentation; every run of a model starts from the same initial weights. gRDA excludes the biases "
        "(`exclude='bias'`: plain SGD for them). Test accuracy: official 10,000-image test set, final epoch.", "",
        "Kernel sparsity: fraction of exact zeros in the prunable kernels (Dense and Conv2D kernels). "
        "All-param sparsity: the same over all trainable parameters, biases included (the MLPNet has no biases).", "",
        woodfisher_description(rows, args), "",
        markdown_table(rows), "", target_verdict(rows), "",
        woodfisher_summary(rows), "",
        "Kernel sparsity per epoch: `grda_mnist_curves.csv`, plotted in `grda_mnist.png` (top), with the test "
        "accuracy against kernel sparsity of gRDA and WoodFisher (bottom).", "",
    ]
    (out / "grda_mnist.md").write_text("\n".join(text))
    plot_curves(rows, out / "grda_mnist.png")
    print(f"wrote {out}/grda_mnist.{{md,csv,png}} and grda_mnist_curves.csv")


def woodfisher_description(rows, args):
    """The paragraph of the md stating how the WoodFisher column was computed."""
    if args.no_woodfisher:
        return "WoodFisher column: not computed (`--no-woodfisher`)."
    steps_per_epoch, end_step = woodfisher_schedule_steps(args, args.num_train)
    done = [r for r in rows if r.get("woodfisher_accuracy") is not None]
    runs = len(done) * args.woodfisher_seeds
    total = args.woodfisher_seeds * sum(r["woodfisher_seconds"] for r in done)
    events = args.woodfisher_seeds * sum(r["woodfisher_event_seconds"] for r in done)
    cache = pathlib.Path(args.cache_dir).resolve()
    cache = cache.relative_to(REPO_ROOT) if cache.is_relative_to(REPO_ROOT) else cache
    wf_drop = (f" (÷10 after epoch {args.woodfisher_lr_drop_epoch}: the schedule of the other runs, compressed)"
               if 0 < args.woodfisher_lr_drop_epoch < args.woodfisher_epochs else "")
    epochs = common.plural(args.woodfisher_epochs, "epoch")
    seeds = ("one run per row (seed 0)" if args.woodfisher_seeds == 1 else
             f"{args.woodfisher_seeds} runs per row (seeds 0–{args.woodfisher_seeds - 1}: data order and Fisher "
             "samples; the SGD model is the same), mean ± sample sd, each run's accuracy in the csv")
    return (
        "WoodFisher column (gradual WoodFisher pruning at the gRDA run's sparsity): each run starts from the SGD "
        f"model of the same model type in this table (trained once, weights cached in `{cache}`) and prunes its "
        f"Dense and Conv2D kernels with `tfw.prune_woodfisher(method='woodfisher', mode='global', "
        f"num_gradients={args.num_gradients}, fisher_batch_size={args.fisher_batch_size}, "
        f"fisher_block_size={args.fisher_block_size}, damping={args.damping:g})` with "
        "`tfw.UpdatePruningStep(fisher_dataset, loss)` (one global threshold, OBS update at each event; biases are "
        "not pruned) to the "
        f"gRDA run's kernel sparsity, along `tfw.GradualSchedule` (cubic ramp from 0, an event every "
        f"{args.frequency} steps up to step {end_step} = {end_step / steps_per_epoch:.1f} epochs), then fine-tunes "
        f"at that sparsity. Budget: {epochs} per run in all, {100 * args.woodfisher_epochs / args.epochs:.0f} % of "
        f"the {args.epochs} gRDA epochs (on top of the {args.epochs} epochs of the SGD model it starts from), plain "
        f"SGD at learning rate {args.woodfisher_lr:g}{wf_drop}, batch {args.batch_size}; test accuracy on the "
        f"official test set after the last epoch; {seeds}. To fit the compute budget, only the gRDA rows with kernel "
        f"sparsity ≥ {100 * args.woodfisher_min_sparsity:.0f} % have WoodFisher runs; the others show '—'. "
        f"WoodFisher time: wall time of one pruning fit (training and pruning events); the {runs} runs took "
        f"{total / 60:.1f} min, {events / 60:.1f} min of it in pruning events.")


def woodfisher_summary(rows):
    """One line comparing WoodFisher with gRDA where both exist."""
    pairs = [r for r in rows if r.get("woodfisher_accuracy") is not None]
    if not pairs:
        return "WoodFisher vs gRDA: no WoodFisher runs."
    parts = []
    for name in ARCHITECTURES:
        mine = [r for r in pairs if r["model"] == name]
        if not mine:
            continue
        wins = sum(r["woodfisher_accuracy"] > r["test_accuracy"] for r in mine)
        deltas = [100 * (r["woodfisher_accuracy"] - r["test_accuracy"]) for r in mine]
        parts.append(f"{name}: WoodFisher is more accurate than gRDA in {wins} of {len(mine)} rows "
                     f"(difference {min(deltas):+.2f} to {max(deltas):+.2f} points)")
    return "WoodFisher vs gRDA at the same kernel sparsity — " + "; ".join(parts) + "."


def plot_curves(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the sparsity plot")
        return
    models = list(ARCHITECTURES)
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 8.4), squeeze=False)
    for column, name in enumerate(models):
        ax = axes[0, column]
        for r in rows:
            if r["model"] == name and r["optimizer"] == "gRDA":
                epochs = np.arange(1, len(r["curve"]) + 1)
                ax.plot(epochs, 100 * np.asarray(r["curve"]), marker=".", label=f"c={r['c']}, μ={r['mu']}")
        ax.axhline(100 * TARGET_SPARSITY, color="grey", linestyle="--", linewidth=0.8)
        ax.set(title=f"{name}: gRDA kernel sparsity", xlabel="epoch", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

        ax = axes[1, column]
        grda = sorted((r for r in rows if r["model"] == name and r["optimizer"] == "gRDA"),
                      key=lambda r: r["kernel_sparsity"])
        ax.plot([100 * r["kernel_sparsity"] for r in grda], [100 * r["test_accuracy"] for r in grda], "o-",
                label="gRDA")
        wf = [r for r in grda if r.get("woodfisher_accuracy") is not None]
        if wf:
            ax.plot([100 * r["kernel_sparsity"] for r in wf], [100 * r["woodfisher_accuracy"] for r in wf], "s-",
                    label="WoodFisher gradual (global), from the SGD model")
        sgd = [r for r in rows if r["model"] == name and r["optimizer"] == "SGD"]
        if sgd:
            ax.axhline(100 * sgd[0]["test_accuracy"], color="grey", linestyle="--", linewidth=0.8, label="SGD (dense)")
        ax.set(title=f"{name}: test accuracy at the same kernel sparsity", xlabel="kernel sparsity (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_ylabel("zeros in Dense/Conv kernels (%)")
    axes[1, 0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    common.quiet_tensorflow()
    start = time.perf_counter()
    previous = None
    if args.woodfisher_only:
        stored, previous = read_results(pathlib.Path(args.out), args)
    resolve_woodfisher_defaults(args)
    rows = []
    for name, (builder, flatten) in ARCHITECTURES.items():
        mnist = common.Mnist(args.data_dir, flatten=flatten, shuffle_seed=args.seed)
        train, test = (mnist.x_train, mnist.y_train), (mnist.x_test, mnist.y_test)
        args.num_train = len(train[1])
        keras.utils.set_random_seed(args.seed)
        initial_weights = builder().get_weights()
        if args.woodfisher_only:
            model_rows = [r for r in stored if r["model"] == name]
            sgd_row = next(r for r in model_rows if r["optimizer"] == "SGD")
            needed = any(r["optimizer"] == "gRDA" and r["kernel_sparsity"] >= args.woodfisher_min_sparsity
                         for r in model_rows)
            dense_weights = (cached_sgd_weights(name, train, test, initial_weights, args, sgd_row)[0]
                             if needed else None)
        else:
            model_rows = []
            for run in run_grid(args):
                row, model = train_one(name, run, train, test, initial_weights, args)
                model_rows.append(row)
                if run["optimizer"] == "SGD":
                    dense_weights = model.get_weights()
                    common.save_weights(model, sgd_cache_path(name, args))
                print(f"{name:7s} {run['optimizer']:5s} c={run['c']} mu={run['mu']}: kernel sparsity "
                      f"{percent(row['kernel_sparsity'])} %, test acc {percent(row['test_accuracy'])} % "
                      f"({row['seconds']:.0f} s)", flush=True)
            sgd_accuracy = model_rows[0]["test_accuracy"]
            for row in model_rows:
                row["delta_vs_sgd"] = row["test_accuracy"] - sgd_accuracy
        add_woodfisher_column(name, model_rows, train, test, args, dense_weights)
        rows += model_rows
    wall = time.perf_counter() - start
    print()
    print(markdown_table(rows))
    print()
    print(target_verdict(rows))
    print(woodfisher_summary(rows))
    print(f"total {wall / 60:.1f} min")
    if args.out:
        write_outputs(rows, args, pathlib.Path(args.out), wall, argv, previous)
    return rows


if __name__ == "__main__":
    main()
