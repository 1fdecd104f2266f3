"""Per-sample (or per mini-batch) gradients of a model's loss: the rows of the empirical Fisher.

One gradient is the gradient of the mean loss over ``fisher_batch_size`` samples (1 = one sample's
gradient, the paper's "fisher-mini-bsz"). Gradients are taken in inference mode by the caller's
``forward`` callable, vectorised over the groups of a chunk with ``tf.vectorized_map``, and
multiplied by the current mask so that pruned entries are zero.

This module knows no Keras: ``forward`` is any callable ``inputs → outputs`` (a Keras model called
with ``training=False``, say) and ``loss_fn`` any callable ``(y_true, y_pred) → per-sample losses (n,)``.
"""
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_woodfisher import compat
from tf_woodfisher.config import DEFAULT_SHUFFLE_BUFFER
from tf_woodfisher.fisher.distributed import executor_for
from tf_woodfisher.fisher.grams import BlockGrams, partial_sums
from tf_woodfisher.fisher.memory import default_chunk


def looks_batched(dataset: tf.data.Dataset, input_rank: Optional[int] = None) -> bool:
    """Whether ``dataset`` yields batches rather than single samples.

    Args:
        dataset: yields (x, y) or (x, y, sample_weight); x may be a nest (its first tensor decides).
        input_rank: rank of one model input including the batch axis (e.g. 4 for images), when known:
            then the dataset is batched iff its first tensor has that rank. None: batched iff the
            leading dimension is unknown (``Dataset.batch`` without ``drop_remainder``).
    """
    _require_dataset(dataset)
    first = tf.nest.flatten(dataset.element_spec)[0]
    if input_rank is not None:
        return first.shape.rank == input_rank
    return first.shape.rank is not None and first.shape.rank > 0 and first.shape[0] is None


def _require_dataset(dataset):
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"the Fisher data must be a plain tf.data.Dataset of (x, y) pairs (not a distributed dataset: "
                        f"tf_woodfisher splits the samples across replicas itself), got {type(dataset).__name__}")


