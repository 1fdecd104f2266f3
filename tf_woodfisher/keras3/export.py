"""Verified TFLite export of Keras 3 models, with sparse weight encoding, through Keras 3's LiteRT export.

:func:`export_tflite` strips the masks (:func:`~tf_woodfisher.keras3.strip`), converts with
``model.export(path, format='litert')`` (Keras' SavedModel → TFLite converter route, here with TFLite builtin
ops only and ``tf.lite.Optimize.EXPERIMENTAL_SPARSITY`` when ``sparse``), and verifies the file with the same
code and the same tolerances as the tf_keras path (:mod:`tf_woodfisher.tflite`): it runs the ``.tflite`` with
LiteRT as a user would and writes it to ``path`` only when its outputs match the Keras model's.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import numpy as np
import tensorflow as tf

from tf_woodfisher import compat
from tf_woodfisher.keras3.pruned import strip
from tf_woodfisher.keras3.targets import check_keras3_model, input_rank
from tf_woodfisher.tflite import (BATCH, TFLiteExport, TFLiteVerificationError, check_quantization,  # noqa: F401
                                  converter_options, verified_export)

__all__ = ["TFLiteExport", "TFLiteVerificationError", "export_tflite"]


def export_tflite(model, path, sparse: bool = True, quantization: Optional[str] = None, representative_dataset=None,
                  check_inputs=None, atol: Optional[float] = None, rtol: Optional[float] = None,
                  min_argmax_agreement: Optional[float] = None, default_delegates: bool = True) -> TFLiteExport:
    """Strip, convert, verify and write a single-input, single-output Keras 3 model as ``.tflite``.

    The file is accepted when max |tflite − keras| ≤ atol + rtol × max |keras| and the argmax agreement (over the
    last axis) is ≥ min_argmax_agreement. The arguments, defaults and checks are those of the tf_keras path's
    :func:`tf_woodfisher.export.export_tflite`.

    Args:
        model: a built single-input, single-output Keras 3 model, or a :class:`~tf_woodfisher.keras3.PrunedModel`
            (stripped first: the file holds the plain model with its zeros).
        path: where the ``.tflite`` file is written (str or path), only once it passes the check.
        sparse: convert with ``tf.lite.Optimize.EXPERIMENTAL_SPARSITY`` (sparse weight encoding).
        quantization: None (float32), ``'dynamic'`` (int8 weights, float activations) or ``'int8'`` (full
            integer quantization calibrated on ``representative_dataset``; inputs and outputs stay float32).
        representative_dataset: model inputs, as an array (n, *input_shape), a ``tf.data.Dataset`` (of inputs or
            (input, label) pairs, batched or not) or TFLite's callable yielding ``[input]``. Required for
            ``'int8'``.
        check_inputs: inputs to verify on, in the same forms. Default: the representative dataset, else 64
            standard-normal inputs of the model's input shape (seed 0).
        atol: absolute tolerance, in output units. Default 1e-6.
        rtol: tolerance relative to max |keras output|. Defaults: 1e-4 (float), 0.1 (dynamic), 0.5 (int8).
        min_argmax_agreement: fraction in [0, 1] of inputs whose argmax must agree. Defaults: 0.99 (float),
            0.9 (quantized).
        default_delegates: verify with LiteRT's default delegates (XNNPACK), as users run it.

    Returns:
        A :class:`~tf_woodfisher.tflite.TFLiteExport` (bytes written, dense bytes, max abs error, argmax
        agreement, inputs checked, interpreter).

    Raises:
        ValueError: bad arguments, a tf_keras model (use ``tf_woodfisher.export.export_tflite``), a model with
            several inputs or an input shape it does not know.
        TFLiteVerificationError: the ``.tflite`` fails the check (``path`` is then left untouched).
    """
    check_quantization(quantization, representative_dataset)
    model = strip(model)
    check_keras3_model(model)
    input_shape = _input_shape(model)

    def convert(sparse_: bool, representative) -> bytes:
        options = converter_options(sparse_, quantization, representative)
        options.setdefault("target_spec", {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]})  # no Flex ops
        with tempfile.TemporaryDirectory() as directory:
            target = os.path.join(directory, "model.tflite")
            model.export(target, format="litert", verbose=False,
                         input_signature=[tf.TensorSpec(input_shape, tf.float32)], **options)
            with open(target, "rb") as f:
                return f.read()

    return verified_export(path, convert, lambda x: np.asarray(model.predict(x, batch_size=BATCH, verbose=0)),
                           input_shape, sparse, quantization, representative_dataset, check_inputs, atol, rtol,
                           min_argmax_agreement, default_delegates,
                           recurrent_loops=[layer.name for layer in compat.keras3_sublayers(model)
                                            if hasattr(layer, "cell") and getattr(layer, "unroll", True) is False])


def _input_shape(model) -> tuple:
    """The model's single input shape, batch axis first (None where unknown)."""
    inputs = getattr(model, "inputs", None)
    if inputs:
        if len(inputs) != 1:
            raise ValueError(f"export_tflite supports single-input models; {model.name!r} has {len(inputs)}")
        return tuple(inputs[0].shape)
    if input_rank(model) is None:
        raise ValueError(f"model {model.name!r} has no known input shape: build it (or call it) on one input first")
    return tuple(next(iter(compat.keras3_build_shapes(model).values())))

