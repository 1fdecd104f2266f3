"""Gram sums of a weight tensor's blocks: what the explicit form of the inverse needs from its gradients.

For a tensor of n entries cut into consecutive blocks of c entries (the last one may be shorter),
``BlockGrams`` holds Σᵢ gᵢ[b]gᵢ[b]ᵀ (c × c) for every block b and Σᵢ gᵢ (n,), summed over the m
gradients. Under several replicas these sums are all-reduced (2·(n·c + n) floats per replica) instead
of all-gathering the m × n gradient rows; :func:`cheaper_to_reduce` compares the two. Nothing here
knows about Keras.
"""
import dataclasses

import numpy as np

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class BlockGrams:
    """Sums over ``num_gradients`` gradients of one tensor of ``size`` entries in blocks of ``block_size``.

    Attributes:
        num_gradients: m, the number of gradients summed.
        block_size: c, entries per whole block.
        full: (size // block_size, c, c) float32 Gram sums Σᵢ gᵢ[b]gᵢ[b]ᵀ of the whole blocks.
        rest: (1, r, r) float32 Gram sum of the last, shorter block (r = 0 when c divides size).
        gradient_sum: (size,) float32 Σᵢ gᵢ.
    """

    num_gradients: int
    block_size: int
    full: tf.Tensor
    rest: tf.Tensor
    gradient_sum: tf.Tensor

    @property
    def size(self):
        """n, the tensor's number of entries."""
        return int(self.gradient_sum.shape[0])

    def mean_gradient(self):
        """ḡ, shape (size,).

        Returns:
            (size,) float32 mean gradient Σᵢ gᵢ / m.
        """
        return self.gradient_sum / self.num_gradients

    def mean_square(self):
        """mean(g²) per entry (the diagonal of GᵀG/m), shape (size,).

        Returns:
            (size,) float32 mean squared gradient per entry.
        """
        parts = [tf.reshape(tf.linalg.diag_part(self.full), [-1]), tf.linalg.diag_part(self.rest)[0]]
        return tf.concat(parts, axis=0) / self.num_gradients

    def grams(self, starts, length):
        """(K, length, length) Gram sums of the blocks beginning at local entries ``starts`` (K,).

        Args:
            starts: (K,) int offsets, within this tensor, of the blocks' first entries.
            length: entries per block: ``block_size`` (whole blocks, starts multiples of it) or the length
                r of the last, shorter block (then ``starts`` must be ``[size - r]``).

        Returns:
            (K, length, length) float32 Gram sums.

        Raises:
            ValueError: the blocks asked for are not those whose sums were reduced.
        """
        starts = np.asarray(starts)
        if length == self.block_size and np.all(starts % length == 0):
            return tf.gather(self.full, starts // length)
        if 0 < length == self.rest.shape[1] and starts.tolist() == [self.size - length]:
            return self.rest
        raise ValueError(f"blocks of {length} entries at {list(starts)} are not the blocks of {self.block_size} "
                         f"entries whose Gram sums were reduced for this tensor of {self.size} entries")


def partial_sums(rows, block_size):
    """(full, rest, gradient_sum) of ``rows`` (g, n) in blocks of ``block_size``, as in :class:`BlockGrams`.

    Args:
        rows: (g, n) float32 gradients of one tensor, one per row.
        block_size: c, entries per block (≥ 1).

    Returns:
        ``full`` (n // c, c, c), ``rest`` (1, r, r) with r = n mod c, and ``gradient_sum`` (n,): the sums
        over the g rows.
    """
    n = int(rows.shape[1])
    whole = n // block_size * block_size
    blocks = tf.reshape(rows[:, :whole], [-1, n // block_size, block_size])
    tail = rows[:, whole:]
    return (tf.einsum("gki,gkj->kij", blocks, blocks), tf.matmul(tail, tail, transpose_a=True)[None],
            tf.reduce_sum(rows, axis=0))


def gradient_moments(pieces):
    """(ḡ, mean(g²)), each (d,) float32, of gradient pieces: (m, n) row matrices or :class:`BlockGrams`.

    Args:
        pieces: per tensor, an (m, n) gradient matrix (any float dtype, one gradient per row) or its
            :class:`BlockGrams`; d is the sum of their n.

    Returns:
        ``(mean, mean_square)``: (d,) float32 mean gradient and mean squared gradient per entry.
    """
    means, squares = [], []
    for piece in pieces:
        if isinstance(piece, BlockGrams):
            means.append(piece.mean_gradient())
            squares.append(piece.mean_square())
        else:
            rows = tf.cast(piece, tf.float32)
            means.append(tf.reduce_mean(rows, axis=0))
            squares.append(tf.reduce_mean(tf.square(rows), axis=0))
    return tf.concat(means, axis=0), tf.concat(squares, axis=0)


def reduced_bytes(size, block_size):
    """Bytes of the float32 sums of one tensor: n·c (full blocks) + r² (the rest) + n (gradient sum).

    Args:
        size: n, the tensor's entries.
        block_size: c, entries per block.

    Returns:
        4·(n·c + r² + n) bytes, where n·c counts only the whole blocks' entries and r = n mod c.
    """
    whole = size // block_size * block_size
    return 4 * (whole * block_size + (size - whole) ** 2 + size)


def cheaper_to_reduce(size, block_size, num_gradients, gradient_itemsize):
    """True when all-reducing the sums costs fewer bytes than all-gathering the m × n rows.

    A ring all-reduce moves twice its payload.

    Args:
        size: n, the tensor's entries.
        block_size: c, entries per block.
        num_gradients: m, the number of gradient rows.
        gradient_itemsize: bytes per stored gradient entry (4 for float32, 2 for float16/bfloat16).

    Returns:
        Whether 2 · :func:`reduced_bytes` < m · n · gradient_itemsize.
    """
    return 2 * reduced_bytes(size, block_size) < num_gradients * size * gradient_itemsize


def reduced_block_size(size, block_size, num_gradients, gradient_itemsize):
    """The block size whose Gram sums a tensor of ``size`` entries exchanges instead of its rows, or None (rows).

    Args:
        size: n, the tensor's entries.
        block_size: the Fisher block size: None (the whole tensor), an int, or 'model' (blocks across
            tensors: rows).
        num_gradients: m, the number of gradient rows.
        gradient_itemsize: bytes per stored gradient entry.

    Returns:
        min(block_size, size) (or size for None) when :func:`cheaper_to_reduce`, else None.
    """
    if block_size == "model":
        return None
    block = size if block_size is None else min(block_size, size)
    return block if cheaper_to_reduce(size, block, num_gradients, gradient_itemsize) else None