def fisher_batches(dataset: tf.data.Dataset, batched: bool, num_gradients: int, fisher_batch_size: int,
                   chunk_gradients: int, seed: int, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> tf.data.Dataset:
    """A dataset of chunks (x, y) with x shaped (chunk_gradients, fisher_batch_size, ...).

    ``dataset`` yields (x, y) or (x, y, sample_weight), batched (``batched=True``) or not; samples
    are shuffled with ``seed`` in a buffer of ``shuffle_buffer`` (0: no shuffling) and
    num_gradients × fisher_batch_size of them are used.
    """
    _require_dataset(dataset)
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise ValueError(f"the Fisher dataset must yield (x, y) or (x, y, sample_weight) tuples, got {spec}")
    if batched:
        dataset = dataset.unbatch()
    dataset = dataset.map(lambda x, y, *_: (x, y))
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    return (
        dataset.take(num_gradients * fisher_batch_size)
        .batch(fisher_batch_size, drop_remainder=True)
        .batch(chunk_gradients)
    )


def _same_padding(size, out, kernel, stride, dilation):
    """(before, after) padding of one spatial axis for 'SAME' (as TensorFlow's convolutions pad)."""
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _patches(x, kernel, strides, dilations, out, padding):
    """Image patches of x (N, H, W, C) → (N, out_h, out_w, kh·kw·C), depth ordered (kh, kw, C) like a kernel."""
    (kh, kw), (sh, sw), (dh, dw), (out_h, out_w) = kernel, strides, dilations, out
    if padding == b"SAME":
        x = tf.pad(x, [[0, 0], _same_padding(x.shape[1], out_h, kh, sh, dh),
                       _same_padding(x.shape[2], out_w, kw, sw, dw), [0, 0]])
    if kh == kw == sh == sw == 1:
        return x
    return tf.concat([x[:, i * dh:i * dh + (out_h - 1) * sh + 1:sh, j * dw:j * dw + (out_w - 1) * sw + 1:sw]
                      for i in range(kh) for j in range(kw)], axis=-1)


def _conv2d_filter_gradient(pfor_input, fallback):
    """pfor converter of Conv2DBackpropFilter for per-sample inputs: one batched matmul of the samples'
    patches with their output gradients, (n, kh·kw·C, P) × (n, P, O), instead of TensorFlow's while_loop
    over the samples. Other cases (NCHW, explicit padding, unknown shapes) go to ``fallback``."""
    inputs, inputs_stacked, _ = pfor_input.input(0)
    sizes = tf.get_static_value(pfor_input.unstacked_input(1))
    padding = pfor_input.get_attr("padding")
    pfor_input.stack_inputs(stack_indices=[2])
    grads = pfor_input.stacked_input(2)
    if not inputs_stacked or sizes is None or pfor_input.get_attr("data_format") != b"NHWC" \
            or padding not in (b"SAME", b"VALID") or not inputs.shape[2:].is_fully_defined() \
            or not grads.shape[2:].is_fully_defined():
        return fallback(pfor_input)
    kh, kw, channels, filters = (int(s) for s in sizes)
    n = pfor_input.pfor.loop_len_vector[0]
    patches = _patches(tf.reshape(inputs, [-1] + inputs.shape[2:].as_list()), (kh, kw),
                       pfor_input.get_attr("strides")[1:3], pfor_input.get_attr("dilations")[1:3],
                       grads.shape[2:4].as_list(), padding)
    kernels = tf.matmul(tf.reshape(patches, [n, -1, kh * kw * channels]), tf.reshape(grads, [n, -1, filters]),
                        transpose_a=True)
    return compat.pfor_wrap(tf.reshape(kernels, [n, kh, kw, channels, filters]), True)


GradientFn = Callable[[object, object], tuple]


def make_gradient_fn(forward: Callable, variables: Sequence[tf.Variable], loss_fn: Callable) -> GradientFn:
    """A compiled function (x, y) of shape (g, b, ...) → a tuple, per variable, of its (g, size) flat
    float32 gradients of each group's mean loss.

    Args:
        forward: inputs → outputs in inference mode (e.g. ``lambda x: model(x, training=False)``).
        variables: the weights to differentiate.
        loss_fn: (y_true, y_pred) → per-sample losses of shape (n,).
    """

    def one_group(group):
        x, y = group
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            group_loss = tf.reduce_mean(loss_fn(y, forward(x)))
        grads = tape.gradient(group_loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tuple(tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float32), [-1]) for g in grads)

    compiled = tf.function(lambda x, y: tf.vectorized_map(one_group, (x, y)))

    def gradients(x, y):
        any_chunk = tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), (x, y))
        # The batched Conv2D converter takes effect when ``compiled`` traces: once, for any chunk size.
        with compat.pfor_converter("Conv2DBackpropFilter",
                                   lambda original: lambda pfor_input: _conv2d_filter_gradient(pfor_input, original)):
            return compiled.get_concrete_function(*any_chunk)(x, y)

    return gradients


def check_loss(forward: Callable, loss_fn: Callable, x, y) -> None:
    """Raise ValueError unless ``loss_fn(y, forward(x))`` gives one finite loss per sample of the batch x."""
    try:
        value = loss_fn(y, forward(x))
    except Exception as error:  # Keras raises ValueError, TF InvalidArgumentError, user code anything
        raise ValueError(f"the loss does not match the model's outputs or the dataset's labels: {error}") from error
    count = int(tf.nest.flatten(x)[0].shape[0])
    if value.shape.rank != 1 or int(value.shape[0]) != count:
        raise ValueError(f"the loss must give one value per sample, shape ({count},), got shape {value.shape.as_list()}"
                         ": a Keras loss object needs reduction='none' (tf_woodfisher's adapters do this for you)")
    if not bool(tf.reduce_all(tf.math.is_finite(tf.cast(value, tf.float32)))):
        raise ValueError("the loss is NaN or infinite on the Fisher data: check the inputs, labels and loss")


def first_sample(dataset: tf.data.Dataset, batched: bool):
    """The first (x, y) of ``dataset`` as a batch of one; ValueError if the dataset yields nothing."""
    first = next(iter(fisher_batches(dataset, batched, 1, 1, 1, seed=0, shuffle_buffer=0)), None)
    if first is None:
        raise ValueError("the Fisher dataset is empty: it yields no (x, y) samples")
    return tf.nest.map_structure(lambda t: t[0], first)


