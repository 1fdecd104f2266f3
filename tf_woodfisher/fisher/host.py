"""Host (CPU) buffers shared with TensorFlow without a copy: the m × d gradient matrices and their blocks.

The largest arrays of an event are allocated here by NumPy and wrapped as tensors through DLPack, so they
stay out of TensorFlow's caching allocator (their memory returns to the system when freed, or, from a
:class:`HostBuffers` pool, serves the next event) and are written once, in their final layout. (Gradients that one
chunk computes whole, at most ``memory.CHUNK_BYTES``, stay the tensors TensorFlow computed: see
``gradients.collect_gradient_columns``.) Nothing here knows about Keras.
"""
import sys
from typing import Optional

import numpy as np

import tensorflow as tf

REUSED_BUFFER_BYTES = 2 ** 30  # the most a HostBuffers pool keeps allocated between uses


def aligned_empty(shape, dtype):
    """An uninitialised NumPy array for ``dtype`` whose data is 64-byte aligned, as tensor buffers must be.

    Args:
        shape: the array's shape.
        dtype: a ``tf.DType`` (bfloat16 arrays hold ml_dtypes' bfloat16).

    Returns:
        A C-contiguous NumPy array of ``shape``.
    """
    dtype = tf.as_dtype(dtype)
    itemsize, count = dtype.size, int(np.prod(shape))
    raw = np.empty(count * itemsize + 64, np.uint8)
    offset = -raw.ctypes.data % 64
    return raw[offset:offset + count * itemsize].view(dtype.as_numpy_dtype).reshape(shape)


class HostBuffers:
    """A pool of :func:`aligned_empty` buffers, reused once nothing else refers to them.

    Fresh memory is expensive on the first write: each page faults in, and on a VM whose host reclaims idle
    memory a 50 MB buffer can take 150 ms to fill instead of 5 ms. The events of a gradual run allocate the same
    gradient and block buffers each time, so one pool per :class:`~tf_woodfisher.pruning.pruner.Pruner` hands
    back the previous event's buffers. A buffer is reused only when the pool holds the last reference to it:
    while a tensor made by :func:`shared_tensor` (or any view) is alive, a new one is allocated, so a result a
    caller keeps is never overwritten. At most :data:`REUSED_BUFFER_BYTES` are kept; beyond that buffers are
    fresh and return to the system when freed, as without a pool.
    """

    def __init__(self, max_bytes: Optional[int] = None):
        self.max_bytes = REUSED_BUFFER_BYTES if max_bytes is None else max_bytes  # read when the pool is made
        self._arrays = {}  # (shape, dtype name) → the buffers of that shape
        self._bytes = 0
        probe = [np.empty(0)]
        self._idle_refs = sys.getrefcount(probe[0])  # a buffer held by one list slot only (and the call's argument)

    def empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised, 64-byte aligned array of ``shape`` and ``dtype`` (a ``tf.DType``): a pooled one
        that nothing else refers to, else a new one (kept in the pool while it has room)."""
        dtype = tf.as_dtype(dtype)
        shape = tuple(int(n) for n in shape)
        arrays = self._arrays.setdefault((shape, dtype.name), [])
        for index in range(len(arrays)):
            if sys.getrefcount(arrays[index]) <= self._idle_refs:
                return arrays[index]
        array = aligned_empty(shape, dtype)
        if self._bytes + array.nbytes <= self.max_bytes:
            arrays.append(array)
            self._bytes += array.nbytes
        return array


def shared_tensor(array, dtype):
    """A tensor of ``dtype`` over ``array``'s memory (DLPack, no copy); bfloat16 travels as uint16 bits.

    Args:
        array: a C-contiguous, 64-byte aligned NumPy array (see :func:`aligned_empty`); the tensor keeps it alive.
        dtype: its ``tf.DType``.

    Returns:
        A CPU tensor of ``array``'s shape.
    """
    dtype = tf.as_dtype(dtype)
    storage = array.view(np.uint16) if dtype == tf.bfloat16 else array
    tensor = tf.experimental.dlpack.from_dlpack(storage.__dlpack__())
    return tf.bitcast(tensor, dtype) if dtype == tf.bfloat16 else tensor


def on_host(tensor) -> bool:
    """Whether ``tensor`` is an eager float32/float64 tensor in CPU memory, which NumPy can read without a copy."""
    return (isinstance(tensor, tf.Tensor) and hasattr(tensor, "numpy") and tensor.dtype in (tf.float32, tf.float64)
            and "CPU" in tensor.device.upper())


def transposed_blocks(piece, begin, count, size, buffers=None):
    """The (count, m, size) blocks of consecutive column ranges of an (m, n) CPU tensor, written once.

    Block k is columns ``begin + k·size`` to ``begin + (k+1)·size`` of ``piece``. TensorFlow would copy the
    column range and then transpose it (two passes over the blocks' memory); here NumPy reads the tensor's own
    memory and writes the result once into a buffer the returned tensor shares.

    Args:
        piece: an (m, n) tensor for which :func:`on_host` holds.
        begin: the first column.
        count: the number of blocks.
        size: columns per block.
        buffers: a :class:`HostBuffers` pool to take the result's memory from (None: a fresh buffer).

    Returns:
        A (count, m, size) tensor of ``piece``'s dtype.
    """
    values = np.asarray(piece)  # a view of the tensor's memory
    m = values.shape[0]
    out = (buffers.empty if buffers is not None else aligned_empty)((count, m, size), piece.dtype)
    np.copyto(out, values[:, begin:begin + count * size].reshape(m, count, size).transpose(1, 0, 2))
    return shared_tensor(out, piece.dtype)
