"""End to end: one-shot global WoodFisher (m = 64, one block per layer) of ResNet-20 and ResNet-50.

Random weights and synthetic inputs (ResNet-20: 32×32×3, 10 classes; ResNet-50:
``tf_keras.applications.ResNet50(weights=None)``, 224×224×3, 1000 classes, its softmax output with
the cross-entropy on probabilities). Each case runs in a fresh process so that its peak resident
memory (``ru_maxrss``: TensorFlow, model, data and the pruning event) is its own. Wall time is split
as the PruningReport splits it: the gradient passes (``gradient_seconds``), the factorisation of the
inverse (``inverse_seconds``), and scores + selection + OBS update (``scoring_seconds``); the rest of
``total_seconds`` (writing the weights, checks) is 'other'. The planner's plan and estimate are
reported with it.

    python benchmarks/perf_end_to_end.py                                   # all cases below
    python benchmarks/perf_end_to_end.py --cases resnet50:4GB              # one case
    python benchmarks/perf_end_to_end.py --case resnet20:default           # (child) one case, prints JSON

Outputs: benchmarks/results/perf_end_to_end.csv and .md.
"""
import argparse
import json
import resource
import time

import numpy as np

import common  # first: imports tf_woodfisher before TensorFlow
import perf_common
import tf_woodfisher as tfw
import tensorflow as tf
import tf_keras as keras
from tf_woodfisher.pruning import pruner

CASES = ("resnet20:default", "resnet50:default", "resnet50:4GB")
SPARSITY = 0.9
NUM_GRADIENTS = 64


def build(name):
    """(model, loss, input shape, number of classes) of a benchmark model with random weights."""
    if name == "resnet20":
        return tfw.models.resnet20(), keras.losses.SparseCategoricalCrossentropy(from_logits=True), (32, 32, 3), 10
    if name == "resnet50":
        return keras.applications.ResNet50(weights=None), keras.losses.SparseCategoricalCrossentropy(), \
            (224, 224, 3), 1000
    raise ValueError(f"unknown model {name!r}")


def synthetic_data(shape, classes, count, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, *shape)).astype(np.float32)
    return tf.data.Dataset.from_tensor_slices((x, rng.integers(0, classes, count)))


class Spy:
    """Wraps ``owner.name`` while active: adds up the seconds spent in it and keeps its last result.

    Used on ``tf_woodfisher.pruning.pruner.plan_memory``, to get the memory plan of the event.
    """

    def __init__(self, owner, name):
        self.owner, self.name, self.original = owner, name, getattr(owner, name)
        self.seconds, self.result = 0.0, None

    def __enter__(self):
        def spied(*args, **kwargs):
            tick = time.perf_counter()
            try:
                self.result = self.original(*args, **kwargs)
                return self.result
            finally:
                self.seconds += time.perf_counter() - tick

        setattr(self.owner, self.name, spied)
        return self

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.original)


def run_case(case):
    """One pruning event in this process → a dict of timings, plan and memory."""
    name, budget = case.split(":")
    model, loss, shape, classes = build(name)
    data = synthetic_data(shape, classes, 4 * NUM_GRADIENTS)
    weights = tfw.find_prunable_weights(model)
    max_memory = None if budget == "default" else budget
    with Spy(pruner, "plan_memory") as planner, perf_common.PeakRSS(interval=0.05) as rss:
        report = tfw.one_shot_prune(model, data, loss, SPARSITY, num_gradients=NUM_GRADIENTS, fisher_block_size=None,
                                    shuffle_buffer=4 * NUM_GRADIENTS, max_memory=max_memory, verbose=0)
    plan = planner.result
    return dict(case=case, model=name, weights=sum(w.size for w in weights), tensors=len(weights),
                max_memory=budget, plan=str(plan), stages=len(plan.stages), gradient_passes=plan.gradient_passes,
                estimate_gb=plan.peak_bytes / 1e9, total_s=report.total_seconds,
                gradients_s=report.gradient_seconds, inverse_s=report.inverse_seconds,
                scores_update_s=report.scoring_seconds,
                other_s=report.total_seconds - report.gradient_seconds - report.inverse_seconds
                - report.scoring_seconds,
                rss_before_gb=rss.start / 1e9, event_peak_rss_gb=rss.peak / 1e9,
                process_peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
                sparsity=report.sparsity)


def run_in_child(case):
    row = perf_common.run_child(case, "--case", case)
    print(f"  {row['total_s']:.0f} s, peak RSS {row['process_peak_rss_gb']:.2f} GB, {row['plan']}", flush=True)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="model:max_memory ('default' or '4GB')")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=common.RESULTS_DIR, help="folder of perf_end_to_end.{md,csv}")
    args = parser.parse_args(argv)
    common.quiet_tensorflow()
    if args.case:
        print(json.dumps(run_case(args.case)), flush=True)
        return
    started = time.perf_counter()
    rows = [run_in_child(case) for case in args.cases]
    notes = (f"One-shot global WoodFisher to {SPARSITY:.0%} sparsity, m = {NUM_GRADIENTS} single-sample gradients, "
             "one block per layer (`fisher_block_size=None`), λ = 1e-5, float32; one process per case. Times are "
             "wall clock of one run (the whole event, tracing included), split as the PruningReport splits them: "
             "gradients = `gradient_seconds`, inverse = `inverse_seconds` (the factorisation only), scores + update "
             "= `scoring_seconds` (scores, selection, OBS update), other = the rest of `total_seconds`. "
             "`max_memory=default` is half the memory "
             "available when the event is planned. Peak RSS is the process's maximum resident memory "
             "(TensorFlow, model, data, event); the planner's estimate counts only the event's buffers "
             "(gradients, blocks, flat vectors). Machine shared with other jobs.")
    columns = {
        "model": "{model}", "prunable weights (tensors)": "{weights:,} ({tensors})", "max_memory": "{max_memory}",
        "plan": lambda r: f"{common.plural(r['stages'], 'stage')}, "
                          f"{common.plural(r['gradient_passes'], 'pass', 'passes')}",
        "total s": "{total_s:.0f}", "gradients s": "{gradients_s:.0f}", "inverse (factorisation) s": "{inverse_s:.1f}",
        "scores + update s": "{scores_update_s:.1f}", "other s": "{other_s:.1f}",
        "planner estimate GB": "{estimate_gb:.2f}", "peak RSS GB": "{process_peak_rss_gb:.2f}"}
    common.write_results("perf_end_to_end", rows, "End to end: one-shot global WoodFisher of ResNet-20 and ResNet-50",
                         notes, columns, started, out=args.out)


if __name__ == "__main__":
    main()
