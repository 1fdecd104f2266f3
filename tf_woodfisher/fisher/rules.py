"""Per-group Fisher gradients from one batched forward and one batched backward ("layer rules").

For a layer whose weights enter the loss only through a linear map ``z = A(x; W)`` (Dense, convolutions,
Embedding, ...), the gradient of a group's mean loss is a contraction of the layer's input ``x`` with
``dL/dz``, summed over the group's samples. So instead of differentiating every group separately (what
``tf.vectorized_map`` does in :func:`tf_woodfisher.fisher.gradients.make_gradient_fn`), one forward and one
backward pass over all g·b samples record, per rule layer and per call, ``x`` and ``dL/dz`` with

    L = Σ_groups mean_{samples of the group} loss

(in inference mode samples do not interact, so ``dL/dz`` of each sample is that sample's own gradient,
already divided by b), and the g per-group weight gradients are formed by contractions that sum over the b
samples of a group inside the contraction: per-sample gradients are never materialised when b > 1.
Dense, EinsumDense, pointwise kernels and LocallyConnected: one batched einsum over (group, samples ×
positions). Convolutions (plain, grouped, transposed, depthwise): where TensorFlow has a grouped kernel
gradient (oneDNN, cuDNN), one grouped Conv2DBackpropFilter for all groups at once; otherwise, for groups of
b ≥ 2 samples, TensorFlow's own kernel-gradient op run once per group in a ``tf.map_fn`` over groups, and
for b = 1 one batched contraction per kernel offset. Non-overlapping windows (strides = kernel size, a
ViT's patch embedding) are a reshape of the input: one batched matmul of the patches with dz. A stride-1
convolution over few input channels (a first layer) stacks its shifted input windows as the rows of one
batched matmul with dz.
Embedding: the output gradients scattered into per-group rows.

Capture: while the gradient function traces (and only then), each rule layer's ``call`` is replaced on the
instance by a function that computes the linear output explicitly with TensorFlow ops, watches it on the
tape, and then adds the bias and activation as the layer does; every patched attribute is restored when the
trace ends, even on error. Layers are recognised by duck typing (class names along ``type(layer).__mro__``
and the attributes tf_keras and Keras 3 share), so this module imports neither tf_keras, Keras nor tfmot.

Everything a rule cannot prove it handles exactly goes to the fallback (a per-group vectorised gradient,
by default :func:`tf_woodfisher.fisher.gradients.make_gradient_fn`) in the same compiled call: layers without
a rule (RNNs, custom layers), subclasses that override ``call``, channels_first, dynamic spatial shapes,
ragged/sparse inputs, calls inside control flow (``tf.while_loop``/``tf.cond`` bodies, nested
``tf.function``\\ s), variables read anywhere else than in the rule's own computation (tied weights), and —
for the whole model — anything that couples the samples of a batch: a batch normalisation running on batch
statistics (called with ``training=True`` baked into a functional model), or a loss that does not return
per-sample values.
"""
import itertools
import math
import re
import string
import time

import tensorflow as tf

from tf_woodfisher import compat
from tf_woodfisher.fisher.graph_memory import any_chunk, chunk_estimator

__all__ = ["make_rule_gradient_fn", "keeps_samples_apart", "rule_coverage", "RULE_CLASSES", "GradientRows"]

_LOOP_MIN_GROUP = 2  # groups of ≥ this many samples: per-group native kernel-gradient ops in a loop over groups
# make_checked_gradient_fn runs its reference eagerly when the checked groups' share of the rules' first call took
# less than this (seconds): a cheap model then skips tracing a second function (0.1–0.4 s on the small CNN and
# ResNet-20); op by op, a costly one runs slower than compiled (ResNet-50, a group of 16 images: 2.1–2.4 s a group
# eagerly, 1.1–1.3 s compiled after a first call of 2.2–3.0 s)
_EAGER_CHECK_SECONDS = 0.25


class _Unsupported(Exception):
    """Raised by a rule's forward when this call cannot use the rule (the layer then falls back)."""


# ---------------------------------------------------------------------------------------------------------
# Small helpers


def _tf_variable(v):
    """The tf.Variable under a tf_keras AutoCastVariable or a Keras 3 Variable (or ``v`` itself)."""
    for _ in range(4):
        inner = getattr(v, "_variable", None)  # tf_keras AutoCastVariable
        if inner is None and not isinstance(v, tf.Variable):
            inner = getattr(v, "value", None)  # Keras 3 Variable → its tf.Variable
            if inner is not None and not isinstance(inner, tf.Variable):
                inner = None
        if inner is None or inner is v:
            return v
        v = inner
    return v


def _key(v):
    v = _tf_variable(v)
    try:
        return v.ref()
    except AttributeError:
        return id(v)


def _size(v):
    return math.prod(int(d) for d in tuple(v.shape))


def _static(shape):
    """Python ints of a static shape, or None if any dimension is unknown."""
    dims = shape.as_list() if isinstance(shape, tf.TensorShape) else list(shape)
    return None if any(d is None for d in dims) else [int(d) for d in dims]


def _as_tuple(value, rank):
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,) * rank
    return tuple(int(v) for v in value)


def _f32(t):
    return t if t.dtype == tf.float32 else tf.cast(t, tf.float32)


def _compute_cast(layer, x):
    dtype = getattr(layer, "compute_dtype", None)
    if dtype is not None and x.dtype.is_floating and x.dtype != tf.as_dtype(dtype):
        x = tf.cast(x, dtype)
    return x


def _same_padding(size, out, kernel, stride, dilation):
    """(before, after) padding of one axis for TensorFlow's 'SAME'."""
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _windows(x, kernel_size, strides, dilations, out_sizes, leading=1, trailing=1):
    """For each kernel offset (row-major), the strided window x[:, o·d : o·d + (out-1)·s + 1 : s, ..., :]
    of an explicitly padded x whose spatial axes follow ``leading`` axes and precede ``trailing`` ones
    (channels_last (n, *S, C): 1 and 1): shape (n, *out_sizes, channels) for channels_last."""
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        index = [slice(None)] * leading
        index += [slice(o * d, o * d + (m - 1) * s + 1, s)
                  for o, d, m, s in zip(offset, dilations, out_sizes, strides)]
        yield x[tuple(index) + (slice(None),) * trailing]


def _apply_activation(layer, outputs):
    activation = getattr(layer, "activation", None)
    return outputs if activation is None else activation(outputs)


def _conv_config(layer):
    rank = len(layer.kernel_size)
    return dict(rank=rank, kernel_size=_as_tuple(layer.kernel_size, rank),
                strides=_as_tuple(layer.strides, rank), dilations=_as_tuple(layer.dilation_rate, rank),
                padding=str(layer.padding).lower())


def _explicit_pads(spatial, out_sizes, cfg):
    """Per spatial axis (before, after) padding that turns the layer's padding into 'valid'."""
    if cfg["padding"] == "same":
        return [_same_padding(s, o, k, st, d) for s, o, k, st, d in
                zip(spatial, out_sizes, cfg["kernel_size"], cfg["strides"], cfg["dilations"])]
    if cfg["padding"] == "causal":
        return [((cfg["kernel_size"][0] - 1) * cfg["dilations"][0], 0)]
    return [(0, 0)] * len(spatial)


def _pad(x, pads):
    if not any(p for pair in pads for p in pair):
        return x
    return tf.pad(x, [[0, 0]] + [list(p) for p in pads] + [[0, 0]])


def _valid_out(size, kernel, stride, dilation):
    return (size - (kernel - 1) * dilation - 1) // stride + 1


# ---------------------------------------------------------------------------------------------------------
# Contractions: per-group weight gradients from inputs and output gradients, summed over a group's samples


def _group_matmul(a, b, groups):
    """(n, ..., i), (n, ..., o) → (g, i, o): Σ over each group's samples and positions of a ⊗ b."""
    a = tf.reshape(_f32(a), [groups, -1, a.shape[-1]])
    b = tf.reshape(_f32(b), [groups, -1, b.shape[-1]])
    return tf.einsum("gpi,gpo->gio", a, b)  # on CPU faster than matmul(transpose_a=True)


def _channel_sum(dz, groups):
    """(n, ..., o) → (g, o): the gradient of a per-channel bias."""
    return tf.reduce_sum(tf.reshape(_f32(dz), [groups, -1, dz.shape[-1]]), axis=1)


def _conv_kernel_gradient(x_padded, dz, cfg, conv_groups, groups):
    """Per-group kernel gradient (g, K, C/G, O) of z = conv(x) from the padded input and dz: one batched
    contraction per kernel offset (K = prod(kernel_size)) of the strided input window with dz. (On CPU
    this beats one contraction of the concatenated (positions, K·C) patches, even for few input channels.)"""
    out_sizes = dz.shape[1:-1].as_list()
    channels, filters = x_padded.shape[-1], dz.shape[-1]
    windows = _windows(x_padded, cfg["kernel_size"], cfg["strides"], cfg["dilations"], out_sizes)
    if conv_groups == 1:
        d = tf.reshape(_f32(dz), [groups, -1, filters])
        result = tf.stack([tf.einsum("gpc,gpo->gco", tf.reshape(_f32(w), [groups, -1, channels]), d)
                           for w in windows], axis=1)  # (g, K, C, O)
    else:
        per_in, per_out = channels // conv_groups, filters // conv_groups
        d = tf.reshape(_f32(dz), [groups, -1, conv_groups, per_out])
        result = tf.stack([tf.einsum("gphc,gpho->gcho",
                                     tf.reshape(_f32(w), [groups, -1, conv_groups, per_in]), d)
                           for w in windows], axis=1)  # (g, K, C/G, G, O/G)
    return result


