"""Verified TFLite export of pruned Keras models, with sparse weight encoding.

:func:`export_tflite` strips the tfmot wrappers, converts the model (with
``tf.lite.Optimize.EXPERIMENTAL_SPARSITY`` when ``sparse``), runs the ``.tflite`` the way a user
would (default delegates, i.e. XNNPACK on CPU) and writes it to ``path`` only when its outputs
match the Keras model. In TF 2.21 / LiteRT 2.3, quantized models with EXPERIMENTAL_SPARSITY hit
XNNPACK defects: Dense kernels with unstructured sparsity fail to prepare (dynamic-range and int8),
and dynamic-range ones with 1x16 block sparsity silently give wrong outputs. The check turns both
into a :class:`TFLiteVerificationError`.
"""
import dataclasses
import os
import tempfile
import warnings

from tf_woodfisher import legacy_keras  # noqa: F401, I001  (first: TF_USE_LEGACY_KERAS=1 before TensorFlow)
import numpy as np
import tensorflow_model_optimization as tfmot
import tensorflow as tf
import tf_keras as keras

from tf_woodfisher import compat

PruneLowMagnitude = compat.tfmot_pruning_classes()[0]

try:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    RUNTIME = "ai_edge_litert"
except ImportError:  # TF's own interpreter, deprecated but present in TF 2.21
    Interpreter, OpResolverType = tf.lite.Interpreter, tf.lite.experimental.OpResolverType
    RUNTIME = "tf.lite"

QUANTIZATIONS = (None, "dynamic", "int8")
# Defaults per quantization: (rtol relative to the output scale max|keras output|, min argmax agreement).
# int8 clips activations outside the calibrated range, so single outputs may be far off.
DEFAULT_TOLERANCES = {None: (1e-4, 0.99), "dynamic": (0.1, 0.9), "int8": (0.5, 0.9)}
DEFAULT_ATOL = 1e-6
NUM_RANDOM_CHECK_INPUTS = 64
_BATCH = 1024


class TFLiteVerificationError(ValueError):
    """The converted ``.tflite`` does not run, or disagrees with the Keras model; nothing was written."""


@dataclasses.dataclass(frozen=True)
class TFLiteExport:
    """What :func:`export_tflite` wrote and how well it matched the Keras model.

    ``bytes``: size of the written file; ``dense_bytes``: size of the same conversion without
    EXPERIMENTAL_SPARSITY. ``max_abs_error`` and ``argmax_agreement`` (fraction in [0, 1], over the
    last axis) compare the ``.tflite`` with the stripped Keras model on ``num_checked`` inputs, run by
    ``interpreter``.
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


def export_tflite(model, path, sparse=True, quantization=None, representative_dataset=None,
                  check_inputs=None, atol=None, rtol=None, min_argmax_agreement=None,
                  default_delegates=True):
    """Strip, convert, verify and write a single-input, single-output Keras model as ``.tflite``.

    quantization: None (float32), ``'dynamic'`` (int8 weights, float activations) or ``'int8'``
        (full integer quantization calibrated on ``representative_dataset``; inputs and outputs
        stay float32).
    representative_dataset: model inputs, as an array (n, *input_shape), a ``tf.data.Dataset`` (of
        inputs or (input, label) pairs, batched or not) or TFLite's callable yielding ``[input]``.
        Required for ``'int8'``; a few hundred samples suffice.
    check_inputs: inputs to verify on, in the same forms. Default: the representative dataset,
        else 64 standard-normal inputs of the model's input shape (seed 0).
    atol, rtol, min_argmax_agreement: the file is accepted when max |tflite − keras| ≤ atol + rtol ×
        max |keras| and the argmax agreement is ≥ min_argmax_agreement. Defaults: atol 1e-6; rtol
        1e-4 (float), 0.1 (dynamic), 0.5 (int8: activations beyond the calibrated range clip);
        agreement 0.99 (float), 0.9 (quantized).
    default_delegates: verify with TFLite's default delegates (XNNPACK), as users run it. False
        verifies on the builtin kernels only; such a file must then be loaded with
        ``experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES``.

    Returns a :class:`TFLiteExport`. Raises ValueError for bad arguments or a model that still holds
    PruneLowMagnitude wrappers after stripping, and :class:`TFLiteVerificationError` when the
    ``.tflite`` fails the check (``path`` is then left untouched).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization == "int8" and representative_dataset is None:
        raise ValueError("quantization='int8' needs a representative_dataset of model inputs to calibrate on")
    model = _strip(model)
    rtol_default, agreement_default = DEFAULT_TOLERANCES[quantization]
    atol = DEFAULT_ATOL if atol is None else atol
    rtol = rtol_default if rtol is None else rtol
    min_argmax_agreement = agreement_default if min_argmax_agreement is None else min_argmax_agreement

    input_shape = _input_shape(model)
    representative = (None if representative_dataset is None
                      else _input_array(representative_dataset, input_shape))
    x = _check_inputs(check_inputs, representative, input_shape)
    dense = _convert(model, False, quantization, representative)
    content = _convert(model, True, quantization, representative) if sparse else dense
    reference = np.asarray(model.predict(x, batch_size=_BATCH, verbose=0))

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
            raise TFLiteVerificationError(_explain(problem, default_delegates, builtin_ok))
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    delegates = "default delegates" if default_delegates else "builtin kernels, no default delegates"
    return TFLiteExport(path=str(path), bytes=len(content), dense_bytes=len(dense), max_abs_error=error,
                        argmax_agreement=agreement, num_checked=len(x),
                        interpreter=f"{RUNTIME} ({delegates})")


