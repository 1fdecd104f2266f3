"""Scores, selection and one-shot pruning on top of the Fisher core."""
from tf_woodfisher.pruning.oneshot import PruningReport, one_shot_prune  # noqa: F401
from tf_woodfisher.pruning.targets import PrunableWeight, find_prunable_weights  # noqa: F401
