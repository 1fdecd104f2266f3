"""WoodFisher on attention and recurrent models: a tiny ViT and an LSTM over MNIST rows, one-shot and gradual.

    python benchmarks/vit_lstm.py                       # both models, 50/70/90 %, 3 seeds
    python benchmarks/vit_lstm.py --models lstm --quick --out /tmp/vit_lstm   # smoke test

Models: ``tfw.models.vit_tiny()`` (7×7 patches → 16 tokens, width 64, 2 pre-norm blocks with 4-head
MultiHeadAttention and an MLP of 128) and ``tfw.models.lstm_rows()`` (an LSTM(64) over the 28 rows, not
unrolled: its per-sample Fisher gradients run through the while_loop). Each is trained once on the 5k MNIST
subset (Adam, the same budget for every method; weights cached under benchmarks/out/), then, per target
sparsity and seed:

* one-shot (no retraining): ``tfw.one_shot_prune`` with ``method='woodfisher'`` (global) against
  ``method='magnitude'`` in ``mode='layerwise'`` (what tfmot's magnitude does per layer) and ``'global'``;
* gradual (during ``model.fit``): tfmot's ``prune_low_magnitude`` + its ``UpdatePruningStep`` against
  ``tfw.prune_woodfisher(method='woodfisher', mode='global')`` + ``tfw.UpdatePruningStep``, with the same
  cubic ramp (``PolynomialDecay`` / ``tfw.GradualSchedule``), epochs, optimizer, batch size and seeds.

Accuracy on the official 10k test set. Writes vit_lstm.csv (one row per run) and vit_lstm.md to --out.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (first: imports tf_woodfisher before TensorFlow)
import tf_woodfisher as tfw  # noqa: E402
import tf_keras as keras  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402

MODELS = {"vit": tfw.models.vit_tiny, "lstm": tfw.models.lstm_rows}
ONE_SHOT = {"magnitude_layerwise": dict(method="magnitude", mode="layerwise"),
            "magnitude_global": dict(method="magnitude", mode="global"),
            "woodfisher": dict(method="woodfisher", mode="global")}
GRADUAL = ("tfmot_magnitude", "woodfisher")
DENSE_SEED = 0
TARGET_GAIN = 1.0  # points WoodFisher must gain over tfmot magnitude at 90 % (gradual)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", help=common.MNIST_HELP)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--sparsities", type=float, nargs="+", help="targets (default 0.5 0.7 0.9)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds of the pruning runs (default 0 1 2)")
    parser.add_argument("--parts", nargs="+", choices=["oneshot", "gradual"], default=["oneshot", "gradual"])
    parser.add_argument("--dense-epochs", type=int, help="epochs of the dense training (default 40)")
    parser.add_argument("--epochs", type=int, help="epochs of each gradual run (default 6)")
    parser.add_argument("--frequency", type=int, default=20, help="steps between gradual pruning events")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the dense training")
    parser.add_argument("--prune-lr", type=float, default=5e-4, help="Adam learning rate of the gradual runs")
    wf = parser.add_argument_group("WoodFisher settings")
    wf.add_argument("--num-gradients", type=int, help="Fisher gradients per event (default 512)")
    wf.add_argument("--fisher-batch-size", type=int, default=4, help="samples averaged into each gradient")
    wf.add_argument("--fisher-block-size", type=int, default=2000)
    wf.add_argument("--damping", type=float, default=1e-5)
    wf.add_argument("--no-update", dest="update", action="store_false", help="no OBS weight update (scores only)")
    wf.add_argument("--woodfisher-mode", choices=["global", "layerwise"], default="global",
                    help="WoodFisher's threshold in the gradual runs")
    wf.add_argument("--oneshot-steps", type=int, default=4, help="Fisher recomputations of a one-shot prune")
    wf.add_argument("--gradual-steps", type=int, default=1, help="Fisher recomputations per gradual pruning event")
    parser.add_argument("--quick", action="store_true", help="smoke test: 90 %%, seed 0, 1 dense epoch, 1 epoch, "
                                                             "16 gradients")
    parser.add_argument("--out", help="folder of the csv/md (default benchmarks/results; with --quick nothing is "
                                      "written unless given)")
    parser.add_argument("--cache-dir", default=os.path.join(common.CACHE_DIR, "vit_lstm"))
    args = parser.parse_args(argv)
    quick = args.quick
    for name, value in dict(sparsities=[0.9] if quick else [0.5, 0.7, 0.9], seeds=[0] if quick else [0, 1, 2],
                            dense_epochs=1 if quick else 40, epochs=1 if quick else 6,
                            num_gradients=16 if quick else 512).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None and not quick:
        args.out = common.RESULTS_DIR
    return args


def woodfisher_settings(args):
    return dict(num_gradients=args.num_gradients, fisher_batch_size=args.fisher_batch_size,
                fisher_block_size=args.fisher_block_size, damping=args.damping, update=args.update)


def dense_model(name, args, x_train, y_train):
    """The trained dense model (from the cache when the same settings trained it before) and its seconds."""
    key = f"{name}_n{len(y_train)}_e{args.dense_epochs}_bs{args.batch_size}_lr{args.lr:g}_seed{DENSE_SEED}"
    keras.utils.set_random_seed(DENSE_SEED)
    model = MODELS[name]()

    def train(model):
        model.compile(keras.optimizers.Adam(args.lr), common.LOSS)
        model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.dense_epochs, shuffle=True, verbose=0)

    started = time.perf_counter()
    loaded = common.cached_weights(model, os.path.join(args.cache_dir, f"{key}.weights.h5"), train)
    return model, 0.0 if loaded else time.perf_counter() - started


def pruned_share(model):
    """Fraction of zeros over the model's prunable weights (tf_woodfisher's list, the same kernels tfmot prunes)."""
    return common.kernel_sparsity([t.variable for t in tfw.find_prunable_weights(model, warn_unpruned=False)])


def one_shot_run(name, dense, method, target, seed, args, mnist):
    model = MODELS[name]()
    model.set_weights(dense.get_weights())
    settings = dict(ONE_SHOT[method], seed=seed, steps=args.oneshot_steps)
    if method == "woodfisher":
        settings.update(woodfisher_settings(args))
    started = time.perf_counter()
    tfw.one_shot_prune(model, mnist.train, common.LOSS, target, verbose=0, **settings)
    return {"model": name, "part": "oneshot", "method": method, "target": target, "seed": seed,
            "sparsity": pruned_share(model), "accuracy": common.accuracy(model, mnist.x_test, mnist.y_test),
            "seconds": time.perf_counter() - started}


def fresh_model(name, dense, seed):
    """A new ``MODELS[name]`` with the weights of ``dense``, built after ``keras.utils.set_random_seed(seed)``."""
    keras.utils.set_random_seed(seed)
    model = MODELS[name]()
    model.set_weights(dense.get_weights())
    return model


def wrap_for_pruning(base, wrap, layers=None):
    """``wrap(base)``, or, with ``layers`` (top-level layer names), a clone of ``base`` in which only those layers
    are wrapped (tfmot's ``clone_model`` recipe: the layers are reused, so the weights are ``base``'s)."""
    if layers is None:
        return wrap(base)
    return keras.models.clone_model(base, clone_function=lambda layer: wrap(layer) if layer.name in layers else layer)


def gradual_fit(base, method, target, seed, args, mnist, layers=None, **structure):
    """Prune ``base`` during ``model.fit`` with tfmot's ``prune_low_magnitude`` (method 'tfmot_magnitude') or
    ``tfw.prune_woodfisher`` ('woodfisher'): the same cubic ramp to ``target``, epochs, optimizer and data order.

    ``structure``: tfmot's ``block_size`` / ``sparsity_m_by_n``, given to both (with N:M both set the masks once,
    at training step 1, whatever the schedule); ``layers``: the top-level layers to wrap (default: the model).
    Returns the stripped model, the seconds of ``fit`` and the seconds of the WoodFisher events (NaN for tfmot).
    """
    _, end_step = common.ramp_steps(len(mnist.y_train), args.batch_size, args.epochs / 2, args.frequency)
    ramp = dict(initial_sparsity=0.0, final_sparsity=target, begin_step=0, end_step=end_step, power=3,
                frequency=args.frequency)
    if method == "tfmot_magnitude":
        schedule = tfmot.sparsity.keras.PolynomialDecay(**ramp)
        model = wrap_for_pruning(base, lambda x: tfmot.sparsity.keras.prune_low_magnitude(x, schedule, **structure),
                                 layers)
        callback = tfmot.sparsity.keras.UpdatePruningStep()
    else:
        schedule = tfw.GradualSchedule(**ramp)
        model = wrap_for_pruning(base, lambda x: tfw.prune_woodfisher(
            x, schedule, method="woodfisher", mode=args.woodfisher_mode, seed=100_000 * seed,
            steps=args.gradual_steps, **woodfisher_settings(args), **structure), layers)
        callback = tfw.UpdatePruningStep(mnist.train, common.LOSS)
    model.compile(keras.optimizers.Adam(args.prune_lr), common.LOSS)
    started = time.perf_counter()
    model.fit(mnist.x_train, mnist.y_train, batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
              callbacks=[callback], verbose=0)
    seconds = time.perf_counter() - started
    events = getattr(callback, "events", None)
    return tfw.strip_pruning(model), seconds, sum(e["seconds"] for e in events) if events else float("nan")


def layer_sparsities(model):
    """{kernel name: fraction of zeros} over the model's prunable kernels."""
    return {t.name: common.kernel_sparsity([t.variable]) for t in tfw.find_prunable_weights(model,
                                                                                              warn_unpruned=False)}


