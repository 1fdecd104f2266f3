"""Block-diagonal partitions of a flat parameter vector of length d.

A partition cuts each segment (one per layer weight) into blocks: the whole segment
(``block_size=None``), chunks of ``block_size`` entries (the last chunk of a segment may be
shorter), or one block for all d entries (``block_size='model'``). Blocks of equal size are
grouped so that the inverse-Fisher engine processes each group as one batched tensor.

With a sparsity structure (tfmot's blocks or N:M groups), chunks are aligned to it: each chunk
holds whole groups of weights, so that a group's OBS submatrix (F⁻¹)_QQ lies inside one block.
The same alignment to :func:`output_unit_groups` gives chunks of whole filters
(``fisher_block_order='filter'``).
"""
import dataclasses

import numpy as np

from tf_woodfisher.fisher.host import aligned_empty


def validate_block_size(block_size):
    """Raise ValueError unless ``block_size`` is None, 'model' or a positive int.

    Args:
        block_size: the Fisher block size to check (``fisher_block_size``): None, ``'model'`` or an int ≥ 1
            (Python or NumPy int; bools refused), in entries.

    Raises:
        ValueError: any other value.
    """
    if block_size is not None and block_size != "model" and (
            isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size <= 0):
        raise ValueError(f"fisher_block_size must be None, 'model' or a positive int, got {block_size!r}")


def segment_chunks(size, block_size):
    """[(chunk length, count), ...] of one segment of ``size`` entries cut into chunks of ``block_size``.

    Full chunks first, then the shorter remainder. The one rule of chunking.

    Args:
        size: entries of the segment, ≥ 1.
        block_size: entries per chunk (an int ≥ 1; larger than ``size`` means one chunk), or None for the
            whole segment.

    Returns:
        A list of one or two ``(chunk length, count)`` pairs of ints: ``count`` chunks of ``chunk length``
        entries each, whose lengths sum to ``size``.
    """
    step = size if block_size is None else min(int(block_size), size)
    full, rest = divmod(size, step)
    return [(step, full)] + ([(rest, 1)] if rest else [])


