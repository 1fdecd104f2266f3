"""Pruning events on the numerical core: targets, scores, selection, OBS updates, k-step loop, reports.

Imports no Keras, tf_keras or tfmot: adapters give it a :class:`PruningProblem`.
"""
from tf_woodfisher.pruning.pruner import Pruner, PruningProblem, fisher_seed, prune_in_steps, step_sparsities  # noqa: F401
from tf_woodfisher.pruning.report import EventStats, LayerSparsity, PruningReport, layer_sparsities  # noqa: F401
from tf_woodfisher.pruning.targets import PruningTarget  # noqa: F401
