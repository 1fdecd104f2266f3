"""Verification of converted ``.tflite`` files, for both adapters' ``export_tflite`` (tf_keras and Keras 3).

:func:`verified_export` converts a model (through the adapter's converter), runs the ``.tflite`` the way a
user would (LiteRT's ``ai_edge_litert`` interpreter, else TensorFlow's; default delegates, i.e. XNNPACK on CPU)
and writes it to ``path`` only when its outputs match the Keras model's; otherwise it raises a
:class:`TFLiteVerificationError` that says whose fault it is and what to do. The file runs in a child process
(:mod:`tf_woodfisher.tflite_run`), so a delegate that crashes fails the check rather than killing the caller.
Imports neither Keras.
"""
import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
from typing import Callable

import numpy as np
import tensorflow as tf

from tf_woodfisher import tflite_run
from tf_woodfisher.tflite_run import BATCH, RUNTIME, Interpreter, OpResolverType  # noqa: F401 (re-exported)

QUANTIZATIONS = (None, "dynamic", "int8")
# Defaults per quantization: (rtol relative to the output scale max|keras output|, min argmax agreement).
# int8 clips activations outside the calibrated range, so single outputs may be far off.
DEFAULT_TOLERANCES = {None: (1e-4, 0.99), "dynamic": (0.1, 0.9), "int8": (0.5, 0.9)}
DEFAULT_ATOL = 1e-6
NUM_RANDOM_CHECK_INPUTS = 64
INT8_BLOCK = 16  # full-int8 sparse FULLY_CONNECTED kernels are encoded (and run correctly) in 1x16 blocks
MIN_SPARSITY_ENCODED = 0.3  # the converter leaves tensors with fewer zeros dense (kMinSparsityLevel)
CHILD = (sys.executable, "-P", tflite_run.__file__)  # the check's process; -P: not the package folder on sys.path


def int8_block_hazards(dense_kernels) -> tuple:
    """The Dense kernels that break a sparse full-int8 file: (hazards, safe layer names).

    In TF 2.21 / LiteRT 2.3, int8 FULLY_CONNECTED kernels encoded sparse in 1x16 blocks give wrong outputs,
    on XNNPACK and on the builtin kernels alike, when their input size is not a multiple of 16 (found on
    MLPNet's 40- and 20-input layers; 784, 64, 48 and 32 inputs are fine).

    Args:
        dense_kernels: (layer name, kernel array [in, out]) of the model's Dense layers.

    Returns:
        ((name, inputs, zero fraction) of each kernel with ≥ 30% zeros and an input size not a multiple of 16,
        names of the Dense layers whose input size is a multiple of 16).
    """
    hazards, safe = [], []
    for name, kernel in dense_kernels:
        kernel = np.asarray(kernel)
        if kernel.shape[0] % INT8_BLOCK == 0:
            safe.append(name)
        elif np.mean(kernel == 0) >= MIN_SPARSITY_ENCODED:
            hazards.append((name, int(kernel.shape[0]), float(np.mean(kernel == 0))))
    return tuple(hazards), tuple(safe)


class TFLiteVerificationError(ValueError):
    """The converted ``.tflite`` does not run, or disagrees with the Keras model; nothing was written."""


@dataclasses.dataclass(frozen=True)
class TFLiteExport:
    """What :func:`export_tflite` wrote and how well it matched the Keras model.

    ``max_abs_error`` and ``argmax_agreement`` compare the ``.tflite`` with the stripped Keras model on
    ``num_checked`` inputs, run by ``interpreter``.

    Attributes:
        path: the written file.
        bytes: size of the written file.
        dense_bytes: size of the same conversion without EXPERIMENTAL_SPARSITY.
        max_abs_error: max |tflite − keras| over the checked outputs, in output units.
        argmax_agreement: fraction in [0, 1] of checked inputs whose argmax over the last axis agrees.
        num_checked: number of inputs checked.
        interpreter: the runtime and delegates that ran the check.
    """

    path: str
    bytes: int
    dense_bytes: int
    max_abs_error: float
    argmax_agreement: float
    num_checked: int
    interpreter: str

    @property
    def size_ratio(self):
        """``bytes / dense_bytes``: the share of the dense file size that the sparse encoding keeps."""
        return self.bytes / self.dense_bytes


