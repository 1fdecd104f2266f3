"""Re-estimate BatchNormalization statistics on training data, e.g. after pruning.

Pruning changes the distribution of every activation downstream, so the stored BN moving mean and
variance no longer match it. :func:`recalibrate_batchnorm` runs training data through the model with
every BN layer normalising by the statistics of its current batch (as in training), and everything else
in inference mode (no dropout, no tfmot mask update, no ``pruning_step`` increment). Each BN layer's
moving mean becomes the average of its per-batch means and its moving variance the average of its
per-batch unbiased variances (PyTorch's ``momentum=None`` cumulative average) instead of a momentum
update, so the old statistics play no part. Nothing else changes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from tf_woodfisher import legacy_keras  # noqa: F401, I001  (first: TF_USE_LEGACY_KERAS=1 before TensorFlow)
import tensorflow as tf
import tf_keras as keras

from tf_woodfisher import compat

_BN_CLASSES = tuple({keras.layers.BatchNormalization,
                     *(c for c in keras.layers.BatchNormalization.__mro__ if c.__name__ == "BatchNormalizationBase")})


@dataclasses.dataclass(frozen=True)
class BatchNormRecalibration:
    """What :func:`recalibrate_batchnorm` did.

    Attributes:
        layer_names: the BN layers whose moving statistics were replaced.
        num_batches: batches run through the model.
        num_samples: samples (rows of the model input) in those batches.
        unreached: BN layers of the model that no batch reached (their statistics are unchanged).
        max_mean_change: the largest |new − old| moving mean over all channels of all layers.
        max_variance_ratio: the largest max(new/old, old/new) moving variance over all channels.
    """

    layer_names: tuple[str, ...]
    num_batches: int
    num_samples: int
    unreached: tuple[str, ...] = ()
    max_mean_change: float = 0.0
    max_variance_ratio: float = 1.0

    @property
    def num_layers(self) -> int:
        """Number of BN layers recalibrated."""
        return len(self.layer_names)

    def __str__(self) -> str:
        text = (f"recalibrated {self.num_layers} BatchNormalization layers on {self.num_samples} samples "
                f"({self.num_batches} batches); largest moving-mean change {self.max_mean_change:.4g}, "
                f"largest variance ratio {self.max_variance_ratio:.4g}")
        return text + (f"; not reached: {list(self.unreached)}" if self.unreached else "")


def batchnorm_layers(model: keras.Model) -> list:
    """All BatchNormalization layers of ``model``: nested models and inside tfmot wrappers included.

    Args:
        model: a tf_keras model (or layer).

    Returns:
        list of ``tf_keras.layers.BatchNormalization`` in layer order, each once.
    """
    found, seen = [], set()

    def visit(layer):
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if isinstance(layer, _BN_CLASSES):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            for inner in layer.layers:
                visit(inner)
        elif isinstance(layer, keras.layers.Wrapper):  # tfmot's PruneLowMagnitude, TimeDistributed, ...
            visit(layer.layer)

    visit(model)
    for module in getattr(model, "submodules", ()):  # BN inside custom layers, in no particular order
        if isinstance(module, _BN_CLASSES) and id(module) not in seen:
            seen.add(id(module))
            found.append(module)
    return found


def _check_supported(layer):
    unsupported = [flag for flag in ("renorm", "virtual_batch_size", "adjustment") if getattr(layer, flag, None)]
    if unsupported:
        raise ValueError(f"BatchNormalization layer {layer.name!r} uses {unsupported}, which "
                         "recalibrate_batchnorm does not support")
    if not layer.built:
        raise ValueError(f"BatchNormalization layer {layer.name!r} is not built: call the model on a batch first")


def _batch_statistics_call(layer, index, records):
    """A replacement for ``layer.call``: records the batch's mean, biased variance and count per channel,
    then normalises with them (Keras' training-mode forward), never touching the moving statistics."""
    axes = list(layer.axis) if isinstance(layer.axis, (list, tuple)) else [layer.axis]

    def call(inputs, training=None, mask=None):
        del training  # always the batch statistics
        if mask is not None:
            raise ValueError(f"BatchNormalization layer {layer.name!r} is called with a mask, which "
                             "recalibrate_batchnorm does not support")
        x = tf.cast(inputs, tf.float32)
        rank = x.shape.rank
        channel_axes = [a % rank for a in axes]
        reduce = [i for i in range(rank) if i not in channel_axes]
        mean, variance = tf.nn.moments(x, reduce, keepdims=True)
        count = tf.reduce_prod(tf.gather(tf.shape(x, out_type=tf.int64), reduce))
        calls = sum(1 for key in records if key.startswith(f"{index}:"))
        records[f"{index}:{calls}"] = (tf.reshape(mean, layer.moving_mean.shape),
                                       tf.reshape(variance, layer.moving_variance.shape), count)
        broadcast = [x.shape[i] if i in channel_axes else 1 for i in range(rank)]
        gamma = tf.reshape(tf.cast(layer.gamma, tf.float32), broadcast) if layer.scale else None
        beta = tf.reshape(tf.cast(layer.beta, tf.float32), broadcast) if layer.center else None
        outputs = tf.nn.batch_normalization(x, mean, variance, beta, gamma, layer.epsilon)
        return tf.cast(outputs, inputs.dtype)

    return call


def _first_input(element):
    """The model input of one dataset element: x of (x, y[, w]) tuples, else the element itself."""
    if isinstance(element, (tuple, list)) and not isinstance(element, np.ndarray):
        return element[0]
    return element


def _num_rows(x) -> int:
    return int(tf.nest.flatten(x)[0].shape[0])


def _batches(dataset, batch_size, model):
    """An iterator of model-input batches, and whether it is known to be infinite."""
    if isinstance(dataset, tf.data.Dataset):
        if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
            return iter(dataset), True
        spec = tf.nest.flatten(_first_input(dataset.element_spec))[0]
        inputs = getattr(model, "inputs", None)
        if inputs and spec.shape.rank is not None and spec.shape.rank == len(inputs[0].shape) - 1:
            raise ValueError(f"the dataset's elements have shape {spec.shape}, one sample each: batch it "
                             "(dataset.batch(64)) before passing it")
        return (_first_input(e) for e in dataset), False
    if isinstance(dataset, (np.ndarray, tf.Tensor)) or (
            isinstance(dataset, (tuple, list)) and dataset and isinstance(dataset[0], (np.ndarray, tf.Tensor))):
        x = _first_input(dataset) if isinstance(dataset, (tuple, list)) else dataset
        return (x[i:i + batch_size] for i in range(0, len(x), batch_size)), False
    if isinstance(dataset, Iterable):
        return (_first_input(e) for e in dataset), False
    raise ValueError(f"dataset must be a batched tf.data.Dataset, an array of inputs (or an (x, y) tuple of "
                     f"arrays) or an iterable of batches, got {type(dataset).__name__}")


def recalibrate_batchnorm(model: keras.Model, dataset, num_batches: int | None = None, batch_size: int = 64,
                          verbose: int = 0) -> BatchNormRecalibration:
    """Replace the moving mean and variance of every BatchNormalization layer by estimates on ``dataset``.

    Each batch is run through ``model`` with every BN layer normalising by that batch's statistics and all
    other layers in inference mode. For each BN layer and channel, the new moving mean is the average of the
    per-batch means and the new moving variance the average of the per-batch unbiased variances (Bessel's
    correction over the n·h·w values of a channel), each batch weighted by its number of samples, which is
    PyTorch's cumulative average (``momentum=None``) when all batches have the same size. The old
    statistics play no part (they are reset, not blended with a momentum).

    Only the BN moving statistics change: every other variable of the model (weights, BN gamma/beta, tfmot
    masks, thresholds and ``pruning_step``) is bit-identical afterwards, the optimizer is not touched, and
    no layer's ``call`` stays replaced, even when an error interrupts the pass. Works on models containing
    nested models and tfmot ``PruneLowMagnitude`` wrappers. Use training data, preprocessed like the model's
    input, and no augmentation unless the model will see it.

    Args:
        model: a built tf_keras model.
        dataset: the data, one of
            - a batched ``tf.data.Dataset`` of inputs x or of tuples (x, y[, sample_weight]);
            - a NumPy array / tensor of inputs (n, ...) or a tuple (x, y) of them, cut into ``batch_size`` rows;
            - any iterable of such batches.
        num_batches: use the first ``num_batches`` batches; None: all (the dataset must then be finite).
        batch_size: rows per batch when ``dataset`` is an array.
        verbose: 1 prints the summary line.

    Returns:
        :class:`BatchNormRecalibration`: the layers recalibrated (``num_layers``), ``num_batches``,
        ``num_samples``, unreached layers, and how far the statistics moved.

    Raises:
        ValueError: the model has no BatchNormalization layer (or one uses renorm, virtual batches or an
            adjustment, or is unbuilt), the dataset yields no batch (or is infinite with
            ``num_batches=None``, or is not batched), a batch holds a single value per channel (the variance
            is undefined), ``num_batches`` or ``batch_size`` is not a positive int, or no BN layer is reached.
    """
    for name, value in (("num_batches", num_batches), ("batch_size", batch_size)):
        if value is not None and not (isinstance(value, (int, np.integer)) and value >= 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    layers = batchnorm_layers(model)
    if not layers:
        raise ValueError(f"model {getattr(model, 'name', model)!r} has no BatchNormalization layer to recalibrate")
    for layer in layers:
        _check_supported(layer)
    batches, infinite = _batches(dataset, batch_size, model)
    if infinite and num_batches is None:
        raise ValueError("the dataset is infinite (repeat()): pass num_batches")

    snapshot = [(variable, variable.numpy()) for variable in model.variables]
    sums = [None] * len(layers)  # per layer: [Σ n·mean, Σ n·unbiased variance, Σ n]
    records = {}
    seen_batches = seen_samples = 0
    try:
        for index, layer in enumerate(layers):
            object.__setattr__(layer, "call", _batch_statistics_call(layer, index, records))

        @compat.function(reduce_retracing=True)
        def statistics(x):
            records.clear()
            model(x, training=False)
            return dict(records)

        for x in batches:
            if num_batches is not None and seen_batches >= num_batches:
                break
            rows = _num_rows(x)
            if rows == 0:
                continue
            for key, (mean, variance, count) in statistics(tf.nest.map_structure(tf.convert_to_tensor, x)).items():
                index = int(key.split(":")[0])
                count = int(count)
                if count < 2:
                    raise ValueError(f"BatchNormalization layer {layers[index].name!r} sees {count} value per "
                                     "channel in a batch: the variance is undefined, use larger batches")
                unbiased = variance.numpy().astype(np.float64) * count / (count - 1)
                mean = mean.numpy().astype(np.float64)
                if sums[index] is None:
                    sums[index] = [rows * mean, rows * unbiased, rows]
                else:
                    sums[index][0] += rows * mean
                    sums[index][1] += rows * unbiased
                    sums[index][2] += rows
            seen_batches += 1
            seen_samples += rows
    finally:
        for layer in layers:
            if "call" in vars(layer):
                object.__delattr__(layer, "call")
        for variable, value in snapshot:
            variable.assign(value)
    if seen_batches == 0:
        raise ValueError("the dataset yielded no batch: recalibrate_batchnorm needs training data")
    reached = [(layer, s) for layer, s in zip(layers, sums) if s is not None]
    if not reached:
        raise ValueError("no BatchNormalization layer was reached by the forward pass")
    mean_change, variance_ratio = 0.0, 1.0
    for layer, (mean_sum, variance_sum, total) in reached:
        new_mean, new_variance = mean_sum / total, variance_sum / total
        old_mean, old_variance = layer.moving_mean.numpy(), layer.moving_variance.numpy()
        mean_change = max(mean_change, float(np.max(np.abs(new_mean - old_mean))))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.maximum(new_variance / old_variance, old_variance / new_variance)
        variance_ratio = max(variance_ratio, float(np.nanmax(ratio)))
        layer.moving_mean.assign(new_mean.astype(layer.moving_mean.dtype.as_numpy_dtype))
        layer.moving_variance.assign(new_variance.astype(layer.moving_variance.dtype.as_numpy_dtype))
    result = BatchNormRecalibration(
        layer_names=tuple(layer.name for layer, _ in reached), num_batches=seen_batches, num_samples=seen_samples,
        unreached=tuple(layer.name for layer, s in zip(layers, sums) if s is None),
        max_mean_change=mean_change, max_variance_ratio=variance_ratio)
    if verbose:
        print(result)
    return result
