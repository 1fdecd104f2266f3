"""Per-sample (or per mini-batch) gradients of a model's loss: the rows of the empirical Fisher.

One gradient is the gradient of the mean loss over ``fisher_batch_size`` samples (1 = one sample's
gradient, the paper's "fisher-mini-bsz"). Gradients are taken in inference mode by the caller's
``forward`` callable, vectorised over the groups of a chunk with ``tf.vectorized_map``, and
multiplied by the current mask so that pruned entries are zero.

This module knows no Keras: ``forward`` is any callable ``inputs → outputs`` (a Keras model called
with ``training=False``, say) and ``loss_fn`` any callable ``(y_true, y_pred) → per-sample losses (n,)``.
"""
import math
import weakref
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_woodfisher import compat
from tf_woodfisher.config import DEFAULT_SHUFFLE_BUFFER
from tf_woodfisher.fisher.distributed import executor_for
from tf_woodfisher.fisher.grams import BlockGrams, partial_sums
from tf_woodfisher.fisher.graph_memory import any_chunk, chunk_estimator
from tf_woodfisher.fisher.host import RowFaulter, aligned_empty, on_host, shared_tensor
from tf_woodfisher.fisher.memory import default_chunk
from tf_woodfisher.fisher.samples import cached_chunks


def _input_ranks(dataset) -> list:
    """Ranks of the input tensors x of one element of ``dataset`` (None where unknown)."""
    spec = dataset.element_spec
    inputs = spec[0] if isinstance(spec, tuple) else spec
    return [s.shape.rank for s in tf.nest.flatten(inputs)]


def looks_batched(dataset: tf.data.Dataset, input_rank=None) -> bool:
    """Whether ``dataset`` yields batches rather than single samples, told from the model's input ranks.

    Args:
        dataset: yields (x, y) or (x, y, sample_weight); x may be a nest of tensors.
        input_rank: rank (batch axis included, e.g. 4 for images) of the model's input, or a sequence with
            the rank of each of its inputs. The dataset is batched iff the ranks of x's tensors are these
            ranks, unbatched iff they are one less. ``Dataset.batch(..., drop_remainder=True)`` and
            subclassed models are told apart like any other.

    Returns:
        True when the dataset's elements are batches.

    Raises:
        TypeError: ``dataset`` is not a plain ``tf.data.Dataset`` (a distributed dataset, an array, ...).
        ValueError: it cannot be told: the model's input ranks or the dataset's are unknown, or they fit
            neither case (the message says which, and to pass ``batched=True`` or ``False``).
    """
    _require_dataset(dataset)
    ranks = _input_ranks(dataset)
    expected = None if input_rank is None else sorted([input_rank] if isinstance(input_rank, int) else input_rank)
    if expected is None or None in expected:
        raise ValueError("cannot tell whether the Fisher dataset yields batches or single samples: the model does "
                         "not say the rank of its inputs (build it by calling it on data, or give it an Input); "
                         "pass batched=True or batched=False")
    if None in ranks:
        raise ValueError(f"cannot tell whether the Fisher dataset yields batches or single samples: the rank of its "
                         f"inputs is unknown ({dataset.element_spec}); pass batched=True or batched=False")
    if len(ranks) == len(expected):
        if sorted(ranks) == expected:
            return True
        if sorted(r + 1 for r in ranks) == expected:
            return False
    raise ValueError(f"the Fisher dataset's inputs have ranks {ranks}, but the model's inputs have ranks {expected} "
                     "with the batch axis (one less for single samples): the dataset does not fit the model; if it "
                     "does, pass batched=True or batched=False")


def resolve_batched(dataset: tf.data.Dataset, batched: Optional[bool], input_rank=None) -> bool:
    """``batched`` as the user gave it, else :func:`looks_batched`.

    Args:
        dataset: the Fisher ``tf.data.Dataset``.
        batched: True, False, or None (tell it from ``input_rank``).
        input_rank: as in :func:`looks_batched`.

    Returns:
        Whether ``dataset`` yields batches.

    Raises:
        TypeError: ``batched`` is not a bool or None, or ``dataset`` is not a ``tf.data.Dataset``.
        ValueError: ``batched`` is None and it cannot be told, or ``batched`` contradicts the ranks.
    """
    if batched is None:
        return looks_batched(dataset, input_rank)
    if not isinstance(batched, bool):
        raise TypeError(f"batched must be True, False or None, got {batched!r}")
    _require_dataset(dataset)
    try:
        told = looks_batched(dataset, input_rank)
    except ValueError:
        return batched
    if told != batched:
        raise ValueError(f"batched={batched}, but the Fisher dataset's input ranks {_input_ranks(dataset)} say it "
                         f"yields {'batches' if told else 'single samples'} for this model")
    return batched