def gradual_run(name, dense, method, target, seed, args, mnist):
    stripped, seconds, event_seconds = gradual_fit(fresh_model(name, dense, seed), method, target, seed, args, mnist)
    print(f"  {method} per layer: " + ", ".join(f"{k} {v:.0%}" for k, v in layer_sparsities(stripped).items()),
          flush=True)
    return {"model": name, "part": "gradual", "method": method, "target": target, "seed": seed,
            "sparsity": pruned_share(stripped), "accuracy": common.accuracy(stripped, mnist.x_test, mnist.y_test),
            "seconds": seconds, "event_seconds": event_seconds}


def table(rows, part, methods, sparsities, dense):
    """Rows of mean ± sd accuracy per (model, method) and the WoodFisher gains, for one part."""
    out = []
    models = sorted({r["model"] for r in rows if r["part"] == part})
    reference = "tfmot_magnitude" if part == "gradual" else "magnitude_layerwise"
    for name in models:
        means = {}
        for method in methods:
            cells = []
            for target in sparsities:
                acc = [r["accuracy"] for r in rows if (r["model"], r["part"], r["method"], r["target"]) ==
                       (name, part, method, target)]
                mean, sd = common.mean_sd(acc) if acc else (None, None)
                means[method, target] = mean
                cells.append(common.mean_sd_text(mean, sd))
            out.append([f"{name} (dense {dense[name]:.2%})", method] + cells)
        for other in [m for m in (reference, "magnitude_global") if m in methods and m != "woodfisher"]:
            gains = [common.points(means["woodfisher", t] - means[other, t])
                     if means.get(("woodfisher", t)) is not None and means.get((other, t)) is not None else "—"
                     for t in sparsities]
            out.append([name, f"woodfisher − {other} (points)"] + gains)
    return out


