"""``UpdatePruningStep``: tfmot's callback plus the WoodFisher pruning events of ``PruneWoodFisher`` layers.

At each step where the schedule says to prune, before that step's forward pass, it collects
gradients on the Fisher dataset (inference mode, through the stripped model, so neither
``pruning_step`` nor BatchNorm statistics move), scores, sets masks, applies the OBS update and
resets the optimizer slots of pruned weights. Per-layer sparsity and the seconds spent on events
go to the Keras logs (``History``) and, with ``log_dir``, to TensorBoard.
"""
import time

import tensorflow_model_optimization as tfmot

from tf_woodfisher._keras import tf
from tf_woodfisher.keras.schedules import recompute_steps
from tf_woodfisher.keras.wrapper import PruneWoodFisher
from tf_woodfisher.pruning.oneshot import layer_sparsities, step_sparsities
from tf_woodfisher.pruning.pruner import Pruner, fisher_seed, validate_sparsity
from tf_woodfisher.pruning.targets import find_prunable_weights


def optimizer_slots(optimizer, variable):
    """The optimizer's per-weight state (momentum, Adam moments) of ``variable``."""
    if optimizer is None:
        return []
    if hasattr(optimizer, "get_slot_names"):  # tf_keras legacy optimizers
        return [optimizer.get_slot(variable, name) for name in optimizer.get_slot_names()
                if _has_slot(optimizer, variable, name)]
    suffix = "/" + variable.name
    return [v for v in optimizer.variables if v.name.endswith(suffix) and v.shape == variable.shape]


def _has_slot(optimizer, variable, name):
    try:
        optimizer.get_slot(variable, name)
        return True
    except KeyError:
        return False


def reset_optimizer_slots(optimizer, weights):
    """Zero the optimizer state of masked entries of each PrunableWeight (mask variable required)."""
    for weight in weights:
        for slot in optimizer_slots(optimizer, weight.variable):
            slot.assign(slot * tf.cast(weight.mask, slot.dtype))


class UpdatePruningStep(tfmot.sparsity.keras.UpdatePruningStep):
    """Use instead of tfmot's ``UpdatePruningStep`` (it does everything that one does, plus WoodFisher).

    fisher_dataset, loss: override those given to ``prune_woodfisher`` (needed after loading a saved
    model; the loss defaults to the model's compiled loss). log_dir: write TensorBoard summaries of
    each pruning event there. seed: base seed of the Fisher samples, mixed with each event's step.
    verbose: 1 prints one line per pruning event.
    """

    def __init__(self, fisher_dataset=None, loss=None, log_dir=None, seed=0, verbose=0):
        super().__init__()
        self.fisher_dataset, self.loss = fisher_dataset, loss
        self.log_dir, self.seed, self.verbose = log_dir, seed, verbose
        self.pruner = None
        self.events = []  # one dict per pruning event: step, sparsity, seconds, layers
        self._writer = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        wrappers = [layer for layer in self.prunable_layers if isinstance(layer, PruneWoodFisher)]
        if not wrappers:
            return
        self._wrappers = wrappers
        first = wrappers[0]
        for layer in wrappers[1:]:
            if layer.woodfisher_config != first.woodfisher_config or \
                    layer.pruning_schedule.get_config() != first.pruning_schedule.get_config():
                raise ValueError(f"{layer.name!r} and {first.name!r} have different WoodFisher settings or schedules; "
                                 "one model is pruned by one schedule and one configuration")
        dataset = self.fisher_dataset if self.fisher_dataset is not None else first.fisher_dataset
        loss = self.loss or first.fisher_loss or getattr(self.model, "loss", None)
        weights = [w for w in find_prunable_weights(self.model) if isinstance(w.layer, PruneWoodFisher)]
        self.pruner = Pruner(self.model, weights, dataset, loss, first.woodfisher_config,
                             self.model.distribute_strategy)
        self.schedule = first.pruning_schedule
        for layer in wrappers:
            layer.driven_by_callback = True
        if self.log_dir:
            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_end(self, logs=None):
        for layer in getattr(self, "_wrappers", []):
            layer.driven_by_callback = False

    def on_train_batch_begin(self, batch, logs=None):
        if self.pruner is None:
            return
        step = int(self._wrappers[0].pruning_step.numpy()) + 1  # the step this batch's forward pass will see
        should_prune, sparsity = self.schedule(tf.constant(step, tf.int64))
        if bool(should_prune):
            self.prune(step, float(sparsity))

    def prune(self, step, sparsity):
        """Run one pruning event (``recompute_steps`` Fisher recomputations) to ``sparsity``."""
        validate_sparsity(sparsity, f"the schedule's sparsity at step {step}")
        started = time.perf_counter()
        pruner = self.pruner
        for index, target in enumerate(step_sparsities(pruner.sparsity(), sparsity, recompute_steps(self.schedule))):
            pruner.prune_to(target, seed=fisher_seed(self.seed, step, index))
        reset_optimizer_slots(getattr(self.model, "optimizer", None), pruner.weights)
        event = {"step": step, "sparsity": pruner.sparsity(), "seconds": time.perf_counter() - started,
                 "layers": {layer.name: layer.sparsity for layer in layer_sparsities(pruner.weights)}}
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

    def on_epoch_begin(self, epoch, logs=None):
        self._events_at_epoch_begin = len(self.events)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.pruner is None or logs is None:
            return
        logs["woodfisher_sparsity"] = self.pruner.sparsity()
        logs["woodfisher_seconds"] = sum(e["seconds"] for e in self.events[self._events_at_epoch_begin:])
        for layer in layer_sparsities(self.pruner.weights):
            logs[f"sparsity/{layer.name}"] = layer.sparsity
