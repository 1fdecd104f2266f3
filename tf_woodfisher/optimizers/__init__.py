"""Optimizers: gRDA (sparse training by dual averaging with a growing soft threshold)."""
from tf_woodfisher.optimizers.grda import GRDA

__all__ = ["GRDA"]
