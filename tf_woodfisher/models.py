"""Reference models of the WoodFisher experiments, built with tf_keras."""
import numpy as np

from tf_woodfisher import legacy_keras  # noqa: F401, I001  (first: TF_USE_LEGACY_KERAS=1 before TensorFlow)
import tf_keras as keras

from tf_woodfisher import architectures  # the builders, shared with tf_woodfisher.keras3.models
from tf_woodfisher.architectures import MLPNET_KEYS  # noqa: F401


def mlpnet(weights=None):
    """The authors' MLPNet: 784 → 40 → 20 → 10, ReLU, no biases; outputs logits.

    Args:
        weights: path of the reference ``.npz`` (keys fc1_kernel, fc2_kernel, fc3_kernel) or None for an
            untrained model (Keras' default initialisers).

    Returns:
        A built ``tf_keras.Sequential`` named 'mlpnet' (layers fc1, fc2, fc3): (n, 784) float32 → (n, 10) logits.

    Raises:
        ValueError: ``weights`` lacks one of the three kernels.
    """
    return architectures.mlpnet(keras, weights)


def small_cnn(num_classes=10, input_shape=(28, 28, 1)):
    """Two Conv2D and two Dense layers (≈ 0.1M parameters) for 28×28 images; outputs logits.

    Args:
        num_classes: outputs of the Dense head.
        input_shape: (height, width, channels) of one image.

    Returns:
        An untrained, built ``tf_keras.Sequential`` named 'small_cnn' (conv1, conv2, fc1, fc2):
        (n, *input_shape) float32 → (n, num_classes) logits.
    """
    return architectures.small_cnn(keras, num_classes, input_shape)


def _prunable_layer_base():
    """tfmot's ``PrunableLayer`` (so that ``prune_low_magnitude`` accepts the layers below), imported late."""
    from tensorflow_model_optimization.python.core.sparsity.keras.prunable_layer import PrunableLayer

    return PrunableLayer


@keras.utils.register_keras_serializable(package="tf_woodfisher")
class PositionEmbedding(keras.layers.Layer, _prunable_layer_base()):
    """Adds a learned (tokens, width) position embedding to (n, tokens, width) inputs; never pruned
    (``get_prunable_weights()`` is empty, for tf_woodfisher and tfmot alike)."""

    def build(self, input_shape):
        self.embedding = self.add_weight("embedding", (int(input_shape[1]), int(input_shape[2])),
                                         initializer=keras.initializers.RandomNormal(stddev=0.02))
        super().build(input_shape)

    def call(self, inputs):
        return inputs + self.embedding

    def get_prunable_weights(self):
        return []


