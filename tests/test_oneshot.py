"""one_shot_prune on the reference MLPNet and on small models: masks, sparsities, updates, accuracy, errors."""
import warnings

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_woodfisher as tfw
import tensorflow as tf
import tf_keras as keras
from tf_woodfisher.fisher import BlockPartition, InverseFisher
from tf_woodfisher.pruning import scores

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture(scope="module")
def fisher_data(mnist_flat):
    (x, y), _ = mnist_flat
    return tf.data.Dataset.from_tensor_slices((x, y))


def accuracy(model, mnist_flat):
    _, (x, y) = mnist_flat
    return float(np.mean(model.predict(x, batch_size=5000, verbose=0).argmax(1) == y))


def kernels(model):
    return [w.variable.numpy() for w in tfw.find_prunable_weights(model)]


def test_global_magnitude_matches_numpy_threshold(mlpnet_npz, mnist_flat):
    model = tfw.models.mlpnet(mlpnet_npz)
    before = kernels(model)
    report = tfw.one_shot_prune(model, None, None, 0.9, method="magnitude", verbose=0)
    flat = np.concatenate([k.ravel() for k in before])
    threshold = np.sort(np.abs(flat))[int(round(0.9 * flat.size)) - 1]
    for old, new in zip(before, kernels(model)):
        np.testing.assert_array_equal(new, np.where(np.abs(old) > threshold, old, 0.0))
    assert report.sparsity == pytest.approx(0.9, abs=1e-4)
    assert accuracy(model, mnist_flat) == pytest.approx(0.9028, abs=0.003)  # the "about 90.3%"


def test_layerwise_mode_prunes_every_layer_to_target(mlpnet_npz, fisher_data):
    model = tfw.models.mlpnet(mlpnet_npz)
    report = tfw.one_shot_prune(model, fisher_data, LOSS, 0.7, mode="layerwise", num_gradients=64, verbose=0)
    for layer in report.layers:
        assert layer.zeros == round(0.7 * layer.size)


def test_woodfisher_beats_magnitude_and_sets_layer_sparsities(mlpnet_npz, fisher_data, mnist_flat):
    magnitude = tfw.models.mlpnet(mlpnet_npz)
    tfw.one_shot_prune(magnitude, None, None, 0.9, method="magnitude", verbose=0)
    model = tfw.models.mlpnet(mlpnet_npz)
    report = tfw.one_shot_prune(model, fisher_data, LOSS, 0.9, num_gradients=400, fisher_batch_size=10, steps=4,
                                verbose=0)
    assert report.sparsity == pytest.approx(0.9, abs=1e-4)
    sparsities = [layer.sparsity for layer in report.layers]
    assert sparsities[0] > 0.9 > sparsities[1]  # global mode: the big first layer takes most of the cut
    assert accuracy(model, mnist_flat) >= accuracy(magnitude, mnist_flat) + 0.01
    assert report.total_seconds >= report.gradient_seconds + report.inverse_seconds + report.scoring_seconds
    assert "fc1/kernel" in str(report) and "total" in str(report)


