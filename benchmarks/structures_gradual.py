"""tfmot's sparsity structures in gradual pruning on MNIST: tfw.prune_woodfisher against prune_low_magnitude.

Models: the authors' MLPNet (reference weights), ``tfw.models.small_cnn()`` (as in ``benchmarks/structures.py``)
and the tiny ViT of ``benchmarks/vit_lstm.py`` (cached weights). Patterns: 2:4 (``sparsity_m_by_n=(2, 4)``) and
1×4 blocks (``block_size=(1, 4)``) at 80%, given to both methods and only on the layers whose kernels the
pattern fits (tfmot's rule; see ``structures.structured_layers``). Each run is ``vit_lstm.gradual_fit``: tfmot's
``prune_low_magnitude`` + ``UpdatePruningStep`` against ``tfw.prune_woodfisher(method='woodfisher',
mode='global')`` + ``tfw.UpdatePruningStep``, the same cubic ramp, epochs, optimizer, batch size and seeds; with
N:M both set the masks once, at training step 1, whatever the schedule (tfmot's rule). Fisher settings: those of
the model's gradual benchmark (the ViT: benchmarks/vit_lstm.py; the CNN: examples/gradual_pruning_mnist.py,
also used for MLPNet, which has none). Top-1 accuracy on the official 10k MNIST test set.

Exports (``tfw.export_tflite``, verified against Keras on the 10k test images): the seed-0 model of every
(model, pattern, method), and (``--parts export90``) the 90%-sparse gradual ViT and LSTM of benchmarks/vit_lstm.py
(seed 0, its settings, both methods).

    python benchmarks/structures_gradual.py                    # 3 models × 2 patterns × 2 methods × 3 seeds
    python benchmarks/structures_gradual.py --models mlpnet --seeds 0 --epochs 1 --out /tmp/sg   # smoke test

Outputs under --out (default benchmarks/results): structures_gradual.csv (one row per run),
structures_gradual_export.csv and structures_gradual.md.
"""
import argparse
import os
import tempfile
import time

import common  # first: imports tf_woodfisher before TensorFlow
import oneshot_table  # fresh_copy
import structures  # MODELS (with the ViT) and structured_layers
import vit_lstm  # gradual_fit, the ViT/LSTM and their settings
import tf_woodfisher as tfw
import tf_keras as keras

PATTERNS = {"2:4": ("2:4", dict(sparsity_m_by_n=(2, 4)), 0.5),
            "1x4@80": ("1×4 blocks, 80%", dict(block_size=(1, 4)), 0.8)}
METHODS = {"tfmot_magnitude": "tfmot prune_low_magnitude", "woodfisher": "tfw.prune_woodfisher WoodFisher"}
MNIST_FISHER = dict(num_gradients=128, fisher_batch_size=16, fisher_block_size=2000, damping=1e-4)
FISHER = {"mlpnet": MNIST_FISHER, "cnn": MNIST_FISHER,  # examples/gradual_pruning_mnist.py's
          "vit": dict(num_gradients=512, fisher_batch_size=4, fisher_block_size=2000, damping=1e-5)}  # vit_lstm's


def model_args(key, args):
    """vit_lstm's gradual settings (epochs, frequency, batch, lr, global mode) with this model's Fisher ones."""
    settings = vit_lstm.parse_args(["--epochs", str(args.epochs)])
    for name, value in FISHER.get(key, {}).items():
        setattr(settings, name, value)
    if args.num_gradients:
        settings.num_gradients = args.num_gradients
    if args.fisher_block_size:
        settings.fisher_block_size = args.fisher_block_size
    settings.gradual_steps = args.steps
    settings.update = args.update
    return settings


