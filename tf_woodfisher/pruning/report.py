"""What pruning did: per-event statistics and the report of a pruning run."""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from tf_woodfisher.config import WoodFisherConfig
from tf_woodfisher.pruning.targets import PruningTarget


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """One pruned tensor: ``size`` entries of which ``zeros`` are zero."""

    name: str
    shape: tuple
    size: int
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.size


def layer_sparsities(targets: Sequence[PruningTarget]) -> tuple:
    """LayerSparsity of each target, from the variables' current values."""
    return tuple(LayerSparsity(t.name, t.shape, t.size, int(np.sum(t.variable.numpy() == 0))) for t in targets)


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
    """

    gradient_seconds: float = 0.0
    inverse_seconds: float = 0.0
    scoring_seconds: float = 0.0
    gathered_bytes: int = 0
    reduced_bytes: int = 0
    recomputations: int = 0

    def __add__(self, other: EventStats) -> EventStats:
        return EventStats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


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
    """

    config: WoodFisherConfig
    target_sparsity: float
    layers: tuple
    stats: EventStats
    total_seconds: float
    unpruned_weights: int = 0

    method = property(lambda self: self.config.method)
    mode = property(lambda self: self.config.mode)
    steps = property(lambda self: self.config.steps)
    gradient_seconds = property(lambda self: self.stats.gradient_seconds)
    inverse_seconds = property(lambda self: self.stats.inverse_seconds)
    scoring_seconds = property(lambda self: self.stats.scoring_seconds)
    gathered_bytes = property(lambda self: self.stats.gathered_bytes)
    reduced_bytes = property(lambda self: self.stats.reduced_bytes)

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
        """Everything as plain Python values; ``layers`` maps each tensor's unique name to its sparsity."""
        return {"config": self.config.to_dict(), "method": self.method, "mode": self.mode,
                "target_sparsity": self.target_sparsity, "sparsity": self.sparsity,
                "model_sparsity": self.model_sparsity, "steps": self.steps,
                **dataclasses.asdict(self.stats), "total_seconds": self.total_seconds,
                "unpruned_weights": self.unpruned_weights,
                "layers": {layer.name: layer.sparsity for layer in self.layers}}

    def __str__(self) -> str:
        width = max(len("total"), *(len(layer.name) for layer in self.layers))
        lines = [f"{'weight':<{width}}  {'shape':>18}  {'size':>10}  {'sparsity':>8}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<{width}}  {str(layer.shape):>18}  {layer.size:>10,d}  {layer.sparsity:>8.2%}")
        total = sum(layer.size for layer in self.layers)
        lines.append(f"{'total':<{width}}  {'':>18}  {total:>10,d}  {self.sparsity:>8.2%}")
        if self.unpruned_weights:
            lines.append(f"{'not pruned':<{width}}  {'':>18}  {self.unpruned_weights:>10,d}  "
                         f"(all weights: {self.model_sparsity:.2%} sparse)")
        lines.append(
            f"{self.method} ({self.mode}, {self.steps} step{'s' * (self.steps > 1)}): gradients "
            f"{self.gradient_seconds:.2f} s, inverse {self.inverse_seconds:.2f} s, scoring "
            f"{self.scoring_seconds:.2f} s, total {self.total_seconds:.2f} s")
        return "\n".join(lines)


def report_of(config: WoodFisherConfig, target_sparsity: float, targets: Sequence[PruningTarget],
              stats: EventStats, total_seconds: float, unpruned_weights: Optional[int] = 0) -> PruningReport:
    """The :class:`PruningReport` of a run that left ``targets`` as they are now."""
    return PruningReport(config, float(target_sparsity), layer_sparsities(targets), stats, total_seconds,
                         int(unpruned_weights or 0))