def has_sample_weights(dataset: tf.data.Dataset) -> bool:
    """Whether ``dataset`` yields (x, y, sample_weight) triples.

    Args:
        dataset: a ``tf.data.Dataset``.

    Returns:
        True when its elements are 3-tuples.
    """
    spec = dataset.element_spec
    return isinstance(spec, tuple) and len(spec) == 3


def sample_weighted(loss_fn: Callable) -> Callable:
    """The loss of labels ``(y_true, sample_weight)``: each sample's loss times its weight.

    A group's gradient is then that of its weighted mean loss, (1/b)·Σᵢ wᵢ·lossᵢ, Keras' convention
    (divided by the number of samples, not by the sum of the weights): a zero weight removes a sample's
    contribution, and all-zero weights give a zero gradient. If ``loss_fn`` has a method
    ``with_sample_weight(y_true, y_pred, sample_weight) → (n,)`` (the Keras adapters' losses do, applying
    per-timestep and per-output weights as Keras does), it is used; otherwise the per-sample losses are
    multiplied by the weights, which must then be one per sample, shape (n,) or (n, 1).

    Args:
        loss_fn: (y_true, y_pred) → per-sample losses (n,).

    Returns:
        ``weighted((y_true, sample_weight), y_pred) → (n,)``; without ``with_sample_weight`` it raises
        ValueError for weights that are not one per sample.
    """
    apply = getattr(loss_fn, "with_sample_weight", None)

    def weighted(labels, y_pred):
        y_true, weights = labels
        if apply is not None:
            return apply(y_true, y_pred, weights)
        losses = loss_fn(y_true, y_pred)
        weights = tf.cast(weights, losses.dtype)
        if weights.shape.rank == 2 and weights.shape[1] == 1:
            weights = weights[:, 0]
        if weights.shape.rank != 1:
            raise ValueError(f"sample weights of shape {weights.shape.as_list()}: with a loss that gives one value per "
                             "sample, give one weight per sample, shape (n,) or (n, 1)")
        return losses * weights

    weighted.weighted_loss_of = loss_fn
    return weighted


def fisher_loss(loss_fn: Callable, dataset: Optional[tf.data.Dataset]) -> Callable:
    """The loss the gradients of ``dataset`` are taken of.

    :func:`sample_weighted` ``loss_fn`` when the dataset yields sample weights (then :func:`fisher_batches`
    gives labels ``(y, sample_weight)``), else ``loss_fn`` itself. Compile gradient functions for such a
    dataset with this loss.

    Args:
        loss_fn: (y_true, y_pred) → per-sample losses (n,), or None (magnitude pruning).
        dataset: the Fisher ``tf.data.Dataset``, or None.

    Returns:
        The loss to differentiate (``loss_fn`` itself when there are no sample weights or it is None).
    """
    if dataset is not None and has_sample_weights(dataset) and loss_fn is not None:
        return sample_weighted(loss_fn)
    return loss_fn


def _require_dataset(dataset):
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"the Fisher data must be a plain tf.data.Dataset of (x, y) pairs (not a distributed dataset: "
                        f"tf_woodfisher splits the samples across replicas itself), got {type(dataset).__name__}")


