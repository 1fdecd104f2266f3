"""Post-training OBS from activations (OBC, SparseGPT) against WoodFisher and magnitude, one-shot on MNIST.

Models: the WoodFisher authors' MLPNet (reference weights, 93.97%) and ``tfw.models.small_cnn()`` trained as in
``benchmarks/oneshot_table.py`` (cached under benchmarks/out/). Each run prunes a fresh copy of the dense model
in one shot, without retraining, and measures top-1 accuracy on the official 10k MNIST test set.

* 95% and 98% (over all Dense/Conv kernels, global allocation): ``method='obc'`` and ``'sparsegpt'`` with
  ``calibration_samples`` unlabelled training inputs (default 2000) and ``percdamp=0.001``; WoodFisher's best
  one-shot configuration of oneshot_table.py (400×10 Fisher samples, λ=1e-4, 8 steps, one block), the same with
  blocks of 392 weights, and with sequential OBS in those blocks (``sequential=True``); global magnitude.
* 2:4 (``sparsity_m_by_n=(2, 4)``, 50%): OBC and SparseGPT with 512 calibration inputs, against tfmot's magnitude
  2:4 (``method='magnitude'``, same pattern).

The sampled methods (calibration subset, Fisher samples) run with --seeds seeds (mean ± sd).

    python benchmarks/obs_methods.py                     # both models, 3 seeds (about 17 minutes on 2 shared CPU cores)
    python benchmarks/obs_methods.py --seeds 1 --models mlpnet
    python benchmarks/obs_methods.py --models mlpnet --methods sparsegpt --targets 2:4 --out /tmp/obs  # one cell
    python benchmarks/obs_methods.py --scaling           # seconds of the solvers against layer size

Outputs under --out (default benchmarks/results): obs_methods.csv (one row per run, per-layer sparsities and
reconstruction errors as JSON) and obs_methods.md; with --scaling obs_methods_scaling.md/.csv.
"""
import argparse
import collections
import json
import time

import common  # first: imports tf_woodfisher before TensorFlow
import numpy as np
import tensorflow as tf
import tf_woodfisher as tfw

import oneshot_table

TARGETS = (0.95, 0.98, "2:4")
LAYERWISE = ("obc", "sparsegpt")
# name → (label, overrides of one_shot_prune by target kind: 'sparse' for 95/98%, 'n_m' for 2:4; None: not run)
METHODS = {
    "magnitude": ("magnitude (global; 2:4: tfmot's pattern)",
                  dict(sparse=dict(method="magnitude", mode="global"),
                       n_m=dict(method="magnitude", sparsity_m_by_n=(2, 4)))),
    "woodfisher_best": ("WoodFisher, best one-shot (400×10, λ=1e-4, 8 steps, one block)",
                        dict(sparse=oneshot_table.METHODS["woodfisher_best"][1], n_m=None)),
    "woodfisher_c392": ("WoodFisher, same but blocks of 392 weights",
                        dict(sparse=dict(oneshot_table.METHODS["woodfisher_best"][1], fisher_block_size=392),
                             n_m=None)),
    "woodfisher_sequential": ("WoodFisher, blocks of 392, sequential=True",
                              dict(sparse=dict(oneshot_table.METHODS["woodfisher_best"][1], fisher_block_size=392,
                                               sequential=True), n_m=None)),
    "obc": ("OBC (exact greedy OBS per row, rows merged)",
            dict(sparse=dict(method="obc", mode="global", percdamp=0.001),
                 n_m=dict(method="obc", sparsity_m_by_n=(2, 4), calibration_samples=512))),
    "sparsegpt": ("SparseGPT (blocks of 128 columns; 2:4: act order, CG refinement)",
                  dict(sparse=dict(method="sparsegpt", mode="global", percdamp=0.001),
                       n_m=dict(method="sparsegpt", sparsity_m_by_n=(2, 4), calibration_samples=512))),
}


def overrides(method, target, args):
    kind = "n_m" if target == "2:4" else "sparse"
    values = METHODS[method][1][kind]
    if values is None:
        return None
    values = dict(values)
    if method in LAYERWISE:
        values.setdefault("calibration_samples", args.calibration_samples)
    return values


def sampled(method):
    return method != "magnitude"


