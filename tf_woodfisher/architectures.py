"""The reference architectures for any Keras: each builder takes the Keras module (tf_keras or Keras 3).

``tf_woodfisher.models`` builds them with tf_keras, ``tf_woodfisher.keras3.models`` with Keras 3: the same layers,
names and weights layout, so that a model's weights move between the two. Imports neither Keras.
"""
import numpy as np

MLPNET_KEYS = ("fc1_kernel", "fc2_kernel", "fc3_kernel")


def mlpnet(keras, weights=None):
    """The authors' MLPNet: 784 → 40 → 20 → 10, ReLU, no biases; outputs logits.

    Args:
        keras: the Keras module to build with (``tf_keras`` or ``keras``).
        weights: path of the reference ``.npz`` (keys fc1_kernel, fc2_kernel, fc3_kernel) or None for an
            untrained model (Keras' default initialisers).

    Returns:
        A built ``Sequential`` named 'mlpnet' (layers fc1, fc2, fc3): (n, 784) float32 → (n, 10) logits.

    Raises:
        ValueError: ``weights`` lacks one of the three kernels.
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


def small_cnn(keras, num_classes=10, input_shape=(28, 28, 1)):
    """Two Conv2D and two Dense layers (≈ 0.1M parameters) for 28×28 images; outputs logits.

    Args:
        keras: the Keras module to build with (``tf_keras`` or ``keras``).
        num_classes: outputs of the Dense head.
        input_shape: (height, width, channels) of one image.

    Returns:
        An untrained, built ``Sequential`` named 'small_cnn' (conv1, conv2, fc1, fc2):
        (n, *input_shape) float32 → (n, num_classes) logits.
    """
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
