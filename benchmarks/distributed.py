"""Bytes exchanged and wall time of one-shot WoodFisher with 1 and 2 replicas (2 logical CPUs).

    TFW_MNIST_DIR=../shared/datasets/mnist python benchmarks/distributed.py [--out benchmarks/results]

One block per layer (the gradient rows are all-gathered) and blocks of 20 entries (below m/2, each
tensor's 20 × 20 Gram sums are all-reduced instead, when that moves fewer bytes). On this 2-core
machine the two logical devices share the same cores: the timings show the overhead of the
distributed path, not a speed-up, which needs real devices.

Outputs under --out: distributed.csv (one row per case) and distributed.md.
"""
import argparse
import statistics
import time

import common  # first: imports tf_woodfisher before TensorFlow
import tf_woodfisher as tfw
import tensorflow as tf
from tf_woodfisher.fisher.blocks import BlockPartition
from tf_woodfisher.fisher.distributed import padded_rows
from tf_woodfisher.fisher.grams import reduced_block_size, reduced_bytes
from tf_woodfisher.fisher.memory import COMPUTE_DTYPES, GRADIENT_DTYPES

# Before anything runs on the CPU: split it into two logical devices.
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

DIGEST_BYTES = 8  # one int64 digest per replica for each consistency check (weights, then Fisher samples)


def predicted_bytes(m, segments, block_size, replicas, gradient_dtype="float32", inverse_dtype="float32"):
    """(all-gathered, all-reduced) bytes of one event: per tensor, its m gradient rows (m·n entries) or,
    where cheaper, its Gram sums (grams.reduced_block_size, grams.reduced_bytes); then, per block group of
    the library's partition, one vector for diag(F⁻¹) and one for the OBS update F⁻¹u, each of the group's
    K blocks padded as the replica executor pads them (distributed.padded_rows); and two digests per replica
    (weights and samples)."""
    gradient_itemsize, inverse_itemsize = GRADIENT_DTYPES[gradient_dtype], COMPUTE_DTYPES[inverse_dtype]
    gathered, reduced = 2 * DIGEST_BYTES * replicas, 0
    for size in segments:
        block = reduced_block_size(size, block_size, m, gradient_itemsize)
        if block:
            reduced += reduced_bytes(size, block)
        else:
            gathered += gradient_itemsize * m * size
    for group in BlockPartition.from_segments(segments, block_size).groups:
        gathered += 2 * inverse_itemsize * padded_rows(group.num_blocks, replicas) * group.block_size
    return gathered, reduced


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=common.RESULTS_DIR)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", help=common.MNIST_HELP)
    parser.add_argument("--weights", help=common.MLPNET_HELP)
    args = parser.parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    mnist, npz = common.Mnist(args.data_dir, flatten=True), common.mlpnet_npz(args.weights)
    strategies = {1: tf.distribute.get_strategy(), 2: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}
    rows = []
    for block_size in (None, 20):
        for m in (32, 64, 128, 256):
            seconds = {}
            for replicas, strategy in strategies.items():
                times = []
                for _ in range(args.repeats):
                    with strategy.scope():
                        model = tfw.models.mlpnet(npz)
                    report = tfw.one_shot_prune(model, mnist.train, common.LOSS, 0.9, num_gradients=m,
                                                fisher_block_size=block_size, strategy=strategy, verbose=0)
                    times.append(report.total_seconds)
                seconds[replicas] = statistics.median(times)
            segments = [layer.size for layer in report.layers]  # the last report: 2 replicas
            formula_gathered, formula_reduced = predicted_bytes(m, segments, block_size, 2)
            rows.append(dict(blocks=block_size or "layer", m=m, d=sum(segments), gathered_bytes=report.gathered_bytes,
                             reduced_bytes=report.reduced_bytes, formula_gathered_bytes=formula_gathered,
                             formula_reduced_bytes=formula_reduced,
                             # (R−1)/R of the gathered bytes, 2(R−1)/R of the reduced payload
                             received_per_replica=report.gathered_bytes // 2 + report.reduced_bytes,
                             seconds_1_replica=seconds[1], seconds_2_replicas=seconds[2]))
            print(f"blocks {block_size or 'layer'}, m={m}: 1 replica {seconds[1]:.2f} s, "
                  f"2 replicas {seconds[2]:.2f} s", flush=True)
    notes = ("One-shot global WoodFisher of the reference MLPNet to 90 % (`tfw.one_shot_prune(..., num_gradients=m, "
             "fisher_block_size=blocks, strategy=...)`), with the default strategy (1 replica) and a "
             "`MirroredStrategy` over two logical CPUs sharing the same cores. Bytes: `report.gathered_bytes` and "
             "`report.reduced_bytes` of the 2-replica run, against the formula of `predicted_bytes`; seconds: "
             f"median `report.total_seconds` of {common.plural(args.repeats, 'run')}.")
    columns = {
        "blocks": "{blocks}", "m": "{m}", "d": "{d:,}", "all-gathered bytes": "{gathered_bytes:,}",
        "all-reduced bytes": "{reduced_bytes:,}",
        "formula (gathered, reduced)": "{formula_gathered_bytes:,}, {formula_reduced_bytes:,}",
        "received per replica": "{received_per_replica:,}", "1 replica s": "{seconds_1_replica:.2f}",
        "2 replicas s": "{seconds_2_replicas:.2f}",
        "ratio 2/1": lambda r: f"{r['seconds_2_replicas'] / r['seconds_1_replica']:.2f}"}
    common.write_results("distributed", rows, "One-shot WoodFisher with 1 and 2 replicas: bytes exchanged and wall "
                         "time", notes, columns, started, out=args.out, align="r" * len(columns))


if __name__ == "__main__":
    main()