def group_sizes(segment_sizes, block_size, unit_sizes=None):
    """{block size c: number of blocks K} of the partition of ``segment_sizes``, as BlockPartition groups them.

    Computed without building the indices (the memory planner's view).

    Args:
        segment_sizes: entries of each segment (one per weight tensor), ints ≥ 1.
        block_size: None (one block per segment), an int ≥ 1 (chunks of that many entries, never crossing a
            segment boundary) or ``'model'`` (one block of all entries).
        unit_sizes: None, or per segment the entries of each of its equal groups when an int ``block_size``
            chunks hold whole groups (the output units of ``fisher_block_order='filter'``, see
            :func:`output_unit_groups`): chunks of max(1, c // s) units of s entries, as
            ``from_segments(groups=...)`` cuts them.

    Returns:
        A dict mapping block size c (entries) to the number K of blocks of that size.

    Raises:
        ValueError: a bad ``block_size`` (see :func:`validate_block_size`), or unit sizes that do not divide
            their segments.
    """
    validate_block_size(block_size)
    if block_size == "model":
        return {int(sum(segment_sizes)): 1}
    groups = {}
    aligned = unit_sizes is not None and block_size is not None
    for number, size in enumerate(segment_sizes):
        if aligned:
            unit = int(unit_sizes[number])
            if unit < 1 or size % unit:
                raise ValueError(f"unit size {unit} does not divide segment {number} of {size} entries")
            chunks = [(units * unit, count) for units, count in group_chunks(size // unit, unit, block_size)]
        else:
            chunks = segment_chunks(int(size), block_size)
        for length, count in chunks:
            groups[length] = groups.get(length, 0) + count
    return groups


def output_unit_groups(shape):
    """The output unit of each entry of a weight of ``shape``, for ``BlockPartition.from_segments(groups=...)``.

    A unit is a slice along the last axis (a convolution's filter, a Dense unit's column): chunks aligned to
    these groups hold whole units (``fisher_block_order='filter'``). A weight of rank ≤ 1 has one unit per
    entry, so its aligned chunks are the flat ones.

    Args:
        shape: the weight's shape, a sequence of ints (row-major flattening, as the flat parameter vector).

    Returns:
        int64 (size,): entry j's unit, j mod shape[-1] for rank ≥ 2, else j.
    """
    shape = [int(s) for s in shape]
    size = int(np.prod(shape, dtype=np.int64))
    entries = np.arange(size, dtype=np.int64)
    return entries % shape[-1] if len(shape) >= 2 else entries


def output_unit_size(shape):
    """Entries of each output unit of a weight of ``shape`` (see :func:`output_unit_groups`): the product of all
    axes but the last for rank ≥ 2, else 1."""
    shape = [int(s) for s in shape]
    return int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) >= 2 else 1


def lowrank_flops(m, c):
    """Flops per block of the low-rank form: GGᵀ, Cholesky of K, L⁻¹G.

    Args:
        m: number of gradients (rows of the block's (m, c) gradient matrix G).
        c: entries in the block.

    Returns:
        The flop count 2m²c + m³/3 + m²c (a float).
    """
    return 2 * m * m * c + m ** 3 / 3 + m * m * c


def explicit_flops(m, c):
    """Flops per block of the explicit form: GᵀG, Cholesky of F, L⁻¹ by a triangular solve.

    Args:
        m: number of gradients (rows of the block's (m, c) gradient matrix G).
        c: entries in the block.

    Returns:
        The flop count 2c²m + c³/3 + c³ (a float).
    """
    return 2 * c * c * m + c ** 3 / 3 + c ** 3


def choose_form(m, c):
    """The form of the inverse of blocks of c entries from m gradients.

    'lowrank' for c ≥ 2m (fewer flops and no cancellation), else 'explicit'. The one rule, shared by the
    engine and the memory planner.

    Args:
        m: number of gradients.
        c: entries in each block.

    Returns:
        ``'lowrank'`` when c ≥ 2m and :func:`lowrank_flops` < :func:`explicit_flops`, else ``'explicit'``.
    """
    return "lowrank" if c >= 2 * m and lowrank_flops(m, c) < explicit_flops(m, c) else "explicit"


@dataclasses.dataclass(frozen=True)
class BlockGroup:
    """Blocks of one size of a :class:`BlockPartition`.

    Attributes:
        indices: int64 (num_blocks, block_size), positions in the flat vector of each block.
    """

    indices: np.ndarray

    @property
    def num_blocks(self):
        """Number of blocks in the group (rows of ``indices``)."""
        return self.indices.shape[0]

    @property
    def block_size(self):
        """Entries per block (columns of ``indices``)."""
        return self.indices.shape[1]


@dataclasses.dataclass(frozen=True)
class BlockPartition:
    """A partition of ``range(dim)`` into blocks, grouped by size.

    Attributes:
        dim: d, the length of the flat parameter vector.
        groups: the :class:`BlockGroup` of each block size, largest blocks first.
        inverse_order: int64 (d,); maps the concatenation of all groups' flattened indices back to the
            flat order (64-byte aligned when made by :meth:`from_segments`, so a tensor can share it).
    """

    dim: int
    groups: tuple
    inverse_order: np.ndarray

    @classmethod
    def from_segments(cls, segment_sizes, block_size=None, groups=None):
        """Partition consecutive segments of the given sizes (entries) into blocks.

        Args:
            segment_sizes: entries of each segment (one per weight tensor), all ≥ 1.
            block_size: None (one block per segment), a positive int (chunks of that many entries,
                never crossing a segment boundary), or 'model' (one block for everything).
            groups: None, or per segment an int array (size,) giving the group (0, 1, ...) of each of
                its entries, e.g. a sparsity block or an N:M group. With an int ``block_size`` every
                chunk then holds whole groups: max(1, block_size // s) groups of s entries (groups taken
                by size, largest first, then by number; the entries of a chunk are those of its groups
                in order), so chunk boundaries are rounded to the pattern. Ignored for None and 'model',
                whose blocks contain whole segments.

        Returns:
            The :class:`BlockPartition` of ``range(sum(segment_sizes))``.

        Raises:
            ValueError: a non-positive segment size, a bad ``block_size``, or ``groups`` that do not match
                the segments.
        """
        sizes = [int(s) for s in segment_sizes]
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"segment sizes must be positive, got {sizes}")
        dim = sum(sizes)
        validate_block_size(block_size)
        if groups is not None and len(groups) != len(sizes):
            raise ValueError(f"groups has {len(groups)} entries for {len(sizes)} segments")
        by_size = {}
        start = 0
        for number, size in enumerate(sizes if block_size != "model" else [dim]):
            if groups is not None and isinstance(block_size, (int, np.integer)):
                for blocks in _aligned_chunks(np.asarray(groups[number]), size, int(block_size)):
                    by_size.setdefault(blocks.shape[1], []).append(start + blocks)
            else:
                offset = start
                for length, count in segment_chunks(size, block_size if block_size != "model" else None):
                    begins = np.arange(offset, offset + length * count, length, dtype=np.int64)
                    by_size.setdefault(length, []).append(begins[:, None] + np.arange(length, dtype=np.int64))
                    offset += length * count
            start += size
        groups = tuple(BlockGroup(blocks[0] if len(blocks) == 1 else np.concatenate(blocks))
                       for _, blocks in sorted(by_size.items(), reverse=True))
        # the groups' entries, concatenated, are a permutation of range(dim): its inverse, scattered group by
        # group (no argsort, no concatenated copy: ResNet-50's 25.5M entries are 204 MB per int64 copy)
        inverse_order, position = aligned_empty((dim,), np.int64), 0
        for group in groups:
            count = group.indices.size
            inverse_order[group.indices.reshape(-1)] = np.arange(position, position + count, dtype=np.int64)
            position += count
        return cls(dim=dim, groups=groups, inverse_order=inverse_order)

    @property
    def num_blocks(self):
        """Total number of blocks over all groups."""
        return sum(g.num_blocks for g in self.groups)

    @property
    def max_block_size(self):
        """Entries of the largest block."""
        return max(g.block_size for g in self.groups)


