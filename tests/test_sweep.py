"""one_shot_sweep: every point equals its own one_shot_prune run, the model is restored, BatchNorm recalibration."""
import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_woodfisher as tfw
import tensorflow as tf
import tf_keras as keras

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
SPARSITIES = (0.3, 0.8, 0.5)


def small_model(batchnorm=False):
    keras.utils.set_random_seed(3)
    layers = [keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="conv")]
    layers += [keras.layers.BatchNormalization(name="bn")] if batchnorm else []
    layers += [keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(3, name="dense")]
    model = keras.Sequential(layers)
    model.set_weights([w * 3 if w.ndim > 1 else w for w in model.get_weights()])  # non-trivial magnitudes
    return model


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(48, 8, 8, 1)).astype("float32"), rng.integers(0, 3, 48)
    return x, y, tf.data.Dataset.from_tensor_slices((x, y))


def all_values(model):
    return [v.numpy().copy() for v in model.variables]


SLOW = pytest.mark.slow  # the full suite runs every case; the fast tier a representative few


@pytest.mark.parametrize("settings", [
    pytest.param(dict(method="woodfisher", fisher_block_size=None), marks=SLOW),
    pytest.param(dict(method="woodfisher", fisher_block_size=7, mode="layerwise"), marks=SLOW),
    pytest.param(dict(method="woodtaylor", fisher_block_size=16), marks=SLOW),
    pytest.param(dict(method="diagonal_fisher"), marks=SLOW),
    dict(method="magnitude"),
    pytest.param(dict(method="woodfisher", fisher_block_size=10, steps=3), marks=SLOW),  # every point its own steps
    pytest.param(dict(method="woodfisher", fisher_block_size=8, sequential=True), marks=SLOW),
    pytest.param(dict(method="woodfisher", block_size=(1, 2), layers=["dense"]), marks=SLOW),
    dict(method="obc", calibration_samples=48),
])
def test_each_point_equals_its_own_one_shot_run(data, settings):
    x, y, dataset = data
    common = dict(num_gradients=24, damping=1e-3, shuffle_buffer=0, seed=5, verbose=0, **settings)
    if settings["method"] == "obc":
        common = dict(settings, verbose=0)
    model = small_model()
    before = all_values(model)
    seen = []

    def evaluate(m):
        seen.append([w.variable.numpy().copy() for w in tfw.find_prunable_weights(m)])
        return float(np.mean(m(x, training=False).numpy().argmax(1) == y))

    points = tfw.one_shot_sweep(model, dataset, LOSS, SPARSITIES, evaluate, **common)
    for got, after in zip(before, all_values(model)):  # the sweep leaves the model as it found it
        np.testing.assert_array_equal(got, after)
    assert [p.sparsity for p in points] == list(SPARSITIES)
    for point, kernels in zip(points, seen):
        reference = small_model()
        report = tfw.one_shot_prune(reference, dataset, LOSS, point.sparsity, **common)
        expected = [w.variable.numpy() for w in tfw.find_prunable_weights(reference)]
        for a, b in zip(kernels, expected):
            np.testing.assert_array_equal(a == 0, b == 0)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert point.report.sparsity == pytest.approx(report.sparsity)
        assert point.value == pytest.approx(float(np.mean(reference(x, training=False).numpy().argmax(1) == y)))
    assert points[0].report.sparsity == pytest.approx(0.3, abs=0.02)


