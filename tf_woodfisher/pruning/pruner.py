"""One pruning event on a set of prunable weights: gradients → inverse Fisher → scores → masks → update.

Used by :func:`one_shot_prune` and by the ``model.fit`` callback; it knows tfmot only through
the mask variables of :class:`PrunableWeight`.
"""
import dataclasses
import math
import time
import warnings

import numpy as np
import tensorflow_model_optimization as tfmot

from tf_woodfisher._keras import tf
from tf_woodfisher.fisher.blocks import BlockPartition
from tf_woodfisher.fisher.distributed import executor_for
from tf_woodfisher.fisher.gradients import DEFAULT_SHUFFLE_BUFFER, collect_gradients
from tf_woodfisher.fisher.woodbury import InverseFisher
from tf_woodfisher.pruning import scores as scoring
from tf_woodfisher.pruning.targets import assign_weights, current_masks, flatten, is_pruning_wrapper


@dataclasses.dataclass(frozen=True)
class PruningConfig:
    """How scores are computed (see :func:`tf_woodfisher.one_shot_prune` for each field)."""

    method: str = "woodfisher"
    mode: str = "global"
    num_samples: int = 1000
    fisher_batch_size: int = 1
    block_size: object = None
    damping: float = 1e-5
    update: bool = True
    dtype: str = "float32"
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER

    def __post_init__(self):
        if self.method not in scoring.METHODS:
            raise ValueError(f"method must be one of {scoring.METHODS}, got {self.method!r}")
        if self.mode not in scoring.MODES:
            raise ValueError(f"mode must be one of {scoring.MODES}, got {self.mode!r}")
        if not (isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping > 0):
            raise ValueError(f"damping must be a finite number > 0, got {self.damping!r}")
        for name in ("num_samples", "fisher_batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int ≥ 1, got {value!r}")
        if self.block_size not in (None, "model") and not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"block_size must be None, 'model' or an int ≥ 1, got {self.block_size!r}")
        if scoring.needs_inverse(self.method) and self.num_samples == 1:
            warnings.warn("num_samples=1: the Fisher has rank one, so WoodFisher scores are barely better "
                          "than magnitude; use tens to thousands of samples", RuntimeWarning, stacklevel=3)

    def to_dict(self):
        return dataclasses.asdict(self)


def fisher_seed(seed, *indices):
    """The Fisher-sample seed of an event: ``seed`` mixed with the event's indices (step, recomputation),
    so that different base seeds never share samples (unlike seed + step)."""
    return int(np.random.SeedSequence([seed, *indices]).generate_state(1)[0])


def validate_sparsity(value, what="target_sparsity"):
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")


def forward_model(model):
    """The model to differentiate: the model itself, or its stripped clone sharing the same variables."""
    if not any(is_pruning_wrapper(layer) for layer in model.submodules):
        return model
    try:
        return tfmot.sparsity.keras.strip_pruning(model)
    except (ValueError, NotImplementedError) as error:
        raise ValueError(
            f"cannot compute Fisher gradients of {model.name!r}: it holds tfmot pruning wrappers but is not a "
            f"Sequential or functional model, so its wrappers cannot be bypassed ({error})"
        ) from error


@dataclasses.dataclass
class EventTimes:
    """Wall-clock seconds spent on gradients and on the inverse/scores/update of pruning events."""

    gradient_seconds: float = 0.0
    inverse_seconds: float = 0.0


class Pruner:
    """Prunes ``weights`` (PrunableWeight list) of ``model`` to a sparsity, keeping pruned entries pruned.

    strategy: a ``tf.distribute`` strategy (default: the current one) over which gradients and blocks
    are split; scores, masks and updates come out identical on every replica and worker.
    """

    def __init__(self, model, weights, dataset, loss, config, strategy=None):
        self.weights = list(weights)
        self.config = config
        self.strategy = strategy
        self.executor = executor_for(strategy)
        if scoring.needs_gradients(config.method):
            self.executor.require_divisible(config.num_samples, "num_samples")
        self.dataset, self.loss = dataset, loss
        needs_data = scoring.needs_gradients(config.method)
        if needs_data and dataset is None:
            raise ValueError(f"method {config.method!r} needs a Fisher dataset")
        if needs_data and loss is None:
            raise ValueError(f"method {config.method!r} needs a loss")
        self.forward = forward_model(model) if needs_data else model
        self.segments = [w.size for w in self.weights]
        if isinstance(config.block_size, int) and config.block_size > max(self.segments):
            warnings.warn(f"block_size={config.block_size} is larger than every prunable tensor (largest: "
                          f"{max(self.segments)}); each tensor is one block, as with block_size=None",
                          RuntimeWarning, stacklevel=3)
        self.partition = BlockPartition.from_segments(self.segments, config.block_size)
        self.times = EventTimes()

    @property
    def variables(self):
        return [w.variable for w in self.weights]

    def sparsity(self):
        """Current fraction of masked entries."""
        return 1.0 - float(tf.reduce_mean(current_masks(self.weights)))

    def work_units(self):
        """Progress units of one :meth:`prune_to` call: gradients, inverse groups, and the final write."""
        gradients = self.config.num_samples if scoring.needs_gradients(self.config.method) else 0
        groups = len(self.partition.groups) if scoring.needs_inverse(self.config.method) else 0
        return gradients + groups + 1

    def prune_to(self, sparsity, seed=0, on_progress=None):
        """One event: recompute the statistics on the masked model and prune to ``sparsity``.

        on_progress(units_done) reports progress within the event (see :meth:`work_units`).
        """
        config = self.config
        mask = current_masks(self.weights)
        assign_weights(self.weights, flatten(self.variables), mask)
        self.executor.check_consistent([flatten(self.variables).numpy()], "the model's weights")
        stats = None
        if scoring.needs_gradients(config.method):
            tick = time.perf_counter()
            gradients = collect_gradients(
                self.forward, self.variables, self.dataset, self.loss, config.num_samples, config.fisher_batch_size,
                mask, seed, config.shuffle_buffer, on_chunk=on_progress, strategy=self.strategy)
            self.times.gradient_seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            inverse = None
            if scoring.needs_inverse(config.method):
                done = iter(range(config.num_samples + 1, config.num_samples + len(self.partition.groups) + 1))
                inverse = InverseFisher.from_gradients(
                    gradients, self.partition, config.damping, config.dtype,
                    on_group=(lambda: on_progress(next(done))) if on_progress else None, strategy=self.strategy)
            stats = scoring.FisherStatistics.from_gradients(config.method, gradients, config.damping, inverse)
            del gradients
            self.times.inverse_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        values = flatten(self.variables)
        new_mask = scoring.select_pruned(scoring.importance_scores(config.method, values, stats), mask,
                                         self.segments, sparsity, config.mode)
        if config.update:
            values = scoring.updated_weights(config.method, values, tf.constant(new_mask == 0), stats)
        assign_weights(self.weights, values, tf.constant(new_mask))
        self.times.inverse_seconds += time.perf_counter() - tick
        if on_progress:
            on_progress(self.work_units())
        return new_mask
