"""What keeping a small Fisher dataset in memory (``tf_woodfisher.fisher.samples``) saves, against tf.data.

Two measurements in one process, each alternating the two ways (the order swapped every repeat):
- the Fisher pass alone, ``fisher_batches`` built and iterated as an event does (and, once, the first pass that
  reads the dataset into memory): the 5,000 MNIST images of the
  gradual example, 128 groups × 16 samples in one chunk ('mnist 128×16'), and the 5,085 CIFAR-10 images of the
  one-shot benchmark, 512 × 2 in chunks of 64 groups ('cifar10 512×2'), each with the default shuffle buffer;
  'kept': the samples gathered from memory, 'tf.data': read through the pipeline (the samples limit at 0);
- the gradual fit of ``perf_gradual.py`` (the small CNN, 6 epochs, 11 events of 128 × 16), with 'kept' (the
  library's behaviour) and 'tf.data' ('woodfisher_tfdata'), after a first fit that pays the one-time costs.
The two ways give the same chunks, element by element (``tests/test_samples.py``), so the fits compute the same.

    python benchmarks/sample_cache.py              # about 2 min on 2 cores
    python benchmarks/sample_cache.py --repeats 3

Outputs: benchmarks/results/sample_cache.{md,csv}.
"""
import argparse
import statistics
import time

import common  # first: imports tf_woodfisher before TensorFlow
import perf_gradual
import tensorflow as tf
import tf_woodfisher as tfw
from tf_woodfisher.fisher import gradients, samples

MODES = {"kept": "woodfisher", "tf.data": "woodfisher_tfdata"}


def pass_seconds(dataset, groups, group, chunk, seed, mode):
    """Seconds of one event's Fisher pass: its chunks built and read (one element of each fetched)."""
    saved = samples.CACHED_SAMPLE_BYTES
    samples.CACHED_SAMPLE_BYTES = saved if mode == "kept" else 0
    try:
        started = time.perf_counter()
        for x, _ in gradients.fisher_batches(dataset, False, groups, group, chunk, seed):
            x.numpy()
        return time.perf_counter() - started
    finally:
        samples.CACHED_SAMPLE_BYTES = saved


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help=common.MNIST_HELP)
    parser.add_argument("--cifar10-dir", help="folder of cifar10_subset.npz (default: $TFW_CIFAR10_DIR, else "
                                              "../shared/datasets/cifar10)")
    parser.add_argument("--repeats", type=int, default=5, help="fits of each mode after the first (default 5)")
    parser.add_argument("--passes", type=int, default=20, help="Fisher passes of each mode and case (default 20)")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    x, y, fisher = perf_gradual.fit_data(args.data_dir)
    cifar = tfw.data.load_cifar10("train", common.cifar10_dir(args.cifar10_dir))
    cases = {"mnist 128×16": (fisher, 128, 16, 128),
             "cifar10 512×2": (tf.data.Dataset.from_tensor_slices(cifar), 512, 2, 64)}
    rows = []
    for case, (dataset, groups, group, chunk) in cases.items():
        first = pass_seconds(dataset, groups, group, chunk, 0, "kept")  # the dataset read twice, compared, kept
        pass_seconds(dataset, groups, group, chunk, 0, "tf.data")
        rows.append(dict(measure=f"first Fisher pass, {case}", mode="kept", seconds=first))
        seconds = {mode: [] for mode in MODES}
        for seed in range(args.passes):
            for mode in (list(MODES) if seed % 2 == 0 else list(MODES)[::-1]):
                seconds[mode].append(pass_seconds(dataset, groups, group, chunk, seed + 1, mode))
        for mode in MODES:
            rows.append(dict(measure=f"Fisher pass, {case}", mode=mode, seconds=statistics.median(seconds[mode])))
            print(rows[-1], flush=True)
    perf_gradual.fit("woodfisher", x, y, fisher, 0, args.epochs)  # the process's one-time costs
    fits = []
    for repeat in range(args.repeats):
        for mode in (list(MODES) if repeat % 2 == 0 else list(MODES)[::-1]):
            seconds, _, events = perf_gradual.fit(MODES[mode], x, y, fisher, repeat, args.epochs)
            fits.append(dict(mode=mode, fit_s=seconds, event_s=sum(e["seconds"] for e in events),
                             later_event_s=statistics.median(e["seconds"] for e in events[1:])))
            print(fits[-1], flush=True)
    for key, label in (("fit_s", "gradual fit"), ("event_s", "its 11 events"), ("later_event_s", "a later event")):
        for mode in MODES:
            rows.append(dict(measure=label, mode=mode,
                             seconds=statistics.median(f[key] for f in fits if f["mode"] == mode)))
    by = {(r["measure"], r["mode"]): r["seconds"] for r in rows}
    for row in rows:
        tf_data = by.get((row["measure"], "tf.data"))
        row["ratio"] = "—" if tf_data is None else f"{by[(row['measure'], 'kept')] / tf_data:.2f}"
    notes = (f"One process. Fisher passes: medians of {args.passes} per mode and case, alternating, after a first "
             "pass of each mode ('first Fisher pass': the kept mode's first, which reads the dataset twice, compares "
             f"the passes and keeps the samples, and traces the permutation). Fits: medians of {args.repeats} per "
             "mode, alternating, after a first fit. 'kept / tf.data' is the ratio of the medians.")
    columns = {"measure": "{measure}", "mode": "{mode}", "seconds (median)": "{seconds:.4f}",
               "kept / tf.data": "{ratio}"}
    common.write_results("sample_cache", rows, "Fisher samples kept in memory against read through tf.data", notes,
                         columns, started)


if __name__ == "__main__":
    main()
