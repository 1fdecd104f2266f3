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
from tf_woodfisher.fisher.gradients import DEFAULT_SHUFFLE_BUFFER, collect_gradient_columns
from tf_woodfisher.fisher.grams import gradient_moments, reduced_block_size
from tf_woodfisher.fisher.memory import GRADIENT_DTYPES, EventShape, block_groups, parse_bytes, plan_memory
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
    max_memory: object = None
    gradient_dtype: str = "float32"

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
        if self.max_memory is not None:
            parse_bytes(self.max_memory)
        if self.gradient_dtype not in GRADIENT_DTYPES:
            raise ValueError(f"gradient_dtype must be one of {tuple(GRADIENT_DTYPES)}, got {self.gradient_dtype!r}")
        if scoring.needs_inverse(self.method) and self.num_samples == 1:
            warnings.warn("num_samples=1: the Fisher has rank one, so WoodFisher scores are barely better "
                          "than magnitude; use tens to thousands of samples", RuntimeWarning, stacklevel=3)

    def to_dict(self):
        return dataclasses.asdict(self)

    def event_shape(self, segment_sizes):
        """The memory planner's view of an event of this configuration on tensors of ``segment_sizes`` entries."""
        return EventShape(tuple(segment_sizes), self.num_samples, self.block_size, self.gradient_dtype, self.dtype,
                          needs_inverse=scoring.needs_inverse(self.method), needs_update=self.update,
                          needs_moments=self.method in MOMENT_METHODS)


MOMENT_METHODS = ("diagonal_fisher", "woodtaylor")  # their statistics read the gradients, in float32


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
        self.offsets = np.cumsum([0] + self.segments)
        self.plan = plan_memory(config.event_shape(self.segments), config.max_memory) if needs_data else None
        self.times = EventTimes()

    @property
    def variables(self):
        return [w.variable for w in self.weights]

    def sparsity(self):
        """Current fraction of masked entries."""
        return 1.0 - float(tf.reduce_mean(current_masks(self.weights)))

    @property
    def stages(self):
        """(begin, end) ranges of the weights whose statistics are computed together (see :attr:`plan`)."""
        return self.plan.stages if self.plan is not None else ((0, len(self.weights)),)

    def work_units(self):
        """Progress units of one :meth:`prune_to` call: gradients of every pass, inverse groups of every
        build, and the final write."""
        if self.plan is None:
            return 1
        builds = self.plan.gradient_passes // len(self.stages) if scoring.needs_inverse(self.config.method) else 0
        groups = sum(len(block_groups(self.segments[b:e], self.config.block_size)) for b, e in self.stages)
        return self.plan.gradient_passes * self.config.num_samples + builds * groups + 1

    def prune_to(self, sparsity, seed=0, on_progress=None):
        """One event: recompute the statistics on the masked model and prune to ``sparsity``.

        Stage by stage (see :attr:`plan`): the scores of every stage, then one selection over all of
        them, then the updates of every stage (from kept or rebuilt statistics), written at the end.
        on_progress(units_done) reports progress within the event (see :meth:`work_units`).
        """
        config, progress = self.config, _Progress(on_progress)
        mask = current_masks(self.weights)
        assign_weights(self.weights, flatten(self.variables), mask)
        values = flatten(self.variables)
        self.executor.check_consistent([values.numpy()], "the model's weights")
        scores, kept = zip(*[self._scores(stage, values, mask, seed, progress) for stage in self.stages])
        tick = time.perf_counter()
        new_mask = scoring.select_pruned(tf.concat(scores, 0), mask, self.segments, sparsity, config.mode)
        self.times.inverse_seconds += time.perf_counter() - tick
        if config.update and scoring.needs_inverse(config.method):
            pruned = tf.constant(new_mask == 0)
            values = tf.concat([self._update(stage, values, pruned, stats, mask, seed, progress)
                                for stage, stats in zip(self.stages, kept)], 0)
        assign_weights(self.weights, values, tf.constant(new_mask))
        progress.finish(self.work_units())
        return new_mask

    def _columns(self, vector, stage):
        """The entries of a flat (d,) vector that belong to the weights [begin, end) of ``stage``."""
        return vector[self.offsets[stage[0]]:self.offsets[stage[1]]]

    def _scores(self, stage, values, mask, seed, progress):
        """(scores, statistics if the plan keeps them else None) of the weights of ``stage``."""
        stats = self._statistics(stage, mask, seed, progress)
        tick = time.perf_counter()
        scores = scoring.importance_scores(self.config.method, self._columns(values, stage), stats)
        self.times.inverse_seconds += time.perf_counter() - tick
        return scores, stats if self.plan is None or self.plan.keep_inverse else None

    def _statistics(self, stage, mask, seed, progress):
        """FisherStatistics of the weights of ``stage`` from their own gradient pass (None for magnitude)."""
        config, (begin, end) = self.config, stage
        if self.plan is None:
            return None
        tick = time.perf_counter()
        columns = collect_gradient_columns(  # per weight tensor: an (m, size) matrix, or its BlockGrams
            self.forward, self.variables[begin:end], self.dataset, self.loss, config.num_samples,
            config.fisher_batch_size, self._columns(mask, stage), seed, config.shuffle_buffer,
            on_chunk=progress.gradient_hook(), strategy=self.strategy, dtype=config.gradient_dtype,
            reduce_blocks=self.reduced_block_sizes(stage))
        self.times.gradient_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        inverse = None
        if scoring.needs_inverse(config.method):
            partition = BlockPartition.from_segments(self.segments[begin:end], config.block_size)
            inverse = InverseFisher.from_gradients(columns, partition, config.damping, config.dtype,
                                                   on_group=progress.advance, strategy=self.strategy)
        moments = gradient_moments(columns) if config.method in MOMENT_METHODS else None
        stats = scoring.FisherStatistics.for_method(config.method, config.damping, inverse, moments)
        self.times.inverse_seconds += time.perf_counter() - tick
        return stats

    def reduced_block_sizes(self, stage):
        """Per weight tensor of ``stage``: the block size c whose Gram sums are all-reduced across replicas,
        where that moves fewer bytes than all-gathering its m gradient rows, else None (see grams.py).

        Diagonal Fisher needs only 1 × 1 blocks (sums of squares); 'model' blocks need the rows.
        """
        config = self.config
        if self.executor.num_replicas == 1:
            return None
        block_size = 1 if config.method == "diagonal_fisher" else config.block_size
        return [reduced_block_size(size, block_size, config.num_samples, GRADIENT_DTYPES[config.gradient_dtype])
                for size in self.segments[stage[0]:stage[1]]]

    def _update(self, stage, values, pruned, stats, mask, seed, progress):
        """The OBS-updated values of the weights of ``stage``, rebuilding its statistics if not kept."""
        stats = stats or self._statistics(stage, mask, seed, progress)
        tick = time.perf_counter()
        updated = scoring.updated_weights(self.config.method, self._columns(values, stage),
                                          self._columns(pruned, stage), stats)
        self.times.inverse_seconds += time.perf_counter() - tick
        return updated


class _Progress:
    """Counts the progress units of one event and reports them to ``callback(units_done)`` (may be None)."""

    def __init__(self, callback):
        self.callback, self.done = callback, 0

    def _report(self, done):
        self.done = done
        if self.callback is not None:
            self.callback(done)

    def advance(self):
        """One more unit (an inverse group)."""
        self._report(self.done + 1)

    def gradient_hook(self):
        """An on_chunk(rows_done) hook for one gradient pass starting now."""
        base = self.done
        return lambda rows: self._report(base + rows)

    def finish(self, total):
        self._report(total)