def vit_tiny(num_classes=10, input_shape=(28, 28, 1), patch_size=7, width=64, depth=2, heads=4, mlp_dim=128):
    """A tiny Vision Transformer for 28×28 images; outputs logits.

    Non-overlapping ``patch_size`` patches (a strided Conv2D: 7×7 → 16 tokens for MNIST) embedded to ``width``,
    a learned position embedding, ``depth`` pre-norm blocks (LayerNorm → ``heads``-head MultiHeadAttention →
    residual; LayerNorm → Dense ``mlp_dim`` GELU → Dense ``width`` → residual), a final LayerNorm, the mean
    over tokens and a Dense head. Prunable: the patch embedding, the four attention kernels and the two MLP
    kernels of each block, and the head (≈ 69k weights with the defaults).

    Args:
        num_classes: outputs of the head.
        input_shape: (height, width, channels) of one image (each side a multiple of ``patch_size``).
        patch_size: side of the square patches.
        width: token width. depth: transformer blocks. heads: attention heads (key size width // heads).
        mlp_dim: hidden units of each block's MLP.

    Returns:
        An untrained, built functional ``tf_keras.Model`` named 'vit_tiny': (n, *input_shape) float32 →
        (n, num_classes) logits. Layer names: patch_embed, position, block{i}_norm1, block{i}_attention,
        block{i}_norm2, block{i}_mlp1, block{i}_mlp2, norm, head.

    Raises:
        ValueError: an image side that is not a multiple of ``patch_size``, or ``width`` not divisible by ``heads``.
    """
    if input_shape[0] % patch_size or input_shape[1] % patch_size:
        raise ValueError(f"input_shape {input_shape} is not a whole number of {patch_size}×{patch_size} patches")
    if width % heads:
        raise ValueError(f"width={width} is not divisible by heads={heads}")
    L = keras.layers
    inputs = keras.Input(input_shape)
    tokens = (input_shape[0] // patch_size) * (input_shape[1] // patch_size)
    h = L.Conv2D(width, patch_size, strides=patch_size, name="patch_embed")(inputs)
    h = PositionEmbedding(name="position")(L.Reshape((tokens, width), name="tokens")(h))
    for i in range(depth):
        a = L.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm1")(h)
        a = L.MultiHeadAttention(heads, width // heads, name=f"block{i}_attention")(a, a)
        h = L.Add(name=f"block{i}_add1")([h, a])
        m = L.LayerNormalization(epsilon=1e-6, name=f"block{i}_norm2")(h)
        m = L.Dense(mlp_dim, activation="gelu", name=f"block{i}_mlp1")(m)
        m = L.Dense(width, name=f"block{i}_mlp2")(m)
        h = L.Add(name=f"block{i}_add2")([h, m])
    h = L.GlobalAveragePooling1D(name="pool")(L.LayerNormalization(epsilon=1e-6, name="norm")(h))
    return keras.Model(inputs, L.Dense(num_classes, name="head")(h), name="vit_tiny")


def lstm_rows(num_classes=10, input_shape=(28, 28, 1), units=64):
    """An LSTM over the rows of an image (MNIST: 28 steps of 28 features); outputs logits.

    Args:
        num_classes: outputs of the Dense head.
        input_shape: (rows, columns, 1) of one image.
        units: LSTM units (not unrolled: the per-sample Fisher gradients go through its while_loop).

    Returns:
        An untrained, built ``tf_keras.Sequential`` named 'lstm_rows' (rows, lstm, head):
        (n, *input_shape) float32 → (n, num_classes) logits.
    """
    return keras.Sequential([
        keras.Input(input_shape),
        keras.layers.Reshape(input_shape[:2], name="rows"),
        keras.layers.LSTM(units, name="lstm"),
        keras.layers.Dense(num_classes, name="head"),
    ], name="lstm_rows")


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
    """ResNet-20 for CIFAR-shaped input (He et al. 2016, §4.2); outputs logits.

    3 stages × 3 basic blocks of 16/32/64 filters, projection shortcuts, global average pooling, a Dense
    head (≈ 0.27M parameters). For the authors' model and reference weights see :func:`resnet20_cifar`.

    Args:
        num_classes: outputs of the Dense head.
        input_shape: (height, width, channels) of one image.

    Returns:
        An untrained, built ``tf_keras.Model`` named 'resnet20': (n, *input_shape) float32 →
        (n, num_classes) logits.
    """
    inputs = keras.Input(input_shape)
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv1")(inputs)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn1")(h))
    for stage, filters in enumerate((16, 32, 64)):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            h = _resnet_basic_block(h, filters, stride, f"stage{stage + 1}_block{block + 1}")
    h = keras.layers.GlobalAveragePooling2D(name="pool")(h)
    return keras.Model(inputs, keras.layers.Dense(num_classes, name="fc")(h), name="resnet20")


# ------------------------------------------------------------------------- the authors' CIFAR-10 ResNet-20

#: Names of the 18 3×3 convolutions of the residual stages (``layer{S}_{B}_conv{K}``, stage S = 1 … 3,
#: block B = 0 … 2, K = 1, 2), the layers the WoodFisher paper prunes in ResNet-20. Excluded: the stem
#: ``conv1``, the shortcut projections ``layer{2,3}_0_shortcut_conv`` and the head ``fc``.
RESNET20_STAGE_CONV_NAMES = tuple(f"layer{s}_{b}_conv{k}" for s in (1, 2, 3) for b in range(3) for k in (1, 2))
_BN_EPSILON, _BN_MOMENTUM = 1e-5, 0.9  # PyTorch eps 1e-5, momentum 0.1