def fisher_batches(dataset: tf.data.Dataset, batched: bool, num_gradients: int, fisher_batch_size: int,
                   chunk_gradients: int, seed: int, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER) -> "FisherChunks":
    """The chunks (x, y) of an event's samples, x shaped (chunk_gradients, fisher_batch_size, ...).

    Samples are shuffled with ``seed`` in a buffer of ``shuffle_buffer`` (0: no shuffling) and
    num_gradients × fisher_batch_size of them are used. Sample weights are kept with the labels: a
    dataset of (x, y, sample_weight) gives chunks (x, (y, sample_weight)), whose gradients are those of
    the :func:`fisher_loss` of the loss. A small dataset that the shuffle buffer holds whole, and that
    reads the same samples every time, is read once and kept in memory for later calls
    (:func:`~tf_woodfisher.fisher.samples.cached_chunks`): the same samples in the same order.

    Args:
        dataset: a ``tf.data.Dataset`` yielding (x, y) or (x, y, sample_weight), batched or not.
        batched: whether ``dataset`` yields batches (they are unbatched first).
        num_gradients: m, the number of gradients (groups of samples) to read.
        fisher_batch_size: samples per group (averaged into one gradient).
        chunk_gradients: groups per chunk (the last chunk may hold fewer).
        seed: the shuffle seed.
        shuffle_buffer: samples in the shuffle buffer; 0 reads in order.

    Returns:
        A :class:`FisherChunks`: iterating it gives eager (x, y) chunks, x of shape
        (≤ chunk_gradients, fisher_batch_size, ...) and y (or (y, sample_weight)) likewise; incomplete groups
        are dropped.

    Raises:
        TypeError: ``dataset`` is not a plain ``tf.data.Dataset``.
        ValueError: its elements are not (x, y) or (x, y, sample_weight) tuples.
    """
    _require_dataset(dataset)
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise ValueError(f"the Fisher dataset must yield (x, y) or (x, y, sample_weight) tuples, got {spec}")
    count, chunk = num_gradients * fisher_batch_size, chunk_gradients * fisher_batch_size
    chunks = cached_chunks(dataset, batched, count, chunk, seed, shuffle_buffer) if shuffle_buffer else None
    if chunks is None:
        if batched:
            dataset = dataset.unbatch()
        if shuffle_buffer:
            dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
        # One batching stage of chunk_gradients × fisher_batch_size samples; each chunk is cut into its groups
        # eagerly (FisherChunks): the same chunks as .batch(fisher_batch_size, drop_remainder=True)
        # .batch(chunk_gradients) at a fraction of the per-sample cost, and no function for tf.data to trace at
        # every event (a map and a filter cost more than the gradients of a small model).
        chunks = dataset.take(count).batch(chunk)
    return FisherChunks(chunks, fisher_batch_size, weighted=len(spec) == 3)


