"""Per-sample (or per mini-batch) gradients of a model's loss: the rows of the empirical Fisher.

One gradient is the gradient of the mean loss over ``fisher_batch_size`` samples (1 = one sample's
gradient, the paper's "fisher-mini-bsz"). Gradients are taken in inference mode
(``training=False``), vectorised over the groups of a chunk with ``tf.vectorized_map``, and
multiplied by the current mask so that pruned entries are zero.
"""
import numpy as np

from tf_woodfisher._keras import keras, tf
from tf_woodfisher.fisher.distributed import executor_for

DEFAULT_SHUFFLE_BUFFER = 10_000
CHUNK_BYTES = 256 * 2 ** 20  # memory budget of one chunk's gradient rows


def per_sample_loss(loss):
    """A callable (y_true, y_pred) → per-sample losses from a Keras loss name, object or function."""
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        config = dict(loss.get_config(), reduction=keras.losses.Reduction.NONE)
        return type(loss).from_config(config)
    if not callable(loss):
        raise TypeError(f"loss must be a Keras loss, a loss name or a callable, got {loss!r}")
    return loss


def _is_batched(dataset, forward):
    first = tf.nest.flatten(dataset.element_spec)[0]
    inputs = getattr(forward, "inputs", None)
    if inputs:
        return first.shape.rank == inputs[0].shape.rank
    return first.shape.rank is not None and first.shape.rank > 0 and first.shape[0] is None


