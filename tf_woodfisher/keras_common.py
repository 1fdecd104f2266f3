"""What the tf_keras (tfmot) adapter and the Keras 3 adapter share, written once for both.

The built-in layer table, the layer selection of ``layers=``, unique target names, the count of weights left
dense, the per-sample loss and the :class:`~tf_woodfisher.pruning.PruningProblem` of a model, the one-shot
run, and the pruning events and logs of the training callbacks. This module imports neither tf_keras nor
Keras 3: each adapter passes its own Keras (its ``layers`` or ``losses`` module, its ``Layer`` class, its
``Progbar``), so that both adapters follow the same rules by construction.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import time
import warnings
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import tensorflow as tf

from tf_woodfisher import compat
from tf_woodfisher.config import LAYERWISE_METHODS, WoodFisherConfig, validate_sparsity
from tf_woodfisher.fisher.gradients import check_loss, first_sample, fisher_loss, resolve_batched
from tf_woodfisher.pruning.pruner import Pruner, PruningProblem, prune_in_steps, sweep_in_steps
from tf_woodfisher.pruning.report import PruningReport, SweepPoint, layer_sparsities, report_of
from tf_woodfisher.pruning.targets import PruningTarget

LayerSelection = Union[None, str, Any, Callable[[Any], bool], Iterable[Any]]

# ------------------------------------------------------------------------------------------ which Keras

TF_KERAS_ENTRY = "`import tf_woodfisher as tfw` (tfw.one_shot_prune, tfw.prune_woodfisher)"
KERAS3_ENTRY = "`import tf_woodfisher.keras3 as tfw3` (tfw3.one_shot_prune, tfw3.prune)"


def keras_flavour(obj: Any) -> Optional[str]:
    """``'keras3'`` or ``'tf_keras'``: the Keras that ``obj``'s class (or a base class) comes from, else None.

    Decided by module names along the MRO, so that user subclasses defined in ``__main__`` count too.
    """
    for cls in type(obj).__mro__:
        root = (cls.__module__ or "").split(".")[0]
        if root == "keras":
            return "keras3"
        if root == "tf_keras":
            return "tf_keras"
    return None


# ------------------------------------------------------------------------------------------ the layer table

# (class names, attribute paths of the pruned weights); the first row whose classes match wins (SeparableConv
# and DepthwiseConv subclass Conv). 'a|b': attribute a if the layer has it, else b (DepthwiseConv's kernel is
# ``depthwise_kernel`` in tf_keras, ``kernel`` in Keras 3). Classes a Keras lacks are skipped.
BUILTIN_TABLE = (
    (("SeparableConv1D", "SeparableConv2D"), ("depthwise_kernel", "pointwise_kernel")),
    (("DepthwiseConv1D", "DepthwiseConv2D"), ("depthwise_kernel|kernel",)),
    (("Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
      "LocallyConnected1D", "LocallyConnected2D"), ("kernel",)),
    (("Embedding",), ("embeddings",)),
    (("MultiHeadAttention",), ("_query_dense.kernel", "_key_dense.kernel", "_value_dense.kernel",
                               "_output_dense.kernel")),
)
RNN_CELLS = ("LSTMCell", "GRUCell", "SimpleRNNCell")
DENSE_BY_DESIGN = ("BatchNormalization", "LayerNormalization", "GroupNormalization", "UnitNormalization",
                   "Normalization", "RMSNormalization")


def _attribute(layer, path):
    for part in path.split("."):
        names = part.split("|")
        layer = getattr(layer, next((n for n in names if hasattr(layer, n)), names[-1]))
    return layer


class LayerTable:
    """The built-in prunable layers of one Keras (its ``keras.layers`` module), matched with ``isinstance``.

    Layers with a ``get_prunable_weights()`` method (tfmot's ``PrunableLayer`` protocol) give their own list.
    RNN layers (and their stacked cells) prune each cell's ``kernel`` and ``recurrent_kernel``;
    ``Bidirectional`` both directions; ``TimeDistributed`` its inner layer.
    """

    def __init__(self, layers_module):
        def classes(names):
            return tuple(c for c in (getattr(layers_module, n, None) for n in names) if c is not None)

        self.rows = tuple((classes(names), attrs) for names, attrs in BUILTIN_TABLE if classes(names))
        self.rnn_cells = classes(RNN_CELLS)
        self.dense_by_design = classes(DENSE_BY_DESIGN)
        self.L = layers_module

    def describe(self) -> str:
        """The prunable layer kinds, for error messages."""
        kinds = ["Dense", "EinsumDense", "Conv", "DepthwiseConv", "SeparableConv", "Embedding"]
        if hasattr(self.L, "LocallyConnected1D"):
            kinds.append("LocallyConnected")
        return ", ".join(kinds + ["MultiHeadAttention", "RNNs"]) + ", or a layer with get_prunable_weights()"

    def _cells(self, layer):
        cell = layer.cell
        return list(cell.cells) if isinstance(cell, self.L.StackedRNNCells) else [cell]

    def builtin_prunable(self, layer) -> bool:
        """Whether the layer's type is one tf_woodfisher prunes by itself (decided before the layer is built)."""
        L = self.L
        if isinstance(layer, L.Bidirectional):
            return self.builtin_prunable(layer.forward_layer) and self.builtin_prunable(layer.backward_layer)
        if isinstance(layer, L.TimeDistributed):
            return self.builtin_prunable(layer.layer) or hasattr(layer.layer, "get_prunable_weights")
        if isinstance(layer, L.RNN):
            return all(isinstance(c, self.rnn_cells) or hasattr(c, "get_prunable_weights") for c in self._cells(layer))
        return any(isinstance(layer, classes) for classes, _ in self.rows)

    def builtin_prunable_variables(self, layer) -> Optional[list]:
        """The pruned variables of a built layer of a type tf_woodfisher prunes by itself, else None."""
        if not self.builtin_prunable(layer):
            return None
        L = self.L
        if isinstance(layer, L.Bidirectional):
            return self.builtin_prunable_variables(layer.forward_layer) + \
                self.builtin_prunable_variables(layer.backward_layer)
        if isinstance(layer, L.TimeDistributed):
            return self.prunable_variables(layer.layer)
        if isinstance(layer, L.RNN):
            return [v for cell in self._cells(layer) for v in (
                cell.get_prunable_weights() if hasattr(cell, "get_prunable_weights") else
                [cell.kernel, cell.recurrent_kernel])]
        attributes = next(attrs for classes, attrs in self.rows if isinstance(layer, classes))
        return [_attribute(layer, a) for a in attributes]

    def prunable_variables(self, layer) -> Optional[list]:
        """The variables of one (unwrapped) layer that are pruned, or None if the layer type is not prunable:
        its own ``get_prunable_weights()`` first, else the built-in table."""
        if hasattr(layer, "get_prunable_weights"):
            return list(layer.get_prunable_weights())
        return self.builtin_prunable_variables(layer)


# ------------------------------------------------------------------------------------------ selection, names

def layer_selector(layers: LayerSelection, layer_class: type, unwrap: Callable = lambda layer: layer):
    """(predicate(path, layer), names that must match some layer) of a ``layers=`` argument.

    Args:
        layers: None (everything), a layer name or glob pattern (matched against the layer's name and its
            path ``outer/inner``), a layer object, a list of these, or a predicate ``layer → bool``.
        layer_class: the Keras ``Layer`` class (tells layer objects from predicates).
        unwrap: the layer a wrapper wraps (names and objects match either).

    Raises:
        TypeError: a list entry that is neither a name nor a layer.
    """
    if layers is None:
        return (lambda path, layer: True), ()
    if callable(layers) and not isinstance(layers, layer_class):
        return (lambda path, layer: bool(layers(layer))), ()
    if isinstance(layers, (str, layer_class)):
        layers = [layers]
    layers = list(layers)
    names = [x for x in layers if isinstance(x, str)]
    objects = [x for x in layers if isinstance(x, layer_class)]
    others = [x for x in layers if not isinstance(x, (str, layer_class))]
    if others:
        raise TypeError(f"layers= takes layer names, layer objects or a predicate, got {others[0]!r}")

    def selected(path, layer):
        inner = unwrap(layer)
        return any(inner is o or layer is o for o in objects) or any(
            fnmatch.fnmatchcase(path, n) or fnmatch.fnmatchcase(inner.name, n) for n in names)

    return selected, names + [o.name for o in objects]


def name_matches(name: str, path: str, layer_name: str) -> bool:
    """Whether a ``layers=`` name or pattern matches a layer at ``path`` named ``layer_name``."""
    return fnmatch.fnmatchcase(path, name) or fnmatch.fnmatchcase(layer_name, name) or name == layer_name


def weight_name(layer_name: str, variable_name: str) -> str:
    """The weight's own path inside its layer: ``variable_name`` (a tf_keras name without ':0', or a Keras 3
    variable path) after its last ``layer_name`` component, else its last component."""
    parts = variable_name.split("/")
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == layer_name:
            return "/".join(parts[i + 1:])
    return parts[-1]


def unique_targets(targets: Sequence[PruningTarget]) -> list:
    """Targets with a numeric suffix on repeated names (a layer shared twice in a model, say)."""
    seen, out = {}, []
    for target in targets:
        count = seen.get(target.name, 0)
        seen[target.name] = count + 1
        if count:
            target = PruningTarget(f"{target.name}_{count}", target.variable, target.mask, target.owner)
        out.append(target)
    return out


def unpruned_weight_count(model, targets: Sequence[PruningTarget], as_variable: Callable = lambda v: v) -> int:
    """Entries of the model's trainable weights that are not pruning targets (shared variables once);
    ``as_variable`` maps a model weight to the variable the targets hold."""
    pruned = {id(t.variable) for t in targets}
    weights = {id(as_variable(v)): v for v in model.trainable_weights if id(as_variable(v)) not in pruned}
    return sum(int(tf.TensorShape(v.shape).num_elements()) for v in weights.values())


def check_found(model_name: str, found: list, missing: list, dense: list, layers: LayerSelection, warn_unpruned: bool,
                all_paths: Callable[[], list], table: LayerTable) -> None:
    """The errors and the warning of a search for prunable weights.

    Args:
        found: the targets found. missing: ``layers=`` names that matched no layer.
        dense: (path, class name, weights) of layers with weights of unknown type, left dense.

    Raises:
        ValueError: a name that matches no layer, or nothing to prune.
    """
    if missing:
        raise ValueError(f"layers={missing[0]!r} matches no layer of {model_name!r}; its layers are {all_paths()}")
    if not found:
        where = " in the selection" if layers is not None else ""
        raise ValueError(f"model {model_name!r} has no prunable layers{where} ({table.describe()})")
    if dense and warn_unpruned and layers is None:
        listing = ", ".join(f"{p} ({kind}, {size:,} weights)" for p, kind, size in dense)
        warnings.warn(f"left dense, not pruned (unknown layer types without get_prunable_weights()): {listing}",
                      RuntimeWarning, stacklevel=4)


# ------------------------------------------------------------------------------------------ loss, problem

def _as_loss_fn(loss: Any, losses_module, no_reduction: Any) -> Callable:
    """One output's loss as a callable (y_true, y_pred[, sample_weight]) → per-element losses."""
    if isinstance(loss, str):
        loss = losses_module.get(loss)
    if isinstance(loss, losses_module.Loss):
        config = dict(loss.get_config(), reduction=no_reduction)
        return type(loss).from_config(config)
    if not callable(loss):
        raise TypeError(f"loss must be a Keras loss, a loss name or a callable, got {loss!r}")
    return loss


def _keras_loss(fn) -> bool:
    """Whether ``fn`` is a loss function defined in Keras' ``losses`` module, or an object of a loss class defined
    there (exactly that class) whose wrapped function, if any, is one."""
    owner = fn if inspect.isfunction(fn) else type(fn)
    if not (getattr(owner, "__module__", None) or "").startswith(("tf_keras.src.losses", "keras.src.losses")):
        return False
    inner = None if inspect.isfunction(fn) else getattr(fn, "fn", None)
    return inner is None or _keras_loss(inner)


def _listing(names) -> str:
    return ", ".join(repr(n) for n in names)


class KerasFisherLoss:
    """The per-sample loss of a Keras model, combined over its outputs as Keras combines them.

    Sample i's loss is Σ_k w_k · mean(loss_k(y_k[i], ŷ_k[i])) over the outputs k that have a loss (w_k their
    ``loss_weights``, default 1; the mean over an output's non-batch axes, e.g. the time steps), so that the
    mean over samples is Keras' own loss (``sum_over_batch_size`` of each output, weighted and summed),
    without the regularisation losses, which no sample changes. With sample weights, each output's element
    losses are weighted as Keras weights them (a (n,) weight per sample, (n, T) per time step, or a list /
    dict of them per output) before that mean: Keras' convention of dividing by the number of samples.
    Half-precision predictions (mixed precision) are cast to float32 first.

    Args:
        loss: one loss for every output (a name, a ``Loss`` object, rebuilt with ``reduction=no_reduction``,
            or a callable returning per-sample or per-element losses), a list with one per output, or a dict
            keyed by output name (outputs it leaves out get no loss, as in Keras).
        losses_module: the adapter's ``keras.losses``.
        no_reduction: that Keras' "no reduction" value (tf_keras ``Reduction.NONE``, Keras 3 ``None``).
        output_names: the model's output names in order (None: unknown, then checked at the first call).
        loss_weights: None, a list with one weight per output, or a dict keyed by output name.

    Raises:
        TypeError: a loss that is neither a name, a ``Loss`` nor a callable; loss_weights not a list or dict.
        ValueError: a list of losses or weights whose length is not the number of outputs, or a dict key
            that names no output (the message lists the outputs).
    """

    def __init__(self, loss: Any, losses_module, no_reduction: Any, output_names: Optional[Sequence[str]] = None,
                 loss_weights: Any = None):
        self.structure = "dict" if isinstance(loss, dict) else "list" if isinstance(loss, (list, tuple)) else "one"
        convert = lambda value: _as_loss_fn(value, losses_module, no_reduction)  # noqa: E731
        if self.structure == "dict":
            self.losses = {name: convert(value) for name, value in loss.items() if value is not None}
        elif self.structure == "list":
            self.losses = [None if value is None else convert(value) for value in loss]
        else:
            self.losses = convert(loss)
        if loss_weights is not None and not isinstance(loss_weights, (dict, list, tuple)):
            raise TypeError(f"loss_weights must be a list (one per output) or a dict keyed by output name, "
                            f"got {loss_weights!r}")
        self.loss_weights = loss_weights
        self.output_names = list(output_names) if output_names else None
        if self.output_names is not None:
            self._check(self.output_names)

    @property
    def builtin(self) -> bool:
        """Whether every output's loss is one of Keras' own (a loss class or function of its ``losses`` module,
        given by name or as an object), each a function of one sample's label and prediction."""
        losses = self.losses.values() if self.structure == "dict" else \
            self.losses if self.structure == "list" else [self.losses]
        return all(fn is None or _keras_loss(fn) for fn in losses)

    def _check(self, names: Sequence[str]) -> None:
        """Raise ValueError unless losses and weights fit outputs ``names`` (in order)."""
        count = len(names)
        for what, value in (("losses", self.losses if self.structure != "one" else None),
                            ("loss_weights", self.loss_weights)):
            if isinstance(value, (list, tuple)) and len(value) != count:
                raise ValueError(f"{len(value)} {what} given for a model with {count} output"
                                 f"{'s' * (count != 1)} ({_listing(names)}): give one per output, or a dict keyed "
                                 "by output name")
            if isinstance(value, dict):
                unknown = [k for k in value if k not in names]
                if unknown:
                    raise ValueError(f"{what} name{'s' * (len(unknown) > 1)} {_listing(unknown)} match no output "
                                     f"of the model; its outputs are {_listing(names)}")
        if self.structure == "dict" and not self.losses:
            raise ValueError(f"the dict of losses gives no loss for any output ({_listing(names)})")

    def _outputs(self, y_pred) -> tuple:
        """(names, predictions) of the model's outputs, in the model's order."""
        if isinstance(y_pred, dict):
            names = [n for n in (self.output_names or []) if n in y_pred] or sorted(y_pred)
            return names, [y_pred[n] for n in names]
        predictions = list(y_pred) if isinstance(y_pred, (list, tuple)) else [y_pred]
        names = self.output_names if self.output_names and len(self.output_names) == len(predictions) else \
            [f"output_{i}" for i in range(len(predictions))]
        return names, predictions

    @staticmethod
    def _per_output(value, names, what, needed):
        """``value`` (one for all outputs, a list, or a dict by name) as a list aligned with ``names``."""
        if isinstance(value, dict):
            missing = [n for n, need in zip(names, needed) if need and n not in value]
            if missing:
                raise ValueError(f"the {what} dict has no entry for output{'s' * (len(missing) > 1)} "
                                 f"{_listing(missing)}; it has {_listing(value)}")
            return [value.get(n) for n in names]
        if isinstance(value, (list, tuple)):
            if len(value) != len(names):
                raise ValueError(f"{len(value)} {what} for a model with {len(names)} output"
                                 f"{'s' * (len(names) != 1)} ({_listing(names)})")
            return list(value)
        return [value] * len(names)

    def _combined(self, y_true, y_pred, sample_weight=None):
        names, predictions = self._outputs(y_pred)
        if self.output_names is None:
            self._check(names)
        losses = self._per_output(self.losses, names, "losses", [True] * len(names))
        needed = [fn is not None for fn in losses]
        if len(names) == 1 and not isinstance(y_true, (dict, list, tuple)):
            labels = [y_true]
        else:
            labels = self._per_output(y_true if isinstance(y_true, (dict, list, tuple)) else [y_true], names,
                                      "labels", needed)
        weights = self._per_output(self.loss_weights, names, "loss_weights", [False] * len(names)) \
            if self.loss_weights is not None else [1.0] * len(names)  # as Keras: a missing weight is 1
        sample_weights = self._per_output(sample_weight, names, "sample weights", needed) \
            if isinstance(sample_weight, (dict, list, tuple)) else [sample_weight] * len(names)
        total = None
        for fn, label, prediction, weight, per_sample in zip(losses, labels, predictions, weights, sample_weights):
            if fn is None:
                continue
            if prediction.dtype in (tf.float16, tf.bfloat16):
                prediction = tf.cast(prediction, tf.float32)
            value = _output_loss(fn, label, prediction, per_sample)
            value = tf.cast(value, tf.float64 if prediction.dtype == tf.float64 else tf.float32)
            term = value if weight is None or weight == 1.0 else value * tf.cast(weight, value.dtype)
            total = term if total is None else total + tf.cast(term, total.dtype)
        return total

    def __call__(self, y_true, y_pred):
        return self._combined(y_true, y_pred)

    def with_sample_weight(self, y_true, y_pred, sample_weight):
        """Per-sample losses (n,) with ``sample_weight`` applied as Keras applies it (see the class)."""
        return self._combined(y_true, y_pred, sample_weight)


def _output_loss(fn, y_true, y_pred, sample_weight):
    """One output's per-sample losses (n,): its element losses (weighted) averaged over the non-batch axes."""
    if sample_weight is not None and _takes_sample_weight(fn):
        value = fn(y_true, y_pred, sample_weight=sample_weight)
    else:
        value = tf.convert_to_tensor(fn(y_true, y_pred))
        if sample_weight is not None:
            weight = tf.cast(sample_weight, value.dtype)
            while weight.shape.rank is not None and value.shape.rank is not None and weight.shape.rank > \
                    value.shape.rank and weight.shape[-1] == 1:
                weight = tf.squeeze(weight, -1)
            while weight.shape.rank is not None and value.shape.rank is not None and \
                    weight.shape.rank < value.shape.rank:
                weight = tf.expand_dims(weight, -1)
            value = value * weight
    value = tf.convert_to_tensor(value)
    if value.shape.rank is not None and value.shape.rank > 1:
        value = tf.reduce_mean(value, axis=list(range(1, value.shape.rank)))
    return value


def _takes_sample_weight(fn) -> bool:
    """Whether ``fn`` is a Keras ``Loss`` object (whose ``__call__`` applies ``sample_weight`` itself)."""
    return any(cls.__name__ == "Loss" and (cls.__module__ or "").split(".")[0] in ("keras", "tf_keras")
               for cls in type(fn).__mro__)


def per_sample_loss(loss: Any, losses_module, no_reduction: Any, output_names: Optional[Sequence[str]] = None,
                    loss_weights: Any = None) -> KerasFisherLoss:
    """(y_true, y_pred) → per-sample losses (n,), from a Keras loss, or a list / dict of them per output.

    Args:
        loss: a loss name (``'sparse_categorical_crossentropy'``), a ``Loss`` object (rebuilt from its config
            with ``reduction=no_reduction``), a callable returning per-sample or per-element losses, or a list
            or dict of these (one per output), as ``model.compile`` takes them.
        losses_module: the adapter's ``keras.losses``.
        no_reduction: that Keras' "no reduction" value (tf_keras ``Reduction.NONE``, Keras 3 ``None``).
        output_names: the model's output names, to check a list or dict of losses against (None: at the first
            call).
        loss_weights: as ``compile``'s: a list or a dict by output name.

    Returns:
        A :class:`KerasFisherLoss` (it also applies sample weights, see its ``with_sample_weight``).

    Raises:
        TypeError: ``loss`` is none of these.
        ValueError: a loss structure that does not match the outputs (see :class:`KerasFisherLoss`).
    """
    return KerasFisherLoss(loss, losses_module, no_reduction, output_names, loss_weights)


def model_problem(targets: Sequence[PruningTarget], network, dataset, loss: Any, config: WoodFisherConfig,
                  loss_fn: Callable[[Any], Callable], input_rank: Any, batched: Optional[bool] = None
                  ) -> PruningProblem:
    """The :class:`PruningProblem` of ``targets`` in ``network`` (the model to differentiate).

    Args:
        network: called as ``network(x, training=False)`` (inference mode: no dropout, BatchNorm statistics
            and pruning steps stay as they are).
        dataset: the Fisher ``tf.data.Dataset`` (unused, may be None, for magnitude pruning).
        loss: the Keras loss the user gave; ``loss_fn(loss)`` makes it per-sample.
        config: decides whether gradients are needed.
        input_rank: rank of the network's input (batch axis included), or a list with one per input, or None
            when unknown: tells batched datasets from unbatched ones.
        batched: whether ``dataset`` yields batches; None: told from ``input_rank`` (an error asks for it
            when it cannot be told, never a guess).

    Raises:
        ValueError: a method that needs gradients without dataset or loss, an empty dataset, a loss that does
            not fit the model's outputs and the dataset's labels, or batched=None where it cannot be told.
    """
    if not config.needs_gradients:
        return PruningProblem(targets)
    if dataset is None:
        raise ValueError(f"method {config.method!r} needs a Fisher dataset: a tf.data.Dataset of (x, y) pairs")
    if loss is None:
        raise ValueError(f"method {config.method!r} needs a loss (a Keras loss object, name or function)")
    per_sample = loss_fn(loss)
    batched = resolve_batched(dataset, batched, input_rank)
    forward = lambda x: network(x, training=False)  # noqa: E731
    check_loss(forward, fisher_loss(per_sample, dataset), *first_sample(dataset, batched))
    return PruningProblem(targets, forward, per_sample, dataset, batched)


def run_one_shot(targets: Sequence[PruningTarget], problem: PruningProblem, config: WoodFisherConfig,
                 target_sparsity: float, strategy, verbose: int, progbar: type, unpruned: Callable[[], int],
                 started: float) -> PruningReport:
    """The one-shot run of both adapters' ``one_shot_prune`` on an already built problem.

    Args:
        progbar: the adapter's ``keras.utils.Progbar`` class. unpruned: counts the weights left dense.
        started: ``time.perf_counter()`` when the call began.
    """
    pruner = Pruner(problem, config, strategy)
    start_sparsity = pruner.sparsity()
    if start_sparsity > target_sparsity:
        warnings.warn(f"the model is already {start_sparsity:.2%} sparse, above target {target_sparsity:.2%}; "
                      "pruned weights stay pruned", RuntimeWarning, stacklevel=3)
    if verbose and pruner.plan is not None and pruner.plan.streamed:
        print(f"memory plan: {pruner.plan}")
    bar = progbar(config.steps * pruner.work_units(), verbose=verbose, unit_name="unit") if verbose else None
    stats = prune_in_steps(pruner, target_sparsity, config.seed, on_progress=bar.update if bar is not None else None)
    report = report_of(config, target_sparsity, targets, stats, time.perf_counter() - started, unpruned())
    if verbose:
        print(report)
    return report


def run_sweep(config: WoodFisherConfig, sparsities: Sequence[float], evaluate: Callable[[], Any],
              model_variables: Sequence[Any], *, prune_one: Callable[[float], PruningReport],
              fisher_problem: Callable[[], tuple], strategy=None, after_prune: Optional[Callable[[], Any]] = None,
              verbose: int = 0, cumulative: bool = False) -> list:
    """The sparsity sweep of both adapters' ``one_shot_sweep`` (see :func:`tf_woodfisher.one_shot_sweep`).

    Args:
        config: the validated configuration.
        sparsities: the targets, each in [0, 1), in the order run.
        evaluate: called with the model pruned to each sparsity; its result is the point's ``value``.
        model_variables: every variable of the model, restored after each point (weights, masks, BatchNorm
            statistics), so that each point starts from the same model and the sweep leaves it as it was;
            with ``cumulative`` only after the last point (each point continues from the previous one).
        prune_one: the adapter's ``one_shot_prune(model, ..., sparsity, config)``, used for the layer-wise
            methods (every point a full run).
        fisher_problem: () → (targets, :class:`PruningProblem`, count of weights left dense) for the others.
        strategy: a ``tf.distribute`` strategy, or None for the current one.
        after_prune: run after pruning each point and before ``evaluate`` (the BatchNorm recalibration); its
            result becomes the report's ``recalibration``.
        verbose: 1 prints one line per point.
        cumulative: one multi-step run through the sparsities (see :func:`~tf_woodfisher.pruning.sweep_in_steps`).

    Returns:
        One :class:`~tf_woodfisher.pruning.SweepPoint` per point, in the order run; each report's
        ``total_seconds`` is the wall-clock time since the previous point ended (pruning and recalibration).

    Raises:
        ValueError: an empty ``sparsities``, one outside [0, 1), or ``cumulative`` with a layer-wise method.
    """
    sparsities = [validate_sparsity(s) for s in sparsities]
    if not sparsities:
        raise ValueError("one_shot_sweep needs at least one sparsity")
    if config.method in LAYERWISE_METHODS:
        if cumulative:
            raise ValueError(f"cumulative=True is a multi-step Fisher run; method {config.method!r} reconstructs "
                             "each layer once: use independent points (cumulative=False)")

        def drive(on_point):
            for sparsity in sparsities:
                on_point(sparsity, prune_one(sparsity))
    else:
        targets, problem, unpruned = fisher_problem()
        pruner = Pruner(problem, config, strategy)

        def drive(on_point):
            sweep_in_steps(pruner, sparsities, config.seed, lambda sparsity, stats: on_point(
                sparsity, report_of(config, sparsity, targets, stats, 0.0, unpruned)), cumulative=cumulative)

    saved = [(variable, variable.numpy()) for variable in model_variables]
    points, clock = [], [time.perf_counter()]

    def restore():
        for variable, array in saved:
            variable.assign(array)

    def on_point(sparsity, report):
        recalibration = after_prune() if after_prune is not None else None
        report = dataclasses.replace(report, recalibration=recalibration,
                                     total_seconds=time.perf_counter() - clock[0])
        value = evaluate()
        points.append(SweepPoint(float(sparsity), report, value))
        if verbose:
            print(f"sweep: target {sparsity:.2%}, sparsity {report.sparsity:.2%}, {report.total_seconds:.2f} s: "
                  f"{value}")
        if not cumulative:
            restore()
        clock[0] = time.perf_counter()

    drive(on_point)
    restore()
    return points


# ------------------------------------------------------------------------------------------ callbacks

def reset_optimizer_slots(optimizer, targets: Sequence[PruningTarget], variables: Optional[Sequence] = None) -> None:
    """Zero the optimizer state (momentum, Adam moments) of the masked entries of each target (mask required).

    ``variables``: the variables the optimizer knows each target by (Keras 3 variables), default the targets'.
    """
    variables = variables or [t.variable for t in targets]
    for target, variable in zip(targets, variables):
        for slot in compat.optimizer_slots(optimizer, variable):
            slot.assign(slot * tf.cast(target.mask, slot.dtype))


class ScheduleDecisions:
    """A schedule's ``(should_prune, sparsity)`` at each training step, read per batch from NumPy.

    A schedule is a function of the step (tfmot's contract: its wrappers call it in their graphs), so its
    decisions for a window of steps are computed by one compiled ``tf.map_fn`` of the schedule itself and
    looked up per batch: an eager call of a tfmot schedule costs 0.3–1.2 ms, at every batch of ``fit``
    (0.4–0.6 s of a 474-step fit here, against 0.13–0.15 s for the trace and first window). Windows start at 256
    steps and double up to 4096.
    """

    FIRST_WINDOW, LARGEST_WINDOW = 256, 4096

    def __init__(self, schedule):
        schedule = compat.user_code(schedule)  # a user's schedule may branch on the step in Python

        def decision(step):
            should_prune, sparsity = schedule(step)
            return tf.cast(should_prune, tf.bool), tf.cast(sparsity, tf.float32)

        @compat.function(input_signature=[tf.TensorSpec([None], tf.int64)])
        def decisions(steps):
            return tf.map_fn(decision, steps, fn_output_signature=(tf.bool, tf.float32))

        self._function = decisions
        self._start, self._prune, self._sparsity = 0, np.zeros(0, bool), np.zeros(0, np.float32)

    def at(self, step: int) -> tuple:
        """``(should_prune: bool, sparsity: float)`` of the schedule at training ``step``."""
        index = step - self._start
        if not 0 <= index < len(self._prune):
            size = min(max(2 * len(self._prune), self.FIRST_WINDOW), self.LARGEST_WINDOW)
            with tf.device("/cpu:0"):  # scalar work on the host: no device round trip
                prune, sparsity = self._function(tf.range(step, step + size, dtype=tf.int64))
            self._start, self._prune, self._sparsity = step, prune.numpy(), sparsity.numpy()
            index = 0
        return bool(self._prune[index]), float(self._sparsity[index])


class PruningEvents:
    """The pruning events of a training callback: run one, record it, print it, write it to TensorBoard,
    and put the sparsities into the epoch's logs. Used by ``tfw.UpdatePruningStep`` and ``tfw3.PruningCallback``.

    The callback sets ``self.pruner`` (a :class:`Pruner`, None while there is nothing to prune), the schedule
    (by :meth:`_set_schedule`), ``self._step`` (the last training step counted), ``self.verbose``,
    ``self.events`` (a list), ``self._writer`` (a summary writer or None) and implements :meth:`_after_event`
    (reset optimizer slots, record the step of the masks).
    """

    def _after_event(self, step: int) -> None:
        raise NotImplementedError

    def prune(self, step: int, sparsity: float) -> dict:
        """Run one pruning event (``config.steps`` Fisher recomputations) to ``sparsity`` at training ``step``.

        Returns:
            The event's record (``step``, ``sparsity``, ``seconds``, ``stats``, ``layers``), also appended to
            :attr:`events`.
        """
        sparsity = validate_sparsity(sparsity, f"the schedule's sparsity at step {step}")
        started = time.perf_counter()
        pruner = self.pruner
        stats = prune_in_steps(pruner, sparsity, pruner.config.seed, step)
        self._after_event(step)
        event = {"step": step, "sparsity": pruner.sparsity(), "seconds": time.perf_counter() - started,
                 "stats": stats, "layers": {layer.name: layer.sparsity for layer in layer_sparsities(pruner.targets)}}
        self.events.append(event)
        if self.verbose:
            print(f"\nWoodFisher pruning at step {step}: sparsity {event['sparsity']:.2%} in {event['seconds']:.2f} s")
        if self._writer is not None:
            with self._writer.as_default(step=step):
                tf.summary.scalar("woodfisher/sparsity", event["sparsity"])
                tf.summary.scalar("woodfisher/event_seconds", event["seconds"])
                for name, value in event["layers"].items():
                    tf.summary.scalar(f"woodfisher/sparsity/{name}", value)
            self._writer.flush()
        return event

    def _advance(self, read_step: Callable[[], int]) -> None:
        """Count one training batch; at a pruning step of ``self.schedule``, resynchronise the count with
        ``read_step()`` (the model's step variable, read once per event) and run the event."""
        self._step += 1  # the step this batch's forward pass will see
        should_prune, sparsity = self._decisions.at(self._step)
        if should_prune:
            self._step = read_step() + 1  # resynchronise at each event
            self.prune(self._step, sparsity)

    def _set_schedule(self, schedule) -> None:
        """Use ``schedule`` from now on (at each ``on_train_begin``: its decisions are computed anew per fit)."""
        self.schedule, self._decisions = schedule, ScheduleDecisions(schedule)

    def _mark_epoch(self) -> None:
        self._events_at_epoch_begin = len(self.events)

    def _epoch_logs(self, logs: Optional[dict]) -> None:
        """Add ``woodfisher_sparsity``, ``woodfisher_seconds`` (of this epoch's events) and
        ``sparsity/<weight>`` to the epoch's ``logs``."""
        if self.pruner is None or logs is None:
            return
        logs["woodfisher_sparsity"] = self.pruner.sparsity()
        logs["woodfisher_seconds"] = sum(e["seconds"] for e in self.events[getattr(self, "_events_at_epoch_begin", 0):])
        for layer in layer_sparsities(self.pruner.targets):
            logs[f"sparsity/{layer.name}"] = layer.sparsity
