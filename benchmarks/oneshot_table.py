"""One-shot pruning without retraining on MNIST: accuracy against sparsity for each method.

Models: the WoodFisher authors' MLPNet (reference weights, 93.97%) and ``tfw.models.small_cnn()``
trained here on the 5k training subset (Adam, fixed seed; cached under benchmarks/out/). Each run
prunes a fresh copy of the dense model to one sparsity and measures top-1 accuracy on the official
10k test set. Methods that sample Fisher gradients are run with several seeds (mean ± sd).

    python benchmarks/oneshot_table.py                  # everything (about 15 minutes on 2 CPU cores)
    python benchmarks/oneshot_table.py --quick          # one seed, 90/95/98%
    python benchmarks/oneshot_table.py --models mlpnet --seeds 3 --resume

Outputs under --out (default benchmarks/results): oneshot_mnist.csv (one row per run, with the per-layer
sparsities as JSON), oneshot_mnist.md, and per model oneshot_mnist_<model>.png (accuracy against sparsity)
and oneshot_mnist_<model>_layers.png (per-layer sparsity of the best WoodFisher configuration at 95%).
"""
import argparse
import collections
import json
import os
import time

import common  # first: imports tf_woodfisher before TensorFlow
import tf_woodfisher as tfw
import tf_keras as keras
import numpy as np

SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
QUICK_SPARSITIES = (0.9, 0.95, 0.98)
LAYER_TABLE_SPARSITIES = (0.9, 0.95, 0.98)
# name → (label, overrides of tfw.WoodFisherConfig given to tfw.one_shot_prune). Multi-step runs use the config's
# steps, each removing the same fraction of the remaining weights.
METHODS = {
    "magnitude_global": ("global magnitude", dict(method="magnitude", mode="global")),
    "magnitude_layerwise": ("layer-wise magnitude", dict(method="magnitude", mode="layerwise")),
    "diagonal_fisher": ("diagonal Fisher (m=100)",
                        dict(method="diagonal_fisher", mode="global", num_gradients=100, fisher_batch_size=1)),
    "woodfisher_authors": ("WoodFisher, authors' (m=100, λ=1e-5, 1 step)",
                           dict(method="woodfisher", mode="global", num_gradients=100, fisher_batch_size=1,
                                fisher_block_size=None, damping=1e-5, steps=1)),
    "woodfisher_best": ("WoodFisher, best (400×10 samples, λ=1e-4, 8 steps, fisher_block_size='model')",
                        dict(method="woodfisher", mode="global", num_gradients=400, fisher_batch_size=10,
                             fisher_block_size="model", damping=1e-4, steps=8)),
}
DEFAULT_METHODS = tuple(METHODS)


SPEC_KEYS = {"mode": str, "num_gradients": int, "fisher_batch_size": int, "steps": int, "damping": float,
             "fisher_block_size": lambda v: None if v == "None" else v if v == "model" else int(v)}


def register_method(spec):
    """``spec``: a name of METHODS, or 'method:key=value,...' (keys: SPEC_KEYS), registered under the spec itself.

    Example: 'woodfisher:num_gradients=400,fisher_batch_size=10,steps=8,damping=1e-4'.
    """
    if spec in METHODS:
        return spec
    method, _, options = spec.partition(":")
    if method not in ("magnitude", "diagonal_fisher", "woodfisher", "woodtaylor"):
        raise argparse.ArgumentTypeError(
            f"unknown method {spec!r}: use one of {list(METHODS)} or 'method:key=value,...'")
    kwargs = dict(method=method, mode="global")
    for item in filter(None, options.split(",")):
        key, _, value = item.partition("=")
        if key not in SPEC_KEYS:
            raise argparse.ArgumentTypeError(f"unknown option {key!r} in {spec!r}; options: {list(SPEC_KEYS)}")
        kwargs[key] = SPEC_KEYS[key](value)
    METHODS[spec] = (f"{method} ({', '.join(f'{k}={v}' for k, v in kwargs.items() if k != 'method')})", kwargs)
    return spec


