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


def _resnet_basic_block(x, filters, stride, name):
    """Two 3×3 Conv–BN layers and a shortcut (1×1 Conv–BN projection when the shape changes)."""
    shortcut = x
    h = keras.layers.Conv2D(filters, 3, stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name=f"{name}_bn1")(h))
    h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(h)
    h = keras.layers.BatchNormalization(name=f"{name}_bn2")(h)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, stride, use_bias=False, name=f"{name}_proj")(x)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    return keras.layers.ReLU()(keras.layers.Add()([h, shortcut]))


def resnet20(num_classes=10, input_shape=(32, 32, 3)):
    """ResNet-20 for CIFAR-shaped input (He et al. 2016, §4.2): 3 stages × 3 basic blocks of 16/32/64
    filters, projection shortcuts, global average pooling, a Dense head (≈ 0.27M parameters); logits."""
    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inputs)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn1")(h))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            h = _resnet_basic_block(h, filters, stride, f"stage{stage + 1}_block{block + 1}")
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="fc")(h), name="resnet20")