def _depthwise_kernel_gradient(x_padded, dz, cfg, multiplier, groups):
    """Per-group depthwise kernel gradient (g, K, C, M) from the padded input (n, ..., C) and dz (n, ..., C·M)."""
    out_sizes = dz.shape[1:-1].as_list()
    channels = x_padded.shape[-1]
    d = tf.reshape(_f32(dz), [groups, -1, channels, multiplier])
    return tf.stack([tf.einsum("gpc,gpcm->gcm", tf.reshape(_f32(w), [groups, -1, channels]), d)
                     for w in _windows(x_padded, cfg["kernel_size"], cfg["strides"], cfg["dilations"], out_sizes)],
                    axis=1)


def _looped_kernel_gradient(linear, kernel_shape, x, dz, groups):
    """Per-group kernel gradient of z = linear(x, kernel) by TensorFlow's own kernel-gradient op (e.g.
    Conv2DBackpropFilter), run once per group on that group's b samples in a loop over the groups: the op
    sums over the group's samples itself. For groups of several samples this beats the per-offset
    contractions, which read the input once per kernel offset."""
    kernel_shape = [int(d) for d in kernel_shape]
    xs = tf.reshape(_f32(x), [groups, -1] + x.shape[1:].as_list())
    ds = tf.reshape(_f32(dz), [groups, -1] + dz.shape[1:].as_list())

    def one(group):  # slicing xs and ds per group, not map_fn's unstacking of them (a copy of both): 10-20% less
        kernel = tf.zeros(kernel_shape, tf.float32)
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(kernel)
            z = linear(xs[group], kernel)
        return tape.gradient(z, kernel, output_gradients=ds[group])

    return tf.map_fn(one, tf.range(groups), fn_output_signature=tf.TensorSpec(kernel_shape, tf.float32))


def _looped(group_size):
    return group_size is None or group_size >= _LOOP_MIN_GROUP


def _pointwise_kernel_gradient(x, dz, cfg, conv_groups, groups):
    """Per-group kernel gradient (g, C, O) of a 1×1 (×1) convolution, a Dense over positions: the input at
    the strided output positions contracted with dz in one batched matmul. None where it does not apply
    (a larger kernel, grouped channels, or positions that do not line up)."""
    if conv_groups != 1 or any(k != 1 for k in cfg["kernel_size"]):
        return None
    if any(s > 1 for s in cfg["strides"]):  # 1×1, 'same' or 'valid': output position o reads input o·s
        x = x[(slice(None),) + tuple(slice(None, None, s) for s in cfg["strides"]) + (slice(None),)]
    if x.shape[1:-1].as_list() != dz.shape[1:-1].as_list():
        return None
    return _group_matmul(x, dz, groups)


def _patch_kernel_gradient(x, dz, cfg, conv_groups, groups):
    """Per-group kernel gradient (g, *K, C, O) of a convolution whose windows do not overlap (strides equal
    to the kernel size, no dilation, one channel group: a ViT's patch embedding): the windows are a reshape
    of the (cropped) input, so one batched matmul of the patches with dz. None where it does not apply
    (overlapping or padded windows, grouped channels, a 1×1 kernel, dynamic sizes)."""
    kernel, strides = list(cfg["kernel_size"]), list(cfg["strides"])
    if conv_groups != 1 or kernel != strides or any(d != 1 for d in cfg["dilations"]) or all(k == 1 for k in kernel):
        return None
    out, spatial = dz.shape[1:-1].as_list(), x.shape[1:-1].as_list()
    if None in out or None in spatial or cfg["padding"] not in ("valid", "same"):
        return None
    # 'valid': out = ⌊S/k⌋ windows from the start; 'same': no padding only when k divides S (then out = S/k)
    if any(o * k > size or (cfg["padding"] == "same" and size % k) for o, k, size in zip(out, kernel, spatial)):
        return None
    rank, channels = len(kernel), x.shape[-1]
    x = x[(slice(None),) + tuple(slice(0, o * k) for o, k in zip(out, kernel)) + (slice(None),)]
    x = tf.reshape(_f32(x), [-1] + [d for o, k in zip(out, kernel) for d in (o, k)] + [channels])
    x = tf.transpose(x, [0] + [1 + 2 * i for i in range(rank)] + [2 + 2 * i for i in range(rank)] + [2 * rank + 1])
    patches = tf.reshape(x, [groups, -1, math.prod(kernel) * channels])  # (g, b·positions, K·C)
    d = tf.reshape(_f32(dz), [groups, -1, dz.shape[-1]])
    return tf.reshape(tf.einsum("gpk,gpo->gko", patches, d), [groups, *kernel, channels, dz.shape[-1]])


# A stride-1 convolution whose kernel windows hold at most this many entries per output channel (K·C ≤ ratio · O)
# takes the window-rows contraction: measured in one process (oneDNN, ms), the small CNN's conv1 (1 → 16, 3×3,
# 28², 2,048 samples in groups of 16) 9.6–12 against 19–20 for the grouped op, 5×5 1 → 32 26 against 68, 3×3 2 → 16
# 22 against 33; 3×3 3 → 16 (K·C = 27) a tie, and 3×3 16 → 16, strided or not, 2–9× slower
_WINDOW_ROWS_RATIO = 1.5


def _window_rows_kernel_gradient(x_padded, dz, cfg, conv_groups, groups):
    """Per-group kernel gradient (g, *K, C, O) of a stride-1 convolution with few window entries (K·C ≤
    _WINDOW_ROWS_RATIO · O: a first layer over 1–2 input channels): the K strided windows of the padded input,
    taken channels first, are stacked as the K·C rows of a (g, K·C, b·positions) matrix, which one batched
    matmul with dz (g, b·positions, O) contracts over each group's samples and positions. The input is
    transposed once (not dz, which the grouped op must transpose: the larger tensor when O > K·C); the rows
    are K·C/O times dz's size. None where it does not apply (strides > 1, channel groups, more entries, dynamic
    sizes)."""
    kernel, channels, filters = list(cfg["kernel_size"]), x_padded.shape[-1], dz.shape[-1]
    out, rank = dz.shape[1:-1].as_list(), cfg["rank"]
    if (conv_groups != 1 or any(s != 1 for s in cfg["strides"]) or None in out or None in x_padded.shape[1:]
            or math.prod(kernel) * channels > _WINDOW_ROWS_RATIO * filters):
        return None
    spatial = x_padded.shape[1:-1].as_list()
    x = tf.reshape(_f32(x_padded), [groups, -1] + spatial + [channels])  # (g, b, *S, C)
    x = tf.transpose(x, [0, rank + 2, 1] + list(range(2, rank + 2))) if channels > 1 \
        else tf.reshape(x, [groups, 1, -1] + spatial)  # (g, C, b, *S)
    rows = [tf.reshape(w, [groups, channels, -1])  # (g, C, b·positions) per kernel offset
            for w in _windows(x, kernel, cfg["strides"], cfg["dilations"], out, leading=3, trailing=0)]
    rows = tf.reshape(tf.stack(rows, axis=2), [groups, channels * len(rows), -1])  # (g, C·K, b·positions)
    grads = tf.matmul(rows, tf.reshape(_f32(dz), [groups, -1, filters]))  # (g, C·K, O)
    grads = tf.transpose(tf.reshape(grads, [groups, channels, -1, filters]), [0, 2, 1, 3])
    return tf.reshape(grads, [groups, *kernel, channels, filters])


_GROUPED_SUPPORT = []  # [bool] once probed: whether grouped convolutions have a kernel gradient on this device


def _grouped_conv_supported():
    """Whether TensorFlow computes the kernel gradient of a grouped convolution here (oneDNN on CPU, cuDNN on
    GPU do; TensorFlow's own CPU kernels refuse it): probed once, eagerly, on a tiny case checked against
    the per-group ungrouped gradients."""
    if not _GROUPED_SUPPORT:
        with tf.init_scope():
            try:
                x = tf.reshape(tf.range(2 * 4 * 4 * 4, dtype=tf.float32) % 7 - 3, [2, 4, 4, 4])
                dz = tf.reshape(tf.range(2 * 3 * 3 * 6, dtype=tf.float32) % 5 - 2, [2, 3, 3, 6])

                def kernel_gradient(xs, ds, in_depth, out_depth):  # no tape: init_scope pauses tapes
                    return tf.raw_ops.Conv2DBackpropFilter(input=xs, filter_sizes=[2, 2, in_depth, out_depth],
                                                           out_backprop=ds, strides=[1, 1, 1, 1], padding="VALID")

                grouped = kernel_gradient(x, dz, 2, 6)
                expected = tf.concat([kernel_gradient(x[..., :2], dz[..., :3], 2, 3),
                                      kernel_gradient(x[..., 2:], dz[..., 3:], 2, 3)], axis=-1)
                _GROUPED_SUPPORT.append(bool(tf.reduce_all(tf.abs(grouped - expected) <= 1e-4)))
            except (tf.errors.OpError, ValueError, TypeError):
                _GROUPED_SUPPORT.append(False)
    return _GROUPED_SUPPORT[0]


