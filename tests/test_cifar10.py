"""CIFAR-10 loader, the authors' ResNet-20 and BatchNorm recalibration (issue #12)."""
import hashlib
import os
import pickle
import shutil

import numpy as np
import pytest

import tf_woodfisher as tfw  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TensorFlow is imported)
import tensorflow as tf  # noqa: E402
import tensorflow_model_optimization as tfmot  # noqa: E402
import tf_keras as keras  # noqa: E402

from tf_woodfisher import data, models  # noqa: E402
from tf_woodfisher.batchnorm import batchnorm_layers, recalibrate_batchnorm  # noqa: E402


def _subset(cifar10_dir):
    return os.path.join(cifar10_dir, data.CIFAR10_SUBSET_FILE)


# ------------------------------------------------------------------------------------------------- loader

def test_subset_shapes_dtypes_range_and_labels(cifar10_dir):
    images, labels = data.read_cifar10_subset(_subset(cifar10_dir), "train")
    assert images.shape == (5085, 32, 32, 3) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [517, 524, 490, 493, 537, 475, 503, 516, 529, 501]
    assert labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # data_batch_1's first labels
    x_test, y_test = data.read_cifar10_subset(_subset(cifar10_dir), "test")
    assert x_test.shape == (1017, 32, 32, 3)
    assert np.bincount(y_test).tolist() == [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]


def test_load_cifar10_normalisation_and_shuffle(cifar10_dir):
    x, y = data.load_cifar10("test", cifar10_dir)
    raw, raw_labels = data.load_cifar10_arrays("test", cifar10_dir)
    assert x.dtype == np.float32 and x.shape == raw.shape and x.shape[1:] == (32, 32, 3)
    assert y.dtype == np.int64 and np.array_equal(y, raw_labels)
    assert x.min() == -1.0 and x.max() == 1.0  # (x/255 − 0.5)/0.5
    np.testing.assert_allclose(x[:8], raw[:8] / 127.5 - 1.0, atol=1e-6)
    xs, ys = data.load_cifar10("test", cifar10_dir, shuffle_seed=0)
    order = np.random.default_rng(0).permutation(len(y))
    assert np.array_equal(ys, y[order]) and np.array_equal(xs[:4], x[order[:4]])


