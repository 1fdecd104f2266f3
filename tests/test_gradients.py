"""Per-sample Fisher gradients against a plain loop of one-sample GradientTape calls."""
import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_woodfisher as tfw
import tensorflow as tf
import tf_keras as keras
from tf_woodfisher.fisher.grams import BlockGrams
from tf_woodfisher.fisher import gradients
from tf_woodfisher.tfmot.problem import input_rank, per_sample_loss
from tf_woodfisher.tfmot.targets import find_prunable_weights

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class ScaledDense(keras.layers.Layer, tfmot.sparsity.keras.PrunableLayer):
    """A custom layer that tells tfmot which weight to prune."""

    def build(self, input_shape):
        self.w = self.add_weight("w", shape=(input_shape[-1], 6))
        self.scale = self.add_weight("scale", shape=(6,), initializer="ones")

    def call(self, x):
        return tf.matmul(x, self.w) * self.scale

    def get_prunable_weights(self):
        return [self.w]


def _core_arguments(model, data, loss):
    """What the tfmot adapter hands the core: an inference-mode forward, a per-sample loss, batched or not."""
    forward = lambda x: model(x, training=False)  # noqa: E731
    if not isinstance(data, tf.data.Dataset):
        return forward, per_sample_loss(loss), None
    return forward, per_sample_loss(loss), gradients.looks_batched(data, input_rank(model))


def collect_gradients(model, variables, data, loss, *args, **kwargs):
    forward, loss_fn, batched = _core_arguments(model, data, loss)
    return gradients.collect_gradients(forward, variables, data, loss_fn, *args, batched=batched, **kwargs)


def collect_gradient_columns(model, variables, data, loss, *args, **kwargs):
    forward, loss_fn, batched = _core_arguments(model, data, loss)
    return gradients.collect_gradient_columns(forward, variables, data, loss_fn, *args, batched=batched, **kwargs)


def every_layer_model():
    """A functional model with every supported layer type."""
    image = keras.Input((8, 8, 2))
    tokens = keras.Input((5,), dtype="int32")
    h = keras.layers.Conv2D(3, 3, padding="same", name="conv2d")(image)
    h = keras.layers.DepthwiseConv2D(3, name="depthwise")(h)
    h = keras.layers.SeparableConv2D(4, 3, name="separable")(h)
    h = keras.layers.Conv2DTranspose(2, 2, strides=2, name="transpose")(h)
    h = keras.layers.Flatten()(h)
    seq = keras.layers.Reshape((8, 2))(keras.layers.Dense(16, name="dense")(h))
    seq = keras.layers.Conv1D(3, 2, name="conv1d")(seq)
    vol = keras.layers.Reshape((2, 2, 2, 1))(keras.layers.Dense(8, name="dense2")(h))
    vol = keras.layers.Flatten()(keras.layers.Conv3D(2, 2, name="conv3d")(vol))
    emb = keras.layers.Flatten()(keras.layers.Embedding(11, 3, name="embedding")(tokens))
    merged = keras.layers.Concatenate()([keras.layers.Flatten()(seq), vol, emb])
    out = keras.layers.Dense(4, name="head")(ScaledDense(name="custom")(merged))
    return keras.Model([image, tokens], out)


def loop_gradients(model, variables, xs, ys, group, loss_fn=LOSS):
    rows = []
    for start in range(0, len(ys), group):
        x = tf.nest.map_structure(lambda a: a[start:start + group], xs)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn(ys[start:start + group], model(x, training=False)))
        rows.append(np.concatenate([np.ravel(tf.convert_to_tensor(g)) for g in tape.gradient(loss, variables)]))
    return np.stack(rows)


