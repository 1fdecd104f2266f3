"""The models of tests_keras3/test_layerwise.py, and its tf_keras side, run in a subprocess (the legacy switch is
per process).

Usage: python _layerwise_worker.py IN.npz OUT.npz. IN.npz holds, per case i, the JSON of the case
(``case_i``: model kind, one_shot_prune keywords, target sparsity), the starting weights (``case_i/weight_j``, in
``model.get_weights()`` order) and the calibration inputs (``x_<kind>``). The worker builds the same model with
tf_keras, sets the weights, prunes it with ``tfw.one_shot_prune`` and writes the pruned weights
(``case_i/weight_j``) and, as JSON in ``case_i/report``, the report's per-layer sparsities and reconstruction
errors.

Imported by the test (no Keras at import): :func:`build` takes the Keras module to build with.
"""
import json
import sys

import numpy as np

SHAPES = {"image": (10, 10, 3), "sequence": (12, 8)}


def build(keras, kind):
    """The model of ``kind`` in ``keras`` (tf_keras or Keras 3): the same layers, names and weight order."""
    L = keras.layers
    inputs = keras.Input(SHAPES[kind])
    if kind == "image":
        h = L.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inputs)
        h = L.DepthwiseConv2D(3, depth_multiplier=2, activation="relu", name="depthwise")(h)
        h = L.SeparableConv2D(8, 3, strides=2, activation="relu", name="separable")(h)
        outputs = L.Dense(10, name="dense")(L.Flatten()(h))
    else:
        h = L.Conv1D(8, 3, padding="causal", activation="relu", name="conv1d")(inputs)
        h = L.MultiHeadAttention(num_heads=2, key_dim=4, name="mha")(h, h)
        h = L.EinsumDense("abc,cd->abd", output_shape=(12, 6), bias_axes="d", activation="relu", name="einsum")(h)
        outputs = L.Dense(4, name="out")(L.Flatten()(h))
    return keras.Model(inputs, outputs)


def summary(report):
    """The parts of a report both paths must agree on."""
    layers = report.as_dict()["layers"]
    return {"layers": layers, "errors": report.as_dict()["reconstruction_errors"], "sparsity": report.sparsity}


def main(path_in, path_out):
    import tf_woodfisher as tfw  # noqa: I001  (first: tf_keras)
    import tensorflow as tf

    keras = tfw.keras
    data, out = np.load(path_in), {}
    cases = sorted(k for k in data.files if k.startswith("case_") and "/" not in k)
    for name in cases:
        case = json.loads(str(data[name]))
        model = build(keras, case["kind"])
        weights = [data[f"{name}/weight_{j}"] for j in range(len(model.get_weights()))]
        model.set_weights(weights)
        x = tf.data.Dataset.from_tensor_slices(data[f"x_{case['kind']}"])
        report = tfw.one_shot_prune(model, x, None, case["sparsity"], verbose=0, **case["options"])
        out.update({f"{name}/weight_{j}": w for j, w in enumerate(model.get_weights())})
        out[f"{name}/report"] = np.array(json.dumps(summary(report)))
    np.savez(path_out, **out)
    print(json.dumps({"cases": len(cases)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
