"""Keras 3 optimizers: gRDA (sparse training by dual averaging with a growing soft threshold)."""
from tf_woodfisher.keras3.optimizers.grda import GRDA

__all__ = ["GRDA"]