def _grouped_kernel_gradient(x, dz, kernel_shape, cfg, padding, groups):
    """Per-group kernel gradients (g, *K, C/G, O) of z = conv(x, kernel) (rank 1 or 2, G channel groups, no
    dilation) for all g groups at once, by TensorFlow's own kernel-gradient op (Conv2DBackpropFilter) of ONE
    grouped convolution: a group's b samples are its batch and the g groups its channel groups (x: (g·b, *S, C)
    → (b, *S, g·C), dz likewise), so the op sums over each group's samples itself and never reads the input
    once per kernel offset. None where it does not apply, or where TensorFlow has no grouped kernel gradient
    here (see :func:`_grouped_conv_supported`)."""
    rank = cfg["rank"]
    if rank > 2 or any(d != 1 for d in cfg["dilations"]) or not _grouped_conv_supported():
        return None
    kernel_shape = [int(d) for d in kernel_shape]
    perm = [1] + list(range(2, rank + 2)) + [0, rank + 2]  # (g, b, *S, C) → (b, *S, g, C)

    def by_group(t):
        inner = t.shape[1:-1].as_list()
        t = tf.transpose(tf.reshape(_f32(t), [groups, -1] + inner + [t.shape[-1]]), perm)
        t = tf.reshape(t, [-1] + inner + [groups * t.shape[-1]])
        return t if rank == 2 else tf.expand_dims(t, 1)  # rank 1 as a 1 × W image

    filters = kernel_shape[-1]
    spatial_kernel = kernel_shape[:-2] if rank == 2 else [1] + kernel_shape[:-2]
    strides = list(cfg["strides"]) if rank == 2 else [1] + list(cfg["strides"])
    grads = tf.raw_ops.Conv2DBackpropFilter(
        input=by_group(x), filter_sizes=tf.stack(spatial_kernel + [kernel_shape[-2], groups * filters]),
        out_backprop=by_group(dz), strides=[1] + strides + [1], padding=padding)  # (*K, C/G, g·O)
    grads = tf.reshape(grads, kernel_shape[:-1] + [groups, filters])
    return tf.transpose(grads, [rank + 1] + list(range(rank + 1)) + [rank + 2])  # (g, *K, C/G, O)


# ---------------------------------------------------------------------------------------------------------
# Rules. forward(layer, inputs, trace) → (outputs, record);
# gradients(layer, record, grads, groups, group_size) → {attr: (g, …)}


class _Record:
    """One call of a rule layer: the tensors to differentiate and what the contraction needs."""

    def __init__(self, watched, **saved):
        self.watched = list(watched)
        self.saved = saved
        self.reads = {}  # attribute → the ReadVariableOp(s) of this call


class _Rule:
    """A layer kind's rule: ``forward`` records, per call, the tensors its gradients need; ``gradients`` forms the
    per-group weight gradients from them. Every entry a rule's ``gradients`` returns must be a sum of products of
    entries of the float tensors in ``record.saved`` and of ``grads`` (constants of magnitude ≤ 1 aside), each
    combination of entries at most once: :func:`_finite_certificate` bounds the rows by those operands."""

    name = None
    classes = ()  # class names (along the MRO) this rule handles
    call_owners = ()  # names of the classes whose ``call`` the rule reproduces
    attributes = ()  # the weight attributes whose gradients it forms

    def static_reason(self, layer):
        """None if the layer's configuration is handled, else why not."""
        if str(getattr(layer, "data_format", "channels_last")) != "channels_last":
            return f"data_format={layer.data_format!r} (only channels_last has a rule)"
        return None


def _bias_of(layer):
    bias = getattr(layer, "bias", None)
    return bias if getattr(layer, "use_bias", True) and bias is not None else None


class _Dense(_Rule):
    name = "dense"
    classes = ("Dense",)
    call_owners = ("Dense",)
    attributes = ("kernel", "bias")

    def static_reason(self, layer):
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return "LoRA or quantized Dense"
        return super().static_reason(layer)

    def forward(self, layer, inputs, trace):
        x = _compute_cast(layer, inputs)
        rank = x.shape.rank
        if rank is None or rank < 2 or x.shape[-1] is None:
            raise _Unsupported("Dense input of unknown rank or last dimension")
        kernel = trace.read(layer, "kernel")
        if rank == 2:
            z = tf.matmul(x, kernel)
        else:
            z = tf.tensordot(x, kernel, [[rank - 1], [0]])
            z.set_shape(x.shape[:-1].concatenate(kernel.shape[-1:]))
        trace.watch(z)
        outputs = z
        if _bias_of(layer) is not None:
            outputs = tf.nn.bias_add(outputs, trace.read(layer, "bias"))
        return _apply_activation(layer, outputs), _Record([z], x=x)

    def gradients(self, layer, record, grads, groups, group_size):
        (dz,) = grads
        result = {"kernel": _group_matmul(record.saved["x"], dz, groups)}
        if _bias_of(layer) is not None:
            result["bias"] = _channel_sum(dz, groups)
        return result


class _EinsumDense(_Rule):
    name = "einsum_dense"
    classes = ("EinsumDense",)
    call_owners = ("EinsumDense",)
    attributes = ("kernel", "bias")

    def static_reason(self, layer):
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return "LoRA or quantized EinsumDense"
        if self._parse(layer) is None:
            return f"equation {layer.equation!r} (only a leading batch letter or a leading '...' has a rule)"
        return None

    @staticmethod
    def _parse(layer):
        match = re.fullmatch(r"(\.\.\.)?([a-zA-Z]+),([a-zA-Z]+)->(\.\.\.)?([a-zA-Z]+)",
                             str(layer.equation).replace(" ", ""))
        if match is None:
            return None
        left, inputs, kernel, right, outputs = match.groups()
        if bool(left) != bool(right):
            return None
        if not left and (inputs[0] != outputs[0] or inputs[0] in kernel):
            return None
        return bool(left), inputs, kernel, outputs

    def forward(self, layer, inputs, trace):
        x = _compute_cast(layer, inputs)
        elided, spec_in, _, spec_out = self._parse(layer)
        if x.shape.rank is None or _static(x.shape[1:]) is None:
            raise _Unsupported("EinsumDense input with dynamic dimensions")
        if x.shape.rank < len(spec_in) + (1 if elided else 0):
            raise _Unsupported("EinsumDense input rank does not fit the equation")
        z = tf.einsum(layer.equation, x, trace.read(layer, "kernel"))
        trace.watch(z)
        outputs = z
        if getattr(layer, "bias", None) is not None:
            outputs = outputs + trace.read(layer, "bias")
        return _apply_activation(layer, outputs), _Record([z], x=x)

    def gradients(self, layer, record, grads, groups, group_size):
        (dz,) = grads
        x = _f32(record.saved["x"])
        dz32 = _f32(dz)
        elided, spec_in, spec_kernel, spec_out = self._parse(layer)
        free = [c for c in string.ascii_letters if c not in spec_in + spec_kernel + spec_out]
        group, extra = free[0], free[1]
        if elided:  # the samples and the elided dimensions are all summed: merge them
            x = tf.reshape(x, [groups, -1] + x.shape[-len(spec_in):].as_list())
            dz32 = tf.reshape(dz32, [groups, -1] + dz32.shape[-len(spec_out):].as_list())
            equation = f"{group}{extra}{spec_in},{group}{extra}{spec_out}->{group}{spec_kernel}"
        else:
            x = tf.reshape(x, [groups, -1] + x.shape[1:].as_list())
            dz32 = tf.reshape(dz32, [groups, -1] + dz32.shape[1:].as_list())
            equation = f"{group}{spec_in},{group}{spec_out}->{group}{spec_kernel}"
        result = {"kernel": tf.einsum(equation, x, dz32)}
        bias = getattr(layer, "bias", None)
        if bias is not None:
            dzs = tf.reshape(_f32(dz), [groups, -1] + dz.shape[1:].as_list())
            rank, bias_shape = dzs.shape.rank, bias.shape.as_list()
            offset = rank - len(bias_shape)
            axes = [1] + [a for a in range(2, rank) if a < offset or bias_shape[a - offset] == 1]
            result["bias"] = tf.reduce_sum(dzs, axis=axes)
        return result