def _aligned_chunks(group_of, size, block_size):
    """Chunks of one segment made of whole groups: a list of (count, length) int64 arrays of local entries.

    ``group_of``: (size,) group number of each entry. Groups of s entries go max(1, block_size // s) to a
    chunk, the groups of each size in order of their number (a loop over the few distinct sizes).
    """
    group_of = group_of.astype(np.int64).reshape(-1)
    if group_of.shape != (size,) or (size and group_of.min() < 0):
        raise ValueError(f"the groups of a segment of {size} entries must be {size} group numbers ≥ 0, "
                         f"got shape {group_of.shape}")
    counts = np.bincount(group_of)
    members = np.argsort(group_of, kind="stable")  # entries group by group, each group in entry order
    starts = np.cumsum(counts) - counts
    chunks = []
    for length in sorted(set(counts[counts > 0].tolist()), reverse=True):
        numbers = np.flatnonzero(counts == length)
        entries = members[starts[numbers][:, None] + np.arange(length)]  # (groups of this size, length)
        full = 0
        for chunk_groups, count in group_chunks(len(numbers), length, block_size):
            chunks.append(entries[full:full + chunk_groups * count].reshape(count, chunk_groups * length))
            full += chunk_groups * count
    return chunks


def group_chunks(num_groups, length, block_size):
    """[(groups per chunk, number of chunks), ...] of ``num_groups`` groups of ``length`` entries each, packed
    max(1, block_size // length) to a chunk, the remainder in one shorter chunk (the rule of chunks of whole
    groups: :meth:`BlockPartition.from_segments` with ``groups=``, and the planner's :func:`group_sizes`)."""
    per_chunk = max(1, int(block_size) // int(length))
    full, rest = divmod(int(num_groups), per_chunk)
    return [(per_chunk, full)] * bool(full) + [(rest, 1)] * bool(rest)
