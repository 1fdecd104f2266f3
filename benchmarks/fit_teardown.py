"""How long ``model.fit`` takes to return after ``on_train_end``, for tfmot's fits and WoodFisher's, short and long.

TensorFlow 2.21 destroys the training data's iterator when ``fit`` returns; the iterator's destructor waits for
one of its threads (``RootDataset::Iterator`` → ``LogicalThreadWrapper``, seen with py-spy), which can take tens
of seconds after a long fit. This script shows that the stall belongs to the length of the
fit, not to the pruning method: the runs of ``perf_gradual.py`` (6 epochs, tfmot and WoodFisher) and tfmot's
fit stretched to about WoodFisher's length (``--long-epochs``), each repeated, in one process.

    python benchmarks/fit_teardown.py              # about 4 min on 2 cores
    python benchmarks/fit_teardown.py --repeats 5

Outputs: benchmarks/results/fit_teardown.{md,csv}.
"""
import argparse
import statistics
import time

import common  # first: imports tf_woodfisher before TensorFlow
import perf_gradual


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help=common.MNIST_HELP)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind (default 3)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of perf_gradual's fits (default 6)")
    parser.add_argument("--long-epochs", type=int, default=14, help="epochs of the long tfmot fit (default 14)")
    args = parser.parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    x, y, fisher = perf_gradual.fit_data(args.data_dir)
    kinds = [("tfmot", args.epochs), ("woodfisher", args.epochs), ("tfmot", args.long_epochs)]
    perf_gradual.fit("tfmot", x, y, fisher, 0, 1)  # the process's one-time costs, not counted
    rows = []
    for repeat in range(args.repeats):
        for method, epochs in kinds:
            seconds, teardown, _ = perf_gradual.fit(method, x, y, fisher, repeat, epochs)
            rows.append(dict(method=method, epochs=epochs, repeat=repeat, fit_s=seconds, teardown_s=teardown))
            print(rows[-1], flush=True)
    summary = "; ".join(
        f"{method} {epochs} epochs: fit {statistics.median(r['fit_s'] for r in group):.1f} s, teardowns "
        + " / ".join(f"{r['teardown_s']:.1f}" for r in group) + " s"
        for method, epochs in kinds
        for group in [[r for r in rows if r["method"] == method and r["epochs"] == epochs]])
    notes = ("The gradual runs of `perf_gradual.py` (small CNN, Adam, batch 64; WoodFisher with its 11 events) in one "
             "process after a warm-up fit; a fit is timed from its call to `on_train_end`, the teardown from there "
             f"to the return of `model.fit`. Medians and every teardown: {summary}.")
    columns = {"method": "{method}", "epochs": "{epochs}", "repeat": "{repeat}",
               "fit s (to on_train_end)": "{fit_s:.2f}", "teardown s": "{teardown_s:.2f}"}
    common.write_results("fit_teardown", rows, "The return of model.fit after on_train_end", notes, columns, started)


if __name__ == "__main__":
    main()
