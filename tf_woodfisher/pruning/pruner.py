"""Pruning events on a :class:`PruningProblem`: gradients → inverse Fisher → scores → masks → update.

The core of every entry point (one-shot, the tfmot callback, the Keras 3 callback). It knows no Keras:
an adapter hands it a :class:`PruningProblem`, i.e. a forward callable, the (variable, mask) targets,
a per-sample loss and the Fisher data, and a validated :class:`~tf_woodfisher.config.WoodFisherConfig`.
:func:`prune_in_steps` is the one loop of multi-step (k-step) pruning; :func:`sweep_in_steps` prunes the same
start to several sparsities, sharing the statistics where one step suffices.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

from tf_woodfisher.config import LAYERWISE_METHODS, WoodFisherConfig, validate_sparsity
from tf_woodfisher.fisher.blocks import BlockPartition, group_sizes, output_unit_groups, output_unit_size
from tf_woodfisher.fisher.distributed import executor_for
from tf_woodfisher.fisher.gradients import collect_gradient_columns, fisher_loss, make_gradient_fn
from tf_woodfisher.fisher.grams import gradient_moments, reduced_block_size
from tf_woodfisher.fisher.host import HostBuffers
from tf_woodfisher.fisher.memory import (GRADIENT_DTYPES, TRANSIENT_MARGIN, EventShape, MemoryBudgetError,
                                         format_bytes, plan_memory)
from tf_woodfisher.fisher.woodbury import InverseFisher
from tf_woodfisher.pruning import diagnostics as loss_diagnostics
from tf_woodfisher.pruning import obs
from tf_woodfisher.pruning import scores as scoring
from tf_woodfisher.pruning.structures import TargetGroups
from tf_woodfisher.pruning.report import EventStats
from tf_woodfisher.pruning.targets import (PruningTarget, assign_weights, check_unique_names, current_masks, flatten,
                                          restore_targets, value_dtype)

MOMENT_METHODS = ("diagonal_fisher", "woodtaylor")  # their statistics read the gradients, in float32


@dataclasses.dataclass(frozen=True)
class PruningProblem:
    """What a pruning event needs from a model, in terms the core understands.

    Attributes:
        targets: the pruned tensors, in a fixed order (their flat concatenation has length d).
        forward: inputs → outputs in inference mode (None for magnitude pruning).
        loss: (y_true, y_pred) → per-sample losses (n,) (None for magnitude pruning).
        dataset: the Fisher data, a ``tf.data.Dataset`` of (x, y) or (x, y, sample_weight).
        batched: whether ``dataset`` yields batches (decided by the adapter, which knows the model's inputs).
        make_gradient_fn: factory (forward, variables, loss) → compiled gradient function, as
            :func:`tf_woodfisher.fisher.gradients.make_gradient_fn` (the default); its ``transient_bytes(x, y)``
            (chunk specs → bytes, see :mod:`tf_woodfisher.fisher.graph_memory`) puts a chunk's activations into
            the memory plan (without it, a warning).
    """

    targets: Sequence[PruningTarget]
    forward: Optional[Callable] = None
    loss: Optional[Callable] = None
    dataset: Optional[tf.data.Dataset] = None
    batched: bool = False
    make_gradient_fn: Callable = make_gradient_fn


def event_shape(config: WoodFisherConfig, segment_sizes: Sequence[int],
                unit_sizes: Optional[Sequence[int]] = None) -> EventShape:
    """The memory planner's view of an event of ``config`` on tensors of ``segment_sizes`` entries.

    Args:
        config: the event's validated configuration.
        segment_sizes: entries of each pruned tensor, in order.
        unit_sizes: with ``fisher_block_order='filter'``, the entries of each tensor's output units (the
            chunks hold whole units); None otherwise.

    Returns:
        The :class:`~tf_woodfisher.fisher.memory.EventShape` (moments needed for diagonal Fisher and
        WoodTaylor, the inverse for WoodFisher and WoodTaylor, the update when ``config.update``).
    """
    return EventShape(tuple(segment_sizes), config.num_gradients, config.fisher_block_size, config.gradient_dtype,
                      config.inverse_dtype, needs_inverse=config.needs_inverse, needs_update=config.update,
                      needs_moments=config.method in MOMENT_METHODS,
                      unit_sizes=None if unit_sizes is None else tuple(int(u) for u in unit_sizes),
                      fisher_batch_size=config.fisher_batch_size)


def fisher_seed(seed: int, *indices: int) -> int:
    """The Fisher-sample seed of an event: ``seed`` mixed with the event's indices (step, recomputation).

    Different base seeds never share samples (unlike seed + step).

    Args:
        seed: the base seed (``config.seed``), an int ≥ 0.
        *indices: the event's indices (ints ≥ 0), e.g. the training step and the recomputation step.

    Returns:
        A 32-bit unsigned int seed from ``np.random.SeedSequence([seed, *indices])``.
    """
    return int(np.random.SeedSequence([seed, *indices]).generate_state(1)[0])


def step_sparsities(start: float, target: float, steps: int) -> list:
    """Sparsity after each of ``steps`` increments from ``start`` to ``target``.

    Each step removes the same fraction of the remaining weights (density falls geometrically): much
    better than equal increments of sparsity at high targets (BENCHMARKS.md).

    Args:
        start: the current sparsity, a fraction in [0, 1).
        target: the sparsity to reach, a fraction in [0, 1).
        steps: number of increments, ≥ 1.

    Returns:
        A list of ``steps`` floats, the sparsity after each step, ending at ``target``;
        ``[target] * steps`` when ``target`` ≤ ``start``.
    """
    start_density, target_density = 1.0 - start, 1.0 - target
    if target_density >= start_density:
        return [target] * steps
    return [1.0 - start_density * (target_density / start_density) ** ((i + 1) / steps) for i in range(steps)]


class Pruner:
    """Prunes the targets of a :class:`PruningProblem` to a sparsity, keeping pruned entries pruned.

    With ``config.block_size`` ≠ (1, 1) or ``config.sparsity_m_by_n`` it prunes tfmot's blocks or N:M
    groups, with group scores and joint OBS updates (:mod:`tf_woodfisher.pruning.structures`); the
    Fisher blocks are then aligned so that each holds whole groups. With ``config.sequential`` the selection
    and the update are sequential OBS inside the Fisher blocks (:func:`tf_woodfisher.pruning.obs.sequential_event`).
    With ``config.diagnostics`` each event's :class:`EventStats` carries its predicted and measured loss increase
    (:mod:`tf_woodfisher.pruning.diagnostics`).

    Args:
        problem: the model, as the core sees it.
        config: the validated configuration of every event.
        strategy: a ``tf.distribute`` strategy (default: the current one) over which gradients and blocks
            are split; scores, masks and updates come out identical on every replica and worker.

    Raises:
        ValueError: a method that needs gradients without dataset, forward or loss; num_gradients not
            divisible by the replicas; duplicate target names; ``diagnostics=True`` with several replicas or a
            memory plan that streams or recomputes the gradients.
            With a structure: a method that cannot score groups, or a weight it does not fit (a block
            structure on a weight that is not 2-D, N:M on one neither 2-D nor 4-D), named.
    """

    def __init__(self, problem: PruningProblem, config: WoodFisherConfig, strategy=None):
        self.problem, self.config = problem, config
        self.targets = list(problem.targets)
        if config.method in LAYERWISE_METHODS:
            raise ValueError(f"method {config.method!r} reconstructs each layer from calibration activations after "
                             "training: use it with one_shot_prune (tfw or tfw3), not in a training schedule")
        if not self.targets:
            raise ValueError("nothing to prune: the list of pruning targets is empty")
        check_unique_names(self.targets)
        self.groups = TargetGroups.for_targets(self.targets, config)  # tfmot's blocks / N:M groups, or None
        self.executor = executor_for(strategy)
        if config.needs_gradients:
            for what in ("dataset", "forward", "loss"):
                if getattr(problem, what) is None:
                    raise ValueError(f"method {config.method!r} needs a Fisher {what}")
            self.executor.require_divisible(config.num_gradients, "num_gradients")
        self.segments = [t.size for t in self.targets]
        if isinstance(config.fisher_block_size, int) and config.fisher_block_size > max(self.segments):
            warnings.warn(f"fisher_block_size={config.fisher_block_size} is larger than every prunable tensor "
                          f"(largest: {max(self.segments)}); each tensor is one block, as with fisher_block_size=None",
                          RuntimeWarning, stacklevel=3)
        # chunks of whole output units ('filter'; a structure's aligned groups are small and not counted)
        self._unit_sizes = [output_unit_size(t.shape) for t in self.targets] \
            if config.fisher_block_order == "filter" else None
        if self._unit_sizes is not None:
            large = [f"{t.name} ({unit})" for t, unit in zip(self.targets, self._unit_sizes)
                     if unit > config.fisher_block_size]
            if large:
                named = ", ".join(large[:4]) + (f" and {len(large) - 4} more tensors" if len(large) > 4 else "")
                warnings.warn(f"fisher_block_order='filter': the output units of {named} have more "
                              f"weights than fisher_block_size={config.fisher_block_size}; each of their units is "
                              "one Fisher block of that many weights", RuntimeWarning, stacklevel=3)
        self.offsets = np.cumsum([0] + self.segments)
        self.plan = plan_memory(event_shape(config, self.segments, self._unit_sizes), config.max_memory) \
            if config.needs_gradients else None
        self._gradient_fns = {}  # stage → compiled gradient function, reused by every event of this Pruner
        self._next_plan = None  # the plan with the traced transient bytes, taken at the next event's start
        self._transient_counted = set()  # ids of the gradient functions whose transient bytes are in the plan
        # the gradient rows and their blocks, reused by the next event; none kept when the plan streams stages,
        # whose buffers differ in shape and must not stay allocated next to the following stage's
        self._buffers = HostBuffers(0 if self.plan is not None and self.plan.streamed else None)
        self._diagnosis = None  # diagnostics=True: the current event's EventDiagnosis (pruning/diagnostics.py)
        if config.diagnostics:
            loss_diagnostics.check_supported(config, self.executor.num_replicas, self.plan)
            self._losses_of = loss_diagnostics.mean_loss_fn(problem.forward, problem.loss, problem.dataset)

    @property
    def variables(self) -> list:
        """The targets' variables, in target order."""
        return [t.variable for t in self.targets]

    def sparsity(self) -> float:
        """Current fraction of masked entries over the targets.

        Returns:
            The fraction of zeros of the targets' masks, over all their entries, in [0, 1].
        """
        return 1.0 - float(tf.reduce_mean(current_masks(self.targets)))

    @property
    def stages(self) -> tuple:
        """(begin, end) ranges of the targets whose statistics are computed together (see :attr:`plan`)."""
        return self.plan.stages if self.plan is not None else ((0, len(self.targets)),)

    def work_units(self) -> int:
        """Progress units of one :meth:`prune_to` call.

        Returns:
            Gradients of every pass, plus inverse groups of every build, plus 1 for the final write
            (1 in all for magnitude pruning).
        """
        if self.plan is None:
            return 1
        builds = self.plan.gradient_passes // len(self.stages) if self.config.needs_inverse else 0
        groups = sum(len(group_sizes(self.segments[b:e], self.config.fisher_block_size,
                                     None if self._unit_sizes is None else self._unit_sizes[b:e]))
                     for b, e in self.stages)
        return self.plan.gradient_passes * self.config.num_gradients + builds * groups + 1

    def prune_to(self, sparsity: float, seed: int = 0,
                 on_progress: Optional[Callable[[int], None]] = None) -> EventStats:
        """One event: recompute the statistics on the masked model and prune to ``sparsity``.

        Stage by stage (see :attr:`plan`): the scores of every stage, then one selection over all of
        them, then the updates of every stage (from kept or rebuilt statistics), written at the end.

        Args:
            sparsity: the fraction of the targets' entries (global) or of each target (layerwise).
            seed: the Fisher-sample seed of this event.
            on_progress: called with the units done so far (see :meth:`work_units`).

        Returns:
            The event's :class:`EventStats`.
        """
        progress, timer = _Progress(on_progress), PhaseTimer()
        self._take_next_plan()
        self.executor.take_traffic()
        values, mask = self._masked_values()
        scores, kept = zip(*[self._scores(stage, values, mask, seed, progress, timer, sparsity)
                             for stage in self.stages])
        self._select_and_update(sparsity, values, mask, scores, kept, seed, progress, timer)
        progress.finish(self.work_units())
        stats = self._event_stats(timer)
        self._diagnosis = None  # frees the gradient rows it kept
        return stats

    def can_sweep(self) -> bool:
        """Whether :meth:`sweep` computes the statistics once for all its sparsities.

        Returns:
            True with one step per event, no N:M pattern and a memory plan that keeps every stage's
            statistics from the scores to the update (or none needed, as for magnitude).
        """
        return (self.config.steps == 1 and (self.groups is None or self.groups.structure.m_by_n is None)
                and (self.plan is None or self.plan.keep_inverse))

    def sweep(self, sparsities: Sequence[float], seed: int,
              on_point: Callable[[float, EventStats], None],
              on_progress: Optional[Callable[[int], None]] = None) -> None:
        """Prune to each of ``sparsities`` from the same starting weights, with the statistics computed once.

        For each sparsity, in the order given, the targets are pruned exactly as one event
        ``prune_to(sparsity, fisher_seed(seed, 0))`` would prune them (the same scores, masks and
        updates as :func:`prune_in_steps` with one step), ``on_point(sparsity, stats)`` is called with
        the model pruned, and the targets' weights and masks are restored afterwards. The Fisher
        statistics of the starting model (gradients, inverse, scores) are computed once, in the first
        point's event: its :class:`EventStats` carries their seconds, later points only their own
        selection and update.

        Args:
            sparsities: the targets, each in [0, 1).
            seed: base seed, as for :func:`prune_in_steps`.
            on_point: called as ``on_point(sparsity, stats)`` while the model is pruned to ``sparsity``;
                what it changes in the targets is undone, anything else it changes is not.
            on_progress: called with the units done so far (those of one event).

        Raises:
            ValueError: a sparsity outside [0, 1), or a configuration for which the statistics cannot be
                shared (see :meth:`can_sweep`; :func:`sweep_in_steps` runs every point then).
        """
        sparsities = [validate_sparsity(s) for s in sparsities]
        if not self.can_sweep():
            raise ValueError("Pruner.sweep shares one event's statistics, which needs steps=1, no N:M pattern and "
                             "a memory plan that keeps them: use sweep_in_steps")
        progress, timer = _Progress(on_progress), PhaseTimer()
        self._take_next_plan()
        self.executor.take_traffic()
        start = [(t.variable.numpy(), None if t.mask is None else t.mask.numpy()) for t in self.targets]
        values, mask = self._masked_values()
        event_seed = fisher_seed(seed, 0)
        scores, kept = zip(*[self._scores(stage, values, mask, event_seed, progress, timer, None)
                             for stage in self.stages])
        start_sparsity = self.sparsity()
        for sparsity in sparsities:  # the event's sparsity exactly as prune_in_steps computes it (same rounding)
            event_sparsity = step_sparsities(start_sparsity, sparsity, 1)[0]
            self._select_and_update(event_sparsity, values, mask, scores, kept, event_seed, progress, timer)
            progress.finish(self.work_units())
            on_point(sparsity, self._event_stats(timer))
            timer = PhaseTimer()
            restore_targets(self.targets, start)

    def _masked_values(self):
        """Apply the current masks to the targets; return (flat values (d,), flat mask (d,))."""
        mask = current_masks(self.targets)
        dtype = value_dtype(self.targets)  # float64 models keep their precision
        assign_weights(self.targets, flatten(self.variables, dtype), mask)
        values = flatten(self.variables, dtype)
        self.executor.check_consistent([values.numpy()], "the model's weights")
        if self.config.diagnostics:  # an event (or a sweep) starts here: its diagnostics start from these weights
            problem = self.problem
            self._diagnosis = loss_diagnostics.EventDiagnosis(
                self.config, values.numpy(), self._losses_of, problem.dataset, problem.batched,
                1 if self.config.method == "diagonal_fisher" else self.config.fisher_block_size)
        return values, mask

    def _select_and_update(self, sparsity, values, mask, scores, kept, seed, progress, timer):
        """From the stages' scores (and kept statistics): the new masks and the updated weights, written."""
        config = self.config
        with timer("scoring"):
            if config.sequential:  # sequential OBS inside the explicit Fisher blocks (pruning/obs.py)
                inverses = [(self.offsets[stage[0]], None if stats is None else stats.inverse)
                            for stage, stats in zip(self.stages, kept)]
                new_mask, values = obs.sequential_event(inverses, values, mask, self.segments, sparsity, config.mode)
                values = tf.constant(values, value_dtype(self.targets))
            else:
                select = scoring.select_pruned if self.groups is None else self.groups.select
                new_mask = select(tf.concat(scores, 0), mask, self.segments, sparsity, config.mode)
        if config.update and config.needs_inverse and not config.sequential:
            pruned = tf.constant(new_mask == 0)
            values = tf.concat([self._update(stage, values, pruned, stats, mask, seed, progress, timer)
                                for stage, stats in zip(self.stages, kept)], 0)
        assign_weights(self.targets, values, tf.constant(new_mask))

    def _event_stats(self, timer):
        gathered, reduced = self.executor.take_traffic()
        measured = None if self._diagnosis is None else self._diagnosis.measure(
            flatten(self.variables, value_dtype(self.targets)).numpy())
        return EventStats(timer.seconds["gradient"], timer.seconds["inverse"], timer.seconds["scoring"],
                          gathered, reduced, recomputations=1, diagnostics=() if measured is None else (measured,))

    def _columns(self, vector, stage):
        """The entries of a flat (d,) vector that belong to the targets [begin, end) of ``stage``."""
        return vector[self.offsets[stage[0]]:self.offsets[stage[1]]]

    def _scores(self, stage, values, mask, seed, progress, timer, sparsity):
        """(scores, statistics if the plan keeps them else None) of the targets of ``stage``: one per weight, or
        with a structure one per group (N:M: the keep flags of an event to ``sparsity``, see structures.py)."""
        stats = self._statistics(stage, mask, seed, progress, timer)
        with timer("scoring"):
            if self.groups is None:
                scores = scoring.importance_scores(self.config.method, self._columns(values, stage), stats)
            else:
                scores = self.groups.scores(self.config.method, self._columns(values, stage),
                                            self._columns(mask, stage), stats, stage, sparsity)
        return scores, stats if self.plan is None or self.plan.keep_inverse else None

    def _gradient_fn(self, stage):
        if stage not in self._gradient_fns:
            problem = self.problem
            self._gradient_fns[stage] = problem.make_gradient_fn(  # the weighted loss of (x, y, w) data
                problem.forward, self.variables[stage[0]:stage[1]], fisher_loss(problem.loss, problem.dataset))
        return self._gradient_fns[stage]

    def _count_transient(self, gradient_fn, x, y):
        """Put a gradient chunk's transient bytes, estimated from ``gradient_fn``'s trace for the chunk (x, y),
        into the memory plan (once: the largest over the stages). A plan with other stages takes effect at the
        next event (this one keeps its stages, with a warning); a plan that no longer fits ``max_memory`` warns."""
        if id(gradient_fn) in self._transient_counted:
            return
        self._transient_counted.add(id(gradient_fn))  # the functions live in self._gradient_fns: ids stay theirs
        estimate = getattr(gradient_fn, "transient_bytes", None)
        if estimate is None:  # a PruningProblem.make_gradient_fn of the user's
            warnings.warn("the Fisher gradient function has no transient_bytes(x, y) method: the memory plan does not "
                          "count the activations of its chunks", RuntimeWarning, stacklevel=2)
            return
        if self.executor.num_replicas > 1:  # its trace reads distributed variables, only possible inside a replica
            warnings.warn("under a strategy with several replicas the activations of a Fisher gradient chunk are not "
                          "estimated: the memory plan does not count them", RuntimeWarning, stacklevel=2)
            return
        spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), (x, y))
        try:  # in the replica context of a one-replica strategy, as the chunk's call will run (the same trace)
            transient = int(TRANSIENT_MARGIN * self.executor.run(estimate, *spec))
        except (ValueError, TypeError, KeyError, tf.errors.OpError) as error:
            warnings.warn(f"the activations of a Fisher gradient chunk could not be estimated ({error}): the memory "
                          "plan does not count them", RuntimeWarning, stacklevel=2)
            return
        shape = (self._next_plan or self.plan).shape
        if transient <= shape.transient_bytes:
            return
        shape = dataclasses.replace(shape, transient_bytes=transient)
        try:
            plan = plan_memory(shape, self.plan.max_memory)
        except MemoryBudgetError as error:
            groups = tf.nest.flatten(x)[0].shape[0]
            warnings.warn(f"a Fisher gradient chunk of {groups} × {self.config.fisher_batch_size} "
                          f"samples allocates about {format_bytes(transient)} of activations and temporaries, beyond "
                          f"the memory plan: {error}", RuntimeWarning, stacklevel=2)
            plan = dataclasses.replace(self.plan, shape=shape, peak_bytes=self.plan.peak_bytes + transient)
        if (plan.stages, plan.keep_inverse) == (self.plan.stages, self.plan.keep_inverse):
            self.plan = plan
            return
        warnings.warn(f"a Fisher gradient chunk allocates about {format_bytes(transient)} of activations and "
                      f"temporaries: this event runs as planned before ({self.plan}), the next ones as {plan}",
                      RuntimeWarning, stacklevel=2)
        self._next_plan = plan

    def _take_next_plan(self):
        if self._next_plan is not None:
            if self._next_plan.stages != self.plan.stages:
                self._gradient_fns.clear()
                self._transient_counted.clear()
                self._buffers = HostBuffers(0 if self._next_plan.streamed else None)
            self.plan, self._next_plan = self._next_plan, None

    def _statistics(self, stage, mask, seed, progress, timer):
        """FisherStatistics of the targets of ``stage`` from their own gradient pass (None for magnitude)."""
        config, problem, (begin, end) = self.config, self.problem, stage
        if self.plan is None:
            return None
        with timer("gradient"):
            columns = collect_gradient_columns(  # per weight tensor: an (m, size) matrix, or its BlockGrams
                problem.forward, self.variables[begin:end], problem.dataset, problem.loss, config.num_gradients,
                config.fisher_batch_size, self._columns(mask, stage), seed, config.shuffle_buffer,
                on_chunk=progress.gradient_hook(), executor=self.executor, dtype=config.gradient_dtype,
                reduce_blocks=self.reduced_block_sizes(stage), batched=problem.batched,
                gradient_fn=self._gradient_fn(stage), buffers=self._buffers, on_first_chunk=self._count_transient)
        if self._diagnosis is not None:
            self._diagnosis.record(self.offsets[begin], columns, seed, self._block_groups(begin, end))
        with timer("inverse"):
            inverse = None
            if config.needs_inverse:
                partition = BlockPartition.from_segments(  # every structure group (or filter) inside one block
                    self.segments[begin:end], config.fisher_block_size, groups=self._block_groups(begin, end))
                inverse = InverseFisher.from_gradients(columns, partition, config.damping, config.inverse_dtype,
                                                       on_group=progress.advance, executor=self.executor,
                                                       buffers=self._buffers)
            moments = gradient_moments(columns) if config.method in MOMENT_METHODS else None
            return scoring.FisherStatistics.for_method(config.method, config.damping, inverse, moments)

    def _block_groups(self, begin, end):
        """Per target in [begin, end), the groups the Fisher chunks hold whole (the structure's, or the output
        units of ``fisher_block_order='filter'``); None for flat chunks."""
        if self.groups is not None:
            return self.groups.group_ids(begin, end)
        if self.config.fisher_block_order == "filter":
            return [output_unit_groups(t.shape) for t in self.targets[begin:end]]
        return None

    def reduced_block_sizes(self, stage):
        """Per target of ``stage``: the block size c whose Gram sums are all-reduced across replicas.

        Where that moves fewer bytes than all-gathering its m gradient rows, else None (see grams.py).
        Diagonal Fisher needs only 1 × 1 blocks (sums of squares); 'model' blocks need the rows.

        Args:
            stage: (begin, end) range of target indices (one of :attr:`stages`).

        Returns:
            A list with, per target of the stage, c (an int) or None; or None altogether on one replica, or
            with blocks aligned to groups (a structure's, or ``fisher_block_order='filter'``; except diagonal
            Fisher), when every target's rows are collected.
        """
        config = self.config
        aligned = self.groups is not None or config.fisher_block_order == "filter"
        if self.executor.num_replicas == 1 or (aligned and config.method != "diagonal_fisher"):
            return None  # aligned blocks (a structure's, whole filters) are not consecutive chunks: Grams need rows
        block_size = 1 if config.method == "diagonal_fisher" else config.fisher_block_size
        return [reduced_block_size(size, block_size, config.num_gradients, GRADIENT_DTYPES[config.gradient_dtype])
                for size in self.segments[stage[0]:stage[1]]]

    def _update(self, stage, values, pruned, stats, mask, seed, progress, timer):
        """The OBS-updated values of the targets of ``stage``, rebuilding its statistics if not kept."""
        stats = stats or self._statistics(stage, mask, seed, progress, timer)
        with timer("scoring"):
            if self.groups is not None:
                return self.groups.updated_weights(self.config.method, self._columns(values, stage),
                                                   self._columns(pruned, stage), stats, stage)
            return scoring.updated_weights(self.config.method, self._columns(values, stage),
                                           self._columns(pruned, stage), stats)


