"""tfw3.one_shot_prune(method='obc' | 'sparsegpt'): each Keras 3 kernel's matrix view against the layer's own output,
the same masks, weights and report as the tf_keras path on the same weights (tf_keras in a subprocess), N:M,
PrunedModel masks, and the layers the methods cannot reconstruct."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_woodfisher.keras3 as tfw3
from tf_woodfisher import compat
from tf_woodfisher.keras3 import layerwise

L = keras.layers
WORKER = pathlib.Path(__file__).with_name("_layerwise_worker.py")
_spec = importlib.util.spec_from_file_location("_layerwise_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

KERNEL_LAYERS = {
    "dense": (lambda: L.Dense(5, use_bias=False), (7,)),
    "dense_sequence": (lambda: L.Dense(5, use_bias=False), (3, 7)),
    "einsum": (lambda: L.EinsumDense("abc,cde->abde", output_shape=(3, 2, 4)), (3, 6)),
    "conv1d_causal": (lambda: L.Conv1D(4, 3, padding="causal", dilation_rate=2, use_bias=False), (10, 3)),
    "conv2d_same_strided": (lambda: L.Conv2D(4, 3, strides=2, padding="same", use_bias=False), (9, 9, 3)),
    "conv2d_dilated": (lambda: L.Conv2D(3, 2, dilation_rate=2, use_bias=False), (8, 8, 2)),
    "conv3d": (lambda: L.Conv3D(2, 2, strides=(1, 2, 1), use_bias=False), (4, 5, 4, 2)),
    "depthwise": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False), (6, 6, 3)),
    "depthwise1d": (lambda: L.DepthwiseConv1D(3, depth_multiplier=2, padding="same", use_bias=False), (9, 3)),
    "depthwise1d_strided": (lambda: L.DepthwiseConv1D(3, depth_multiplier=2, strides=2, padding="same",
                                                      use_bias=False), (9, 3)),
    "separable2d": (lambda: L.SeparableConv2D(4, 3, depth_multiplier=2, use_bias=False), (7, 7, 3)),
    "separable1d": (lambda: L.SeparableConv1D(4, 3, padding="same", dilation_rate=2, use_bias=False), (9, 3)),
}


def _unequal_depthwise_strides_run():
    """Whether TensorFlow's depthwise convolution takes unequal row and column strides here (Keras 3's strided
    DepthwiseConv1D is a 2D one with strides (1, s)): its CPU kernel without oneDNN refuses them."""
    try:
        tf.nn.depthwise_conv2d(tf.ones([1, 1, 5, 2]), tf.ones([1, 3, 2, 1]), [1, 1, 2, 1], "SAME")
        return True
    except tf.errors.InvalidArgumentError:
        return False


UNEQUAL_STRIDES = pytest.mark.skipif(
    not _unequal_depthwise_strides_run(),
    reason="Keras 3's strided DepthwiseConv1D does not run on this CPU (TensorFlow's depthwise kernel without "
           "oneDNN: 'only supports equal length strides in the row and column dimensions')")


@pytest.mark.parametrize("kind", [pytest.param(kind, marks=[UNEQUAL_STRIDES] if kind == "depthwise1d_strided" else [])
                                  for kind in KERNEL_LAYERS])
def test_kernel_features_times_matrix_reproduce_the_keras3_layer(kind):
    """X (im2col etc.) @ Wᵀ of every kernel equals the Keras 3 layer's own output: the matrix views are right."""
    make, shape = KERNEL_LAYERS[kind]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input(shape), make()])
    layer = model.layers[-1]
    kernels = layerwise.find_kernels(tfw3.find_prunable_weights(model), "obc", explicit=False)
    assert len(kernels) == len(layer.trainable_weights)
    x = tf.random.stateless_normal((2,) + shape, seed=(1, 2))
    seen = []
    with compat.capture_call_inputs(layer, seen.append):
        output = model(x).numpy()
    for kernel in kernels:
        W = kernel.to_matrix(kernel.target.variable.numpy())
        np.testing.assert_allclose(kernel.from_matrix(W), kernel.target.variable.numpy())
        X = kernel.features(seen[0]).numpy()
        y = np.einsum("gnc,grc->ngr", X, W)  # (n, G, rows)
        if isinstance(kernel, layerwise.shared._DepthwiseKernel) and \
                isinstance(layer, (L.SeparableConv1D, L.SeparableConv2D)):  # the depthwise half's own output
            depthwise = layer.depthwise_kernel
            expected = layerwise.shared._depthwise(layer, seen[0], depthwise.value, tuple(depthwise.shape)).numpy()
            np.testing.assert_allclose(y.reshape(expected.shape), expected, atol=1e-5)
        else:
            np.testing.assert_allclose(y.reshape(output.shape), output, atol=1e-5)


