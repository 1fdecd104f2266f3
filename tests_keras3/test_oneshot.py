"""tfw3.one_shot_prune: the events against NumPy references, Fisher gradients of Keras 3 layers against a plain
loop, the report, and bad input."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_woodfisher.keras3 as tfw3
from tf_woodfisher.keras3.oneshot import keras3_problem
from tf_woodfisher.pruning.targets import flatten

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def softmax_regression(rng, d_in=5, classes=3, n=40):
    """A bias-free Dense softmax regression, its data, and the per-sample gradients of its kernel, (n, d_in·classes)."""
    model = keras.Sequential([keras.Input((d_in,)), L.Dense(classes, use_bias=False, name="fc")])
    kernel = rng.standard_normal((d_in, classes)).astype(np.float32)
    model.layers[0].kernel.assign(kernel)
    x = rng.standard_normal((n, d_in)).astype(np.float32)
    y = rng.integers(0, classes, n)
    logits = x.astype(np.float64) @ kernel
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = p - np.eye(classes)[y]
    grads = (x[:, :, None] * residual[:, None, :]).reshape(n, -1)  # row-major, as the kernel is flattened
    return model, tf.data.Dataset.from_tensor_slices((x, y)), kernel.astype(np.float64).ravel(), grads


@pytest.mark.parametrize("method", ["woodfisher", "diagonal_fisher", "magnitude"])
def test_one_shot_event_equals_numpy(rng, method):
    model, data, w, grads = softmax_regression(rng)
    damping, sparsity = 1e-3, 0.6
    fisher = damping * np.eye(w.size) + grads.T @ grads / len(grads)
    inverse = np.linalg.inv(fisher)
    if method == "woodfisher":
        scores = w ** 2 / (2 * np.diag(inverse))
    elif method == "diagonal_fisher":
        scores = 0.5 * w ** 2 * np.diag(fisher)
    else:
        scores = 0.5 * w ** 2
    pruned = np.argsort(scores)[:round(sparsity * w.size)]
    mask = np.ones_like(w)
    mask[pruned] = 0
    expected = w.copy()
    if method == "woodfisher":
        direction = np.zeros_like(w)
        direction[pruned] = w[pruned] / np.diag(inverse)[pruned]
        expected = w - inverse @ direction
    expected *= mask

    report = tfw3.one_shot_prune(model, data, LOSS, sparsity, method=method, num_gradients=len(grads),
                                 fisher_batch_size=1, shuffle_buffer=0, damping=damping, inverse_dtype="float64",
                                 verbose=0)
    result = model.layers[0].kernel.numpy().ravel()
    np.testing.assert_array_equal(result == 0, mask == 0)
    np.testing.assert_allclose(result, expected, rtol=0, atol=2e-5)
    assert report.sparsity == pytest.approx(round(sparsity * w.size) / w.size)
    assert report.method == method and [layer.name for layer in report.layers] == ["fc/kernel"]


def test_filter_order_blocks_hold_whole_output_units(rng):
    """fisher_block_order='filter' through Keras 3: chunks of 10 weights hold two whole kernel columns (output units
    of 5 weights), so the blocks are columns {0, 1} and {2}, not the flat ranges 0–9 and 10–14 of the (5, 3) kernel."""
    model, data, w, grads = softmax_regression(rng)
    damping, sparsity = 1e-3, 0.6
    inverse = np.zeros((w.size, w.size))
    columns = np.arange(w.size).reshape(5, 3).T  # row j: the flat indices of output unit j
    for block in (columns[:2].ravel(), columns[2]):
        inverse[np.ix_(block, block)] = np.linalg.inv(damping * np.eye(block.size)
                                                      + grads[:, block].T @ grads[:, block] / len(grads))
    pruned = np.argsort(w ** 2 / (2 * np.diag(inverse)))[:round(sparsity * w.size)]
    direction = np.zeros_like(w)
    direction[pruned] = w[pruned] / np.diag(inverse)[pruned]
    expected = w - inverse @ direction
    expected[pruned] = 0

    tfw3.one_shot_prune(model, data, LOSS, sparsity, num_gradients=len(grads), fisher_batch_size=1, shuffle_buffer=0,
                        damping=damping, fisher_block_size=10, fisher_block_order="filter", inverse_dtype="float64",
                        verbose=0)
    result = model.layers[0].kernel.numpy().ravel()
    np.testing.assert_array_equal(np.flatnonzero(result == 0), np.sort(pruned))
    np.testing.assert_allclose(result, expected, rtol=0, atol=2e-5)
    # the flat order's blocks give another result, so the comparison above tells the two orders apart
    model.layers[0].kernel.assign(w.reshape(5, 3).astype(np.float32))
    tfw3.one_shot_prune(model, data, LOSS, sparsity, num_gradients=len(grads), fisher_batch_size=1, shuffle_buffer=0,
                        damping=damping, fisher_block_size=10, inverse_dtype="float64", verbose=0)
    assert np.abs(model.layers[0].kernel.numpy().ravel() - expected).max() > 1e-3


def test_global_and_layerwise_modes(rng):
    def model():
        m = keras.Sequential([keras.Input((6,)), L.Dense(10, name="a"), L.Dense(3, name="b")])
        for layer, scale in zip(m.layers, (0.1, 1.0)):  # layer a is small: global mode takes most of it
            layer.kernel.assign(scale * rng.standard_normal(layer.kernel.shape).astype(np.float32))
        return m

    glob, layerwise = model(), model()
    everything = np.concatenate([np.abs(layer.kernel.numpy()).ravel() for layer in glob.layers])
    threshold = np.sort(everything)[round(0.5 * everything.size) - 1]
    tfw3.one_shot_prune(glob, None, None, 0.5, method="magnitude", verbose=0)
    for layer in glob.layers:
        before = np.abs(layer.kernel.numpy())
        assert np.all((before == 0) | (before > threshold))
    report = tfw3.one_shot_prune(layerwise, None, None, 0.5, method="magnitude", mode="layerwise", verbose=0)
    assert [round(layer.sparsity, 2) for layer in report.layers] == [0.5, 0.5]
    assert report.unpruned_weights == 10 + 3  # the biases
    assert report.model_sparsity == pytest.approx(report.sparsity * 90 / (90 + 13))


class Tower(keras.Model):
    """A subclassed model with the layers whose per-sample gradients Keras 3 computes its own way."""

    def __init__(self):
        super().__init__(name="tower")
        self.embed = L.Embedding(12, 8, name="embed")
        self.attention = L.MultiHeadAttention(2, 4, name="attention")
        self.project = L.Dense(6, name="project")  # Dense on a sequence: tf.matmul of rank 3 by rank 2
        self.einsum = L.EinsumDense("abc,cd->abd", (5, 4), name="einsum")
        self.conv = L.Conv1D(4, 2, name="conv")
        self.lstm = L.LSTM(3, unroll=True, name="lstm")
        self.head = L.Dense(3, name="head")

    def call(self, tokens):
        h = self.embed(tokens)
        h = self.attention(h, h)
        return self.head(self.lstm(self.conv(self.einsum(self.project(h)))))


@pytest.mark.slow
def test_fisher_gradients_of_keras3_layers_equal_a_per_sample_loop(rng):
    model = Tower()
    tokens = rng.integers(0, 12, (6, 5)).astype(np.int32)
    labels = rng.integers(0, 3, 6)
    model(tokens)
    targets = tfw3.find_prunable_weights(model)
    assert len(targets) == 11
    problem = keras3_problem(model, targets, tf.data.Dataset.from_tensor_slices((tokens, labels)), LOSS,
                             tfw3.WoodFisherConfig())
    assert problem.batched is False
    fn = problem.make_gradient_fn(problem.forward, [t.variable for t in targets], problem.loss)
    rows = tf.concat(fn(tokens[:, None], labels[:, None]), axis=1).numpy()  # 6 groups of one sample
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for i in range(6):
        with tf.GradientTape() as tape:
            value = loss(labels[i:i + 1], model(tokens[i:i + 1], training=False))
        expected = flatten(tape.gradient(value, [t.variable for t in targets])).numpy()
        np.testing.assert_allclose(rows[i], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_subclassed_model_and_pruned_model_masks(rng):
    model = Tower()
    tokens = rng.integers(0, 12, (64, 5)).astype(np.int32)
    data = tf.data.Dataset.from_tensor_slices((tokens, rng.integers(0, 3, 64)))
    model(tokens[:1])
    report = tfw3.one_shot_prune(model, data, LOSS, 0.7, num_gradients=32, verbose=0)
    assert report.sparsity == pytest.approx(0.7, abs=1e-3)
    pruned = tfw3.prune(model, tfw3.KeepMasks())  # masks start at ones; one-shot on it sets them
    tfw3.one_shot_prune(pruned, data.batch(8), "sparse_categorical_crossentropy", 0.8, num_gradients=32,
                        layers="attention", verbose=0)
    for target in pruned.pruning_targets():  # the selection's masks are set, the others stay ones
        expected = target.variable.numpy() != 0 if target.name.startswith("attention/") else 1.0
        np.testing.assert_array_equal(target.mask.numpy(), np.broadcast_to(expected, target.shape))
    attention = pruned.pruning_targets("attention")
    assert len(attention) == 4
    assert np.mean(np.concatenate([t.variable.numpy().ravel() for t in attention]) == 0) == pytest.approx(0.8, abs=0.01)


def test_progress_bar_table_and_quiet(rng, capsys):
    model, data, _, _ = softmax_regression(rng)
    tfw3.one_shot_prune(model, data, LOSS, 0.5, num_gradients=8, steps=2)
    out = capsys.readouterr().out
    assert "fc/kernel" in out and "woodfisher (global, 2 steps)" in out and "unit" in out
    tfw3.one_shot_prune(model, data, LOSS, 0.6, num_gradients=8, verbose=0)
    assert capsys.readouterr().out == ""


def test_bad_input(rng):
    model, data, _, _ = softmax_regression(rng)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        tfw3.one_shot_prune(model, data, LOSS, 0.5, nonsense=1)
    with pytest.raises(ValueError, match=r"target_sparsity must be a number in \[0, 1\)"):
        tfw3.one_shot_prune(model, data, LOSS, 1.0)
    with pytest.raises(ValueError, match="needs a Fisher dataset"):
        tfw3.one_shot_prune(model, None, LOSS, 0.5)
    with pytest.raises(ValueError, match="needs a loss"):
        tfw3.one_shot_prune(model, data, None, 0.5)
    with pytest.raises(ValueError, match="does not match the model's outputs"):
        tfw3.one_shot_prune(model, data.map(lambda x, y: (x, tf.ones([7]))), "mse", 0.5, verbose=0)
    with pytest.raises(ValueError, match="num_gradients must be"):
        tfw3.one_shot_prune(model, data, LOSS, 0.5, num_gradients=0)
    with pytest.raises(TypeError, match="loss must be a Keras loss"):
        tfw3.one_shot_prune(model, data, 3, 0.5)


@pytest.mark.parametrize("method", ["woodfisher", "magnitude"])
def test_loss_diagnostics_equal_numpy(rng, method):
    """diagnostics=True reaches the Keras 3 entry point: ḡᵀδw + ½δwᵀFδw against NumPy, and the measured change."""
    model, data, w, grads = softmax_regression(rng)
    x, y = (np.stack([e[i].numpy() for e in data]) for i in (0, 1))

    def mean_loss():
        return float(np.mean(keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)))

    before = mean_loss()
    report = tfw3.one_shot_prune(model, data, LOSS, 0.6, method=method, num_gradients=len(grads), damping=1e-3,
                                 diagnostics=True, verbose=0)
    delta = model.layers[0].kernel.numpy().ravel() - w
    quadratic = 0.5 * (1e-3 * delta @ delta + np.sum((grads @ delta) ** 2) / len(grads))
    np.testing.assert_allclose(report.quadratic_loss_increase, quadratic, rtol=1e-4)
    np.testing.assert_allclose(report.predicted_loss_increase, grads.mean(0) @ delta + quadratic, rtol=1e-4)
    np.testing.assert_allclose(report.measured_loss_increase, mean_loss() - before, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("settings", [pytest.param(dict(method="woodfisher", fisher_block_size=4),
                                                   marks=pytest.mark.slow),
                                      dict(method="magnitude"),
                                      pytest.param(dict(method="woodfisher", steps=2), marks=pytest.mark.slow),
                                      pytest.param(dict(method="sparsegpt"), marks=pytest.mark.slow)])
def test_sweep_points_equal_one_shot_runs_and_the_model_is_restored(rng, settings):
    model, data, _, _ = softmax_regression(rng, n=48)
    start = model.get_weights()
    common = dict(num_gradients=24, damping=1e-3, shuffle_buffer=0, verbose=0, **settings)
    points = tfw3.one_shot_sweep(model, data, LOSS, (0.3, 0.7), lambda m: m.get_weights()[0].copy(), **common)
    for a, b in zip(start, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for point in points:
        fresh = keras.models.clone_model(model)
        fresh.set_weights(start)
        tfw3.one_shot_prune(fresh, data, LOSS, point.sparsity, **common)
        np.testing.assert_allclose(point.value, fresh.get_weights()[0], rtol=1e-5, atol=1e-6)
        assert point.report.sparsity == pytest.approx(point.sparsity, abs=0.04)
    cumulative = tfw3.one_shot_sweep(model, data, LOSS, (0.3, 0.7), lambda m: m.get_weights()[0].copy(),
                                     cumulative=settings["method"] != "sparsegpt", **common)
    assert np.mean(cumulative[1].value == 0) == pytest.approx(0.7, abs=0.04)