def _select_by_stable_argsort(values, mask, sizes, sparsity):
    """The plain reference: per segment, the ``count`` lowest of (-inf where already pruned, else the score) by a
    stable argsort (ties: lower index first)."""
    out, start = np.ones(values.size, np.float32), 0
    for size in sizes:
        segment = np.where(mask[start:start + size] > 0, values[start:start + size].astype(np.float64), -np.inf)
        count = max(min(int(round(sparsity * size)), size - 1), int(np.sum(mask[start:start + size] == 0)))
        out[start + np.argsort(segment, kind="stable")[:count]] = 0.0
        start += size
    return out


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_selection_matches_a_stable_argsort_with_ties_and_pruned_entries(dtype):
    """select_pruned against the stable argsort, global and layerwise: many tied scores (a few distinct values),
    entries already pruned (kept pruned even when the target is lower), sparsities 0 to 0.99; NaN scores among
    the entries to prune are refused by name."""
    rng = np.random.default_rng(4)
    sizes = [37, 120, 5, 64]
    for trial in range(30):
        values = rng.integers(0, 6, sum(sizes)).astype(dtype) if trial % 2 else rng.random(sum(sizes)).astype(dtype)
        mask = (rng.random(sum(sizes)) > rng.choice([0.0, 0.3, 0.95])).astype(np.float32)
        sparsity = float(rng.choice([0.0, 0.2, 0.5, 0.9, 0.99]))
        for mode, segments in (("global", [sum(sizes)]), ("layerwise", sizes)):
            got = scores.select_pruned(tf.constant(values), tf.constant(mask), sizes, sparsity, mode)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, _select_by_stable_argsort(values, mask, segments, sparsity),
                                          err_msg=f"{mode}, sparsity {sparsity}, trial {trial}")
    values = np.arange(10, dtype=np.float32)
    values[[2, 5, 7]] = np.nan
    with pytest.raises(ValueError, match="scores of 3 weights are NaN"):
        scores.select_pruned(values, np.ones(10, np.float32), [10], 0.9, "global")
    with pytest.raises(ValueError, match="mode"):
        scores.select_pruned(values, np.ones(10, np.float32), [10], 0.5, "blockwise")


def test_obs_update_matches_dense_numpy(rng):
    m, d = 30, 12
    g = rng.normal(size=(m, d)).astype(np.float32)
    w = rng.normal(size=d).astype(np.float32)
    damping = 1e-2
    inverse_dense = np.linalg.inv(damping * np.eye(d) + g.T.astype(np.float64) @ g / m)
    inverse = InverseFisher.from_gradients(g, BlockPartition.from_segments([d], "model"), damping)
    stats = scores.FisherStatistics(inverse=inverse)
    rho = scores.importance_scores("woodfisher", w, stats).numpy()
    np.testing.assert_allclose(rho, w ** 2 / (2 * np.diag(inverse_dense)), rtol=1e-4)
    pruned = rho <= np.sort(rho)[3]  # the 4 lowest
    u = np.where(pruned, w / np.diag(inverse_dense), 0.0)
    expected = w - inverse_dense @ u
    got = scores.updated_weights("woodfisher", w, tf.constant(pruned), stats).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # A single pruned weight: the OBS update sets it exactly to zero.
    single = np.arange(d) == int(np.argmin(rho))
    assert abs(scores.updated_weights("woodfisher", w, tf.constant(single), stats).numpy()[single][0]) < 1e-5
    # WoodTaylor: r = F⁻¹ḡ shifts both the scores and the update.
    taylor = scores.FisherStatistics(inverse=inverse, mean_gradient=tf.constant(g.mean(0)))
    r = inverse_dense @ g.mean(0)
    np.testing.assert_allclose(scores.importance_scores("woodtaylor", w, taylor).numpy(),
                               (w - r) ** 2 / (2 * np.diag(inverse_dense)), rtol=1e-4)
    u = np.where(pruned, (w - r) / np.diag(inverse_dense), 0.0)
    np.testing.assert_allclose(scores.updated_weights("woodtaylor", w, tf.constant(pruned), taylor).numpy(),
                               w - inverse_dense @ u - r, rtol=1e-4, atol=1e-5)


def test_huge_damping_reduces_woodfisher_to_magnitude(mlpnet_npz, fisher_data):
    reference = tfw.models.mlpnet(mlpnet_npz)
    tfw.one_shot_prune(reference, None, None, 0.8, method="magnitude", verbose=0)
    model = tfw.models.mlpnet(mlpnet_npz)
    tfw.one_shot_prune(model, fisher_data, LOSS, 0.8, num_gradients=32, damping=1e8, update=False, verbose=0)
    for a, b in zip(kernels(reference), kernels(model)):
        np.testing.assert_array_equal(a == 0, b == 0)