def main(argv=None):
    args = parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    mnist = common.Mnist(args.data_dir, shuffle_seed=DENSE_SEED)
    os.makedirs(args.cache_dir, exist_ok=True)
    rows, dense_accuracy, dense_seconds = [], {}, {}
    for name in args.models:
        dense, dense_seconds[name] = dense_model(name, args, mnist.x_train, mnist.y_train)
        dense_accuracy[name] = common.accuracy(dense, mnist.x_test, mnist.y_test)
        print(f"{name}: dense test accuracy {dense_accuracy[name]:.2%}", flush=True)
        for target in args.sparsities:
            for seed in args.seeds:
                runs = ([(one_shot_run, m) for m in ONE_SHOT] if "oneshot" in args.parts else []) + \
                       ([(gradual_run, m) for m in GRADUAL] if "gradual" in args.parts else [])
                for run, method in runs:
                    row = run(name, dense, method, target, seed, args, mnist)
                    rows.append(row)
                    print(f"{name} {row['part']:>7} {method:>19} {target:.0%} seed {seed}: accuracy "
                          f"{row['accuracy']:.2%}, sparsity {row['sparsity']:.2%}, {row['seconds']:.0f} s", flush=True)
    header = ["model", "method"] + [f"{t:.0%}" for t in args.sparsities]
    lines = ["# WoodFisher on a tiny ViT and an LSTM (MNIST, 5k training subset)", "",
             common.produced_by(time.perf_counter() - started, argv=argv, script=__file__), "",
             f"* Dense training: Adam lr {args.lr:g}, batch {args.batch_size}, {args.dense_epochs} epochs, seed "
             f"{DENSE_SEED}; test accuracy on the official 10k test set. Seeds {args.seeds}: a seed sets the Fisher "
             "samples (and, gradual, the data order).",
             f"* WoodFisher: {woodfisher_settings(args)}; one-shot in {args.oneshot_steps} steps (Fisher recomputed "
             "after each), global threshold, OBS update.",
             f"* Gradual: {args.epochs} epochs, Adam lr {args.prune_lr:g}, cubic ramp over the first half, an event "
             f"every {args.frequency} steps ({args.gradual_steps} Fisher step(s) per WoodFisher event); tfmot = "
             "`prune_low_magnitude` (per layer, no update).",
             "* Sparsity is over the prunable kernels (patch embedding, the four attention kernels and the MLP of "
             "each block, the head; LSTM kernel, recurrent kernel, head)."]
    for part, methods in (("oneshot", list(ONE_SHOT)), ("gradual", list(GRADUAL))):
        if part in args.parts:
            lines += ["", f"## {'One-shot' if part == 'oneshot' else 'Gradual'}: test accuracy (mean ± sd)", "",
                      common.markdown_table(header, table(rows, part, methods, args.sparsities, dense_accuracy),
                                            "ll" + "r" * len(args.sparsities))]
    if "gradual" in args.parts:
        lines += ["", "Target (gradual): WoodFisher ≥ tfmot magnitude at every level, by ≥ 1.0 point at 90%."]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        common.write_csv(os.path.join(args.out, "vit_lstm.csv"), rows, float_format=".6g")
        with open(os.path.join(args.out, "vit_lstm.md"), "w") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
