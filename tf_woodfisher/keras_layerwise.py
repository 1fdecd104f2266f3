"""Post-training OBS from activations, ``one_shot_prune(method='obc' | 'sparsegpt')``, for both adapters.

The tf_keras adapter (:mod:`tf_woodfisher.tfmot.layerwise`) and the Keras 3 adapter
(:mod:`tf_woodfisher.keras3.layerwise`) run this one implementation; this module imports neither tf_keras nor
Keras 3: each adapter gives a :class:`KernelTable` of its own Keras (its ``keras.layers``, how a target's
variable is found in a layer, a layer's sublayers, the model's input rank).

A trained model and a few hundred unlabelled inputs give a sparse model, without labels, gradients or
training (as post-training quantization does). For each pruned kernel, in the order of the model's layers:

1. forward the calibration inputs (inference mode) through the model as it is now, so that the layers
   before it are already pruned, and read the kernel's layer inputs X̃ (im2col patches for convolutions);
2. accumulate H̃ = 2X̃ᵀX̃/n over them (n: rows of X̃, i.e. samples × positions); with
   ``reconstruction_target='dense'`` (the default) also forward each batch through the dense model (the
   pruned kernels' original values swapped in) for the layer's dense inputs X and C = 2X̃ᵀX/n, and
   replace W by W* = W Cᵀ H̃⁻¹ (:func:`~tf_woodfisher.pruning.obs.compensated_weights`): pruning W* on H̃
   then minimises ‖X̃Ŵᵀ − XWᵀ‖², the error against the dense model's outputs of that layer, so each layer
   also corrects what the layers before it lost; ``'inputs'`` keeps OBC/SparseGPT's ‖X̃(W − Ŵ)ᵀ‖²;
3. prune by :func:`~tf_woodfisher.pruning.obs.obc_prune` (exact greedy OBS per output row; unstructured:
   ``rows='global'``, the rows' loss curves merged as OBC does, so rows get different sparsities) or
   :func:`~tf_woodfisher.pruning.obs.sparsegpt_prune`, damped by ``percdamp``·mean(diag H̃), and write the
   reconstructed weights (and the mask: tfmot's on wrapped models, a Keras 3 ``PrunedModel``'s). Weights
   already pruned stay pruned.

The report gives each kernel's relative reconstruction error: ‖X̃Ŵᵀ − XWᵀ‖²/‖XWᵀ‖² against the dense
outputs with ``reconstruction_target='dense'`` (from the first kernel on, X̃ = X), ‖X̃(W − Ŵ)ᵀ‖²/‖X̃Wᵀ‖²
with ``'inputs'``.

Per-kernel sparsity (unstructured):

* ``mode='layerwise'``: every kernel at the target.
* ``mode='global'`` (the default): non-uniform, from a global criterion. On the dense model, each kernel's
  relative reconstruction error e(s) = ‖XW − XŴ_s‖²/‖XW‖² is recorded at a grid of sparsities (OBC: at
  every number of removals, from the loss increases its greedy records (:func:`~tf_woodfisher.pruning.obs.
  obc_loss_curve`, at most :data:`CURVE_POINTS` points); SparseGPT: at :data:`SPARSEGPT_GRID`), and the
  removals are allocated to meet the global target at the least summed relative error on the lower convex
  hulls of these curves (:func:`~tf_woodfisher.pruning.obs.allocate_by_hull`). The curves ignore how the
  layers before will be pruned (the pruning pass then uses the pruned inputs).

With ``sparsity_m_by_n=(n, m)`` (tfmot's convention: n zeros in every m consecutive weights along the input
channels; ``target_sparsity`` must be n/m) every group gets its n zeros; a last, shorter group of r
channels keeps min(r, m − n) of them, as tfmot's zero padding does. ``mode`` then plays no part.

Kernels and how they meet their inputs (W has one row per output, one column per input of the row):

| layer | W (rows × cols) | X |
| --- | --- | --- |
| Dense | out × in | inputs, all leading axes as rows |
| EinsumDense (also MultiHeadAttention's four) | free kernel axes × contracted axes | input, contracted axes last |
| Conv1D/2D/3D | out × (k…·in) | im2col patches (the layer's strides, padding, dilation) |
| DepthwiseConv1D/2D, SeparableConv's depthwise kernel | per channel: multiplier × (kh·kw) | that channel's patches |
| SeparableConv1D/2D's pointwise kernel | out × (in·multiplier) | the depthwise output (pruned kernel) |

Other prunable layers (Embedding, RNNs, LocallyConnected, transposed convolutions) are left dense with a
warning, or refused with an error naming them when selected explicitly with ``layers=``. Labels in the
dataset are ignored. BatchNorm statistics can be recalibrated afterwards (tf_keras: ``tfw.recalibrate_batchnorm``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_woodfisher import compat
from tf_woodfisher.config import WoodFisherConfig
from tf_woodfisher.fisher.gradients import looks_batched
from tf_woodfisher.pruning import obs
from tf_woodfisher.pruning.pruner import PhaseTimer
from tf_woodfisher.pruning.report import EventStats, PruningReport, report_of
from tf_woodfisher.pruning.targets import PruningTarget, assign_weights, current_masks
CALIBRATION_BATCH = 128  # samples per forward pass over an unbatched calibration dataset
SPARSEGPT_BLOCK = 128  # SparseGPT's lazy-update block of columns
SPARSEGPT_GRID = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98,
                  0.985, 0.99, 0.995)  # sparsities at which mode='global' measures SparseGPT's error per kernel


# ----------------------------------------------------------------------------------------------- kernels

class _Kernel:
    """How one pruned kernel meets its layer's inputs: the (G, rows, cols) matrix view of the kernel and the
    (G, n, cols) rows of X computed from the layer's input, G independent problems (1 but for depthwise)."""

    group_axis_note = None  # why N:M does not apply, when it does not

    def __init__(self, layer, target: PruningTarget):
        self.layer, self.target = layer, target
        self.shape = tuple(target.variable.shape)

    @property
    def name(self) -> str:
        return self.target.name

    def features(self, inputs) -> tf.Tensor:
        raise NotImplementedError

    def to_matrix(self, kernel: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def from_matrix(self, matrix: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def group_axis(self) -> tuple:
        """(outer, channels): the columns are ``outer`` runs of ``channels`` input channels, along which tfmot's
        N:M groups run."""
        raise NotImplementedError


class _DenseKernel(_Kernel):
    def features(self, inputs):
        x = tf.cast(inputs, tf.float32)
        return tf.reshape(x, [1, -1, self.shape[0]])

    def to_matrix(self, kernel):
        return kernel.T[None]

    def from_matrix(self, matrix):
        return matrix[0].T

    def group_axis(self):
        return 1, self.shape[0]


class _EinsumKernel(_Kernel):
    """An EinsumDense kernel: its axes contracted with the input are the columns, those in the output the rows."""

    def __init__(self, layer, target):
        super().__init__(layer, target)
        equation = layer.equation.replace(" ", "")
        match = re.fullmatch(r"([a-z.]+),([a-z]+)->([a-z.]+)", equation)
        if match is None:
            raise _unsupported(target, layer, f"EinsumDense equation {equation!r} is not of the form 'x,k->y'")
        self.inputs, kernel, output = match.groups()
        contracted = [c for c in kernel if c in self.inputs and c not in output]
        free = [c for c in kernel if c in output and c not in self.inputs]
        if len(contracted) + len(free) != len(kernel) or \
                any(c not in kernel and c not in output for c in self.inputs.replace("...", "")):
            raise _unsupported(target, layer, f"EinsumDense equation {equation!r} has kernel axes shared with the "
                               "input and output, or input axes summed without the kernel")
        self.kernel_axes, self.contracted, self.free = kernel, contracted, free
        size = dict(zip(kernel, self.shape))
        self.cols = int(np.prod([size[c] for c in contracted]))
        self.rows = int(np.prod([size[c] for c in free]))
        self.channels = size[contracted[-1]]
        self.order = [kernel.index(c) for c in free + contracted]

    def features(self, inputs):
        x = tf.cast(inputs, tf.float32)
        spec = self.inputs
        if "..." in spec:
            spec = spec.replace("...", "ABCDEFGHIJ"[:x.shape.rank - (len(spec) - 3)])
        batch = [i for i, c in enumerate(spec) if c not in self.kernel_axes]
        contracted = [spec.index(c) for c in self.contracted]
        return tf.reshape(tf.transpose(x, batch + contracted), [1, -1, self.cols])

    def to_matrix(self, kernel):
        return np.transpose(kernel, self.order).reshape(1, self.rows, self.cols)

    def from_matrix(self, matrix):
        shaped = matrix[0].reshape([self.shape[i] for i in self.order])
        return np.transpose(shaped, np.argsort(self.order))

    def group_axis(self):
        return self.cols // self.channels, self.channels


def _same_or_valid(padding: str) -> str:
    return "SAME" if padding == "same" else "VALID"


def _causal(x, padding, kernel_size, dilation):
    """Left-pad a (b, length, c) input for 'causal' 1-D padding (then 'valid')."""
    if padding != "causal":
        return x
    return tf.pad(x, [[0, 0], [dilation * (kernel_size - 1), 0], [0, 0]])


def _channels_last(layer, x):
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return tf.transpose(x, [0] + list(range(2, x.shape.rank)) + [1])
    return x


class _ConvKernel(_Kernel):
    """A Conv1D/2D/3D kernel (k…, in, out): X are the im2col patches, from a convolution of the input with
    an identity kernel, so that strides, padding and dilation are the layer's own."""

    def __init__(self, layer, target):
        super().__init__(layer, target)
        if getattr(layer, "groups", 1) != 1:
            raise _unsupported(target, layer, f"grouped convolution (groups={layer.groups})")
        self.patch = int(np.prod(self.shape[:-1]))
        eye = np.eye(self.patch, dtype=np.float32).reshape(self.shape[:-1] + (self.patch,))
        self.eye = tf.constant(eye)

    def features(self, inputs):
        layer = self.layer
        x = _channels_last(layer, tf.cast(inputs, tf.float32))
        if layer.padding == "causal":
            x = _causal(x, "causal", layer.kernel_size[0], layer.dilation_rate[0])
        patches = tf.nn.convolution(x, self.eye, strides=layer.strides, padding=_same_or_valid(layer.padding),
                                    dilations=layer.dilation_rate)
        return tf.reshape(patches, [1, -1, self.patch])

    def to_matrix(self, kernel):
        return kernel.reshape(self.patch, -1).T[None]

    def from_matrix(self, matrix):
        return matrix[0].T.reshape(self.shape)

    def group_axis(self):
        return self.patch // self.shape[-2], self.shape[-2]


def _as_2d(layer, x, kernel_shape):
    """A 1-D (separable) convolution's input and kernel shape as 2-D ones: (b, 1, length, c), (1, k, …)."""
    if len(kernel_shape) == 3:
        x = _causal(x, layer.padding, kernel_shape[0], layer.dilation_rate[0])
        return x[:, None], (1,) + tuple(kernel_shape), (1,) + tuple(layer.strides), (1,) + tuple(layer.dilation_rate)
    return x, tuple(kernel_shape), tuple(layer.strides), tuple(layer.dilation_rate)


def _depthwise(layer, x, kernel, kernel_shape):
    """The depthwise convolution of ``layer`` (DepthwiseConv2D, SeparableConv1D/2D) of ``x`` with ``kernel``
    of ``kernel_shape`` (kh, kw, in, multiplier) or (k, in, multiplier): (b, …, in·multiplier)."""
    x, shape, strides, dilations = _as_2d(layer, _channels_last(layer, tf.cast(x, tf.float32)), kernel_shape)
    return tf.nn.depthwise_conv2d(x, tf.reshape(kernel, shape), strides=(1,) + strides + (1,),
                                  padding=_same_or_valid(layer.padding), dilations=dilations)


class _DepthwiseKernel(_Kernel):
    """A depthwise kernel (kh, kw, in, multiplier) (1-D: (k, in, multiplier)): one problem per input channel,
    rows its multiplier outputs, columns its kernel positions."""

    group_axis_note = "its N:M groups would run across channels that have separate reconstruction problems"

    def __init__(self, layer, target):
        super().__init__(layer, target)
        *spatial, self.channels, self.multiplier = self.shape
        self.positions = int(np.prod(spatial))
        eye = np.zeros(tuple(spatial) + (self.channels, self.positions), np.float32)
        eye.reshape(self.positions, self.channels, self.positions)[np.arange(self.positions), :,
                                                                   np.arange(self.positions)] = 1.0
        self.eye = tf.constant(eye)

    def features(self, inputs):
        patches = _depthwise(self.layer, inputs, self.eye, self.eye.shape)
        patches = tf.reshape(patches, [-1, self.channels, self.positions])
        return tf.transpose(patches, [1, 0, 2])

    def to_matrix(self, kernel):
        flat = kernel.reshape(self.positions, self.channels, self.multiplier)
        return np.transpose(flat, (1, 2, 0))

    def from_matrix(self, matrix):
        return np.transpose(matrix, (2, 0, 1)).reshape(self.shape)

    def group_axis(self):
        return None


class _PointwiseKernel(_Kernel):
    """A SeparableConv's pointwise kernel (1, 1, in·multiplier, out): X is the depthwise output, computed with
    the depthwise kernel as it is (already pruned, as it comes first)."""

    def __init__(self, layer, target, depthwise):
        super().__init__(layer, target)
        self.depthwise = depthwise  # the layer's depthwise kernel (the tf.Variable)

    def features(self, inputs):
        depthwise = _depthwise(self.layer, inputs, self.depthwise, tuple(self.depthwise.shape))
        return tf.reshape(depthwise, [1, -1, self.shape[-2]])

    def to_matrix(self, kernel):
        return kernel.reshape(self.shape[-2], self.shape[-1]).T[None]

    def from_matrix(self, matrix):
        return matrix[0].T.reshape(self.shape)

    def group_axis(self):
        return 1, self.shape[-2]


UNSUPPORTED = ("no Dense, EinsumDense, Conv1D/2D/3D, DepthwiseConv1D/2D or SeparableConv layer computes with it "
               "(Embedding, RNN, LocallyConnected and transposed convolutions are not supported)")


class _Unsupported(ValueError):
    pass


def _unsupported(target, layer, why):
    return _Unsupported(f"{target.name!r} ({type(layer).__name__}): {why}")


def _identity(value):
    return value


@dataclasses.dataclass(frozen=True)
class KernelTable:
    """The layers of one Keras whose kernels the layer-wise methods reconstruct, and how to reach them.

    Each adapter makes one (:mod:`tf_woodfisher.tfmot.layerwise`, :mod:`tf_woodfisher.keras3.layerwise`), so
    that both follow the same rules by construction.

    Attributes:
        layers: that Keras' ``keras.layers`` module (classes it lacks are skipped).
        input_rank: model → the rank of its input(s) (a list, an int, or None when unknown): tells batched
            calibration datasets from unbatched ones.
        as_variable: a layer's weight (as ``layer.kernel`` gives it) → the variable the targets hold
            (Keras 3: the ``tf.Variable`` behind a ``keras.Variable``).
        sublayers: a layer → it and the layers inside it, where a target's kernel may live
            (MultiHeadAttention's EinsumDense).
        owner: a target's ``owner`` → the layer to search (unwraps tfmot's wrapper).
    """

    layers: Any
    input_rank: Callable[[Any], Any]
    as_variable: Callable[[Any], Any] = _identity
    sublayers: Callable[[Any], Sequence[Any]] = lambda layer: [layer]
    owner: Callable[[Any], Any] = _identity

    def _classes(self, *names) -> tuple:
        return tuple(c for c in (getattr(self.layers, n, None) for n in names) if c is not None)

    def _is(self, layer, variable, attribute: str) -> bool:
        value = getattr(layer, attribute, None)
        return value is not None and self.as_variable(value) is variable

    def kernel_of(self, layer, target: PruningTarget) -> Optional[_Kernel]:
        """The :class:`_Kernel` of ``target`` in ``layer`` if ``layer`` computes with it, else None.

        Raises:
            ValueError: a layer of a supported class used in a way the method cannot reconstruct (a grouped
                convolution, an EinsumDense equation of another form), naming the target and why.
        """
        variable = target.variable
        if isinstance(layer, self._classes("SeparableConv1D", "SeparableConv2D")):
            if self._is(layer, variable, "depthwise_kernel"):
                return _DepthwiseKernel(layer, target)
            return _PointwiseKernel(layer, target, self.as_variable(layer.depthwise_kernel)) \
                if self._is(layer, variable, "pointwise_kernel") else None
        if isinstance(layer, self._classes("DepthwiseConv1D", "DepthwiseConv2D")):  # tf_keras: depthwise_kernel
            attribute = "depthwise_kernel" if hasattr(layer, "depthwise_kernel") else "kernel"
            return _DepthwiseKernel(layer, target) if self._is(layer, variable, attribute) else None
        if isinstance(layer, self._classes("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose")) or \
                not self._is(layer, variable, "kernel"):
            return None
        if isinstance(layer, self._classes("Dense")):
            return _DenseKernel(layer, target)
        if isinstance(layer, self._classes("EinsumDense")):
            return _EinsumKernel(layer, target)
        if isinstance(layer, self._classes("Conv1D", "Conv2D", "Conv3D")):
            return _ConvKernel(layer, target)
        return None

    def find_kernels(self, targets: Sequence[PruningTarget], method: str, explicit: bool) -> list:
        """The :class:`_Kernel` of each target the layer-wise ``method`` can prune, in target order.

        Args:
            targets: from the adapter's ``find_prunable_weights``.
            method: ``'obc'`` or ``'sparsegpt'`` (for messages).
            explicit: whether the user selected the layers (``layers=``): then a target the method cannot
                prune raises; otherwise it is left dense with a warning naming it.

        Returns:
            A list of ``_Kernel``, one per target the method can prune, in target order.

        Raises:
            ValueError: naming the layer and why, for a selected layer the method cannot prune; no kernel at all.
        """
        kernels, left = [], []
        for target in targets:
            owner = self.owner(target.owner)
            kernel, reason = None, UNSUPPORTED
            try:
                for layer in self.sublayers(owner):
                    kernel = self.kernel_of(layer, target) if isinstance(layer, self.layers.Layer) else None
                    if kernel is not None:
                        break
            except _Unsupported as error:
                kernel, reason = None, str(error)
            if kernel is None:
                if explicit:
                    raise ValueError(f"method {method!r} cannot prune {target.name!r} ({type(owner).__name__}): "
                                     f"{reason}")
                left.append(f"{target.name} ({type(owner).__name__}, {target.size:,} weights)")
                continue
            kernels.append(kernel)
        if left:
            warnings.warn(f"method {method!r} leaves dense the weights it cannot reconstruct from layer inputs: "
                          f"{', '.join(left)}", RuntimeWarning, stacklevel=5)
        if not kernels:
            raise ValueError(f"method {method!r} found nothing to prune: no Dense, EinsumDense, Conv or SeparableConv "
                             "kernels among the prunable weights")
        return kernels


# ----------------------------------------------------------------------------------------------- calibration

def calibration_inputs(dataset, input_rank, count: int) -> tuple:
    """The first ``count`` model inputs of ``dataset`` as a list of batches, and how many there are.

    Args:
        dataset: a ``tf.data.Dataset`` of inputs x, or of (x, y) / (x, y, sample_weight) whose labels are
            ignored; batched or not (decided from the model's input rank).
        input_rank: the rank of the model's input, or a list with one per input (batch axis included).
        count: the calibration samples wanted.

    Returns:
        (list of input batches, number of samples).

    Raises:
        ValueError: no dataset, or an empty one.
    """
    if dataset is None:
        raise ValueError("the layer-wise methods need calibration inputs: a tf.data.Dataset of x (or (x, y))")
    batched = looks_batched(dataset, input_rank)
    stream = dataset if batched else dataset.batch(CALIBRATION_BATCH)
    batches, taken = [], 0
    for element in stream:
        x = element[0] if isinstance(element, tuple) and len(element) in (2, 3) else element
        size = int(tf.shape(tf.nest.flatten(x)[0])[0])
        take = min(size, count - taken)
        batches.append(tf.nest.map_structure(lambda t: t[:take], x))
        taken += take
        if taken >= count:
            break
    if not taken:
        raise ValueError("the calibration dataset is empty")
    if taken < count:
        warnings.warn(f"the calibration dataset holds {taken} samples, fewer than calibration_samples={count}",
                      RuntimeWarning, stacklevel=5)
    return batches, taken


class _Hessian:
    """Accumulates Σ XᵀX (float64) of a kernel's input rows, seen through a call hook."""

    def __init__(self, kernel: _Kernel):
        self.kernel, self.sum, self.rows = kernel, None, 0

    def __call__(self, inputs):
        x = self.kernel.features(inputs)
        gram = tf.matmul(x, x, transpose_a=True).numpy().astype(np.float64)
        self.sum = gram if self.sum is None else self.sum + gram
        self.rows += int(x.shape[1])

    @property
    def matrix(self) -> np.ndarray:
        """H = 2XXᵀ/n, (G, cols, cols)."""
        if self.sum is None:
            raise ValueError(f"{self.kernel.name!r}: its layer was never called on the calibration inputs")
        return 2.0 * self.sum / self.rows


def _hessians(model, batches, kernels) -> list:
    """One forward pass over ``batches`` (inference mode) accumulating the H of each of ``kernels``."""
    hessians = [_Hessian(k) for k in kernels]
    with contextlib.ExitStack() as stack:
        for kernel, hessian in zip(kernels, hessians):
            stack.enter_context(compat.capture_call_inputs(kernel.layer, hessian))
        for x in batches:
            model(x, training=False)
    return hessians


# ----------------------------------------------------------------------------------------------- solving

def _pad_groups(kernel: _Kernel, W, H, mask, m: int):
    """W (G, rows, cols), H and mask with each run of input channels padded to a multiple of m by pruned zero
    weights on inputs of their own (identity rows of H), and the columns of the original entries."""
    outer, channels = kernel.group_axis()
    padded = -(-channels // m) * m
    if padded == channels:
        return W, H, mask, None
    columns = (np.arange(outer)[:, None] * padded + np.arange(channels)[None, :]).ravel()
    G, rows, _ = W.shape
    W2, mask2 = np.zeros((G, rows, outer * padded)), np.zeros((G, rows, outer * padded))
    W2[:, :, columns], mask2[:, :, columns] = W, mask
    H2 = np.tile(np.eye(outer * padded), (G, 1, 1)) * np.mean(np.diagonal(H, axis1=1, axis2=2), axis=1)[:, None, None]
    H2[:, columns[:, None], columns[None, :]] = H
    return W2, H2, mask2, columns


def _solve(kernel: _Kernel, W, H, rows, sparsity, config: WoodFisherConfig, mask):
    """(pruned W (G, rows, cols), mask) of ``kernel`` by the config's method (``mask``: 0 where already pruned)."""
    n_m = config.sparsity_m_by_n
    columns = None
    if n_m is not None:
        W, H, mask, columns = _pad_groups(kernel, W, H, mask, n_m[1])
        sparsity = None
    arguments = dict(sparsity=sparsity, n_m=n_m, damping=config.percdamp, mask=mask, name=kernel.name,
                     num_inputs=rows)
    if config.method == "obc":
        result = obs.obc_prune(W, H, rows="global", **arguments)  # rows merged, as OBC does
    else:
        result = obs.sparsegpt_prune(W, H, block_size=SPARSEGPT_BLOCK, **arguments)
    weights, mask = result.weights.numpy().astype(np.float64), result.mask.numpy()
    if columns is not None:
        weights, mask = weights[:, :, columns], mask[:, :, columns]
    return weights, mask


def _current_matrix(kernel: _Kernel) -> tuple:
    """(the kernel's weights times its mask, the mask (tfmot's or its zeros)), as (G, rows, cols) matrices."""
    target = kernel.target
    mask = current_masks([target]).numpy().reshape(kernel.shape).astype(np.float64)
    return kernel.to_matrix(target.variable.numpy().astype(np.float64) * mask), kernel.to_matrix(mask)


def _write(kernel: _Kernel, weights, mask) -> None:
    values = kernel.from_matrix(weights)
    assign_weights([kernel.target], tf.constant(values.reshape(-1), tf.float32),
                   tf.constant(kernel.from_matrix(mask).reshape(-1), tf.float32))


CURVE_POINTS = 2000  # at most this many points of an OBC loss curve go into the allocation's hulls


def _loss_curve(kernel: _Kernel, W, mask, H, rows, config: WoodFisherConfig) -> np.ndarray:
    """(points, 2): (removals, relative reconstruction error) of the kernel on the dense model's inputs."""
    energy = 0.5 * float(np.sum((W @ H) * W))
    if energy <= 0:  # a zero kernel, or inputs never active: everything is free
        return np.array([[0.0, 0.0], [W.size, 0.0]])
    if config.method == "obc":
        curve = obs.obc_loss_curve(W, H, config.percdamp, mask=mask, name=kernel.name, num_inputs=rows) / energy
        removals = np.unique(np.linspace(0, len(curve) - 1, min(len(curve), CURVE_POINTS)).round().astype(int))
        return np.stack([removals, curve[removals]], axis=1)
    points = []
    for sparsity in SPARSEGPT_GRID:  # a grid of sparsities, not a loop over rows
        result = obs.sparsegpt_prune(W, H, sparsity=sparsity, block_size=SPARSEGPT_BLOCK, damping=config.percdamp,
                                     mask=mask, name=kernel.name, num_inputs=rows)
        points.append((round(sparsity * W.size), obs.reconstruction_error(W, result.weights.numpy(), H)))
    return np.asarray(points, dtype=np.float64)


def _allocate(model, batches, kernels, config, target_sparsity, timer) -> list:
    """Per kernel the sparsity of ``mode='global'``: the allocation of the target's removals at the least
    summed relative reconstruction error, from curves measured on the dense model."""
    with timer("calibration"):
        hessians = _hessians(model, batches, kernels)
    with timer("scoring"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # singular-H warnings come again in the pruning pass
        curves = [_loss_curve(k, *_current_matrix(k), h.matrix, h.rows, config) for k, h in zip(kernels, hessians)]
    sizes = np.array([k.target.size for k in kernels])
    total = int(round(target_sparsity * sizes.sum()))
    removals = obs.allocate_by_hull(curves, min(total, int(sum(c[-1, 0] for c in curves))))
    return list(removals / sizes)


class _PairedHessian:
    """For ``reconstruction_target='dense'``: Σ X̃ᵀX̃, Σ X̃ᵀX and Σ XᵀX of a kernel's input rows in the pruned
    model (X̃) and in the dense one (X), for the same calibration batches."""

    def __init__(self, kernel: _Kernel):
        self.kernel, self.rows = kernel, 0
        self.sums = [None, None, None]
        self.seen = {"dense": [], "pruned": []}

    def hook(self, which):
        return lambda inputs: self.seen[which].append(self.kernel.features(inputs))

    def add_batch(self):
        """Accumulate the features seen in the dense and the pruned forward pass of one batch."""
        dense, pruned = (tf.concat(self.seen[k], axis=1) for k in ("dense", "pruned"))
        self.seen = {"dense": [], "pruned": []}
        grams = [tf.matmul(pruned, pruned, transpose_a=True), tf.matmul(pruned, dense, transpose_a=True),
                 tf.matmul(dense, dense, transpose_a=True)]
        self.sums = [g.numpy().astype(np.float64) if t is None else t + g.numpy() for t, g in zip(self.sums, grams)]
        self.rows += int(pruned.shape[1])

    @property
    def matrices(self) -> tuple:
        """(H̃, C, H_dense), each 2·Σ/n, (G, cols, cols)."""
        if self.sums[0] is None:
            raise ValueError(f"{self.kernel.name!r}: its layer was never called on the calibration inputs")
        return tuple(2.0 * t / self.rows for t in self.sums)


@contextlib.contextmanager
def _dense_weights(targets: Sequence[PruningTarget], dense: Sequence[np.ndarray]):
    """While active, ``targets`` hold their dense values (and all-ones masks), restored on exit."""
    saved = [(t.variable.numpy(), None if t.mask is None else t.mask.numpy()) for t in targets]
    for target, value in zip(targets, dense):
        target.variable.assign(value)
        if target.mask is not None:
            target.mask.assign(tf.ones_like(target.mask))
    try:
        yield
    finally:
        for target, (value, mask) in zip(targets, saved):
            target.variable.assign(value)
            if mask is not None:
                target.mask.assign(mask)


def _paired_hessians(model, batches, kernel, done: Sequence[PruningTarget], dense: Sequence[np.ndarray]):
    """The :class:`_PairedHessian` of ``kernel``: each batch forwarded with the ``done`` targets dense, then pruned."""
    paired = _PairedHessian(kernel)
    for x in batches:
        with _dense_weights(done, dense), compat.capture_call_inputs(kernel.layer, paired.hook("dense")):
            model(x, training=False)
        with compat.capture_call_inputs(kernel.layer, paired.hook("pruned")):
            model(x, training=False)
        paired.add_batch()
    return paired


def layerwise_prune(model, targets: Sequence[PruningTarget], dataset, config: WoodFisherConfig,
                    target_sparsity: float, *, table: KernelTable, explicit: bool = False, verbose: int = 0,
                    started: Optional[float] = None, unpruned: Optional[Callable[[list], int]] = None,
                    progbar: Optional[type] = None) -> PruningReport:
    """Prune ``targets`` of ``model`` in place by layer-wise OBS reconstruction (see the module docstring).

    Args:
        model: the built model to forward (tf_keras, plain or wrapped by tfmot; Keras 3, a ``PrunedModel``'s
            inner model), called as ``model(x, training=False)``.
        targets: the prunable weights (the adapter's ``find_prunable_weights``).
        dataset: calibration inputs: a ``tf.data.Dataset`` of x or (x, y) (labels ignored), batched or not.
        config: ``method`` 'obc' or 'sparsegpt', ``mode``, ``calibration_samples``, ``percdamp``,
            ``sparsity_m_by_n``.
        target_sparsity: over the pruned kernels (global) or in each (layerwise); n/m with N:M.
        table: the adapter's :class:`KernelTable`.
        explicit: the layers were selected by the user (an unsupported one then raises).
        verbose: 1: a progress bar over the kernels and the report. started: ``time.perf_counter()`` of the call.
        unpruned: (pruned targets) → weights of the model left dense, for the report.
        progbar: the adapter's ``keras.utils.Progbar`` class.

    Returns:
        The :class:`~tf_woodfisher.pruning.PruningReport`, with each kernel's relative reconstruction error
        ‖XW − XŴ‖²/‖XW‖² on the inputs it was pruned with.

    Raises:
        ValueError: no calibration data, a layer the method cannot prune that was selected explicitly, N:M on a
            depthwise kernel, a target other than n/m with N:M, a singular H with ``percdamp=0``.
    """
    started = time.perf_counter() if started is None else started
    n_m = config.sparsity_m_by_n
    if n_m is not None and abs(target_sparsity - n_m[0] / n_m[1]) > 1e-6:
        raise ValueError(f"sparsity_m_by_n={n_m} removes {n_m[0]} of every {n_m[1]} weights, which fixes the sparsity "
                         f"at {n_m[0] / n_m[1]:g}: the target sparsity must be {n_m[0] / n_m[1]:g}, "
                         f"got {target_sparsity:g}")
    kernels = table.find_kernels(targets, config.method, explicit)
    for kernel in kernels if n_m is not None else ():
        if kernel.group_axis() is None:
            raise ValueError(f"sparsity_m_by_n={n_m} cannot be applied to {kernel.name!r} "
                             f"({type(kernel.layer).__name__}): {kernel.group_axis_note}; leave its layer out "
                             "with layers=...")
    pruned = [k.target for k in kernels]
    start_sparsity = 1.0 - float(tf.reduce_mean(current_masks(pruned)))
    if start_sparsity > target_sparsity:
        warnings.warn(f"the model is already {start_sparsity:.2%} sparse, above target {target_sparsity:.2%}; "
                      "pruned weights stay pruned", RuntimeWarning, stacklevel=4)
    if config.seed:
        warnings.warn(f"seed={config.seed} is not used by method {config.method!r}: it calibrates on the first "
                      f"calibration_samples={config.calibration_samples} inputs of the dataset, in its order (shuffle "
                      "the dataset to draw another subset)", RuntimeWarning, stacklevel=4)
    timer = PhaseTimer("calibration", "scoring")
    with timer("calibration"):
        batches, _ = calibration_inputs(dataset, table.input_rank(model), config.calibration_samples)
    if n_m is not None or config.mode == "layerwise":
        sparsities = [target_sparsity] * len(kernels)
    else:
        sparsities = _allocate(model, batches, kernels, config, target_sparsity, timer)
    bar = progbar(len(kernels), verbose=verbose, unit_name="kernel") if verbose and progbar else None
    dense = [t.variable.numpy() for t in pruned] if config.reconstruction_target == "dense" else None
    errors = {}
    for index, (kernel, sparsity) in enumerate(zip(kernels, sparsities)):  # in order: each on pruned inputs
        W, mask = _current_matrix(kernel)
        with timer("calibration"):
            if dense is not None and index:  # the dense model's outputs as the target: H̃, C and H_dense
                H, cross, H_dense = (paired := _paired_hessians(model, batches, kernel, pruned[:index],
                                                                dense[:index])).matrices
                rows = paired.rows
            else:
                (hessian,) = _hessians(model, batches, [kernel])
                H, cross, H_dense, rows = hessian.matrix, None, None, hessian.rows
        with timer("scoring"):
            goal = W if cross is None else obs.compensated_weights(W, H, cross, config.percdamp, kernel.name)
            weights, new_mask = _solve(kernel, goal, H, rows, min(float(sparsity), 1.0 - 1e-9), config, mask)
            _write(kernel, weights, new_mask)
            errors[kernel.name] = obs.reconstruction_error(W, weights, H, cross, H_dense)
        if bar is not None:
            bar.update(index + 1)
    stats = EventStats(scoring_seconds=timer.seconds["scoring"], recomputations=1,
                       calibration_seconds=timer.seconds["calibration"])
    report = report_of(config, target_sparsity, pruned, stats, time.perf_counter() - started,
                       unpruned(pruned) if unpruned is not None else 0, errors)
    if verbose:
        print(report)
    return report