def test_update_false_only_zeroes_and_update_changes_kept_weights(mlpnet_npz, fisher_data):
    original = kernels(tfw.models.mlpnet(mlpnet_npz))
    plain = tfw.models.mlpnet(mlpnet_npz)
    tfw.one_shot_prune(plain, fisher_data, LOSS, 0.5, num_gradients=32, update=False, verbose=0)
    for old, new in zip(original, kernels(plain)):
        np.testing.assert_array_equal(new[new != 0], old[new != 0])
    updated = tfw.models.mlpnet(mlpnet_npz)
    tfw.one_shot_prune(updated, fisher_data, LOSS, 0.5, num_gradients=32, verbose=0)
    for a, b in zip(kernels(plain), kernels(updated)):
        np.testing.assert_array_equal(a == 0, b == 0)  # same scores, same mask
    assert not np.allclose(kernels(plain)[0], kernels(updated)[0])


def test_plain_model_keeps_its_zeros_between_steps(mlpnet_npz, fisher_data):
    """Steps on an unwrapped model must score and update with the zeros of earlier steps masked."""
    plain = tfw.models.mlpnet(mlpnet_npz)
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(tfw.models.mlpnet(mlpnet_npz))
    for model in (plain, wrapped):
        tfw.one_shot_prune(model, fisher_data, LOSS, 0.9, num_gradients=64, steps=3, verbose=0)
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    for a, b in zip(kernels(plain), [w.numpy() for w in stripped.weights]):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_multi_step_is_monotone_and_reaches_target(mlpnet_npz, fisher_data):
    model = tfw.models.mlpnet(mlpnet_npz)
    tfw.one_shot_prune(model, fisher_data, LOSS, 0.5, num_gradients=32, verbose=0)
    first = [k == 0 for k in kernels(model)]
    report = tfw.one_shot_prune(model, fisher_data, LOSS, 0.8, num_gradients=32, steps=3, fisher_block_size=100,
                                verbose=0)
    assert report.sparsity == pytest.approx(0.8, abs=1e-4)
    for was_zero, now in zip(first, kernels(model)):
        assert np.all(now[was_zero] == 0)
    assert tfw.one_shot_prune(model, fisher_data, LOSS, 0.8, method="woodtaylor", num_gradients=32, damping=0.1,
                              verbose=0).sparsity == pytest.approx(0.8, abs=1e-4)