def _strip(model):
    """``model`` without tfmot PruneLowMagnitude wrappers; ValueError naming a wrapper that remains."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"export_tflite expects a keras.Model (tf_keras), got {type(model).__name__}")
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
    optimizations = [tf.lite.Optimize.DEFAULT] if quantization else []
    if sparse:
        optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    converter.optimizations = optimizations
    if quantization == "int8":
        converter.representative_dataset = lambda: ([sample[None]] for sample in representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
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
    """Outputs of the ``.tflite`` at ``path`` on inputs ``x``, in batches of at most 1024."""
    resolver = OpResolverType.AUTO if default_delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*tf.lite.Interpreter is deprecated")
        interpreter = Interpreter(model_path=path, experimental_op_resolver_type=resolver)
    if len(interpreter.get_output_details()) != 1:
        raise ValueError("export_tflite supports single-output models")
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    outputs, allocated = [], None
    for start in range(0, len(x), _BATCH):
        batch = x[start: start + _BATCH]
        if batch.shape != allocated:
            interpreter.resize_tensor_input(input_index, batch.shape)
            interpreter.allocate_tensors()
            allocated = batch.shape
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(output_index))
    return np.concatenate(outputs)


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


def _explain(problem, default_delegates, builtin_ok):
    """The TFLiteVerificationError message: what went wrong, whose fault, and the fix."""
    where = "under TFLite's default delegates (XNNPACK)" if default_delegates else "on its builtin kernels"
    message = f"the converted .tflite {where} {problem}"
    if builtin_ok:
        message += (
            "; on the builtin kernels it matches Keras, so the delegate is at fault (known in TF 2.21 / "
            "LiteRT 2.3 for quantized models with EXPERIMENTAL_SPARSITY: unstructured-sparse Dense kernels "
            "fail to prepare, dynamic-range 1x16-block-sparse ones give wrong outputs). Fix: sparse=False, "
            "or quantization=None; for a sparse quantized file, quantization='int8' with Dense kernels "
            "pruned in blocks of block_size=(16, 1); or, if the file will only run with "
            "OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES, default_delegates=False")
    else:
        message += (". Try sparse=False or quantization=None; if the error is expected, loosen atol, rtol "
                    "or min_argmax_agreement")
    return message + ". Nothing was written."