def export(model, name, folder, mnist):
    """``tfw.export_tflite`` of ``model`` (sparse float32), verified on the test images: a dict of the result,
    or of the exact error."""
    try:
        result = tfw.export_tflite(model, os.path.join(folder, f"{name}.tflite"), check_inputs=mnist.x_test)
    except Exception as error:  # noqa: BLE001  (reported in the table, not hidden)
        print(f"  export {name} failed: {type(error).__name__}: {error}", flush=True)
        return dict(error=f"{type(error).__name__}: {error}".replace("\n", " "))
    print(f"  export {name}: {result.bytes:,} B of {result.dense_bytes:,} B dense ({result.size_ratio:.1%}), "
          f"argmax agreement {result.argmax_agreement:.2%}", flush=True)
    return dict(dense_bytes=result.dense_bytes, bytes=result.bytes, ratio=result.size_ratio,
                agreement=result.argmax_agreement, max_error=result.max_abs_error, checked=result.num_checked)


def gradual(args, folder):
    rows, export_rows = [], []
    for key in args.models:
        title, flatten, loader = structures.MODELS[key]
        mnist = common.Mnist(args.data_dir, flatten=flatten)
        dense, _ = loader(args, mnist)
        dense_accuracy = common.accuracy(dense, mnist.x_test, mnist.y_test)
        settings = model_args(key, args)
        for pattern in args.patterns:
            label, structure, target = PATTERNS[pattern]
            layers = structures.structured_layers(dense, structure)
            for seed in args.seeds:
                for method in METHODS:
                    keras.utils.set_random_seed(seed)
                    base = oneshot_table.fresh_copy(dense)
                    stripped, seconds, event_seconds = vit_lstm.gradual_fit(base, method, target, seed, settings,
                                                                            mnist, layers=layers, **structure)
                    pruned = tfw.find_prunable_weights(stripped, layers=layers, warn_unpruned=False)
                    row = dict(model=key, pattern=pattern, method=method, seed=seed, dense=dense_accuracy,
                               sparsity=common.kernel_sparsity([t.variable for t in pruned]),
                               accuracy=common.accuracy(stripped, mnist.x_test, mnist.y_test), seconds=seconds,
                               event_seconds=event_seconds)
                    rows.append(row)
                    print(f"{title:<9} {label:<16} {method:<16} seed {seed}: sparsity {row['sparsity']:.2%} "
                          f"accuracy {row['accuracy']:.2%} ({seconds:.0f} s)", flush=True)
                    if seed == args.seeds[0] and not args.no_export:
                        export_rows.append(dict(model=key, what=label, method=method, seed=seed,
                                                sparsity=row["sparsity"], keras_accuracy=row["accuracy"],
                                                **export(stripped, f"{key}_{pattern}_{method}", folder, mnist)))
    return rows, export_rows


def unrolled(model):
    """A copy of ``model`` (same weights) whose LSTM layers have ``unroll=True``: the TFLite converter cannot
    lower the while_loop of a non-unrolled tf_keras LSTM with a dynamic batch (TensorListReserve)."""
    def clone(layer):
        config = layer.get_config()
        return type(layer).from_config(dict(config, unroll=True) if isinstance(layer, keras.layers.LSTM) else config)

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def export90(args, folder):
    """The 90%-sparse gradual ViT and LSTM of benchmarks/vit_lstm.py (its settings, seed 0), exported."""
    settings = vit_lstm.parse_args([])
    mnist = common.Mnist(args.data_dir, shuffle_seed=vit_lstm.DENSE_SEED)
    out = []
    for name in ("vit", "lstm"):
        dense, _ = vit_lstm.dense_model(name, settings, mnist.x_train, mnist.y_train)
        for method in METHODS:
            stripped, _, _ = vit_lstm.gradual_fit(vit_lstm.fresh_model(name, dense, 0), method, 0.9, 0, settings,
                                                  mnist)
            accuracy = common.accuracy(stripped, mnist.x_test, mnist.y_test)
            print(f"{name} 90% {method}: accuracy {accuracy:.2%}", flush=True)
            row = dict(model=name, what="90%, unstructured", method=method, seed=0,
                       sparsity=vit_lstm.pruned_share(stripped), keras_accuracy=accuracy)
            out.append(dict(row, **export(stripped, f"{name}_90_{method}", folder, mnist)))
            if "error" in out[-1] and any(isinstance(layer, keras.layers.LSTM) for layer in stripped.layers):
                copy = unrolled(stripped)
                out.append(dict(row, what="90%, unstructured, the same weights with LSTM(unroll=True)",
                                keras_accuracy=common.accuracy(copy, mnist.x_test, mnist.y_test),
                                **export(copy, f"{name}_90_{method}_unrolled", folder, mnist)))
    return out