def is_sampled(name):
    return METHODS[name][1]["method"] != "magnitude"


def prune(model, data, target, name, seed):
    """Prune ``model`` in place with method ``name``; returns the PruningReport."""
    return tfw.one_shot_prune(model, data, common.LOSS, target, seed=seed, verbose=0, **METHODS[name][1])


# ----------------------------------------------------------------------------------------------- models

def load_mlpnet(args, mnist):
    npz = common.mlpnet_npz(args.weights)
    dense = tfw.models.mlpnet(npz)
    common.check_reference_accuracy(common.accuracy(dense, mnist.x_test, mnist.y_test))
    return dense, f"reference weights `{os.path.relpath(npz, common.REPO_ROOT)}`"


def load_cnn(args, mnist):
    """small_cnn trained on the (shuffled) training split; weights cached under benchmarks/out/."""
    path = os.path.join(common.CACHE_DIR, f"small_cnn_mnist_e{args.cnn_epochs}_s{args.cnn_seed}.weights.h5")
    keras.utils.set_random_seed(args.cnn_seed)
    model = tfw.models.small_cnn()

    def train(model):
        model.compile(keras.optimizers.Adam(1e-3), common.LOSS, metrics=["accuracy"])
        model.fit(mnist.x_train, mnist.y_train, batch_size=64, epochs=args.cnn_epochs, shuffle=True, verbose=0)

    tick = time.perf_counter()
    if common.cached_weights(model, path, train):
        print(f"small CNN: cached weights {os.path.relpath(path, common.REPO_ROOT)}", flush=True)
    else:
        print(f"small CNN: trained {common.plural(args.cnn_epochs, 'epoch')} on {len(mnist.y_train):,} samples in "
              f"{time.perf_counter() - tick:.0f} s", flush=True)
    accuracy = common.accuracy(model, mnist.x_test, mnist.y_test)
    print(f"small CNN: dense test accuracy {accuracy:.2%}", flush=True)
    recipe = (f"`tfw.models.small_cnn()` trained {args.cnn_epochs} epochs with Adam (lr 1e-3, batch 64, "
              f"`keras.utils.set_random_seed({args.cnn_seed})`) on the shuffled {len(mnist.y_train):,}-sample "
              f"training split")
    return model, recipe


MODELS = {"mlpnet": ("MLPNet", True, load_mlpnet), "cnn": ("small CNN", False, load_cnn)}


def fresh_copy(dense):
    """A copy of ``dense`` with its own weights."""
    clone = keras.models.clone_model(dense)
    clone.set_weights(dense.get_weights())
    return clone


# ----------------------------------------------------------------------------------------------- runs

FIELDS = ["model", "method", "target", "seed", "sparsity", "accuracy", "seconds", "layers"]


def read_rows(path):
    return common.read_csv(path, target=float, seed=int, sparsity=float, accuracy=float, seconds=float,
                           layers=json.loads)


def append_row(path, row):
    common.write_csv(path, [dict(row, layers=json.dumps(row["layers"]))], FIELDS, append=True)


def run_model(key, args, rows, csv_path):
    title, flatten, loader = MODELS[key]
    mnist = common.Mnist(args.data_dir, flatten=flatten)
    dense, recipe = loader(args, mnist)
    dense_accuracy = common.accuracy(dense, mnist.x_test, mnist.y_test)
    done = {(r["model"], r["method"], r["target"], r["seed"]) for r in rows}
    plan = [(name, target, seed) for name in args.methods for target in args.sparsities
            for seed in (args.seed_values if is_sampled(name) else [0])]
    for index, (name, target, seed) in enumerate(plan):
        if (key, name, target, seed) in done or args.report_only:
            continue
        model = fresh_copy(dense)
        tick = time.perf_counter()
        report = prune(model, mnist.train, target, name, seed)
        seconds = time.perf_counter() - tick
        accuracy = common.accuracy(model, mnist.x_test, mnist.y_test)
        row = dict(model=key, method=name, target=target, seed=seed, sparsity=report.sparsity, accuracy=accuracy,
                   seconds=seconds, layers={layer.name: layer.sparsity for layer in report.layers})
        rows.append(row)
        append_row(csv_path, row)
        print(f"[{title} {index + 1}/{len(plan)}] {name:<20} target {target:.0%} seed {seed:<5} "
              f"sparsity {report.sparsity:.2%} accuracy {accuracy:.2%} ({seconds:.1f} s)", flush=True)
    return dict(title=title, dense=dense_accuracy, recipe=recipe,
                sizes={w.name: w.size for w in tfw.find_prunable_weights(dense)})