def fisher_batches(dataset, forward, num_gradients, fisher_batch_size, chunk_gradients, seed,
                   shuffle_buffer=DEFAULT_SHUFFLE_BUFFER):
    """A dataset of chunks (x, y) with x shaped (chunk_gradients, fisher_batch_size, ...).

    ``dataset`` yields (x, y) or (x, y, sample_weight), batched or not; samples are shuffled with
    ``seed`` in a buffer of ``shuffle_buffer`` (0: no shuffling) and num_gradients × fisher_batch_size
    of them are used.
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(f"the Fisher data must be a plain tf.data.Dataset of (x, y) pairs (not a distributed dataset: "
                        f"tf_woodfisher splits the samples across replicas itself), got {type(dataset).__name__}")
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise ValueError(f"the Fisher dataset must yield (x, y) or (x, y, sample_weight) tuples, got {spec}")
    if _is_batched(dataset, forward):
        dataset = dataset.unbatch()
    dataset = dataset.map(lambda x, y, *_: (x, y))
    if shuffle_buffer:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    return (
        dataset.take(num_gradients * fisher_batch_size)
        .batch(fisher_batch_size, drop_remainder=True)
        .batch(chunk_gradients)
    )


def default_chunk(dim, num_gradients):
    """Gradients per chunk so that one chunk's rows (chunk × dim float32) stay near CHUNK_BYTES."""
    return int(np.clip(CHUNK_BYTES // (4 * dim * 3), 1, min(num_gradients, 256)))


def make_gradient_fn(forward, variables, loss_fn):
    """A compiled function (x, y) of shape (g, b, ...) → (g, d) flat gradients of each group's mean loss."""

    def one_group(group):
        x, y = group
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            group_loss = tf.reduce_mean(loss_fn(y, forward(x, training=False)))
        grads = tape.gradient(group_loss, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.concat([tf.reshape(tf.cast(tf.convert_to_tensor(g), tf.float32), [-1]) for g in grads], 0)

    @tf.function(reduce_retracing=True)
    def gradients(x, y):
        return tf.vectorized_map(one_group, (x, y))

    return gradients


def _check_loss_matches(forward, loss_fn, x, y):
    try:
        value = loss_fn(y, forward(x, training=False))
    except Exception as error:  # Keras raises ValueError, TF InvalidArgumentError, user code anything
        raise ValueError(f"the loss does not match the model's outputs or the dataset's labels: {error}") from error
    if not bool(tf.reduce_all(tf.math.is_finite(tf.cast(value, tf.float32)))):
        raise ValueError("the loss is NaN or infinite on the Fisher data: check the inputs, labels and loss")


def check_loss_on_dataset(forward, loss, dataset):
    """Raise ValueError if ``dataset`` yields nothing, or ``loss`` (if given) does not fit the model's outputs."""
    first = next(iter(fisher_batches(dataset, forward, 1, 1, 1, seed=0, shuffle_buffer=0)), None)
    if first is None:
        raise ValueError("the Fisher dataset is empty: it yields no (x, y) samples")
    if loss is not None:
        _check_loss_matches(forward, per_sample_loss(loss), *tf.nest.map_structure(lambda t: t[0], first))


def collect_gradients(forward, variables, dataset, loss, num_gradients, fisher_batch_size=1, mask=None, seed=0,
                      shuffle_buffer=DEFAULT_SHUFFLE_BUFFER, chunk_gradients=None, on_chunk=None, strategy=None):
    """The (num_gradients, d) matrix of masked gradients, d = total size of ``variables``.

    forward: a Keras model (called with ``training=False``). variables: the weights to differentiate.
    mask: optional flat (d,) 0/1 tensor multiplied into every row. on_chunk(rows_done): progress hook.
    strategy: a ``tf.distribute`` strategy (default: the current one); with R replicas each chunk's
    samples are split across them and the rows all-gathered, so every worker gets the whole matrix.
    Raises ValueError if the dataset is too small, the loss does not fit, or a gradient is not finite.
    """
    if num_gradients < 1 or fisher_batch_size < 1:
        raise ValueError(f"num_samples and fisher_batch_size must be ≥ 1, got {num_gradients}, {fisher_batch_size}")
    executor = executor_for(strategy)
    executor.require_divisible(num_gradients, "num_samples")
    replicas = executor.num_replicas
    sizes = [int(v.shape.num_elements()) for v in variables]
    dim = sum(sizes)
    chunk_gradients = chunk_gradients or default_chunk(dim, num_gradients)
    chunk_gradients = max(replicas, chunk_gradients // replicas * replicas)
    loss_fn = per_sample_loss(loss)
    batches = fisher_batches(dataset, forward, num_gradients, fisher_batch_size, chunk_gradients, seed, shuffle_buffer)
    gradient_fn = make_gradient_fn(forward, variables, loss_fn)
    rows, done = [], 0
    for x, y in batches:
        if done == 0:
            first_group = tf.nest.map_structure(lambda t: t[0], (x, y))
            _check_loss_matches(forward, loss_fn, *first_group)
            executor.check_consistent([t.numpy() for t in tf.nest.flatten((x, y))], "the Fisher samples")
        chunk = executor.gather(executor.run(gradient_fn, *executor.shard((x, y))), int(tf.nest.flatten(y)[0].shape[0]))
        rows.append(chunk if mask is None else chunk * mask[None, :])
        done += int(chunk.shape[0])
        if on_chunk is not None:
            on_chunk(done)
    needed = num_gradients * fisher_batch_size
    if done < num_gradients:
        have = done * fisher_batch_size
        raise ValueError(
            f"the Fisher dataset is {'empty' if have == 0 else 'too small'}: it gave {have} usable samples, "
            f"but num_samples × fisher_batch_size = {num_gradients} × {fisher_batch_size} = {needed} are needed"
        )
    gradients = tf.concat(rows, axis=0)
    _check_finite(gradients, variables, sizes)
    return gradients


def _check_finite(gradients, variables, sizes):
    finite = tf.reduce_all(tf.math.is_finite(gradients), axis=0).numpy()
    if finite.all():
        return
    bad_columns = np.flatnonzero(~finite)
    owner = np.searchsorted(np.cumsum(sizes), bad_columns[0], side="right")
    raise ValueError(
        f"NaN or infinite gradients in {len(bad_columns)} entries, first in {variables[owner].name}: "
        "check the inputs, the labels and the loss (a log of zero, an overflow)"
    )