def summary_rows(rows):
    """One row per (model, pattern): both methods' mean ± sd and WoodFisher's gain in points."""
    out = []
    for key in [k for k in structures.MODELS if any(r["model"] == k for r in rows)]:
        for pattern in PATTERNS:
            runs = {m: [r for r in rows if (r["model"], r["pattern"], r["method"]) == (key, pattern, m)]
                    for m in METHODS}
            if not all(runs.values()):
                continue
            stats = {m: common.mean_sd([r["accuracy"] for r in found]) for m, found in runs.items()}
            out.append(dict(model=structures.MODELS[key][0], dense=runs["woodfisher"][0]["dense"],
                            pattern=PATTERNS[pattern][0], seeds=len(runs["woodfisher"]),
                            sparsity_tfmot=runs["tfmot_magnitude"][0]["sparsity"],
                            sparsity_woodfisher=runs["woodfisher"][0]["sparsity"],
                            tfmot=stats["tfmot_magnitude"][0], tfmot_sd=stats["tfmot_magnitude"][1],
                            woodfisher=stats["woodfisher"][0], woodfisher_sd=stats["woodfisher"][1],
                            gain=stats["woodfisher"][0] - stats["tfmot_magnitude"][0],
                            **{f"seconds_{m.split('_')[0]}": common.mean_sd([r["seconds"] for r in found])[0]
                               for m, found in runs.items()}))
    return out


COLUMNS = {"model": lambda r: f"{r['model']} (dense {common.percent(r['dense'], True)})", "pattern": "{pattern}",
           "sparsity": lambda r: common.percent(r["sparsity_woodfisher"], True),
           "tfmot magnitude": lambda r: common.mean_sd_text(r["tfmot"], r["tfmot_sd"]),
           "WoodFisher": lambda r: common.mean_sd_text(r["woodfisher"], r["woodfisher_sd"]),
           "WoodFisher − tfmot (points)": lambda r: common.points(r["gain"]), "seeds": "{seeds}",
           "fit s (tfmot / WF)": "{seconds_tfmot:.0f} / {seconds_woodfisher:.0f}"}
EXPORT_COLUMNS = {"model": "{model}", "pruned": "{what}", "method": "{method}",
                  "sparsity": lambda r: common.percent(r["sparsity"], True),
                  "Keras accuracy": lambda r: common.percent(r["keras_accuracy"], True),
                  "dense .tflite": lambda r: common.format_optional(r.get("dense_bytes"), ",") + " B",
                  "sparse .tflite": lambda r: common.format_optional(r.get("bytes"), ",") + " B",
                  "ratio": lambda r: common.format_optional(r.get("ratio"), ".1%"),
                  "argmax agreement": lambda r: common.percent(r.get("agreement"), True),
                  "error": lambda r: r.get("error") or ""}
EXPORT_FIELDS = ["model", "what", "method", "seed", "sparsity", "keras_accuracy", "dense_bytes", "bytes", "ratio",
                 "agreement", "max_error", "checked", "error"]