def run(model_key, dense, mnist, method, target, seed, args):
    """One pruning run on a fresh copy; returns its CSV row (None when the method does not run the target)."""
    kwargs = overrides(method, target, args)
    if kwargs is None:
        return None
    model = oneshot_table.fresh_copy(dense)
    sparsity = 0.5 if target == "2:4" else target
    if method in LAYERWISE:  # unlabelled calibration inputs: a random subset of the training split per seed
        order = np.random.default_rng(seed).permutation(len(mnist.x_train))
        data = tf.data.Dataset.from_tensor_slices(mnist.x_train[order[:kwargs["calibration_samples"]]])
    else:
        data = mnist.train
    started = time.perf_counter()
    seeded = {} if method in LAYERWISE else dict(seed=seed)  # the layer-wise methods: a calibration subset per seed
    report = tfw.one_shot_prune(model, data, common.LOSS, sparsity, verbose=0, **seeded, **kwargs)
    seconds = time.perf_counter() - started
    accuracy = common.accuracy(model, mnist.x_test, mnist.y_test)
    print(f"{model_key:7s} {method:16s} {str(target):5s} seed {seed}: {accuracy:.2%} "
          f"(sparsity {report.sparsity:.2%}, {seconds:.1f} s)", flush=True)
    return dict(model=model_key, method=method, target=str(target), seed=seed, accuracy=accuracy,
                sparsity=report.sparsity, seconds=seconds, layers=json.dumps(report.as_dict()["layers"]),
                errors=json.dumps(report.reconstruction_errors))


def summary_rows(rows, infos, methods, seeds):
    """One table row per (model, method): accuracy per target (mean ± sd) and seconds per run."""
    by_key = collections.defaultdict(list)
    for r in rows:
        by_key[r["model"], r["method"], r["target"]].append(r)
    table = []
    for model_key, info in infos.items():
        table.append(dict(model=info["title"], method="dense", **{str(t): common.percent(info["dense"], sign=True)
                                                                  for t in TARGETS}, seconds="—"))
        for method in methods:
            entry = dict(model=info["title"], method=METHODS[method][0])
            for target in TARGETS:
                runs = by_key.get((model_key, method, str(target)), [])
                if not runs:
                    entry[str(target)] = "—"
                    continue
                mean, sd = common.mean_sd([r["accuracy"] for r in runs])
                entry[str(target)] = common.mean_sd_text(mean, sd if len(runs) > 1 else None, sign=True)
            times = {str(t): np.mean([r["seconds"] for r in by_key.get((model_key, method, str(t)), [])] or [np.nan])
                     for t in TARGETS}
            entry["seconds"] = " / ".join("—" if np.isnan(v) else f"{v:.1f}" for v in times.values())
            table.append(entry)
    return table


SCALING_SIZES = (128, 256, 512, 1024)  # columns (inputs) of the random layers of the scaling table; rows = 128


def scaling(args, started):
    """Seconds of obc_prune and sparsegpt_prune at 95% on random layers of growing input size (ReLU-like inputs,
    128 output rows, H from 2 × cols samples), each timed after a warm-up call; writes obs_methods_scaling.md/.csv."""
    from tf_woodfisher.pruning import obs

    rng = np.random.default_rng(0)
    obs.obc_prune(rng.normal(size=(4, 32)), np.eye(32), 0.5, rows="global")  # traces once
    obs.sparsegpt_prune(rng.normal(size=(4, 32)), np.eye(32), 0.5)
    rows = []
    for cols in SCALING_SIZES:
        mixing = rng.normal(size=(cols, 16)) @ rng.normal(size=(16, 2 * cols))
        x = np.maximum(mixing + rng.normal(size=(cols, 2 * cols)), 0)
        H = 2 * x @ x.T / x.shape[1]
        W = rng.normal(size=(128, cols))
        row = dict(rows=128, cols=cols)
        for name, prune in (("obc", lambda: obs.obc_prune(W, H, 0.95, rows="global")),
                            ("sparsegpt", lambda: obs.sparsegpt_prune(W, H, 0.95))):
            tick = time.perf_counter()
            result = prune()
            row[f"{name}_seconds"] = time.perf_counter() - tick
            row[f"{name}_error"] = obs.reconstruction_error(W, result.weights.numpy(), H)
        print(f"scaling: 128 × {cols}: OBC {row['obc_seconds']:.2f} s, SparseGPT {row['sparsegpt_seconds']:.2f} s",
              flush=True)
        rows.append(row)
    ratios = [rows[i + 1]["obc_seconds"] / rows[i]["obc_seconds"] for i in range(len(rows) - 1)]
    notes = ("Wall-clock seconds of the core solvers (`tf_woodfisher.pruning.obs`) on one layer of 128 output rows at "
             "95% (OBC with `rows='global'`: the complete greedy of every row, the merge and the joint update; "
             "SparseGPT: blocks of 128 columns), float32, after a warm-up call; relative reconstruction error beside. "
             "OBC costs O(rows · cols³) (rank-1 downdates applied in batches of 64, the problem compacted as "
             "weights leave it), SparseGPT O(cols³ + rows · cols²). Time ratio of OBC per doubling of cols: "
             + ", ".join(f"{r:.1f}×" for r in ratios) + ".")
    header = ["rows × cols", "OBC s", "OBC rel. error", "SparseGPT s", "SparseGPT rel. error"]
    cells = [[f"{r['rows']} × {r['cols']}", f"{r['obc_seconds']:.2f}", f"{r['obc_error']:.4f}",
              f"{r['sparsegpt_seconds']:.2f}", f"{r['sparsegpt_error']:.4f}"] for r in rows]
    text = "\n".join(["# Cost of OBC and SparseGPT against layer size", "",
                      common.produced_by(time.perf_counter() - started), "", notes, "",
                      common.markdown_table(header, cells), ""])
    common.write_csv(f"{args.out}/obs_methods_scaling.csv", rows)
    with open(f"{args.out}/obs_methods_scaling.md", "w") as f:
        f.write(text)
    print("\n" + text, flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["mlpnet", "cnn"], default=["mlpnet", "cnn"])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the sampled methods (default 3)")
    parser.add_argument("--targets", nargs="+", choices=[str(t) for t in TARGETS], default=[str(t) for t in TARGETS],
                        help="targets to run (default all; the others show as —)")
    parser.add_argument("--calibration-samples", type=int, default=2000,
                        help="calibration inputs of OBC/SparseGPT at 95/98%% (2:4 always uses 512)")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="output folder (default benchmarks/results)")
    common.add_mnist_model_options(parser)
    parser.add_argument("--scaling", action="store_true",
                        help="only the cost of the solvers against layer size (obs_methods_scaling.md/.csv)")
    args = parser.parse_args(argv)
    args.targets = [t for t in TARGETS if str(t) in args.targets]
    return args


