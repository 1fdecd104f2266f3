"""Memory planner of a pruning event: byte estimates, and the plan that keeps them under ``max_memory``.

The estimates are of the gradients and of every block group.

The estimates count the engine's large buffers: the m × d gradients (one matrix per weight tensor), one chunk
of per-sample gradient rows, each block group's factorisation workspace and what the inverse keeps of it (a
block that is a whole tensor is a view of its gradients), and the event's flat (d,) vectors (weights, masks,
scores, block indices). Once the gradient function has traced (the first chunk of an event), a chunk's
transient bytes (its activations, their output gradients and the contractions' temporaries:
:mod:`graph_memory`'s liveness estimate of the traced graph, times TRANSIENT_MARGIN) are counted too
(``EventShape.transient_bytes``). TensorFlow's runtime and the model's weights are not counted. When the
one-pass plan does not fit, consecutive prunable tensors are grouped into stages whose gradients are computed one
stage at a time (and, when the stages' inverses cannot all be kept, recomputed for the weight update). Blocks
never cross tensors, so a staged event prunes exactly as the one-pass event does. Nothing here knows about
Keras or TensorFlow; block grouping and the choice of form come from :mod:`blocks`, as in the engine.
"""
import dataclasses
import os
import re
from typing import Optional

import numpy as np

from tf_woodfisher.fisher.blocks import choose_form, group_sizes

CHUNK_BYTES = 256 * 2 ** 20  # target bytes of one chunk's per-sample gradient rows
MAX_CHUNK_ROWS = 256
CHUNK_COPIES = 3  # float32 copies of a chunk alive at once: the rows, the masked rows, the stored rows
# One chunk holds all m gradients when their float32 rows fit CHUNK_BYTES and the call reads at most this many
# samples (see whole_chunk)
MAX_WHOLE_CHUNK_SAMPLES = 4096  # = MAX_CHUNK_ROWS groups of 16, what a chunk of groups of 16 samples reads
# the gradient stage's measured peak reached 1.21 × (rows + the liveness estimate of a chunk's transient bytes)
# (benchmarks/perf_chunk_memory.py: the executor runs independent ops at once, oneDNN reorders into its own layouts)
TRANSIENT_MARGIN = 1.5
MEMORY_FRACTION = 0.5  # default max_memory: this fraction of the memory available when planning
VECTOR_BYTES_PER_WEIGHT = 64  # ≈ 10 float32 and 2 int64 (d,) vectors alive during an event
GRADIENT_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}  # bytes per entry of each storage dtype
COMPUTE_DTYPES = {"float32": 4, "float64": 8}
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


class MemoryBudgetError(ValueError):
    """No plan of a pruning event fits ``max_memory``; raised before anything large is allocated."""


def available_memory():
    """Bytes of memory available to this process now (MemAvailable of /proc/meminfo, else free pages).

    Returns:
        The available memory in bytes (an int).
    """
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_bytes(value):
    """Bytes from an int, a float, or a string such as '4GB', '4 GiB' or '512MB'; None → the default.

    The default is MEMORY_FRACTION of :func:`available_memory`.

    Args:
        value: a positive number of bytes, a string of a number and a unit (B, kB/MB/GB/TB decimal,
            KiB/MiB/GiB/TiB binary, case-insensitive; no unit: bytes), or None.

    Returns:
        The number of bytes, as an int.

    Raises:
        ValueError: a string that is not a number with a known unit, a non-positive or non-finite number,
            a bool or another type.
    """
    if value is None:
        return int(MEMORY_FRACTION * available_memory())
    if isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"max_memory must be a number of bytes or a string such as '4GB', got {value!r}")
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or value <= 0:
        raise ValueError(f"max_memory must be a positive number of bytes or a string such as '4GB', got {value!r}")
    return int(value)


def format_bytes(count):
    """'6.53 GB', '412 MB' (decimal units, as ``max_memory`` strings).

    Args:
        count: a number of bytes.

    Returns:
        The count in GB with two decimals from 1 GB on, else in whole MB.
    """
    return f"{count / 1e9:.2f} GB" if count >= 1e9 else f"{count / 1e6:.0f} MB"


