"""export_tflite on real MNIST models: sparse size, agreement, tfmot stripping, XNNPACK defects, bad input."""
import sys

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_woodfisher as tfw
import tensorflow as tf
import tf_keras as keras
from tf_woodfisher import tflite
from tf_woodfisher.export import Interpreter, TFLiteVerificationError, _input_array, export_tflite

# XNNPACK's symptom for the defects below depends on the CPU: on AVX2 ones wrong outputs or a failed prepare,
# on others (CI's) a segfault in allocate_tensors, which the child process running the check turns into an error.
CRASHED = r"crashed the interpreter process \(SIG"


def prune_kernels(model, sparsity, block=1):
    """Zero the smallest-magnitude ``sparsity`` share of each Dense kernel [in, out], in blocks of
    ``block`` consecutive input rows (Keras block_size=(block, 1), i.e. TFLite 1 x block)."""
    weights = []
    for w in model.get_weights():
        if w.ndim == 2:
            scores = np.abs(w).reshape(w.shape[0] // block, block, w.shape[1]).mean(axis=1)
            w = w * np.repeat(scores > np.quantile(scores, sparsity), block, axis=0)
        weights.append(w)
    model.set_weights(weights)
    return model


def copy_pruned(model, sparsity, block=1):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return prune_kernels(clone, sparsity, block)


def tflite_outputs(path, x):
    """Outputs of the .tflite at ``path`` on ``x``, with the default delegates, as a user runs it."""
    interpreter = Interpreter(model_path=str(path))
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


@pytest.fixture(scope="module")
def mlpnet90(mlpnet_npz):
    """The reference MLPNet with 90% of each kernel zeroed by magnitude (one shot, no retraining)."""
    return prune_kernels(tfw.models.mlpnet(mlpnet_npz), 0.9)


@pytest.fixture(scope="module")
def mlp64(mnist_flat):
    """784 → 64 → 10, one epoch on the 5k training subset."""
    (x, y), _ = mnist_flat
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(10)])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    return model


def test_sparse_mlpnet_is_small_and_agrees_on_test_set(mlpnet90, mnist_flat, tmp_path):
    _, (x_test, _) = mnist_flat
    path = tmp_path / "mlpnet90.tflite"
    result = export_tflite(mlpnet90, path, check_inputs=x_test)
    assert result.bytes == path.stat().st_size
    assert result.bytes <= 0.30 * result.dense_bytes
    assert result.num_checked == len(x_test) == 10000
    assert result.argmax_agreement == 1.0
    assert "default delegates" in result.interpreter
    # The written file, run independently with default delegates, gives the Keras argmax everywhere.
    keras_argmax = mlpnet90.predict(x_test, verbose=0).argmax(1)
    np.testing.assert_array_equal(tflite_outputs(path, x_test).argmax(1), keras_argmax)


