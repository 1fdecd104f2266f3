"""Which weights of a Keras model are pruned, and their masks.

Built-in layers (matched with ``isinstance``, so subclasses count): Dense, Conv1D/2D/3D and their
transposes (``kernel``), DepthwiseConv2D (``depthwise_kernel``), SeparableConv1D/2D
(``depthwise_kernel`` and ``pointwise_kernel``), Embedding (``embeddings``). Layers implementing
tfmot's ``PrunableLayer`` (or any ``get_prunable_weights`` method) give their own list, and tfmot
pruning wrappers give the (weight, mask) pairs of their ``pruning_vars``.
"""
import dataclasses

from tensorflow_model_optimization.python.core.sparsity.keras.pruning_wrapper import PruneLowMagnitude

from tf_woodfisher._keras import keras, tf

_BUILTIN_PRUNABLE = (
    # Order matters: SeparableConv and DepthwiseConv subclass Conv.
    ((keras.layers.SeparableConv1D, keras.layers.SeparableConv2D), ("depthwise_kernel", "pointwise_kernel")),
    ((keras.layers.DepthwiseConv2D,), ("depthwise_kernel",)),
    ((keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D), ("kernel",)),
    ((keras.layers.Embedding,), ("embeddings",)),
)


@dataclasses.dataclass(frozen=True, eq=False)
class PrunableWeight:
    """One pruned tensor. ``mask`` is the tfmot mask variable when the layer is wrapped, else None."""

    name: str
    layer: keras.layers.Layer
    variable: tf.Variable
    mask: tf.Variable = None

    @property
    def shape(self):
        return tuple(self.variable.shape)

    @property
    def size(self):
        return int(self.variable.shape.num_elements())


def is_pruning_wrapper(layer):
    return isinstance(layer, PruneLowMagnitude)


def builtin_prunable_attributes(layer):
    """Names of the pruned weights of a built-in layer type, or None for other layers."""
    for classes, attributes in _BUILTIN_PRUNABLE:
        if isinstance(layer, classes):
            return attributes
    return None


def layer_prunable_variables(layer):
    """The variables of one (unwrapped) layer that are pruned, or None if the layer type is not prunable."""
    if hasattr(layer, "get_prunable_weights"):
        return list(layer.get_prunable_weights())
    attributes = builtin_prunable_attributes(layer)
    return None if attributes is None else [getattr(layer, a) for a in attributes]


def _iter_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model) and not is_pruning_wrapper(layer):
            yield from _iter_layers(layer)
        else:
            yield layer


def find_prunable_weights(model):
    """The prunable weights of a built Keras model, in layer order.

    Raises ValueError for an object that is not a Keras model, an unbuilt model, or a model
    without prunable layers.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"expected a tf_keras Model, got {type(model).__module__}.{type(model).__name__}; "
            "build models with tf_keras (Keras 3 models are not supported by tfmot)"
        )
    if not model.built:
        raise ValueError(f"model {model.name!r} is not built: call it on a batch of data (or build it) first")
    found = []
    for layer in _iter_layers(model):
        if is_pruning_wrapper(layer):
            pairs = [(weight, mask) for weight, mask, _ in layer.pruning_vars]
            layer_name = layer.layer.name
        else:
            pairs = [(v, None) for v in layer_prunable_variables(layer) or []]
            layer_name = layer.name
        for variable, mask in pairs:
            short = variable.name.split("/")[-1].split(":")[0]
            found.append(PrunableWeight(f"{layer_name}/{short}", layer, variable, mask))
    if not found:
        raise ValueError(
            f"model {model.name!r} has no prunable layers (Dense, Conv, DepthwiseConv2D, SeparableConv, "
            "Embedding, or a tfmot PrunableLayer)"
        )
    return found


def flatten(tensors):
    """Concatenate tensors into one flat vector of shape (sum of sizes,)."""
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def unflatten(vector, weights):
    """Split a flat vector into tensors shaped like ``weights`` (a list of PrunableWeight)."""
    pieces = tf.split(vector, [w.size for w in weights])
    return [tf.reshape(p, w.shape) for p, w in zip(pieces, weights)]


def current_masks(weights):
    """Flat 0/1 mask: the tfmot mask where a weight has one, else its nonzero pattern (a plain model's
    zeros count as pruned, so repeated pruning calls and multi-step pruning keep them)."""
    return flatten([tf.cast(w.mask if w.mask is not None else tf.not_equal(w.variable, 0), tf.float32)
                    for w in weights])


def assign_weights(weights, values, mask):
    """Write flat ``values`` (d,) and ``mask`` (d,) to the model: weight ← value·mask, tfmot mask ← mask."""
    for weight, value, layer_mask in zip(weights, unflatten(values, weights), unflatten(mask, weights)):
        weight.variable.assign(tf.cast(value * layer_mask, weight.variable.dtype))
        if weight.mask is not None:
            weight.mask.assign(tf.cast(layer_mask, weight.mask.dtype))
