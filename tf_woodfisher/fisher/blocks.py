"""Block-diagonal partitions of a flat parameter vector of length d.

A partition cuts each segment (one per layer weight) into blocks: the whole segment
(``block_size=None``), chunks of ``block_size`` entries (the last chunk of a segment may be
shorter), or one block for all d entries (``block_size='model'``). Blocks of equal size are
grouped so that the inverse-Fisher engine processes each group as one batched tensor.
"""
import dataclasses

import numpy as np


def validate_block_size(block_size):
    """Raise ValueError unless ``block_size`` is None, 'model' or a positive int."""
    if block_size is not None and block_size != "model" and (
            isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0):
        raise ValueError(f"fisher_block_size must be None, 'model' or a positive int, got {block_size!r}")


def segment_chunks(size, block_size):
    """[(chunk length, count), ...] of one segment of ``size`` entries cut into chunks of ``block_size``
    (None: the whole segment): full chunks first, then the shorter remainder. The one rule of chunking."""
    step = size if block_size is None else min(int(block_size), size)
    full, rest = divmod(size, step)
    return [(step, full)] + ([(rest, 1)] if rest else [])


def group_sizes(segment_sizes, block_size):
    """{block size c: number of blocks K} of the partition of ``segment_sizes`` (as BlockPartition groups
    them), computed without building the indices (the memory planner's view)."""
    validate_block_size(block_size)
    if block_size == "model":
        return {int(sum(segment_sizes)): 1}
    groups = {}
    for size in segment_sizes:
        for length, count in segment_chunks(int(size), block_size):
            groups[length] = groups.get(length, 0) + count
    return groups


def lowrank_flops(m, c):
    """Flops per block of the low-rank form: GGᵀ, Cholesky of K, L⁻¹G."""
    return 2 * m * m * c + m ** 3 / 3 + m * m * c


def explicit_flops(m, c):
    """Flops per block of the explicit form: GᵀG, Cholesky of F, L⁻¹ by a triangular solve."""
    return 2 * c * c * m + c ** 3 / 3 + c ** 3


def choose_form(m, c):
    """The form of the inverse of blocks of c entries from m gradients: 'lowrank' for c ≥ 2m (fewer flops
    and no cancellation), else 'explicit'. The one rule, shared by the engine and the memory planner."""
    return "lowrank" if c >= 2 * m and lowrank_flops(m, c) < explicit_flops(m, c) else "explicit"


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """``indices``: int64 (num_blocks, block_size), positions in the flat vector of each block."""

    indices: np.ndarray

    @property
    def num_blocks(self):
        return self.indices.shape[0]

    @property
    def block_size(self):
        return self.indices.shape[1]


@dataclasses.dataclass(frozen=True)
class BlockPartition:
    """A partition of ``range(dim)`` into blocks, grouped by size.

    ``inverse_order`` maps the concatenation of all groups' flattened indices back to the flat order.
    """

    dim: int
    groups: tuple
    inverse_order: np.ndarray

    @classmethod
    def from_segments(cls, segment_sizes, block_size=None):
        """Partition consecutive segments of the given sizes (entries) into blocks.

        ``block_size``: None (one block per segment), a positive int (chunks of that many entries,
        never crossing a segment boundary), or 'model' (one block for everything).
        """
        sizes = [int(s) for s in segment_sizes]
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"segment sizes must be positive, got {sizes}")
        dim = sum(sizes)
        validate_block_size(block_size)
        by_size = {}
        start = 0
        for size in sizes if block_size != "model" else [dim]:
            offset = start
            for length, count in segment_chunks(size, block_size if block_size != "model" else None):
                by_size.setdefault(length, []).extend(range(offset, offset + length * count, length))
                offset += length * count
            start += size
        groups = tuple(
            BlockGroup(np.asarray(begins, dtype=np.int64)[:, None] + np.arange(length, dtype=np.int64)[None, :])
            for length, begins in sorted(by_size.items(), reverse=True)
        )
        order = np.concatenate([g.indices.reshape(-1) for g in groups])
        return cls(dim=dim, groups=groups, inverse_order=np.argsort(order, kind="stable"))

    @property
    def num_blocks(self):
        return sum(g.num_blocks for g in self.groups)

    @property
    def max_block_size(self):
        return max(g.block_size for g in self.groups)
