"""Which weights of a tf_keras model are pruned: the model as a list of core :class:`PruningTarget`.

Built-in layers (matched with ``isinstance``, so subclasses count):

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
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import Callable, Iterable, Optional, Sequence, Union

import tf_keras as keras

from tf_woodfisher import compat
from tf_woodfisher.pruning.targets import PruningTarget

PruneLowMagnitude = compat.tfmot_pruning_classes()[0]
L = keras.layers

# (classes, attribute paths); the first match wins (SeparableConv and DepthwiseConv subclass Conv).
_BUILTIN_PRUNABLE = (
    ((L.SeparableConv1D, L.SeparableConv2D), ("depthwise_kernel", "pointwise_kernel")),
    ((L.DepthwiseConv2D,), ("depthwise_kernel",)),
    ((L.Dense, L.EinsumDense, L.Conv1D, L.Conv2D, L.Conv3D, L.Conv1DTranspose, L.Conv2DTranspose,
      L.Conv3DTranspose, L.LocallyConnected1D, L.LocallyConnected2D), ("kernel",)),
    ((L.Embedding,), ("embeddings",)),
    ((L.MultiHeadAttention,), ("_query_dense.kernel", "_key_dense.kernel", "_value_dense.kernel",
                               "_output_dense.kernel")),
)
_DENSE_BY_DESIGN = (L.BatchNormalization, L.LayerNormalization, L.GroupNormalization, L.UnitNormalization,
                    L.Normalization)
LayerSelection = Union[None, str, keras.layers.Layer, Callable[[keras.layers.Layer], bool],
                       Iterable[Union[str, keras.layers.Layer]]]


def is_pruning_wrapper(layer) -> bool:
    return isinstance(layer, PruneLowMagnitude)


def _attribute(layer, path):
    for part in path.split("."):
        layer = getattr(layer, part)
    return layer


def _rnn_cells(layer):
    cell = layer.cell
    return list(cell.cells) if isinstance(cell, L.StackedRNNCells) else [cell]


_RNN_CELLS = (L.LSTMCell, L.GRUCell, L.SimpleRNNCell)


def builtin_prunable(layer) -> bool:
    """Whether the layer's type is one tf_woodfisher prunes by itself (decided before the layer is built)."""
    if isinstance(layer, L.Bidirectional):
        return builtin_prunable(layer.forward_layer) and builtin_prunable(layer.backward_layer)
    if isinstance(layer, L.TimeDistributed):
        return builtin_prunable(layer.layer) or hasattr(layer.layer, "get_prunable_weights")
    if isinstance(layer, L.RNN):
        return all(isinstance(c, _RNN_CELLS) or hasattr(c, "get_prunable_weights") for c in _rnn_cells(layer))
    return any(isinstance(layer, classes) for classes, _ in _BUILTIN_PRUNABLE)


def builtin_prunable_variables(layer) -> Optional[list]:
    """The pruned variables of a built layer of a type tf_woodfisher prunes by itself, else None."""
    if not builtin_prunable(layer):
        return None
    if isinstance(layer, L.Bidirectional):
        return builtin_prunable_variables(layer.forward_layer) + builtin_prunable_variables(layer.backward_layer)
    if isinstance(layer, L.TimeDistributed):
        return layer_prunable_variables(layer.layer)
    if isinstance(layer, L.RNN):
        return [v for cell in _rnn_cells(layer) for v in (
            cell.get_prunable_weights() if hasattr(cell, "get_prunable_weights") else
            [cell.kernel, cell.recurrent_kernel])]
    attributes = next(attrs for classes, attrs in _BUILTIN_PRUNABLE if isinstance(layer, classes))
    return [_attribute(layer, a) for a in attributes]


def layer_prunable_variables(layer) -> Optional[list]:
    """The variables of one (unwrapped) layer that are pruned, or None if the layer type is not prunable:
    its own ``get_prunable_weights()`` (tfmot's PrunableLayer) first, else the built-in table."""
    if hasattr(layer, "get_prunable_weights"):
        return list(layer.get_prunable_weights())
    return builtin_prunable_variables(layer)


def _iter_layers(model, prefix=""):
    """(path, layer) of every leaf layer (or pruning wrapper), descending into nested models."""
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model) and not is_pruning_wrapper(layer):
            yield from _iter_layers(layer, path + "/")
        else:
            yield path, layer


def _weight_name(layer_name, variable):
    name = variable.name.split(":")[0]
    return name[len(layer_name) + 1:] if name.startswith(layer_name + "/") else name.split("/")[-1]


