"""Pruning events on the numerical core: targets, scores, selection, OBS updates, k-step loop, reports.

Imports no Keras, tf_keras or tfmot: adapters give it a :class:`PruningProblem`.
"""
from tf_woodfisher.pruning.pruner import (Pruner, PruningProblem, fisher_seed, prune_in_steps,  # noqa: F401
                                          step_sparsities, sweep_in_steps)
from tf_woodfisher.pruning.report import (EventStats, LayerSparsity, PruningReport, SweepPoint,  # noqa: F401
                                          layer_sparsities)
from tf_woodfisher.pruning.targets import PruningTarget  # noqa: F401