class _Conv(_Rule):
    name = "conv"
    classes = ("Conv1D", "Conv2D", "Conv3D", "Convolution1D", "Convolution2D", "Convolution3D")
    call_owners = ("Conv", "BaseConv", "Conv1D", "Conv2D", "Conv3D")
    attributes = ("kernel", "bias")

    def static_reason(self, layer):
        reason = super().static_reason(layer)
        if reason is None and str(layer.padding).lower() not in ("valid", "same", "causal"):
            reason = f"padding={layer.padding!r}"
        if reason is None and (getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None)):
            reason = "LoRA or quantized convolution"
        return reason

    def forward(self, layer, inputs, trace):
        cfg = _conv_config(layer)
        x = _compute_cast(layer, inputs)
        if x.shape.rank != cfg["rank"] + 2 or _static(x.shape[1:]) is None:
            raise _Unsupported("convolution input with extra batch dimensions or dynamic spatial shape")
        if cfg["padding"] == "causal" and cfg["rank"] != 1:
            raise _Unsupported("causal padding of a convolution of rank > 1")
        if any(s > 1 for s in cfg["strides"]) and any(d > 1 for d in cfg["dilations"]):
            raise _Unsupported("strides and dilation both > 1")
        spatial = x.shape[1:-1].as_list()
        if cfg["padding"] == "same":
            out_sizes = [-(-s // st) for s, st in zip(spatial, cfg["strides"])]
        else:
            padded = [s + sum(p) for s, p in zip(spatial, _explicit_pads(spatial, None, cfg))] \
                if cfg["padding"] == "causal" else spatial
            out_sizes = [_valid_out(s, k, st, d) for s, k, st, d in
                         zip(padded, cfg["kernel_size"], cfg["strides"], cfg["dilations"])]
        pads = _explicit_pads(spatial, out_sizes, cfg)
        kernel = trace.read(layer, "kernel")
        if cfg["padding"] == "causal":
            z = tf.nn.convolution(_pad(x, pads), kernel, strides=cfg["strides"], padding="VALID",
                                  dilations=cfg["dilations"])
        else:
            z = tf.nn.convolution(x, kernel, strides=cfg["strides"], padding=cfg["padding"].upper(),
                                  dilations=cfg["dilations"])
        trace.watch(z)
        outputs = z
        if _bias_of(layer) is not None:
            outputs = tf.nn.bias_add(outputs, trace.read(layer, "bias"))
        return _apply_activation(layer, outputs), _Record([z], x=x, pads=pads, cfg=cfg)

    def gradients(self, layer, record, grads, groups, group_size):
        (dz,) = grads
        s = record.saved
        cfg, conv_groups = s["cfg"], int(getattr(layer, "groups", 1) or 1)
        kernel = _pointwise_kernel_gradient(s["x"], dz, cfg, conv_groups, groups)
        if kernel is None:
            kernel = _patch_kernel_gradient(s["x"], dz, cfg, conv_groups, groups)
        if kernel is None:
            kernel = _window_rows_kernel_gradient(_pad(s["x"], s["pads"]), dz, cfg, conv_groups, groups)
        if kernel is None:  # 'same' and 'valid' as the layer pads; 'causal' padded explicitly, then 'valid'
            unpadded = cfg["padding"] != "causal"
            kernel = _grouped_kernel_gradient(s["x"] if unpadded else _pad(s["x"], s["pads"]), dz,
                                              layer.kernel.shape, cfg,
                                              cfg["padding"].upper() if unpadded else "VALID", groups)
        if kernel is None:
            x = _pad(s["x"], s["pads"])
            if _looped(group_size):
                kernel = _looped_kernel_gradient(
                    lambda xg, k: tf.nn.convolution(xg, k, strides=cfg["strides"], padding="VALID",
                                                    dilations=cfg["dilations"]), layer.kernel.shape, x, dz, groups)
            else:
                kernel = _conv_kernel_gradient(x, dz, cfg, conv_groups, groups)
        result = {"kernel": kernel}
        if _bias_of(layer) is not None:
            result["bias"] = _channel_sum(dz, groups)
        return result


class _ConvTranspose(_Rule):
    name = "conv_transpose"
    classes = ("Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
               "Convolution1DTranspose", "Convolution2DTranspose", "Convolution3DTranspose")
    call_owners = classes + ("BaseConvTranspose",)
    attributes = ("kernel", "bias")

    def static_reason(self, layer):
        reason = super().static_reason(layer)
        if reason is None and str(layer.padding).lower() not in ("valid", "same"):
            reason = f"padding={layer.padding!r}"
        if reason is None and any(d != 1 for d in _as_tuple(layer.dilation_rate, len(layer.kernel_size))):
            reason = "dilated transposed convolution"
        if reason is None and int(getattr(layer, "groups", 1) or 1) != 1:
            reason = "grouped transposed convolution"
        return reason

    def forward(self, layer, inputs, trace):
        cfg = _conv_config(layer)
        x = _compute_cast(layer, inputs)
        if x.shape.rank != cfg["rank"] + 2 or _static(x.shape[1:]) is None:
            raise _Unsupported("transposed convolution input with dynamic spatial shape")
        out_shape = tf.TensorShape(layer.compute_output_shape(x.shape))
        out_spatial = _static(out_shape[1:-1])
        if out_spatial is None:
            raise _Unsupported("transposed convolution with a dynamic output shape")
        spatial = x.shape[1:-1].as_list()
        # The forward convolution z-shape → x-shape whose input gradient this layer computes must map
        # out_spatial back onto spatial exactly, else TensorFlow pads differently from the windows below.
        if cfg["padding"] == "same":
            fits = [-(-o // st) for o, st in zip(out_spatial, cfg["strides"])] == spatial
        else:
            fits = [_valid_out(o, k, st, 1) for o, k, st in
                    zip(out_spatial, cfg["kernel_size"], cfg["strides"])] == spatial
        if not fits:
            raise _Unsupported("transposed convolution output shape outside TensorFlow's convolution geometry")
        kernel = trace.read(layer, "kernel")
        batch = tf.shape(x)[0]
        z = tf.nn.conv_transpose(x, kernel, tf.stack([batch, *out_spatial, int(out_shape[-1])]),
                                 strides=cfg["strides"], padding=cfg["padding"].upper())
        z.set_shape([x.shape[0], *out_spatial, int(out_shape[-1])])
        trace.watch(z)
        outputs = z
        if _bias_of(layer) is not None:
            outputs = tf.nn.bias_add(outputs, trace.read(layer, "bias"))
        pads = _explicit_pads(out_spatial, spatial, dict(cfg, dilations=(1,) * cfg["rank"]))
        return _apply_activation(layer, outputs), _Record([z], x=x, pads=pads, cfg=cfg)

    def gradients(self, layer, record, grads, groups, group_size):
        (dz,) = grads
        s = record.saved
        cfg = s["cfg"]
        if _looped(group_size):
            out_tail = dz.shape[1:].as_list()
            kernel = _looped_kernel_gradient(
                lambda xg, k: tf.nn.conv_transpose(xg, k, tf.concat([tf.shape(xg)[:1], out_tail], axis=0),
                                                   strides=cfg["strides"], padding=cfg["padding"].upper()),
                layer.kernel.shape, s["x"], dz, groups)
        else:  # dK[k, o, c] = Σ_p dz_padded[p·s + k, o] · x[p, c]: the forward convolution's geometry on dz
            kernel = _conv_kernel_gradient(_pad(dz, s["pads"]), s["x"], cfg, 1, groups)
        result = {"kernel": kernel}
        if _bias_of(layer) is not None:
            result["bias"] = _channel_sum(dz, groups)
        return result


def _depthwise_forward(x, depthwise_kernel, cfg):
    """Depthwise convolution of channels_last x (rank 1 or 2) with TF's own op; returns (u, pads)."""
    spatial = x.shape[1:-1].as_list()
    if cfg["padding"] == "same":
        out_sizes = [-(-s // st) for s, st in zip(spatial, cfg["strides"])]
    else:
        out_sizes = [_valid_out(s, k, st, d) for s, k, st, d in
                     zip(spatial, cfg["kernel_size"], cfg["strides"], cfg["dilations"])]
    pads = _explicit_pads(spatial, out_sizes, cfg)
    if cfg["rank"] == 1:
        u = tf.nn.depthwise_conv2d(tf.expand_dims(x, 1), tf.expand_dims(depthwise_kernel, 0),
                                   strides=(1,) + cfg["strides"] * 2 + (1,), padding=cfg["padding"].upper(),
                                   dilations=(1,) + cfg["dilations"])
        u = tf.squeeze(u, [1])
    else:
        u = tf.nn.depthwise_conv2d(x, depthwise_kernel, strides=(1,) + cfg["strides"] + (1,),
                                   padding=cfg["padding"].upper(), dilations=cfg["dilations"])
    return u, pads


def _depthwise_checks(layer, x, cfg):
    if x.shape.rank != cfg["rank"] + 2 or _static(x.shape[1:]) is None:
        raise _Unsupported("depthwise convolution input with dynamic spatial shape")
    if cfg["rank"] not in (1, 2):
        raise _Unsupported("depthwise convolution of rank > 2")
    if any(s > 1 for s in cfg["strides"]) and any(d > 1 for d in cfg["dilations"]):
        raise _Unsupported("strides and dilation both > 1")
    if cfg["rank"] == 2 and cfg["strides"][0] != cfg["strides"][1]:
        raise _Unsupported("unequal depthwise strides")


def _depthwise_attr(layer):
    """tf_keras names a depthwise convolution's kernel ``depthwise_kernel``, Keras 3 ``kernel``."""
    return "depthwise_kernel" if getattr(layer, "depthwise_kernel", None) is not None else "kernel"


def _depthwise_gradient(layer, saved, dz, groups, group_size):
    x, cfg = _pad(saved["x"], saved["pads"]), saved["cfg"]
    shape = getattr(layer, _depthwise_attr(layer)).shape
    if _looped(group_size):
        valid = dict(cfg, padding="valid")
        return _looped_kernel_gradient(lambda xg, k: _depthwise_forward(xg, k, valid)[0], shape, x, dz, groups)
    return _depthwise_kernel_gradient(x, dz, cfg, int(shape[-1]), groups)


class _DepthwiseConv(_Rule):
    name = "depthwise_conv"
    classes = ("DepthwiseConv1D", "DepthwiseConv2D")
    call_owners = classes + ("DepthwiseConv", "BaseDepthwiseConv")
    attributes = ("depthwise_kernel", "kernel", "bias")

    def static_reason(self, layer):
        reason = super().static_reason(layer)
        if reason is None and str(layer.padding).lower() not in ("valid", "same"):
            reason = f"padding={layer.padding!r}"
        return reason

    def forward(self, layer, inputs, trace):
        cfg = _conv_config(layer)
        x = _compute_cast(layer, inputs)
        _depthwise_checks(layer, x, cfg)
        z, pads = _depthwise_forward(x, trace.read(layer, _depthwise_attr(layer)), cfg)
        trace.watch(z)
        outputs = z
        if _bias_of(layer) is not None:
            outputs = tf.nn.bias_add(outputs, trace.read(layer, "bias"))
        return _apply_activation(layer, outputs), _Record([z], x=x, pads=pads, cfg=cfg)

    def gradients(self, layer, record, grads, groups, group_size):
        (dz,) = grads
        s = record.saved
        result = {_depthwise_attr(layer): _depthwise_gradient(layer, s, dz, groups, group_size)}
        if _bias_of(layer) is not None:
            result["bias"] = _channel_sum(dz, groups)
        return result


class _SeparableConv(_Rule):
    name = "separable_conv"
    classes = ("SeparableConv1D", "SeparableConv2D", "SeparableConvolution1D", "SeparableConvolution2D")
    call_owners = classes + ("SeparableConv", "BaseSeparableConv")
    attributes = ("depthwise_kernel", "pointwise_kernel", "bias")

    def static_reason(self, layer):
        reason = super().static_reason(layer)
        if reason is None and str(layer.padding).lower() not in ("valid", "same", "causal"):
            reason = f"padding={layer.padding!r}"
        return reason

    def forward(self, layer, inputs, trace):
        cfg = _conv_config(layer)
        x = _compute_cast(layer, inputs)
        if cfg["padding"] == "causal":
            if cfg["rank"] != 1:
                raise _Unsupported("causal padding of rank > 1")
            x = _pad(x, _explicit_pads(None, None, cfg))
            cfg = dict(cfg, padding="valid")
        _depthwise_checks(layer, x, cfg)
        u, pads = _depthwise_forward(x, trace.read(layer, "depthwise_kernel"), cfg)
        trace.watch(u)
        pointwise = trace.read(layer, "pointwise_kernel")
        z = tf.tensordot(u, tf.reshape(pointwise, pointwise.shape[-2:]), [[u.shape.rank - 1], [0]])
        z.set_shape(u.shape[:-1].concatenate(pointwise.shape[-1:]))
        trace.watch(z)
        outputs = z
        if _bias_of(layer) is not None:
            outputs = tf.nn.bias_add(outputs, trace.read(layer, "bias"))
        return _apply_activation(layer, outputs), _Record([u, z], x=x, u=u, pads=pads, cfg=cfg)

    def gradients(self, layer, record, grads, groups, group_size):
        du, dz = grads
        s = record.saved
        result = {"depthwise_kernel": _depthwise_gradient(layer, s, du, groups, group_size),
                  "pointwise_kernel": _group_matmul(s["u"], dz, groups)}
        if _bias_of(layer) is not None:
            result["bias"] = _channel_sum(dz, groups)
        return result


class _Embedding(_Rule):
    name = "embedding"
    classes = ("Embedding",)
    call_owners = ("Embedding",)
    attributes = ("embeddings",)

    def static_reason(self, layer):
        if getattr(layer, "sparse", False):
            return "sparse Embedding"
        if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
            return "LoRA or quantized Embedding"
        return None

    def forward(self, layer, inputs, trace):
        ids = inputs
        if ids.dtype not in (tf.int32, tf.int64):
            ids = tf.cast(ids, tf.int32)
        if ids.shape.rank is None:
            raise _Unsupported("Embedding ids of unknown rank")
        table = trace.read(layer, "embeddings")
        out = tf.nn.embedding_lookup(table, ids)
        trace.watch(out)
        outputs = out
        compute = getattr(layer, "compute_dtype", None)
        if compute is not None and tf.as_dtype(compute) != out.dtype:
            outputs = tf.cast(outputs, compute)
        return outputs, _Record([out], ids=ids)

    def gradients(self, layer, record, grads, groups, group_size):
        (dout,) = grads
        vocabulary, width = (int(d) for d in layer.embeddings.shape)
        ids = tf.reshape(tf.cast(record.saved["ids"], tf.int64), [groups, -1])
        segments = ids + tf.range(tf.cast(groups, tf.int64), dtype=tf.int64)[:, None] * vocabulary
        rows = tf.math.unsorted_segment_sum(tf.reshape(_f32(dout), [-1, width]), tf.reshape(segments, [-1]),
                                            tf.cast(groups, tf.int64) * vocabulary)
        return {"embeddings": rows}


class _LocallyConnected(_Rule):
    name = "locally_connected"
    classes = ("LocallyConnected1D", "LocallyConnected2D")
    call_owners = classes
    attributes = ("kernel", "bias")

    def static_reason(self, layer):
        reason = super().static_reason(layer)
        if reason is None and getattr(layer, "implementation", None) not in (1, 2, 3):
            reason = f"implementation={getattr(layer, 'implementation', None)!r}"
        return reason

    def forward(self, layer, inputs, trace):
        x = _compute_cast(layer, inputs)
        rank = len(layer.kernel_size)
        if x.shape.rank != rank + 2 or _static(x.shape[1:]) is None:
            raise _Unsupported("LocallyConnected input with dynamic shape")
        out_shape = _static(tf.TensorShape(layer.compute_output_shape(x.shape))[1:])
        if out_shape is None:
            raise _Unsupported("LocallyConnected with a dynamic output shape")
        out_sizes, filters = out_shape[:-1], out_shape[-1]
        kernel = trace.read(layer, "kernel")
        implementation = layer.implementation
        if implementation == 1:
            kernel_size, strides = _as_tuple(layer.kernel_size, rank), _as_tuple(layer.strides, rank)
            features = math.prod(kernel_size) * x.shape[-1]
            pieces = []
            for position in itertools.product(*(range(m) for m in out_sizes)):
                index = (slice(None),) + tuple(slice(p * s, p * s + k) for p, s, k in
                                               zip(position, strides, kernel_size)) + (slice(None),)
                pieces.append(tf.reshape(x[index], [1, -1, features]))
            patches = tf.concat(pieces, axis=0)  # (P, n, F)
            flat = tf.matmul(patches, kernel)  # (P, n, O)
            z = tf.reshape(tf.transpose(flat, [1, 0, 2]), [-1, *out_sizes, filters])
            saved = dict(patches=patches)
        elif implementation == 2:
            mask = tf.cast(layer.kernel_mask, kernel.dtype)
            x_flat = tf.reshape(x, [-1, math.prod(x.shape[1:].as_list())])
            matrix = tf.reshape(mask * kernel, [x_flat.shape[-1], -1])
            z = tf.reshape(tf.matmul(x_flat, matrix), [-1, *out_shape])
            saved = dict(x_flat=x_flat, mask=mask)
        else:
            x_flat = tf.reshape(x, [-1, math.prod(x.shape[1:].as_list())])
            indices = tf.constant(layer.kernel_idxs, dtype=tf.int64)
            product = tf.sparse.sparse_dense_matmul(
                tf.SparseTensor(indices, kernel, layer.kernel_shape), x_flat, adjoint_b=True)
            z = tf.reshape(tf.transpose(product), [-1, *out_shape])
            saved = dict(x_flat=x_flat, indices=indices)
        trace.watch(z)
        outputs = z
        if _bias_of(layer) is not None:
            outputs = outputs + trace.read(layer, "bias")
        return _apply_activation(layer, outputs), _Record([z], **saved)

    def gradients(self, layer, record, grads, groups, group_size):
        (dz,) = grads
        s = record.saved
        filters = int(dz.shape[-1])
        if layer.implementation == 1:
            patches = s["patches"]
            p = tf.reshape(_f32(patches), [patches.shape[0], groups, -1, patches.shape[-1]])  # (P, g, b, F)
            d = tf.reshape(_f32(dz), [groups, -1, patches.shape[0], filters])  # (g, b, P, O)
            kernel = tf.einsum("pgbf,gbpo->gpfo", p, d)
        elif layer.implementation == 2:
            dz_flat = tf.reshape(dz, [-1, math.prod(dz.shape[1:].as_list())])
            kernel = _group_matmul(s["x_flat"], dz_flat, groups)
            kernel = tf.reshape(kernel, [groups, *layer.kernel.shape.as_list()]) * _f32(s["mask"])
        else:  # the sparse kernel's entry k is Σ_samples x[col_k] · dz[row_k]: (g, b, nnz) products
            dz_flat = tf.reshape(_f32(dz), [groups, -1, math.prod(dz.shape[1:].as_list())])
            x_flat = tf.reshape(_f32(s["x_flat"]), [groups, -1, s["x_flat"].shape[-1]])
            rows, cols = s["indices"][:, 0], s["indices"][:, 1]
            kernel = tf.reduce_sum(tf.gather(dz_flat, rows, axis=2) * tf.gather(x_flat, cols, axis=2), axis=1)
        result = {"kernel": kernel}
        if _bias_of(layer) is not None:
            dzs = tf.reshape(_f32(dz), [groups, -1] + dz.shape[1:].as_list())
            bias_rank = layer.bias.shape.rank
            result["bias"] = tf.reduce_sum(dzs, axis=list(range(1, dzs.shape.rank - bias_rank)))
        return result


_RULES = (_Dense(), _EinsumDense(), _Conv(), _ConvTranspose(), _DepthwiseConv(), _SeparableConv(), _Embedding(),
          _LocallyConnected())
_RULE_BY_CLASS = {name: rule for rule in _RULES for name in rule.classes}
_ALL_ATTRIBUTES = tuple(dict.fromkeys(a for rule in _RULES for a in rule.attributes))
RULE_CLASSES = {rule.name: rule.classes for rule in _RULES}  # rule name → the layer class names it covers


def _rule_of(layer):
    """(rule, None) if the layer has a rule for its configuration, else (None, reason)."""
    mro = type(layer).__mro__
    rule = next((_RULE_BY_CLASS[c.__name__] for c in mro if c.__name__ in _RULE_BY_CLASS), None)
    if rule is None:
        return None, f"no rule for {type(layer).__name__}"
    if "call" in vars(layer):
        return None, f"{layer.name}: call replaced on the instance"
    owner = next((c for c in mro if "call" in vars(c)), None)
    if owner is None or owner.__name__ not in rule.call_owners:
        return None, f"{type(layer).__name__} overrides call ({owner.__name__ if owner else '?'}.call)"
    try:
        reason = rule.static_reason(layer)
    except (AttributeError, TypeError, ValueError) as error:
        reason = f"unreadable configuration ({error})"
    return (rule, None) if reason is None else (None, f"{type(layer).__name__} {layer.name}: {reason}")


# Keras' own layers (and models) that, in inference mode, compute each sample's outputs from that sample alone and
# keep no state between calls: a model made of these only, none with its ``call`` replaced, needs no numerical
# check of the rules (keeps_samples_apart). Matched by exact class and module, never by subclass: a subclass may
# change what its parent computes. Lambda and TFOpLambda (any op, a sum over the batch included), the RNN layers (a
# stateful one carries samples over from the previous call) and every custom layer keep the check.
_SAMPLEWISE_LAYERS = frozenset("""
    Functional Sequential InputLayer Dense EinsumDense Embedding
    Conv1D Conv2D Conv3D Conv1DTranspose Conv2DTranspose Conv3DTranspose DepthwiseConv1D DepthwiseConv2D
    SeparableConv1D SeparableConv2D LocallyConnected1D LocallyConnected2D
    BatchNormalization LayerNormalization GroupNormalization UnitNormalization
    Activation ReLU LeakyReLU PReLU ELU Softmax ThresholdedReLU
    Add Subtract Multiply Average Maximum Minimum Concatenate Dot
    MaxPooling1D MaxPooling2D MaxPooling3D AveragePooling1D AveragePooling2D AveragePooling3D
    GlobalAveragePooling1D GlobalAveragePooling2D GlobalAveragePooling3D
    GlobalMaxPooling1D GlobalMaxPooling2D GlobalMaxPooling3D
    Flatten Reshape Permute RepeatVector ZeroPadding1D ZeroPadding2D ZeroPadding3D
    Cropping1D Cropping2D Cropping3D UpSampling1D UpSampling2D UpSampling3D
    Dropout SpatialDropout1D SpatialDropout2D SpatialDropout3D GaussianNoise GaussianDropout AlphaDropout
    MultiHeadAttention Attention AdditiveAttention
""".split())
_KERAS_MODULES = ("tf_keras.src.", "keras.src.")


def keeps_samples_apart(model):
    """Whether ``model`` and every layer in it (nested models included) is one of Keras' own layers known to compute
    each sample from that sample alone in inference mode (exact class, not a subclass; ``call`` not replaced on the
    instance; an ``axis`` that is not the batch axis; Keras' own activation functions), so that the rules'
    assumption holds by construction.

    Args:
        model: a Keras model.

    Returns:
        True, or False when any layer is unknown (a custom layer, a subclass, ``Lambda``, a recurrent layer, ...).
    """
    for layer in [model, *_all_layers(model)]:
        kind = type(layer)
        if kind.__name__ not in _SAMPLEWISE_LAYERS or not (kind.__module__ or "").startswith(_KERAS_MODULES) \
                or "call" in vars(layer) or not _spares_the_batch_axis(layer):
            return False
        activation = getattr(layer, "activation", None)  # a user's function could mix the samples
        if activation is not None and not (getattr(activation, "__module__", None) or "").startswith(
                tuple(f"{prefix}activations" for prefix in _KERAS_MODULES)):
            return False
    return True


def _spares_the_batch_axis(layer):
    """Whether the axes a layer normalises, concatenates or takes a softmax over (its ``axis``) exclude the batch axis:
    positive ones do; a negative one does when the layer's input rank is known and it does not count back to 0."""
    axis = getattr(layer, "axis", None)
    if axis is None:
        return True
    axes = [axis] if isinstance(axis, int) else list(axis) if isinstance(axis, (list, tuple)) else None
    if axes is None or not all(isinstance(a, int) for a in axes):
        return False
    if all(a >= 1 for a in axes):
        return True
    try:
        inputs = layer.input  # a layer called once in a functional or Sequential model
        rank = (inputs[0] if isinstance(inputs, (list, tuple)) else inputs).shape.rank
    except (AttributeError, ValueError, IndexError):
        return False
    return rank is not None and all(0 < a + rank < rank if a < 0 else a >= 1 for a in axes)


def _all_layers(model):
    flatten = getattr(model, "_flatten_layers", None)
    if flatten is not None:
        try:
            return list(flatten(include_self=False, recursive=True))
        except TypeError:
            pass
    return [m for m in getattr(model, "submodules", ()) if callable(getattr(m, "call", None))]


def _is_batch_norm(layer):
    return any("BatchNorm" in c.__name__ for c in type(layer).__mro__) or (
        hasattr(layer, "moving_mean") and hasattr(layer, "moving_variance"))


class _Plan:
    """Static analysis: for each variable, the rule layer and attribute that own it, or why it falls back."""

    def __init__(self, model, variables):
        self.variables = list(variables)
        owners = {}
        layers = _all_layers(model)
        self.rule_layers, self.reasons = {}, {}
        layer_rules = {}
        for layer in layers:
            rule, reason = _rule_of(layer)
            layer_rules[id(layer)] = (rule, reason)
            for attr in _ALL_ATTRIBUTES:
                try:
                    value = getattr(layer, attr, None)
                except Exception:  # noqa: BLE001  (a property of an unbuilt layer may raise anything)
                    continue
                if value is None or not hasattr(value, "shape") or not hasattr(value, "dtype"):
                    continue
                if isinstance(value, tf.Tensor):
                    continue
                owners.setdefault(_key(value), []).append((layer, attr))
        self.owner = []  # per variable: (layer, rule, attr) or None
        for v in self.variables:
            candidates = owners.get(_key(v), [])
            with_rule = [(layer, attr) for layer, attr in candidates
                         if layer_rules[id(layer)][0] is not None and attr in layer_rules[id(layer)][0].attributes]
            if len(with_rule) == 1:
                layer, attr = with_rule[0]
                if attr == "bias" and _bias_of(layer) is None:
                    self.owner.append(None)
                    self.reasons[_key(v)] = "bias of a layer with use_bias=False"
                    continue
                rule = layer_rules[id(layer)][0]
                self.owner.append((layer, rule, attr))
                self.rule_layers[id(layer)] = (layer, rule)
            else:
                self.owner.append(None)
                if len(with_rule) > 1:
                    self.reasons[_key(v)] = "owned by several rule layers"
                elif candidates:
                    self.reasons[_key(v)] = "; ".join(sorted({layer_rules[id(owner)][1] or f"{type(owner).__name__}.{a}"
                                                              for owner, a in candidates}))
                else:
                    self.reasons[_key(v)] = "not a weight of a layer with a rule"
        self.batch_norms = [layer for layer in layers if _is_batch_norm(layer) and id(layer) not in self.rule_layers]

    def coverage(self):
        return [None if o is None else f"{o[1].name}.{o[2]}" for o in self.owner]


# ---------------------------------------------------------------------------------------------------------
# Tracing


class _Trace:
    """State of one traced forward pass with the rule layers patched."""

    def __init__(self, plan, tape):
        self.plan, self.tape = plan, tape
        self.graph = tf.compat.v1.get_default_graph()
        self.records = {}  # id(layer) → [_Record]
        self.rejected = {}  # id(layer) → reason
        self.coupled = []  # reasons the samples of the batch interact
        self._reads = None

    def watch(self, tensor):
        if self.tape is not None:
            self.tape.watch(tensor)

    def read(self, layer, attr):
        """The layer's weight as a tensor, as the layer reads it (auto-cast), remembering the read op."""
        value = tf.convert_to_tensor(getattr(layer, attr))
        op = value.op
        while op.type in ("Cast", "Identity") and op.inputs:
            op = op.inputs[0].op
        self._reads.setdefault(attr, []).append(op if op.type == "ReadVariableOp" else None)
        return value

    def patched_call(self, layer, rule, original):
        trace = self

        @tf.autograph.experimental.do_not_convert
        def call(inputs, *args, **kwargs):
            reason = trace._dynamic_reason(inputs, args, kwargs)
            if reason is None:
                trace._reads = {}
                try:
                    outputs, record = rule.forward(layer, inputs, trace)
                except _Unsupported as error:
                    reason = str(error)
                else:
                    record.reads = trace._reads
                    trace.records.setdefault(id(layer), []).append(record)
                    return outputs
                finally:
                    trace._reads = None
            trace.rejected.setdefault(id(layer), f"{layer.name}: {reason}")
            return original(inputs, *args, **kwargs)

        return call

    def recording_call(self, layer, original):
        """A batch normalisation's call that notes whether it ran on batch statistics."""
        trace = self

        @tf.autograph.experimental.do_not_convert
        def call(inputs, *args, **kwargs):
            training = kwargs.get("training", args[0] if args else None)
            value = training
            getter = getattr(layer, "_get_training_value", None)
            if getter is not None:
                try:
                    value = getter(training)
                except Exception:  # noqa: BLE001
                    value = training
            if value is not None and not isinstance(value, bool) and not isinstance(value, int):
                value = tf.get_static_value(value)
            if (value is None and training is not None) or (value and getattr(layer, "trainable", True)):
                trace.coupled.append(f"{layer.name} runs on batch statistics (training={training!r})")
            return original(inputs, *args, **kwargs)

        return call

    def _dynamic_reason(self, inputs, args, kwargs):
        if args or any(k not in ("training", "mask") or (k == "mask" and v is not None) for k, v in kwargs.items()):
            return "called with extra arguments"
        if not isinstance(inputs, tf.Tensor) or isinstance(inputs, (tf.RaggedTensor, tf.SparseTensor)):
            return f"input is a {type(inputs).__name__}"
        if tf.compat.v1.get_default_graph() is not self.graph:
            return "called inside control flow or a nested function"
        if inputs.shape.rank is None or inputs.shape.rank < 1:
            return "input of unknown rank"
        if inputs.shape[0] is not None:
            return "input whose first axis is not the batch of samples"
        return None

    def decide(self):
        """Per variable, (layer, rule, attr) if its rule gradient is exact, else None; and the reasons."""
        reasons = dict(self.plan.reasons)
        captured = {}
        for external, internal in getattr(self.graph, "captures", ()):
            captured.setdefault(id(external), []).append(internal)
        owners = []
        for v, owner in zip(self.plan.variables, self.plan.owner):
            if owner is None:
                owners.append(None)
                continue
            layer, rule, attr = owner
            reason = None
            if self.coupled:
                reason = "; ".join(self.coupled)
            elif id(layer) in self.rejected:
                reason = self.rejected[id(layer)]
            else:
                reads = [op for rec in self.records.get(id(layer), []) for op in rec.reads.get(attr, [])]
                if any(op is None for op in reads):
                    reason = f"{layer.name}.{attr}: read through something else than a ReadVariableOp"
                else:
                    handles = {id(op.inputs[0]): op.inputs[0] for op in reads}
                    try:
                        for internal in captured.get(id(_tf_variable(v).handle), []):
                            handles[id(internal)] = internal
                    except (AttributeError, ValueError, TypeError):
                        pass
                    ours = {op.name for op in reads}
                    others = {c.name for h in handles.values() for c in h.consumers()} - ours
                    if others:
                        reason = f"{layer.name}.{attr} is also read outside its rule ({sorted(others)[0]})"
            if reason is None:
                owners.append(owner)
            else:
                owners.append(None)
                reasons[_key(v)] = reason
        return owners, reasons


class _Patches:
    """Replaces, on the instances, the call of the rule layers and batch normalisations; restores on exit."""

    def __init__(self, trace):
        self.trace, self.saved = trace, []

    def __enter__(self):
        try:
            for layer, rule in self.trace.plan.rule_layers.values():
                self._replace(layer, self.trace.patched_call(layer, rule, layer.call))
            for layer in self.trace.plan.batch_norms:
                self._replace(layer, self.trace.recording_call(layer, layer.call))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _replace(self, layer, call):
        self.saved.append((layer, vars(layer).get("call", _MISSING)))
        object.__setattr__(layer, "call", call)

    def __exit__(self, *exc):
        while self.saved:
            layer, previous = self.saved.pop()
            if previous is _MISSING:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", previous)
        return False


_MISSING = object()


class GradientRows(tuple):
    """A rule gradient function's result: per variable its (g, size) float32 rows, as a tuple.

    Attributes:
        finite: a (variables,) bool tensor, True where every entry of that variable's rows is known to be finite
            (:func:`_finite_certificate`), so a collector need not count their NaN and infinite entries; False where
            that is not known (count them). None: nothing is known.
    """

    def __new__(cls, rows, finite=None):
        self = super().__new__(cls, rows)
        self.finite = finite
        return self


# The certificate proves finite rows when the bound on their entries stays below float32's largest value by this
# factor (2^-10: rounding in long sums and the transforms of a convolution algorithm)
_CERTIFIED_MAX = math.log(tf.float32.max) - 10 * math.log(2.0)


_CERTIFIED_READS = 2  # operand entries per row entry up to which a layer's rows are certified rather than counted


def _float_operands(record, grads):
    """The float tensors a rule's contractions read for one call: those of ``record.saved`` and the grads."""
    saved = [t for t in record.saved.values() if isinstance(t, tf.Tensor) and t.dtype.is_floating]
    return saved + [t for t in grads if t.dtype.is_floating]


def _per_group_elements(tensors, group_size):
    """Σ elements of ``tensors`` per group of ``group_size`` samples, or None when that is not static (a tensor
    whose shape has another unknown axis than its one axis of g·b samples)."""
    total = 0
    for t in tensors:
        dims = t.shape.as_list() if t.shape.rank is not None else None
        if dims is None or dims.count(None) > 1:
            return None
        known = math.prod(d for d in dims if d is not None)
        total += known * group_size if None in dims else 0  # a static tensor (a mask) is not per group
    return total


def _finite_certificate(operands, calls):
    """A bool scalar: True proves that every entry of rows formed by ``calls`` rule calls from ``operands`` is
    finite.

    An entry is a sum of products of entries of distinct operands, each combination at most once (the contract of
    :class:`_Rule`), so its magnitude is at most calls · Π_t max(‖t‖₁, 1) ≤ calls · Π_t max(√n_t ‖t‖₂, 1) (n_t
    entries of t), and so is every partial sum and product along the way. The certificate holds when every ‖t‖₂ is
    finite (no NaN or infinity in any operand; a square's overflow only withholds it) and that bound, in log
    space, is below :data:`_CERTIFIED_MAX`. One pass over each operand (``EuclideanNorm``, no temporary).
    """
    logs = [tf.math.log(tf.maximum(tf.math.reduce_euclidean_norm(_f32(t))  # ‖t‖₂
                                   * tf.sqrt(tf.cast(tf.size(t), tf.float32)), 1.0)) for t in operands]
    return tf.add_n(logs) + math.log(calls) < _CERTIFIED_MAX  # NaN compares False


def _flat_samples(t):
    """(g, b, ...) → (g·b, ...), keeping the static inner shape."""
    if t.shape.rank is not None and t.shape[2:].is_fully_defined():
        return tf.reshape(t, [-1] + t.shape[2:].as_list())
    flat = tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], axis=0))
    if t.shape.rank is not None:
        flat.set_shape(tf.TensorShape([None]).concatenate(t.shape[2:]))
    return flat


def _default_fallback(model, variables, loss_fn):
    """``make_gradient_fn`` of the model in inference mode and the variables (a Keras 3 Variable as the
    tf.Variable a tape can watch)."""
    from tf_woodfisher.fisher.gradients import make_gradient_fn  # lazy: gradients.py may import this module

    def forward(x, training=False):  # called as forward(x) or forward(x, training=False): always inference
        return model(x, training=False)

    return make_gradient_fn(forward, [v if isinstance(v, tf.Variable) else _tf_variable(v) for v in variables],
                            loss_fn)


def make_rule_gradient_fn(model, variables, loss_fn, fallback=None):
    """Returns gradients(x, y) with x, y (and nested structures) shaped (g, b, ...): g groups of b samples.

    Returns a :class:`GradientRows`, a tuple, one per variable in ``variables``, of float32 tensors (g,
    variable.size): the flattened gradient of each group's MEAN per-sample loss in inference mode
    (``model(x, training=False)``), the same as :func:`tf_woodfisher.fisher.gradients.make_gradient_fn`; its
    ``finite`` flags mark the rule variables whose rows a bound on the layer's inputs and output gradients proves
    finite (where those hold fewer than :data:`_CERTIFIED_READS` times as many entries per group as the rows).
    ``loss_fn(y_true, y_pred)`` returns per-sample losses (n,) (or (n, ...), averaged within the group like the
    reference).

    Variables of rule layers come from one batched forward and one batched backward over all g·b samples;
    the others from ``fallback(model, fallback_variables, loss_fn)`` — a function returning a gradient
    function of the same contract for those variables; default: ``make_gradient_fn`` of
    ``model(x, training=False)``, a vectorised map over groups — called inside the same compiled function.
    Compiled once per input signature for any number of groups g. The returned function has attributes
    ``coverage`` (per variable, the rule used or None) and ``fallback_reasons`` (variable name → why), set when it
    traces, and the method ``transient_bytes(x, y)``: for a chunk's static shapes (tensors or ``tf.TensorSpec``\\ s),
    the bytes one call allocates besides its rows (:func:`tf_woodfisher.fisher.graph_memory.transient_bytes`).
    """
    variables, loss_fn = list(variables), compat.user_code(loss_fn)
    fallback = fallback or _default_fallback
    plan = _Plan(model, variables)

    def step(x, y):
        groups = tf.shape(tf.nest.flatten(x)[0])[0]
        group_size = tf.nest.flatten(x)[0].shape[1]
        flat_x, flat_y = tf.nest.map_structure(_flat_samples, (x, y))
        owners, reasons = [None] * len(variables), dict(plan.reasons)
        rows, finite = [None] * len(variables), {}
        if plan.rule_layers:
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                trace = _Trace(plan, tape)
                with _Patches(trace):
                    predictions = model(flat_x, training=False)
                losses = loss_fn(flat_y, predictions)
                if losses.shape.rank is None or losses.shape.rank == 0:
                    trace.coupled.append(f"the loss is not per sample (shape {losses.shape})")
                    total = None
                else:
                    per_group = tf.reduce_mean(tf.reshape(_f32(losses), [groups, -1]), axis=1)
                    total = tf.reduce_sum(per_group)
            owners, reasons = trace.decide()
            used = [(i, owner) for i, owner in enumerate(owners) if owner is not None]
            if used:
                layers = {id(owner[0]): owner[0] for _, owner in used}
                calls = [(layer, record) for key, layer in layers.items() for record in trace.records.get(key, [])]
                watched = [t for _, record in calls for t in record.watched]
                grads = [tf.convert_to_tensor(d) for d in
                         tape.gradient(total, watched, unconnected_gradients=tf.UnconnectedGradients.ZERO)]
                sums, start, operands, call_count = {}, 0, {}, {}
                for layer, record in calls:
                    count = len(record.watched)
                    rule = plan.rule_layers[id(layer)][1]
                    call_grads = grads[start:start + count]
                    for attr, value in rule.gradients(layer, record, call_grads, groups, group_size).items():
                        key = (id(layer), attr)
                        sums[key] = value if key not in sums else sums[key] + value
                    operands.setdefault(id(layer), []).extend(_float_operands(record, call_grads))
                    call_count[id(layer)] = call_count.get(id(layer), 0) + 1
                    start += count
                for i, (layer, rule, attr) in used:
                    size = _size(variables[i])
                    value = sums.get((id(layer), attr))
                    rows[i] = tf.zeros([groups, size], tf.float32) if value is None else \
                        tf.reshape(_f32(value), [-1, size])
                finite = _certified_layers(used, variables, operands, call_count, group_size)
        rest = [i for i, row in enumerate(rows) if row is None]
        if rest:
            fallback_rows = fallback(model, [variables[i] for i in rest], loss_fn)(x, y)
            for i, row in zip(rest, fallback_rows):
                rows[i] = tf.reshape(_f32(tf.convert_to_tensor(row)), [-1, _size(variables[i])])
        gradients.coverage = [None if o is None else f"{o[1].name}.{o[2]}" for o in owners]
        gradients.fallback_reasons = {variables[i].name: reasons.get(_key(variables[i]), "fallback")
                                      for i in rest}
        flags = [finite.get(i, False) for i in range(len(variables))]
        return tuple(rows), tf.stack([tf.constant(f) if isinstance(f, bool) else f for f in flags])

    compiled = compat.function(step)

    def concrete(x, y):
        return compiled.get_concrete_function(*any_chunk(x, y))

    def gradients(x, y):
        return GradientRows(*concrete(x, y)(x, y))

    gradients.transient_bytes = chunk_estimator(concrete)
    gradients.coverage = None
    gradients.fallback_reasons = None
    return gradients


def _certified_layers(used, variables, operands, call_count, group_size):
    """Per rule variable index, its layer's :func:`_finite_certificate`, where the layer's operands hold fewer
    than :data:`_CERTIFIED_READS` times as many entries per group as its rows (the certificate, inside the compiled
    call, then reads about as much as counting the rows would after it, or less); the others are left out (not
    known finite)."""
    by_layer = {}
    for i, (layer, _, _) in used:
        by_layer.setdefault(id(layer), []).append(i)
    finite = {}
    for key, indices in by_layer.items():
        cost = _per_group_elements(operands.get(key, []), group_size) if group_size else None
        rows = sum(_size(variables[i]) for i in indices)
        if not operands.get(key) or cost is None or cost >= _CERTIFIED_READS * rows:
            continue
        certificate = _finite_certificate(operands[key], call_count[key])
        finite.update({i: certificate for i in indices})
    return finite


def rule_coverage(model, variables, inputs=None):
    """Per variable, the rule that forms its gradient (e.g. ``"conv.kernel"``) or None (the fallback).

    Without ``inputs`` this is the static view (layer kinds and configurations). With ``inputs`` (a
    batch, or a structure of ``tf.TensorSpec`` with a leading batch axis, as the model takes it) the
    forward pass is traced once with the rules in place, which also catches what only shows at trace time
    (dynamic shapes, control flow, tied weights, batch statistics); the exact coverage of a gradient
    function is its ``coverage`` attribute once it has run.
    """
    plan = _Plan(model, variables)
    if inputs is None or not plan.rule_layers:
        return plan.coverage()
    spec = tf.nest.map_structure(
        lambda t: t if isinstance(t, tf.TensorSpec) else tf.TensorSpec([None, *t.shape[1:]], tf.as_dtype(t.dtype)),
        inputs)
    result = {}

    def forward(x):
        trace = _Trace(plan, None)
        with _Patches(trace):
            model(x, training=False)
        result["owners"] = trace.decide()[0]
        return tf.constant(0)

    compat.function(forward).get_concrete_function(spec)
    return [None if o is None else f"{o[1].name}.{o[2]}" for o in result["owners"]]


def make_checked_gradient_fn(model, forward, variables, loss_fn, check_groups=4, rtol=1e-3):
    """:func:`make_rule_gradient_fn`, checked once against a plain per-group gradient before it is trusted.

    The rules assume that, in inference mode, samples do not interact; a custom layer that mixes the
    samples of a batch would break that silently. So on its first call the returned function also computes
    the first ``check_groups`` groups one by one, each with a plain ``GradientTape`` gradient of the group's
    mean loss (the same per-group reference as the vectorised path, without vectorisation): run eagerly when
    those groups' share of the rules' first call took under ``_EAGER_CHECK_SECONDS`` (a small model: no second
    function to trace), else compiled. Then it compares: if any variable's rows differ by more than ``rtol`` of
    their norm, it warns (naming the variable) and uses the vectorised path
    (:func:`tf_woodfisher.fisher.gradients.make_gradient_fn`, only built then) from then on.

    Args:
        model: the Keras model (tf_keras or Keras 3), called as ``model(x, training=False)`` by the rules.
        forward: inputs → outputs in inference mode, for the reference and the vectorised path.
        variables: the weights to differentiate.
        loss_fn: (y_true, y_pred) → per-sample losses (n,).
        check_groups: groups compared on the first call; 0 for none, where the model and the loss are known to keep
            the samples apart (:func:`keeps_samples_apart`, Keras' own losses): tracing and running the reference took
            2.3–2.6 s of ResNet-50's one-shot event.
        rtol: largest accepted ‖rules − reference‖ / ‖reference‖ per variable.

    Returns:
        A function (x, y) shaped (g, b, ...) → tuple of (g, size) float32 rows, as ``make_gradient_fn``.
    """
    import warnings

    from tf_woodfisher.fisher.gradients import make_gradient_fn  # lazy: gradients.py may import this module

    variables = list(variables)
    forward, loss_fn = compat.user_code(forward), compat.user_code(loss_fn)
    fast = make_rule_gradient_fn(model, variables, loss_fn)
    chosen = []

    def one_group(x, y):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            loss = tf.reduce_mean(loss_fn(y, forward(x)))
        grads = tape.gradient(loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tuple(tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float32), [-1]) for g in grads)

    def gradients(x, y):
        if chosen:
            return chosen[0](x, y)
        started = time.perf_counter()
        rows = fast(x, y)
        groups = int(tf.nest.flatten(x)[0].shape[0])
        count = min(check_groups, groups)
        if count == 0:
            chosen.append(fast)
            return rows
        eager = (time.perf_counter() - started) * count / groups < _EAGER_CHECK_SECONDS
        reference = one_group if eager else compat.function(one_group)
        expected = [reference(*tf.nest.map_structure(lambda t, i=i: t[i], (x, y))) for i in range(count)]
        for k, (variable, got) in enumerate(zip(variables, rows)):
            want = tf.stack([group[k] for group in expected])
            error = float(tf.norm(got[:count] - want)) / max(float(tf.norm(want)), 1e-30)
            if error > rtol:
                warnings.warn(f"per-sample gradient rules disagree with the plain per-group gradient on "
                              f"{variable.name} (relative error {error:.2g}): the model seems to couple the "
                              "samples of a batch; using the vectorised path", RuntimeWarning, stacklevel=2)
                chosen.append(make_gradient_fn(forward, variables, loss_fn))
                return chosen[0](x, y)
        chosen.append(fast)
        return rows

    gradients.rules = fast
    gradients.transient_bytes = lambda x, y: (chosen[0] if chosen else fast).transient_bytes(x, y)
    return gradients
