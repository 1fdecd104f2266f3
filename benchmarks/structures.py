"""tfmot's sparsity structures in one shot on MNIST: OBS group scores against magnitude with the same pattern.

Models: the authors' MLPNet (reference weights), ``tfw.models.small_cnn()`` trained as in
``benchmarks/oneshot_table.py`` and the tiny ViT of ``benchmarks/vit_lstm.py`` (both cached under benchmarks/out/;
each pattern prunes only the layers whose kernels it fits, see :func:`structured_layers`).
Patterns: 2:4 (``sparsity_m_by_n=(2, 4)``, every
layer at 50%: tfmot's N:M is per group) and 1×4 blocks (``block_size=(1, 4)``, one global selection, at 50% and
80%; the CNN's Conv2D kernels are 4-D, so with blocks only its Dense layers are pruned, as tfmot allows). Each run
prunes a fresh copy of the dense model; top-1 accuracy on the official 10k MNIST test set; methods that sample
Fisher gradients are run with seeds 0, 1, 2. Then the ``.tflite`` of structured MLPNets through
``tfw.export_tflite`` (verified with LiteRT): bytes dense vs sparse.

    python benchmarks/structures.py                   # about 10 minutes on 2 CPU cores
    python benchmarks/structures.py --seeds 1 --models mlpnet
    python benchmarks/structures.py --models vit --reuse --no-export   # add the ViT to the existing table

Outputs under --out (default benchmarks/results): structures.csv / structures.md (accuracy) and
structures_export.csv (the export table, also in structures.md).
"""
import argparse
import os
import tempfile
import time

import common  # first: imports tf_woodfisher before TensorFlow
import oneshot_table  # the model loaders (MLPNet reference, the cached small CNN) and fresh_copy
import tf_woodfisher as tfw
import vit_lstm  # the trained tiny ViT (cached under benchmarks/out/vit_lstm)

FISHER = dict(num_gradients=400, fisher_batch_size=10, damping=1e-4, fisher_block_size="model")
# The ViT's gradients are small: at λ = 1e-4 its F = λI + GᵀG/m is λ-dominated (the scores barely depend on the
# samples, the update on the Fisher), so the Fisher methods run with a damping of 1e-6 on it.
DAMPING = {"vit": 1e-6}
METHODS = {  # name → (label, one_shot_prune overrides)
    "magnitude": ("magnitude (tfmot's criterion)", dict(method="magnitude")),
    "diagonal_fisher": ("diagonal Fisher, pooled", dict(method="diagonal_fisher", num_gradients=400,
                                                         fisher_batch_size=10, damping=1e-4)),
    "woodfisher": ("WoodFisher group OBS, 1 step", dict(method="woodfisher", steps=1, **FISHER)),
    "woodfisher_steps": ("WoodFisher group OBS, 4 steps", dict(method="woodfisher", steps=4, **FISHER)),
}
PATTERNS = {  # name → (label, structure overrides, target sparsity)
    "2:4": ("2:4", dict(sparsity_m_by_n=(2, 4)), 0.5),
    "1x4@50": ("1×4 blocks, 50%", dict(block_size=(1, 4)), 0.5),
    "1x4@80": ("1×4 blocks, 80%", dict(block_size=(1, 4)), 0.8),
}
EXPORTS = {  # name → (label, structure overrides, target, layers, quantization)
    "2:4": ("2:4, float32", dict(sparsity_m_by_n=(2, 4)), 0.5, None, None),
    "16x1": ("block_size=(16, 1) (TFLite 1×16), 80%, float32", dict(block_size=(16, 1)), 0.8, None, None),
    "1x16": ("block_size=(1, 16) (TFLite 16×1), 80%, float32", dict(block_size=(1, 16)), 0.8, None, None),
    "16x1_int8": ("block_size=(16, 1), fc1 at 80%, full int8", dict(block_size=(16, 1)), 0.8, ["fc1"], "int8"),
}


def load_vit(args, mnist):
    """``tfw.models.vit_tiny()`` trained as in benchmarks/vit_lstm.py (its defaults; cached weights)."""
    dense, _ = vit_lstm.dense_model("vit", vit_lstm.parse_args([]), mnist.x_train, mnist.y_train)
    return dense, "`tfw.models.vit_tiny()` trained as in `benchmarks/vit_lstm.py`"


MODELS = dict(oneshot_table.MODELS, vit=("ViT", False, load_vit))  # key → (title, flatten, loader)


