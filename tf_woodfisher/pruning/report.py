"""What pruning did: per-event statistics and the report of a pruning run."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from tf_woodfisher.config import WoodFisherConfig
from tf_woodfisher.pruning.targets import PruningTarget


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """One pruned tensor: ``size`` entries of which ``zeros`` are zero.

    Attributes:
        name: the tensor's unique name (as :class:`~tf_woodfisher.pruning.targets.PruningTarget`).
        shape: the tensor's shape.
        size: its number of entries.
        zeros: its number of entries equal to zero.
        reconstruction_error: layer-wise methods (``obc``, ``sparsegpt``): the relative reconstruction
            error ‖XW − XŴ‖²/‖XW‖² of the layer's outputs over its calibration inputs X; None otherwise.
    """

    name: str
    shape: tuple
    size: int
    zeros: int
    reconstruction_error: Optional[float] = None

    @property
    def sparsity(self) -> float:
        """Fraction of zeros, ``zeros / size``, in [0, 1]."""
        return self.zeros / self.size


def layer_sparsities(targets: Sequence[PruningTarget], reconstruction_errors: Optional[dict] = None) -> tuple:
    """LayerSparsity of each target, from the variables' current values.

    Args:
        targets: the pruned tensors.
        reconstruction_errors: target name → relative reconstruction error (layer-wise methods), or None.

    Returns:
        A tuple of :class:`LayerSparsity`, one per target, in order.
    """
    errors = reconstruction_errors or {}
    return tuple(LayerSparsity(t.name, t.shape, t.size, int(np.sum(t.variable.numpy() == 0)), errors.get(t.name))
                 for t in targets)


@dataclasses.dataclass(frozen=True)
class LossDiagnostics:
    """One Fisher event's quadratic model of the loss against the loss change it measured (``diagnostics=True``).

    With δw the weight change the event applied (new − old weights over the targets, pruned entries
    included, the OBS / WoodTaylor update too), ḡ the mean of its m gradient rows G and F = λI + GᵀG/m its
    block-diagonal empirical Fisher (the blocks of its inverse; ``diagonal_fisher``: the diagonal;
    ``magnitude``: the blocks of ``fisher_block_size``), computed per block as λ‖δw‖² + ‖G_bδw_b‖²/m.

    Attributes:
        predicted_increase: ḡᵀδw + ½δwᵀFδw, the second-order Taylor model with the gradient (WoodTaylor's).
        quadratic_increase: ½δwᵀFδw alone: what WoodFisher's model predicts (the paper assumes ḡ ≈ 0 at a
            trained model; the difference is the linear term ḡᵀδw).
        measured_increase: ``loss_after − loss_before``.
        loss_before, loss_after: the mean loss over the event's Fisher samples (the num_gradients ×
            fisher_batch_size samples its gradients were taken on; with sample weights, their weighted mean),
            forward passes in inference mode at the weights before and after the event.
        seconds: wall-clock seconds of the diagnostics (forward passes and products), in no phase of the event.
    """

    predicted_increase: float
    quadratic_increase: float
    measured_increase: float
    loss_before: float
    loss_after: float
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class EventStats:
    """Cost of one or more pruning events: wall-clock seconds and bytes exchanged across replicas.

    Attributes:
        gradient_seconds: computing the Fisher gradients (all passes over the Fisher data).
        inverse_seconds: factorising the inverse Fisher blocks (and the gradients' moments).
        scoring_seconds: scores, the selection of pruned weights, and the OBS weight update.
        gathered_bytes: all-gathered across replicas (each receives (R−1)/R of them); 0 on one device.
        reduced_bytes: payload of the sum all-reduces of Gram sums across replicas.
        recomputations: Fisher recomputations (one per step of a multi-step event).
        calibration_seconds: layer-wise methods: forward passes over the calibration inputs and the
            accumulation of each layer's H = 2XXᵀ/n (their solves count as scoring).
        diagnostics: with ``diagnostics=True``, one :class:`LossDiagnostics` per event (step), in order;
            the sum of two stats concatenates them.
    """

    gradient_seconds: float = 0.0
    inverse_seconds: float = 0.0
    scoring_seconds: float = 0.0
    gathered_bytes: int = 0
    reduced_bytes: int = 0
    recomputations: int = 0
    calibration_seconds: float = 0.0
    diagnostics: tuple = ()

    def __add__(self, other: EventStats) -> EventStats:
        """The field-by-field sum of two :class:`EventStats` (the cost of both; diagnostics concatenated)."""
        return EventStats(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))


DIAGNOSTIC_TOTALS = ("predicted_loss_increase", "quadratic_loss_increase", "measured_loss_increase")


@dataclasses.dataclass(frozen=True)
class PruningReport:
    """What a pruning run did. Times are wall-clock seconds, summed over its steps.

    Attributes:
        config: the :class:`WoodFisherConfig` the run used (``method``, ``mode``, ``steps``, ...).
        target_sparsity: the sparsity asked for, over the pruned weights (global) or per tensor (layerwise).
        layers: one :class:`LayerSparsity` per pruned tensor, with unique names.
        stats: the :class:`EventStats` of all its steps.
        total_seconds: wall-clock time of the whole run.
        unpruned_weights: entries of the model's weights that were not pruning targets (biases, norms, and
            layers left dense), so that :attr:`model_sparsity` covers all weights.
        recalibration: what the BatchNorm recalibration after pruning did (a
            :class:`~tf_woodfisher.batchnorm.BatchNormRecalibration`), or None when none ran.
        method: shortcut to ``config.method``.
        mode: shortcut to ``config.mode``.
        steps: shortcut to ``config.steps``.
        gradient_seconds: shortcut to ``stats.gradient_seconds``.
        inverse_seconds: shortcut to ``stats.inverse_seconds``.
        scoring_seconds: shortcut to ``stats.scoring_seconds``.
        gathered_bytes: shortcut to ``stats.gathered_bytes``.
        reduced_bytes: shortcut to ``stats.reduced_bytes``.
        predicted_loss_increase, quadratic_loss_increase, measured_loss_increase: with ``diagnostics=True``,
            the :class:`LossDiagnostics` fields summed over the steps (each step on its own Fisher samples, so
            the measured sum is not the change of one loss), else None; per step in ``stats.diagnostics``.
    """

    config: WoodFisherConfig
    target_sparsity: float
    layers: tuple
    stats: EventStats
    total_seconds: float
    unpruned_weights: int = 0
    recalibration: Optional[Any] = None

    method = property(lambda self: self.config.method)
    mode = property(lambda self: self.config.mode)
    steps = property(lambda self: self.config.steps)
    gradient_seconds = property(lambda self: self.stats.gradient_seconds)
    inverse_seconds = property(lambda self: self.stats.inverse_seconds)
    scoring_seconds = property(lambda self: self.stats.scoring_seconds)
    gathered_bytes = property(lambda self: self.stats.gathered_bytes)
    reduced_bytes = property(lambda self: self.stats.reduced_bytes)

    predicted_loss_increase = property(lambda self: self._diagnosed("predicted_increase"))
    quadratic_loss_increase = property(lambda self: self._diagnosed("quadratic_increase"))
    measured_loss_increase = property(lambda self: self._diagnosed("measured_increase"))

    def _diagnosed(self, field: str) -> Optional[float]:
        events = self.stats.diagnostics
        return float(sum(getattr(e, field) for e in events)) if events else None

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over the pruned weights."""
        return sum(layer.zeros for layer in self.layers) / sum(layer.size for layer in self.layers)

    @property
    def model_sparsity(self) -> float:
        """Fraction of zeros over all the model's weights (pruned or not; unpruned ones counted as dense)."""
        size = sum(layer.size for layer in self.layers)
        return sum(layer.zeros for layer in self.layers) / (size + self.unpruned_weights)

    def as_dict(self) -> dict:
        """Everything as plain Python values; ``layers`` maps each tensor's unique name to its sparsity.

        Returns:
            A JSON-serialisable dict: ``config`` (:meth:`WoodFisherConfig.to_dict`), method, mode, target
            and achieved sparsities, steps, the :class:`EventStats` fields, total_seconds, unpruned_weights
            and ``layers``; with layer-wise methods also ``reconstruction_errors`` (tensor name → relative error),
            after a BatchNorm recalibration ``recalibration`` (its fields); with ``diagnostics=True``
            ``predicted_loss_increase``, ``quadratic_loss_increase`` and ``measured_loss_increase`` (sums over
            the steps; ``diagnostics`` holds each step's :class:`LossDiagnostics` fields).
        """
        return {"config": self.config.to_dict(), "method": self.method, "mode": self.mode,
                "target_sparsity": self.target_sparsity, "sparsity": self.sparsity,
                "model_sparsity": self.model_sparsity, "steps": self.steps,
                **dataclasses.asdict(self.stats), "total_seconds": self.total_seconds,
                "unpruned_weights": self.unpruned_weights,
                "layers": {layer.name: layer.sparsity for layer in self.layers},
                **({"reconstruction_errors": errors} if (errors := self.reconstruction_errors) else {}),
                **({name: getattr(self, name) for name in DIAGNOSTIC_TOTALS} if self.stats.diagnostics else {}),
                **({"recalibration": dataclasses.asdict(self.recalibration)} if self.recalibration is not None else {})}

    @property
    def reconstruction_errors(self) -> dict:
        """Tensor name → relative reconstruction error, for the tensors that have one (layer-wise methods)."""
        return {layer.name: layer.reconstruction_error for layer in self.layers
                if layer.reconstruction_error is not None}

    def __str__(self) -> str:
        width = max(len("total"), *(len(layer.name) for layer in self.layers))
        errors = bool(self.reconstruction_errors)
        lines = [f"{'weight':<{width}}  {'shape':>18}  {'size':>10}  {'sparsity':>8}" + "  rel. error" * errors]
        for layer in self.layers:
            error = "" if not errors else "  " + ("—" if layer.reconstruction_error is None else
                                                  f"{layer.reconstruction_error:.4f}").rjust(10)
            lines.append(f"{layer.name:<{width}}  {str(layer.shape):>18}  {layer.size:>10,d}  {layer.sparsity:>8.2%}"
                         + error)
        total = sum(layer.size for layer in self.layers)
        lines.append(f"{'total':<{width}}  {'':>18}  {total:>10,d}  {self.sparsity:>8.2%}")
        if self.unpruned_weights:
            lines.append(f"{'not pruned':<{width}}  {'':>18}  {self.unpruned_weights:>10,d}  "
                         f"(all weights: {self.model_sparsity:.2%} sparse)")
        lines.append(
            f"{self.method} ({self.mode}, {self.steps} step{'s' * (self.steps > 1)}): gradients "
            f"{self.gradient_seconds:.2f} s, inverse {self.inverse_seconds:.2f} s, scoring "
            f"{self.scoring_seconds:.2f} s, "
            + (f"calibration {self.stats.calibration_seconds:.2f} s, " if self.stats.calibration_seconds else "")
            + f"total {self.total_seconds:.2f} s")
        if self.stats.diagnostics:
            count = len(self.stats.diagnostics)
            predicted, quadratic = self.predicted_loss_increase, self.quadratic_loss_increase
            lines.append(f"loss on the Fisher samples{f' (sum of {count} steps)' if count > 1 else ''}: predicted "
                         f"{predicted:+.4g} (quadratic term alone {quadratic:+.4g}, gradient term "
                         f"{predicted - quadratic:+.4g}), measured {self.measured_loss_increase:+.4g}")
        if self.recalibration is not None:
            lines.append(str(self.recalibration))
        return "\n".join(lines)


