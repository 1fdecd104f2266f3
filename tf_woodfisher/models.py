"""Reference models of the WoodFisher experiments, built with tf_keras."""
import numpy as np

from tf_woodfisher._keras import keras

MLPNET_KEYS = ("fc1_kernel", "fc2_kernel", "fc3_kernel")


def mlpnet(weights=None):
    """The authors' MLPNet: 784 → 40 → 20 → 10, ReLU, no biases; outputs logits.

    ``weights``: path of the reference ``.npz`` (keys fc1_kernel, fc2_kernel, fc3_kernel) or None.
    """
    model = keras.Sequential(
        [
            keras.Input((784,)),
            keras.layers.Dense(40, activation="relu", use_bias=False, name="fc1"),
            keras.layers.Dense(20, activation="relu", use_bias=False, name="fc2"),
            keras.layers.Dense(10, use_bias=False, name="fc3"),
        ],
        name="mlpnet",
    )
    if weights is not None:
        with np.load(weights) as arrays:
            missing = [k for k in MLPNET_KEYS if k not in arrays]
            if missing:
                raise ValueError(f"{weights} lacks the MLPNet arrays {missing}")
            model.set_weights([arrays[k] for k in MLPNET_KEYS])
    return model


def small_cnn(num_classes=10, input_shape=(28, 28, 1)):
    """Two Conv2D and two Dense layers (≈ 0.1M parameters) for 28×28 images; outputs logits."""
    return keras.Sequential(
        [
            keras.Input(input_shape),
            keras.layers.Conv2D(16, 3, activation="relu", name="conv1"),
            keras.layers.MaxPooling2D(name="pool1"),
            keras.layers.Conv2D(32, 3, activation="relu", name="conv2"),
            keras.layers.MaxPooling2D(name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(128, activation="relu", name="fc1"),
            keras.layers.Dense(num_classes, name="fc2"),
        ],
        name="small_cnn",
    )