def structured_layers(model, structure):
    """The top-level layers whose prunable kernels a tfmot structure fits (tfmot's rule: blocks need 2-D
    kernels, N:M 2-D or 4-D ones), or None when that is every prunable layer."""
    ranks = (2,) if "block_size" in structure else (2, 4)
    fitting, every = [], True
    for layer in model.layers:
        try:
            targets = tfw.find_prunable_weights(model, layers=layer.name, warn_unpruned=False)
        except ValueError:  # a layer without prunable weights
            continue
        if all(len(t.variable.shape) in ranks for t in targets):
            fitting.append(layer.name)
        else:
            every = False
    return None if every else fitting


def run(args):
    rows = []
    for key in args.models:
        title, flatten, loader = MODELS[key]
        mnist = common.Mnist(args.data_dir, flatten=flatten)
        dense, _ = loader(args, mnist)
        dense_accuracy = common.accuracy(dense, mnist.x_test, mnist.y_test)
        for pattern, (pattern_label, structure, target) in PATTERNS.items():
            layers = structured_layers(dense, structure)
            print(f"{title} {pattern_label}: prunes {'every prunable layer' if layers is None else layers}", flush=True)
            for method, (label, overrides) in METHODS.items():
                if "damping" in overrides and key in DAMPING:
                    overrides = dict(overrides, damping=DAMPING[key])
                for seed in ([0] if method == "magnitude" else range(args.seeds)):
                    model = oneshot_table.fresh_copy(dense)
                    tick = time.perf_counter()
                    report = tfw.one_shot_prune(model, mnist.train, common.LOSS, target, seed=seed, verbose=0,
                                                layers=layers, **structure, **overrides)
                    seconds = time.perf_counter() - tick
                    accuracy = common.accuracy(model, mnist.x_test, mnist.y_test)
                    rows.append(dict(model=key, pattern=pattern, method=method, seed=seed, sparsity=report.sparsity,
                                     accuracy=accuracy, dense=dense_accuracy, seconds=seconds))
                    print(f"{title:<9} {pattern_label:<16} {label:<32} seed {seed}: sparsity {report.sparsity:.2%} "
                          f"accuracy {accuracy:.2%} ({seconds:.1f} s)", flush=True)
    return rows


def summary_rows(rows, args):
    """One row per (model, pattern, method): mean ± sd, and the gain over magnitude in points."""
    out = []
    for key in [k for k in MODELS if any(r["model"] == k for r in rows)]:
        for pattern in PATTERNS:
            runs = {m: [r for r in rows if (r["model"], r["pattern"], r["method"]) == (key, pattern, m)]
                    for m in METHODS}
            magnitude = runs["magnitude"][0]["accuracy"]
            for method, found in runs.items():
                mean, sd = common.mean_sd([r["accuracy"] for r in found])
                out.append(dict(model=MODELS[key][0], dense=found[0]["dense"],
                                pattern=PATTERNS[pattern][0], method=METHODS[method][0],
                                sparsity=found[0]["sparsity"], accuracy=mean, sd=sd if len(found) > 1 else None,
                                gain=None if method == "magnitude" else mean - magnitude, seeds=len(found),
                                seconds=sum(r["seconds"] for r in found) / len(found)))
    return out


def exports(args):
    """The structured MLPNets (WoodFisher group OBS, 4 steps, seed 0) through tfw.export_tflite."""
    mnist = common.Mnist(args.data_dir, flatten=True)
    dense = tfw.models.mlpnet(common.mlpnet_npz(args.weights))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, (label, structure, target, layers, quantization) in EXPORTS.items():
            model = oneshot_table.fresh_copy(dense)
            report = tfw.one_shot_prune(model, mnist.train, common.LOSS, target, layers=layers, verbose=0,
                                        **structure, **METHODS["woodfisher_steps"][1])
            result = tfw.export_tflite(model, os.path.join(folder, f"{name}.tflite"), quantization=quantization,
                                       representative_dataset=mnist.x_train[:500] if quantization else None,
                                       check_inputs=mnist.x_test)
            rows.append(dict(export=label, sparsity=report.sparsity, keras_accuracy=common.accuracy(
                model, mnist.x_test, mnist.y_test), dense_bytes=result.dense_bytes, bytes=result.bytes,
                ratio=result.size_ratio, agreement=result.argmax_agreement, checked=result.num_checked))
            print(f"export {label}: {result.bytes:,} B of {result.dense_bytes:,} B dense "
                  f"({result.size_ratio:.1%}), argmax agreement {result.argmax_agreement:.2%}", flush=True)
    return rows


