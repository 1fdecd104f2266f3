"""Subprocess of tests_keras3/test_equivalence.py: one Keras flavour per process (the legacy switch is per process).

Usage: python _worker.py MODE OUT.npz, with $TFW_MNIST_DIR and $TFW_MLPNET_NPZ set.

- ``tfw`` / ``tfw3``: prune the reference MLPNet one-shot through the tf_keras path (``import tf_woodfisher as tfw``)
  or through ``tf_woodfisher.keras3`` with the same configuration; write its kernels, the report's sparsities, and
  the values of the schedules of that path (tfmot's, or tf_woodfisher.keras3's) over steps 0 … 120.
- ``mirrored``: Keras 3 only, on 2 logical CPUs: one-shot and gradual pruning under MirroredStrategy and on one
  device; write both runs' kernels and masks.
"""
import json
import os
import sys

import numpy as np

MODE, OUT = sys.argv[1], sys.argv[2]
if MODE == "tfw":
    import tf_woodfisher as api  # noqa: I001  (first: tf_keras)
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    keras = api.keras
    SCHEDULES = {"constant": tfmot.sparsity.keras.ConstantSparsity(0.6, 10, 100, 15),
                 "polynomial": tfmot.sparsity.keras.PolynomialDecay(0.1, 0.85, 5, 95, power=2, frequency=10),
                 "gradual": api.GradualSchedule(0.0, 0.9, 20, 100, frequency=20),
                 "one_shot": api.OneShotSchedule(0.7, 33)}
else:
    import tensorflow as tf

    if MODE == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_woodfisher.keras3 as api
    import keras

    SCHEDULES = {"constant": api.ConstantSparsity(0.6, 10, 100, 15),
                 "polynomial": api.PolynomialDecay(0.1, 0.85, 5, 95, power=2, frequency=10),
                 "gradual": api.GradualSchedule(0.0, 0.9, 20, 100, frequency=20),
                 "one_shot": api.OneShotSchedule(0.7, 33)}
    assert "tf_keras" not in sys.modules and "tensorflow_model_optimization" not in sys.modules

from tf_woodfisher.data import load_mnist  # noqa: E402

CONFIG = dict(method="woodfisher", mode="global", num_gradients=128, fisher_batch_size=1, damping=1e-4,
              fisher_block_size=2000, steps=2, seed=3)


def fisher_data(count=4096):
    x, y = load_mnist("train", os.environ["TFW_MNIST_DIR"], flatten=True, shuffle_seed=0)
    return tf.data.Dataset.from_tensor_slices((x[:count], y[:count]))


def kernels(model):
    return [layer.kernel.numpy() for layer in model.layers]


def equivalence():
    model = api.models.mlpnet(os.environ["TFW_MLPNET_NPZ"])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    report = api.one_shot_prune(model, fisher_data(), loss, 0.9, api.WoodFisherConfig(**CONFIG), verbose=0)
    arrays = {f"kernel_{i}": k for i, k in enumerate(kernels(model))}
    for name, schedule in SCHEDULES.items():
        values = [schedule(tf.constant(step, tf.int64)) for step in range(121)]
        arrays[f"{name}_prune"] = np.array([bool(v[0]) for v in values])
        arrays[f"{name}_sparsity"] = np.array([float(v[1]) for v in values], np.float32)
    np.savez(OUT, **arrays)
    print(json.dumps({"layers": report.as_dict()["layers"], "sparsity": report.sparsity}))


def mirrored():
    x, y = load_mnist("train", os.environ["TFW_MNIST_DIR"], flatten=True, shuffle_seed=0)
    data = tf.data.Dataset.from_tensor_slices((x[:2048], y[:2048]))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    arrays, strategies = {}, {"single": tf.distribute.OneDeviceStrategy("/cpu:0"),
                              "mirrored": tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])}
    for name, strategy in strategies.items():
        with strategy.scope():
            model = api.models.mlpnet(os.environ["TFW_MLPNET_NPZ"])
        api.one_shot_prune(model, data, loss, 0.8, strategy=strategy, verbose=0, **CONFIG)
        arrays.update({f"one_shot_{name}_{i}": k for i, k in enumerate(kernels(model))})
        with strategy.scope():
            model = api.models.mlpnet(os.environ["TFW_MLPNET_NPZ"])
            pruned = api.prune(model, api.GradualSchedule(0.5, 0.9, 2, 6, frequency=2), num_gradients=32,
                               fisher_batch_size=2)
            pruned.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss)
        pruned.fit(x[:256], y[:256], batch_size=32, epochs=1, shuffle=False, verbose=0,
                   callbacks=[api.PruningCallback(data, loss)])
        arrays.update({f"gradual_{name}_{i}": k for i, k in enumerate(kernels(model))})
        arrays.update({f"mask_{name}_{i}": m.numpy() for i, m in enumerate(pruned.masks)})
    np.savez(OUT, **arrays)
    print(json.dumps({"replicas": strategies["mirrored"].num_replicas_in_sync}))


if __name__ == "__main__":
    mirrored() if MODE == "mirrored" else equivalence()