def default_chunk(dim, num_gradients, fisher_batch_size=1, itemsize=4):
    """Gradients per chunk.

    All m gradients in one chunk when :func:`whole_chunk` holds (their float32 rows are then stored as they
    are, never copied); else as many as keep one chunk's rows, CHUNK_COPIES times, near CHUNK_BYTES, at most
    MAX_CHUNK_ROWS.

    Args:
        dim: d, entries per gradient.
        num_gradients: m, the number of gradients of the event.
        fisher_batch_size: b, samples per gradient.
        itemsize: bytes per stored gradient entry (4 float32, 2 float16/bfloat16).

    Returns:
        The rows per chunk, an int in [1, m].
    """
    if whole_chunk(dim, num_gradients, fisher_batch_size, itemsize):
        return int(num_gradients)
    return int(np.clip(CHUNK_BYTES // (4 * dim * CHUNK_COPIES), 1, min(num_gradients, MAX_CHUNK_ROWS)))


def whole_chunk(dim, num_gradients, fisher_batch_size=1, itemsize=4):
    """Whether :func:`default_chunk` computes all m gradients in one call.

    Args:
        dim: d, entries per gradient.
        num_gradients: m.
        fisher_batch_size: b, samples per gradient.
        itemsize: bytes per stored gradient entry (only float32 storage, 4, keeps the rows as they are).

    Returns:
        True when the gradients are stored in float32, their rows fit one chunk's bytes (4·m·d ≤ CHUNK_BYTES;
        larger calls ran slower: ResNet-20's 256 × 270,896 rows took 1.4 times as long in one call as in chunks of 82)
        and the call reads at most MAX_WHOLE_CHUNK_SAMPLES samples (m·b).
    """
    return (itemsize == 4 and 4 * dim * num_gradients <= CHUNK_BYTES
            and num_gradients * fisher_batch_size <= MAX_WHOLE_CHUNK_SAMPLES)


def collection_bytes(dim, num_gradients, itemsize, fisher_batch_size=1):
    """Peak bytes while the (num_gradients, dim) gradients are collected.

    Args:
        dim: d, entries per gradient.
        num_gradients: m, the number of gradients.
        itemsize: bytes per stored gradient entry (4 float32, 2 float16/bfloat16).
        fisher_batch_size: b, samples per gradient (with m it decides whether one chunk holds them all).

    Returns:
        Bytes: with one chunk (:func:`whole_chunk`), its float32 rows plus the m × d stored gradients (their
        masked copy; unmasked rows are stored as they are); else CHUNK_COPIES float32 copies of one chunk plus
        the m × d stored gradients.
    """
    if whole_chunk(dim, num_gradients, fisher_batch_size, itemsize):
        return 4 * num_gradients * dim + num_gradients * dim * itemsize
    chunk = default_chunk(dim, num_gradients, fisher_batch_size, itemsize)
    return 4 * CHUNK_COPIES * chunk * dim + num_gradients * dim * itemsize


def group_bytes(form, num_blocks, m, c, itemsize, copied=True):
    """(workspace, kept, viewed) bytes of factorising K = num_blocks blocks of c entries from m gradients.

    Low-rank: the workspace holds L⁻¹G (K, m, c), the gram and its factor (K, m, m); it keeps the blocks,
    the factor and the diagonal (viewed: the gradients its views keep alive). Explicit: F, L and L⁻¹
    (K, c, c); it keeps L⁻¹ and the diagonal.

    Args:
        form: ``'lowrank'`` or ``'explicit'`` (see :func:`~tf_woodfisher.fisher.blocks.choose_form`).
        num_blocks: K, blocks in the group.
        m: number of gradients.
        c: entries per block.
        itemsize: bytes per entry in the inverse's dtype (4 float32, 8 float64).
        copied: the blocks (K, m, c) are a copy of the gradients (twice while transposed), not a view.

    Returns:
        ``(workspace, kept, viewed)`` in bytes: the peak workspace of the factorisation, what the inverse
        keeps afterwards, and the gradient bytes its views keep alive (0 unless low-rank and not copied).
    """
    blocks = num_blocks * m * c
    gathered = 2 * blocks if copied else 0
    if form == "lowrank":
        square = num_blocks * m * m
        kept = (blocks if copied else 0) + square + num_blocks * c
        return itemsize * (gathered + blocks + 2 * square), itemsize * kept, itemsize * blocks * (not copied)
    square = num_blocks * c * c
    return itemsize * (gathered + 3 * square), itemsize * (square + num_blocks * c), 0


def inverse_bytes(segment_sizes, block_size, m, itemsize, views=True, unit_sizes=None):
    """(peak, kept, viewed) bytes of the inverse of tensors of ``segment_sizes`` entries.

    Built group by group, largest blocks first (as InverseFisher does).

    Args:
        segment_sizes: entries of each tensor.
        block_size: the Fisher block size: None, an int or ``'model'``.
        m: number of gradients.
        itemsize: bytes per entry in the inverse's dtype.
        views: blocks that are whole tensors are views of their gradients (given per tensor, in the
            inverse's dtype), one group each, never copies.
        unit_sizes: None, or per tensor the entries of its output units when chunks hold whole units
            (:func:`~tf_woodfisher.fisher.blocks.group_sizes`); such blocks are gathered copies, never views.

    Returns:
        ``(peak, kept, viewed)`` in bytes: the peak while building, what the inverse keeps, and the gradient
        bytes its views keep alive.
    """
    peak = kept = viewed = 0
    groups = group_sizes(segment_sizes, block_size, unit_sizes)
    views = views and unit_sizes is None
    for c in sorted(groups, reverse=True):
        whole = views and groups[c] == sum(size == c for size in segment_sizes)  # every block of size c
        for count in [1] * groups[c] if whole else [groups[c]]:
            workspace, keeps, views_kept = group_bytes(choose_form(m, c), count, m, c, itemsize, copied=not whole)
            peak = max(peak, kept + workspace)
            kept += keeps
            viewed += views_kept
    return peak, kept, viewed


@dataclasses.dataclass(frozen=True)
class EventShape:
    """What the planner needs to know about a pruning event.

    Attributes:
        segment_sizes: entries of each prunable tensor, in order.
        num_gradients: m.
        fisher_block_size: None, an int or ``'model'``.
        gradient_dtype: storage of the gradients (``'float32'``, ``'float16'``, ``'bfloat16'``).
        inverse_dtype: of the inverse (``'float32'``, ``'float64'``).
        needs_inverse: WoodFisher / WoodTaylor.
        needs_update: the OBS update reads the inverse again after the scores.
        needs_moments: the mean (WoodTaylor) or mean square (diagonal Fisher) of the gradients.
        unit_sizes: None, or per tensor the entries of one output unit when int-size chunks hold whole units
            (``fisher_block_order='filter'``: blocks of max(1, c // s) units, gathered, never views).
        fisher_batch_size: b, samples per gradient (whether one chunk holds all m gradients depends on m·b).
        transient_bytes: bytes one gradient chunk's call allocates besides its rows (activations, output
            gradients, contraction temporaries), counted in every stage's collection; 0 until the gradient
            function has traced (``Pruner`` sets it from the first chunk).

    Raises:
        ValueError: an unknown ``gradient_dtype`` or ``inverse_dtype``.
    """

    segment_sizes: tuple  # entries of each prunable tensor, in order
    num_gradients: int  # m
    fisher_block_size: object = None  # None, an int or 'model'
    gradient_dtype: str = "float32"  # storage of the gradients
    inverse_dtype: str = "float32"  # of the inverse
    needs_inverse: bool = True  # WoodFisher / WoodTaylor
    needs_update: bool = True  # the OBS update reads the inverse again after the scores
    needs_moments: bool = False  # the mean (WoodTaylor) or mean square (diagonal Fisher) of the gradients
    unit_sizes: Optional[tuple] = None  # per tensor, entries of an output unit ('filter' chunks), or None
    fisher_batch_size: int = 1  # b, samples per gradient
    transient_bytes: int = 0  # a gradient chunk's activations and temporaries (0: not traced yet)

    def __post_init__(self):
        if self.gradient_dtype not in GRADIENT_DTYPES:
            raise ValueError(f"gradient_dtype must be one of {tuple(GRADIENT_DTYPES)}, got {self.gradient_dtype!r}")
        if self.inverse_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"inverse_dtype must be one of {tuple(COMPUTE_DTYPES)}, got {self.inverse_dtype!r}")

    @property
    def dim(self):
        """d, the total entries of the prunable tensors."""
        return int(sum(self.segment_sizes))

    @property
    def vector_bytes(self):
        """Bytes of the event's flat (d,) vectors: VECTOR_BYTES_PER_WEIGHT × d."""
        return VECTOR_BYTES_PER_WEIGHT * self.dim

    def gradient_bytes(self, begin=0, end=None):
        """Bytes of the stored gradients of tensors [begin, end).

        Args:
            begin: index of the first tensor.
            end: index past the last tensor (None: to the end).

        Returns:
            m × (their entries) × the gradient dtype's itemsize, in bytes.
        """
        return self.num_gradients * int(sum(self.segment_sizes[begin:end])) * GRADIENT_DTYPES[self.gradient_dtype]

    def stage_bytes(self, begin, end):
        """(peak, kept) bytes of the stage of tensors [begin, end): collection, then gradients + inverse.

        Args:
            begin: index of the stage's first tensor.
            end: index past its last tensor.

        Returns:
            ``(peak, kept)`` in bytes; kept: what its inverse holds (views of its gradients included) once
            the stage is done (0 without an inverse).
        """
        sizes = self.segment_sizes[begin:end]
        dim, m = int(sum(sizes)), self.num_gradients
        collect = collection_bytes(dim, m, GRADIENT_DTYPES[self.gradient_dtype], self.fisher_batch_size) \
            + self.transient_bytes
        stored = self.gradient_bytes(begin, end)
        moments = 2 * m * dim * 4 if self.needs_moments else 0  # the float32 matrix and its squares or mean
        if not self.needs_inverse:
            return max(collect, stored + moments), 0
        units = None if self.unit_sizes is None else self.unit_sizes[begin:end]
        peak, kept, viewed = inverse_bytes(sizes, self.fisher_block_size, m, COMPUTE_DTYPES[self.inverse_dtype],
                                           views=self.gradient_dtype == self.inverse_dtype, unit_sizes=units)
        return max(collect, stored + max(peak, kept + moments)), kept + viewed


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """How one event runs.

    Attributes:
        stages: (begin, end) ranges of consecutive tensors, each one gradient pass.
        keep_inverse: the stages' inverses are kept from the scores to the update (else their gradients
            are recomputed and the inverse rebuilt).
        peak_bytes: the estimate of the peak, in bytes.
        max_memory: the budget, in bytes.
        shape: the :class:`EventShape` planned.
    """

    stages: tuple
    keep_inverse: bool
    peak_bytes: int
    max_memory: int
    shape: EventShape

    @property
    def streamed(self):
        """Whether the event runs in more than one stage."""
        return len(self.stages) > 1

    @property
    def gradient_passes(self):
        """Passes over the Fisher data: one per stage, twice when inverses are rebuilt for the update."""
        rebuild = self.shape.needs_inverse and self.shape.needs_update and not self.keep_inverse
        return len(self.stages) * (2 if rebuild else 1)

    def __str__(self):
        how = "one pass" if not self.streamed else (
            f"{len(self.stages)} stages of tensors, {self.gradient_passes} gradient passes")
        return (f"{how}, {self.shape.gradient_dtype} gradients ({format_bytes(self.shape.gradient_bytes())} in all): "
                f"estimated peak {format_bytes(self.peak_bytes)} of max_memory {format_bytes(self.max_memory)}")


def _greedy_stages(shape, budget, keep):
    """Longest runs of consecutive tensors whose stage fits ``budget`` next to what earlier stages keep.

    Returns (stages, peak) or None when a single tensor does not fit.
    """
    stages, begin, resident, peak, count = [], 0, shape.vector_bytes, 0, len(shape.segment_sizes)
    while begin < count:
        end, (stage_peak, stage_kept) = begin + 1, shape.stage_bytes(begin, begin + 1)
        if resident + stage_peak > budget:
            return None
        while end < count:
            longer = shape.stage_bytes(begin, end + 1)
            if resident + longer[0] > budget:
                break
            end, (stage_peak, stage_kept) = end + 1, longer
        stages.append((begin, end))
        peak = max(peak, resident + stage_peak)
        resident += stage_kept if keep else 0
        begin = end
    return tuple(stages), peak


def leanest_bytes(shape):
    """The smallest peak of any plan: one tensor per stage (the whole model for fisher_block_size='model').

    Args:
        shape: the :class:`EventShape`.

    Returns:
        The peak in bytes, the flat vectors included.
    """
    if shape.fisher_block_size == "model":
        return shape.vector_bytes + shape.stage_bytes(0, len(shape.segment_sizes))[0]
    return shape.vector_bytes + max(shape.stage_bytes(i, i + 1)[0] for i in range(len(shape.segment_sizes)))


def plan_memory(shape, max_memory=None):
    """The cheapest :class:`MemoryPlan` of ``shape`` (an :class:`EventShape`) within ``max_memory``.

    Plans, in order of cost: one pass; stages keeping their inverses; stages recomputing gradients for
    the update.

    Args:
        shape: the :class:`EventShape` of the event.
        max_memory: bytes or a string ('4GB'); None: MEMORY_FRACTION of the available memory.

    Returns:
        The first :class:`MemoryPlan` that fits.

    Raises:
        MemoryBudgetError: no plan fits (the message gives the numbers and the settings that would fit).
        ValueError: a bad ``max_memory`` (see :func:`parse_bytes`).
    """
    budget = parse_bytes(max_memory)
    count = len(shape.segment_sizes)
    one_pass = shape.vector_bytes + shape.stage_bytes(0, count)[0]
    if one_pass <= budget:
        return MemoryPlan(((0, count),), True, one_pass, budget, shape)
    if shape.fisher_block_size != "model":
        for keep in (True, False) if shape.needs_inverse and shape.needs_update else (False,):
            staged = _greedy_stages(shape, budget, keep)
            if staged is not None:
                return MemoryPlan(staged[0], keep, staged[1], budget, shape)
    raise MemoryBudgetError(_budget_message(shape, budget, one_pass))


def _budget_message(shape, budget, one_pass):
    needed = leanest_bytes(shape)
    what = ("fisher_block_size='model' is one block over all tensors and cannot be streamed: it needs "
            f"{format_bytes(one_pass)}" if shape.fisher_block_size == "model" else
            f"the leanest plan (one tensor at a time, largest {max(shape.segment_sizes):,} entries) needs "
            f"{format_bytes(needed)}")
    options = [f"max_memory ≥ {format_bytes(needed)}"]
    alternatives = {"gradient_dtype='bfloat16'": dict(gradient_dtype="bfloat16"),
                    "inverse_dtype='float32'": dict(inverse_dtype="float32"),
                    "fisher_block_size=None (one block per tensor, streamable)": dict(fisher_block_size=None),
                    f"num_gradients={max(1, shape.num_gradients // 2)}":
                        dict(num_gradients=max(1, shape.num_gradients // 2))}
    for label, change in alternatives.items():
        other_needs = leanest_bytes(dataclasses.replace(shape, **change))
        if other_needs < needed:
            options.append(f"{label} (needs {format_bytes(other_needs)})")
    return (f"max_memory={format_bytes(budget)} is too small for this pruning event (m={shape.num_gradients} "
            f"gradients of {shape.dim:,} weights, {format_bytes(shape.gradient_bytes())} of {shape.gradient_dtype} "
            f"gradients): {what}. Options: " + "; ".join(options))