# ----------------------------------------------------------------------------------------------- outputs

def summarise(rows, key, methods, sparsities):
    """{(method, target): (mean, sd, n)} of the accuracy."""
    grouped = collections.defaultdict(list)
    for r in rows:
        if r["model"] == key:
            grouped[r["method"], r["target"]].append(r["accuracy"])
    return {(m, s): (*common.mean_sd(grouped[m, s]), len(grouped[m, s]))
            for m in methods for s in sparsities if grouped[m, s]}


def cell(stats, expected):
    """mean ± sd; the number of seeds is added when it is not the expected one."""
    if stats is None:
        return "–"
    mean, sd, n = stats
    text = common.mean_sd_text(mean, sd if n > 1 else None, sign=True)
    return text if n == expected else f"{text} ({common.plural(n, 'seed')})"


def accuracy_table(summary, methods, sparsities, seeds):
    header = ["method"] + [f"{s:.0%}" for s in sparsities]
    rows = [[METHODS[m][0]] + [cell(summary.get((m, s)), seeds if is_sampled(m) else 1) for s in sparsities]
            for m in methods]
    return common.markdown_table(header, rows)


def layer_table(rows, key, methods, sizes):
    lines = []
    for name in methods:
        if METHODS[name][1]["method"] != "woodfisher":
            continue
        header = ["target", "seeds"] + [f"{layer} ({size:,})" for layer, size in sizes.items()]
        body = []
        for target in LAYER_TABLE_SPARSITIES:
            runs = [r for r in rows if r["model"] == key and r["method"] == name and r["target"] == target]
            if runs:
                body.append([f"{target:.0%}", len(runs)] + [
                    f"{np.mean([r['layers'][layer] for r in runs]):.2%}" for layer in sizes])
        if body:
            lines += [f"Per-layer sparsity, {METHODS[name][0]} (mean over seeds):", "", common.markdown_table(
                header, body), ""]
    return "\n".join(lines)


def plot(rows, infos, methods, sparsities, stem):
    """Per model: accuracy against sparsity (``{stem}_{model}.png``) and the per-layer sparsity of the best
    WoodFisher configuration at 95% (``{stem}_{model}_layers.png``), seed 0. Returns the file names."""
    names = []
    for key, info in infos.items():
        summary = summarise(rows, key, methods, sparsities)
        curves = {METHODS[name][0]: [(s, *summary[name, s][:2]) for s in sparsities if (name, s) in summary]
                  for name in methods}
        path = f"{stem}_{key}.png"
        tfw.plots.plot_accuracy_vs_sparsity(curves, path, title=f"{info['title']} on MNIST, one-shot, no retraining",
                                            dense_accuracy=info["dense"])
        names.append(os.path.basename(path))
        best = [r for r in rows if r["model"] == key and r["method"] == "woodfisher_best" and r["target"] == 0.95
                and r["seed"] == 0]
        if best:
            path = f"{stem}_{key}_layers.png"
            tfw.plots.plot_layer_sparsity(best[0]["layers"], path,
                                          title=f"{info['title']}: per-layer sparsity, best WoodFisher at 95%")
            names.append(os.path.basename(path))
    return names


