"""gRDA against SGD on MNIST (5k training subset): sparsity reached and test accuracy.

Trains the small CNN and the MLPNet from scratch, from the same initial weights, with plain SGD (no
momentum) and with gRDA at the same learning-rate schedule (constant, divided by 10 for the last 20 % of
the epochs), batch size and epochs: a μ sweep at fixed c, then a c sweep at fixed μ. Biases are excluded
from gRDA's threshold (plain SGD). Reports:

* kernel sparsity: the fraction of exact zeros in the prunable kernels (Dense and Conv2D kernels);
* all-parameter sparsity: the same over every trainable parameter (biases included);
* test accuracy on the official 10k MNIST test set.

Writes grda_mnist.md (table), grda_mnist.csv (one row per run), grda_mnist_curves.csv (kernel sparsity
per epoch) and grda_mnist.png (its plot; skipped when matplotlib is missing) to --out.

    python examples/grda_mnist.py --data-dir /path/to/mnist     # full run (~10 min on 2 CPU cores)
    python examples/grda_mnist.py --quick                       # 2 epochs, 3 runs per model, writes nothing
"""
import argparse
import csv
import os
import pathlib
import platform
import sys
import time

import numpy as np

from tf_woodfisher._keras import keras, tf
from tf_woodfisher.data import load_mnist
from tf_woodfisher.models import mlpnet, small_cnn
from tf_woodfisher.optimizers import GRDA

DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"
TARGET_SPARSITY, TARGET_ACCURACY_GAP = 0.90, 1.0  # on the CNN: ≥ 90 % kernel sparsity within 1 point of SGD
ARCHITECTURES = {"CNN": (small_cnn, False), "MLPNet": (mlpnet, True)}  # builder, flatten inputs


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="MNIST idx folder (default: $TFW_MNIST_DIR)")
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
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 2 if args.quick else 40
    if args.lr_drop_epoch is None:
        args.lr_drop_epoch = int(0.8 * args.epochs)
    if args.out is None and not args.quick:
        args.out = str(DEFAULT_OUT)
    return args


def run_grid(args):
    """The runs of one model: dicts with ``optimizer`` ('SGD' or 'gRDA'), ``c`` and ``mu`` (None for SGD)."""
    sgd = [{"optimizer": "SGD", "c": None, "mu": None}]
    if args.quick:
        return sgd + [{"optimizer": "gRDA", "c": args.c, "mu": mu} for mu in (0.51, 0.65)]
    grda = [(args.c, mu) for mu in (0.51, 0.55, 0.6, 0.65)] + [(c, args.mu) for c in (0.005, 0.01, 0.02, 0.03)]
    unique = list(dict.fromkeys(grda))  # the μ and c sweeps share one run
    return sgd + [{"optimizer": "gRDA", "c": c, "mu": mu} for c, mu in unique]


def learning_rate(args, steps_per_epoch):
    """``args.lr``, divided by 10 after ``args.lr_drop_epoch`` epochs (a schedule over optimizer steps)."""
    if args.lr_drop_epoch <= 0 or args.lr_drop_epoch >= args.epochs:
        return args.lr
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [args.lr_drop_epoch * steps_per_epoch], [args.lr, args.lr / 10])


def prunable_kernels(model):
    """The Dense and Conv2D kernels of ``model`` (the weights that pruning methods sparsify)."""
    return [layer.kernel for layer in model.layers if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))]


def sparsity(variables):
    """Fraction of exact zeros over all entries of ``variables``, in [0, 1]."""
    zeros = sum(int(np.count_nonzero(v.numpy() == 0)) for v in variables)
    return zeros / sum(int(np.prod(v.shape)) for v in variables)


class KernelSparsityHistory(keras.callbacks.Callback):
    """Records the kernel sparsity (fraction) at the end of every epoch in ``self.values``."""

    def on_train_begin(self, logs=None):
        self.values = []

    def on_epoch_end(self, epoch, logs=None):
        self.values.append(sparsity(prunable_kernels(self.model)))


