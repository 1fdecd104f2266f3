"""The memory planner: estimates, plans, errors; streamed pruning events against one-pass events."""
import contextlib
import dataclasses

import numpy as np
import pytest

import tf_woodfisher as tfw
import tensorflow as tf
import tf_keras as keras
from tf_woodfisher.fisher import memory
from tf_woodfisher.fisher.memory import EventShape, MemoryBudgetError, plan_memory
from tf_woodfisher.fisher.blocks import group_sizes
from tf_woodfisher.pruning.pruner import Pruner, event_shape
from tf_woodfisher.tfmot.problem import keras_problem

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MLPNET = (31360, 800, 200)


@pytest.fixture(scope="module")
def fisher_data(mnist_flat):
    (x, y), _ = mnist_flat
    return tf.data.Dataset.from_tensor_slices((x[:2000], y[:2000]))


def test_parse_bytes():
    assert memory.parse_bytes("4GB") == 4 * 10 ** 9
    assert memory.parse_bytes("1.5 GiB") == int(1.5 * 2 ** 30)
    assert memory.parse_bytes("512mb") == 512 * 10 ** 6
    assert memory.parse_bytes(10 ** 6) == 10 ** 6
    assert 0 < memory.parse_bytes(None) <= memory.available_memory()
    for bad in ("4 parsecs", "GB", -1, 0, True, float("nan"), [4]):
        with pytest.raises(ValueError, match="max_memory"):
            memory.parse_bytes(bad)


def test_estimates_scale_with_m_d_and_dtype():
    shape = EventShape(MLPNET, 100)
    assert shape.gradient_bytes() == 100 * sum(MLPNET) * 4
    assert dataclasses.replace(shape, gradient_dtype="bfloat16").gradient_bytes() == 100 * sum(MLPNET) * 2
    assert group_sizes([10, 7], 4) == {4: 3, 2: 1, 3: 1}  # as BlockPartition groups them
    assert group_sizes([10, 7], "model") == {17: 1}
    # Low-rank blocks (c ≥ 2m) grow like m·c, explicit ones like c².
    lowrank = memory.group_bytes("lowrank", 1, 64, 10_000, 4)[0]
    assert memory.group_bytes("lowrank", 1, 128, 10_000, 4)[0] == pytest.approx(2 * lowrank, rel=0.05)
    explicit = memory.group_bytes("explicit", 1, 1000, 1000, 4)[0]
    assert memory.group_bytes("explicit", 1, 1000, 2000, 4)[0] > 3 * explicit


def test_one_chunk_holds_all_gradients_when_their_rows_fit_and_are_kept_in_float32():
    """default_chunk: all m rows in one call when 4·m·d ≤ CHUNK_BYTES, m·b ≤ MAX_WHOLE_CHUNK_SAMPLES
    and the storage is float32; the estimate then counts the rows and one masked copy, not CHUNK_COPIES chunks."""
    d = sum(MLPNET)
    assert memory.default_chunk(d, 1024) == 1024 and memory.whole_chunk(d, 1024)
    assert memory.default_chunk(d, 256, 16) == 256 and not memory.whole_chunk(d, 257, 16)  # 4,112 samples
    assert memory.default_chunk(d, 257, 16) == memory.MAX_CHUNK_ROWS
    assert memory.default_chunk(d, 1024, 1, itemsize=2) == memory.MAX_CHUNK_ROWS  # half storage: chunked
    assert memory.collection_bytes(d, 1024, 4) == 1024 * d * 8
    wide = 10 * d
    limit = memory.CHUNK_BYTES // (4 * wide)  # the most rows that fit
    assert memory.whole_chunk(wide, limit) and not memory.whole_chunk(wide, limit + 1)
    chunk = memory.default_chunk(wide, limit + 1)
    assert chunk < limit + 1
    assert memory.collection_bytes(wide, limit + 1, 4) == \
        4 * memory.CHUNK_COPIES * chunk * wide + (limit + 1) * wide * 4
    for b, expected in ((1, 300 * d * 8), (16, 4 * memory.CHUNK_COPIES * 256 * d + 300 * d * 4)):  # 4,800 samples
        assert EventShape(MLPNET, 300, needs_inverse=False, fisher_batch_size=b).stage_bytes(0, 3)[0] == expected