def check_quantization(quantization, representative_dataset) -> None:
    """Raise ValueError for an unknown ``quantization`` or ``'int8'`` without a representative dataset.

    Args:
        quantization: None, ``'dynamic'`` or ``'int8'``.
        representative_dataset: the calibration inputs, or None.

    Raises:
        ValueError: ``quantization`` is not one of :data:`QUANTIZATIONS`, or is ``'int8'`` without a
            representative dataset.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "int8" and representative_dataset is None:
        raise ValueError("quantization='int8' needs a representative_dataset of model inputs to calibrate on")


def converter_options(sparse: bool, quantization, representative) -> dict:
    """The ``tf.lite.TFLiteConverter`` attributes of a conversion.

    ``EXPERIMENTAL_SPARSITY`` when ``sparse``; ``Optimize.DEFAULT`` when quantized; for ``'int8'`` the
    representative inputs and int8 builtin ops only. Also the keywords of Keras 3's
    ``model.export(path, format='litert', **options)``.

    Args:
        sparse: add ``tf.lite.Optimize.EXPERIMENTAL_SPARSITY``.
        quantization: None, ``'dynamic'`` or ``'int8'``.
        representative: the calibration inputs, an array (n, ...) float32 (used for ``'int8'`` only).

    Returns:
        A dict attribute name → value: ``optimizations``, and for ``'int8'`` ``representative_dataset``
        (a callable yielding ``[sample[None]]``) and ``target_spec`` (a dict of its attributes).
    """
    optimizations = [tf.lite.Optimize.DEFAULT] if quantization else []
    if sparse:
        optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    options = {"optimizations": optimizations}
    if quantization == "int8":
        options["representative_dataset"] = lambda: ([sample[None]] for sample in representative)
        options["target_spec"] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]}
    return options


def verified_export(path, convert: Callable, predict: Callable, input_shape: tuple, sparse: bool, quantization,
                    representative_dataset, check_inputs, atol, rtol, min_argmax_agreement,
                    default_delegates: bool, dense_kernels=(), recurrent_loops=()) -> TFLiteExport:
    """Convert, verify and write a ``.tflite`` file; the flow of both adapters' ``export_tflite``.

    Args:
        path: where the file is written, only once it passes the check.
        convert: ``(sparse: bool, representative: array or None) → bytes``, the adapter's conversion (with
            ``EXPERIMENTAL_SPARSITY`` when sparse, quantized as the adapter was asked).
        predict: model inputs (n, ...) float32 → the Keras model's outputs (n, ...).
        input_shape: the model's input shape, batch axis first (None where unknown).
        sparse: also convert with ``EXPERIMENTAL_SPARSITY`` (else the dense conversion is written).
        quantization: None, ``'dynamic'`` or ``'int8'``.
        representative_dataset: calibration inputs (array, ``tf.data.Dataset`` or callable), or None.
        check_inputs: inputs to verify on, in the same forms, or None (the defaults).
        atol: absolute tolerance, or None (the default).
        rtol: tolerance relative to max |keras output|, or None (the default of ``quantization``).
        min_argmax_agreement: fraction in [0, 1], or None (the default of ``quantization``).
        default_delegates: verify with TFLite's default delegates (XNNPACK). This and the seven arguments
            above are as in :func:`tf_woodfisher.export.export_tflite`.
        dense_kernels: (layer name, kernel [in, out]) of the model's Dense layers, to name in the error those
            that break a sparse int8 file (:func:`int8_block_hazards`).
        recurrent_loops: names of the model's recurrent layers that are not unrolled: when the converter
            fails on their while_loop (TensorList ops), the error names them and says how to export.

    Returns:
        A :class:`TFLiteExport`.

    Raises:
        ValueError: bad inputs; a conversion that fails on the while_loop of ``recurrent_loops``.
        TFLiteVerificationError: the file fails the check (``path`` is left untouched).
    """
    check_quantization(quantization, representative_dataset)
    rtol_default, agreement_default = DEFAULT_TOLERANCES[quantization]
    atol = DEFAULT_ATOL if atol is None else atol
    rtol = rtol_default if rtol is None else rtol
    min_argmax_agreement = agreement_default if min_argmax_agreement is None else min_argmax_agreement

    representative = (None if representative_dataset is None
                      else _input_array(representative_dataset, input_shape))
    x = _check_inputs(check_inputs, representative, input_shape)
    dense = _converted(convert, False, representative, recurrent_loops)
    content = _converted(convert, True, representative, recurrent_loops) if sparse else dense
    reference = np.asarray(predict(x))

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(suffix=".tflite", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.chmod(tmp_path, 0o644)  # mkstemp creates it 0o600
        error, agreement, problem = _verify(tmp_path, x, reference, default_delegates, atol, rtol,
                                            min_argmax_agreement)
        if problem:
            builtin_ok = default_delegates and not _verify(tmp_path, x, reference, False, atol, rtol,
                                                           min_argmax_agreement)[2]
            hazards = int8_block_hazards(dense_kernels) if sparse and quantization == "int8" else ((), ())
            raise TFLiteVerificationError(_explain(problem, default_delegates, builtin_ok, *hazards))
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    delegates = "default delegates" if default_delegates else "builtin kernels, no default delegates"
    return TFLiteExport(path=str(path), bytes=len(content), dense_bytes=len(dense), max_abs_error=error,
                        argmax_agreement=agreement, num_checked=len(x),
                        interpreter=f"{RUNTIME} ({delegates})")


def _converted(convert, sparse, representative, recurrent_loops):
    """``convert(sparse, representative)``; a converter error on a recurrent layer's while_loop (TensorList ops
    with a dynamic shape, as tf_keras and Keras 3 LSTMs / GRUs build them) becomes a ValueError naming the
    layers and the fix."""
    try:
        return convert(sparse, representative)
    except Exception as error:  # the converter's ConverterError (its module path differs between versions)
        if recurrent_loops and "TensorList" in str(error):
            raise ValueError(
                f"the TFLite converter cannot lower the while_loop of the recurrent layers {list(recurrent_loops)} "
                "(its TensorList ops need a static shape). Export a copy with unroll=True on those layers and the "
                "same weights: clone the model with a clone_function that sets 'unroll': True in their config, "
                "then copy.set_weights(model.get_weights())") from error
        raise


def _input_array(data, input_shape):
    """Model inputs (n, *input_shape) float32 from an array, a Dataset or a callable returning an iterable.

    Items of a Dataset or callable may be inputs or (input, label) pairs, with or without a batch axis.
    """
    if callable(data):
        data = data()
    if isinstance(data, tf.data.Dataset):
        data = data.as_numpy_iterator()
    if isinstance(data, (np.ndarray, tf.Tensor)):
        data = [data]
    items = [np.asarray(item[0] if isinstance(item, (list, tuple)) else item, np.float32) for item in data]
    if not items:
        raise ValueError("the given model inputs are empty")
    x = np.concatenate([item[None] if item.ndim == len(input_shape) - 1 else item for item in items])
    if x.ndim != len(input_shape) or any(s not in (None, d) for s, d in zip(input_shape[1:], x.shape[1:])):
        raise ValueError(f"inputs of shape {x.shape} do not fit the model input shape {input_shape}")
    return x


def _check_inputs(check_inputs, representative, input_shape):
    """The inputs to verify on: ``check_inputs``, else the representative ones, else 64 seeded normal."""
    if check_inputs is not None:
        return _input_array(check_inputs, input_shape)
    if representative is not None:
        return representative
    if None in input_shape[1:]:
        raise ValueError(f"the model input shape {input_shape} is not fully known: pass check_inputs")
    shape = (NUM_RANDOM_CHECK_INPUTS, *input_shape[1:])
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def _run(path, x, default_delegates):
    """Outputs of the ``.tflite`` at ``path`` on inputs ``x`` (:func:`tflite_run.run_tflite`), run in a child
    process so that a delegate that crashes fails the check instead of killing the caller.

    Raises:
        ValueError: the model has several outputs.
        RuntimeError: the interpreter raised, or its process died (the message says by which signal).
    """
    with tempfile.TemporaryDirectory(prefix="tfw_tflite_") as folder:
        inputs, outputs = os.path.join(folder, "inputs.npy"), os.path.join(folder, "outputs.npy")
        np.save(inputs, np.ascontiguousarray(x, np.float32))
        child = subprocess.run([*CHILD, path, inputs, outputs, "auto" if default_delegates else "builtin"],
                               capture_output=True, text=True)
        if child.returncode == 0:
            return np.load(outputs)
    message = child.stderr.strip()
    if child.returncode == tflite_run.EXIT_OUTPUTS:
        raise ValueError(message)
    if child.returncode < 0:
        raise RuntimeError(f"crashed the interpreter process ({signal.Signals(-child.returncode).name})")
    if child.returncode == tflite_run.EXIT_RAISED:
        raise RuntimeError(message)
    raise RuntimeError(f"the interpreter process exited with code {child.returncode}: {message[-2000:]}")


def _verify(path, x, reference, default_delegates, atol, rtol, min_argmax_agreement):
    """(max_abs_error, argmax_agreement, problem): problem is None when the ``.tflite`` passes."""
    try:
        output = _run(path, x, default_delegates)
    except RuntimeError as error:
        return float("nan"), 0.0, f"fails to run: {str(error).rstrip('.')}"
    error = float(np.max(np.abs(output - reference)))
    agreement = float(np.mean(output.argmax(-1) == reference.argmax(-1))) if reference.ndim > 1 else 1.0
    tolerance = atol + rtol * float(np.max(np.abs(reference)))
    problem = None
    if not error <= tolerance:  # also catches NaN
        problem = f"gives wrong outputs: max |tflite - keras| = {error:.3g} > {tolerance:.3g}"
    elif agreement < min_argmax_agreement:
        problem = f"gives wrong outputs: argmax agreement {agreement:.3f} < {min_argmax_agreement}"
    return error, agreement, problem


def _explain(problem, default_delegates, builtin_ok, hazards=(), safe=()):
    """The TFLiteVerificationError message: what went wrong, whose fault, and the fix (``hazards``, ``safe``:
    from :func:`int8_block_hazards`)."""
    where = "under TFLite's default delegates (XNNPACK)" if default_delegates else "on its builtin kernels"
    message = f"the converted .tflite {where} {problem}"
    if hazards:
        listing = ", ".join(f"{name!r} ({inputs} inputs, {zeros:.0%} zeros)" for name, inputs, zeros in hazards)
        message += (
            f"; int8 sparse Dense kernels whose input size is not a multiple of {INT8_BLOCK} give wrong outputs in "
            f"TF 2.21 / LiteRT 2.3 (XNNPACK and builtin kernels alike), and this model has {listing}. Fix: leave "
            f"them dense (under {MIN_SPARSITY_ENCODED:.0%} zeros) and prune the Dense layers whose input size is a "
            f"multiple of {INT8_BLOCK} in blocks, e.g. tfw.one_shot_prune(..., block_size=({INT8_BLOCK}, 1), "
            f"layers={list(safe)}); or sparse=False, or quantization=None")
        return message + ". Nothing was written."
    if builtin_ok:
        message += (
            "; on the builtin kernels it matches Keras, so the delegate is at fault (known in TF 2.21 / "
            "LiteRT 2.3 for quantized models with EXPERIMENTAL_SPARSITY: unstructured-sparse Dense kernels "
            "fail to prepare, dynamic-range 1x16-block-sparse ones give wrong outputs). Fix: sparse=False, "
            "or quantization=None; for a sparse quantized file, quantization='int8' with the Dense kernels "
            "pruned in blocks of block_size=(16, 1) by tfw.one_shot_prune or tfw.prune_woodfisher, in the "
            "layers whose input size is a multiple of 16 (layers=..., the others dense); or, if the file will "
            "only run with "
            "OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES, default_delegates=False")
    else:
        message += (". Try sparse=False or quantization=None; if the error is expected, loosen atol, rtol "
                    "or min_argmax_agreement")
    return message + ". Nothing was written."