@pytest.mark.slow
def test_every_layer_type_is_found_and_matches_loop(rng):
    model = every_layer_model()
    weights = find_prunable_weights(model)
    names = [w.name for w in weights]
    assert names == ["conv2d/kernel", "depthwise/depthwise_kernel", "separable/depthwise_kernel",
                     "separable/pointwise_kernel", "transpose/kernel", "dense/kernel", "dense2/kernel",
                     "conv1d/kernel", "conv3d/kernel", "embedding/embeddings", "custom/w", "head/kernel"]
    n = 12
    xs = (rng.normal(size=(n, 8, 8, 2)).astype("float32"), rng.integers(0, 11, size=(n, 5)).astype("int32"))
    ys = rng.integers(0, 4, size=n)
    variables = [w.variable for w in weights]
    ds = tf.data.Dataset.from_tensor_slices((xs, ys))
    for group in (1, 3):
        got = collect_gradients(model, variables, ds, LOSS, n // group, group, shuffle_buffer=0).numpy()
        expected = loop_gradients(model, variables, xs, ys, group)
        assert got.shape == (n // group, sum(w.size for w in weights))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_mlpnet_gradients_masked_batched_and_deterministic(mlpnet_npz, mnist_flat):
    (x, y), _ = mnist_flat
    model = tfw.models.mlpnet(mlpnet_npz)
    variables = [w.variable for w in find_prunable_weights(model)]
    d = sum(int(v.shape.num_elements()) for v in variables)
    mask = tf.constant((np.arange(d) % 3 != 0).astype("float32"))
    unbatched = tf.data.Dataset.from_tensor_slices((x[:500], y[:500]))
    g1 = collect_gradients(model, variables, unbatched, LOSS, 50, mask=mask, seed=3).numpy()
    g2 = collect_gradients(model, variables, unbatched.batch(64), LOSS, 50, mask=mask, seed=3).numpy()
    g3 = collect_gradients(model, variables, unbatched, LOSS, 50, mask=mask, seed=4).numpy()
    np.testing.assert_array_equal(g1, g2)  # batched or not, same seed: same samples, same gradients
    assert not np.allclose(g1, g3)  # another seed draws other samples
    assert np.all(g1[:, ::3] == 0) and np.count_nonzero(g1[:, 1::3]) > 0
    in_order = collect_gradients(model, variables, unbatched, "sparse_categorical_crossentropy", 4,
                                 shuffle_buffer=0, mask=None).numpy()
    # A loss name is Keras' loss of that name (from_logits=False), taken per sample.
    probabilities = keras.losses.SparseCategoricalCrossentropy(from_logits=False)
    expected = loop_gradients(model, variables, x[:4], y[:4], 1, probabilities)
    np.testing.assert_allclose(in_order, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_dataset_too_small_or_empty(mlpnet_npz, mnist_flat):
    (x, y), _ = mnist_flat
    model = tfw.models.mlpnet(mlpnet_npz)
    variables = [w.variable for w in find_prunable_weights(model)]
    small = tf.data.Dataset.from_tensor_slices((x[:30], y[:30]))
    with pytest.raises(ValueError, match=r"too small: it gave 30 usable samples.*20 × 2 = 40"):
        collect_gradients(model, variables, small, LOSS, 20, 2)
    with pytest.raises(ValueError, match="empty"):
        collect_gradients(model, variables, small.take(0), LOSS, 5)
    with pytest.raises(TypeError, match="tf.data.Dataset"):
        collect_gradients(model, variables, (x, y), LOSS, 5)
    with pytest.raises(ValueError, match=r"\(x, y\)"):
        collect_gradients(model, variables, tf.data.Dataset.from_tensor_slices(x[:10]), LOSS, 5)


def test_nan_gradients_and_mismatched_loss(mlpnet_npz, mnist_flat):
    (x, y), _ = mnist_flat
    model = tfw.models.mlpnet(mlpnet_npz)
    variables = [w.variable for w in find_prunable_weights(model)]
    bad = x[:8].copy()
    bad[5, 100] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        collect_gradients(model, variables, tf.data.Dataset.from_tensor_slices((bad, y[:8])), LOSS, 8,
                          shuffle_buffer=0)
    one_hot_mse = tf.data.Dataset.from_tensor_slices((x[:8], np.zeros((8, 3), "float32")))
    with pytest.raises(ValueError, match="does not match the model's outputs"):
        collect_gradients(model, variables, one_hot_mse, "mse", 8)


@pytest.mark.parametrize("masked", [False, True])
def test_a_whole_chunk_is_stored_as_computed_and_equals_chunked_rows(mlpnet_npz, mnist_flat, monkeypatch, masked):
    """All m rows in one call (memory.whole_chunk): they are the result, no host buffer is written, and they equal
    the rows computed 7 at a time into host buffers, masked or not; a non-finite gradient is caught and counted
    alike on both paths."""
    (x, y), _ = mnist_flat
    model = tfw.models.mlpnet(mlpnet_npz)
    variables = [w.variable for w in find_prunable_weights(model)]
    sizes = [int(v.shape.num_elements()) for v in variables]
    keep = (np.arange(sum(sizes)) % 5 != 0).astype("float32")
    mask = tf.constant(keep) if masked else None
    data = tf.data.Dataset.from_tensor_slices((x[:60], y[:60]))
    assert gradients.default_chunk(sum(sizes), 24, 2) == 24
    bad = x[:60].copy()
    bad[11, 300] = np.inf
    bad_data = tf.data.Dataset.from_tensor_slices((bad, y[:60]))
    messages = []
    for chunk in (None, 7):
        with pytest.raises(ValueError, match="NaN or infinite gradients in [1-9]") as error:
            collect_gradient_columns(model, variables, bad_data, LOSS, 24, 2, mask=mask, shuffle_buffer=0,
                                     chunk_gradients=chunk)
        messages.append(str(error.value))
    assert messages[0] == messages[1]
    chunked = collect_gradient_columns(model, variables, data, LOSS, 24, 2, mask=mask, seed=3, chunk_gradients=7)

    def no_host_buffer(*args):
        raise AssertionError("a whole chunk wrote a host buffer")

    monkeypatch.setattr(gradients, "aligned_empty", no_host_buffer)
    whole = collect_gradient_columns(model, variables, data, LOSS, 24, 2, mask=mask, seed=3)
    flat = np.concatenate([w.numpy() for w in whole], axis=1)
    np.testing.assert_allclose(flat, np.concatenate([c.numpy() for c in chunked], axis=1), rtol=1e-5,
                               atol=1e-6 * np.abs(flat).max())
    assert np.all(flat[:, keep == 0] == 0) if masked else np.count_nonzero(flat[:, keep == 0]) > 0


def test_chunked_rows_are_the_same_while_a_background_thread_faults_their_buffers_in(mlpnet_npz, mnist_flat,
                                                                                    monkeypatch):
    """With the RowFaulter forced on (threshold 1 byte, small slices), chunked rows into fresh and into pooled host
    buffers equal those written without it; its thread is gone after the call, also when the call raises."""
    import threading

    from tf_woodfisher.fisher import host

    (x, y), _ = mnist_flat
    model = tfw.models.mlpnet(mlpnet_npz)
    variables = [w.variable for w in find_prunable_weights(model)]
    data = tf.data.Dataset.from_tensor_slices((x[:90], y[:90]))
    monkeypatch.setattr(host, "PREFAULT_BYTES", 10 ** 12)  # never: the reference
    plain = np.concatenate([c.numpy() for c in collect_gradient_columns(
        model, variables, data, LOSS, 45, 2, seed=3, chunk_gradients=4)], axis=1)
    monkeypatch.setattr(host, "PREFAULT_BYTES", 1)
    monkeypatch.setattr(host, "FAULT_SLICE_BYTES", 4096)
    pool = host.HostBuffers()
    for buffers in (None, pool, pool):  # fresh, then the pool's new buffers, then the same buffers reused
        rows = collect_gradient_columns(model, variables, data, LOSS, 45, 2, seed=3, chunk_gradients=4,
                                        buffers=buffers)
        np.testing.assert_array_equal(np.concatenate([c.numpy() for c in rows], axis=1), plain)
        del rows
    with pytest.raises(ValueError, match="too small"):
        collect_gradient_columns(model, variables, data, LOSS, 46, 2, seed=3, chunk_gradients=4)
    assert not [t for t in threading.enumerate() if t.name == "tfw-row-faulter"]


@pytest.mark.slow
def test_strided_dilated_and_padded_convolutions_match_loop(rng):
    """Per-sample Conv2D kernel gradients (batched patches × output gradients) against the loop."""
    image = keras.Input((9, 10, 3))
    h = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="strided_same")(image)
    h = keras.layers.Conv2D(5, 3, dilation_rate=2, padding="same", name="dilated_same")(h)
    h = keras.layers.Conv2D(4, (2, 3), strides=(1, 2), padding="valid", name="rect_valid")(h)
    h = keras.layers.Conv2D(3, 1, strides=2, name="pointwise_strided")(h)
    h = keras.layers.Conv2DTranspose(2, 3, strides=2, padding="same", name="transpose_same")(h)
    model = keras.Model(image, keras.layers.Dense(4, name="head")(keras.layers.Flatten()(h)))
    variables = [w.variable for w in find_prunable_weights(model)]
    xs, ys = rng.normal(size=(10, 9, 10, 3)).astype("float32"), rng.integers(0, 4, size=10)
    ds = tf.data.Dataset.from_tensor_slices((xs, ys))
    got = collect_gradients(model, variables, ds, LOSS, 10, shuffle_buffer=0, chunk_gradients=4).numpy()
    expected = loop_gradients(model, variables, xs, ys, 1)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_gram_sums_of_masked_gradients_match_their_rows(mlpnet_npz, mnist_flat):
    """reduce_blocks: a variable's masked gradients come back as their block Gram sums, not rows."""
    (x, y), _ = mnist_flat
    model = tfw.models.mlpnet(mlpnet_npz)
    variables = [w.variable for w in find_prunable_weights(model)]
    sizes = [int(v.shape.num_elements()) for v in variables]
    mask = tf.constant((np.arange(sum(sizes)) % 3 != 0).astype("float32"))
    data = tf.data.Dataset.from_tensor_slices((x[:200], y[:200]))
    rows = collect_gradient_columns(model, variables, data, LOSS, 40, mask=mask, seed=1, chunk_gradients=16)
    mixed = collect_gradient_columns(model, variables, data, LOSS, 40, mask=mask, seed=1, chunk_gradients=16,
                                     reduce_blocks=[None, 30, 7])
    np.testing.assert_array_equal(mixed[0].numpy(), rows[0].numpy())
    offsets = np.cumsum(sizes)
    for grams, piece, block, offset in zip(mixed[1:], rows[1:], [30, 7], offsets[:-1]):
        assert isinstance(grams, BlockGrams) and grams.num_gradients == 40 and grams.block_size == block
        g = piece.numpy().astype(np.float64)
        whole = g.shape[1] // block * block
        expected = np.einsum("gki,gkj->kij", *2 * [g[:, :whole].reshape(40, -1, block)])
        np.testing.assert_allclose(grams.full.numpy(), expected, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(grams.rest.numpy()[0], g[:, whole:].T @ g[:, whole:], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(grams.mean_gradient().numpy(), g.mean(axis=0), rtol=1e-4, atol=1e-7)
        square = grams.mean_square().numpy()
        np.testing.assert_allclose(square, (g ** 2).mean(axis=0), rtol=1e-4, atol=1e-9)
        pruned = (offset + np.arange(g.shape[1])) % 3 == 0
        assert np.all(square[pruned] == 0) and np.count_nonzero(square[~pruned]) > 0.5 * np.sum(~pruned)


def test_non_finite_entries_are_counted_exactly_by_numpy_and_by_tensorflow(monkeypatch):
    """_count_non_finite counts NaN and infinite entries exactly whether NumPy (fewer than HOST_SUM_ELEMENTS entries)
    or TensorFlow sums a tensor; a sum that overflows without any of them counts 0; a tensor marked known finite is
    not read."""
    monkeypatch.setattr(gradients, "HOST_SUM_ELEMENTS", 1000)
    small, large = np.ones((10, 50), np.float32), np.ones((40, 50), np.float32)
    small[3, 4], small[7, 1], large[0, 0], large[39, 2], large[5, 5] = np.nan, np.inf, -np.inf, np.nan, np.inf
    overflowing = np.full((40, 50), 3e38, np.float32)
    pieces = [tf.constant(a) for a in (small, large, np.ones((40, 50), np.float32), overflowing, overflowing[:10])]
    np.testing.assert_array_equal(gradients._count_non_finite(pieces), [2, 3, 0, 0, 0])
    np.testing.assert_array_equal(gradients._count_non_finite(pieces[:2], [True, False]), [0, 3])
    np.testing.assert_array_equal(gradients._count_non_finite(pieces[:2], [True, True]), [0, 0])