def write_markdown(rows, infos, args, path, elapsed):
    lines = ["# One-shot pruning on MNIST (no retraining)", "",
             common.produced_by(elapsed), "",
             "Top-1 accuracy on the official 10k MNIST test set after pruning a fresh copy of the dense model "
             "in one shot, without retraining, to each sparsity of the Dense/Conv kernels (over all of them; "
             "in every layer for layer-wise magnitude; biases are not pruned). "
             "Fisher samples come from the training split (the 5k subset); "
             "methods that sample are run with seeds "
             f"{', '.join(str(s) for s in args.seed_values)} (`seed` argument of `one_shot_prune`) and "
             "shown as mean ± sd; magnitude pruning is deterministic (one run).", "",
             "Configurations (`tfw.one_shot_prune` overrides of `tfw.WoodFisherConfig`):", ""]
    for name in args.methods:
        label, kwargs = METHODS[name]
        lines.append(f"- {label}: `{', '.join(f'{k}={v!r}' for k, v in kwargs.items())}`")
    lines.append("")
    for key, info in infos.items():
        summary = summarise(rows, key, args.methods, args.sparsities)
        lines += [f"## {info['title']}", "", f"Model: {info['recipe']}; dense accuracy {info['dense']:.2%}.", "",
                  accuracy_table(summary, args.methods, args.sparsities, args.seeds), "",
                  layer_table(rows, key, args.methods, info["sizes"])]
        seconds = collections.defaultdict(list)
        for r in rows:
            if r["model"] == key:
                seconds[r["method"]].append(r["seconds"])
        lines += ["Mean wall-clock seconds per run: " + ", ".join(
            f"{METHODS[m][0]} {np.mean(seconds[m]):.1f}" for m in args.methods if seconds[m]) + ".", ""]
    lines += [f"![{name}]({name})" for name in args.plots] + [""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one seed and sparsities 90/95/98%%")
    parser.add_argument("--seeds", type=int, help="number of seeds of the sampled methods (default 3; --quick: 1)")
    parser.add_argument("--sparsities", type=float, nargs="+", help="override the target sparsities")
    parser.add_argument("--methods", nargs="+", type=register_method, default=list(DEFAULT_METHODS),
                        help=f"names among {list(METHODS)}, or specs 'method:key=value,...' with keys "
                             f"{list(SPEC_KEYS)} (default: all the named ones)")
    parser.add_argument("--name", default="oneshot_mnist", help="stem of the output files (default oneshot_mnist)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--out", default=common.RESULTS_DIR, help="output folder (default benchmarks/results)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the CSV, run the others")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the table, plot and markdown from the runs in the CSV "
                             "(implies --resume)")
    common.add_mnist_model_options(parser)
    args = parser.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.resume = args.resume or args.report_only
    args.seed_values = list(range(args.seeds))
    args.sparsities = tuple(args.sparsities or (QUICK_SPARSITIES if args.quick else SPARSITIES))
    return args


def main(argv=None):
    args = parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, f"{args.name}.csv")
    if os.path.exists(csv_path) and not args.resume:
        os.remove(csv_path)
    rows = read_rows(csv_path)
    infos = {key: run_model(key, args, rows, csv_path) for key in args.models}
    rows = [r for r in rows if r["method"] in args.methods and r["target"] in args.sparsities
            and r["model"] in args.models and (r["seed"] in args.seed_values or not is_sampled(r["method"]))]
    args.plots = plot(rows, infos, args.methods, args.sparsities, os.path.join(args.out, args.name))
    write_markdown(rows, infos, args, os.path.join(args.out, f"{args.name}.md"), time.perf_counter() - started)
    for key, info in infos.items():
        print(f"\n{info['title']} (dense {info['dense']:.2%})")
        print(accuracy_table(summarise(rows, key, args.methods, args.sparsities), args.methods, args.sparsities,
                             args.seeds))
    print(f"\nwrote {csv_path}, {', '.join(args.plots)} and {args.name}.md in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