def woodfisher_same_sparsity(model_name, kernel_sparsity, train, test, args):
    """Hook for the comparison column: test accuracy (fraction) of WoodFisher gradual pruning of
    ``model_name`` to ``kernel_sparsity`` under the same training budget, or None when not available.

    Not filled in yet: the table shows '—' and the CSV leaves the cell empty.
    """
    return None


def train_one(model_name, run, train, test, initial_weights, args):
    """Train one model with one optimizer; returns the result row with its per-epoch kernel sparsity."""
    builder, _ = ARCHITECTURES[model_name]
    keras.utils.set_random_seed(args.seed)
    model = builder()
    model.set_weights(initial_weights)
    lr = learning_rate(args, steps_per_epoch=-(-len(train[1]) // args.batch_size))
    if run["optimizer"] == "SGD":
        optimizer = keras.optimizers.SGD(lr)
    else:
        optimizer = GRDA(lr, c=run["c"], mu=run["mu"], exclude="bias")
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = KernelSparsityHistory()
    start = time.perf_counter()
    model.fit(*train, batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=0, callbacks=[history])
    seconds = time.perf_counter() - start
    accuracy = model.evaluate(*test, batch_size=1000, verbose=0)[1]
    return dict(model=model_name, **run, lr=args.lr, lr_drop_epoch=args.lr_drop_epoch,
                batch_size=args.batch_size, epochs=args.epochs,
                kernel_sparsity=history.values[-1], all_sparsity=sparsity(model.trainable_variables),
                test_accuracy=accuracy, seconds=seconds, curve=history.values)


def _percent(value):
    return "—" if value is None else f"{100 * value:.2f}"


def markdown_table(rows):
    """The results as a markdown table (percentages; Δ is the test-accuracy change against SGD in points)."""
    lines = ["| Model | Optimizer | c | μ | Kernel sparsity % | All-param sparsity % | Test acc. % "
             "| Δ acc. vs SGD (pt) | WoodFisher acc. at same sparsity % | Train time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = "—" if r["optimizer"] == "SGD" else f"{100 * r['delta_vs_sgd']:+.2f}"
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['c'] if r['c'] is not None else '—'} "
            f"| {r['mu'] if r['mu'] is not None else '—'} | {_percent(r['kernel_sparsity'])} "
            f"| {_percent(r['all_sparsity'])} | {_percent(r['test_accuracy'])} | {delta} "
            f"| {_percent(r['woodfisher_accuracy'])} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def target_verdict(rows):
    """One line saying which CNN gRDA runs reach ≥ 90 % kernel sparsity within 1 point of SGD."""
    sgd = next(r for r in rows if r["model"] == "CNN" and r["optimizer"] == "SGD")
    hits = [r for r in rows if r["model"] == "CNN" and r["optimizer"] == "gRDA"
            and r["kernel_sparsity"] >= TARGET_SPARSITY
            and 100 * (sgd["test_accuracy"] - r["test_accuracy"]) <= TARGET_ACCURACY_GAP]
    if not hits:
        return "Target (CNN: ≥ 90 % kernel sparsity within 1.0 point of SGD): **not met** by any run."
    runs = ", ".join(f"c={r['c']}, μ={r['mu']} ({_percent(r['kernel_sparsity'])} % sparse, "
                     f"{_percent(r['test_accuracy'])} %)" for r in hits)
    return f"Target (CNN: ≥ 90 % kernel sparsity within 1.0 point of SGD, {_percent(sgd['test_accuracy'])} %): " \
           f"**met** by {runs}."


def write_outputs(rows, args, out, wall_seconds):
    out.mkdir(parents=True, exist_ok=True)
    fields = ["model", "optimizer", "c", "mu", "lr", "lr_drop_epoch", "batch_size", "epochs", "kernel_sparsity",
              "all_sparsity", "test_accuracy", "delta_vs_sgd", "woodfisher_accuracy", "seconds"]
    with open(out / "grda_mnist.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    with open(out / "grda_mnist_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "optimizer", "c", "mu", "epoch", "kernel_sparsity"])
        for r in rows:
            writer.writerows([r["model"], r["optimizer"], r["c"], r["mu"], epoch, round(value, 6)]
                             for epoch, value in enumerate(r["curve"], 1))
    command = " ".join(["python", "examples/grda_mnist.py", *sys.argv[1:]])
    lr_drop = f" (÷10 after epoch {args.lr_drop_epoch})" if 0 < args.lr_drop_epoch < args.epochs else ""
    text = [
        "# gRDA vs SGD on MNIST (5k training subset)", "",
        f"Command: `{command}` — {wall_seconds / 60:.1f} min on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}), TensorFlow {tf.__version__}.", "",
        f"Training: 5,000 MNIST training images (shuffled, seed {args.seed}), {args.epochs} epochs, batch "
        f"{args.batch_size}, learning rate {args.lr} for both optimizers{lr_drop}, no momentum, no weight decay, no "
        "augmentation; every run of a model starts from the same initial weights. gRDA excludes the biases "
        "(`exclude='bias'`: plain SGD for them). Test accuracy: official 10,000-image test set, final epoch.", "",
        "Kernel sparsity: fraction of exact zeros in the prunable kernels (Dense and Conv2D kernels). "
        "All-param sparsity: the same over all trainable parameters, biases included (the MLPNet has no biases). "
        "The WoodFisher column is a hook (`woodfisher_same_sparsity`) not filled in yet.", "",
        markdown_table(rows), "", target_verdict(rows), "",
        "Kernel sparsity per epoch: `grda_mnist_curves.csv`, plotted in `grda_mnist.png`.", "",
    ]
    (out / "grda_mnist.md").write_text("\n".join(text))
    plot_curves(rows, out / "grda_mnist.png")
    print(f"wrote {out}/grda_mnist.{{md,csv,png}} and grda_mnist_curves.csv")


def plot_curves(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the sparsity plot")
        return
    models = list(ARCHITECTURES)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), sharey=True)
    for ax, name in zip(axes, models):
        for r in rows:
            if r["model"] == name and r["optimizer"] == "gRDA":
                epochs = np.arange(1, len(r["curve"]) + 1)
                ax.plot(epochs, 100 * np.asarray(r["curve"]), marker=".", label=f"c={r['c']}, μ={r['mu']}")
        ax.axhline(100 * TARGET_SPARSITY, color="grey", linestyle="--", linewidth=0.8)
        ax.set(title=f"{name}: gRDA kernel sparsity", xlabel="epoch", ylim=(0, 100))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("zeros in Dense/Conv kernels (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()
    rows = []
    for name, (builder, flatten) in ARCHITECTURES.items():
        train = load_mnist("train", args.data_dir, flatten=flatten, shuffle_seed=args.seed)
        test = load_mnist("test", args.data_dir, flatten=flatten)
        keras.utils.set_random_seed(args.seed)
        initial_weights = builder().get_weights()
        model_rows = []
        for run in run_grid(args):
            row = train_one(name, run, train, test, initial_weights, args)
            model_rows.append(row)
            print(f"{name:7s} {run['optimizer']:5s} c={run['c']} mu={run['mu']}: kernel sparsity "
                  f"{_percent(row['kernel_sparsity'])} %, test acc {_percent(row['test_accuracy'])} % "
                  f"({row['seconds']:.0f} s)", flush=True)
        sgd_accuracy = model_rows[0]["test_accuracy"]
        for row in model_rows:
            row["delta_vs_sgd"] = row["test_accuracy"] - sgd_accuracy
            row["woodfisher_accuracy"] = (None if row["optimizer"] == "SGD" else
                                          woodfisher_same_sparsity(name, row["kernel_sparsity"], train, test, args))
        rows += model_rows
    wall = time.perf_counter() - start
    print()
    print(markdown_table(rows))
    print()
    print(target_verdict(rows))
    print(f"total {wall / 60:.1f} min")
    if args.out:
        write_outputs(rows, args, pathlib.Path(args.out), wall)


if __name__ == "__main__":
    main()
