"""Which weights of a tf_keras model are pruned: the model as a list of core :class:`PruningTarget`.

Built-in layers (matched with ``isinstance``, so subclasses count; tfmot's registry matches the exact class
and refuses a subclass that is not a ``PrunableLayer``: beyond tfmot):

- Dense, EinsumDense, Conv1D/2D/3D and their transposes, LocallyConnected1D/2D: ``kernel``
  (tfmot: the same, except EinsumDense, which tfmot does not prune).
- DepthwiseConv2D: ``depthwise_kernel`` (tfmot: none; beyond tfmot).
- SeparableConv1D/2D: ``depthwise_kernel`` and ``pointwise_kernel`` (tfmot: only the pointwise kernel).
- Embedding: ``embeddings`` (as tfmot).
- MultiHeadAttention: the query, key, value and output ``EinsumDense`` kernels (as tfmot).
- RNN, LSTM, GRU, SimpleRNN (cells, stacked cells): each cell's ``kernel`` and ``recurrent_kernel`` (as tfmot);
  Bidirectional and TimeDistributed around them (tfmot: none).

Layers implementing tfmot's ``PrunableLayer`` (any ``get_prunable_weights`` method) give their own
list, and tfmot pruning wrappers give the (weight, mask) pairs of their ``pruning_vars``.
Normalisation layers stay dense silently; any other layer with weights is left dense with a warning
naming it and its size. Names are unique: the layer path in the model, then the weight's own path.

Recurrent layers are pruned as they are, not unrolled: their per-sample Fisher gradients run through the
while_loop (``tf.map_fn`` over the gradient groups, see :func:`tf_woodfisher.fisher.gradients.make_gradient_fn`).
"""
from __future__ import annotations

from typing import Callable, Iterable, Union

import tf_keras as keras

from tf_woodfisher import compat
from tf_woodfisher import keras_common as common
from tf_woodfisher.pruning.targets import PruningTarget

PruneLowMagnitude = compat.tfmot_pruning_classes()[0]
L = keras.layers
TABLE = common.LayerTable(L)  # the built-in layer table, shared with the Keras 3 adapter
builtin_prunable = TABLE.builtin_prunable
builtin_prunable_variables = TABLE.builtin_prunable_variables
layer_prunable_variables = TABLE.prunable_variables
LayerSelection = Union[None, str, keras.layers.Layer, Callable[[keras.layers.Layer], bool],
                       Iterable[Union[str, keras.layers.Layer]]]


def is_pruning_wrapper(layer) -> bool:
    """Whether ``layer`` is a tfmot pruning wrapper.

    Args:
        layer: any tf_keras layer.

    Returns:
        True for tfmot's ``PruneLowMagnitude`` and its subclasses (``PruneWoodFisher`` included).
    """
    return isinstance(layer, PruneLowMagnitude)


def _iter_layers(model, prefix=""):
    """(path, layer) of every leaf layer (or pruning wrapper), descending into nested models."""
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model) and not is_pruning_wrapper(layer):
            yield from _iter_layers(layer, path + "/")
        else:
            yield path, layer


def _selector(layers: LayerSelection):
    """(predicate(path, layer), names that must match something)."""
    return common.layer_selector(layers, keras.layers.Layer, lambda layer: layer.layer if is_pruning_wrapper(layer)
                                 else layer)


def find_prunable_weights(model, layers: LayerSelection = None, warn_unpruned: bool = True) -> list:
    """The prunable weights of a built tf_keras model, in layer order, as core :class:`PruningTarget`.

    Args:
        model: a built tf_keras model, plain or holding tfmot pruning wrappers (their masks are used).
        layers: which layers to prune: None (every prunable layer), a layer name or glob pattern
            (``'conv*'``, matched against the layer's name and its path ``outer/inner``), a layer
            object, a list of these, or a predicate ``layer → bool``.
        warn_unpruned: warn about layers with weights that are left dense (not in the selection's
            scope: only when ``layers`` is None).

    Returns:
        A list of :class:`PruningTarget` whose ``owner`` is the layer (or wrapper) holding the weight.

    Raises:
        ValueError: not a tf_keras model, an unbuilt model, no prunable layer (in the selection), a
            name that matches no layer, or a selected layer that cannot be pruned.
    """
    if not isinstance(model, keras.Model):
        if common.keras_flavour(model) == "keras3":
            raise ValueError(f"{model.name!r} is a Keras 3 model: tfw (the tfmot path) prunes tf_keras models; "
                             f"for Keras 3 use {common.KERAS3_ENTRY}")
        raise ValueError(f"expected a tf_keras Model, got {type(model).__module__}.{type(model).__name__}")
    if not model.built:
        raise ValueError(f"model {model.name!r} is not built: call it on a batch of data (or build it) first")
    selected, names = _selector(layers)
    matched, found, dense = set(), [], []
    for path, layer in _iter_layers(model):
        inner = layer.layer if is_pruning_wrapper(layer) else layer
        if not selected(path, layer):
            continue
        matched.update(n for n in names if common.name_matches(n, path, inner.name))
        if is_pruning_wrapper(layer):
            pairs = [(weight, mask) for weight, mask, _ in layer.pruning_vars]
        else:
            variables = layer_prunable_variables(layer)
            if variables is None:
                if layers is not None:
                    raise ValueError(f"layer {path!r} ({type(layer).__name__}) was selected but cannot be pruned: "
                                     "it is neither a known prunable layer nor a tfmot PrunableLayer")
                if layer.weights and not isinstance(layer, TABLE.dense_by_design):
                    dense.append((path, type(layer).__name__, sum(int(w.shape.num_elements()) for w in layer.weights)))
                continue
            pairs = [(v, None) for v in variables]
        for variable, mask in pairs:
            # A wrapper is named after the wrapped layer: its path ends in the wrapped layer's name.
            layer_path = path if inner is layer else path[:len(path) - len(layer.name)] + inner.name
            name = common.weight_name(inner.name, variable.name.split(":")[0])
            found.append(PruningTarget(f"{layer_path}/{name}", variable, mask, layer))
    missing = [n for n in names if n not in matched]
    common.check_found(model.name, found, missing, dense, layers, warn_unpruned,
                       lambda: [p for p, _ in _iter_layers(model)], TABLE)
    return common.unique_targets(found)


unpruned_weight_count = common.unpruned_weight_count
