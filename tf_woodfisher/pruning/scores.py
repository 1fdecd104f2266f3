"""Pruning scores, the choice of pruned weights, and the OBS / WoodTaylor weight update.

All vectors are flat, of length d (the prunable weights in layer order). Scores estimate the
increase of the loss caused by removing a weight, in loss units:

* ``magnitude``: ½w² (F = I);
* ``diagonal_fisher``: ½w²·F_qq with F_qq = λ + mean(g_q²);
* ``woodfisher``: ρ_q = w_q² / (2[F⁻¹]_qq), update δw = −F⁻¹u, u_q = w_q/[F⁻¹]_qq on the pruned set Q;
* ``woodtaylor``: with r = F⁻¹ḡ (ḡ the mean gradient), ρ_q = (w_q − r_q)² / (2[F⁻¹]_qq),
  update δw = −F⁻¹u − r, u_q = (w_q − r_q)/[F⁻¹]_qq on Q.
"""
import dataclasses

import numpy as np
import tensorflow as tf

from tf_woodfisher.config import INVERSE_METHODS, METHODS, MODES

@dataclasses.dataclass(frozen=True)
class FisherStatistics:
    """What the scores need from the gradients; fields a method does not use are None.

    Attributes:
        inverse: an ``InverseFisher`` (WoodFisher, WoodTaylor).
        fisher_diagonal: (d,) λ + mean(g²) (diagonal Fisher).
        mean_gradient: (d,) ḡ (WoodTaylor).
    """

    inverse: object = None
    fisher_diagonal: tf.Tensor = None
    mean_gradient: tf.Tensor = None

    @classmethod
    def for_method(cls, method, damping, inverse=None, moments=None):
        """Statistics for ``method`` from an ``inverse`` and ``moments``, both computed by the caller.

        Args:
            method: one of :data:`~tf_woodfisher.config.METHODS`.
            damping: λ > 0, added to mean(g²) for diagonal Fisher.
            inverse: the ``InverseFisher`` (WoodFisher, WoodTaylor), else None.
            moments: (ḡ, mean(g²)), each a (d,) float32 tensor (diagonal Fisher, WoodTaylor), else None.

        Returns:
            The :class:`FisherStatistics` with the fields ``method`` uses set.
        """
        if method == "diagonal_fisher":
            return cls(fisher_diagonal=damping + moments[1])
        if method == "woodtaylor":
            return cls(inverse=inverse, mean_gradient=moments[0])
        return cls(inverse=inverse)


def _newton_offset(method, stats, dtype):
    """r = F⁻¹ḡ for WoodTaylor, 0 otherwise."""
    if method == "woodtaylor":
        return tf.cast(stats.inverse.matvec(stats.mean_gradient), dtype)
    return tf.zeros([], dtype)


def importance_scores(method, weights, stats):
    """(d,) scores; lower means cheaper to prune.

    Args:
        method: one of :data:`~tf_woodfisher.config.METHODS` (formulas in the module docstring).
        weights: (d,) float weights w, flat over all targets.
        stats: the :class:`FisherStatistics` of ``method`` (unused for magnitude).

    Returns:
        (d,) tensor of ``weights``' dtype: the estimated increase of the loss, in loss units.

    Raises:
        ValueError: an unknown ``method``.
    """
    weights = tf.convert_to_tensor(weights)
    if method == "magnitude":
        return 0.5 * tf.square(weights)
    if method == "diagonal_fisher":
        return 0.5 * tf.square(weights) * tf.cast(stats.fisher_diagonal, weights.dtype)
    if method in INVERSE_METHODS:
        shifted = weights - _newton_offset(method, stats, weights.dtype)
        return tf.square(shifted) / (2.0 * tf.cast(stats.inverse.diagonal(), weights.dtype))
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def updated_weights(method, weights, pruned, stats):
    """Weights after the OBS (or WoodTaylor) correction for removing ``pruned`` (bool, (d,)).

    Magnitude and diagonal Fisher make no correction (F diagonal: the update only zeroes Q).
    The result is not masked: the caller multiplies by the new mask.

    Args:
        method: one of :data:`~tf_woodfisher.config.METHODS`.
        weights: (d,) float weights w, flat over all targets.
        pruned: (d,) bool, True on the pruned set Q.
        stats: the :class:`FisherStatistics` of ``method``.

    Returns:
        (d,) tensor of ``weights``' dtype: w + δw (``weights`` unchanged for magnitude and diagonal Fisher).
    """
    weights = tf.convert_to_tensor(weights)
    if method not in INVERSE_METHODS:
        return weights
    offset = _newton_offset(method, stats, weights.dtype)
    inverse_diagonal = tf.cast(stats.inverse.diagonal(), weights.dtype)
    direction = tf.where(pruned, (weights - offset) / inverse_diagonal, tf.zeros_like(weights))
    return weights - tf.cast(stats.inverse.matvec(direction), weights.dtype) - offset


def select_pruned(scores, mask, segment_sizes, sparsity, mode):
    """The new flat 0/1 mask (float32, (d,)) with the lowest scores removed.

    Entries already pruned (mask 0) stay pruned. ``global``: round(sparsity·d) entries over all
    segments; ``layerwise``: round(sparsity·n) entries in every segment of size n; as tfmot, never all
    of them (at least one entry of the model, or of each segment, is kept unless already pruned). Among kept
    entries of equal score at the threshold, those of lower index are pruned first.

    The threshold is the k-th lowest kept score (an in-place partition of one copy of the kept scores); the mask
    then follows from comparisons, so beside the mask only that copy and a few boolean vectors are allocated (an
    index array of the pruned entries would be 8 bytes each: 184 MB for ResNet-50 at 90%).

    Args:
        scores: (d,) scores (any float dtype); lower means cheaper to prune.
        mask: (d,) current 0/1 mask.
        segment_sizes: entries of each segment (target), summing to d (used for ``layerwise``).
        sparsity: the fraction of entries to prune, in [0, 1); never fewer than those already pruned.
        mode: ``'global'`` or ``'layerwise'``.

    Returns:
        The new (d,) float32 NumPy 0/1 mask.

    Raises:
        ValueError: an unknown ``mode``; NaN scores among the entries to prune.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    scores = np.asarray(scores)  # a view of a CPU tensor's memory
    if scores.dtype not in (np.float32, np.float64):  # lower precisions compare the same in float32
        scores = scores.astype(np.float32)
    keep = np.asarray(mask) > 0
    new_mask = keep.astype(np.float32)  # already pruned entries stay pruned
    sizes = [scores.size] if mode == "global" else list(segment_sizes)
    start = 0
    for size in sizes:
        segment, kept = scores[start:start + size], keep[start:start + size]
        count = min(int(round(sparsity * size)), size - 1)  # as tfmot: at least one entry stays
        need = count - (size - int(np.count_nonzero(kept)))  # kept entries to prune
        if need > 0:
            candidates = segment[kept]  # a copy, partitioned in place
            candidates.partition(need - 1)
            threshold = candidates[need - 1]
            del candidates
            if np.isnan(threshold):
                raise ValueError(f"the scores of {int(np.count_nonzero(np.isnan(segment) & kept))} weights are NaN: "
                                 "check the Fisher statistics (damping, gradients)")
            below = kept & (segment < threshold)
            new_mask[start:start + size][below] = 0.0
            ties = need - int(np.count_nonzero(below))
            del below
            if ties > 0:
                new_mask[start + np.flatnonzero(kept & (segment == threshold))[:ties]] = 0.0
        start += size
    return new_mask