def _conv3x3_bn(x, filters, stride, conv_name, bn_name, pad_name):
    """ZeroPadding2D(1) → Conv 3×3 'valid' (PyTorch's symmetric padding, also at stride 2) → BN."""
    h = keras.layers.ZeroPadding2D(1, name=pad_name)(x)
    h = keras.layers.Conv2D(filters, 3, stride, padding="valid", use_bias=False, name=conv_name)(h)
    return keras.layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM, name=bn_name)(h)


def _cifar_basic_block(x, filters, stride, name):
    h = _conv3x3_bn(x, filters, stride, f"{name}_conv1", f"{name}_bn1", f"{name}_pad1")
    h = keras.layers.ReLU(name=f"{name}_relu1")(h)
    h = _conv3x3_bn(h, filters, 1, f"{name}_conv2", f"{name}_bn2", f"{name}_pad2")
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:  # option B: 1×1 conv, stride 2, no padding → BN
        shortcut = keras.layers.Conv2D(filters, 1, stride, use_bias=False, name=f"{name}_shortcut_conv")(x)
        shortcut = keras.layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM,
                                                   name=f"{name}_shortcut_bn")(shortcut)
    h = keras.layers.Add(name=f"{name}_add")([h, shortcut])
    return keras.layers.ReLU(name=f"{name}_relu2")(h)


def resnet20_cifar(weights=None, num_classes=10, input_shape=(32, 32, 3)):
    """The WoodFisher authors' CIFAR-10 ResNet-20 (``resnet20_cifar``, option-B shortcuts); outputs logits.

    Stem conv 3×3 (16) → BN → ReLU; three stages of three basic blocks with 16/32/64 filters (stride 2
    in the first block of stages 2 and 3, whose shortcut is Conv 1×1 stride 2 → BN); global average
    pooling → Dense. Every 3×3 convolution is ``ZeroPadding2D(1)`` + ``padding='valid'`` so that the
    stride-2 ones pad symmetrically as PyTorch does (Keras 'same' pads only bottom/right). BN has
    epsilon 1e-5 and momentum 0.9. No bias except in the Dense head.

    Layer names follow the checkpoint's keys (see ``shared/models/README.md``): ``conv1``, ``bn1``,
    ``layer{S}_{B}_conv{1,2}``, ``layer{S}_{B}_bn{1,2}``, ``layer{2,3}_0_shortcut_conv``,
    ``layer{2,3}_0_shortcut_bn``, ``fc``; the npz key of a weight is ``{layer name}_{weight}``
    (``layer1_0_conv1_kernel``, ``bn1_moving_mean``, ``fc_bias``, …: 107 keys). The 18 stage
    convolutions the paper prunes are :data:`RESNET20_STAGE_CONV_NAMES` (see
    :func:`resnet20_stage_convolutions`).

    Args:
        weights: path of the reference ``.npz`` (e.g. ``resnet20_cifar10_reference.npz``, or one written
            by :func:`save_npz_weights`), or None for an untrained model (Keras' default initialisers).
        num_classes: outputs of the Dense head.
        input_shape: (height, width, channels); the reference weights expect (32, 32, 3) images
            normalised as (x/255 − 0.5)/0.5 (``tfw.data.load_cifar10``).

    Returns:
        A built ``tf_keras.Model`` named 'resnet20_cifar': (n, *input_shape) float32 → (n, num_classes) logits.

    Raises:
        ValueError: ``weights`` lacks a key, has an extra key, or has an array whose shape differs from
            the model's (the message names the key).
    """
    inputs = keras.Input(input_shape, name="input")
    h = _conv3x3_bn(inputs, 16, 1, "conv1", "bn1", "conv1_pad")
    h = keras.layers.ReLU(name="relu1")(h)
    for stage, filters in enumerate((16, 32, 64), start=1):
        for block in range(3):
            stride = 2 if stage > 1 and block == 0 else 1
            h = _cifar_basic_block(h, filters, stride, f"layer{stage}_{block}")
    h = keras.layers.GlobalAveragePooling2D(name="avgpool")(h)
    outputs = keras.layers.Dense(num_classes, name="fc")(h)
    model = keras.Model(inputs, outputs, name="resnet20_cifar")
    if weights is not None:
        load_npz_weights(model, weights)
    return model


def _weight_suffix(variable):
    return variable.name.split("/")[-1].split(":")[0]


