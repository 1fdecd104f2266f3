"""Exact sequential OBS: greedy removal with rank-1 downdates (Fisher blocks, OBC) and SparseGPT.

Three solvers of the same quadratic problem, min ½ δᵀ H δ subject to the pruned entries of w + δ being 0,
for many independent problems at once (the rows of a layer, the blocks of a Fisher):

* :func:`sequential_obs` removes the weights of each block one at a time with the exact OBS step
  ``q = argmin w_q²/[H⁻¹]_qq``, ``w -= H⁻¹[:, q] w_q/[H⁻¹]_qq`` and the rank-1 downdate
  ``H⁻¹ -= H⁻¹[:, q] H⁻¹[q, :]/[H⁻¹]_qq`` (q leaves the problem), recording the loss increase
  ``½ w_q²/[H⁻¹]_qq`` of every removal. All blocks advance together in one compiled ``tf.while_loop``
  over removal steps. A global target is met by the step-by-step global greedy (:func:`merge_by_heads`).
  :func:`sequential_event` is one pruning event of ``WoodFisherConfig(sequential=True)`` over the blocks of
  an :class:`~tf_woodfisher.fisher.InverseFisher`.
* :func:`obc_prune` is OBC (Frantar & Alistarh 2022): :func:`sequential_obs` on every output row of a
  layer with the layer-wise Hessian H = 2XXᵀ/n of its inputs (the same H⁻¹ for every row); each row at the
  same sparsity (``rows='uniform'``) or the rows' loss curves merged (``rows='global'``, as OBC's own code
  does); :func:`obc_loss_curve` gives the layer's loss at every number of removals (for allocating
  sparsity across layers with :func:`allocate_by_hull`).
* :func:`sparsegpt_prune` is SparseGPT (Frantar & Alistarh 2023): one upper Cholesky factor U of H⁻¹
  (UᵀU = H⁻¹) shared by all rows, a sweep over columns in blocks, the mask of each block
  chosen adaptively at its start (N:M: at the start of each group), lazy updates of later columns; for N:M
  by default in decreasing diag H ("act order", by groups) and followed by a conjugate-gradient
  reconstruction of the kept weights with the mask fixed.

Conventions: ``W`` is (rows, cols), or (G, rows, cols) for G independent problems (the channels of a
depthwise convolution), each row's output being y_row = w_rowᵀ x with x of dimension cols; ``H`` is
(cols, cols), or (G, cols, cols). Losses are in the units of ½δᵀHδ: with H = 2XXᵀ/n over n inputs they are
the mean over inputs of the squared output error, ‖X(w − ŵ)‖²/n. ``n_m=(n, m)`` is the N:M pattern as
tfmot's ``sparsity_m_by_n`` and SparseGPT's ``prunen, prunem`` define it: **n zeros** in every group of m
consecutive columns (cols must be a multiple of m); (2, 4) is 2:4. ``damping`` is a fraction of
mean(diag H) added to the diagonal (SparseGPT's ``percdamp``). Entries that are already zero (or 0 in
``mask``), and the weights of inputs never active in the calibration data (diag H = 0), are removed first
and stay pruned. :func:`compensated_weights` turns the problem into reconstructing another layer's
outputs (the dense model's, from pruned-upstream inputs). Host-side loops run over removal phases, batches
of rows bounded by memory, or groups of equal-size blocks, never over single rows or blocks. This module
imports no Keras.
"""

import math
import numbers
import warnings
from typing import NamedTuple, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_woodfisher import compat

LAZY_STEPS = 64  # removals between two applications of the accumulated downdates (and compactions)
DEFAULT_MAX_MEMORY = 1 << 30  # bytes of H⁻¹ copies one batch of rows of obc_prune may hold
SEQUENTIAL_MAX_ENTRIES = 1 << 27  # entries of the explicit block inverses sequential_event may hold (0.5 GiB float32)


class SequentialOBSResult(NamedTuple):
    """The result of :func:`sequential_obs` (K blocks of c weights; s the most removals of a block).

    Attributes:
        weights: (K, c) the weights after the removals and the OBS updates (removed entries exactly 0).
        mask: (K, c) float, 1 kept, 0 removed.
        losses: (K, s) float64, the loss increase ½w_q²/[H⁻¹]_qq of each block's t-th removal (0 past its count).
        order: (K, s) int, the entry removed at each step (−1 past its count).
        counts: (K,) int, the removals made in each block.
    """

    weights: tf.Tensor
    mask: tf.Tensor
    losses: np.ndarray
    order: np.ndarray
    counts: np.ndarray


class LayerOBSResult(NamedTuple):
    """The result of :func:`obc_prune` and :func:`sparsegpt_prune`, shaped like their ``W``.

    Attributes:
        weights: the pruned and updated weights (pruned entries exactly 0).
        mask: float, 1 kept, 0 pruned.
        losses: per row, the loss increase of each removal in the order made, (…, rows, s) float64
            (OBC: its cumulative sum is the row's loss curve), or (…, rows, 1) the row's total loss (SparseGPT).
    """

    weights: tf.Tensor
    mask: tf.Tensor
    losses: np.ndarray


# ----------------------------------------------------------------------------------------------- the Hessian

def damped_inverse(H, damping: float = 0.01, name: str = "layer", num_inputs: Optional[int] = None,
                   dtype=tf.float32):
    """(H⁻¹ of the damped H, dead) with H + λ·mean(diag H)·I inverted by Cholesky in float64.

    Columns with diag H = 0 (inputs never active) get H_qq = 1 and are reported in ``dead``.

    Args:
        H: (c, c) or (G, c, c) symmetric positive semi-definite.
        damping: λ ≥ 0, a fraction of mean(diag H).
        name: what the matrix belongs to, for messages.
        num_inputs: rows of X behind H (samples × positions), if known: fewer than c makes H singular,
            which is damped with a warning (or refused when ``damping`` is 0).
        dtype: of the returned inverse.

    Returns:
        (inverse (…, c, c) in ``dtype``, dead (…, c) bool numpy).

    Raises:
        ValueError: ``damping`` negative or not finite, or H not positive definite after damping
            (singular with ``damping=0``), naming ``name``.
    """
    if not (isinstance(damping, numbers.Real) and math.isfinite(damping) and damping >= 0):
        raise ValueError(f"{name}: damping must be a finite number ≥ 0 (a fraction of mean(diag H)), got {damping!r}")
    H = np.array(H, dtype=np.float64)
    cols = H.shape[-1]
    diagonal = np.diagonal(H, axis1=-2, axis2=-1)
    dead = diagonal <= 0
    if num_inputs is not None and num_inputs < cols:
        if damping == 0:
            raise ValueError(f"{name}: H = 2XXᵀ/n from {num_inputs} input rows for {cols} inputs is singular and "
                             "damping is 0: use more calibration samples or damping > 0 (percdamp)")
        warnings.warn(f"{name}: H = 2XXᵀ/n from {num_inputs} input rows for {cols} inputs is singular (rank ≤ "
                      f"{num_inputs}); damped by {damping:g}·mean(diag H). Use more calibration samples for an "
                      "exact reconstruction", RuntimeWarning, stacklevel=3)
    H = _damped(H, damping)
    chol = tf.linalg.cholesky(tf.constant(H))
    if not bool(tf.reduce_all(tf.math.is_finite(chol))):
        raise ValueError(f"{name}: H (cols={cols}) is not positive definite with damping={damping:g}: use more "
                         "calibration samples or a larger damping (percdamp)")
    eye = tf.eye(cols, batch_shape=H.shape[:-2], dtype=tf.float64)
    return tf.cast(tf.linalg.cholesky_solve(chol, eye), dtype), dead