CASES = [("image", 0.75, {"method": "obc"}),
         ("image", 0.75, {"method": "sparsegpt"}),
         ("image", 0.5, {"method": "sparsegpt", "sparsity_m_by_n": (2, 4), "layers": ["conv", "dense"]}),
         ("sequence", 0.7, {"method": "obc"}),
         ("sequence", 0.6, {"method": "sparsegpt", "mode": "layerwise", "reconstruction_target": "inputs"}),
         ("sequence", 0.5, {"method": "obc", "sparsity_m_by_n": (2, 4)})]


KERAS3_NAME = {"depthwise/depthwise_kernel": "depthwise/kernel"}  # DepthwiseConv2D's kernel, in tf_keras and Keras 3


def calibration(kind, samples=256):
    x = np.random.default_rng(1).normal(size=(samples,) + worker.SHAPES[kind])
    return np.maximum(x, 0).astype(np.float32) if kind == "image" else x.astype(np.float32)


@pytest.mark.slow
def test_obc_and_sparsegpt_give_the_same_masks_weights_and_errors_as_the_tf_keras_path(tmp_path):
    arrays, results = {f"x_{kind}": calibration(kind) for kind in worker.SHAPES}, []
    for i, (kind, sparsity, options) in enumerate(CASES):
        keras.utils.set_random_seed(i)
        model = worker.build(keras, kind)
        arrays[f"case_{i}"] = np.array(json.dumps({"kind": kind, "sparsity": sparsity, "options": options}))
        arrays.update({f"case_{i}/weight_{j}": w for j, w in enumerate(model.get_weights())})
        report = tfw3.one_shot_prune(model, tf.data.Dataset.from_tensor_slices(arrays[f"x_{kind}"]), None, sparsity,
                                     verbose=0, calibration_samples=256, **options)
        results.append((model.get_weights(), worker.summary(report)))
    np.savez(tmp_path / "in.npz", **arrays)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)
    done = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    old = np.load(tmp_path / "out.npz")
    for i, ((kind, sparsity, options), (weights, new_summary)) in enumerate(zip(CASES, results)):
        reported = json.loads(str(old[f"case_{i}/report"]))
        old_summary = {key: {KERAS3_NAME.get(name, name): value for name, value in reported[key].items()}
                       for key in ("layers", "errors")}
        assert list(new_summary["layers"]) == list(old_summary["layers"]), (kind, options)
        assert new_summary["layers"] == pytest.approx(old_summary["layers"], abs=1e-9), (kind, options)
        # float32 reconstruction errors of two frameworks' kernels (oneDNN or Eigen): equal to about 1e-5 relative
        assert new_summary["errors"] == pytest.approx(old_summary["errors"], rel=1e-4, abs=1e-7), (kind, options)
        if options.get("layers") is None and options.get("sparsity_m_by_n") is None:
            assert new_summary["sparsity"] == pytest.approx(sparsity, abs=2e-3)
        changed = 0
        for j, new in enumerate(weights):
            start, pruned = arrays[f"case_{i}/weight_{j}"], old[f"case_{i}/weight_{j}"]
            np.testing.assert_array_equal(new == 0, pruned == 0, err_msg=f"{kind} {options} weight {j}")
            # reconstructed weights ~0.3: float32 noise of the two frameworks' kernels, accumulated layer by layer
            np.testing.assert_allclose(new, pruned, rtol=0, atol=2e-5, err_msg=f"{kind} {options} weight {j}")
            changed += not np.array_equal(new, start)
        assert changed >= 2, (kind, options)  # pruned and reconstructed


