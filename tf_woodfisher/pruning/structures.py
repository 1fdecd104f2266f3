"""tfmot's sparsity structures, with OBS scores and joint OBS updates for groups of weights.

Two structures, with tfmot's meaning (``pruning_impl.py``, ``pruning_utils.py`` of tfmot 0.8.1):

* ``block_size=(r, c)``: the weight, which must be 2-D (tfmot's rule), is cut into r × c blocks, the
  last ones along each axis cut short at its edges (tfmot pools with ``padding='SAME'``); whole blocks
  are pruned, by a global threshold over all blocks (``mode='global'``) or per tensor (``'layerwise'``).
* ``sparsity_m_by_n=(n, m)``: n zeros in every group of m consecutive weights along the input-channel
  axis, i.e. the rows of tfmot's ``weights_rearrange`` view: Dense [in, out] → [out, in], Conv2D
  [h, w, in, out] → [out·h·w, in]; only 2-D and 4-D weights, as in tfmot. A last, shorter group of r < m
  weights keeps min(r, m − n) of them, as tfmot's zero padding does. The pattern fixes the sparsity.

Scores of a group Q (lower: cheaper to remove), for F the Fisher and w̃ = w − F⁻¹ḡ (WoodTaylor; w for
the others):

* ``woodfisher``/``woodtaylor``: the OBS loss increase ρ_Q = ½·w̃_Qᵀ[(F⁻¹)_QQ]⁻¹w̃_Q of removing Q
  jointly (oBERT's block score); blocks are ranked by ρ_Q/|Q|, the loss per removed weight, so that
  the shorter edge blocks compare fairly. Removing a set of groups applies the sum of their joint
  updates, δw = −F⁻¹ Σ_Q E_Q[(F⁻¹)_QQ]⁻¹w̃_Q (− F⁻¹ḡ for WoodTaylor), as oBERT does and as WoodFisher
  sums single-weight updates: each group's own update ends exactly at zero on Q; the cross terms of the
  sum do not, and the new mask zeroes Q.
* ``magnitude`` and ``diagonal_fisher``: their own per-weight scores pooled over the block with
  ``block_pooling_type`` (tfmot pools |w|; magnitude's score ½(pool |w|)² orders blocks exactly as
  tfmot does); no weight update (F is diagonal).

N:M choice: in each m-group the n weights to remove are, for magnitude and diagonal Fisher, the n
lowest scores (ties: the later weight goes, as with tfmot's ``top_k``); for the OBS methods the
subset Q of size n with the smallest ρ_Q, **exhaustively** over all C(m, n) subsets for m ≤ 8
(:data:`EXHAUSTIVE_MAX_GROUP`) and **greedily** for larger m (add, n times, the weight whose addition
gives the smallest ρ of the enlarged set). Weights already pruned stay pruned and count among the n.

The Fisher blocks must contain every group whole: the :class:`~tf_woodfisher.pruning.Pruner` builds
them with ``BlockPartition.from_segments(..., groups=TargetGroups.group_ids(...))``. Nothing here
knows about Keras.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_woodfisher import compat
from tf_woodfisher.config import INVERSE_METHODS, MODES, WoodFisherConfig
from tf_woodfisher.pruning.scores import _newton_offset

GROUP_METHODS = ("magnitude", "diagonal_fisher", "woodfisher", "woodtaylor")  # the methods that score groups
EXHAUSTIVE_MAX_GROUP = 8  # N:M with m ≤ 8 tries every subset; larger m chooses greedily
SOLVE_CHUNK = 1 << 22  # matrix entries per batched solve (bounds the memory of the N:M search)


@dataclasses.dataclass(frozen=True)
class Structure:
    """A tfmot sparsity structure: ``block_size`` (r, c) with ``pooling`` 'AVG'/'MAX', or ``m_by_n`` (n, m)."""

    block_size: tuple = (1, 1)
    pooling: str = "AVG"
    m_by_n: Optional[tuple] = None

    @classmethod
    def of(cls, config: WoodFisherConfig) -> Optional[Structure]:
        """The structure of ``config``, or None when it prunes single weights."""
        if not config.structured:
            return None
        return cls(tuple(config.block_size), config.block_pooling_type, config.sparsity_m_by_n)

    @property
    def name(self) -> str:
        """How the user wrote it, for messages."""
        return f"sparsity_m_by_n={self.m_by_n}" if self.m_by_n is not None else f"block_size={self.block_size}"

    @property
    def sparsity(self) -> Optional[float]:
        """n/m for N:M (the sparsity the pattern fixes), None for blocks."""
        return None if self.m_by_n is None else self.m_by_n[0] / self.m_by_n[1]

    def zeros_per_group(self, sparsity: float) -> int:
        """N:M: the zeros of each m-group after an event to ``sparsity``: min(n, round(sparsity·m)), so that a
        multi-step event reaches n zeros in steps."""
        zeros, size = self.m_by_n
        return int(min(zeros, round(sparsity * size)))


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """How the flat (row-major) entries of one weight tensor fall into groups.

    Attributes:
        group_of: (size,) int64, the group of every entry.
        members: (G, q) int64, the entries of each group, padded with −1 (edge blocks, short m-groups).
    """

    group_of: np.ndarray
    members: np.ndarray

    @property
    def num_groups(self) -> int:
        """G, the number of groups."""
        return self.members.shape[0]


def group_layout(shape: Sequence[int], structure: Structure, name: str = "the weight") -> GroupLayout:
    """The groups of a weight of ``shape`` under ``structure`` (tfmot's blocks or N:M groups).

    Raises:
        ValueError: a block structure on a weight that is not 2-D, or N:M on one that is neither 2-D nor
            4-D (tfmot's rules), naming the weight and its shape.
    """
    shape = tuple(int(s) for s in shape)
    if structure.m_by_n is not None:
        if len(shape) not in (2, 4):
            raise ValueError(
                f"{structure.name} needs 2-D (Dense [in, out]) or 4-D (Conv2D [h, w, in, out]) weights, as in tfmot, "
                f"whose m-groups run along the input-channel axis; {name!r} has shape {shape}: leave its layer out "
                "(layers=... in one_shot_prune, or do not wrap it) or prune it without a structure")
        return _n_m_layout(shape, structure.m_by_n[1])
    if len(shape) != 2:
        raise ValueError(
            f"{structure.name} prunes r × c blocks of 2-D weights only (tfmot's rule: Dense, Embedding, ... kernels); "
            f"{name!r} has shape {shape}: leave its layer out (layers=... in one_shot_prune, or do not wrap it) or "
            "use sparsity_m_by_n or unstructured pruning for it")
    return _block_layout(shape, structure.block_size)


def _block_layout(shape, block_size):
    (rows, cols), (r, c) = shape, block_size
    blocks_r, blocks_c = -(-rows // r), -(-cols // c)
    row = np.arange(blocks_r)[:, None, None, None] * r + np.arange(r)[None, None, :, None]
    col = np.arange(blocks_c)[None, :, None, None] * c + np.arange(c)[None, None, None, :]
    members = np.where((row < rows) & (col < cols), row * cols + col, -1).reshape(blocks_r * blocks_c, r * c)
    group_of = (np.arange(rows)[:, None] // r * blocks_c + np.arange(cols)[None, :] // c).reshape(-1)
    return GroupLayout(group_of.astype(np.int64), members.astype(np.int64))


def _n_m_layout(shape, size):
    """Groups of ``size`` consecutive inputs: the kernel viewed as [a, in, out] (a = h·w, or 1 for Dense), the
    groups numbered as the rows of tfmot's [out·a, in] view."""
    inputs, outputs = shape[-2], shape[-1]
    spatial = int(np.prod(shape[:-2], dtype=np.int64))
    per_row = -(-inputs // size)
    out = np.arange(outputs)[:, None, None, None]
    where = np.arange(spatial)[None, :, None, None]
    channel = np.arange(per_row)[None, None, :, None] * size + np.arange(size)[None, None, None, :]
    members = np.where(channel < inputs, (where * inputs + channel) * outputs + out, -1)
    members = members.reshape(outputs * spatial * per_row, size)
    entry_where, entry_in, entry_out = np.meshgrid(np.arange(spatial), np.arange(inputs), np.arange(outputs),
                                                   indexing="ij")
    group_of = ((entry_out * spatial + entry_where) * per_row + entry_in // size).reshape(-1)
    return GroupLayout(group_of.astype(np.int64), members.astype(np.int64))


@dataclasses.dataclass(frozen=True)
class StageGroups:
    """The groups of consecutive targets, in flat positions of their concatenation.

    Attributes:
        members: (G, q) int64 positions of each group's entries, −1 padding.
        group_of: (d,) int64 group of each entry.
        targets: (T + 1,) the first group of each target, then G.
    """

    members: np.ndarray
    group_of: np.ndarray
    targets: np.ndarray

    @property
    def valid(self) -> np.ndarray:
        """(G, q) bool: the members that are entries (not padding)."""
        return self.members >= 0

    @property
    def safe(self) -> np.ndarray:
        """(G, q) members with the padding replaced by the group's first entry (for gathers)."""
        return np.where(self.valid, self.members, self.members[:, :1])

    @property
    def counts(self) -> np.ndarray:
        """(G,) entries of each group."""
        return self.valid.sum(axis=1)

    @classmethod
    def concatenate(cls, layouts: Sequence[GroupLayout]) -> StageGroups:
        """The groups of targets laid out one after the other (rows padded to the widest group)."""
        width = max(layout.members.shape[1] for layout in layouts)
        members, group_of, entry, group = [], [], 0, 0
        for layout in layouts:
            padded = np.full((layout.num_groups, width), -1, np.int64)
            padded[:, :layout.members.shape[1]] = layout.members
            members.append(np.where(padded >= 0, padded + entry, -1))
            group_of.append(layout.group_of + group)
            entry += layout.group_of.size
            group += layout.num_groups
        firsts = np.cumsum([0] + [layout.num_groups for layout in layouts])
        return cls(np.concatenate(members), np.concatenate(group_of), firsts)


class TargetGroups:
    """The groups of every pruning target under one structure: the group scores, the selection and the
    joint OBS update of a :class:`~tf_woodfisher.pruning.Pruner` event.

    Args:
        structure: the :class:`Structure`.
        shapes: the shape of each target. names: their names (for errors).
        method: the scoring method (one of :data:`GROUP_METHODS`).

    Raises:
        ValueError: a method that cannot score groups, or a weight the structure does not fit (see
            :func:`group_layout`).
    """

    def __init__(self, structure: Structure, shapes: Sequence[Sequence[int]], names: Sequence[str], method: str):
        check_method(method, structure)
        if structure.pooling != "AVG" and (structure.m_by_n is not None or method in INVERSE_METHODS):
            unused = "N:M groups choose by score, without pooling" if structure.m_by_n is not None else \
                f"method {method!r} scores a block by its joint OBS loss increase"
            warnings.warn(f"block_pooling_type={structure.pooling!r} is not used: {unused}", RuntimeWarning,
                          stacklevel=3)
        self.structure = structure
        self.layouts = [group_layout(shape, structure, name) for shape, name in zip(shapes, names)]
        self._stages = {}

    @classmethod
    def for_targets(cls, targets, config: WoodFisherConfig) -> Optional[TargetGroups]:
        """The groups of ``targets`` (:class:`PruningTarget`) under ``config``'s structure; None if unstructured."""
        structure = Structure.of(config)
        if structure is None:
            return None
        return cls(structure, [t.shape for t in targets], [t.name for t in targets], config.method)

    def check_target(self, target_sparsity: float) -> None:
        """Raise ValueError if N:M is asked for a sparsity other than the n/m its pattern fixes."""
        fixed = self.structure.sparsity
        if fixed is not None and abs(target_sparsity - fixed) > 1e-6:
            zeros, size = self.structure.m_by_n
            raise ValueError(f"{self.structure.name} removes {zeros} of every {size} weights, which fixes the sparsity "
                             f"at {fixed:g}: the target sparsity must be {fixed:g}, got {target_sparsity:g}")

    def group_ids(self, begin: int, end: int) -> list:
        """Per target in [begin, end): the (size,) group of each entry (for ``BlockPartition.from_segments``)."""
        return [layout.group_of for layout in self.layouts[begin:end]]

    def stage(self, begin: int, end: int) -> StageGroups:
        """The :class:`StageGroups` of the targets [begin, end) (cached)."""
        if (begin, end) not in self._stages:
            self._stages[(begin, end)] = StageGroups.concatenate(self.layouts[begin:end])
        return self._stages[(begin, end)]

    def scores(self, method: str, weights, mask, stats, stage: tuple, sparsity: float) -> tf.Tensor:
        """Scores of the targets of ``stage`` = (begin, end), given their flat ``weights`` and ``mask`` (d_s,).

        Blocks: one score per group (G_s,), lower is cheaper (see the module). N:M: the choice is made
        here, per m-group, for an event to ``sparsity``: the result is the (d_s,) 0/1 keep flag of each entry.
        """
        groups = self.stage(*stage)
        weights = tf.convert_to_tensor(weights)  # float32, or float64 for a float64 model
        if self.structure.m_by_n is not None:
            return tf.constant(self._n_m_keep(method, weights, np.asarray(mask) > 0, stats, groups,
                                              self.structure.zeros_per_group(sparsity)))
        if method in INVERSE_METHODS:
            return group_loss_increase(method, weights, stats, groups.members) / tf.constant(groups.counts, tf.float32)
        weights = tf.cast(weights, tf.float32)
        per_weight = tf.abs(weights) if method == "magnitude" else \
            0.5 * tf.square(weights) * tf.cast(stats.fisher_diagonal, tf.float32)
        gathered = tf.gather(per_weight, groups.safe)
        valid = tf.constant(groups.valid)
        if self.structure.pooling == "MAX":
            pooled = tf.reduce_max(tf.where(valid, gathered, tf.zeros_like(gathered)), axis=1)
        else:
            pooled = tf.reduce_sum(tf.where(valid, gathered, tf.zeros_like(gathered)), axis=1) / \
                tf.constant(groups.counts, tf.float32)
        return 0.5 * tf.square(pooled) if method == "magnitude" else pooled

    def select(self, scores, mask, segment_sizes, sparsity: float, mode: str) -> np.ndarray:
        """The new flat 0/1 mask (float32, (d,)) over all targets; entries already pruned stay pruned.

        Blocks: the lowest-scored groups are removed, in ``'global'`` mode over all targets, in
        ``'layerwise'`` mode per target, as many as bring the pruned entries closest to round(sparsity·n)
        (n: the entries of all targets, or of the target). N:M: ``scores`` are the keep flags of :meth:`scores`.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        keep = np.asarray(mask) > 0
        if self.structure.m_by_n is not None:
            return (keep & (np.asarray(scores) > 0)).astype(np.float32)
        groups = self.stage(0, len(self.layouts))
        scores = np.asarray(scores, np.float64).copy()
        alive = np.bincount(groups.group_of, weights=keep, minlength=len(scores)).astype(np.int64)
        scores[alive == 0] = -np.inf
        entries = np.cumsum([0] + [int(size) for size in segment_sizes])
        if mode == "global":
            regions = [(0, len(scores), 0, int(entries[-1]))]
        else:
            regions = list(zip(groups.targets[:-1], groups.targets[1:], entries[:-1], entries[1:]))
        removed = np.zeros(len(scores), bool)
        for first, last, begin, end in regions:
            wanted = int(round(sparsity * (end - begin))) - int((~keep[begin:end]).sum())
            order = np.argsort(scores[first:last], kind="stable")
            reached = np.concatenate([[0], np.cumsum(alive[first:last][order])])
            removed[first + order[:int(np.argmin(np.abs(reached - wanted)))]] = True
        return (keep & ~removed[groups.group_of]).astype(np.float32)

    def updated_weights(self, method: str, weights, pruned, stats, stage: tuple) -> tf.Tensor:
        """The targets of ``stage`` after the joint OBS update (WoodFisher, WoodTaylor) for removing ``pruned``
        (bool, (d_s,)): each group's removed entries Q get δw = −F⁻¹E_Q[(F⁻¹)_QQ]⁻¹w̃_Q, summed over the
        groups (− F⁻¹ḡ for WoodTaylor). Magnitude and diagonal Fisher: unchanged. Not masked."""
        weights = tf.convert_to_tensor(weights)
        if method not in INVERSE_METHODS:
            return weights
        groups = self.stage(*stage)
        removed = groups.valid & np.asarray(pruned)[groups.safe]
        rows = np.flatnonzero(removed.any(axis=1))
        offset = _newton_offset(method, stats, weights.dtype)
        if rows.size == 0:
            return weights - offset
        solution, _ = _removal_solution(method, weights, stats, groups.members[rows], removed[rows])
        picked = removed[rows]
        direction = tf.scatter_nd(groups.members[rows][picked][:, None], tf.boolean_mask(solution, picked),
                                  [int(weights.shape[0])])
        return weights - tf.cast(stats.inverse.matvec(direction), weights.dtype) - offset

    def _n_m_keep(self, method, weights, keep, stats, groups, zeros):
        """(d_s,) float32 keep flags: in each m-group, ``zeros`` entries removed (already pruned ones and the
        padding of a short group among them)."""
        forced = ~groups.valid | ~keep[groups.safe]  # padding, and weights already pruned
        count = np.maximum(forced.sum(axis=1), zeros)
        if method in INVERSE_METHODS:
            removed = _obs_n_m_choice(method, weights, stats, groups.members, forced, zeros)
        else:
            per_weight = 0.5 * tf.square(tf.cast(weights, tf.float32))
            if method == "diagonal_fisher":
                per_weight = per_weight * tf.cast(stats.fisher_diagonal, tf.float32)
            score = np.where(forced, -np.inf, per_weight.numpy()[groups.safe])
            # The lowest first; among equal scores the later entry first (tfmot's top_k keeps the earlier one).
            order = score.shape[1] - 1 - np.argsort(score[:, ::-1], axis=1, kind="stable")
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(score.shape[1])[None, :], axis=1)
            removed = rank < count[:, None]
        flags = np.ones(groups.group_of.size, np.float32)
        flags[groups.members[removed & groups.valid]] = 0.0
        return flags


def check_method(method: str, structure: Structure) -> None:
    """Raise ValueError unless ``method`` can score the groups of ``structure``."""
    if method not in GROUP_METHODS:
        raise ValueError(f"method {method!r} cannot score groups of weights, so it cannot prune with {structure.name}; "
                         f"use one of {GROUP_METHODS}, or block_size=(1, 1) and sparsity_m_by_n=None")


def group_loss_increase(method: str, weights, stats, members, removed=None) -> tf.Tensor:
    """ρ_Q = ½·w̃_Qᵀ[(F⁻¹)_QQ]⁻¹w̃_Q for each group: the increase of the quadratic loss model when the
    entries Q of the group are removed jointly (with the OBS update of the others).

    Args:
        method: ``'woodfisher'`` (w̃ = w) or ``'woodtaylor'`` (w̃ = w − F⁻¹ḡ; ρ then omits the constant
            −½ḡᵀF⁻¹ḡ that every removal shares).
        weights: (d,) flat weights. stats: ``FisherStatistics`` with an ``InverseFisher``.
        members: (G, q) int flat positions of each group, −1 padding.
        removed: (G, q) bool, the entries Q of each group that are removed (default: all of them).

    Returns:
        (G,) float32 loss increases.
    """
    members = np.asarray(members, np.int64)
    removed = members >= 0 if removed is None else np.asarray(removed) & (members >= 0)
    return tf.cast(_removal_solution(method, tf.convert_to_tensor(weights), stats, members, removed)[1], tf.float32)


def _removal_solution(method, weights, stats, members, removed):
    """(x, ρ): x (G, q) = [(F⁻¹)_QQ]⁻¹w̃_Q on the removed entries Q (0 elsewhere), ρ (G,) = ½ w̃_Qᵀx_Q."""
    inverse = stats.inverse
    shifted = tf.cast(weights - _newton_offset(method, stats, weights.dtype), inverse.dtype)
    values = tf.gather(shifted, np.where(members >= 0, members, members[:, :1]))
    return _solve_chunked(inverse.submatrices(members), values, tf.constant(removed))


def _solve_chunked(submatrices, values, removed):
    """:func:`_removal_solve` in chunks of at most :data:`SOLVE_CHUNK` matrix entries along the leading axis."""
    per_item = int(np.prod(submatrices.shape[1:]))
    step = max(1, SOLVE_CHUNK // per_item)
    parts = [_removal_solve(submatrices[i:i + step], values[i:i + step], removed[i:i + step])
             for i in range(0, int(submatrices.shape[0]), step)]
    return tf.concat([p[0] for p in parts], 0), tf.concat([p[1] for p in parts], 0)


@compat.function(reduce_retracing=True)
def _removal_solve(submatrices, values, removed):
    """Batched joint removal: submatrices S (..., q, q), values w̃ (..., q), removed (..., q) bool →
    x (..., q) with x_Q = S_QQ⁻¹w̃_Q and 0 elsewhere, and ½w̃_Qᵀx_Q (...,). Entries outside Q are decoupled
    (identity rows) so that every system stays positive definite."""
    flags = tf.cast(removed, submatrices.dtype)
    system = submatrices * flags[..., :, None] * flags[..., None, :] + tf.linalg.diag(1.0 - flags)
    right = values * flags
    solution = tf.linalg.solve(system, right[..., None])[..., 0] * flags
    return solution, 0.5 * tf.reduce_sum(right * solution, axis=-1)


def _obs_n_m_choice(method, weights, stats, members, forced, zeros):
    """(G, m) bool: in each m-group the removed set Q ⊇ ``forced`` of max(|forced|, ``zeros``) entries with the
    smallest ρ_Q; exhaustive for m ≤ :data:`EXHAUSTIVE_MAX_GROUP`, greedy above."""
    size = members.shape[1]
    submatrices = stats.inverse.submatrices(members)
    shifted = tf.cast(weights - _newton_offset(method, stats, weights.dtype), stats.inverse.dtype)
    values = tf.gather(shifted, np.where(members >= 0, members, members[:, :1]))
    choose = forced.sum(axis=1) < zeros  # the groups with a choice left
    removed = forced.copy()
    if not choose.any():
        return removed
    rows = np.flatnonzero(choose)
    sub, val, fixed = tf.gather(submatrices, rows), tf.gather(values, rows), forced[rows]
    if size <= EXHAUSTIVE_MAX_GROUP:
        patterns = np.zeros((math.comb(size, zeros), size), bool)
        for number, subset in enumerate(itertools.combinations(range(size), zeros)):  # C(m, n) ≤ 70 patterns
            patterns[number, list(subset)] = True
        allowed = np.all(patterns[None, :, :] | ~fixed[:, None, :], axis=2)  # pattern ⊇ forced entries
        losses = _pattern_losses(sub, val, patterns)
        best = np.argmin(np.where(allowed, losses, np.inf), axis=1)
        removed[rows] = patterns[best]
        return removed
    chosen = fixed.copy()
    for _ in range(zeros - int(fixed.sum(axis=1).min())):
        needs = chosen.sum(axis=1) < zeros
        candidates = chosen[:, None, :] | np.eye(size, dtype=bool)[None]  # (g, m candidates, m)
        losses = _candidate_losses(sub, val, candidates)
        best = np.argmin(np.where(chosen, np.inf, losses), axis=1)
        chosen[needs, best[needs]] = True
    removed[rows] = chosen
    return removed


def _pattern_losses(submatrices, values, patterns):
    """ρ of each of P ``patterns`` (P, m) for each group: (g, P) NumPy array."""
    return _candidate_losses(submatrices, values, np.broadcast_to(patterns[None], (submatrices.shape[0],) +
                                                                     patterns.shape))


def _candidate_losses(submatrices, values, candidates):
    """ρ of candidate removed sets (g, P, m) bool of each group: (g, P) NumPy array, in chunks of groups."""
    count, per_group = candidates.shape[1], candidates.shape[1] * int(submatrices.shape[1]) ** 2
    step = max(1, SOLVE_CHUNK // per_group)
    losses = []
    for i in range(0, int(submatrices.shape[0]), step):
        sub = tf.repeat(submatrices[i:i + step], count, axis=0)
        val = tf.repeat(values[i:i + step], count, axis=0)
        flags = tf.constant(np.ascontiguousarray(candidates[i:i + step]).reshape(-1, candidates.shape[2]))
        losses.append(tf.reshape(_removal_solve(sub, val, flags)[1], [-1, count]).numpy())
    return np.concatenate(losses)
