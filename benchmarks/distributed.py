"""Bytes exchanged and wall time of one-shot WoodFisher with 1 and 2 replicas (2 logical CPUs).

    TFW_MNIST_DIR=../shared/datasets/mnist python benchmarks/distributed.py [--out benchmarks/results]

One block per layer (the gradient rows are all-gathered) and blocks of 20 entries (below m/2, each
tensor's 20 × 20 Gram sums are all-reduced instead, when that moves fewer bytes). On this 2-core
machine the two logical devices share the same cores: the timings show the overhead of the
distributed path, not a speed-up, which needs real devices.
"""
import argparse
import os
import time

os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

import tf_woodfisher as tfw  # noqa: E402
from tf_woodfisher._keras import keras  # noqa: E402
from tf_woodfisher.fisher.blocks import BlockPartition  # noqa: E402
from tf_woodfisher.fisher.grams import reduced_block_size, reduced_bytes  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPZ = os.environ.get("TFW_MLPNET_NPZ", os.path.join(REPO, "..", "shared", "models", "mlpnet_mnist_reference.npz"))


def predicted_bytes(m, segments, block_size, replicas):
    """(all-gathered, all-reduced) bytes of one event: per tensor, its m float32 gradient rows (4·m·n) or,
    where cheaper, its Gram sums (grams.reduced_bytes); then one d-vector per block group for diag(F⁻¹)
    and one for the OBS update F⁻¹u (each group's K blocks padded to a multiple of R); and two 8-byte
    digests per replica (weights and samples)."""
    gathered, reduced = 16 * replicas, 0
    for size in segments:
        block = reduced_block_size(size, block_size, m, 4)
        if block:
            reduced += reduced_bytes(size, block)
        else:
            gathered += 4 * m * size
    for group in BlockPartition.from_segments(segments, block_size).groups:
        gathered += 2 * 4 * -(-group.num_blocks // replicas) * replicas * group.block_size
    return gathered, reduced


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    x, y = tfw.data.load_mnist("train", flatten=True, shuffle_seed=0)
    fisher = tf.data.Dataset.from_tensor_slices((x, y))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    strategies = {1: tf.distribute.get_strategy(), 2: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}
    rows = []
    for block_size in (None, 20):
        for m in (32, 64, 128, 256):
            seconds = {}
            for replicas, strategy in strategies.items():
                times = []
                for _ in range(args.repeats):
                    with strategy.scope():
                        model = tfw.models.mlpnet(NPZ)
                    report = tfw.one_shot_prune(model, fisher, loss, 0.9, num_samples=m, block_size=block_size,
                                                strategy=strategy, verbose=0)
                    times.append(report.total_seconds)
                seconds[replicas] = sorted(times)[len(times) // 2]
                if replicas == 2:
                    segments = [layer.size for layer in report.layers]
                    rows.append((block_size or "layer", m, sum(segments), report.gathered_bytes,
                                 report.reduced_bytes, predicted_bytes(m, segments, block_size, 2),
                                 seconds[1], seconds[2]))
            print(f"blocks {block_size or 'layer'}, m={m}: 1 replica {seconds[1]:.2f} s, "
                  f"2 replicas {seconds[2]:.2f} s", flush=True)
    lines = ["| blocks | m | d | all-gathered bytes | all-reduced bytes | formula (gathered, reduced) "
             "| received per replica | 1 replica s | 2 replicas s | ratio 2/1 |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for blocks, m, d, gathered, reduced, (g_formula, r_formula), one, two in rows:
        received = gathered // 2 + reduced  # (R−1)/R of the gathered bytes, 2(R−1)/R of the reduced payload
        lines.append(f"| {blocks} | {m} | {d:,} | {gathered:,} | {reduced:,} | {g_formula:,}, {r_formula:,} "
                     f"| {received:,} | {one:.2f} | {two:.2f} | {two / one:.2f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "distributed.md"), "w") as f:
        f.write("Command: `TFW_MNIST_DIR=../shared/datasets/mnist python benchmarks/distributed.py`\n\n" + table + "\n")


if __name__ == "__main__":
    main()