def prune_in_steps(pruner: Pruner, target_sparsity: float, seed: int, *indices: int,
                   on_progress: Optional[Callable[[int], None]] = None) -> EventStats:
    """Reach ``target_sparsity`` in ``pruner.config.steps`` events (the one k-step loop).

    Each event removes the same fraction of the remaining weights after recomputing the Fisher statistics
    on the pruned model.

    Args:
        pruner: the :class:`Pruner` of the model.
        target_sparsity: in [0, 1); with ``sparsity_m_by_n`` = (n, m), n/m (step i then leaves
            min(n, round(sparsity_i · m)) zeros in every m-group).
        seed: base seed; step i draws its Fisher samples with ``fisher_seed(seed, *indices, i)``.
        *indices: the caller's event indices (the training step of a gradual event; none for one-shot).
        on_progress: called with the units done so far over all steps (``steps × pruner.work_units()``).

    Returns:
        The :class:`EventStats` summed over the steps.

    Raises:
        ValueError: ``target_sparsity`` outside [0, 1), or other than n/m under ``sparsity_m_by_n``.
    """
    validate_sparsity(target_sparsity)
    if pruner.groups is not None:
        pruner.groups.check_target(target_sparsity)
    units, stats = pruner.work_units(), EventStats()
    for step, sparsity in enumerate(step_sparsities(pruner.sparsity(), target_sparsity, pruner.config.steps)):
        hook = None if on_progress is None else (lambda done, base=step * units: on_progress(base + done))
        stats = stats + pruner.prune_to(sparsity, fisher_seed(seed, *indices, step), on_progress=hook)
    return stats


