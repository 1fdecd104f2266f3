"""Subprocess of test_grda.py: train with GRDA on one device and under MirroredStrategy on 2 logical CPUs.

Usage: python _grda_distributed_worker.py OUT.npz [keras3]. Writes the final model and optimizer variables of both
runs as single_NN / mirrored_NN arrays and prints a one-line JSON summary. Logical devices must be set
before TensorFlow initialises, hence the separate process. With ``keras3`` it trains Keras 3's model with
``tf_woodfisher.keras3.optimizers.GRDA`` (tests_keras3/test_grda.py), else tf_keras' with
``tf_woodfisher.optimizers.GRDA``.
"""
import json
import sys

import numpy as np

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

if sys.argv[2:] == ["keras3"]:
    import keras  # noqa: E402

    from tf_woodfisher.keras3.optimizers import GRDA  # noqa: E402
else:
    import tf_keras as keras  # noqa: E402

    from tf_woodfisher.optimizers import GRDA  # noqa: E402

EPOCHS, GLOBAL_BATCH, SAMPLES = 3, 16, 64


def build_model():
    """Embedding (sparse IndexedSlices gradients) → mean → Dense(16) → Dense(3) logits."""
    return keras.Sequential([
        keras.Input((5,), dtype="int32"),
        keras.layers.Embedding(40, 8, name="embed"),
        keras.layers.GlobalAveragePooling1D(name="mean"),
        keras.layers.Dense(16, activation="relu", name="fc1"),
        keras.layers.Dense(3, name="fc2"),
    ])


def train(strategy, initial_weights, x, y):
    """Fit for EPOCHS with GLOBAL_BATCH (split across replicas); return (model, optimizer)."""
    with strategy.scope():
        model = build_model()
        model.set_weights(initial_weights)
        lr = keras.optimizers.schedules.ExponentialDecay(0.5, decay_steps=4, decay_rate=0.8)
        model.compile(GRDA(lr, c=0.05, mu=0.6, momentum=0.5, exclude="bias"),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    return model, model.optimizer


def main(out_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 40, (SAMPLES, 5)).astype(np.int32)
    y = (x[:, 0] % 3).astype(np.int64)
    initial = build_model().get_weights()
    single, single_opt = train(tf.distribute.OneDeviceStrategy("/cpu:0"), initial, x, y)
    mirrored_strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    mirrored, mirrored_opt = train(mirrored_strategy, initial, x, y)

    arrays = {}
    for prefix, model, opt in (("single", single, single_opt), ("mirrored", mirrored, mirrored_opt)):
        values = model.get_weights() + [v.numpy() for v in opt.variables]
        arrays.update({f"{prefix}_{i:02d}": value for i, value in enumerate(values)})
    np.savez(out_path, **arrays)
    print(json.dumps({
        "replicas": mirrored_strategy.num_replicas_in_sync,
        "iterations": int(mirrored_opt.iterations.numpy()),
        "expected_iterations": EPOCHS * SAMPLES // GLOBAL_BATCH,
        "zeros": int(sum(np.count_nonzero(w == 0) for w in mirrored.get_weights())),
    }))


if __name__ == "__main__":
    main(sys.argv[1])
