"""The transient memory of a compiled gradient function: a liveness estimate over its traced graph.

A chunk's call allocates, besides the gradient rows it returns, the model's activations, their output gradients and
the contractions' temporaries (a convolution's window rows, the transposed copies of its input and output
gradients): at b = 16 these are most of the stage's peak (ResNet-20: 0.6 GB against 35 MB of rows). The traced
graph of the function, imported again with the chunk's static input shapes (and the weights' shapes) so that
TensorFlow's shape inference sizes every tensor, is walked in its creation order (forward, then backward), which
TensorFlow's executor follows up to the reordering of independent ops: each op's outputs are allocated when it runs
and freed after their last reader; reshapes and identities are views; an Einsum also holds a scratch copy of its
result while it runs. The peak of that walk, without the inputs, the weights, the constants and the returned rows
(the planner counts those), is the estimate. Tensors whose shape stays unknown and the temporaries inside nested
functions (a ``tf.map_fn`` body, a loop) are not counted. Nothing here knows about Keras.
"""
from typing import Sequence

import tensorflow as tf

__all__ = ["transient_bytes", "any_chunk", "chunk_estimator"]

# ops whose output is a view of their first input (no new buffer)
_VIEWS = frozenset({"Reshape", "Identity", "IdentityN", "Squeeze", "ExpandDims", "StopGradient", "Snapshot",
                    "PreventGradient", "EnsureShape", "BroadcastGradientArgs"})
# ops that may write their result into a scratch buffer of its size before its final layout (TensorFlow's CPU
# Einsum runs a BatchMatMul and then transposes or copies into its output): counted while the op runs
_SCRATCH = frozenset({"Einsum"})
# ops whose outputs are not per-call allocations of the function
_HELD = frozenset({"Placeholder", "Const", "VarHandleOp", "ReadVariableOp", "NoOp"})


def _bytes(tensor):
    dtype = tensor.dtype
    if dtype in (tf.resource, tf.variant, tf.string) or not tensor.shape.is_fully_defined():
        return 0
    return int(tensor.shape.num_elements()) * dtype.size


def transient_bytes(concrete: "tf.types.experimental.ConcreteFunction", inputs: Sequence[tf.TensorSpec]) -> int:
    """Estimated peak bytes that one call of ``concrete`` allocates besides its inputs and outputs.

    Args:
        concrete: a traced function (``tf.function(...).get_concrete_function(...)``), possibly with unknown
            dimensions (a chunk's group count).
        inputs: one static ``tf.TensorSpec`` per flat input of ``concrete`` (its ``structured_input_signature``
            flattened, captured variables excluded): the shapes of the call to estimate.

    Returns:
        The peak of the live tensors' bytes while the graph's ops run in their creation order, each op's
        outputs freed after their last reader (see the module docstring for what is not counted).

    Raises:
        ValueError: ``inputs`` does not give one static shape per input of ``concrete``.
    """
    placeholders = [t for t in concrete.inputs if t.dtype != tf.resource][:len(inputs)]
    if len(placeholders) != len(inputs) or not all(s.shape.is_fully_defined() for s in inputs):
        raise ValueError(f"need one static shape per input of the function ({len(placeholders)}), got {list(inputs)}")
    # the weights' reads as placeholders of their shapes: an imported resource handle loses its variable's shape
    reads = [op.outputs[0] for op in concrete.graph.get_operations()
             if op.type == "ReadVariableOp" and op.outputs[0].shape.is_fully_defined()]
    with tf.Graph().as_default() as graph:
        feeds = {t.name: tf.compat.v1.placeholder(s.dtype, s.shape) for t, s in zip(placeholders, inputs)}
        feeds.update({t.name: tf.compat.v1.placeholder(t.dtype, t.shape) for t in reads})
        tf.graph_util.import_graph_def(concrete.graph.as_graph_def(), input_map=feeds, name="graph")
    returned = {f"graph/{t.name}" for t in concrete.outputs}
    operations = graph.get_operations()
    owner, size, born, last = {}, {}, {}, {}  # tensor → buffer (a tensor name); buffer → bytes, writer, last reader
    scratch = {}  # op index → bytes held only while it runs
    for index, op in enumerate(operations):
        if op.type in _SCRATCH and op.name.startswith("graph/"):
            scratch[index] = sum(_bytes(t) for t in op.outputs)
        for tensor in op.inputs:
            buffer = owner.get(tensor.name)
            if buffer is not None:
                last[buffer] = max(last.get(buffer, index), index)
        if not op.name.startswith("graph/") or op.type in _HELD:
            continue
        for position, tensor in enumerate(op.outputs):
            if op.type in _VIEWS and op.inputs and (op.type == "IdentityN" or position == 0):
                source = owner.get(op.inputs[position if op.type == "IdentityN" else 0].name)
                if source is not None:
                    owner[tensor.name] = source
                continue
            if tensor.name in returned or not _bytes(tensor):
                continue
            owner[tensor.name], size[tensor.name] = tensor.name, _bytes(tensor)
            born[tensor.name] = last[tensor.name] = index
    for name in returned:  # a returned view keeps its buffer to the end, and the planner counts it
        if name in owner:
            size.pop(owner[name], None)
    allocated, freed = [0] * len(operations), [0] * len(operations)  # bytes written / released at each op
    for name, count in size.items():
        allocated[born[name]] += count
        freed[last[name]] += count
    live = peak = 0
    for index in range(len(operations)):
        live += allocated[index]
        peak = max(peak, live + scratch.get(index, 0))
        live -= freed[index]
    return peak


def any_chunk(x, y):
    """The signature of a gradient function's chunk (x, y), nested structures shaped (g, b, ...), for any g."""
    return tf.nest.map_structure(lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), (x, y))


def chunk_estimator(concrete_for):
    """``estimate(x, y)``: :func:`transient_bytes` of the trace ``concrete_for(x, y)`` returns (a gradient
    function's concrete function for :func:`any_chunk` of its arguments) at the static shapes of a chunk (x, y)
    (tensors or ``tf.TensorSpec``\\ s shaped (g, b, ...)); traces it if it has not run on such chunks yet."""

    def estimate(x, y):
        return transient_bytes(concrete_for(x, y), [tf.TensorSpec(t.shape, t.dtype) for t in tf.nest.flatten((x, y))])

    return estimate
