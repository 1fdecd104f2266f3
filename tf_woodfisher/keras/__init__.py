"""The tfmot adapter: WoodFisher pruning inside ``model.fit`` with tfmot's wrappers and callbacks."""
from tf_woodfisher.keras.callbacks import UpdatePruningStep, reset_optimizer_slots  # noqa: F401
from tf_woodfisher.keras.prune import masks_from_zeros, prune_scope, prune_woodfisher  # noqa: F401
from tf_woodfisher.keras.schedules import GradualSchedule, KeepMasks, OneShotSchedule  # noqa: F401
from tf_woodfisher.keras.wrapper import PruneWoodFisher  # noqa: F401
