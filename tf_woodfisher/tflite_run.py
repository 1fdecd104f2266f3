"""Run a ``.tflite`` file on inputs, as a user would; as a script, the isolated check of ``verified_export``.

Delegate defects can kill the process that runs a ``.tflite`` (on some x86 CPUs LiteRT 2.3's XNNPACK
segfaults in ``allocate_tensors`` on sparse dynamic-range Dense kernels), so :mod:`tf_woodfisher.tflite`
runs its check in a child process: ``python -P tflite_run.py MODEL INPUTS.npy OUTPUTS.npy auto|builtin``.
The child exits 0 having saved the outputs, 1 when the interpreter raised (the message on stderr), 2 for a
model with several outputs. Imports no Keras, no TensorFlow when ``ai_edge_litert`` is installed, and
nothing of the package (run as a script it cannot).
"""
import sys
import warnings

import numpy as np

try:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    RUNTIME = "ai_edge_litert"
except ImportError:  # TF's own interpreter, deprecated but present in TF 2.21
    import tensorflow as tf

    Interpreter, OpResolverType = tf.lite.Interpreter, tf.lite.experimental.OpResolverType
    RUNTIME = "tf.lite"

BATCH = 1024  # inputs per interpreter call
EXIT_RAISED, EXIT_OUTPUTS = 1, 2


def run_tflite(path: str, x: np.ndarray, default_delegates: bool) -> np.ndarray:
    """Outputs of the single-output ``.tflite`` at ``path`` on inputs ``x``, in batches of at most 1024.

    Args:
        path: the ``.tflite`` file.
        x: inputs (n, ...) float32, of the model's input shape.
        default_delegates: run with LiteRT's default delegates (XNNPACK on CPU), else the builtin kernels.

    Returns:
        The outputs (n, ...).

    Raises:
        ValueError: the model has several outputs.
        RuntimeError: the interpreter fails (e.g. a delegate that fails to prepare).
    """
    resolver = OpResolverType.AUTO if default_delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*tf.lite.Interpreter is deprecated")
        interpreter = Interpreter(model_path=path, experimental_op_resolver_type=resolver)
    if len(interpreter.get_output_details()) != 1:
        raise ValueError("export_tflite supports single-output models")
    input_index = interpreter.get_input_details()[0]["index"]
    output_index = interpreter.get_output_details()[0]["index"]
    outputs, allocated = [], None
    for start in range(0, len(x), BATCH):
        batch = x[start: start + BATCH]
        if batch.shape != allocated:
            interpreter.resize_tensor_input(input_index, batch.shape)
            interpreter.allocate_tensors()
            allocated = batch.shape
        interpreter.set_tensor(input_index, batch)
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(output_index))
    return np.concatenate(outputs)


def main(argv: list) -> int:
    """The child process: ``argv = [model, inputs.npy, outputs.npy, 'auto' | 'builtin']``; the exit code."""
    model, inputs, outputs, resolver = argv
    try:
        result = run_tflite(model, np.load(inputs), resolver == "auto")
    except RuntimeError as error:
        print(error, file=sys.stderr, end="")
        return EXIT_RAISED
    except ValueError as error:
        print(error, file=sys.stderr, end="")
        return EXIT_OUTPUTS
    np.save(outputs, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