def main(argv=None):
    args = parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    if args.scaling:
        return scaling(args, started)
    rows, infos = [], {}
    for key in args.models:
        mnist = common.Mnist(args.data_dir, flatten=key == "mlpnet")
        title, _, load = oneshot_table.MODELS[key]
        dense, recipe = load(args, mnist)
        infos[key] = dict(title=title, recipe=recipe, dense=common.accuracy(dense, mnist.x_test, mnist.y_test))
        for method in args.methods:
            for target in args.targets:
                for seed in range(args.seeds if sampled(method) else 1):
                    row = run(key, dense, mnist, method, target, seed, args)
                    if row is not None:
                        rows.append(row)
    notes = "\n".join([
        "Top-1 accuracy on the official 10k MNIST test set after one-shot pruning of a fresh copy of the dense "
        "model, no retraining; mean ± sd over seeds "
        f"{', '.join(map(str, range(args.seeds)))} for the sampled methods (OBC/SparseGPT: the random subset of "
        "unlabelled calibration inputs; WoodFisher: its Fisher samples), one run for magnitude.",
        "",
        f"- 95% / 98%: sparsity over all Dense/Conv kernels. OBC and SparseGPT: `method='obc'|'sparsegpt', "
        f"mode='global', calibration_samples={args.calibration_samples}, percdamp=0.001` (per-layer sparsities "
        "allocated from the layers' reconstruction-error curves, `reconstruction_target='dense'`); WoodFisher: "
        "oneshot_table.py's best configuration (`method='woodfisher', num_gradients=400, fisher_batch_size=10, "
        "fisher_block_size='model', damping=1e-4, steps=8`, 4000 labelled samples), also with "
        "`fisher_block_size=392` and with sequential OBS inside those blocks (`sequential=True`: weights removed one "
        "at a time with rank-1 downdates of each block inverse, the next block chosen globally by least loss "
        "increase); magnitude: `mode='global'`.",
        "- 2:4: `sparsity_m_by_n=(2, 4)` (tfmot's convention: 2 zeros in every 4 consecutive input channels) with "
        "512 calibration inputs (`percdamp=0.01`) for OBC/SparseGPT (SparseGPT with its N:M defaults: groups "
        "swept in decreasing diag H, 'act order', and the kept weights refined for the chosen mask by up to "
        "64 conjugate-gradient iterations); magnitude 2:4 is tfmot's rule (the 2 "
        "smallest |w| of each group). The first conv of the small CNN has one input channel, so under tfmot's "
        "padding rule its groups keep their single weight (it stays dense).",
        "- seconds: mean wall-clock seconds per run at 95% / 98% / 2:4 on this machine (calibration forward "
        "passes, H, curves, pruning; WoodFisher: gradients, inverse, scoring).",
        "",
        "Models: " + "; ".join(f"{info['title']}: {info['recipe']}, dense {info['dense']:.2%}"
                              for info in infos.values()) + "."])
    header = ["model", "method", "95%", "98%", "2:4", "seconds (95 / 98 / 2:4)"]
    table = summary_rows(rows, infos, args.methods, args.seeds)
    cells = [[r["model"], r["method"], r["0.95"], r["0.98"], r["2:4"], r["seconds"]] for r in table]
    text = "\n".join(["# Post-training OBS (OBC, SparseGPT) on MNIST, one-shot", "",
                      common.produced_by(time.perf_counter() - started), "", notes, "",
                      common.markdown_table(header, cells, "llrrrr"), ""])
    common.write_csv(f"{args.out}/obs_methods.csv", rows)
    with open(f"{args.out}/obs_methods.md", "w") as f:
        f.write(text)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