NOTES = """Top-1 accuracy on the official 10k MNIST test set after pruning a fresh copy of the dense model in one shot,
without retraining. The pattern is the same for every method of a row group; only the scores (and the OBS weight
update) differ. "magnitude" is tfmot's own criterion (N:M: the 2 smallest |w| of every 4 inputs; blocks: AVG
pooling of |w| with one global threshold); diagonal Fisher pools ½w²F_qq; WoodFisher scores a group Q by
½·w_Qᵀ[(F⁻¹)_QQ]⁻¹w_Q (2:4: all 6 subsets of every 4 weights tried) and applies the joint OBS update, with 400
gradients of 10 samples each, λ = 1e-4 (ViT: 1e-6, its Fisher is λ-dominated at 1e-4) and one Fisher block over all
pruned weights (`fisher_block_size='model'`); "4 steps" recomputes the Fisher between steps. Sampled methods: mean
± sd over seeds 0, 1, 2; gain: points over magnitude with the same pattern. 2:4 prunes every layer at 50% (MLPNet's
last layer has 20 inputs: 5 groups of 4; the CNN's first conv has one input channel, so its groups of one weight
are kept, as in tfmot); with 1×4 blocks the CNN's Conv2D kernels (4-D) stay dense (tfmot's rule). ViT
(`tfw.models.vit_tiny()` of benchmarks/vit_lstm.py): the MultiHeadAttention kernels are 3-D, which neither tfmot's
N:M nor its blocks accept, so they stay dense under both patterns; 2:4 prunes the patch embedding (a Conv2D with
one input channel: kept, as the CNN's first conv), the MLP Dense layers and the head; 1×4 blocks prune the MLP
Dense layers and the head (the patch embedding is 4-D). Sparsity: over the pruned layers' kernels."""

COLUMNS = {"model": lambda r: f"{r['model']} (dense {common.percent(r['dense'], True)})", "pattern": "{pattern}",
           "method": "{method}", "sparsity": lambda r: common.percent(r["sparsity"], True),
           "accuracy": lambda r: common.mean_sd_text(r["accuracy"], r["sd"], sign=True),
           "vs magnitude": lambda r: common.points(r["gain"]), "s / run": "{seconds:.1f}"}
EXPORT_COLUMNS = {"MLPNet, WoodFisher group OBS (4 steps)": "{export}",
                  "sparsity": lambda r: common.percent(r["sparsity"], True),
                  "Keras accuracy": lambda r: common.percent(r["keras_accuracy"], True),
                  "dense .tflite": "{dense_bytes:,} B", "sparse .tflite": "{bytes:,} B",
                  "ratio": lambda r: f"{r['ratio']:.1%}",
                  "argmax agreement": lambda r: common.percent(r["agreement"], True)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--reuse", action="store_true", help="keep the runs of the other models (and, with "
                        "--no-export, the export table) from the csv files in --out")
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the sampled methods (default 3)")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="output folder (default benchmarks/results)")
    parser.add_argument("--no-export", action="store_true", help="skip the .tflite table")
    common.add_mnist_model_options(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    runs_csv, export_csv = (os.path.join(args.out, f"structures_{n}.csv") for n in ("runs", "export"))
    kept = [r for r in common.read_csv(runs_csv, seed=int, sparsity=float, accuracy=float, dense=float, seconds=float)
            if r["model"] not in args.models] if args.reuse else []
    rows = kept + run(args)
    common.write_csv(runs_csv, rows)
    if args.no_export:
        export_rows = common.read_csv(export_csv, sparsity=float, keras_accuracy=float, dense_bytes=int, bytes=int,
                                      ratio=float, agreement=float) if args.reuse else []
    else:
        export_rows = exports(args)
    notes = NOTES
    if kept:
        notes += (f"\n\nWith --reuse: the rows of {sorted({r['model'] for r in kept})} come from the runs already in "
                  f"structures_runs.csv (an earlier run of this script); the time above is that of {args.models}.")
    if export_rows:
        common.write_csv(os.path.join(args.out, "structures_export.csv"), export_rows)
        notes += ("\n\nThe `.tflite` files (`tfw.export_tflite`, `EXPERIMENTAL_SPARSITY`, verified with LiteRT's "
                  "default delegates on the 10k test images; dense: the same conversion without sparsity; the "
                  "models are pruned again with seed 0, after other runs may have set TensorFlow's global seed, "
                  "which changes the tf.data shuffle of the Fisher samples, so their accuracy is not the table's "
                  "seed-0 run):\n\n"
                  + common.markdown_table(list(EXPORT_COLUMNS), common.table_cells(EXPORT_COLUMNS, export_rows))
                  + "\n\nFull int8 with sparse Dense kernels works only in 1×16 blocks (`block_size=(16, 1)`) and "
                    "only for kernels whose input size is a multiple of 16 (TF 2.21): MLPNet's fc2 (40 inputs) "
                    "and fc3 (20) stay dense there.\n\nAccuracy:")
    common.write_results("structures", summary_rows(rows, args), "Structured one-shot pruning on MNIST: OBS group "
                         "scores against magnitude with tfmot's patterns", notes, COLUMNS, started, out=args.out,
                         align="lllrrrr")


if __name__ == "__main__":
    main()
