"""Host (CPU) buffers shared with TensorFlow without a copy: the m × d gradient matrices and their blocks.

The largest arrays of an event are allocated here by NumPy and wrapped as tensors through DLPack, so they
stay out of TensorFlow's caching allocator (their memory returns to the system when freed, or, from a
:class:`HostBuffers` pool, serves the next event) and are written once, in their final layout. (Gradients that one
chunk computes whole, at most ``memory.CHUNK_BYTES``, stay the tensors TensorFlow computed: see
``gradients.collect_gradient_columns``.) Nothing here knows about Keras.
"""
import mmap
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np

import tensorflow as tf

REUSED_BUFFER_BYTES = 2 ** 30  # the most a HostBuffers pool keeps allocated between uses
PREFAULT_BYTES = 16 * 2 ** 20  # fresh buffers from this size on have their pages faulted in by parallel threads
PREFAULT_THREADS = 8  # at most this many (and at most the CPUs this process may run on)
FAULT_SLICE_BYTES = 2 ** 21  # RowFaulter touches this much at a time: the longest a writer's claim waits for it


def aligned_empty(shape, dtype, on_new: Optional[Callable[[np.ndarray], object]] = None):
    """An uninitialised NumPy array for ``dtype`` whose data is 64-byte aligned, as tensor buffers must be.

    From :data:`PREFAULT_BYTES` on, the pages are faulted in first by :func:`prefault` (in parallel), not one
    by one by the single thread that first writes the array; with ``on_new`` the array is passed to it instead
    (a :meth:`RowFaulter.add`, which faults the pages in while the array is written).

    Args:
        shape: the array's shape.
        dtype: a ``tf.DType`` (bfloat16 arrays hold ml_dtypes' bfloat16).
        on_new: None, or a callable that takes the new array and faults its pages in itself.

    Returns:
        A C-contiguous NumPy array of ``shape``.
    """
    dtype = tf.as_dtype(dtype)
    itemsize, count = dtype.size, int(np.prod(shape))
    raw = np.empty(count * itemsize + 64, np.uint8)
    if on_new is None and raw.nbytes >= PREFAULT_BYTES:
        prefault(raw)
    offset = -raw.ctypes.data % 64
    array = raw[offset:offset + count * itemsize].view(dtype.as_numpy_dtype).reshape(shape)
    if on_new is not None:
        on_new(array)
    return array