def sweep_in_steps(pruner: Pruner, sparsities: Sequence[float], seed: int,
                   on_point: Callable[[float, EventStats], None],
                   on_progress: Optional[Callable[[int], None]] = None, cumulative: bool = False) -> bool:
    """Prune the same start to each of ``sparsities``, calling ``on_point(sparsity, stats)`` at each.

    Independent points (the default): each point is the result of ``prune_in_steps(pruner, sparsity, seed)``
    from the start, and the targets' weights and masks are restored after it. Where
    :meth:`Pruner.can_sweep` (one step, statistics kept), the statistics are computed once
    (:meth:`Pruner.sweep`); otherwise every point runs its own ``config.steps`` events.

    Cumulative (``cumulative=True``): one multi-step run through the sparsities in increasing order, each
    point reached from the previous one by ``config.steps`` events on the pruned model (statistics
    recomputed at each, Fisher seeds ``fisher_seed(seed, point, step)``), so point i is a
    (i+1)·steps-step pruning of the start; the targets are restored after the last point.

    Args:
        pruner: the :class:`Pruner` of the model.
        sparsities: the targets, each in [0, 1) (non-decreasing when cumulative).
        seed: base seed, as for :func:`prune_in_steps`.
        on_point: called as ``on_point(sparsity, stats)`` with each point's :class:`EventStats` (cumulative:
            of the events since the previous point).
        on_progress: called with the units done within the current point's events.
        cumulative: see above.

    Returns:
        Whether the statistics were shared between points.

    Raises:
        ValueError: a sparsity outside [0, 1) (or other than n/m under ``sparsity_m_by_n``), or decreasing
            sparsities with ``cumulative``.
    """
    if cumulative and any(b < a for a, b in zip(sparsities, sparsities[1:])):
        raise ValueError(f"a cumulative sweep needs non-decreasing sparsities, got {list(sparsities)}")
    if not cumulative and pruner.can_sweep():
        pruner.sweep(sparsities, seed, on_point, on_progress)
        return True
    start = [(t.variable.numpy(), None if t.mask is None else t.mask.numpy()) for t in pruner.targets]
    for index, sparsity in enumerate(sparsities):
        indices = (index,) if cumulative else ()
        on_point(sparsity, prune_in_steps(pruner, sparsity, seed, *indices, on_progress=on_progress))
        if not cumulative or index == len(sparsities) - 1:  # independent points: each from the start
            restore_targets(pruner.targets, start)
    return False


class PhaseTimer:
    """Wall-clock seconds by phase: ``with timer('gradient'): ...``.

    Args:
        phases: the phase names; ``seconds`` maps each to its total.
    """

    def __init__(self, *phases: str):
        self.seconds = dict.fromkeys(phases or ("gradient", "inverse", "scoring"), 0.0)

    @contextlib.contextmanager
    def __call__(self, phase):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - started


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