@pytest.mark.slow
def test_two_four_on_keras3_kernels_and_pruned_model_masks():
    keras.utils.set_random_seed(0)
    model = worker.build(keras, "sequence")
    pruned = tfw3.prune(model, tfw3.KeepMasks())
    x = tf.data.Dataset.from_tensor_slices(calibration("sequence"))
    report = tfw3.one_shot_prune(pruned, x, None, 0.5, method="sparsegpt", sparsity_m_by_n=(2, 4), verbose=0,
                                 calibration_samples=256)
    assert report.sparsity == pytest.approx(0.5)
    targets = tfw3.find_prunable_weights(pruned)
    assert {t.name for t in targets} >= {"mha/query/kernel", "mha/attention_output/kernel", "einsum/kernel"}
    for target, kernel in zip(targets, layerwise.find_kernels(targets, "sparsegpt", explicit=False)):
        mask, weight = target.mask.numpy(), target.variable.numpy()
        np.testing.assert_array_equal(weight[mask == 0], 0)  # the PrunedModel's masks are the zeros
        outer, channels = kernel.group_axis()
        rows = kernel.to_matrix(mask)[0].reshape(-1, outer, channels)
        assert channels % 4 == 0 and np.all(rows.reshape(rows.shape[0], outer, -1, 4).sum(-1) == 2), target.name
    with pytest.raises(ValueError, match="the target sparsity must be 0.5"):
        tfw3.one_shot_prune(model, x, None, 0.6, method="obc", sparsity_m_by_n=(2, 4), verbose=0)


def test_layers_the_methods_cannot_reconstruct_are_named():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), dtype="int32")
    h = L.Embedding(20, 4, name="emb")(inputs)
    h = L.Conv1DTranspose(3, 2, name="deconv")(h)
    model = keras.Model(inputs, L.Dense(2, name="fc")(L.Flatten()(h)))
    x = tf.data.Dataset.from_tensor_slices(np.random.default_rng(0).integers(0, 20, (64, 6)).astype(np.int32))
    with pytest.raises(ValueError, match=r"method 'obc' cannot prune 'emb/embeddings' \(Embedding\)"):
        tfw3.one_shot_prune(model, x, None, 0.5, method="obc", layers=["emb"], verbose=0)
    with pytest.raises(ValueError, match=r"cannot prune 'deconv/kernel' \(Conv1DTranspose\).*transposed"):
        tfw3.one_shot_prune(model, x, None, 0.5, method="sparsegpt", layers="deconv", verbose=0)
    with pytest.warns(RuntimeWarning, match=r"leaves dense.*emb/embeddings \(Embedding.*deconv/kernel"):
        report = tfw3.one_shot_prune(model, x, None, 0.5, method="sparsegpt", calibration_samples=64, verbose=0)
    assert [layer.name for layer in report.layers] == ["fc/kernel"] and report.sparsity == pytest.approx(0.5)
    grouped = keras.Sequential([keras.Input((5, 5, 4)), L.Conv2D(4, 3, groups=2, name="grouped")])
    with pytest.raises(ValueError, match=r"'grouped/kernel' \(Conv2D\): grouped convolution"):
        tfw3.one_shot_prune(grouped, tf.data.Dataset.from_tensor_slices(np.ones((8, 5, 5, 4), np.float32)), None,
                            0.5, method="obc", layers="grouped", verbose=0)
    with pytest.raises(ValueError, match="layer-wise methods need calibration inputs"):
        tfw3.one_shot_prune(model, None, None, 0.5, method="obc", layers="fc", verbose=0)
