"""The Fisher's quadratic model against the measured loss: one-shot pruning with ``diagnostics=True`` on MNIST.

For each configuration, a fresh copy of the dense model is pruned once to --sparsity (default 90%) and the report's
diagnostics are written: the loss increase the event's quadratic model predicts for the weight change it applied,
ḡᵀδw + ½δwᵀFδw and ½δwᵀFδw alone (WoodFisher's model, ḡ ≈ 0), against the measured change of the mean loss on the
same Fisher samples; with several steps, per step and summed (each step on its own Fisher samples). Test accuracy
beside. Configurations: WoodFisher's best one-shot configuration of oneshot_table.py (400×10 Fisher samples,
λ=1e-4, 8 steps, one block), the same in one step, with 1000 per-sample gradients instead of 400 means of 10, and
global magnitude diagnosed under the best configuration's Fisher.

    python benchmarks/loss_diagnostics.py                  # MLPNet at 90%, seed 0 (about a minute on 2 CPU cores)
    python benchmarks/loss_diagnostics.py --models mlpnet cnn --sparsity 0.95

Outputs under --out (default benchmarks/results): loss_diagnostics.csv (one row per step of each run) and
loss_diagnostics.md.
"""
import argparse
import time

import common  # first: imports tf_woodfisher before TensorFlow
import tf_woodfisher as tfw

import oneshot_table

BEST = oneshot_table.METHODS["woodfisher_best"][1]
CONFIGS = {
    "woodfisher_best": ("WoodFisher, best (400×10, λ=1e-4, 8 steps, one block)", dict(BEST)),
    "woodfisher_1step": ("WoodFisher, same in 1 step", dict(BEST, steps=1)),
    "woodfisher_1000x1": ("WoodFisher, 1000×1 samples (per-sample gradients), 8 steps, one block",
                          dict(BEST, num_gradients=1000, fisher_batch_size=1)),
    "magnitude": ("global magnitude, diagnosed under the same Fisher (1 step)",
                  dict(BEST, method="magnitude", steps=1)),
}


def run(key, dense, mnist, name, args):
    label, kwargs = CONFIGS[name]
    model = oneshot_table.fresh_copy(dense)
    started = time.perf_counter()
    report = tfw.one_shot_prune(model, mnist.train, common.LOSS, args.sparsity, seed=args.seed, verbose=0,
                                diagnostics=True, **kwargs)
    seconds = time.perf_counter() - started
    accuracy = common.accuracy(model, mnist.x_test, mnist.y_test)
    print(f"{key:7s} {name:18s}: {accuracy:.2%}, predicted {report.predicted_loss_increase:+.4f} (quadratic "
          f"{report.quadratic_loss_increase:+.4f}), measured {report.measured_loss_increase:+.4f} ({seconds:.1f} s)",
          flush=True)
    rows = [dict(model=key, config=name, step=step, sparsity=args.sparsity, seed=args.seed, accuracy=accuracy,
                 predicted=e.predicted_increase, quadratic=e.quadratic_increase, measured=e.measured_increase,
                 loss_before=e.loss_before, loss_after=e.loss_after, seconds=seconds)
            for step, e in enumerate(report.stats.diagnostics)]
    return rows, report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["mlpnet", "cnn"], default=["mlpnet"])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=common.RESULTS_DIR, help="output folder (default benchmarks/results)")
    common.add_mnist_model_options(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    rows, summary, models = [], [], []
    for key in args.models:
        mnist = common.Mnist(args.data_dir, flatten=key == "mlpnet")
        title, _, load = oneshot_table.MODELS[key]
        dense, recipe = load(args, mnist)
        models.append(f"{title}: {recipe}, dense {common.accuracy(dense, mnist.x_test, mnist.y_test):.2%}")
        for name in args.configs:
            run_rows, report = run(key, dense, mnist, name, args)
            rows += run_rows
            steps = run_rows[-1]["step"] + 1
            ratio = report.measured_loss_increase / report.predicted_loss_increase
            summary.append([title, CONFIGS[name][0], common.percent(run_rows[0]["accuracy"]),
                            f"{report.predicted_loss_increase:+.4f}", f"{report.quadratic_loss_increase:+.4f}",
                            f"{report.measured_loss_increase:+.4f}", f"{ratio:.2f}",
                            f"{run_rows[0]['loss_before']:.4f} → {run_rows[-1]['loss_after']:.4f}"
                            + (f" ({steps} steps)" if steps > 1 else "")])
    per_step = [[r["model"], r["config"], str(r["step"] + 1), f"{r['predicted']:+.4f}", f"{r['quadratic']:+.4f}",
                 f"{r['measured']:+.4f}"] for r in rows if CONFIGS[r["config"]][1]["steps"] > 1]
    notes = (f"One-shot pruning to {args.sparsity:.0%} (global) with `diagnostics=True`, seed {args.seed}, one run per "
             "configuration, no retraining. Predicted: ḡᵀδw + ½δwᵀFδw of the weight change δw each event applied, with "
             "the event's F = λI + GᵀG/m (m gradients, each the mean over fisher_batch_size samples, one block) and ḡ "
             "the mean gradient; quadratic: ½δwᵀFδw alone (WoodFisher's model assumes ḡ ≈ 0). GᵀG/m of means of b "
             "samples is about ḡḡᵀ + (per-sample Fisher − ḡḡᵀ)/b, a smaller F than the per-sample one (scores and OBS "
             "updates do not depend on its scale, the damping aside), hence the 1000×1 row. Measured: the change of "
             "the mean cross-entropy over the event's Fisher samples "
             "(training split), before and after; multi-step: "
             "summed over the steps (each on its own samples, so the sum is not one loss's change; per step below). "
             "measured / predicted: the factor by which the model underestimates the change.")
    header = ["model", "configuration", "test accuracy", "predicted ΔL", "quadratic ½δwᵀFδw", "measured ΔL",
              "measured / predicted", "Fisher-sample loss"]
    text = "\n".join(["# Predicted against measured loss increase (diagnostics=True), one-shot on MNIST", "",
                      common.produced_by(time.perf_counter() - started), "", notes, "",
                      common.markdown_table(header, summary, "llrrrrrl"), "",
                      "Per step of the multi-step runs:", "",
                      common.markdown_table(["model", "configuration", "step", "predicted", "quadratic", "measured"],
                                            per_step, "llrrrr"), "",
                      "Models: " + "; ".join(models) + "."])
    common.write_csv(f"{args.out}/loss_diagnostics.csv", rows)
    with open(f"{args.out}/loss_diagnostics.md", "w") as f:
        f.write(text + "\n")
    print("\n" + text, flush=True)


if __name__ == "__main__":
    main()
