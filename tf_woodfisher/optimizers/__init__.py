"""Optimizers: gRDA (sparse training by dual averaging with a growing soft threshold), for tf_keras.

``GRDA`` (the tf_keras optimizer) is loaded on first use, so that the rule it shares with the Keras 3 optimizer
(:mod:`tf_woodfisher.optimizers.rule`, no Keras) can be imported without tf_keras. The Keras 3 optimizer is
``tf_woodfisher.keras3.optimizers.GRDA``.
"""
import importlib

__all__ = ["GRDA"]


def __getattr__(name):
    if name == "GRDA":
        value = importlib.import_module("tf_woodfisher.optimizers.grda").GRDA
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