def collect_gradients(*args, **kwargs) -> tf.Tensor:
    """The (num_gradients, d) matrix of masked gradients, d = total size of ``variables``: the columns
    of :func:`collect_gradient_columns` (same arguments) side by side."""
    return tf.concat(collect_gradient_columns(*args, **kwargs), axis=1)


def collect_gradient_columns(forward, variables, dataset, loss_fn, num_gradients, fisher_batch_size=1, mask=None,
                             seed=0, shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, chunk_gradients=None, on_chunk=None,
                             executor=None, dtype=tf.float32, reduce_blocks=None, batched=None, gradient_fn=None):
    """Masked gradients as one (num_gradients, size) matrix per variable, assembled one variable at a
    time (never two copies of all of them).

    Args:
        forward: inputs → outputs in inference mode. variables: the weights to differentiate.
        dataset: a ``tf.data.Dataset`` of (x, y) or (x, y, sample_weight).
        loss_fn: (y_true, y_pred) → per-sample losses (n,).
        num_gradients: m rows; fisher_batch_size: samples averaged into each row.
        mask: optional flat (d,) 0/1 tensor multiplied into every row.
        on_chunk: progress hook, called with the rows done so far.
        executor: a :mod:`distributed` executor (default: that of the current ``tf.distribute`` strategy);
            with R replicas each chunk's samples are split across them and the rows all-gathered, so
            every worker gets the whole matrix.
        dtype: of the returned matrix (float32, or float16/bfloat16 to store it in half the memory;
            float16 overflows above 65504, bfloat16 keeps float32's range with 8 bits of mantissa).
        reduce_blocks: optional list, per variable, of None (collect its rows) or a block size c: then each
            replica sums its gradients' c × c block Gram matrices over all its chunks, the sums are
            all-reduced once at the end, and that variable's entry is a :class:`BlockGrams`.
        batched: whether ``dataset`` yields batches (None: :func:`looks_batched` without a model rank).
        gradient_fn: the compiled :func:`make_gradient_fn` of (forward, variables, loss_fn), to reuse
            one across events (None: compiled here).

    Returns:
        A list, per variable, of a (num_gradients, size) tensor of ``dtype`` or a :class:`BlockGrams`.

    Raises:
        ValueError: the dataset is too small, the loss does not fit, or a gradient is not finite.
    """
    if num_gradients < 1 or fisher_batch_size < 1:
        raise ValueError(f"num_gradients and fisher_batch_size must be ≥ 1, got {num_gradients}, {fisher_batch_size}")
    executor = executor or executor_for(None)
    executor.require_divisible(num_gradients, "num_gradients")
    replicas = executor.num_replicas
    sizes = [int(v.shape.num_elements()) for v in variables]
    dim = sum(sizes)
    chunk_gradients = chunk_gradients or default_chunk(dim, num_gradients)
    chunk_gradients = max(replicas, chunk_gradients // replicas * replicas)
    batched = looks_batched(dataset) if batched is None else batched
    batches = fisher_batches(dataset, batched, num_gradients, fisher_batch_size, chunk_gradients, seed, shuffle_buffer)
    gradient_fn = gradient_fn or make_gradient_fn(forward, variables, loss_fn)
    masks = [None] * len(sizes) if mask is None else tf.split(mask, sizes)
    dtype = tf.as_dtype(dtype)
    reduce_blocks = list(reduce_blocks or [None] * len(sizes))
    gathered = [i for i, block in enumerate(reduce_blocks) if block is None]
    reduced = [i for i, block in enumerate(reduce_blocks) if block is not None]
    # Rows go into one NumPy buffer per variable, which becomes a tensor without a copy: the largest
    # buffers of an event stay out of TensorFlow's caching allocator and are returned when freed.
    buffers = {i: _aligned_empty((num_gradients, sizes[i]), dtype) for i in gathered}
    sums, done, non_finite = None, 0, np.zeros(len(sizes), np.int64)
    for x, y in batches:
        if done == 0:
            check_loss(forward, loss_fn, *tf.nest.map_structure(lambda t: t[0], (x, y)))
            executor.check_consistent([t.numpy() for t in tf.nest.flatten((x, y))], "the Fisher samples")
        count = int(tf.nest.flatten(y)[0].shape[0])
        rows = executor.run(gradient_fn, *executor.shard((x, y)))
        if gathered:
            chunk = executor.gather(tuple(rows[i] for i in gathered), count)
            stored, bad = _masked_rows(chunk, [masks[i] for i in gathered], dtype)
            non_finite[gathered] += bad.numpy()
            for i, piece in zip(gathered, stored):
                buffers[i][done:done + count] = piece.numpy()
        if reduced:
            sums = executor.run(_accumulate_sums, sums, tuple(rows[i] for i in reduced),
                                tuple(masks[i] for i in reduced), tuple(reduce_blocks[i] for i in reduced))
        done += count
        if on_chunk is not None:
            on_chunk(done)
    needed = num_gradients * fisher_batch_size
    if done < num_gradients:
        have = done * fisher_batch_size
        raise ValueError(
            f"the Fisher dataset is {'empty' if have == 0 else 'too small'}: it gave {have} usable samples, "
            f"but num_gradients × fisher_batch_size = {num_gradients} × {fisher_batch_size} = {needed} are needed"
        )
    columns = {i: _shared_tensor(buffer, dtype) for i, buffer in buffers.items()}
    if reduced:
        totals = executor.reduce_sum(sums)
        for i, (full, rest, gradient_sum) in zip(reduced, totals):
            columns[i] = BlockGrams(num_gradients, reduce_blocks[i], full, rest, gradient_sum)
            non_finite[i] = int(tf.math.count_nonzero(~tf.math.is_finite(columns[i].mean_square())))
    _check_finite(non_finite, variables)
    return [columns[i] for i in range(len(sizes))]


@tf.function(reduce_retracing=True)
def _accumulate_sums(previous, pieces, masks, block_sizes):
    """``previous`` (None on the first chunk) plus the :func:`partial_sums` of each variable's masked rows."""
    sums = tuple(partial_sums(rows if mask is None else rows * mask[None, :], block)
                 for rows, mask, block in zip(pieces, masks, block_sizes))
    return sums if previous is None else tf.nest.map_structure(tf.add, previous, sums)


@tf.function(reduce_retracing=True)
def _masked_rows(pieces, masks, dtype):
    """Per variable, rows (g, size) × its mask (size,) (None: no mask) in ``dtype``; and the number of
    non-finite entries of each variable's rows (a (variables,) int64 vector)."""
    stored = [tf.cast(rows if mask is None else rows * mask[None, :], dtype) for rows, mask in zip(pieces, masks)]
    bad = tf.stack([tf.math.count_nonzero(~tf.math.is_finite(rows)) for rows in stored])
    return stored, bad


def _aligned_empty(shape, dtype):
    """An uninitialised NumPy array for ``dtype`` whose data is 64-byte aligned, as tensor buffers must be."""
    itemsize, count = dtype.size, int(np.prod(shape))
    raw = np.empty(count * itemsize + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset:offset + count * itemsize].view(dtype.as_numpy_dtype).reshape(shape)


def _shared_tensor(array, dtype):
    """A tensor of ``dtype`` over ``array``'s memory (DLPack, no copy); bfloat16 travels as uint16 bits."""
    storage = array.view(np.uint16) if dtype == tf.bfloat16 else array
    tensor = tf.experimental.dlpack.from_dlpack(storage.__dlpack__())
    return tf.bitcast(tensor, dtype) if dtype == tf.bfloat16 else tensor


def _check_finite(non_finite, variables):
    """Raise ValueError naming the first weight with a non-finite gradient; non_finite: count per variable."""
    if not non_finite.any():
        return
    owner = int(np.flatnonzero(non_finite)[0])
    raise ValueError(
        f"NaN or infinite gradients in {non_finite.sum()} entries, first in {variables[owner].name}: "
        "check the inputs, the labels and the loss (a log of zero, an overflow)"
    )