def test_tfmot_wrapped_model_is_stripped(mlpnet_npz, mnist_flat, tmp_path):
    (x, y), (x_test, _) = mnist_flat
    schedule = tfmot.sparsity.keras.ConstantSparsity(0.9, begin_step=0, frequency=1)
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(tfw.models.mlpnet(mlpnet_npz),
                                                       pruning_schedule=schedule)
    wrapped.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    wrapped.fit(x[:640], y[:640], batch_size=64, epochs=1, verbose=0,
                callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    result = export_tflite(wrapped, tmp_path / "wrapped.tflite", check_inputs=x_test[:2000])
    assert result.size_ratio <= 0.30
    assert result.argmax_agreement >= 0.99
    assert any("prune_low_magnitude" in layer.name for layer in wrapped.layers)  # the input is left as is


@pytest.mark.parametrize("block, symptom", [(16, "gives wrong outputs"), (1, "failed to prepare")])
def test_dynamic_range_sparse_xnnpack_defect_is_caught(mlp64, mnist_flat, tmp_path, block, symptom):
    _, (x_test, _) = mnist_flat
    model = copy_pruned(mlp64, 0.8, block)
    path = tmp_path / "dynamic.tflite"
    with pytest.raises(TFLiteVerificationError, match=f"{symptom}|{CRASHED}") as error:
        export_tflite(model, path, quantization="dynamic", check_inputs=x_test[:500])
    assert "the delegate is at fault" in str(error.value)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one is left
    # The same conversion is fine on the builtin kernels, and dense dynamic-range is fine with XNNPACK.
    builtin = export_tflite(model, path, quantization="dynamic", check_inputs=x_test[:500],
                            default_delegates=False)
    assert "no default delegates" in builtin.interpreter and builtin.argmax_agreement >= 0.95
    dense = export_tflite(model, path, quantization="dynamic", sparse=False, check_inputs=x_test[:500])
    assert dense.bytes == dense.dense_bytes and dense.argmax_agreement >= 0.95


def test_int8_full_quantization(mlp64, mlpnet90, mnist_flat, tmp_path):
    (x, y), (x_test, _) = mnist_flat
    calibration = tf.data.Dataset.from_tensor_slices((x[:500], y[:500]))  # unbatched (image, label) pairs
    dense = export_tflite(mlpnet90, tmp_path / "dense.tflite", sparse=False, quantization="int8",
                          representative_dataset=calibration, check_inputs=x_test[:2000])
    assert dense.argmax_agreement >= 0.97
    assert dense.bytes < 0.35 * export_tflite(mlpnet90, tmp_path / "float.tflite", sparse=False).bytes
    # Sparse int8 works with 1x16 blocks; unstructured sparse int8 Dense kernels fail to prepare in XNNPACK.
    sparse = export_tflite(copy_pruned(mlp64, 0.8, 16), tmp_path / "block.tflite", quantization="int8",
                           representative_dataset=x[:500], check_inputs=x_test[:2000])
    assert sparse.argmax_agreement >= 0.97 and sparse.size_ratio <= 0.5
    with pytest.raises(TFLiteVerificationError, match=f"failed to prepare|{CRASHED}"):
        export_tflite(mlpnet90, tmp_path / "sparse.tflite", quantization="int8",
                      representative_dataset=x[:500])


def test_an_interpreter_that_crashes_fails_the_check_and_writes_nothing(mlpnet90, mnist_flat, tmp_path,
                                                                        monkeypatch):
    """The check runs the file in a child process: one killed by a signal (as XNNPACK segfaults on some CPUs)
    becomes a TFLiteVerificationError naming the signal, and this process goes on."""
    _, (x_test, _) = mnist_flat
    path = tmp_path / "crash.tflite"
    segfault = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    monkeypatch.setattr(tflite, "CHILD", (sys.executable, "-c", segfault))
    with pytest.raises(TFLiteVerificationError, match=r"fails to run: crashed the interpreter process \(SIGSEGV\)"):
        export_tflite(mlpnet90, path, check_inputs=x_test[:100])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert export_tflite(mlpnet90, path, check_inputs=x_test[:100]).argmax_agreement == 1.0


def test_input_forms():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    shape = (None, 4)
    for data in (x, tf.constant(x), tf.data.Dataset.from_tensor_slices(x),
                 tf.data.Dataset.from_tensor_slices((x, np.zeros(3))).batch(2),
                 lambda: ([x[i: i + 1]] for i in range(3))):
        np.testing.assert_array_equal(_input_array(data, shape), x)
    np.testing.assert_array_equal(_input_array(x[0], shape), x[:1])
    with pytest.raises(ValueError, match="do not fit"):
        _input_array(np.zeros((3, 5)), shape)


class SubclassedWithWrapper(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.dense = tfmot.sparsity.keras.prune_low_magnitude(keras.layers.Dense(10))

    def call(self, x):
        return self.dense(x)


def test_bad_input(mlpnet90, tmp_path):
    path = tmp_path / "bad.tflite"
    subclassed = SubclassedWithWrapper()
    subclassed(np.zeros((1, 784), np.float32))
    with pytest.raises(ValueError, match="'prune_low_magnitude_dense_?[0-9]*' is still wrapped"):
        export_tflite(subclassed, path)
    with pytest.raises(ValueError, match="quantization must be one of"):
        export_tflite(mlpnet90, path, quantization="float16")
    with pytest.raises(ValueError, match="needs a representative_dataset"):
        export_tflite(mlpnet90, path, quantization="int8")
    with pytest.raises(ValueError, match="do not fit"):
        export_tflite(mlpnet90, path, check_inputs=np.zeros((4, 28, 28, 1), np.float32))
    with pytest.raises(ValueError, match="expects a keras.Model"):
        export_tflite(keras.layers.Dense(3), path)
    assert not path.exists()


@pytest.mark.slow
def test_recurrent_loop_error_says_how_to_export_and_the_unrolled_copy_exports(tmp_path, rng):
    """A non-unrolled LSTM: the converter's TensorList error becomes a ValueError naming the layer and the fix;
    the fix it names (a clone with unroll=True and the same weights) exports and agrees with Keras."""
    model = keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(4, name="rows"), keras.layers.Dense(2)])
    x = rng.standard_normal((16, 5, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"recurrent layers \['rows'\].*unroll.*True"):
        export_tflite(model, tmp_path / "loop.tflite", check_inputs=x)
    assert not (tmp_path / "loop.tflite").exists()

    def unrolled(layer):
        config = layer.get_config()
        return type(layer).from_config({**config, "unroll": True} if isinstance(layer, keras.layers.RNN) else config)

    copy = keras.models.clone_model(model, clone_function=unrolled)
    copy.set_weights(model.get_weights())
    result = export_tflite(copy, tmp_path / "unrolled.tflite", check_inputs=x)
    assert result.argmax_agreement == 1.0 and (tmp_path / "unrolled.tflite").exists()
