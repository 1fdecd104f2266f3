"""Which weights of a Keras 3 model are pruned: the model as a list of core :class:`PruningTarget`.

The same built-in table as the tf_keras adapter (:class:`tf_woodfisher.keras_common.LayerTable`), on Keras 3's
classes (matched with ``isinstance``, so subclasses count):

- Dense, EinsumDense, Conv1D/2D/3D and their transposes: ``kernel``.
- DepthwiseConv1D/2D: ``kernel`` (the depthwise kernel).
- SeparableConv1D/2D: ``depthwise_kernel`` and ``pointwise_kernel``.
- Embedding: ``embeddings``.
- MultiHeadAttention: the query, key, value and output ``EinsumDense`` kernels.
- RNN, LSTM, GRU, SimpleRNN (cells, stacked cells): each cell's ``kernel`` and ``recurrent_kernel``;
  Bidirectional and TimeDistributed around them.

Layers with a ``get_prunable_weights()`` method give their own list. Normalisation layers stay dense
silently; any other layer with weights is left dense with a warning naming it and its size. Names are
unique: the layer path in the model (``outer/inner`` for nested models), then the weight's own path
(``mha/query/kernel``). A target holds the ``tf.Variable`` behind the Keras variable (``.value``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import keras

from tf_woodfisher import compat
from tf_woodfisher import keras_common as common
from tf_woodfisher.pruning.targets import PruningTarget

TABLE = common.LayerTable(keras.layers)
LayerSelection = common.LayerSelection

TF_KERAS_MODEL = ("{name!r} is a tf_keras (Keras 2) model: tf_woodfisher.keras3 prunes Keras 3 models; for tf_keras "
                  f"and tfmot models use {common.TF_KERAS_ENTRY}")


def check_keras3_model(model, what: str = "model") -> None:
    """Raise unless ``model`` is a Keras 3 ``keras.Model``.

    Raises:
        ValueError: a tf_keras model (naming ``import tf_woodfisher as tfw``) or anything else.
    """
    if isinstance(model, keras.Model):
        return
    if common.keras_flavour(model) == "tf_keras":
        raise ValueError(TF_KERAS_MODEL.format(name=getattr(model, "name", what)))
    raise ValueError(f"expected a Keras 3 keras.Model as {what}, got {type(model).__module__}.{type(model).__name__}")


def iter_layers(model, prefix: str = ""):
    """(path, layer) of every leaf layer, descending into nested models."""
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer, path + "/")
        else:
            yield path, layer


def find_prunable_weights(model, layers: LayerSelection = None, warn_unpruned: bool = True) -> list:
    """The prunable weights of a built Keras 3 model, in layer order, as core :class:`PruningTarget`.

    Args:
        model: a built Keras 3 model (Sequential, functional or subclassed), or a :class:`~tf_woodfisher.keras3.
            PrunedModel` (its masks are the targets' masks).
        layers: which layers to prune: None (every prunable layer), a layer name or glob pattern (``'conv*'``,
            matched against the layer's name and its path ``outer/inner``), a layer object, a list of these,
            or a predicate ``layer → bool``.
        warn_unpruned: warn about layers with weights that are left dense (only when ``layers`` is None).

    Returns:
        A list of :class:`PruningTarget` (``variable``: the ``tf.Variable`` behind the Keras variable;
        ``owner``: the layer holding it).

    Raises:
        ValueError: a tf_keras model (naming the tfmot entry), an unbuilt model, no prunable layer (in the
            selection), a name that matches no layer, or a selected layer that cannot be pruned.
    """
    pruned_targets = getattr(model, "pruning_targets", None)
    if callable(pruned_targets):  # a PrunedModel: its targets carry its masks
        return pruned_targets(layers)
    check_keras3_model(model)
    if not model.built:
        raise ValueError(f"model {model.name!r} is not built: call it on a batch of data (or build it) first")
    selected, names = common.layer_selector(layers, keras.layers.Layer)
    matched, found, dense = set(), [], []
    for path, layer in iter_layers(model):
        if not selected(path, layer):
            continue
        matched.update(n for n in names if common.name_matches(n, path, layer.name))
        variables = TABLE.prunable_variables(layer)
        if variables is None:
            if layers is not None:
                raise ValueError(f"layer {path!r} ({type(layer).__name__}) was selected but cannot be pruned: it is "
                                 "neither a known prunable layer nor has a get_prunable_weights() method")
            if layer.weights and not isinstance(layer, TABLE.dense_by_design):
                dense.append((path, type(layer).__name__, sum(_size(w) for w in layer.weights)))
            continue
        for variable in variables:
            name = common.weight_name(layer.name, getattr(variable, "path", variable.name))
            found.append(PruningTarget(f"{path}/{name}", as_tf_variable(variable), None, layer))
    missing = [n for n in names if n not in matched]
    common.check_found(model.name, found, missing, dense, layers, warn_unpruned,
                       lambda: [p for p, _ in iter_layers(model)], TABLE)
    return common.unique_targets(found)


def as_tf_variable(variable):
    """The ``tf.Variable`` (or distributed variable) behind a Keras 3 variable; a tf.Variable unchanged."""
    return variable.value if isinstance(variable, keras.Variable) else variable


def keras_variables(model, targets: Sequence[PruningTarget]) -> list:
    """The Keras 3 variable of each target (what optimizers and constraints know), found among the model's weights.

    Raises:
        ValueError: a target whose variable is not one of the model's weights.
    """
    by_id = {id(as_tf_variable(v)): v for v in model.weights}
    missing = [t.name for t in targets if id(t.variable) not in by_id]
    if missing:
        raise ValueError(f"the pruned weights {missing} are not weights of {model.name!r}")
    return [by_id[id(t.variable)] for t in targets]


def unpruned_weight_count(model, targets: Sequence[PruningTarget]) -> int:
    """Entries of the model's trainable weights that are not pruning targets (shared variables once)."""
    return common.unpruned_weight_count(model, targets, as_tf_variable)


def _size(variable) -> int:
    size = 1
    for dim in variable.shape:
        size *= int(dim)
    return size


def input_rank(model) -> Optional[int]:
    """Rank (batch axis included) of the model's first input, when the model knows it."""
    inputs = getattr(model, "inputs", None)
    if inputs:
        return len(inputs[0].shape)
    shapes = compat.keras3_build_shapes(model)  # a subclassed model built by a call or build()
    if shapes and len(shapes) == 1:
        shape = next(iter(shapes.values()))
        if isinstance(shape, (tuple, list)) and all(d is None or isinstance(d, int) for d in shape):
            return len(shape)
    return None
