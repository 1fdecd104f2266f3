"""Block-diagonal partitions of a flat parameter vector of length d.

A partition cuts each segment (one per layer weight) into blocks: the whole segment
(``block_size=None``), chunks of ``block_size`` entries (the last chunk of a segment may be
shorter), or one block for all d entries (``block_size='model'``). Blocks of equal size are
grouped so that the inverse-Fisher engine processes each group as one batched tensor.
"""
import dataclasses

import numpy as np


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
        if block_size == "model":
            chunks = [(0, dim)]
        else:
            if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                           or block_size <= 0):
                raise ValueError(f"block_size must be None, 'model' or a positive int, got {block_size!r}")
            chunks = []
            start = 0
            for size in sizes:
                step = size if block_size is None else int(block_size)
                chunks += [(start + s, min(step, size - s)) for s in range(0, size, step)]
                start += size
        by_size = {}
        for begin, length in chunks:
            by_size.setdefault(length, []).append(begin)
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
