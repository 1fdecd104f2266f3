"""``PruningCallback``: the WoodFisher pruning events of a :class:`~tf_woodfisher.keras3.PrunedModel` in ``fit``.

At each step where the model's schedule says to prune, before that step's forward pass, it collects
gradients on its Fisher dataset (inference mode, through the held model, so neither ``pruning_step`` nor
BatchNorm statistics move), scores, sets the masks, applies the OBS update and resets the optimizer slots
(momentum, Adam moments) of pruned weights. Between events the masks' weight constraints keep pruned weights
at exactly zero after every optimizer step. Per-layer sparsity and the seconds spent on events go to the
Keras logs (``History``) and, with ``log_dir``, to TensorBoard.
"""
from __future__ import annotations

from typing import Any, Optional

import keras
import tensorflow as tf

from tf_woodfisher.config import WoodFisherConfig, resolve_config
from tf_woodfisher.keras3.oneshot import keras3_problem
from tf_woodfisher.keras3.targets import keras_variables
from tf_woodfisher.keras_common import PruningEvents, reset_optimizer_slots
from tf_woodfisher.pruning.pruner import Pruner

__all__ = ["PruningCallback"]


class PruningCallback(PruningEvents, keras.callbacks.Callback):
    """Runs the pruning events of a model made by :func:`tfw3.prune <tf_woodfisher.keras3.prune>` in ``model.fit``.

    Args:
        fisher_dataset: the Fisher data, a ``tf.data.Dataset`` of (x, y) pairs, batched or not (needed by every
            method but magnitude; pass it again after loading a saved model).
        loss: the loss of the Fisher gradients (default: the loss given to ``compile``).
        config: replaces the :class:`~tf_woodfisher.WoodFisherConfig` saved in the model.
        log_dir: write TensorBoard summaries of each pruning event there.
        verbose: 1 prints one line per pruning event.
        **overrides: fields of the config to change for this training run (``num_gradients=...``).

    Attributes:
        events: one dict per pruning event: ``step``, ``sparsity``, ``seconds``, ``stats``
            (:class:`~tf_woodfisher.pruning.EventStats`) and ``layers`` (sparsity by weight name).

    Raises:
        ValueError (at the start of training): the model is not a ``PrunedModel``, no Fisher data for a method that
            needs it, ``steps_per_execution`` > 1 (the callback must see every batch).
    """

    runs_woodfisher_events = True  # PrunedModel.fit adds no guard next to it

    def __init__(self, fisher_dataset: Optional[tf.data.Dataset] = None, loss: Any = None,
                 config: Optional[WoodFisherConfig] = None, log_dir: Optional[str] = None, verbose: int = 0,
                 **overrides: Any):
        super().__init__()
        self.fisher_dataset, self.loss = fisher_dataset, loss
        self.config, self.overrides = config, dict(overrides)
        if config is not None or overrides:
            resolve_config(config, overrides, "tfw3.PruningCallback")  # fail now, not at the first batch
        self.log_dir, self.verbose = log_dir, verbose
        self.pruner = None
        self.events = []
        self._writer = None

    def on_train_begin(self, logs=None):
        model = self.model
        if not getattr(type(model), "_tfw3_pruned", False):
            raise ValueError(f"tfw3.PruningCallback needs a model made by tfw3.prune(model, schedule), got "
                             f"{type(model).__name__} {getattr(model, 'name', '')!r}")
        if int(getattr(model, "steps_per_execution", 1) or 1) > 1:
            raise ValueError("tfw3.PruningCallback needs compile(steps_per_execution=1): it runs pruning events "
                             "before a step's forward pass, and Keras calls callbacks once per execution")
        config = resolve_config(self.config or model.woodfisher_config, self.overrides, "tfw3.PruningCallback")
        if config.needs_gradients and self.fisher_dataset is None:
            raise ValueError(f"tfw3.PruningCallback needs fisher_dataset= for method {config.method!r}: its pruning "
                             "events compute Fisher gradients (after loading a saved model, pass the Fisher data "
                             "and, unless the model is compiled with it, the loss again)")
        loss = self.loss if self.loss is not None else getattr(model, "loss", None)
        targets = model.pruning_targets()
        self._variables = keras_variables(model.model, targets)
        problem = keras3_problem(model.model, targets, self.fisher_dataset, loss, config)
        self.pruner = Pruner(problem, config, model.distribute_strategy)
        self._set_schedule(model.schedule)
        self._step = int(model.pruning_step.numpy())  # one read; then counted here, one per batch
        if self.log_dir:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_begin(self, batch, logs=None):
        if self.pruner is not None:
            self._advance(lambda: int(self.model.pruning_step.numpy()))

    def _after_event(self, step: int) -> None:
        reset_optimizer_slots(getattr(self.model, "optimizer", None), self.pruner.targets, self._variables)
        self.model.masks_step.assign(step)

    def on_epoch_begin(self, epoch, logs=None):
        self._mark_epoch()

    def on_epoch_end(self, epoch, logs=None):
        self._epoch_logs(logs)
