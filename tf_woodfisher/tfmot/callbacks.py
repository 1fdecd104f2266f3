"""``UpdatePruningStep``: tfmot's callback plus the WoodFisher pruning events of ``PruneWoodFisher`` layers.

At each step where the schedule says to prune, before that step's forward pass, it collects
gradients on its Fisher dataset (inference mode, through the stripped model, so neither
``pruning_step`` nor BatchNorm statistics move), scores, sets masks, applies the OBS update and
resets the optimizer slots of pruned weights. Per-layer sparsity and the seconds spent on events
go to the Keras logs (``History``) and, with ``log_dir``, to TensorBoard.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tf_woodfisher import compat
from tf_woodfisher.config import WoodFisherConfig, resolve_config, validate_sparsity
from tf_woodfisher.pruning.pruner import Pruner, prune_in_steps
from tf_woodfisher.pruning.report import layer_sparsities
from tf_woodfisher.tfmot.problem import keras_problem
from tf_woodfisher.tfmot.targets import find_prunable_weights
from tf_woodfisher.tfmot.wrapper import PruneWoodFisher


def reset_optimizer_slots(optimizer, targets) -> None:
    """Zero the optimizer state (momentum, Adam moments) of masked entries of each target (mask required)."""
    for target in targets:
        for slot in compat.optimizer_slots(optimizer, target.variable):
            slot.assign(slot * tf.cast(target.mask, slot.dtype))


class UpdatePruningStep(tfmot.sparsity.keras.UpdatePruningStep):
    """Use instead of tfmot's ``UpdatePruningStep``: it does everything that one does, plus WoodFisher events.

    Args:
        fisher_dataset: the Fisher data, a ``tf.data.Dataset`` of (x, y) pairs, batched or not (needed by
            every method but magnitude; pass it again after loading a saved model).
        loss: the loss of the Fisher gradients (default: the loss given to ``compile``).
        config: replaces the :class:`~tf_woodfisher.WoodFisherConfig` saved in the wrappers.
        log_dir: write TensorBoard summaries of each pruning event there.
        verbose: 1 prints one line per pruning event.
        **overrides: fields of the config to change for this training run (``num_gradients=...``).

    Attributes:
        events: one dict per pruning event: ``step``, ``sparsity``, ``seconds``, ``stats``
            (:class:`~tf_woodfisher.pruning.EventStats`) and ``layers`` (sparsity by weight name).
    """

    def __init__(self, fisher_dataset: Optional[tf.data.Dataset] = None, loss: Any = None,
                 config: Optional[WoodFisherConfig] = None, log_dir: Optional[str] = None, verbose: int = 0,
                 **overrides: Any):
        super().__init__()
        self.fisher_dataset, self.loss = fisher_dataset, loss
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
        super().on_train_begin(logs)
        wrappers = [layer for layer in self.prunable_layers if isinstance(layer, PruneWoodFisher)]
        if not wrappers:
            return
        config = self._event_config(wrappers)
        if config.needs_gradients and self.fisher_dataset is None:
            raise ValueError(f"tfw.UpdatePruningStep needs fisher_dataset= for method {config.method!r}: its pruning "
                             "events compute Fisher gradients (after loading a saved model, pass the Fisher data "
                             "and, unless the model is compiled with it, the loss again)")
        loss = self.loss if self.loss is not None else getattr(self.model, "loss", None)
        targets = [t for t in find_prunable_weights(self.model, warn_unpruned=False)
                   if isinstance(t.owner, PruneWoodFisher)]
        problem = keras_problem(self.model, targets, self.fisher_dataset, loss, config)
        self.pruner = Pruner(problem, config, self.model.distribute_strategy)
        self._wrappers, self.schedule = wrappers, wrappers[0].pruning_schedule
        self._step = int(wrappers[0].pruning_step.numpy())  # one read; then counted here, one per batch
        if self.log_dir:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_begin(self, batch, logs=None):
        super().on_train_batch_begin(batch, logs)
        if self.pruner is None:
            return
        self._step += 1  # the step this batch's forward pass will see
        with tf.device("/cpu:0"):  # a few scalar ops on the host: no device round trip per batch
            should_prune, sparsity = self.schedule(tf.constant(self._step, tf.int64))
        if bool(should_prune):
            self._step = int(self._wrappers[0].pruning_step.numpy()) + 1  # resynchronise at each event
            self.prune(self._step, float(sparsity))

    def prune(self, step: int, sparsity: float) -> dict:
        """Run one pruning event (``config.steps`` Fisher recomputations) to ``sparsity`` at training ``step``.

        Returns:
            The event's record, also appended to :attr:`events`.
        """
        sparsity = validate_sparsity(sparsity, f"the schedule's sparsity at step {step}")
        started = time.perf_counter()
        pruner = self.pruner
        stats = prune_in_steps(pruner, sparsity, pruner.config.seed, step)
        reset_optimizer_slots(getattr(self.model, "optimizer", None), pruner.targets)
        for wrapper in self._wrappers:
            wrapper.masks_step.assign(step)
        event = {"step": step, "sparsity": pruner.sparsity(), "seconds": time.perf_counter() - started,
                 "stats": stats, "layers": {layer.name: layer.sparsity for layer in layer_sparsities(pruner.targets)}}
        self.events.append(event)
        if self.verbose:
            print(f"\nWoodFisher pruning at step {step}: sparsity {event['sparsity']:.2%} in {event['seconds']:.2f} s")
        if self._writer is not None:
            with self._writer.as_default(step=step):
                tf.summary.scalar("woodfisher/sparsity", event["sparsity"])
                tf.summary.scalar("woodfisher/event_seconds", event["seconds"])
                for name, value in event["layers"].items():
                    tf.summary.scalar(f"woodfisher/sparsity/{name}", value)
            self._writer.flush()
        return event

    def on_epoch_begin(self, epoch, logs=None):
        self._events_at_epoch_begin = len(self.events)

    def on_epoch_end(self, batch, logs=None):  # tfmot names the epoch ``batch``
        super().on_epoch_end(batch, logs)
        if self.pruner is None or logs is None:
            return
        logs["woodfisher_sparsity"] = self.pruner.sparsity()
        logs["woodfisher_seconds"] = sum(e["seconds"] for e in self.events[getattr(self, "_events_at_epoch_begin", 0):])
        for layer in layer_sparsities(self.pruner.targets):
            logs[f"sparsity/{layer.name}"] = layer.sparsity