@pytest.mark.slow
def test_statistics_are_computed_once_when_shareable(data, monkeypatch):
    from tf_woodfisher.pruning import pruner as pruner_module
    calls = []
    original = pruner_module.collect_gradient_columns
    monkeypatch.setattr(pruner_module, "collect_gradient_columns",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    _, _, dataset = data
    tfw.one_shot_sweep(small_model(), dataset, LOSS, SPARSITIES, lambda m: None, num_gradients=16, verbose=0)
    assert len(calls) == 1
    calls.clear()
    tfw.one_shot_sweep(small_model(), dataset, LOSS, SPARSITIES, lambda m: None, num_gradients=16, steps=2, verbose=0)
    assert len(calls) == 2 * len(SPARSITIES)


@pytest.mark.slow
def test_wrapped_model_masks_are_restored_and_set_at_each_point(data):
    x, y, dataset = data
    model = tfmot.sparsity.keras.prune_low_magnitude(small_model())
    model(x[:2])

    def evaluate(m):
        for layer in m.layers:
            for weight, mask, _ in getattr(layer, "pruning_vars", []):
                np.testing.assert_array_equal(mask.numpy(), (weight.numpy() != 0).astype("float32"))
        return 1 - np.mean(np.concatenate([mask.numpy().ravel() for layer in m.layers
                                           for _, mask, _ in getattr(layer, "pruning_vars", [])]))

    points = tfw.one_shot_sweep(model, dataset, LOSS, (0.25, 0.75), evaluate, num_gradients=16, verbose=0)
    assert [round(p.value, 2) for p in points] == [0.25, 0.75]
    masks = [mask.numpy() for layer in model.layers for _, mask, _ in getattr(layer, "pruning_vars", [])]
    assert all(np.all(mask == 1) for mask in masks)


@SLOW
def test_batchnorm_recalibration_option(data):
    x, y, dataset = data
    model = small_model(batchnorm=True)
    bn = model.get_layer("bn")
    plain = small_model(batchnorm=True)
    tfw.one_shot_prune(plain, dataset, LOSS, 0.6, num_gradients=16, verbose=0)
    report = tfw.one_shot_prune(model, dataset, LOSS, 0.6, num_gradients=16, verbose=0,
                                recalibrate_batchnorm=tf.data.Dataset.from_tensor_slices(x).batch(16))
    assert report.recalibration.layer_names == ("bn",) and report.recalibration.num_samples == 48
    assert report.as_dict()["recalibration"]["num_batches"] == 3
    for a, b in zip(model.get_layer("conv").get_weights(), plain.get_layer("conv").get_weights()):
        np.testing.assert_array_equal(a, b)  # the pruning is the same; only the statistics differ
    reference = small_model(batchnorm=True)
    tfw.one_shot_prune(reference, dataset, LOSS, 0.6, num_gradients=16, verbose=0)
    tfw.recalibrate_batchnorm(reference, tf.data.Dataset.from_tensor_slices(x).batch(16))
    np.testing.assert_allclose(bn.moving_mean.numpy(), reference.get_layer("bn").moving_mean.numpy(), rtol=1e-6)
    assert not np.allclose(bn.moving_variance.numpy(), plain.get_layer("bn").moving_variance.numpy())

    points = tfw.one_shot_sweep(small_model(batchnorm=True), dataset, LOSS, (0.6,),
                                lambda m: m.get_layer("bn").moving_mean.numpy().copy(), num_gradients=16, verbose=0,
                                recalibrate_batchnorm=tf.data.Dataset.from_tensor_slices(x).batch(16))
    np.testing.assert_allclose(points[0].value, bn.moving_mean.numpy(), rtol=1e-6)
    assert points[0].report.recalibration.num_batches == 3


def test_bad_sweep_arguments(data):
    _, _, dataset = data
    with pytest.raises(ValueError, match="at least one sparsity"):
        tfw.one_shot_sweep(small_model(), dataset, LOSS, [], lambda m: None, verbose=0)
    with pytest.raises(ValueError, match="sparsity"):
        tfw.one_shot_sweep(small_model(), dataset, LOSS, [0.5, 1.2], lambda m: None, verbose=0)
    with pytest.raises(TypeError, match="bogus"):
        tfw.one_shot_sweep(small_model(), dataset, LOSS, [0.5], lambda m: None, bogus=1)
    with pytest.raises(ValueError, match="no BatchNormalization"):
        tfw.one_shot_prune(small_model(), dataset, LOSS, 0.5, recalibrate_batchnorm=dataset.batch(4), verbose=0)


@SLOW
def test_cumulative_sweep_equals_successive_one_shot_runs(data):
    """Each point continues from the previous one (statistics recomputed): successive one_shot_prune calls."""
    x, y, dataset = data
    settings = dict(num_gradients=24, damping=1e-3, shuffle_buffer=0, fisher_block_size=16, verbose=0)
    model = small_model()
    before = all_values(model)
    seen = []
    points = tfw.one_shot_sweep(model, dataset, LOSS, (0.3, 0.5, 0.8), lambda m: seen.append(all_values(m)),
                                cumulative=True, **settings)
    for got, after in zip(before, all_values(model)):
        np.testing.assert_array_equal(got, after)
    reference = small_model()
    for point, values in zip(points, seen):
        tfw.one_shot_prune(reference, dataset, LOSS, point.sparsity, **settings)
        for a, b in zip(values, all_values(reference)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert point.report.sparsity == pytest.approx(point.sparsity, abs=0.02)
    independent = tfw.one_shot_sweep(small_model(), dataset, LOSS, (0.3, 0.5, 0.8), lambda m: all_values(m),
                                     **settings)
    assert not np.allclose(independent[2].value[0], seen[2][0])  # the path matters
    with pytest.raises(ValueError, match="non-decreasing"):
        tfw.one_shot_sweep(small_model(), dataset, LOSS, (0.5, 0.3), lambda m: None, cumulative=True, **settings)