def numpy_one_shot(kernels, grads, method, block, sparsity, damping, order="flat"):
    """A dense NumPy OBS event: per-block F = λI + GᵀG/m, scores, one global threshold, update, mask.
    ``order='filter'``: each block is max(1, block // s) consecutive output units (kernel columns of s weights)."""
    w = np.concatenate([k.ravel() for k in kernels]).astype(np.float64)
    g = grads.astype(np.float64)
    d = w.size
    sizes = [k.size for k in kernels]
    if block == "model":
        blocks = [np.arange(d)]
    elif order == "filter":
        blocks, start = [], 0
        for kernel in kernels:
            units = start + np.arange(kernel.size).reshape(-1, kernel.shape[-1]).T  # row j: unit j's entries
            per = max(1, block // units.shape[1])
            blocks += [units[j:j + per].ravel() for j in range(0, len(units), per)]
            start += kernel.size
    else:
        blocks, start = [], 0
        for size in sizes:
            step = size if block is None else block
            blocks += [np.arange(start + s, start + min(s + step, size)) for s in range(0, size, step)]
            start += size
    inverse = np.zeros((d, d))
    for idx in blocks:
        inverse[np.ix_(idx, idx)] = np.linalg.inv(damping * np.eye(idx.size) + g[:, idx].T @ g[:, idx] / len(g))
    if method == "diagonal_fisher":
        score = 0.5 * w ** 2 * (damping + (g ** 2).mean(0))
    else:
        score = w ** 2 / (2 * np.diag(inverse))
    pruned = np.zeros(d, bool)
    pruned[np.argsort(score, kind="stable")[:int(round(sparsity * d))]] = True
    if method == "woodfisher":
        w = w - inverse @ np.where(pruned, w / np.diag(inverse), 0.0)
    return np.where(pruned, 0.0, w), pruned


@pytest.mark.parametrize("method,block,order", [pytest.param("woodfisher", None, "flat", marks=pytest.mark.slow),
                                                pytest.param("woodfisher", "model", "flat", marks=pytest.mark.slow),
                                                ("woodfisher", 7, "flat"),
                                                ("woodfisher", 12, "filter"),
                                                pytest.param("diagonal_fisher", None, "flat", marks=pytest.mark.slow)])
def test_one_shot_event_equals_numpy_obs_on_a_small_model(rng, method, block, order):
    """Gradients (a plain per-sample loop), scores, the global selection and the OBS update against NumPy."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, activation="tanh", name="a"),
                              keras.layers.Dense(3, name="b")])
    x, y = rng.normal(size=(40, 6)).astype("float32"), rng.integers(0, 3, 40)
    weights = tfw.find_prunable_weights(model)
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = LOSS(y[i:i + 1], model(x[i:i + 1], training=False))
        rows.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, [w.variable for w in weights])]))
    expected, pruned = numpy_one_shot([w.variable.numpy() for w in weights], np.stack(rows), method, block, 0.6, 1e-2,
                                      order)
    report = tfw.one_shot_prune(model, tf.data.Dataset.from_tensor_slices((x, y)), LOSS, 0.6, method=method,
                                num_gradients=40, fisher_block_size=block, fisher_block_order=order, damping=1e-2,
                                shuffle_buffer=0, verbose=0)
    got = np.concatenate([w.variable.numpy().ravel() for w in weights])
    np.testing.assert_array_equal(got == 0, pruned)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert [layer.zeros for layer in report.layers] == [int(pruned[:30].sum()), int(pruned[30:].sum())]


def test_filter_order_warns_when_a_unit_is_larger_than_the_chunk(rng):
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(5, name="a"), keras.layers.Dense(3, name="b")])
    data = tf.data.Dataset.from_tensor_slices((rng.normal(size=(8, 6)).astype("float32"), rng.integers(0, 3, 8)))
    with pytest.warns(RuntimeWarning, match=r"the output units of a/kernel \(6\), b/kernel \(5\) have more weights "
                                            r"than fisher_block_size=4"):
        tfw.one_shot_prune(model, data, LOSS, 0.5, num_gradients=8, fisher_block_size=4, fisher_block_order="filter",
                           verbose=0)


def test_tfmot_wrapped_model_gets_masks(mlpnet_npz, fisher_data):
    base = tfw.models.mlpnet(mlpnet_npz)
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(base)
    tfw.one_shot_prune(wrapped, fisher_data, LOSS, 0.75, num_gradients=32, verbose=0)
    for layer in wrapped.layers:
        for weight, mask, _ in layer.pruning_vars:
            np.testing.assert_array_equal(mask.numpy(), (weight.numpy() != 0).astype("float32"))
    masks = np.concatenate([m.numpy().ravel() for layer in wrapped.layers for _, m, _ in layer.pruning_vars])
    assert 1 - masks.mean() == pytest.approx(0.75, abs=1e-4)
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    assert np.mean(np.concatenate([k.ravel() for k in stripped.get_weights()]) == 0) == pytest.approx(0.75, 1e-3)


def test_progress_and_table_are_printed_and_silenced(mlpnet_npz, fisher_data, capsys):
    tfw.one_shot_prune(tfw.models.mlpnet(mlpnet_npz), fisher_data, LOSS, 0.5, num_gradients=16, verbose=1)
    out = capsys.readouterr().out
    assert "fc3/kernel" in out and "woodfisher (global, 1 step)" in out
    tfw.one_shot_prune(tfw.models.mlpnet(mlpnet_npz), fisher_data, LOSS, 0.5, num_gradients=16, verbose=0)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "0.5", float("nan")])
def test_bad_sparsity(bad, mlpnet_npz, fisher_data):
    with pytest.raises(ValueError, match="target_sparsity"):
        tfw.one_shot_prune(tfw.models.mlpnet(mlpnet_npz), fisher_data, LOSS, bad, verbose=0)


def test_bad_arguments(mlpnet_npz, fisher_data):
    model = tfw.models.mlpnet(mlpnet_npz)
    for kwargs, message in [(dict(damping=0.0), "damping"), (dict(damping=-1e-3), "damping"),
                            (dict(method="obs"), "method"), (dict(mode="joint"), "mode"),
                            (dict(steps=0), "steps"), (dict(num_gradients=0), "num_gradients"),
                            (dict(fisher_block_size=0), "fisher_block_size")]:
        with pytest.raises(ValueError, match=message):
            tfw.one_shot_prune(model, fisher_data, LOSS, 0.5, verbose=0, **kwargs)
    with pytest.raises(ValueError, match="needs a Fisher dataset"):
        tfw.one_shot_prune(model, None, LOSS, 0.5, verbose=0)
    with pytest.raises(ValueError, match="empty"):
        tfw.one_shot_prune(model, fisher_data.take(0), LOSS, 0.5, verbose=0)
    with pytest.raises(ValueError, match="too small"):
        tfw.one_shot_prune(model, fisher_data.take(10), LOSS, 0.5, num_gradients=20, verbose=0)
    with pytest.warns(RuntimeWarning, match="rank one"):
        tfw.one_shot_prune(tfw.models.mlpnet(mlpnet_npz), fisher_data, LOSS, 0.1, num_gradients=1, verbose=0)
    with pytest.warns(RuntimeWarning, match="larger than every prunable tensor"):
        tfw.one_shot_prune(tfw.models.mlpnet(mlpnet_npz), fisher_data, LOSS, 0.1, num_gradients=4,
                           fisher_block_size=10 ** 6, verbose=0)


def test_nan_weights_give_clear_error(mlpnet_npz, fisher_data):
    model = tfw.models.mlpnet(mlpnet_npz)
    kernel = model.layers[1].kernel
    kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0]], [np.nan]))
    with pytest.raises(ValueError, match="NaN"):
        tfw.one_shot_prune(model, fisher_data, LOSS, 0.5, num_gradients=8, verbose=0)


def test_models_that_cannot_be_pruned():
    no_prunable = keras.Sequential([keras.Input((4,)), keras.layers.Activation("relu"), keras.layers.Flatten()])
    with pytest.raises(ValueError, match="no prunable layers"):
        tfw.one_shot_prune(no_prunable, None, None, 0.5, method="magnitude", verbose=0)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    unbuilt = Subclassed()
    with pytest.raises(ValueError, match="not built"):
        tfw.one_shot_prune(unbuilt, None, None, 0.5, method="magnitude", verbose=0)
    with pytest.raises(ValueError, match="tf_keras Model"):
        tfw.one_shot_prune(object(), None, None, 0.5, method="magnitude", verbose=0)

    class SubclassedWrapped(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = tfmot.sparsity.keras.prune_low_magnitude(keras.layers.Dense(3))

        def call(self, x):
            return self.dense(x)

    wrapped = SubclassedWrapped()
    wrapped(np.zeros((1, 4), "float32"))
    data = tf.data.Dataset.from_tensor_slices((np.ones((8, 4), "float32"), np.zeros(8, "int64")))
    with pytest.raises(ValueError, match="not a Sequential or functional model"):
        tfw.one_shot_prune(wrapped, data, LOSS, 0.5, num_gradients=4, verbose=0)


@pytest.mark.slow
def test_subclassed_model_prunes_when_built(rng):
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.hidden = keras.layers.Dense(16, activation="relu")
            self.out = keras.layers.Dense(3)

        def call(self, x, training=False):
            return self.out(self.hidden(x))

    net = Net()
    net(np.zeros((1, 5), "float32"))
    data = tf.data.Dataset.from_tensor_slices((rng.normal(size=(64, 5)).astype("float32"), rng.integers(0, 3, 64)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = tfw.one_shot_prune(net, data.batch(16), LOSS, 0.5, num_gradients=32, verbose=0)
    assert report.sparsity == pytest.approx(0.5, abs=1e-2)


def test_step_sparsities_are_geometric_in_density():
    from tf_woodfisher.pruning import step_sparsities

    steps = step_sparsities(0.0, 0.99, 2)
    assert steps == pytest.approx([0.9, 0.99])  # density 1 → 0.1 → 0.01
    assert step_sparsities(0.5, 0.875, 2) == pytest.approx([0.75, 0.875])  # density 0.5 → 0.25 → 0.125
    assert step_sparsities(0.9, 0.5, 2) == [0.5, 0.5]  # already sparser: nothing to add