@pytest.mark.parametrize("block", [1, 5, 36, 80, 200, 10_000])
def test_group_sizes_of_filter_chunks_match_the_partition(block):
    """The planner's blocks with fisher_block_order='filter' are those BlockPartition builds from the output units:
    max(1, c // s) units of s weights a chunk, a unit larger than c on its own (then blocks exceed c)."""
    from tf_woodfisher.fisher.blocks import BlockPartition, output_unit_groups, output_unit_size

    shapes = [(3, 3, 4, 6), (3, 3, 6, 5), (40, 7), (7,)]
    sizes = [int(np.prod(s)) for s in shapes]
    partition = BlockPartition.from_segments(sizes, block, groups=[output_unit_groups(s) for s in shapes])
    built = {g.block_size: g.num_blocks for g in partition.groups}
    assert group_sizes(sizes, block, [output_unit_size(s) for s in shapes]) == built
    assert [output_unit_size(s) for s in shapes] == [36, 54, 40, 1]
    if block == 5:  # units of 36, 54 and 40 weights: blocks of 36, 54 and 40, not the flat plan's 5
        assert max(built) == 54 and max(group_sizes(sizes, block)) == 5
    with pytest.raises(ValueError, match="does not divide"):
        group_sizes([10], 4, [3])


def test_filter_chunks_are_planned_as_gathered_blocks_of_whole_units(mlpnet_npz, fisher_data):
    """The Pruner plans the blocks it builds: with 'filter' chunks of 100, MLPNet's 784-weight units are single
    blocks of 784 (explicit c × c inverses at m = 1,000), so the estimate is far above the flat chunks' one."""
    estimates = {}
    for order in ("flat", "filter"):
        config = tfw.WoodFisherConfig(num_gradients=1000, fisher_block_size=100, fisher_block_order=order)
        model = tfw.models.mlpnet(mlpnet_npz)
        with pytest.warns(RuntimeWarning) if order == "filter" else contextlib.nullcontext():
            pruner = Pruner(keras_problem(model, tfw.find_prunable_weights(model), fisher_data, LOSS, config), config)
        estimates[order] = pruner.plan.peak_bytes
        assert pruner.plan.shape.unit_sizes == ((784, 40, 20) if order == "filter" else None)
    unit_blocks = memory.inverse_bytes(MLPNET, 100, 1000, 4, unit_sizes=(784, 40, 20))[0]
    # layer 1: 40 units of 784; layer 2: 20 units of 40, two a chunk; layer 3: 10 units of 20, five a chunk
    assert unit_blocks == memory.inverse_bytes([784] * 40 + [80] * 10 + [100] * 2, None, 1000, 4, views=False)[0]
    stored = 1000 * sum(MLPNET) * 4  # the float32 gradients, alive while the inverse is built
    assert estimates["filter"] >= stored + unit_blocks > estimates["flat"]


def test_one_pass_when_it_fits_else_stages():
    shape = EventShape(MLPNET, 100)
    plan = plan_memory(shape, "10GB")
    assert not plan.streamed and plan.gradient_passes == 1 and plan.peak_bytes <= plan.max_memory
    lean = memory.leanest_bytes(shape)
    staged = plan_memory(shape, lean)
    assert staged.streamed and staged.peak_bytes <= lean
    assert [s for stage in staged.stages for s in range(*stage)] == [0, 1, 2]  # consecutive, all tensors
    assert "stages" in str(staged) and "max_memory" in str(staged)
    no_update = plan_memory(dataclasses.replace(shape, needs_update=False), lean)
    assert no_update.gradient_passes == len(no_update.stages)


