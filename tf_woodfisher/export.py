"""Verified TFLite export of pruned Keras models, with sparse weight encoding.

:func:`export_tflite` strips the tfmot wrappers, converts the model (with
``tf.lite.Optimize.EXPERIMENTAL_SPARSITY`` when ``sparse``), runs the ``.tflite`` the way a user
would (default delegates, i.e. XNNPACK on CPU) and writes it to ``path`` only when its outputs
match the Keras model. In TF 2.21 / LiteRT 2.3, quantized models with EXPERIMENTAL_SPARSITY hit
XNNPACK defects: Dense kernels with unstructured sparsity fail to prepare (dynamic-range and int8),
and dynamic-range ones with 1x16 block sparsity silently give wrong outputs; full-int8 ones in 1x16 blocks
(Keras ``block_size=(16, 1)``) work, but only for kernels whose input size is a multiple of 16 (others give
wrong outputs, builtin kernels included). On some x86 CPUs XNNPACK segfaults on these files instead;
the check runs them in a child process. It turns all of these into a
:class:`TFLiteVerificationError` that names the fix (and the offending Dense layers).
"""
from tf_woodfisher import legacy_keras  # noqa: F401, I001  (first: TF_USE_LEGACY_KERAS=1 before TensorFlow)
import numpy as np
import tensorflow_model_optimization as tfmot
import tensorflow as tf
import tf_keras as keras

from tf_woodfisher import compat
from tf_woodfisher.keras_common import keras_flavour
from tf_woodfisher.tflite import (BATCH, DEFAULT_ATOL, DEFAULT_TOLERANCES, NUM_RANDOM_CHECK_INPUTS,  # noqa: F401
                                  QUANTIZATIONS, RUNTIME, Interpreter, OpResolverType, TFLiteExport,
                                  TFLiteVerificationError, _input_array, check_quantization, converter_options,
                                  verified_export)

PruneLowMagnitude = compat.tfmot_pruning_classes()[0]


def export_tflite(model, path, sparse=True, quantization=None, representative_dataset=None,
                  check_inputs=None, atol=None, rtol=None, min_argmax_agreement=None,
                  default_delegates=True):
    """Strip, convert, verify and write a single-input, single-output Keras model as ``.tflite``.

    The file is accepted when max |tflite − keras| ≤ atol + rtol × max |keras| and the argmax agreement
    (over the last axis) is ≥ min_argmax_agreement.

    Args:
        model: a called (built) single-input, single-output tf_keras model, plain or wrapped by tfmot's
            PruneLowMagnitude (the wrappers are stripped first).
        path: where the ``.tflite`` file is written (str or path), only once it passes the check.
        sparse: convert with ``tf.lite.Optimize.EXPERIMENTAL_SPARSITY`` (sparse weight encoding).
        quantization: None (float32), ``'dynamic'`` (int8 weights, float activations) or ``'int8'``
            (full integer quantization calibrated on ``representative_dataset``; inputs and outputs
            stay float32).
        representative_dataset: model inputs, as an array (n, *input_shape), a ``tf.data.Dataset`` (of
            inputs or (input, label) pairs, batched or not) or TFLite's callable yielding ``[input]``.
            Required for ``'int8'``; a few hundred samples suffice.
        check_inputs: inputs to verify on, in the same forms. Default: the representative dataset,
            else 64 standard-normal inputs of the model's input shape (seed 0).
        atol: absolute tolerance, in output units. Default 1e-6.
        rtol: tolerance relative to max |keras output|. Defaults: 1e-4 (float), 0.1 (dynamic), 0.5
            (int8: activations beyond the calibrated range clip).
        min_argmax_agreement: the fraction in [0, 1] of inputs whose argmax must agree. Defaults: 0.99
            (float), 0.9 (quantized).
        default_delegates: verify with TFLite's default delegates (XNNPACK), as users run it. False
            verifies on the builtin kernels only; such a file must then be loaded with
            ``experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES``.

    Returns:
        A :class:`TFLiteExport` (bytes written, dense bytes, max abs error, argmax agreement, inputs checked,
        interpreter).

    Raises:
        ValueError: bad arguments (an unknown ``quantization``, ``'int8'`` without a representative dataset,
            empty or mis-shaped inputs, an input shape not fully known without ``check_inputs``), a model
            that is not a tf_keras model, was never called, has several inputs or outputs, or still holds
            PruneLowMagnitude wrappers after stripping; a recurrent layer that is not unrolled, whose
            while_loop the converter cannot lower (the message says how to export an unrolled copy).
        TFLiteVerificationError: the ``.tflite`` fails the check (``path`` is then left untouched).
    """
    check_quantization(quantization, representative_dataset)
    model = _strip(model)
    return verified_export(path, lambda sparse_, representative: _convert(model, sparse_, quantization, representative),
                           lambda x: np.asarray(model.predict(x, batch_size=BATCH, verbose=0)), _input_shape(model),
                           sparse, quantization, representative_dataset, check_inputs, atol, rtol,
                           min_argmax_agreement, default_delegates, dense_kernels=_dense_kernels(model),
                           recurrent_loops=[m.name for m in model.submodules
                                            if isinstance(m, keras.layers.RNN) and not m.unroll])


def _dense_kernels(model):
    """(layer name, kernel [in, out]) of every Dense layer of ``model`` in layer order (nested models included)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            found += _dense_kernels(layer)
        elif isinstance(layer, keras.layers.Dense) and getattr(layer, "kernel", None) is not None:
            found.append((layer.name, layer.kernel.numpy()))
    return found


def _strip(model):
    """``model`` without tfmot PruneLowMagnitude wrappers; ValueError naming a wrapper that remains."""
    if not isinstance(model, keras.Model):
        hint = (" (a Keras 3 model: use tf_woodfisher.keras3.export_tflite)"
                if keras_flavour(model) == "keras3" else "")
        raise ValueError(f"export_tflite expects a keras.Model (tf_keras), got {type(model).__name__}{hint}")
    if not _wrappers(model):
        return model
    cause = None
    try:
        model = tfmot.sparsity.keras.strip_pruning(model)
    except ValueError as error:  # clone_model refuses subclassed models
        cause = error
    remaining = _wrappers(model)
    if remaining:
        raise ValueError(
            f"layer {remaining[0].name!r} is still wrapped in tfmot's PruneLowMagnitude and "
            "strip_pruning cannot remove it: it only rebuilds Sequential and functional models, and "
            f"{model.name!r} is or contains a subclassed model. Replace each wrapper by its inner layer "
            "(`wrapper.layer`, which holds the pruned weights) before exporting."
        ) from cause
    return model


def _wrappers(model):
    """The PruneLowMagnitude layers anywhere in ``model``'s layer tree."""
    return [m for m in model.submodules if isinstance(m, PruneLowMagnitude)]


def _convert(model, sparse, quantization, representative):
    """The ``.tflite`` flatbuffer (bytes) of ``model``."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    options = converter_options(sparse, quantization, representative)
    for name, value in options.pop("target_spec", {}).items():
        setattr(converter.target_spec, name, value)
    for name, value in options.items():
        setattr(converter, name, value)
    return converter.convert()


def _input_shape(model):
    """The model's input shape, batch axis first (None where unknown)."""
    spec = model.save_spec()
    if spec is None:
        raise ValueError(f"model {model.name!r} has never been called on inputs: call it once first")
    inputs = tf.nest.flatten(spec)
    if len(inputs) != 1:
        raise ValueError(f"export_tflite supports single-input models; {model.name!r} has {len(inputs)}")
    return tuple(inputs[0].shape)