def _selector(layers: LayerSelection):
    """(predicate(path, layer), names that must match something)."""
    if layers is None:
        return (lambda path, layer: True), ()
    if callable(layers) and not isinstance(layers, keras.layers.Layer):
        return (lambda path, layer: bool(layers(layer))), ()
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    layers = list(layers)
    names = [x for x in layers if isinstance(x, str)]
    objects = [x for x in layers if isinstance(x, keras.layers.Layer)]
    others = [x for x in layers if not isinstance(x, (str, keras.layers.Layer))]
    if others:
        raise TypeError(f"layers= takes layer names, layer objects or a predicate, got {others[0]!r}")

    def selected(path, layer):
        inner = layer.layer if is_pruning_wrapper(layer) else layer
        return any(inner is o or layer is o for o in objects) or any(
            fnmatch.fnmatchcase(path, n) or fnmatch.fnmatchcase(inner.name, n) for n in names)

    return selected, names + [o.name for o in objects]


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
        if type(model).__module__.startswith("keras"):
            raise ValueError(f"{model.name!r} is a Keras 3 model: tfw (the tfmot path) prunes tf_keras models; "
                             "use `import tf_woodfisher.keras3 as tfw3` for Keras 3")
        raise ValueError(f"expected a tf_keras Model, got {type(model).__module__}.{type(model).__name__}")
    if not model.built:
        raise ValueError(f"model {model.name!r} is not built: call it on a batch of data (or build it) first")
    selected, names = _selector(layers)
    matched, found, dense = set(), [], []
    for path, layer in _iter_layers(model):
        inner = layer.layer if is_pruning_wrapper(layer) else layer
        if not selected(path, layer):
            continue
        matched.update(n for n in names if fnmatch.fnmatchcase(path, n) or fnmatch.fnmatchcase(inner.name, n)
                       or n == inner.name)
        if is_pruning_wrapper(layer):
            pairs = [(weight, mask) for weight, mask, _ in layer.pruning_vars]
        else:
            variables = layer_prunable_variables(layer)
            if variables is None:
                if layers is not None:
                    raise ValueError(f"layer {path!r} ({type(layer).__name__}) was selected but cannot be pruned: "
                                     "it is neither a known prunable layer nor a tfmot PrunableLayer")
                if layer.weights and not isinstance(layer, _DENSE_BY_DESIGN):
                    dense.append((path, type(layer).__name__, sum(int(w.shape.num_elements()) for w in layer.weights)))
                continue
            pairs = [(v, None) for v in variables]
        for variable, mask in pairs:
            # A wrapper is named after the wrapped layer: its path ends in the wrapped layer's name.
            layer_path = path if inner is layer else path[:len(path) - len(layer.name)] + inner.name
            found.append(PruningTarget(f"{layer_path}/{_weight_name(inner.name, variable)}", variable, mask, layer))
    missing = [n for n in names if n not in matched]
    if missing:
        raise ValueError(f"layers={missing[0]!r} matches no layer of {model.name!r}; its layers are "
                         f"{[p for p, _ in _iter_layers(model)]}")
    if not found:
        raise ValueError(
            f"model {model.name!r} has no prunable layers{' in the selection' if layers is not None else ''} "
            "(Dense, EinsumDense, Conv, DepthwiseConv2D, SeparableConv, Embedding, LocallyConnected, "
            "MultiHeadAttention, RNNs, or a tfmot PrunableLayer)")
    if dense and warn_unpruned and layers is None:
        listing = ", ".join(f"{p} ({kind}, {size:,} weights)" for p, kind, size in dense)
        warnings.warn(f"left dense, not pruned (unknown layer types that are not tfmot PrunableLayers): {listing}",
                      RuntimeWarning, stacklevel=3)
    return _unique(found)


def _unique(targets: Sequence[PruningTarget]) -> list:
    """Targets with a numeric suffix on repeated names (a layer shared twice in a model, say)."""
    seen, out = {}, []
    for target in targets:
        count = seen.get(target.name, 0)
        seen[target.name] = count + 1
        if count:
            target = PruningTarget(f"{target.name}_{count}", target.variable, target.mask, target.owner)
        out.append(target)
    return out


def unpruned_weight_count(model, targets: Sequence[PruningTarget]) -> int:
    """Entries of the model's trainable weights that are not pruning targets (shared variables once)."""
    pruned = {id(t.variable) for t in targets}
    weights = {id(v): v for v in model.trainable_weights if id(v) not in pruned}
    return sum(int(v.shape.num_elements()) for v in weights.values())