def prefault(raw: np.ndarray, threads: Optional[int] = None) -> None:
    """Write one byte of each memory page of ``raw`` (a 1-D uint8 array, contents undefined afterwards), from
    several threads at once.

    The first write of a fresh page costs a page fault, in which the kernel (and, on a VM, its host) finds and
    zeroes the page. Memory the system has not used for a while is slow to fault in: on this project's 2-core VM
    0.3 GB/s from one thread, 0.6–0.9 GB/s from two (``benchmarks/first_touch.py``); a NumPy strided assignment
    releases the GIL, so plain threads fault the array's parts in parallel. Memory this process freed a moment ago
    faults in at several GB/s, and there faulting it in first costs about one more pass over the buffer than
    letting its writer fault it (4–8 ms per 100 MB here, as the zeroed pages leave the cache before they are
    written): a few milliseconds where the cold case saves seconds. (Timing a first part of the buffer to tell the
    two apart failed: its start can be warm, recently freed memory, and the rest cold.)

    Args:
        raw: the array whose pages to fault in.
        threads: the number of threads (default: the CPUs this process may run on, at most
            :data:`PREFAULT_THREADS`).
    """
    if threads is None:
        threads = min(PREFAULT_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1)
    page = mmap.PAGESIZE
    pages = -(-raw.nbytes // page)
    bounds = [page * (pages * k // threads) for k in range(threads + 1)]

    def touch(k):
        raw[bounds[k]:bounds[k + 1]:page] = 0

    if threads <= 1:
        touch(0)
    else:
        list(_thread_pool(threads).map(touch, range(threads)))


_POOL = {}  # (process id, threads) → the ThreadPoolExecutor of prefault: started once (a new one after a fork)


def _thread_pool(threads):
    key = (os.getpid(), threads)
    if key not in _POOL:
        _POOL.clear()  # a pool inherited through fork has no threads in this process
        _POOL[key] = ThreadPoolExecutor(threads, thread_name_prefix="tfw-prefault")
    return _POOL[key]


class RowFaulter:
    """Faults in the pages of fresh (rows, ...) buffers from a background thread while their writer fills them.

    The writer fills the buffers row by row from the first row on, and between its writes runs other work that
    leaves a CPU idle (tracing, single-threaded copies, compiled calls that do not occupy every core). This
    thread faults the pages in from the last rows down meanwhile, so the writer finds more of them present. It
    writes one byte per page, so it must never touch a row the writer may have written: before writing rows up to
    ``r`` the writer calls :meth:`claim` with ``r``, and the thread touches only pages that start in unclaimed rows
    (a claim waits for the slice being touched, at most :data:`FAULT_SLICE_BYTES`).

    Args:
        rows: the number of rows of every buffer.

    Use: :meth:`add` each buffer as it is allocated (``aligned_empty(..., on_new=faulter.add)``), :meth:`start`,
    :meth:`claim` before each write, :meth:`stop` at the end (also after an error).
    """

    def __init__(self, rows: int):
        self.rows = int(rows)
        self._arrays, self._claimed = [], 0
        self._lock, self._stopping = threading.Lock(), threading.Event()
        self._thread = None

    def add(self, array: np.ndarray) -> np.ndarray:
        """Register a C-contiguous buffer of :attr:`rows` rows, not yet written; returns it."""
        if array.shape[0] != self.rows or not array.flags.c_contiguous:
            raise ValueError(f"RowFaulter takes C-contiguous buffers of {self.rows} rows, got shape {array.shape}")
        self._arrays.append(array)
        return array

    def start(self) -> None:
        """Start faulting (nothing to do when the buffers hold fewer than :data:`PREFAULT_BYTES` in all)."""
        if sum(a.nbytes for a in self._arrays) >= PREFAULT_BYTES:
            self._thread = threading.Thread(target=self._run, name="tfw-row-faulter", daemon=True)
            self._thread.start()

    def claim(self, rows: int) -> None:
        """The writer may write rows [0, ``rows``) of every buffer from now on."""
        with self._lock:
            self._claimed = max(self._claimed, int(rows))

    def stop(self) -> None:
        """Stop the thread and wait for it (it is touching at most one slice)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._arrays = []

    def _run(self):
        page = mmap.PAGESIZE
        buffers = [(flat, flat.nbytes // self.rows, flat.ctypes.data)
                   for flat in (array.reshape(-1).view(np.uint8) for array in self._arrays)]
        for row in range(self.rows - 1, -1, -1):  # the rows the writer reaches last, first
            for flat, width, address in buffers:
                begin = row * width + (-(address + row * width) % page)  # the first page start in the row
                for start in range(begin, (row + 1) * width, FAULT_SLICE_BYTES):
                    with self._lock:
                        if self._stopping.is_set() or row < self._claimed:
                            return
                        flat[start:min(start + FAULT_SLICE_BYTES, (row + 1) * width):page] = 0


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

    def empty(self, shape, dtype, on_new: Optional[Callable[[np.ndarray], object]] = None) -> np.ndarray:
        """An uninitialised, 64-byte aligned array of ``shape`` and ``dtype`` (a ``tf.DType``): a pooled one
        that nothing else refers to, else a new one (kept in the pool while it has room), made by
        :func:`aligned_empty` with ``on_new``."""
        dtype = tf.as_dtype(dtype)
        shape = tuple(int(n) for n in shape)
        arrays = self._arrays.setdefault((shape, dtype.name), [])
        for index in range(len(arrays)):
            if sys.getrefcount(arrays[index]) <= self._idle_refs:
                return arrays[index]
        array = aligned_empty(shape, dtype, on_new)
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


def host_tensor(array: np.ndarray) -> tf.Tensor:
    """A CPU tensor of a NumPy ``array``: :func:`shared_tensor` (no copy) when it is C-contiguous and 64-byte
    aligned, else a copy (``tf.constant``)."""
    if array.flags.c_contiguous and array.flags.writeable and array.ctypes.data % 64 == 0 and array.dtype != np.object_:
        return shared_tensor(array, tf.as_dtype(array.dtype))
    return tf.constant(array)


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