def _damped(H, damping: float) -> np.ndarray:
    """H (…, c, c) with H_qq = 1 where diag H = 0 (dead inputs) and λ·mean(diag H) added to the diagonal, float64
    (the matrix :func:`damped_inverse` inverts)."""
    H = np.array(H, dtype=np.float64)
    index = np.arange(H.shape[-1])
    diagonal = np.diagonal(H, axis1=-2, axis2=-1)
    H[..., index, index] = np.where(diagonal <= 0, 1.0, diagonal)
    scale = np.mean(np.diagonal(H, axis1=-2, axis2=-1), axis=-1)
    H[..., index, index] += damping * scale[..., None]
    return H


def reconstruction_error(W, W_hat, H, cross=None, H_dense=None) -> float:
    """‖XWᵀ − XŴᵀ‖²/‖XWᵀ‖² over the inputs behind H = 2XᵀX/n: Σ_r δ_rᵀHδ_r / Σ_r w_rᵀHw_r.

    With ``cross`` C = 2X̃ᵀX/n and ``H_dense`` = 2XᵀX/n, Ŵ acts on other inputs X̃ (H = 2X̃ᵀX̃/n) than W
    (the dense model's X): the error is ‖X̃Ŵᵀ − XWᵀ‖²/‖XWᵀ‖² = Σ_r (ŵᵀHŵ − 2ŵᵀCw + wᵀH_dense w)/Σ_r wᵀH_dense w.

    Args:
        W, W_hat: (…, rows, cols) dense and pruned weights. H: (…, cols, cols), undamped.
        cross, H_dense: as above, or None (the same inputs).

    Returns:
        The relative squared reconstruction error (0: exact; 1: as bad as a zero layer).
    """
    W, W_hat, H = (np.asarray(a, dtype=np.float64) for a in (W, W_hat, H))
    if cross is None:
        delta = W - W_hat
        energy = np.sum((W @ H) * W)
        return float(np.sum((delta @ H) * delta) / energy) if energy > 0 else 0.0
    cross, H_dense = np.asarray(cross, np.float64), np.asarray(H_dense, np.float64)
    energy = np.sum((W @ H_dense) * W)
    error = np.sum((W_hat @ H) * W_hat) - 2 * np.sum((W_hat @ cross) * W) + energy
    return float(max(error, 0.0) / energy) if energy > 0 else 0.0


# ----------------------------------------------------------------------------------------------- greedy OBS

@compat.function(reduce_retracing=True)
def _removal_phase(inverse, weights, removed, forced, quota, group_of, group_count, group_limit, steps):
    """``steps`` greedy OBS removals in every block (the compiled inner loop of :func:`sequential_obs`).

    The rank-1 downdates are applied lazily: the t-th removal's u_t = H⁻¹[:, q]/√[H⁻¹]_qq is kept, the
    current row H⁻¹[q, :] is H₀⁻¹[q, :] − Σ_s u_s[q] u_s and the diagonal is downdated exactly, and the
    phase ends with one batched product H⁻¹ −= UᵀU (as GPTQ/SparseGPT batch their updates), so that a
    step reads O(steps · c) instead of rewriting the c × c inverse.

    inverse (K, c, c), weights (K, c), removed/forced (K, c) bool, quota (K,) int32 removals still due,
    group_of (K, c) int32 group of each entry, group_count (K, G) int32 removals per group, group_limit
    int32 (at most this many removals per group, forced ones aside). Returns the updated state and
    per step the loss increases (steps, K) and the entries removed (steps, K), −1 where a block made none.
    """
    dtype = weights.dtype
    blocks, cols = tf.shape(weights)[0], tf.shape(weights)[1]
    infinity = tf.constant(np.inf, dtype)
    block_index = tf.range(blocks)

    def step(t, factors, diagonal, weights, removed, quota, group_count, losses, picks):
        full = tf.gather(group_count, group_of, batch_dims=1) >= group_limit
        blocked = removed | (full & ~forced)
        key = tf.where(blocked, infinity, tf.square(weights) / diagonal)
        key = tf.where(forced & ~removed, -infinity, key)
        pick = tf.argmin(key, axis=1, output_type=tf.int32)
        active = (quota > 0) & tf.reduce_any(key < infinity, axis=1)
        w_q = tf.gather(weights, pick, batch_dims=1)
        d_q = tf.where(active, tf.gather(diagonal, pick, batch_dims=1), tf.ones_like(w_q))
        # H⁻¹[q, :] now: the stored row minus the lazy downdates of this phase.
        row = tf.gather(inverse, pick, axis=1, batch_dims=1) - tf.einsum(
            "kp,kpc->kc", tf.gather(factors, pick, axis=2, batch_dims=1), factors)
        weights = weights - row * tf.where(active, w_q / d_q, tf.zeros_like(w_q))[:, None]
        removed = removed | (tf.one_hot(pick, cols, on_value=True, off_value=False) & active[:, None])
        weights = tf.where(removed, tf.zeros_like(weights), weights)
        factor = row * tf.where(active, tf.math.rsqrt(d_q), tf.zeros_like(d_q))[:, None]
        factors = tf.tensor_scatter_nd_update(factors, tf.stack([block_index, tf.fill([blocks], t)], 1), factor)
        diagonal = diagonal - tf.square(factor)
        group_q = tf.gather(group_of, pick, batch_dims=1)
        group_count = tf.tensor_scatter_nd_add(group_count, tf.stack([block_index, group_q], 1),
                                               tf.cast(active, tf.int32))
        quota -= tf.cast(active, tf.int32)
        losses = losses.write(t, tf.where(active, 0.5 * tf.square(w_q) / d_q, tf.zeros_like(w_q)))
        picks = picks.write(t, tf.where(active, pick, -tf.ones_like(pick)))
        return t + 1, factors, diagonal, weights, removed, quota, group_count, losses, picks

    state = (tf.constant(0), tf.zeros([blocks, steps, cols], dtype), tf.linalg.diag_part(inverse), weights, removed,
             quota, group_count, tf.TensorArray(dtype, size=steps), tf.TensorArray(tf.int32, size=steps))
    _, factors, _, weights, removed, quota, group_count, losses, picks = tf.while_loop(
        lambda t, *_: t < steps, step, state)
    inverse = inverse - tf.matmul(factors, factors, transpose_a=True)
    return inverse, weights, removed, quota, group_count, losses.stack(), picks.stack()


def _gather_columns(values, index):
    """values (K, c, …) → (K, c', …) at the per-block column ``index`` (K, c')."""
    return tf.gather(values, index, axis=1, batch_dims=1)


