"""tfw3.export_tflite: sparse LiteRT files from Keras 3 models, verified with the tf_keras path's code."""
import os

import keras
import numpy as np
import pytest

import tf_woodfisher.keras3 as tfw3
from tf_woodfisher.tflite import Interpreter

L = keras.layers


@pytest.fixture(scope="module")
def sparse_mlp():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), L.Dense(128, activation="relu", name="fc1"),
                              L.Dense(64, activation="relu", name="fc2"), L.Dense(10, name="fc3")])
    tfw3.one_shot_prune(model, None, None, 0.9, method="magnitude", verbose=0)
    return model


@pytest.mark.slow
def test_sparse_file_is_smaller_agrees_and_runs_in_litert(sparse_mlp, tmp_path, rng):
    path = tmp_path / "mlp.tflite"
    result = tfw3.export_tflite(sparse_mlp, path)
    assert os.path.getsize(path) == result.bytes < 0.5 * result.dense_bytes
    assert result.max_abs_error <= 1e-4 * 10 and result.argmax_agreement >= 0.99 and result.num_checked == 64
    assert result.interpreter.startswith("ai_edge_litert")
    x = rng.standard_normal((5, 64)).astype(np.float32)
    interpreter = Interpreter(model_path=str(path))
    interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    out = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, sparse_mlp.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
    dense = tfw3.export_tflite(sparse_mlp, tmp_path / "dense.tflite", sparse=False)
    assert dense.bytes == dense.dense_bytes == result.dense_bytes


@pytest.mark.slow
def test_pruned_model_is_stripped_and_quantized_defect_is_caught(sparse_mlp, tmp_path, rng):
    pruned = tfw3.masks_from_zeros(sparse_mlp)
    result = tfw3.export_tflite(pruned, tmp_path / "stripped.tflite", check_inputs=rng.standard_normal((16, 64)))
    assert result.num_checked == 16 and result.bytes < result.dense_bytes
    inputs = rng.standard_normal((200, 64)).astype(np.float32)
    int8 = tfw3.export_tflite(sparse_mlp, tmp_path / "int8.tflite", sparse=False, quantization="int8",
                              representative_dataset=inputs)
    assert int8.bytes < result.dense_bytes / 2
    # XNNPACK cannot prepare unstructured-sparse quantized Dense kernels (TF 2.21 / LiteRT 2.3): refused, not written.
    with pytest.raises(tfw3.TFLiteVerificationError, match="Nothing was written"):
        tfw3.export_tflite(sparse_mlp, tmp_path / "broken.tflite", quantization="dynamic")
    assert not (tmp_path / "broken.tflite").exists()


def test_bad_input(sparse_mlp, tmp_path):
    with pytest.raises(ValueError, match="quantization must be one of"):
        tfw3.export_tflite(sparse_mlp, tmp_path / "x.tflite", quantization="int4")
    with pytest.raises(ValueError, match="needs a representative_dataset"):
        tfw3.export_tflite(sparse_mlp, tmp_path / "x.tflite", quantization="int8")
    with pytest.raises(ValueError, match="do not fit the model input shape"):
        tfw3.export_tflite(sparse_mlp, tmp_path / "x.tflite", check_inputs=np.zeros((4, 3), np.float32))
    a, b = keras.Input((3,)), keras.Input((3,))
    two = keras.Model([a, b], L.Dense(2)(L.Concatenate()([a, b])))
    with pytest.raises(ValueError, match="single-input models"):
        tfw3.export_tflite(two, tmp_path / "x.tflite")


@pytest.mark.slow
def test_recurrent_loop_error_names_the_layer_and_the_unrolled_copy_exports(tmp_path, rng):
    """Keras 3's LSTM while_loop does not convert: a ValueError naming the layer and the fix, which works."""
    def lstm(unroll):
        return keras.Sequential([keras.Input((5, 3)), keras.layers.LSTM(4, name="rows", unroll=unroll),
                                 keras.layers.Dense(2)])

    model, x = lstm(False), rng.standard_normal((16, 5, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"recurrent layers \['rows'\].*unroll.*True"):
        tfw3.export_tflite(model, tmp_path / "loop.tflite", check_inputs=x)
    copy = lstm(True)
    copy.set_weights(model.get_weights())
    result = tfw3.export_tflite(copy, tmp_path / "unrolled.tflite", check_inputs=x)
    assert result.argmax_agreement == 1.0 and (tmp_path / "unrolled.tflite").exists()
