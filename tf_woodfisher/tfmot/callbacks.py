"""``UpdatePruningStep``: tfmot's callback plus the WoodFisher pruning events of ``PruneWoodFisher`` layers.

At each step where the schedule says to prune, before that step's forward pass, it collects
gradients on its Fisher dataset (inference mode, through the stripped model, so neither
``pruning_step`` nor BatchNorm statistics move), scores, sets masks, applies the OBS update and
resets the optimizer slots of pruned weights. Per-layer sparsity and the seconds spent on events
go to the Keras logs (``History``) and, with ``log_dir``, to TensorBoard.
"""
from __future__ import annotations

from typing import Any, Optional

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tf_woodfisher.config import WoodFisherConfig, resolve_config
from tf_woodfisher.keras_common import PruningEvents, reset_optimizer_slots
from tf_woodfisher.pruning.pruner import Pruner
from tf_woodfisher.tfmot.problem import compiled_loss, keras_problem
from tf_woodfisher.tfmot.schedules import event_schedule
from tf_woodfisher.tfmot.targets import find_prunable_weights
from tf_woodfisher.tfmot.wrapper import PruneWoodFisher


class UpdatePruningStep(PruningEvents, tfmot.sparsity.keras.UpdatePruningStep):
    """Use instead of tfmot's ``UpdatePruningStep``: it does everything that one does, plus WoodFisher events.

    Args:
        fisher_dataset: the Fisher data, a ``tf.data.Dataset`` of (x, y) pairs, batched or not (needed by
            every method but magnitude; pass it again after loading a saved model).
        loss: the loss of the Fisher gradients: a Keras loss, or a list / dict of them per output (default:
            the loss and ``loss_weights`` given to ``compile``, combined over the outputs as Keras does).
        loss_weights: with ``loss``: a list or dict by output name, as ``compile``'s (default 1 each).
        batched: whether ``fisher_dataset`` yields batches (None: told from the model's input ranks; an
            error asks for it where they cannot tell). Sample weights of (x, y, w) data are honoured.
        config: replaces the :class:`~tf_woodfisher.WoodFisherConfig` saved in the wrappers.
        log_dir: write TensorBoard summaries of each pruning event there.
        verbose: 1 prints one line per pruning event.
        **overrides: fields of the config to change for this training run (``num_gradients=...``).

    Attributes:
        events: one dict per pruning event: ``step``, ``sparsity``, ``seconds``, ``stats``
            (:class:`~tf_woodfisher.pruning.EventStats`) and ``layers`` (sparsity by weight name).
    """

    def __init__(self, fisher_dataset: Optional[tf.data.Dataset] = None, loss: Any = None,
                 config: Optional[WoodFisherConfig] = None, log_dir: Optional[str] = None, verbose: int = 0, *,
                 loss_weights: Any = None, batched: Optional[bool] = None, **overrides: Any):
        super().__init__()
        self.fisher_dataset, self.loss = fisher_dataset, loss
        if loss_weights is not None and loss is None:
            raise ValueError("tfw.UpdatePruningStep: loss_weights= goes with loss=; without a loss, the loss and "
                             "loss_weights given to compile are used")
        self.loss_weights, self.batched = loss_weights, batched
        self.config = config
        self.overrides = dict(overrides)
        if config is not None or overrides:
            resolve_config(config, overrides, "UpdatePruningStep")  # fail now, not at the first batch
        self.log_dir, self.verbose = log_dir, verbose
        self.pruner = None
        self.events = []
        self._writer = None

    def _event_config(self, wrappers) -> WoodFisherConfig:
        first = wrappers[0]
        for layer in wrappers[1:]:
            if layer.woodfisher_config != first.woodfisher_config or \
                    layer.pruning_schedule.get_config() != first.pruning_schedule.get_config():
                raise ValueError(f"{layer.name!r} and {first.name!r} have different WoodFisher settings or schedules; "
                                 "one model is pruned by one schedule and one configuration")
        return resolve_config(self.config or first.woodfisher_config, self.overrides, "UpdatePruningStep")

    def on_train_begin(self, logs=None):
        """tfmot's setup, then the Pruner of the model's ``PruneWoodFisher`` weights (none: tfmot only).

        Resolves the configuration (the wrappers' unless ``config`` was given, with ``overrides``), reads
        the schedule and the current ``pruning_step``, and opens the TensorBoard writer of ``log_dir``.

        Args:
            logs: the Keras logs (passed on to tfmot).

        Raises:
            ValueError: the wrappers have different WoodFisher settings or schedules, the method needs
                gradients but no ``fisher_dataset`` was given, or the Pruner refuses the problem (see
                :class:`~tf_woodfisher.pruning.pruner.Pruner`).
            tf_woodfisher.fisher.memory.MemoryBudgetError: no plan of the events fits ``max_memory``.
        """
        super().on_train_begin(logs)
        wrappers = [layer for layer in self.prunable_layers if isinstance(layer, PruneWoodFisher)]
        if not wrappers:
            return
        config = self._event_config(wrappers)
        if config.needs_gradients and self.fisher_dataset is None:
            raise ValueError(f"tfw.UpdatePruningStep needs fisher_dataset= for method {config.method!r}: its pruning "
                             "events compute Fisher gradients (after loading a saved model, pass the Fisher data "
                             "and, unless the model is compiled with it, the loss again)")
        loss, loss_weights = (self.loss, self.loss_weights) if self.loss is not None else compiled_loss(self.model)
        targets = [t for t in find_prunable_weights(self.model, warn_unpruned=False)
                   if isinstance(t.owner, PruneWoodFisher)]
        problem = keras_problem(self.model, targets, self.fisher_dataset, loss, config, loss_weights=loss_weights,
                                batched=self.batched)
        self.pruner = Pruner(problem, config, self.model.distribute_strategy)
        self._wrappers = wrappers
        self._set_schedule(event_schedule(wrappers[0].pruning_schedule, config.sparsity_m_by_n, warn=True))
        self._step = int(wrappers[0].pruning_step.numpy())  # one read; then counted here, one per batch
        if self.log_dir:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_begin(self, batch, logs=None):
        """tfmot's step update, then, at a pruning step of the schedule, one WoodFisher event (see :meth:`prune`).

        The event runs before this batch's forward pass.

        Args:
            batch: index of the batch in the epoch (Keras' argument).
            logs: the Keras logs.
        """
        super().on_train_batch_begin(batch, logs)
        if self.pruner is None:
            return
        self._advance(lambda: int(self._wrappers[0].pruning_step.numpy()))

    def _after_event(self, step: int) -> None:
        reset_optimizer_slots(getattr(self.model, "optimizer", None), self.pruner.targets)
        for wrapper in self._wrappers:
            wrapper.masks_step.assign(step)

    def on_epoch_begin(self, epoch, logs=None):
        """Remember where this epoch's events begin (for ``woodfisher_seconds``).

        Args:
            epoch: index of the epoch (Keras' argument).
            logs: the Keras logs (unused).
        """
        self._mark_epoch()

    def on_epoch_end(self, batch, logs=None):  # tfmot names the epoch ``batch``
        """tfmot's epoch end, then the WoodFisher sparsities and seconds added to ``logs``.

        The keys are ``woodfisher_sparsity``, ``woodfisher_seconds`` (of this epoch's events) and
        ``sparsity/<weight>``.

        Args:
            batch: index of the epoch (tfmot's name for it).
            logs: the epoch's Keras logs, updated in place (None: nothing is added).
        """
        super().on_epoch_end(batch, logs)
        self._epoch_logs(logs)