def named_weights(model):
    """The model's variables keyed as in the reference npz files: ``{layer name}_{weight name}``.

    Args:
        model: a built, unwrapped tf_keras model (nested models are flattened; their layer names are used).

    Returns:
        dict key → ``tf.Variable`` (e.g. ``'layer1_0_conv1_kernel'``, ``'bn1_moving_variance'``), in layer order.

    Raises:
        ValueError: two variables would get the same key.
    """
    keyed = {}

    def visit(layer):
        if isinstance(layer, keras.Model):
            for inner in layer.layers:
                visit(inner)
            return
        for variable in layer.weights:
            key = f"{layer.name}_{_weight_suffix(variable)}"
            if key in keyed:
                raise ValueError(f"two variables of model {model.name!r} map to the key {key!r}")
            keyed[key] = variable

    for layer in model.layers:
        visit(layer)
    return keyed


def load_npz_weights(model, weights):
    """Assign every variable of ``model`` from an npz keyed as :func:`named_weights` (strict).

    Args:
        model: a built, unwrapped tf_keras model.
        weights: path of an ``.npz`` file, or a mapping key → array.

    Raises:
        ValueError: a key of the model is missing from ``weights``, ``weights`` has a key the model
            lacks, or an array's shape differs from its variable's; each message names the key. Nothing
            is assigned then.
    """
    targets = named_weights(model)
    if isinstance(weights, (str, bytes)) or hasattr(weights, "__fspath__"):
        with np.load(weights, allow_pickle=False) as arrays:
            values = {k: arrays[k] for k in arrays.files}
        source = str(weights)
    else:
        values, source = {k: np.asarray(v) for k, v in dict(weights).items()}, "the weights"
    missing = [k for k in targets if k not in values]
    extra = [k for k in values if k not in targets]
    if missing:
        raise ValueError(f"{source} lacks the key(s) {missing} of model {model.name!r}")
    if extra:
        raise ValueError(f"{source} has key(s) {extra} that model {model.name!r} does not have")
    for key, variable in targets.items():
        if tuple(values[key].shape) != tuple(variable.shape):
            raise ValueError(f"{source}: key {key!r} has shape {tuple(values[key].shape)} but model "
                             f"{model.name!r} expects {tuple(variable.shape)}")
    for key, variable in targets.items():
        variable.assign(values[key].astype(variable.dtype.as_numpy_dtype))


def save_npz_weights(model, path):
    """Write every variable of ``model`` to ``path`` (an ``.npz``) keyed as :func:`named_weights`.

    Args:
        model: a built, unwrapped tf_keras model.
        path: the ``.npz`` file to write (``np.savez`` appends ``.npz`` when the name lacks it).

    Raises:
        ValueError: two variables would get the same key (see :func:`named_weights`).
    """
    np.savez(path, **{k: v.numpy() for k, v in named_weights(model).items()})


def resnet20_stage_convolutions(model):
    """The 18 stage 3×3 ``Conv2D`` layers of a :func:`resnet20_cifar` model, in :data:`RESNET20_STAGE_CONV_NAMES` order.

    Works on the plain model, on one nested in another model and on one whose layers tfmot wrapped
    (``prune_low_magnitude(...)``); it returns the ``Conv2D`` layers themselves (inside the wrappers).
    To wrap only these layers with tfmot, clone with
    ``clone_function=lambda l: prune_low_magnitude(l) if l.name in RESNET20_STAGE_CONV_NAMES else l``.

    Args:
        model: a tf_keras model containing the layers ``layer{S}_{B}_conv{K}``.

    Returns:
        list of 18 ``tf_keras.layers.Conv2D``.

    Raises:
        ValueError: some of the 18 names are not Conv2D layers of ``model`` (the message lists them).
    """
    found = {}
    for module in model.submodules:
        if isinstance(module, keras.layers.Conv2D) and module.name in RESNET20_STAGE_CONV_NAMES:
            found.setdefault(module.name, module)
    missing = [n for n in RESNET20_STAGE_CONV_NAMES if n not in found]
    if missing:
        raise ValueError(f"model {model.name!r} has no Conv2D layer(s) {missing}; build it with resnet20_cifar()")
    return [found[n] for n in RESNET20_STAGE_CONV_NAMES]