def _greedy(inverse, weights, forced, quota, group_of, num_groups, group_limit):
    """Greedy OBS in every block until its quota: phases of the compiled loop, compacting the blocks
    (dropping removed entries, and finished blocks) between phases so that later removals cost less.

    Returns (weights (K, c) numpy, removed (K, c) bool, losses (K, s) float64, order (K, s) int, counts (K,)).
    """
    K, cols = weights.shape
    quota = np.asarray(quota, dtype=np.int32)
    steps_total = int(quota.max()) if K else 0
    out_weights, out_removed = np.array(weights), np.zeros((K, cols), bool)
    losses, order = np.zeros((K, steps_total)), -np.ones((K, steps_total), np.int64)
    rows = np.arange(K)
    columns = np.tile(np.arange(cols, dtype=np.int32), (K, 1))
    state = dict(inverse=tf.convert_to_tensor(inverse), weights=tf.convert_to_tensor(weights),
                 removed=tf.zeros((K, cols), tf.bool), forced=tf.constant(forced), quota=tf.constant(quota),
                 group_of=tf.constant(group_of, tf.int32), group_count=tf.zeros((K, num_groups), tf.int32))
    done_steps = 0
    while len(rows):
        size = int(state["weights"].shape[1])
        steps = min(int(tf.reduce_max(state["quota"])), LAZY_STEPS, size)
        inverse, w, removed, left, group_count, phase_losses, phase_picks = _removal_phase(
            state["inverse"], state["weights"], state["removed"], state["forced"], state["quota"],
            state["group_of"], state["group_count"], tf.constant(group_limit, tf.int32), tf.constant(steps))
        picks = phase_picks.numpy().T  # (K', steps), columns of the compacted problems
        span = slice(done_steps, done_steps + steps)
        losses[rows, span] = phase_losses.numpy().T
        order[rows, span] = np.where(picks >= 0, np.take_along_axis(columns, np.maximum(picks, 0), 1), -1)
        done_steps += steps
        removed_np, left_np = removed.numpy(), left.numpy()
        finished = (left_np <= 0) | np.all(removed_np, axis=1)
        # Finished blocks: write their weights and removals back into the full (K, c) arrays.
        done = rows[finished][:, None], columns[finished]
        out_weights[done] = w.numpy()[finished]
        out_removed[done] |= removed_np[finished]
        if finished.all():
            break
        busy = ~finished
        # Keep, per busy block, its remaining entries first (then removed ones, as padding to equal size).
        remaining = (~removed_np[busy]).sum(axis=1)
        keep = np.argsort(removed_np[busy], axis=1, kind="stable")[:, :int(remaining.max())].astype(np.int32)
        # Rows dropped from the compacted problem but removed earlier are recorded now.
        out_removed[rows[busy][:, None], columns[busy]] |= removed_np[busy]
        index = tf.constant(keep)
        take = tf.constant(np.flatnonzero(busy).astype(np.int32))
        inverse = _gather_columns(tf.gather(inverse, take), index)
        state = dict(inverse=tf.transpose(_gather_columns(tf.transpose(inverse, [0, 2, 1]), index), [0, 2, 1]),
                     weights=_gather_columns(tf.gather(w, take), index),
                     removed=_gather_columns(tf.gather(removed, take), index),
                     forced=_gather_columns(tf.gather(state["forced"], take), index),
                     quota=tf.gather(left, take), group_of=_gather_columns(tf.gather(state["group_of"], take), index),
                     group_count=tf.gather(group_count, take))
        rows, columns = rows[busy], np.take_along_axis(columns[busy], keep, 1)
    counts = (order >= 0).sum(axis=1)
    return out_weights, out_removed, losses, order, counts


def _groups(cols: int, n_m):
    """(group_of (c,), number of groups, group_limit) of the N:M pattern (no pattern: one unlimited group)."""
    if n_m is None:
        return np.zeros(cols, np.int32), 1, cols + 1
    n, m = _check_n_m(n_m, cols)
    return (np.arange(cols) // m).astype(np.int32), cols // m, n


def _check_n_m(n_m, cols):
    if not (isinstance(n_m, (tuple, list)) and len(n_m) == 2 and all(isinstance(v, (int, np.integer)) for v in n_m)
            and 0 < n_m[0] < n_m[1]):
        raise ValueError(f"n_m must be a pair (n, m) of ints with 0 < n < m (n zeros in every m), got {n_m!r}")
    n, m = int(n_m[0]), int(n_m[1])
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m}: the {cols} columns are not a multiple of m={m} (pad the groups)")
    return n, m


