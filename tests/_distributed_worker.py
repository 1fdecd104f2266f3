"""Subprocess body of tests/test_distributed.py (logical devices must be set before TF starts).

usage: _distributed_worker.py mirrored OUT.npz
       _distributed_worker.py multiworker OUT.npz   (TF_CONFIG set: one of the workers)
       _distributed_worker.py single OUT.npz        (the same work on one device, for comparison)
       _distributed_worker.py disagree OUT.npz      (TF_CONFIG set: worker 1 uses other data, then another model)

Each writes the masks and weights it ends with to OUT.npz.
"""
import json
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

ROLE, OUT = sys.argv[1], sys.argv[2]
if ROLE == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
elif ROLE in ("multiworker", "disagree"):  # collectives must be configured before TensorFlow runs anything
    STRATEGY = tf.distribute.MultiWorkerMirroredStrategy()

import tf_woodfisher as tfw  # noqa: E402
import tf_keras as keras  # noqa: E402

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
PER_SAMPLE_LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
MNIST, NPZ = os.environ["TFW_MNIST_DIR"], os.environ["TFW_MLPNET_NPZ"]
x, y = tfw.data.load_mnist("train", MNIST, flatten=True, shuffle_seed=0)
fisher = tf.data.Dataset.from_tensor_slices((x, y))
BATCH = 64
train_x, train_y = x[:BATCH], y[:BATCH]  # one full batch per step: the same update however it is split


def full_batch_dataset(steps):
    data = tf.data.Dataset.from_tensor_slices((train_x, train_y)).batch(BATCH).repeat(steps)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return data.with_options(options)


def one_shot(strategy, method="woodfisher", fisher_block_size=2000, damping=1e-5, fisher_block_order="flat"):
    """Blocks of 2000 entries: the gradient rows are all-gathered; of 20 (< m/2): Gram sums all-reduced."""
    with strategy.scope():
        model = tfw.models.mlpnet(NPZ)
    report = tfw.one_shot_prune(model, fisher, LOSS, 0.9, method=method, num_gradients=64, fisher_batch_size=2,
                                fisher_block_size=fisher_block_size, fisher_block_order=fisher_block_order,
                                damping=damping, steps=2, strategy=strategy, verbose=0)
    return [w.numpy() for w in model.weights], report.sparsity, [report.gathered_bytes, report.reduced_bytes]


def gradual(strategy, steps=12):
    with strategy.scope():
        base = tfw.models.mlpnet(NPZ)
        schedule = tfw.GradualSchedule(0.5, 0.9, begin_step=0, end_step=8, frequency=4)
        model = tfw.prune_woodfisher(base, schedule, num_gradients=32, fisher_block_size=1000)
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), LOSS)
    callback = tfw.UpdatePruningStep(fisher, LOSS)
    model.fit(full_batch_dataset(steps), epochs=1, callbacks=[callback], verbose=0)
    masks = [m.numpy() for layer in model.layers for _, m, _ in layer.pruning_vars]
    return [w.numpy() for w in base.weights], masks, [e["step"] for e in callback.events]


def grda(strategy, steps=20):
    with strategy.scope():
        model = tfw.models.mlpnet(NPZ)
        optimizer = tfw.optimizers.GRDA(learning_rate=0.05, c=0.02, mu=0.6)
        optimizer.build(model.trainable_variables)

    @tf.function
    def step(features, labels):
        def replica_step(f, labels):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(PER_SAMPLE_LOSS(labels, model(f, training=True))) / BATCH  # global-batch mean
            optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

        strategy.run(replica_step, args=(features, labels))

    replicas = strategy.num_replicas_in_sync
    per_replica = BATCH // replicas
    shards = strategy.experimental_distribute_values_from_function(
        lambda ctx: tuple(a[ctx.replica_id_in_sync_group * per_replica:(ctx.replica_id_in_sync_group + 1) * per_replica]
                          for a in (train_x, train_y)))
    for _ in range(steps):
        step(*shards)
    return [w.numpy() for w in model.weights]


def save(**arrays):
    flat = {}
    for key, value in arrays.items():
        if isinstance(value, list):
            flat.update({f"{key}_{i}": v for i, v in enumerate(value)})
        else:
            flat[key] = np.asarray(value)
    np.savez(OUT, **flat)


if ROLE == "mirrored":
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    default = tf.distribute.get_strategy()
    one_shot_mirrored, sparsity_mirrored, bytes_mirrored = one_shot(mirrored)
    one_shot_single, sparsity_single, bytes_single = one_shot(default)
    gradual_mirrored, masks_mirrored, events_mirrored = gradual(mirrored)
    gradual_single, masks_single, events_single = gradual(default)
    results = dict(one_shot_mirrored=one_shot_mirrored, one_shot_single=one_shot_single,
                   sparsity=[sparsity_mirrored, sparsity_single], gathered_bytes=[bytes_mirrored[0], bytes_single[0]],
                   gradual_mirrored=gradual_mirrored, gradual_single=gradual_single,
                   masks_mirrored=masks_mirrored, masks_single=masks_single, events=[events_mirrored, events_single],
                   grda_mirrored=grda(mirrored), grda_single=grda(default),
                   replicas=mirrored.num_replicas_in_sync)
    reduced = {}  # blocks of 20 entries: Gram sums all-reduced (WoodTaylor) and squares summed (diagonal Fisher)
    for name, strategy in (("mirrored", mirrored), ("single", default)):
        for method in ("woodtaylor", "diagonal_fisher"):  # WoodTaylor's Newton step needs a larger damping
            weights, _, exchanged = one_shot(strategy, method, 20, damping=0.1)
            reduced.update({f"{method}_{name}": weights, f"exchanged_{method}_{name}": exchanged})
    for name, strategy in (("mirrored", mirrored), ("single", default)):
        # chunks of whole output units (800 weights: one 784-weight unit of layer 1, all of layers 2 and 3)
        weights, _, exchanged = one_shot(strategy, fisher_block_size=800, fisher_block_order="filter")
        reduced.update({f"filter_{name}": weights, f"exchanged_filter_{name}": exchanged})
    save(**results, **reduced)
elif ROLE == "disagree":
    worker = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    errors = []
    for what in ("data", "model"):
        with STRATEGY.scope():
            model = tfw.models.mlpnet(NPZ)
        data = fisher
        if worker == 1 and what == "data":
            data = fisher.skip(1)
        if worker == 1 and what == "model":
            model.weights[0].assign_add(tf.one_hot(0, 784)[:, None] * 1e-3 * tf.ones([1, 40]))
        try:
            tfw.one_shot_prune(model, data, LOSS, 0.5, num_gradients=8, shuffle_buffer=0, strategy=STRATEGY, verbose=0)
            errors.append("no error")
        except ValueError as error:
            errors.append(str(error))
    np.savez(OUT, errors=np.array(errors))
else:
    strategy = STRATEGY if ROLE == "multiworker" else tf.distribute.get_strategy()
    weights, masks, events = gradual(strategy)
    reduced, _, exchanged = one_shot(strategy, fisher_block_size=20, damping=0.1)  # sums reordered: λ bounds the error
    save(gradual=weights, masks=masks, events=events, grda=grda(strategy), replicas=strategy.num_replicas_in_sync,
         reduced=reduced, exchanged=exchanged)