def notes(args):
    settings = {key: model_args(key, args) for key in FISHER if key in args.models}  # what the runs use
    fisher = "; ".join(f"{key}: {dict(vit_lstm.woodfisher_settings(s), steps=s.gradual_steps)}"
                       for key, s in settings.items())
    return (f"Top-1 accuracy on the official 10k MNIST test set after gradual pruning in `model.fit` (5k training "
            f"subset), mean ± sd over seeds {args.seeds}. Both methods: the same pattern on the same layers, "
            f"{args.epochs} epochs, Adam lr 5e-4, batch 64, the cubic ramp over the first half with an event every "
            "20 steps (1×4 blocks; tfmot prunes every layer to the target, WoodFisher uses one global threshold "
            "over the group scores), and with 2:4 the masks set once at training step 1 (tfmot's rule, followed by "
            "tfw) and then fine-tuned. WoodFisher: group OBS scores and update, Fisher settings " + fisher + ". "
            "Layers: 2:4 on every Dense/Conv2D kernel (a Conv2D with one input channel keeps its groups of one "
            "weight); 1×4 blocks on 2-D kernels only (the CNN's Dense layers; the ViT's MLP and head); the ViT's "
            "3-D MultiHeadAttention kernels stay dense under both patterns (neither tfmot nor tfw prune them with "
            "a structure). Sparsity: over the kernels of the pruned layers.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_mnist_model_options(parser)  # --data-dir, --weights, --cnn-epochs, --cnn-seed
    parser.add_argument("--models", nargs="+", choices=list(FISHER), default=list(FISHER))
    parser.add_argument("--patterns", nargs="+", choices=list(PATTERNS), default=list(PATTERNS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each gradual run")
    parser.add_argument("--num-gradients", type=int, help="Fisher gradients per event, for every model (default: "
                                                         "each model's own, in FISHER)")
    parser.add_argument("--fisher-block-size", type=int, help="Fisher block size, for every model (default: each "
                                                              "model's own, in FISHER)")
    parser.add_argument("--steps", type=int, default=1, help="WoodFisher's Fisher recomputations per pruning event")
    parser.add_argument("--no-update", dest="update", action="store_false", help="WoodFisher without its OBS weight "
                                                                                 "update (group scores only)")
    parser.add_argument("--parts", nargs="+", choices=["gradual", "export90"], default=["gradual", "export90"])
    parser.add_argument("--no-export", action="store_true", help="no .tflite of the structured models")
    parser.add_argument("--out", default=common.RESULTS_DIR, help="output folder (default benchmarks/results)")
    return parser.parse_args(argv)


def main(argv=None):
    started = time.perf_counter()
    args = parse_args(argv)
    common.quiet_tensorflow()
    rows, export_rows = [], []
    with tempfile.TemporaryDirectory() as folder:
        if "gradual" in args.parts:
            rows, export_rows = gradual(args, folder)
            common.write_csv(os.path.join(args.out, "structures_gradual.csv"), rows, float_format=".6g")
        if "export90" in args.parts:
            export_rows += export90(args, folder)
    text = ["# Gradual structured pruning on MNIST: WoodFisher group OBS against tfmot's magnitude", "",
            common.produced_by(time.perf_counter() - started), "", notes(args), ""]
    if rows:
        text += [common.markdown_table(list(COLUMNS), common.table_cells(COLUMNS, summary_rows(rows)), "llrrrrrr"), ""]
    if export_rows:
        common.write_csv(os.path.join(args.out, "structures_gradual_export.csv"), export_rows, EXPORT_FIELDS,
                         float_format=".6g")
        text += ["`.tflite` (`tfw.export_tflite(model, path, sparse=True)`, float32, verified with LiteRT's default "
                 "delegates against Keras on the 10k test images; dense: the same conversion without "
                 "`EXPERIMENTAL_SPARSITY`):", "",
                 common.markdown_table(list(EXPORT_COLUMNS), common.table_cells(EXPORT_COLUMNS, export_rows),
                                       "lllrrrrrrl"), ""]
    text = "\n".join(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "structures_gradual.md"), "w") as f:
        f.write(text)
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