def report_of(config: WoodFisherConfig, target_sparsity: float, targets: Sequence[PruningTarget],
              stats: EventStats, total_seconds: float, unpruned_weights: Optional[int] = 0,
              reconstruction_errors: Optional[dict] = None) -> PruningReport:
    """The :class:`PruningReport` of a run that left ``targets`` as they are now.

    Args:
        config: the configuration the run used.
        target_sparsity: the sparsity asked for, a fraction in [0, 1).
        targets: the pruned tensors (their sparsities are read from the variables now).
        stats: the :class:`EventStats` of all its steps.
        total_seconds: wall-clock seconds of the whole run.
        unpruned_weights: entries of the model's weights that were not targets (None counts as 0).
        reconstruction_errors: target name → relative reconstruction error (layer-wise methods), or None.

    Returns:
        The :class:`PruningReport`.
    """
    return PruningReport(config, float(target_sparsity), layer_sparsities(targets, reconstruction_errors), stats,
                         total_seconds, int(unpruned_weights or 0))


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One point of a sparsity sweep (``one_shot_sweep``): the model pruned to one sparsity, evaluated.

    Attributes:
        sparsity: the target sparsity of this point, a fraction in [0, 1).
        report: the :class:`PruningReport` of pruning to it (the first point's carries the seconds of the
            statistics that all points share).
        value: what the sweep's ``evaluate(model)`` returned for the model pruned to it.
    """

    sparsity: float
    report: PruningReport
    value: Any