class FisherChunks:
    """The chunks of :func:`fisher_batches`: an iterable (each pass reads the same samples) of eager (x, y).

    Args:
        chunks: an iterable (a ``tf.data.Dataset``, a :class:`~tf_woodfisher.fisher.samples.GatheredChunks`) of
            (x, y[, sample_weight]) batches of chunk × ``group`` samples (the last may hold fewer).
        group: samples per group (``fisher_batch_size``).
        weighted: whether elements carry sample weights (they are then nested with the labels).
    """

    def __init__(self, chunks: tf.data.Dataset, group: int, weighted: bool):
        self.chunks, self.group, self.weighted = chunks, group, weighted

    def __iter__(self):
        group = self.group
        for chunk in self.chunks:
            if self.weighted:  # labels with weights: see sample_weighted
                chunk = (chunk[0], (chunk[1], chunk[2]))
            rows = int(tf.nest.flatten(chunk)[0].shape[0])
            whole = rows // group * group  # only the stream's last group can be incomplete: it is dropped
            if whole == 0:
                continue
            yield tf.nest.map_structure(
                lambda t: tf.reshape(t if whole == rows else t[:whole], [whole // group, group, *t.shape[1:]]),
                chunk)


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

    The gradients are vectorised over the groups (``tf.vectorized_map``). TensorFlow's vectorisation
    cannot convert while loops reliably (the loops of LSTM, GRU, SimpleRNN and ``RNN`` layers that are
    not unrolled, a custom ``tf.while_loop``): their gradients fail to convert and their forward passes can
    fail at run time; nor the gradient of a ``tf.cond`` or ``tf.switch_case`` (a user layer's Python ``if`` on
    a tensor, which AutoGraph turns into one), whose intermediates it cannot stack. When the traced forward
    graph of one group holds such control flow (looking into the functions it calls), the gradients are
    instead computed group by group with ``tf.map_fn`` (up to :data:`LOOPED_PARALLEL_ITERATIONS` groups at
    once), in the same compiled call; the vectorised conversion is then never attempted. Models without
    them trace exactly as before.

    Args:
        forward: inputs → outputs in inference mode (e.g. ``lambda x: model(x, training=False)``).
        variables: the weights to differentiate.
        loss_fn: (y_true, y_pred) → per-sample losses of shape (n,).

    Returns:
        ``fn(x, y)``: x, y of shape (g, b, ...) (g groups of b samples) → a tuple with, per variable, a
        (g, size) float32 tensor, row i the flat gradient of the mean loss of group i. Traced once for
        any g (Conv2D filter gradients as one batched matmul). Its attribute ``looped`` (set when it
        traces) is True when the forward holds such control flow and the rows come from ``tf.map_fn``; its
        method ``transient_bytes(x, y)`` estimates, for a chunk's static shapes, the bytes one call allocates
        besides its rows (:func:`tf_woodfisher.fisher.graph_memory.transient_bytes`).
    """
    variables = list(variables)
    forward, loss_fn = compat.user_code(forward), compat.user_code(loss_fn)

    def group_gradients(group, found_loops=None):
        x, y = group
        graph = tf.compat.v1.get_default_graph()
        start = len(graph.get_operations())
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            group_loss = tf.reduce_mean(loss_fn(y, forward(x)))
        if found_loops is not None and has_control_flow(graph, graph.get_operations()[start:]):
            found_loops.append(True)
            return (tf.zeros([], tf.float32),)  # depends on nothing: vectorized_map converts none of the loop
        grads = tape.gradient(group_loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tuple(tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float32), [-1]) for g in grads)

    def rows(x, y):
        found_loops = []
        vectorised = tf.vectorized_map(lambda group: group_gradients(group, found_loops), (x, y))
        gradients.looped = bool(found_loops)
        if not found_loops:
            return vectorised
        signature = tuple(tf.TensorSpec([int(v.shape.num_elements())], tf.float32) for v in variables)
        return tf.map_fn(group_gradients, (x, y), fn_output_signature=signature,
                         parallel_iterations=LOOPED_PARALLEL_ITERATIONS)

    compiled = compat.function(rows)

    def concrete(x, y):
        # The batched Conv2D converter takes effect when ``compiled`` traces: once, for any chunk size.
        with compat.pfor_converter("Conv2DBackpropFilter",
                                   lambda original: lambda pfor_input: _conv2d_filter_gradient(pfor_input, original)):
            return compiled.get_concrete_function(*any_chunk(x, y))

    def gradients(x, y):
        return concrete(x, y)(x, y)

    gradients.transient_bytes = chunk_estimator(concrete)
    gradients.looped = None
    return gradients


LOOPED_PARALLEL_ITERATIONS = 16  # groups of a tf.map_fn (looped variables) computed concurrently
_CONTROL_FLOW_OPS = frozenset({"While", "StatelessWhile", "If", "StatelessIf", "Case", "StatelessCase"})
_CALL_OPS = frozenset({"PartitionedCall", "StatefulPartitionedCall"})


def _function_names(node_attrs):
    """Names of the functions referenced by a node's attributes (call targets, loop bodies, branches)."""
    for value in node_attrs.values():
        if value.func.name:
            yield value.func.name
        yield from (f.name for f in value.list.func)


def _has_control_flow(graph, op_type, node_attrs, seen):
    """Whether a node of ``op_type`` (an op, or a call of a library function) holds a while_loop or a cond,
    looking into the functions it calls (once each: ``seen`` caches their answers); ``node_attrs()``
    gives its attributes (read only for call and branch ops)."""
    if op_type in _CONTROL_FLOW_OPS:
        return True
    names = list(_function_names(node_attrs())) if op_type in _CALL_OPS else []
    if compat.function_definition(graph, op_type) is not None:
        names.append(op_type)  # a FunctionDef node may call a library function by name
    for name in names:
        if name not in seen:
            seen[name] = False  # recursion guard
            definition = compat.function_definition(graph, name)
            seen[name] = definition is None or any(
                _has_control_flow(graph, node.op, lambda node=node: node.attr, seen) for node in definition.node_def)
        if seen[name]:
            return True
    return False


@tf.autograph.experimental.do_not_convert  # plain Python over the graph: called while tracing, never converted
def has_control_flow(graph, ops) -> bool:
    """Whether any of ``ops`` (of ``graph``) is a while_loop, a cond or a switch_case, or calls a function that
    holds one (what ``tf.vectorized_map`` cannot differentiate: see :func:`make_gradient_fn`).

    Args:
        graph: the graph the ops are in (its function library is searched).
        ops: ``tf.Operation`` objects, e.g. those one group's forward pass created.

    Returns:
        True when a ``While``, ``If`` or ``Case`` op (or its stateless form) is found, directly or inside a
        called function (a function whose definition cannot be found counts as holding one).
    """
    seen = {}
    return any(_has_control_flow(graph, op.type, lambda op=op: op.node_def.attr, seen) for op in ops)


def check_loss(forward: Callable, loss_fn: Callable, x, y) -> None:
    """Raise ValueError unless ``loss_fn(y, forward(x))`` gives one finite loss per sample of the batch x.

    Args:
        forward: inputs → outputs in inference mode.
        loss_fn: (y_true, y_pred) → per-sample losses of shape (n,).
        x: a batch of n model inputs (a tensor or nest; its first tensor gives n).
        y: the n labels.

    Raises:
        ValueError: the loss raises, does not have shape (n,) (a Keras loss object needs ``reduction='none'``),
            or is NaN or infinite.
    """
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
    """The first (x, y) of ``dataset`` as a batch of one; ValueError if the dataset yields nothing.

    Args:
        dataset: a ``tf.data.Dataset`` of (x, y) or (x, y, sample_weight), batched or not.
        batched: whether ``dataset`` yields batches.

    Returns:
        ``(x, y)`` with a leading batch axis of 1, read in order (no shuffling); y is
        ``(y, sample_weight)`` for a dataset with sample weights (check it with :func:`fisher_loss`).

    Raises:
        TypeError: ``dataset`` is not a plain ``tf.data.Dataset``.
        ValueError: the dataset is empty or its elements are not (x, y) tuples.
    """
    first = next(iter(fisher_batches(dataset, batched, 1, 1, 1, seed=0, shuffle_buffer=0)), None)
    if first is None:
        raise ValueError("the Fisher dataset is empty: it yields no (x, y) samples")
    return tf.nest.map_structure(lambda t: t[0], first)


def collect_gradients(*args, **kwargs) -> tf.Tensor:
    """The (num_gradients, d) matrix of masked gradients, d = total size of ``variables``.

    The columns of :func:`collect_gradient_columns` (same arguments) side by side.

    Args:
        *args: the positional arguments of :func:`collect_gradient_columns`.
        **kwargs: its keyword arguments (``reduce_blocks`` must leave every variable collected).

    Returns:
        The (num_gradients, d) tensor of the requested ``dtype`` (default float32).

    Raises:
        ValueError: as :func:`collect_gradient_columns`.
    """
    return tf.concat(collect_gradient_columns(*args, **kwargs), axis=1)


def collect_gradient_columns(forward, variables, dataset, loss_fn, num_gradients, fisher_batch_size=1, mask=None,
                             seed=0, shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, chunk_gradients=None, on_chunk=None,
                             executor=None, dtype=tf.float32, reduce_blocks=None, batched=None, gradient_fn=None,
                             buffers=None, on_first_chunk=None):
    """Masked gradients as one (num_gradients, size) matrix per variable.

    Assembled one variable at a time (never two copies of all of them).

    Args:
        forward: inputs → outputs in inference mode.
        variables: the weights to differentiate (d = their total size).
        dataset: a ``tf.data.Dataset`` of (x, y) or (x, y, sample_weight) (each row is then the gradient of
            its group's weighted mean loss, see :func:`sample_weighted`).
        loss_fn: (y_true, y_pred) → per-sample losses (n,).
        num_gradients: m rows (divisible by the executor's number of replicas).
        fisher_batch_size: samples averaged into each row.
        mask: optional flat (d,) 0/1 tensor multiplied into every row.
        seed: the shuffle seed of the Fisher samples.
        shuffle_buffer: samples in the shuffle buffer (0: read in order).
        chunk_gradients: rows computed per compiled call (rounded down to a multiple of the replicas, at
            least one per replica); None: :func:`~tf_woodfisher.fisher.memory.default_chunk`.
        on_chunk: progress hook, called with the rows done so far.
        executor: a :mod:`distributed` executor (default: that of the current ``tf.distribute`` strategy);
            with R replicas each chunk's samples are split across them and the rows all-gathered, so
            every worker gets the whole matrix.
        dtype: of the returned matrix (float32, or float16/bfloat16 to store it in half the memory;
            float16 overflows above 65504, bfloat16 keeps float32's range with 8 bits of mantissa).
        reduce_blocks: optional list, per variable, of None (collect its rows) or a block size c: then each
            replica sums its gradients' c × c block Gram matrices over all its chunks, the sums are
            all-reduced once at the end, and that variable's entry is a :class:`BlockGrams`.
        batched: whether ``dataset`` yields batches (required: this module knows no model; adapters tell it
            from the model's input ranks with :func:`resolve_batched`; None raises ValueError).
        gradient_fn: the compiled :func:`make_gradient_fn` of (forward, variables, fisher_loss(loss_fn,
            dataset)), to reuse one across events (None: compiled here). Rows it marks finite (the ``finite``
            flags of a :class:`~tf_woodfisher.fisher.rules.GradientRows`) are not counted for NaN and infinite
            entries.
        buffers: a :class:`~tf_woodfisher.fisher.host.HostBuffers` pool for the (num_gradients, size) row
            buffers, to reuse one across events (None: fresh buffers).
        on_first_chunk: optional hook, called as ``on_first_chunk(gradient_fn, x, y)`` with the first chunk
            (nested structures shaped (g, b, ...), all replicas' samples) before its gradients are computed
            (the memory planner's transient estimate).

    Returns:
        A list, per variable, of a (num_gradients, size) tensor of ``dtype`` or a :class:`BlockGrams`.

    Raises:
        ValueError: the dataset is too small, the loss does not fit, or a gradient is not finite;
            num_gradients or fisher_batch_size < 1, or num_gradients not divisible by the replicas.
    """
    if num_gradients < 1 or fisher_batch_size < 1:
        raise ValueError(f"num_gradients and fisher_batch_size must be ≥ 1, got {num_gradients}, {fisher_batch_size}")
    executor = executor or executor_for(None)
    executor.require_divisible(num_gradients, "num_gradients")
    replicas = executor.num_replicas
    sizes = [int(v.shape.num_elements()) for v in variables]
    dim = sum(sizes)
    dtype = tf.as_dtype(dtype)
    chunk_gradients = chunk_gradients or default_chunk(dim, num_gradients, fisher_batch_size, dtype.size)
    chunk_gradients = max(replicas, chunk_gradients // replicas * replicas)
    batched = resolve_batched(dataset, batched)
    loss_fn = fisher_loss(loss_fn, dataset)
    batches = fisher_batches(dataset, batched, num_gradients, fisher_batch_size, chunk_gradients, seed, shuffle_buffer)
    gradient_fn = gradient_fn or make_gradient_fn(forward, variables, loss_fn)
    masks = [None] * len(sizes) if mask is None else tf.split(mask, sizes)
    reduce_blocks = list(reduce_blocks or [None] * len(sizes))
    gathered = [i for i, block in enumerate(reduce_blocks) if block is None]
    reduced = [i for i, block in enumerate(reduce_blocks) if block is not None]
    # float32: when one chunk holds all the rows (memory.whole_chunk) and they are on this host, they are the
    # result as they are (times the mask by TensorFlow, where it is not all ones): nothing is copied. Else the rows
    # of each chunk are masked into one NumPy buffer per variable by NumPy (one pass, from a view of the tensor's
    # memory; a mask of ones is skipped), which becomes a tensor without a copy: the large m × d matrices of a
    # chunked event stay out of TensorFlow's caching allocator and are returned when freed (or pooled). Other
    # dtypes are cast (and counted) by TensorFlow first.
    host_masks = {i: _host_mask(masks[i]) for i in gathered} if dtype == tf.float32 else None
    whole = host_masks is not None and replicas == 1 and chunk_gradients >= num_gradients
    allocate = buffers.empty if buffers is not None else aligned_empty
    # the fresh row buffers are faulted in by a background thread, last rows first, while the chunks fill them
    faulter = RowFaulter(num_gradients)
    outputs = {} if whole else {i: allocate((num_gradients, sizes[i]), dtype, on_new=faulter.add) for i in gathered}
    sums, done, non_finite = None, 0, np.zeros(len(sizes), np.int64)
    faulter.start()
    try:
        for x, y in batches:
            if done == 0:
                first = tf.nest.map_structure(lambda t: t[0], (x, y))
                _check_loss_once(gradient_fn, dataset, forward, loss_fn, *first)
                if on_first_chunk is not None:
                    on_first_chunk(gradient_fn, x, y)
                if executor.num_replicas > 1:
                    executor.check_consistent([t.numpy() for t in tf.nest.flatten((x, y))], "the Fisher samples")
            count = int(tf.nest.flatten(y)[0].shape[0])
            rows = executor.run(gradient_fn, *executor.shard((x, y)))
            faulter.claim(done + count)  # the rows written below
            if gathered:
                chunk = executor.gather(tuple(rows[i] for i in gathered), count)
                if host_masks is not None:
                    finite = _known_finite(rows, replicas)
                    non_finite[gathered] += _count_non_finite(chunk, None if finite is None else finite[gathered])
                    if whole and count == num_gradients and all(on_host(piece) for piece in chunk):
                        kept = [None if host_masks[i] is None else masks[i] for i in gathered]
                        outputs.update(zip(gathered, chunk if all(m is None for m in kept) else _masked(chunk, kept)))
                    else:
                        for i, piece in zip(gathered, chunk):
                            if i not in outputs:  # a whole chunk not on this host (a GPU's), or too few rows
                                outputs[i] = allocate((num_gradients, sizes[i]), dtype)
                            _store_rows(outputs[i][done:done + count], piece, host_masks[i])
                else:
                    stored, bad = _masked_rows(chunk, [masks[i] for i in gathered], dtype)
                    non_finite[gathered] += bad.numpy()
                    for i, piece in zip(gathered, stored):
                        outputs[i][done:done + count] = np.asarray(piece)
            if reduced:
                sums = executor.run(_accumulate_sums, sums, tuple(rows[i] for i in reduced),
                                    tuple(masks[i] for i in reduced), tuple(reduce_blocks[i] for i in reduced))
            done += count
            if on_chunk is not None:
                on_chunk(done)
    finally:
        faulter.stop()
    needed = num_gradients * fisher_batch_size
    if done < num_gradients:
        have = done * fisher_batch_size
        raise ValueError(
            f"the Fisher dataset is {'empty' if have == 0 else 'too small'}: it gave {have} usable samples, "
            f"but num_gradients × fisher_batch_size = {num_gradients} × {fisher_batch_size} = {needed} are needed"
        )
    columns = {i: buffer if isinstance(buffer, tf.Tensor) else shared_tensor(buffer, dtype)
               for i, buffer in outputs.items()}
    if reduced:
        totals = executor.reduce_sum(sums)
        for i, (full, rest, gradient_sum) in zip(reduced, totals):
            columns[i] = BlockGrams(num_gradients, reduce_blocks[i], full, rest, gradient_sum)
            non_finite[i] = int(tf.math.count_nonzero(~tf.math.is_finite(columns[i].mean_square())))
    _check_finite(non_finite, variables)
    return [columns[i] for i in range(len(sizes))]


@compat.function(reduce_retracing=True)
def _accumulate_sums(previous, pieces, masks, block_sizes):
    """``previous`` (None on the first chunk) plus the :func:`partial_sums` of each variable's masked rows."""
    sums = tuple(partial_sums(_apply_mask(rows, mask), block)
                 for rows, mask, block in zip(pieces, masks, block_sizes))
    return sums if previous is None else tf.nest.map_structure(tf.add, previous, sums)


@compat.function(reduce_retracing=True)
def _masked_rows(pieces, masks, dtype):
    """Per variable, rows (g, size) × its mask (size,) (None: no mask) in ``dtype``; and the number of
    non-finite entries of each variable's rows (a (variables,) int64 vector)."""
    stored = [tf.cast(_apply_mask(rows, mask), dtype) for rows, mask in zip(pieces, masks)]
    bad = tf.stack([tf.math.count_nonzero(~tf.math.is_finite(rows)) for rows in stored])
    return stored, bad


_LOSS_CHECKED = weakref.WeakKeyDictionary()  # gradient function → the datasets whose loss it has checked


def _check_loss_once(gradient_fn, dataset, forward, loss_fn, x, y):
    """:func:`check_loss` on the first sample, once per (compiled gradient function, dataset): the events of a
    run reuse one gradient function on one dataset, and a loss that turns non-finite later shows as
    non-finite gradients."""
    try:
        checked = _LOSS_CHECKED.setdefault(gradient_fn, weakref.WeakSet())
    except TypeError:  # not weakly referenceable: check every time
        checked = None
    if checked is not None and dataset in checked:
        return
    check_loss(forward, loss_fn, x, y)
    if checked is not None:
        checked.add(dataset)


def _host_mask(mask):
    """A (size,) mask as a float32 NumPy array, or None when there is none or it keeps every entry."""
    if mask is None:
        return None
    values = np.asarray(mask, np.float32)
    return None if bool(np.all(values == 1)) else values


def _store_rows(target, rows, mask):
    """Write float32 ``rows`` (g, size) times ``mask`` (None: all ones) into ``target`` (a view of the output
    buffer) in one pass from a view of the tensor's memory."""
    values = np.asarray(rows)  # the tensor's own memory (Tensor.numpy() would copy it first)
    if mask is None:
        np.copyto(target, values)
    else:
        np.multiply(values, mask, out=target)


def _known_finite(rows, replicas):
    """The ``finite`` flags of a gradient function's rows (a (variables,) bool NumPy vector: True where they are known
    to be finite, see :class:`~tf_woodfisher.fisher.rules.GradientRows`), or None: not known (other gradient
    functions, and several replicas, whose results are per-replica structures)."""
    finite = getattr(rows, "finite", None) if replicas == 1 else None
    return None if finite is None else np.asarray(finite, bool)


def _count_non_finite(pieces, known_finite=None):
    """The number of NaN or infinite entries of each float32 tensor of ``pieces`` (an int64 NumPy vector).

    One sum per tensor, counted entry by entry only for a tensor whose sum is not finite, which any NaN or
    infinity makes it (so does an overflow of the sum: then the exact count is 0). Masking cannot hide one: a NaN
    or infinity times 0 is NaN. Tensors of at least :data:`HOST_SUM_ELEMENTS` entries are summed in one compiled
    call (TensorFlow's sums, on all cores), smaller ones by NumPy, which is faster below the call's cost (measured
    on 2 cores: 2^16 entries 17 µs against 455 µs, 2^22 about equal, 2^25 8.4 ms against 6.6 ms).
    Tensors that ``known_finite`` (None, or one bool per tensor) marks True are not read: their count is 0.
    """
    known = [False] * len(pieces) if known_finite is None else [bool(k) for k in known_finite]
    counts = np.zeros(len(pieces), np.int64)
    checked = [i for i, k in enumerate(known) if not k]
    large = [i for i in checked if int(pieces[i].shape.num_elements()) >= HOST_SUM_ELEMENTS]
    totals = dict(zip(large, _sums(tuple(pieces[i] for i in large)).numpy())) if large else {}
    for i in checked:
        total = totals[i] if i in totals else np.asarray(pieces[i]).sum(dtype=np.float32)
        if not math.isfinite(total):
            counts[i] = int(tf.math.count_nonzero(~tf.math.is_finite(pieces[i])))
    return counts


HOST_SUM_ELEMENTS = 2 ** 22  # rows with fewer entries are checked for NaN and infinity by NumPy


@compat.function(reduce_retracing=True)
def _sums(pieces):
    """The (pieces,) float32 vector of each tensor's sum of entries."""
    return tf.stack([tf.reduce_sum(piece) for piece in pieces])


@compat.function(reduce_retracing=True)
def _masked(pieces, masks):
    """Per tensor, its :func:`_apply_mask` rows."""
    return tuple(_apply_mask(rows, mask) for rows, mask in zip(pieces, masks))


def _apply_mask(rows, mask):
    """Rows (g, size) × a (size,) mask, or the rows themselves when the mask is None."""
    return rows if mask is None else rows * mask[None, :]


def _check_finite(non_finite, variables):
    """Raise ValueError naming the first weight with a non-finite gradient; non_finite: count per variable."""
    if not non_finite.any():
        return
    owner = int(np.flatnonzero(non_finite)[0])
    raise ValueError(
        f"NaN or infinite gradients in {non_finite.sum()} entries, first in {variables[owner].name}: "
        "check the inputs, the labels and the loss (a log of zero, an overflow)"
    )
