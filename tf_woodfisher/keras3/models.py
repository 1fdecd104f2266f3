"""The reference models of the WoodFisher experiments, built with Keras 3 (the tf_keras path's
``tf_woodfisher.models``, from the same builders in :mod:`tf_woodfisher.architectures`)."""
import keras

from tf_woodfisher import architectures

__all__ = ["mlpnet", "small_cnn"]


def mlpnet(weights=None) -> keras.Sequential:
    """The authors' MLPNet in Keras 3: 784 → 40 → 20 → 10, ReLU, no biases; outputs logits.

    Args:
        weights: path of the reference ``.npz`` (keys fc1_kernel, fc2_kernel, fc3_kernel) or None.

    Returns:
        A built ``keras.Sequential`` named 'mlpnet' (layers fc1, fc2, fc3): (n, 784) float32 → (n, 10) logits.

    Raises:
        ValueError: ``weights`` lacks one of the three kernels.
    """
    return architectures.mlpnet(keras, weights)


def small_cnn(num_classes: int = 10, input_shape: tuple = (28, 28, 1)) -> keras.Sequential:
    """Two Conv2D and two Dense layers (≈ 0.1M parameters) for 28×28 images, in Keras 3; outputs logits.

    Returns:
        An untrained, built ``keras.Sequential`` named 'small_cnn' (conv1, conv2, fc1, fc2).
    """
    return architectures.small_cnn(keras, num_classes, input_shape)