def test_budget_errors_give_numbers_and_options():
    shape = EventShape(MLPNET, 100)
    with pytest.raises(MemoryBudgetError, match=r"max_memory=1 MB is too small.*needs .* MB.*Options: max_memory ≥"):
        plan_memory(shape, "1MB")
    with pytest.raises(MemoryBudgetError, match=r"cannot be streamed.*fisher_block_size=None"):
        plan_memory(dataclasses.replace(shape, fisher_block_size="model"), memory.leanest_bytes(shape))
    with pytest.raises(ValueError, match="gradient_dtype"):
        EventShape(MLPNET, 100, gradient_dtype="int8")


def prune(mlpnet_npz, data, **kwargs):
    model = tfw.models.mlpnet(mlpnet_npz)
    report = tfw.one_shot_prune(model, data, LOSS, 0.9, num_gradients=64, verbose=0, **kwargs)
    return report, [w.variable.numpy() for w in tfw.find_prunable_weights(model)]


def pruned_weights(mlpnet_npz, data, config, keep_inverse=None, progress=None):
    """The MLPNet's weights after one Pruner event to 90% (the plan's keep_inverse forced if given)."""
    model = tfw.models.mlpnet(mlpnet_npz)
    pruner = Pruner(keras_problem(model, tfw.find_prunable_weights(model), data, LOSS, config), config)
    if keep_inverse is not None:
        assert pruner.plan.streamed
        pruner.plan = dataclasses.replace(pruner.plan, keep_inverse=keep_inverse)
    pruner.prune_to(0.9, on_progress=progress.append if progress is not None else None)
    # a streamed plan's stages keep no host buffers between them (their shapes differ: the budget would not hold)
    assert (pruner._buffers.max_bytes == 0) == pruner.plan.streamed
    if progress is not None:
        assert progress == sorted(progress) and progress[-1] == pruner.work_units()
    return [w.variable.numpy() for w in pruner.targets]


@pytest.mark.parametrize("method,mode", [("woodfisher", "global"), ("woodtaylor", "layerwise")])
def test_streamed_event_equals_one_pass(mlpnet_npz, fisher_data, method, mode):
    config = tfw.WoodFisherConfig(method=method, mode=mode, num_gradients=64, damping=1e-3)
    reference = pruned_weights(mlpnet_npz, fisher_data, config)
    lean = config.replace(max_memory=memory.leanest_bytes(event_shape(config, MLPNET)))
    for keep in (True, False):
        streamed = pruned_weights(mlpnet_npz, fisher_data, lean, keep_inverse=keep, progress=[])
        for got, expected in zip(streamed, reference):
            np.testing.assert_array_equal(got == 0, expected == 0)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_bfloat16_gradients_prune_nearly_alike(mlpnet_npz, fisher_data):
    _, reference = prune(mlpnet_npz, fisher_data)
    report, got = prune(mlpnet_npz, fisher_data, gradient_dtype="bfloat16")
    assert report.sparsity == pytest.approx(0.9, abs=1e-4)
    agreement = np.mean(np.concatenate([(a == 0).ravel() == (b == 0).ravel() for a, b in zip(got, reference)]))
    assert agreement > 0.99


def test_max_memory_errors_before_any_gradient(mlpnet_npz, fisher_data, capsys):
    model = tfw.models.mlpnet(mlpnet_npz)
    before = [w.numpy() for w in model.weights]
    with pytest.raises(MemoryBudgetError, match=r"too small.*needs.*Options"):
        tfw.one_shot_prune(model, fisher_data, LOSS, 0.5, num_gradients=64, max_memory="1MB", verbose=0)
    with pytest.raises(MemoryBudgetError, match="cannot be streamed"):
        tfw.one_shot_prune(model, fisher_data, LOSS, 0.5, num_gradients=64, fisher_block_size="model",
                           max_memory="20MB",
                           verbose=0)
    for bad, message in (("lots", "max_memory"), (-5, "max_memory")):
        with pytest.raises(ValueError, match=message):
            tfw.one_shot_prune(model, fisher_data, LOSS, 0.5, max_memory=bad, verbose=0)
    with pytest.raises(ValueError, match="gradient_dtype"):
        tfw.one_shot_prune(model, fisher_data, LOSS, 0.5, gradient_dtype="float8", verbose=0)
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(old, new.numpy())
    lean = memory.leanest_bytes(event_shape(tfw.WoodFisherConfig(num_gradients=64), MLPNET))
    tfw.one_shot_prune(model, fisher_data, LOSS, 0.5, num_gradients=64, max_memory=lean, verbose=1)
    assert "memory plan: 2 stages of tensors" in capsys.readouterr().out