def merge_by_heads(losses: np.ndarray, counts: np.ndarray, total: int) -> np.ndarray:
    """How many removals each block makes when, at every step, the block whose next removal costs least
    removes one (the step-by-step global greedy over independent blocks), until ``total`` removals.

    Equivalent closed form used here: the greedy takes entries in increasing order of their block's running
    maximum of losses (an entry becomes a head only once every earlier entry of its block was cheaper than
    everything left), so the first ``total`` of all entries sorted by (running max, position) are per-block
    prefixes, the greedy's choices. One sort, no loop over steps or blocks.

    Args:
        losses: (K, s) each block's loss increase per removal, in its own order.
        counts: (K,) how many of each block's entries are valid (the rest are not removable).
        total: removals over all blocks, ≤ counts.sum().

    Returns:
        (K,) int removals per block.

    Raises:
        ValueError: ``total`` larger than the removable entries.
    """
    losses = np.asarray(losses, dtype=np.float64)
    counts = np.asarray(counts)
    if total > counts.sum():
        raise ValueError(f"cannot remove {total} entries: only {int(counts.sum())} are removable")
    chosen = _merge_order(losses, counts)[:int(total)]
    return np.bincount(chosen // losses.shape[1], minlength=losses.shape[0])


def _merge_order(losses: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The flat indices (block · s + position) of the valid entries of ``losses`` (K, s) in the order the
    step-by-step global greedy removes them (see :func:`merge_by_heads`)."""
    K, s = losses.shape
    position = np.broadcast_to(np.arange(s), (K, s))
    running = np.where(position < counts[:, None], np.maximum.accumulate(losses, axis=1), np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(K)[:, None], (K, s)).ravel(), position.ravel(), running.ravel()))
    return order[:int(counts.sum())]


def merged_loss_curve(losses, counts) -> np.ndarray:
    """The summed loss after each removal of the step-by-step global greedy over blocks (:func:`merge_by_heads`).

    Args:
        losses: (K, s) each block's loss increase per removal. counts: (K,) valid entries per block.

    Returns:
        (counts.sum() + 1,) float64: entry k is the loss after the first k removals (entry 0 is 0).
    """
    losses = np.asarray(losses, dtype=np.float64)
    order = _merge_order(losses, np.asarray(counts))
    return np.concatenate([[0.0], np.cumsum(losses.ravel()[order])])


def group_obs_update(inverse, weights, removed):
    """Weights after removing the set Q (``removed``) of each block jointly by OBS:
    w − H⁻¹E_Q[(H⁻¹)_QQ]⁻¹w_Q, then w_Q = 0 (the result of sequential exact OBS of Q in any order).

    Args:
        inverse: (K, c, c) H⁻¹ per block. weights: (K, c). removed: (K, c) bool.

    Returns:
        (K, c) the updated weights.
    """
    inverse = tf.convert_to_tensor(inverse)
    weights = tf.cast(weights, inverse.dtype)
    removed = tf.convert_to_tensor(removed, tf.bool)
    select = tf.cast(removed, inverse.dtype)
    eye = tf.eye(tf.shape(weights)[1], batch_shape=[1], dtype=inverse.dtype)
    # (H⁻¹)_QQ on Q, identity elsewhere: positive definite, solvable for all blocks at once.
    restricted = inverse * select[:, :, None] * select[:, None, :] + eye * (1.0 - select)[:, :, None]
    multipliers = tf.linalg.cholesky_solve(tf.linalg.cholesky(restricted), (weights * select)[:, :, None])[:, :, 0]
    updated = weights - tf.linalg.matvec(inverse, multipliers * select)
    return tf.where(removed, tf.zeros_like(updated), updated)


def sequential_obs(inverse_blocks, weights, num_remove=None, *, total_remove: Optional[int] = None, n_m=None,
                   forced=None) -> SequentialOBSResult:
    """Sequential exact OBS inside each block, with rank-1 downdates of the block inverse.

    In every block, repeatedly remove q = argmin w_q²/[F⁻¹]_qq with the exact OBS update
    w −= F⁻¹e_q w_q/[F⁻¹]_qq and the downdate (F⁻¹)' = F⁻¹ − F⁻¹e_q e_qᵀF⁻¹/[F⁻¹]_qq, recording the loss
    increase ½w_q²/[F⁻¹]_qq after each removal. Entries already zero (or ``forced``) go first, at no cost.

    With ``num_remove`` each block stops at its own count. With ``total_remove`` the blocks are chosen
    by the step-by-step global greedy (at every step the block whose next removal costs least, see
    :func:`merge_by_heads`, exact for a block-diagonal quadratic model): every block's full loss curve is
    computed, the counts are read off it, and the weights are the joint OBS update of the chosen sets
    (:func:`group_obs_update`, equal to the sequential updates).

    Args:
        inverse_blocks: (K, c, c) the inverse F⁻¹ of each block (symmetric positive definite).
        weights: (K, c) the blocks' weights.
        num_remove: removals per block, an int or (K,) ints, each ≤ c (N:M: ignored, the pattern decides).
        total_remove: instead of ``num_remove``, the removals over all blocks (global selection).
        n_m: (n, m): at most n removals in every m consecutive entries of a block (c a multiple of m); with
            ``num_remove=None`` and ``total_remove=None`` every group gets exactly n zeros.
        forced: (K, c) bool entries to remove first whatever their cost (the block's existing zeros are added).

    Returns:
        A :class:`SequentialOBSResult`.

    Raises:
        ValueError: shapes that do not match, counts out of range, both or neither of num_remove and
            total_remove (without n_m).
    """
    inverse = tf.convert_to_tensor(inverse_blocks)
    dtype = inverse.dtype
    w = tf.cast(weights, dtype).numpy()
    if inverse.shape.rank != 3 or w.ndim != 2 or tuple(inverse.shape[:2]) != w.shape or inverse.shape[2] != w.shape[1]:
        raise ValueError(f"inverse_blocks must be (K, c, c) and weights (K, c), got {tuple(inverse.shape)} and "
                         f"{w.shape}")
    K, cols = w.shape
    forced = (w == 0) if forced is None else (np.asarray(forced, bool) | (w == 0))
    group_of, num_groups, limit = _groups(cols, n_m)
    if n_m is not None and num_remove is None and total_remove is None:
        per_group = np.zeros((K, num_groups), np.int64)
        np.add.at(per_group, (np.repeat(np.arange(K), cols), np.tile(group_of, K)), forced.ravel())
        quota = np.maximum(per_group, limit).sum(axis=1)
    elif (num_remove is None) == (total_remove is None):
        raise ValueError("give exactly one of num_remove (per block) and total_remove (over all blocks)")
    elif num_remove is not None:
        quota = np.broadcast_to(np.asarray(num_remove, dtype=np.int64), (K,))
        if quota.min() < 0 or quota.max() > cols:
            raise ValueError(f"num_remove must be in [0, {cols}], got {num_remove!r}")
        quota = np.maximum(quota, forced.sum(axis=1))
    else:
        if not 0 <= int(total_remove) <= K * cols:
            raise ValueError(f"total_remove must be in [0, {K * cols}], got {total_remove!r}")
        quota = np.full(K, cols if n_m is None else (cols // n_m[1]) * n_m[0])
        quota = np.maximum(quota, forced.sum(axis=1))
    group_of = np.tile(group_of, (K, 1))
    out_w, removed, losses, order, counts = _greedy(inverse, w, forced, quota, group_of, num_groups, limit)
    if total_remove is not None:
        counts = merge_by_heads(losses, counts, max(int(total_remove), int(forced.sum())))
        steps = np.arange(order.shape[1])
        taken = steps[None, :] < counts[:, None]
        removed = np.zeros((K, cols), bool)
        removed[np.nonzero(taken)[0], order[taken]] = True
        out_w = group_obs_update(inverse, w, removed).numpy()
        losses, order = np.where(taken, losses, 0.0), np.where(taken, order, -1)
    out_w[removed] = 0.0
    return SequentialOBSResult(tf.constant(out_w, dtype), tf.constant(~removed, dtype), losses, order, counts)


def sequential_event(inverses: Sequence[tuple], values, mask, segment_sizes: Sequence[int], sparsity: float,
                     mode: str) -> tuple:
    """One pruning event of ``WoodFisherConfig(sequential=True)``: sequential OBS inside every Fisher block.

    Each block's inverse (F⁻¹ restricted to the block, from the stored factors: a low-rank block is made
    explicit, c × c, within :data:`SEQUENTIAL_MAX_ENTRIES` over all blocks, else refused) runs
    :func:`sequential_obs` to its end, recording its loss curve; the removals are then chosen by the
    step-by-step global greedy (:func:`merge_by_heads`) over all blocks (``mode='global'``) or over the blocks
    of each tensor (``'layerwise'``), and the weights are the joint OBS update of each block's removed set.
    Entries already pruned (``mask`` 0) are removed first and stay pruned.

    Args:
        inverses: per stage of the event, (offset of its first entry in the flat vector, its
            :class:`~tf_woodfisher.fisher.InverseFisher`, or None when the plan did not keep it).
        values: (d,) the flat weights. mask: (d,) 0/1 current mask.
        segment_sizes: entries of each pruned tensor, in order (blocks never cross them).
        sparsity: the event's sparsity over all entries (global) or in each tensor (layerwise).
        mode: ``'global'`` or ``'layerwise'``.

    Returns:
        (new mask (d,) float32 numpy, new values (d,) float64 numpy).

    Raises:
        ValueError: an inverse that was not kept (the memory plan streams the event: raise ``max_memory``), or
            explicit blocks beyond :data:`SEQUENTIAL_MAX_ENTRIES` (a smaller ``fisher_block_size`` is needed).
    """
    if any(inverse is None for _, inverse in inverses):
        raise ValueError("sequential=True needs the inverse Fisher of every stage kept until the update, but the "
                         "memory plan recomputes it: raise max_memory or use smaller fisher_block_size")
    values = np.asarray(values, dtype=np.float64)
    keep = np.asarray(mask) > 0
    entries = sum(g.num_blocks * g.block_size ** 2 for _, inverse in inverses for g in inverse.partition.groups)
    if entries > SEQUENTIAL_MAX_ENTRIES:
        raise ValueError(f"sequential=True holds every Fisher block as an explicit c × c inverse: {entries:,} entries "
                         f"here (at most {SEQUENTIAL_MAX_ENTRIES:,}); use a smaller int fisher_block_size")
    indices, results, inverse_blocks = [], [], []
    for offset, inverse in inverses:
        for group in inverse.partition.groups:  # the few groups of equal-size blocks, each one batched run
            blocks = inverse.submatrices(group.indices)
            index = np.asarray(group.indices) + offset
            results.append(sequential_obs(blocks, values[index], index.shape[1], forced=~keep[index]))
            indices.append(index)
            inverse_blocks.append(blocks)
    width = max(r.losses.shape[1] for r in results)
    losses = np.concatenate([np.pad(r.losses, ((0, 0), (0, width - r.losses.shape[1]))) for r in results])
    orders = np.concatenate([np.pad(r.order, ((0, 0), (0, width - r.order.shape[1])), constant_values=-1)
                             for r in results])
    counts = np.concatenate([r.counts for r in results])
    firsts = np.concatenate([index[:, 0] for index in indices])
    chosen = np.zeros(len(counts), np.int64)
    bounds = np.cumsum([0] + list(segment_sizes))
    spans = [(0, bounds[-1])] if mode == "global" else list(zip(bounds[:-1], bounds[1:]))
    for begin, end in spans:  # one merge over all blocks, or one per tensor
        mine = np.flatnonzero((firsts >= begin) & (firsts < end))
        total = max(int(round(sparsity * (end - begin))), int((~keep[begin:end]).sum()))
        chosen[mine] = merge_by_heads(losses[mine], counts[mine], total)
    taken = np.arange(width)[None, :] < chosen[:, None]
    new_mask, new_values = np.ones(values.size, np.float32), values.copy()
    start = 0
    for index, blocks in zip(indices, inverse_blocks):  # per group of equal-size blocks
        rows = slice(start, start + len(index))
        start += len(index)
        removed = np.zeros(index.shape, bool)
        block, step = np.nonzero(taken[rows])
        removed[block, orders[rows][block, step]] = True
        new_mask[index[removed]] = 0.0
        new_values[index] = group_obs_update(blocks, values[index], removed).numpy()
    return new_mask, new_values


# ----------------------------------------------------------------------------------------------- layer-wise

def _layer_problem(W, H, damping, name, num_inputs, mask=None):
    """W as (G, rows, cols) float64 numpy with dead-input columns zeroed, H⁻¹ (G, cols, cols) float64,
    whether W came without the G axis, and the (G·rows, cols) entries to remove first (zeros, ``mask`` 0)."""
    W = np.array(W, dtype=np.float64)
    forced = (W == 0) if mask is None else (W == 0) | (np.asarray(mask) == 0)
    H = np.asarray(H, dtype=np.float64)
    flat = W.ndim == 2
    if flat:
        W, H = W[None], H[None] if H.ndim == 2 else H
    if W.ndim != 3 or H.shape != (W.shape[0], W.shape[2], W.shape[2]):
        raise ValueError(f"{name}: W must be (rows, cols) with H (cols, cols), or (G, rows, cols) with H "
                         f"(G, cols, cols); got {W.shape} and {H.shape}")
    inverse, dead = damped_inverse(H, damping, name, num_inputs, dtype=tf.float64)
    W[np.broadcast_to(dead[:, None, :], W.shape)] = 0.0
    forced = forced.reshape(W.shape) | (W == 0)
    return W, inverse, flat, forced.reshape(-1, W.shape[2])


def _per_row_count(sparsity, n_m, cols, name):
    if (sparsity is None) == (n_m is None):
        raise ValueError(f"{name}: give exactly one of sparsity (unstructured) and n_m (N:M pattern)")
    if n_m is not None:
        _check_n_m(n_m, cols)
        return None
    if not (isinstance(sparsity, (int, float, np.floating)) and 0 <= float(sparsity) < 1):
        raise ValueError(f"{name}: sparsity must be a number in [0, 1), got {sparsity!r}")
    return int(round(float(sparsity) * cols))


def _row_batches(inverse, G: int, rows: int, dtype, max_memory: int):
    """(slice of the flat rows, their H⁻¹ copies (k, c, c)) for batches of the G·rows rows within ``max_memory``."""
    cols = int(inverse.shape[-1])
    batch = max(1, int(max_memory // (3 * cols * cols * tf.as_dtype(dtype).size)))
    owner = np.repeat(np.arange(G), rows)
    for start in range(0, G * rows, batch):  # batches of rows, bounded by memory
        part = slice(start, min(start + batch, G * rows))
        yield part, tf.gather(inverse, owner[part])


def _full_greedy(flat_w, inverse, G, rows, dtype, max_memory, forced):
    """Every row's complete greedy OBS sequence (all its entries removed): (losses (G·rows, c), orders, counts)."""
    cols = flat_w.shape[1]
    pieces = [sequential_obs(blocks, flat_w[part], cols, forced=forced[part]) for part, blocks in
              _row_batches(inverse, G, rows, dtype, max_memory)]
    return (np.concatenate([p.losses for p in pieces]), np.concatenate([p.order for p in pieces]),
            np.concatenate([p.counts for p in pieces]))


def obc_prune(W, H, sparsity: Optional[float] = None, n_m=None, damping: float = 0.01, *, rows: str = "uniform",
              mask=None, name: str = "layer", num_inputs: Optional[int] = None, dtype=tf.float32,
              max_memory: int = DEFAULT_MAX_MEMORY) -> LayerOBSResult:
    """OBC: exact greedy OBS of every output row of a layer on its reconstruction Hessian H = 2XXᵀ/n.

    Each row starts from the same damped H⁻¹ and runs :func:`sequential_obs` (one removal per step in all
    rows of a batch at once, rank-1 downdates of its own copy of H⁻¹). Rows are batched so that the
    copies of H⁻¹ fit ``max_memory`` (batches of rows, not a loop over rows).

    Args:
        W: (rows, cols), or (G, rows, cols) for G problems with their own H.
        H: (cols, cols) or (G, cols, cols), 2XXᵀ/n over the layer's inputs (undamped).
        sparsity: fraction of the layer removed: ``rows='uniform'``: round(sparsity·cols) entries of every
            row; ``rows='global'``: round(sparsity·rows·cols) entries over all rows, chosen as OBC does by
            merging the rows' greedy loss curves (at every step the row whose next removal costs least,
            :func:`merge_by_heads`; the rows share X, so their losses compare), the weights then set by the
            joint OBS update of each row's removed set. Existing zeros count.
        n_m: (n, m) instead: n zeros in every m consecutive columns of each row (``rows`` is then unused).
        damping: fraction of mean(diag H) added to its diagonal (SparseGPT's percdamp).
        rows: ``'uniform'`` or ``'global'`` (see ``sparsity``).
        mask: like ``W``, 0 where an entry is already pruned: removed first (with its OBS update) and counted;
            None: the zeros of ``W``.
        name: the layer, for messages. num_inputs: rows of X behind H (for the singular-H check).
        dtype: of the greedy loop (float32; float64 for reference-exact results).
        max_memory: bytes the copies of H⁻¹ of one batch of rows may take.

    Returns:
        A :class:`LayerOBSResult`; ``losses[..., r, t]`` is row r's loss increase at its (t+1)-th removal
        (``rows='global'``: over its complete greedy sequence, the curve the merge reads).

    Raises:
        ValueError: shapes, sparsity or pattern out of range, an unknown ``rows``, a singular H without
            damping (naming ``name``).
    """
    if rows not in ("uniform", "global"):
        raise ValueError(f"{name}: rows must be 'uniform' or 'global', got {rows!r}")
    W64, inverse, flat, forced = _layer_problem(W, H, damping, name, num_inputs, mask)
    G, R, cols = W64.shape
    per_row = _per_row_count(sparsity, n_m, cols, name)
    dtype = tf.as_dtype(dtype)
    inverse = tf.cast(inverse, dtype)
    flat_w = W64.reshape(G * R, cols)
    shape = (R, cols) if flat else (G, R, cols)
    if rows == "uniform" or n_m is not None:
        pieces = [sequential_obs(blocks, flat_w[part], per_row, n_m=n_m, forced=forced[part])
                  for part, blocks in _row_batches(inverse, G, R, dtype, max_memory)]
        steps = max(p.losses.shape[1] for p in pieces)
        losses = np.concatenate([np.pad(p.losses, ((0, 0), (0, steps - p.losses.shape[1]))) for p in pieces])
        weights = tf.concat([p.weights for p in pieces], 0)
        mask = tf.concat([p.mask for p in pieces], 0)
    else:
        losses, order, counts = _full_greedy(flat_w, inverse, G, R, dtype, max_memory, forced)
        total = max(int(round(float(sparsity) * G * R * cols)), int(np.sum(forced)))
        chosen = merge_by_heads(losses, counts, total)
        taken = np.arange(cols)[None, :] < chosen[:, None]
        removed = np.zeros((G * R, cols), bool)
        removed[np.nonzero(taken)[0], order[taken]] = True
        weights = tf.concat([group_obs_update(blocks, flat_w[part], removed[part])
                             for part, blocks in _row_batches(inverse, G, R, dtype, max_memory)], 0)
        mask = tf.constant(~removed, dtype)
        steps = cols
    return LayerOBSResult(tf.reshape(weights, shape), tf.reshape(mask, shape),
                          losses.reshape(shape[:-1] + (steps,)))


def obc_loss_curve(W, H, damping: float = 0.01, *, mask=None, name: str = "layer", num_inputs: Optional[int] = None,
                   dtype=tf.float32, max_memory: int = DEFAULT_MAX_MEMORY) -> np.ndarray:
    """The layer's OBC loss after every number of removals, rows merged as ``obc_prune(rows='global')`` does.

    Args:
        W, H, damping, mask, name, num_inputs, dtype, max_memory: as in :func:`obc_prune`.

    Returns:
        (G·rows·cols + 1,) float64: entry k is ½Σ_r δ_rᵀH_dδ_r (H damped) after the first k removals.
    """
    W64, inverse, _, forced = _layer_problem(W, H, damping, name, num_inputs, mask)
    G, R, cols = W64.shape
    losses, _, counts = _full_greedy(W64.reshape(G * R, cols), tf.cast(inverse, dtype), G, R, dtype, max_memory,
                                     forced)
    return merged_loss_curve(losses, counts)


def compensated_weights(W, H, cross, damping: float = 0.01, name: str = "layer"):
    """The dense weights W* whose outputs on the pruned-upstream inputs X̃ best match the dense model's XWᵀ:
    W* = W Cᵀ (H̃ + λ·mean(diag H̃)·I)⁻¹ with H̃ = 2X̃ᵀX̃/n and C = 2X̃ᵀX/n, so that
    ‖X̃Ŵᵀ − XWᵀ‖² = ‖X̃(Ŵ − W*)ᵀ‖² + const: pruning W* on H̃ reconstructs the dense outputs, correcting the
    error of the layers pruned before.

    Args:
        W: (…, rows, cols) dense weights. H: (…, cols, cols) H̃ of the pruned-upstream inputs.
        cross: (…, cols, cols) C = 2X̃ᵀX/n (pruned inputs × dense inputs). damping: as in :func:`obc_prune`.
        name: for messages.

    Returns:
        (…, rows, cols) float64 W*.
    """
    W = np.asarray(W, dtype=np.float64)
    inverse, _ = damped_inverse(H, damping, name, dtype=tf.float64)
    return W @ np.swapaxes(np.asarray(cross, np.float64), -1, -2) @ inverse.numpy()


def _sparsegpt_sweep_impl(W, U, forced, block_counts, block, group_size, group_zeros, real_cols):
    """The SparseGPT sweep over column blocks of ``block`` columns (a multiple of ``group_size``).

    W (G, R, C) with C a multiple of ``block``, U (G, C, C) upper Cholesky factor of H⁻¹ (UᵀU = H⁻¹),
    forced (G, R, C) bool, block_counts (C/block,) int32 unstructured removals of each block (over its
    R × block entries; unused for N:M), group_size m (0: unstructured), group_zeros n, real_cols (columns
    after which all are padding). Returns (weights, mask (G, R, C) bool pruned, losses (G, R)).
    """
    dtype = W.dtype
    G, R, C = tf.shape(W)[0], tf.shape(W)[1], tf.shape(W)[2]
    infinity = tf.constant(np.inf, dtype)
    structured = group_size > 0
    m = tf.maximum(group_size, 1)
    column = tf.range(C)

    def select_smallest(score, count):
        """bool mask of the ``count`` smallest entries of each row of score (…, n)."""
        ranks = tf.argsort(tf.argsort(score, axis=-1, stable=True), axis=-1, stable=True)
        return ranks < count

    def block_step(b, W, pruned, losses):
        start = b * block
        cols = tf.range(start, start + block)
        W1 = tf.gather(W, cols, axis=2)  # (G, R, B)
        U_rows = tf.gather(U, cols, axis=1)  # (G, B, C)
        U1 = tf.gather(U_rows, cols, axis=2)  # (G, B, B)
        d = tf.linalg.diag_part(U1)  # (G, B)
        F1 = tf.gather(forced, cols, axis=2)
        padding = (cols >= real_cols)[None, None, :]
        score = tf.square(W1) / tf.square(d)[:, None, :]
        score = tf.where(F1, -infinity, tf.where(padding, infinity, score))
        flat = tf.reshape(score, [G, R * block])
        unstructured = tf.reshape(select_smallest(flat, block_counts[b]), [G, R, block]) | F1
        mask1 = tf.where(structured, F1, unstructured)

        def column_step(i, W1, mask1, errors, losses):
            if_group_start = structured & (i % m == 0)
            group = tf.minimum(i + tf.range(m), block - 1)
            group_score = tf.square(tf.gather(W1, group, axis=2)) / tf.square(tf.gather(d, group, axis=1))[:, None, :]
            group_score = tf.where(tf.gather(F1, group, axis=2), -infinity, group_score)
            chosen = select_smallest(group_score, group_zeros) | tf.gather(F1, group, axis=2)  # (G, R, m)
            in_group = tf.one_hot(group, block, on_value=True, off_value=False)  # (m, B)
            spread = tf.reduce_any(chosen[:, :, :, None] & in_group[None, None], axis=2)
            touched = tf.reduce_any(in_group, axis=0)[None, None, :]
            mask1 = tf.where(if_group_start & touched, spread, mask1)
            w = tf.gather(W1, i, axis=2)  # (G, R)
            q = tf.where(tf.gather(mask1, i, axis=2), tf.zeros_like(w), w)
            d_i = tf.gather(d, i, axis=1)[:, None]
            error = (w - q) / d_i
            W1 = W1 - error[:, :, None] * tf.gather(U1, i, axis=1)[:, None, :]
            errors += error[:, :, None] * tf.one_hot(i, block, dtype=dtype)[None, None, :]
            losses += 0.5 * tf.square(error)
            return i + 1, W1, mask1, errors, losses

        _, W1, mask1, errors, losses = tf.while_loop(
            lambda i, *_: i < block, column_step,
            (tf.constant(0), W1, mask1, tf.zeros_like(W1), losses))
        W1 = tf.where(mask1, tf.zeros_like(W1), W1)
        later = tf.cast(column >= start + block, dtype)[None, None, :]
        W = W - tf.matmul(errors, U_rows * later)  # the lazy update of all columns after the block
        inside = (column >= start) & (column < start + block)
        placed = tf.pad(W1, [[0, 0], [0, 0], [start, C - start - block]])
        W = tf.where(inside[None, None, :], placed, W)
        pruned = pruned | (tf.pad(tf.cast(mask1, tf.int32), [[0, 0], [0, 0], [start, C - start - block]]) > 0)
        return b + 1, W, pruned, losses

    _, W, pruned, losses = tf.while_loop(
        lambda b, *_: b < C // block, block_step,
        (tf.constant(0), W, tf.zeros_like(forced), tf.zeros([G, R], dtype)))
    return W, pruned, losses


def _sweep_signature(dtype):
    matrix = tf.TensorSpec([None, None, None], dtype)
    scalar = tf.TensorSpec([], tf.int32)
    return [matrix, matrix, tf.TensorSpec([None, None, None], tf.bool), tf.TensorSpec([None], tf.int32),
            scalar, scalar, scalar, scalar]


# One compiled sweep per dtype, with unknown dimensions (one trace for all layers).
_SPARSEGPT_SWEEPS = {dtype: compat.function(_sparsegpt_sweep_impl, input_signature=_sweep_signature(dtype))
                     for dtype in (tf.float32, tf.float64)}


def _refine_impl(goal, start, keep, H, iterations):
    """Weights with the mask fixed: preconditioned conjugate gradients on every row's kept entries of
    min ½(ŵ − w)ᵀH(ŵ − w) subject to ŵ = 0 off ``keep`` (the exact OBS reconstruction of that mask).

    goal, start (G, R, C) the target weights w and the starting point (the sweep's ŵ), keep (G, R, C) bool,
    H (G, C, C) damped (positive definite), iterations the most CG steps (Jacobi-preconditioned; a row stops
    once its preconditioned residual fell by 10⁻⁶). CG lowers the loss at every step from the warm start.
    """
    dtype = goal.dtype
    keep = tf.cast(keep, dtype)
    precondition = 1.0 / tf.linalg.diag_part(H)[:, None, :]
    V = start * keep
    R = tf.matmul(goal - V, H) * keep  # minus the gradient, on the kept entries
    Z = R * precondition
    rz = tf.reduce_sum(R * Z, axis=-1)
    tolerance = rz * 1e-12

    def step(t, V, R, P, rz):
        active = rz > tolerance
        AP = tf.matmul(P, H) * keep
        curvature = tf.reduce_sum(P * AP, axis=-1)
        alpha = tf.where(active & (curvature > 0), rz / tf.where(curvature > 0, curvature, 1), 0)[..., None]
        V += alpha * P
        R -= alpha * AP
        Z = R * precondition
        rz_new = tf.reduce_sum(R * Z, axis=-1)
        beta = tf.where(active & (rz > 0), rz_new / tf.where(rz > 0, rz, 1), 0)[..., None]
        return t + 1, V, R, Z + beta * P, tf.where(active, rz_new, tf.zeros_like(rz_new))

    _, V, *_ = tf.while_loop(lambda t, V, R, P, rz: (t < iterations) & tf.reduce_any(rz > tolerance), step,
                             (tf.constant(0), V, R, Z, rz))
    return V * keep


_SPARSEGPT_REFINES = {dtype: compat.function(_refine_impl, input_signature=[
    tf.TensorSpec([None, None, None], dtype), tf.TensorSpec([None, None, None], dtype),
    tf.TensorSpec([None, None, None], tf.bool), tf.TensorSpec([None, None, None], dtype),
    tf.TensorSpec([], tf.int32)]) for dtype in (tf.float32, tf.float64)}

SPARSEGPT_REFINE = 64  # default CG iterations of sparsegpt_prune's reconstruction with its mask fixed


def _act_order(H, m: int) -> np.ndarray:
    """(G, cols) per problem: columns by decreasing diag H (inputs never active last); N:M (m > 0): whole
    groups of m consecutive columns by decreasing Σ diag H over the group, in each group by decreasing diag H."""
    diagonal = np.diagonal(H, axis1=-2, axis2=-1)
    G, cols = diagonal.shape
    if not m:
        return np.argsort(-diagonal, axis=1, kind="stable")
    groups = diagonal.reshape(G, cols // m, m)
    order = np.argsort(-groups.sum(axis=-1), axis=1, kind="stable")  # (G, groups)
    inside = np.argsort(-np.take_along_axis(groups, order[:, :, None], axis=1), axis=2, kind="stable")
    return (order[:, :, None] * m + inside).reshape(G, cols)


def sparsegpt_prune(W, H, sparsity: Optional[float] = None, n_m=None, block_size: int = 128,
                    damping: float = 0.01, *, act_order: Optional[bool] = None, refine: Optional[int] = None,
                    mask=None, name: str = "layer", num_inputs: Optional[int] = None,
                    dtype=tf.float32) -> LayerOBSResult:
    """SparseGPT: approximate OBS reconstruction of a layer with one Cholesky factor of H⁻¹ for all rows.

    With U the upper Cholesky factor of the damped H⁻¹ (UᵀU = H⁻¹), columns are swept in blocks of
    ``block_size``. At the start of a block its mask is chosen adaptively: the round(sparsity · rows · block)
    entries of the whole block (all rows) with the smallest w²/U_ii² (block counts are rounded cumulatively,
    so the layer gets exactly round(sparsity · rows · cols) zeros plus any existing ones); with N:M, at the
    start of each group of m columns, the n smallest of each row's group. For each column i:
    err = (w_i − ŵ_i)/U_ii, W[:, i:] −= err·U[i, i:] inside the block; after the block the accumulated errors
    update all later columns in one matrix product.

    Two refinements of the paper's algorithm, on by default for N:M (``act_order=False, refine=0`` is the
    reference implementation, IST-DASLab/sparsegpt's ``fasterprune``, and the unstructured default):

    * ``act_order``: the sweep visits columns in decreasing diag H (GPTQ's "act order"), so that the inputs
      with the most energy are decided first and their errors are compensated on the many columns after them;
      N:M: whole groups of m columns by decreasing Σ diag H (the groups stay those of the pattern), each
      group's columns by decreasing diag H. Measured on MLPNet (BENCHMARKS.md section 7): it lowers the
      reconstruction error at 2:4 but raises it in unstructured pruning at 95% (a block's mask is then chosen
      among high-energy columns only), hence the default.
    * ``refine``: the sweep only compensates a column's error on the columns after it, which leaves the kept
      weights short of the best reconstruction for the mask it chose (about 2× in relative error at 2:4 on
      MLPNet). With the mask fixed, up to ``refine`` iterations of Jacobi-preconditioned conjugate gradients
      per row (batched over rows, one (rows × cols)·(cols × cols) product each) move the kept weights toward
      the joint OBS update of the pruned set, w − H⁻¹E_Q[(H⁻¹)_QQ]⁻¹w_Q (:func:`group_obs_update`); a row
      whose CG result is not better than the sweep's keeps the sweep's. Cost O(refine · rows · cols²), about
      the sweep's own at :data:`SPARSEGPT_REFINE` on MLPNet's layers (it also helps unstructured pruning,
      where it is off by default: ``mode='global'`` runs SparseGPT at every point of its sparsity grid).

    Args:
        W: (rows, cols), or (G, rows, cols) with H (G, cols, cols).
        H: (cols, cols) 2XXᵀ/n (undamped).
        sparsity: fraction of the layer's entries removed; or ``n_m=(n, m)``: n zeros in every m columns.
        block_size: columns per lazy-update block (rounded up to a multiple of m for N:M).
        damping: fraction of mean(diag H) added to its diagonal.
        act_order: sweep the columns in decreasing diag H (else left to right); None: True with ``n_m``,
            False without.
        refine: the most conjugate-gradient iterations of the reconstruction with the mask fixed (0: none);
            None: :data:`SPARSEGPT_REFINE` with ``n_m``, 0 without.
        mask, name, num_inputs: as in :func:`obc_prune`. dtype: of the sweep.

    Returns:
        A :class:`LayerOBSResult`; ``losses[..., r, 0]`` is row r's loss ½(w − ŵ)ᵀH(w − ŵ) on the damped H
        (without refinement the sweep's Σ(w − ŵ)²/(2U_ii²), the same number).

    Raises:
        ValueError: as :func:`obc_prune`, ``block_size`` < 1, or ``refine`` not an int ≥ 0.
    """
    if not (isinstance(block_size, (int, np.integer)) and block_size >= 1):
        raise ValueError(f"{name}: block_size must be an int ≥ 1, got {block_size!r}")
    if refine is None:
        refine = 0 if n_m is None else SPARSEGPT_REFINE
    if not (isinstance(refine, (int, np.integer)) and not isinstance(refine, bool) and refine >= 0):
        raise ValueError(f"{name}: refine must be an int ≥ 0 (conjugate-gradient iterations), got {refine!r}")
    if act_order is None:
        act_order = n_m is not None
    W64, inverse, flat, forced_rows = _layer_problem(W, H, damping, name, num_inputs, mask)
    G, rows, cols = W64.shape
    _per_row_count(sparsity, n_m, cols, name)
    dtype = tf.as_dtype(dtype)
    if dtype not in _SPARSEGPT_SWEEPS:
        raise ValueError(f"{name}: dtype must be float32 or float64, got {dtype.name}")
    m = 0 if n_m is None else int(n_m[1])
    H64 = np.asarray(H, dtype=np.float64).reshape(G, cols, cols)
    forced_rows = forced_rows.reshape(G, rows, cols)
    inverse = inverse.numpy()
    if act_order:
        perm = _act_order(H64, m)
        inverse = inverse[np.arange(G)[:, None, None], perm[:, :, None], perm[:, None, :]]
        goal = np.take_along_axis(W64, perm[:, None, :], axis=2)
        forced_sweep = np.take_along_axis(forced_rows, perm[:, None, :], axis=2)
    else:
        goal, forced_sweep = W64, forced_rows
    block = int(min(block_size, cols)) if not m else int(-(-min(block_size, cols) // m) * m)
    padded = -(-cols // block) * block
    upper = tf.linalg.matrix_transpose(tf.linalg.cholesky(tf.constant(inverse))).numpy()
    U = np.tile(np.eye(padded), (G, 1, 1))
    U[:, :cols, :cols] = upper
    weights = np.zeros((G, rows, padded))
    weights[:, :, :cols] = goal
    forced = np.zeros((G, rows, padded), bool)
    forced[:, :, :cols] = forced_sweep
    ends = np.minimum(np.arange(1, padded // block + 1) * block, cols)
    counts = np.diff(np.round(float(sparsity or 0) * rows * np.concatenate([[0], ends])).astype(np.int64))
    out, pruned, _ = _SPARSEGPT_SWEEPS[dtype](
        tf.constant(weights, dtype), tf.constant(U, dtype), tf.constant(forced), tf.constant(counts, tf.int32),
        tf.constant(block), tf.constant(m), tf.constant(0 if n_m is None else int(n_m[0])), tf.constant(cols))
    out, pruned = out.numpy()[:, :, :cols].astype(np.float64), pruned.numpy()[:, :, :cols]
    if act_order:
        back = np.argsort(perm, axis=1)[:, None, :]
        out, pruned = np.take_along_axis(out, back, axis=2), np.take_along_axis(pruned, back, axis=2)
    out[pruned] = 0.0
    H_damped = _damped(H64, damping)

    def row_losses(V):
        delta = W64 - V
        return 0.5 * np.sum((delta @ H_damped) * delta, axis=-1)

    losses = row_losses(out)
    if refine:
        refined = _SPARSEGPT_REFINES[dtype](tf.constant(W64, dtype), tf.constant(out, dtype), tf.constant(~pruned),
                                            tf.constant(H_damped, dtype), tf.constant(int(refine), tf.int32))
        refined = refined.numpy().astype(np.float64)
        refined_losses = row_losses(refined)
        better = refined_losses < losses
        out = np.where(better[..., None], refined, out)
        losses = np.where(better, refined_losses, losses)
    mask = tf.constant(~pruned, dtype)
    out = tf.constant(out, dtype) * mask
    if flat:
        out, mask, losses = out[0], mask[0], losses[0]
    return LayerOBSResult(out, mask, np.asarray(losses, np.float64)[..., None])


def magnitude_prune(W, sparsity: Optional[float] = None, n_m=None) -> tf.Tensor:
    """The 0/1 mask (same shape as ``W``) of magnitude pruning per row: the round(sparsity·cols) smallest
    |w| of each row, or the n smallest of every m consecutive columns (a baseline for the tests)."""
    W = np.asarray(W, dtype=np.float64)
    cols = W.shape[-1]
    if n_m is not None:
        n, m = _check_n_m(n_m, cols)
        groups = np.abs(W).reshape(W.shape[:-1] + (cols // m, m))
        ranks = np.argsort(np.argsort(groups, axis=-1, kind="stable"), axis=-1, kind="stable")
        return tf.constant((ranks >= n).reshape(W.shape).astype(np.float32))
    count = _per_row_count(sparsity, None, cols, "magnitude")
    ranks = np.argsort(np.argsort(np.abs(W), axis=-1, kind="stable"), axis=-1, kind="stable")
    return tf.constant((ranks >= count).astype(np.float32))


def allocate_by_hull(curves: Sequence[np.ndarray], total: int) -> np.ndarray:
    """Removals per problem (layer) that reach ``total`` removals at least summed loss, on the lower convex
    hull of each problem's loss curve (the Lagrangian solution of the multiple-choice knapsack): all hull
    segments of all curves sorted by their cost per removal, taken cheapest first, the last one in part.

    Args:
        curves: per problem, (n_j + 1,) the loss after removing k = 0 … n_j entries (curve[0] = 0), or
            (points, 2) arrays of (removals, loss) on a grid that starts at (0, 0).
        total: removals over all problems, ≤ the sum of their maxima.

    Returns:
        (len(curves),) int removals per problem (on a grid curve, possibly between its grid points).

    Raises:
        ValueError: ``total`` beyond what the curves allow.
    """
    slopes, owners, widths = [], [], []
    for index, curve in enumerate(curves):  # one hull per problem (layer)
        curve = np.asarray(curve, dtype=np.float64)
        points = curve if curve.ndim == 2 else np.stack([np.arange(len(curve)), curve], axis=1)
        hull = np.asarray(_lower_hull(points))
        width = np.diff(hull[:, 0])
        slopes.append(np.diff(hull[:, 1]) / width)
        widths.append(width)
        owners.append(np.full(len(width), index))
    slopes, owners, widths = (np.concatenate(a) for a in (slopes, owners, widths))
    if total > widths.sum() + 1e-9:
        raise ValueError(f"cannot remove {total} entries: the curves allow at most {int(widths.sum())}")
    order = np.argsort(slopes, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(widths[order])[:-1]])
    taken = np.clip(float(total) - before, 0.0, widths[order])
    removals = np.bincount(owners[order], weights=taken, minlength=len(curves))
    return np.round(removals).astype(np.int64)


def _lower_hull(points: np.ndarray) -> list:
    """The lower convex hull of (x, y) points sorted by x, from the first to the last point."""
    points = points[np.argsort(points[:, 0], kind="stable")]
    hull = []
    for point in points:
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], point) <= 0:
            hull.pop()
        hull.append(tuple(point))
    return hull


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


__all__ = ["LayerOBSResult", "SequentialOBSResult", "allocate_by_hull", "compensated_weights", "damped_inverse",
           "group_obs_update", "magnitude_prune", "merge_by_heads", "merged_loss_curve", "obc_loss_curve", "obc_prune",
           "reconstruction_error", "sequential_event", "sequential_obs", "sparsegpt_prune"]