def test_env_var_and_dataset(cifar10_dir, monkeypatch):
    monkeypatch.setenv("TFW_CIFAR10_DIR", cifar10_dir)
    x, y = next(iter(data.cifar10_dataset("test").batch(4)))
    assert x.shape == (4, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int64
    assert y.numpy().tolist() == [3, 8, 8, 0]  # test_batch's first labels


def test_missing_folders_and_bad_split(tmp_path, monkeypatch):
    monkeypatch.setenv("TFW_CIFAR10_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="TFW_CIFAR10_DIR"):
        data.load_cifar10("test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_cifar10("test", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="cifar10_subset.npz"):
        data.load_cifar10("test", str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        data.load_cifar10("valid", str(tmp_path))


def test_truncated_or_corrupted_subset_is_refused(cifar10_dir, tmp_path):
    raw = open(_subset(cifar10_dir), "rb").read()
    cases = {"truncated": raw[: len(raw) // 2], "flipped": bytearray(raw)}
    cases["flipped"][len(raw) // 3] ^= 0xFF  # inside x_train's compressed bytes
    for name, content in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / data.CIFAR10_SUBSET_FILE).write_bytes(bytes(content))
        with pytest.raises(ValueError, match=r"cifar10_subset\.npz.*(truncated or corrupted|md5)"):
            data.load_cifar10("train", str(folder))
    # A readable npz whose content differs from the shared subset: one pixel changed.
    with np.load(_subset(cifar10_dir)) as arrays:
        changed = {k: arrays[k].copy() for k in arrays.files}
    changed["x_test"][0, 0, 0, 0] ^= 1
    (tmp_path / "changed").mkdir()
    np.savez(tmp_path / "changed" / data.CIFAR10_SUBSET_FILE, **changed)
    with pytest.raises(ValueError, match="x_test has md5"):
        data.load_cifar10("test", str(tmp_path / "changed"))
    assert data.load_cifar10("test", str(tmp_path / "changed"), verify=False)[0].shape == (1017, 32, 32, 3)


def _write_fake_batches(folder, rows=6):
    """Official-format python batches (dict of bytes keys, CHW uint8 rows, list labels), protocol 2."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    content = {}
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        batch = {b"batch_label": name.encode(), b"labels": rng.integers(0, 10, rows).tolist(),
                 b"data": rng.integers(0, 256, (rows, 3072), dtype=np.uint8),
                 b"filenames": [f"img_{i}.png".encode() for i in range(rows)]}
        raw = pickle.dumps(batch, protocol=2)
        (folder / name).write_bytes(raw)
        content[name] = (batch, hashlib.md5(raw).hexdigest())
    return content


def test_full_batches_are_md5_checked(tmp_path, monkeypatch, cifar10_dir):
    content = _write_fake_batches(tmp_path / data.CIFAR10_BATCHES_DIR)
    shutil.copy(_subset(cifar10_dir), tmp_path)  # the batches win over the subset
    with pytest.raises(ValueError,
                       match=r"data_batch_1: md5 \w+ .* not the official c99cafc1.*cifar-10-python\.tar\.gz"):
        data.load_cifar10("train", str(tmp_path))
    with pytest.raises(ValueError, match=r"test_batch: md5 .* official 40351d58"):
        data.load_cifar10("test", str(tmp_path))
    monkeypatch.setattr(data, "CIFAR10_BATCH_MD5", {name: md5 for name, (_, md5) in content.items()})
    images, labels = data.load_cifar10_arrays("train", str(tmp_path))
    assert images.shape == (30, 32, 32, 3) and images.dtype == np.uint8
    first = content["data_batch_1"][0]
    assert np.array_equal(images[:6], first[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    assert labels[:6].tolist() == first[b"labels"] and labels.dtype == np.int64
    x, y = data.load_cifar10("test", str(tmp_path))
    assert x.shape == (6, 32, 32, 3) and y.tolist() == content["test_batch"][0][b"labels"]
    # A copy cut short (as the public copies are) fails the check; unchecked, it fails to unpickle.
    batch_1 = tmp_path / data.CIFAR10_BATCHES_DIR / "data_batch_1"
    batch_1.write_bytes(batch_1.read_bytes()[:5000])
    with pytest.raises(ValueError, match="data_batch_1: md5 .*corrupted or truncated"):
        data.load_cifar10("train", str(tmp_path))
    with pytest.raises(ValueError, match="data_batch_1 is not a readable CIFAR-10 python batch"):
        data.load_cifar10("train", str(tmp_path), verify=False)


def test_incomplete_or_hostile_batches(tmp_path):
    _write_fake_batches(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data.load_cifar10("train", str(tmp_path))

    class Hostile:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": Hostile(), b"labels": []}))
    with pytest.raises(ValueError, match="unexpected object"):
        data.load_cifar10("test", str(tmp_path), verify=False)


# ------------------------------------------------------------------------------------------------ ResNet-20

def test_reference_resnet20_count(cifar10_dir, resnet20_npz):
    x, y = data.load_cifar10("test", cifar10_dir)
    x, y = x[:1017], y[:1017]  # the subset's test images (the first 1,017 of test_batch)
    model = models.resnet20_cifar(resnet20_npz)
    correct = int((model.predict(x, batch_size=512, verbose=0).argmax(1) == y).sum())
    assert correct == 924  # shared/models/README.md: 924 of 1,017 (90.86%)


def test_resnet20_structure_and_keys(resnet20_npz):
    model = models.resnet20_cifar()  # untrained
    assert model(np.zeros((2, 32, 32, 3), np.float32)).shape == (2, 10)
    with np.load(resnet20_npz) as arrays:
        shapes = {k: arrays[k].shape for k in arrays.files}
    keyed = models.named_weights(model)
    assert len(keyed) == 107 and {k: tuple(v.shape) for k, v in keyed.items()} == shapes
    assert sum(int(np.prod(v.shape)) for v in model.trainable_variables) == 272474
    assert sum(int(np.prod(v.shape)) for v in model.non_trainable_variables) == 1568
    convs = models.resnet20_stage_convolutions(model)
    assert [c.name for c in convs] == list(models.RESNET20_STAGE_CONV_NAMES) and len(convs) == 18
    assert all(c.kernel_size == (3, 3) and c.padding == "valid" for c in convs)
    assert [c.strides for c in convs].count((2, 2)) == 2  # layer2_0_conv1, layer3_0_conv1
    assert model.get_layer("layer2_0_pad1").padding == ((1, 1), (1, 1))  # symmetric before stride 2


def test_wrong_weights_name_the_key(resnet20_npz):
    with pytest.raises(ValueError, match="fc_kernel.*shape \\(64, 10\\).*\\(64, 100\\)"):
        models.resnet20_cifar(resnet20_npz, num_classes=100)
    with np.load(resnet20_npz) as arrays:
        weights = {k: arrays[k] for k in arrays.files}
    model = models.resnet20_cifar()
    before = [v.numpy() for v in model.variables]
    with pytest.raises(ValueError, match="lacks the key.*layer3_2_bn2_beta"):
        models.load_npz_weights(model, {k: v for k, v in weights.items() if k != "layer3_2_bn2_beta"})
    with pytest.raises(ValueError, match="extra_kernel"):
        models.load_npz_weights(model, {**weights, "extra_kernel": np.zeros(3)})
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(before, model.variables))  # nothing assigned


# -------------------------------------------------------------------------------------- BN recalibration

def _small_bn_model():
    """conv → BN → ReLU → conv → BN → Dropout → pool → dense, with stored statistics far from the data's."""
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, use_bias=False, name="c1")(inputs)
    h = keras.layers.BatchNormalization(epsilon=1e-5, name="b1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(5, 3, name="c2")(h)
    h = keras.layers.BatchNormalization(epsilon=1e-3, name="b2")(h)
    h = keras.layers.Dropout(0.5)(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="fc")(keras.layers.GlobalAveragePooling2D()(h)))
    rng = np.random.default_rng(3)
    for layer in ("b1", "b2"):
        bn = model.get_layer(layer)
        bn.gamma.assign(rng.uniform(0.5, 1.5, bn.gamma.shape))
        bn.beta.assign(rng.normal(size=bn.beta.shape))
        bn.moving_mean.assign(np.full(bn.moving_mean.shape, 7.0))
        bn.moving_variance.assign(np.full(bn.moving_variance.shape, 9.0))
    return model


def _expected_statistics(model, batches):
    """NumPy: per-batch mean / unbiased variance of each BN input with BN in training mode, averaged."""
    stats = {"b1": [], "b2": []}
    for xb in batches:
        h = model.get_layer("c1")(xb).numpy().astype(np.float64)
        stats["b1"].append((h.mean((0, 1, 2)), h.var((0, 1, 2), ddof=1)))
        b1 = model.get_layer("b1")
        h = (h - h.mean((0, 1, 2))) / np.sqrt(h.var((0, 1, 2)) + b1.epsilon) * b1.gamma.numpy() + b1.beta.numpy()
        h = model.get_layer("c2")(np.maximum(h, 0).astype(np.float32)).numpy().astype(np.float64)
        stats["b2"].append((h.mean((0, 1, 2)), h.var((0, 1, 2), ddof=1)))
    return {k: (np.mean([m for m, _ in v], 0), np.mean([s for _, s in v], 0)) for k, v in stats.items()}


def _snapshot(variables):
    return {id(v): (v.name, v.numpy().tobytes()) for v in variables}


def _changed(before, variables):
    return sorted(v.name for v in variables if before[id(v)][1] != v.numpy().tobytes())


def test_recalibration_matches_numpy_and_changes_only_statistics():
    model = _small_bn_model()
    x = np.random.default_rng(4).normal(2.0, 3.0, (72, 6, 6, 3)).astype(np.float32)
    before = _snapshot(model.variables)
    result = recalibrate_batchnorm(model, (x, np.zeros(72)), num_batches=4, batch_size=16)
    assert (result.num_layers, result.num_batches, result.num_samples) == (2, 4, 64)
    assert result.layer_names == ("b1", "b2") and result.unreached == ()
    assert _changed(before, model.variables) == sorted(
        f"{b}/{s}:0" for b in ("b1", "b2") for s in ("moving_mean", "moving_variance"))
    expected = _expected_statistics(model, [x[i:i + 16] for i in range(0, 64, 16)])
    for name, (mean, variance) in expected.items():
        bn = model.get_layer(name)
        np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), variance, rtol=1e-4)
    # The same on a tf.data pipeline of (x, y), and on a nested model (the old statistics play no part).
    moved = [v.numpy() for v in model.non_trainable_variables]
    nested_inputs = keras.Input((6, 6, 3))
    nested = keras.Model(nested_inputs, keras.layers.Dropout(0.2)(model(nested_inputs)))
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(72))).batch(16)
    assert recalibrate_batchnorm(nested, dataset, num_batches=4).num_layers == 2
    for a, v in zip(moved, model.non_trainable_variables):
        np.testing.assert_allclose(v.numpy(), a, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_recalibration_of_tfmot_wrapped_model_touches_no_mask_step_or_optimizer():
    model = _small_bn_model()
    pruned = tfmot.sparsity.keras.prune_low_magnitude(
        model, pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, begin_step=0, frequency=1))
    pruned.compile(keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(32, 6, 6, 3)).astype(np.float32), rng.integers(0, 3, 32)
    pruned.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    assert [layer.name for layer in batchnorm_layers(pruned)] == ["b1", "b2"]
    optimizer_variables = pruned.optimizer.variables()
    before = _snapshot([*pruned.variables, *optimizer_variables])
    result = recalibrate_batchnorm(pruned, x, batch_size=16)
    assert result.num_layers == 2 and result.num_samples == 32
    assert _changed(before, pruned.variables) == sorted(
        f"b{i}/{s}:0" for i in (1, 2) for s in ("moving_mean", "moving_variance"))
    assert _changed(before, optimizer_variables) == []
    c1 = pruned.get_layer("prune_low_magnitude_c1").layer
    h = c1(x[:16]).numpy(), c1(x[16:]).numpy()
    np.testing.assert_allclose(pruned.get_layer("prune_low_magnitude_b1").layer.moving_mean.numpy(),
                               (h[0].mean((0, 1, 2)) + h[1].mean((0, 1, 2))) / 2, rtol=1e-4, atol=1e-5)


def test_resnet20_with_wrapped_stage_convolutions(resnet20_npz, cifar10_dir):
    model = models.resnet20_cifar(resnet20_npz)

    def wrap(layer):
        if layer.name in models.RESNET20_STAGE_CONV_NAMES:
            return tfmot.sparsity.keras.prune_low_magnitude(layer)
        return layer

    pruned = keras.models.clone_model(model, clone_function=wrap)  # shares the reference weights
    assert len(models.resnet20_stage_convolutions(pruned)) == 18
    x = data.read_cifar10_subset(_subset(cifar10_dir), "train")[0][:64] / np.float32(127.5) - 1
    before = _snapshot(pruned.variables)
    result = recalibrate_batchnorm(pruned, x, batch_size=32)
    assert (result.num_layers, result.num_batches) == (21, 2)
    assert all(name.split("/")[-1].startswith("moving_") for name in _changed(before, pruned.variables))


def test_recalibration_errors():
    no_bn = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no BatchNormalization"):
        recalibrate_batchnorm(no_bn, np.zeros((8, 4), np.float32))
    model = _small_bn_model()
    empty = np.zeros((0, 6, 6, 3), np.float32)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batchnorm(model, empty)
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batchnorm(model, tf.data.Dataset.from_tensor_slices(empty).batch(4))
    with pytest.raises(ValueError, match="batch it"):
        recalibrate_batchnorm(model, tf.data.Dataset.from_tensor_slices(np.ones((4, 6, 6, 3), np.float32)))
    with pytest.raises(ValueError, match="infinite"):
        recalibrate_batchnorm(model, tf.data.Dataset.from_tensor_slices(np.ones((4, 6, 6, 3), np.float32))
                              .batch(2).repeat())
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate_batchnorm(model, np.ones((4, 6, 6, 3), np.float32), num_batches=0)
    assert "call" not in vars(model.get_layer("b1"))  # no patched call left behind


# ------------------------------------------------------------------------------------------ weight selection

def test_paper_protocol_selection_changes_only_the_stage_convolutions(resnet20_npz, cifar10_dir):
    """layers= the 18 stage convolutions: only their kernels change, the threshold is global over them."""
    model = models.resnet20_cifar(resnet20_npz)
    x, y = data.load_cifar10("train", cifar10_dir)
    fisher = tf.data.Dataset.from_tensor_slices((x[:16], y[:16]))
    before = _snapshot(model.variables)
    report = tfw.one_shot_prune(model, fisher, keras.losses.SparseCategoricalCrossentropy(from_logits=True), 0.7,
                                layers=list(models.RESNET20_STAGE_CONV_NAMES), num_gradients=16, verbose=0)
    assert _changed(before, model.variables) == sorted(f"{n}/kernel:0" for n in models.RESNET20_STAGE_CONV_NAMES)
    kernels = [layer.kernel.numpy() for layer in models.resnet20_stage_convolutions(model)]
    assert np.mean(np.concatenate([k.ravel() for k in kernels]) == 0) == pytest.approx(0.7, abs=1e-5)
    assert len({round(float(np.mean(k == 0)), 2) for k in kernels}) > 3  # one global threshold, not per layer
    assert [layer.name for layer in report.layers] == [f"{n}/kernel" for n in models.RESNET20_STAGE_CONV_NAMES]
    # the same selection as a predicate and as layer objects
    for selection in (lambda m: lambda layer: layer.name in models.RESNET20_STAGE_CONV_NAMES,
                      models.resnet20_stage_convolutions):
        other = models.resnet20_cifar(resnet20_npz)
        tfw.one_shot_prune(other, None, None, 0.7, method="magnitude", layers=selection(other), verbose=0)
        zeros = [np.mean(layer.kernel.numpy() == 0) for layer in models.resnet20_stage_convolutions(other)]
        assert np.mean(zeros) > 0.5 and np.mean(other.get_layer("conv1").kernel.numpy() == 0) == 0
    with pytest.raises(ValueError, match="'layer9_\\*' matches no layer"):
        tfw.one_shot_prune(model, None, None, 0.7, method="magnitude", layers=["layer1_0_conv1", "layer9_*"],
                           verbose=0)