def test_a_chunks_transient_bytes_count_in_every_stage():
    shape = EventShape(MLPNET, 100)
    heavy = dataclasses.replace(shape, transient_bytes=10 ** 9)
    for stage in ((0, 1), (1, 2), (0, 3)):
        collect = memory.collection_bytes(sum(MLPNET[slice(*stage)]), 100, 4)
        assert heavy.stage_bytes(*stage)[0] == max(shape.stage_bytes(*stage)[0], collect + 10 ** 9)
    assert plan_memory(heavy, "10GB").peak_bytes == shape.vector_bytes + memory.collection_bytes(sum(MLPNET), 100, 4) \
        + 10 ** 9


def _mlpnet_pruner(mlpnet_npz, data, config):
    model = tfw.models.mlpnet(mlpnet_npz)
    return Pruner(keras_problem(model, tfw.find_prunable_weights(model), data, LOSS, config), config)


def test_the_first_event_puts_the_traced_chunk_into_the_plan(mlpnet_npz, fisher_data, monkeypatch):
    """The first chunk's traced transient bytes (× TRANSIENT_MARGIN) enter the plan; a plan that then needs other
    stages warns and takes effect at the next event; one that fits no budget warns and keeps the stages."""
    from tf_woodfisher.pruning import pruner as pruner_module

    monkeypatch.setattr(pruner_module, "TRANSIENT_MARGIN", 40.0)  # activations that outweigh the MLPNet's rows
    config = tfw.WoodFisherConfig(num_gradients=64, fisher_batch_size=8, damping=1e-3, max_memory="8GB")
    pruner = _mlpnet_pruner(mlpnet_npz, fisher_data, config)
    assert pruner.plan.shape.transient_bytes == 0
    pruner.prune_to(0.5)
    (x_spec, y_spec), = [(tf.TensorSpec([64, 8, 784]), tf.TensorSpec([64, 8], fisher_data.element_spec[1].dtype))]
    transient = int(40.0 * pruner._gradient_fns[(0, 3)].transient_bytes(x_spec, y_spec))
    shape = dataclasses.replace(event_shape(config, MLPNET), transient_bytes=transient)
    assert transient > 10 ** 6 and pruner.plan == plan_memory(shape, "8GB")

    # a budget the plan without the chunk fits in one pass, and with it only in stages
    budget = plan_memory(shape, "8GB").peak_bytes - 1
    assert not plan_memory(event_shape(config, MLPNET), budget).streamed and plan_memory(shape, budget).streamed
    pruner = _mlpnet_pruner(mlpnet_npz, fisher_data, config.replace(max_memory=budget))
    with pytest.warns(RuntimeWarning, match="this event runs as planned before"):
        pruner.prune_to(0.5)
    assert not pruner.plan.streamed
    pruner.prune_to(0.7)
    assert pruner.plan.streamed and pruner.plan == plan_memory(shape, budget)
    assert pruner.sparsity() == pytest.approx(0.7, abs=1e-3)

    # no plan fits: the event keeps its stages, the estimate names the chunk
    pruner = _mlpnet_pruner(mlpnet_npz, fisher_data, config.replace(max_memory=memory.leanest_bytes(
        event_shape(config, MLPNET))))
    with pytest.warns(RuntimeWarning, match=r"a Fisher gradient chunk of 64 × 8 samples allocates about .* beyond"):
        pruner.prune_to(0.5)
    assert pruner.plan.streamed and pruner.plan.shape.transient_bytes == max(  # the largest of the stages' functions
        int(40.0 * fn.transient_bytes(x_spec, y_spec)) for fn in pruner._gradient_fns.values())
