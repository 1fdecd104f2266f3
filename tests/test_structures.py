"""tfmot's sparsity structures (blocks, N:M) with OBS group scores: against NumPy OBS, tfmot's own masks, model.fit,
tfmot's pruning_policy, bad input, and the TFLite export of structured models."""
import itertools
import warnings

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_woodfisher as tfw
import tensorflow as tf
import tf_keras as keras
from tf_woodfisher.export import TFLiteVerificationError, export_tflite
from tf_woodfisher.fisher import BlockPartition, InverseFisher
from tf_woodfisher.pruning.scores import FisherStatistics
from tf_woodfisher.pruning.structures import (EXHAUSTIVE_MAX_GROUP, Structure, TargetGroups, check_method,
                                              group_layout, group_loss_increase)

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
sparsity_api = tfmot.sparsity.keras
PruneLowMagnitude = tfw.compat.tfmot_pruning_classes()[0]


# ----------------------------------------------------------------------------------------------- NumPy references

def reference_groups(shape, structure):
    """The groups of a weight as lists of flat (row-major) positions, straight from tfmot's definitions:
    blocks of the 2-D kernel; N:M: consecutive entries of the rows of tfmot's weights_rearrange view."""
    index = np.arange(int(np.prod(shape))).reshape(shape)
    if structure.m_by_n is not None:
        size = structure.m_by_n[1]
        view = index.T if len(shape) == 2 else index.transpose(3, 0, 1, 2).reshape(-1, shape[2])
        return [row[j:j + size] for row in view for j in range(0, view.shape[1], size)]
    r, c = structure.block_size
    return [index[i:i + r, j:j + c].ravel() for i in range(0, shape[0], r) for j in range(0, shape[1], c)]


def offset_groups(shapes, structure):
    groups, start = [], 0
    for shape in shapes:
        groups += [g + start for g in reference_groups(shape, structure)]
        start += int(np.prod(shape))
    return groups


def dense_fisher(g, blocks, damping):
    """Block-diagonal F = λI + GᵀG/m and its inverse (float64), blocks: lists of flat positions."""
    g = g.astype(np.float64)
    d = g.shape[1]
    fisher, inverse = np.zeros((d, d)), np.zeros((d, d))
    for idx in blocks:
        block = damping * np.eye(len(idx)) + g[:, idx].T @ g[:, idx] / len(g)
        fisher[np.ix_(idx, idx)] = block
        inverse[np.ix_(idx, idx)] = np.linalg.inv(block)
    return fisher, inverse


def rho(w, inverse, q):
    """½ w_Qᵀ [(F⁻¹)_QQ]⁻¹ w_Q."""
    q = np.asarray(q)
    return 0.5 * w[q] @ np.linalg.solve(inverse[np.ix_(q, q)], w[q]) if q.size else 0.0


def obs_update(w, inverse, removed_sets, offset=0.0):
    """w − F⁻¹ Σ_Q E_Q[(F⁻¹)_QQ]⁻¹(w − r)_Q − r (r = offset)."""
    shifted, u = w - offset, np.zeros_like(w)
    for q in removed_sets:
        q = np.asarray(q)
        if q.size:
            u[q] += np.linalg.solve(inverse[np.ix_(q, q)], shifted[q])
    return w - inverse @ u - offset


def select_blocks(costs, sizes, wanted):
    """Groups removed: the lowest costs first, as many as bring the removed entries closest to ``wanted``."""
    order = np.argsort(costs, kind="stable")
    reached = np.concatenate([[0], np.cumsum(np.asarray(sizes)[order])])
    return order[:int(np.argmin(np.abs(reached - wanted)))]


def random_problem(shapes, m=40, seed=0):
    rng = np.random.default_rng(seed)
    d = sum(int(np.prod(s)) for s in shapes)
    g = (rng.normal(size=(m, d)) * rng.lognormal(0, 0.5, size=(1, d))).astype(np.float32)
    return rng.normal(size=d).astype(np.float32), g


def core_setup(shapes, structure, method, fisher_block_size, damping=1e-2, seed=0):
    w, g = random_problem(shapes, seed=seed)
    groups = TargetGroups(structure, shapes, [f"w{i}" for i in range(len(shapes))], method)
    partition = BlockPartition.from_segments([int(np.prod(s)) for s in shapes], fisher_block_size,
                                             groups=groups.group_ids(0, len(shapes)))
    inverse = InverseFisher.from_gradients(g, partition, damping, tf.float64)
    mean = g.mean(axis=0)
    stats = FisherStatistics(inverse=inverse, mean_gradient=tf.constant(mean) if method == "woodtaylor" else None)
    blocks = [idx for group in partition.groups for idx in group.indices]
    fisher, dense_inverse = dense_fisher(g, blocks, damping)
    return w, groups, stats, fisher, dense_inverse, mean


# ----------------------------------------------------------------------------------------------- layouts, alignment

@pytest.mark.parametrize("shape, structure", [
    ((8, 6), Structure(block_size=(2, 3))), ((7, 5), Structure(block_size=(3, 2))),
    ((5, 9), Structure(block_size=(1, 4))), ((10, 3), Structure(m_by_n=(2, 4))),
    ((3, 3, 6, 5), Structure(m_by_n=(2, 4))), ((12, 5), Structure(m_by_n=(3, 10)))])
def test_layout_groups_are_tfmots_and_fisher_blocks_hold_them_whole(shape, structure):
    layout = group_layout(shape, structure)
    ours = sorted(tuple(sorted(row[row >= 0])) for row in layout.members)
    assert ours == sorted(tuple(sorted(g)) for g in reference_groups(shape, structure))
    for number, row in enumerate(layout.members):
        assert np.all(layout.group_of[row[row >= 0]] == number)
    for block_size in (1, 5, 12, None, "model"):
        partition = BlockPartition.from_segments([layout.group_of.size], block_size, groups=[layout.group_of])
        block_of = np.empty(partition.dim, int)
        for group in partition.groups:
            for number, idx in enumerate(group.indices):
                block_of[idx] = id(group) * 1000 + number
        assert sorted(np.concatenate([g.indices.ravel() for g in partition.groups])) == list(range(partition.dim))
        for row in layout.members:
            assert len(set(block_of[row[row >= 0]])) == 1  # every group inside one Fisher block
        if isinstance(block_size, int):
            width = layout.members.shape[1]
            assert partition.max_block_size <= max(block_size, width)


def test_submatrices_of_both_forms_match_the_dense_inverse():
    shapes, structure = [(8, 6), (6, 4)], Structure(block_size=(2, 3))
    w, g = random_problem(shapes)
    groups = TargetGroups(structure, shapes, ["a", "b"], "woodfisher")
    members = groups.stage(0, 2).members
    for form, block in (("explicit", 12), ("lowrank", "model")):
        partition = BlockPartition.from_segments([48, 24], block, groups=groups.group_ids(0, 2))
        inverse = InverseFisher.from_gradients(g[:8] if form == "lowrank" else g, partition, 1e-2, tf.float64,
                                               form=form)
        _, dense = dense_fisher(g[:8] if form == "lowrank" else g,
                                [i for grp in partition.groups for i in grp.indices], 1e-2)
        sub = inverse.submatrices(members).numpy()
        for row, matrix in zip(members, sub):  # padding (−1) may sit inside a row: an edge block's missing columns
            where = np.flatnonzero(row >= 0)
            expected = np.eye(len(row))
            expected[np.ix_(where, where)] = dense[np.ix_(row[where], row[where])]
            np.testing.assert_allclose(matrix, expected, rtol=1e-8, atol=1e-9)
    unaligned = InverseFisher.from_gradients(g, BlockPartition.from_segments([48, 24], 5), 1e-2)
    with pytest.raises(ValueError, match="lies in several Fisher blocks"):
        unaligned.submatrices(members)


# ----------------------------------------------------------------------------------------------- OBS group scores

@pytest.mark.parametrize("method", ["woodfisher", "woodtaylor"])
def test_block_scores_selection_and_joint_update_match_numpy_obs(method):
    shapes, structure = [(8, 6), (6, 4)], Structure(block_size=(2, 3))  # 6 × 4 has 2-entry edge blocks
    w, groups, stats, fisher, inverse, mean = core_setup(shapes, structure, method, 12)
    r = inverse @ mean if method == "woodtaylor" else np.zeros_like(w, np.float64)
    reference = offset_groups(shapes, structure)
    stage = groups.stage(0, 2)
    position = {tuple(sorted(q)): i for i, q in enumerate(reference)}
    order = [position[tuple(sorted(row[row >= 0]))] for row in stage.members]  # our group i is reference[order[i]]
    expected = np.array([rho(w - r, inverse, reference[i]) for i in order])
    scores = groups.scores(method, w, np.ones_like(w), stats, (0, 2), 0.5).numpy()
    np.testing.assert_allclose(scores * stage.counts, expected, rtol=1e-5)
    # One global selection by loss per removed weight: exactly NumPy's mask.
    mask = groups.select(scores, np.ones_like(w), [48, 24], 0.5, "global")
    removed = [reference[order[i]] for i in select_blocks(expected / stage.counts, stage.counts, 36)]
    expected_mask = np.ones_like(w)
    expected_mask[np.concatenate(removed)] = 0
    np.testing.assert_array_equal(mask, expected_mask)
    # The update: the sum over the removed blocks of their joint OBS updates (oBERT's; the mask zeroes them).
    updated = groups.updated_weights(method, w, tf.constant(mask == 0), stats, (0, 2)).numpy()
    np.testing.assert_allclose(updated, obs_update(w.astype(np.float64), inverse, removed, r), rtol=1e-4, atol=1e-4)
    # For a single group, its update ends exactly at zero on Q, and the quadratic model of the loss change is its score.
    for q in removed[:3]:
        alone = np.zeros_like(w, bool)
        alone[q] = True
        delta = groups.updated_weights(method, w, tf.constant(alone), stats, (0, 2)).numpy() - w
        np.testing.assert_allclose((w + delta)[q], 0.0, atol=1e-5)
        change = 0.5 * delta @ fisher @ delta
        if method == "woodtaylor":  # L(w + δ) − L(w) = ḡᵀδ + ½δᵀFδ = ρ_Q − ½ḡᵀF⁻¹ḡ
            change += mean @ delta + 0.5 * mean @ inverse @ mean
        members = np.full((1, stage.members.shape[1]), -1)
        members[0, :len(q)] = q
        predicted = group_loss_increase(method, w, stats, members).numpy()[0]
        np.testing.assert_allclose(change, predicted, rtol=1e-4)
        np.testing.assert_allclose(predicted, rho(w - r, inverse, q), rtol=1e-5)


def n_m_reference(w, inverse, groups, mask, m_by_n, r, greedy):
    """NumPy choice of the removed set of every m-group: the already pruned entries, then the exhaustive (or
    greedy) search for the smallest ρ; a short group of q < m entries loses n − (m − q) of them (tfmot's padding)."""
    (zeros, size), removed = m_by_n, []
    for q in groups:
        forced = [int(i) for i in q if mask[i] == 0]
        count = max(len(forced), zeros - (size - q.size))
        if greedy:
            chosen = list(forced)
            while len(chosen) < count:
                chosen.append(min((int(i) for i in q if int(i) not in chosen),
                                  key=lambda i: rho(w - r, inverse, chosen + [i])))
        else:
            candidates = [list(c) for c in itertools.combinations([int(i) for i in q], count) if set(forced) <= set(c)]
            chosen = min(candidates, key=lambda c: rho(w - r, inverse, c)) if count else []
        removed.append(chosen)
    return removed


@pytest.mark.parametrize("method, m_by_n, shapes", [
    ("woodfisher", (2, 4), [(10, 3), (2, 2, 6, 3)]),    # short groups of 2 (tfmot keeps both)
    ("woodtaylor", (2, 4), [(8, 4)]),
    ("woodfisher", (3, 6), [(6, 4)]),                    # C(6, 3) = 20 subsets
    ("woodfisher", (4, 10), [(12, 3)]),                  # m > 8: greedy; short groups of 2
])
def test_n_m_choice_matches_exhaustive_or_greedy_numpy_obs(method, m_by_n, shapes):
    structure = Structure(m_by_n=m_by_n)
    w, groups, stats, _, inverse, mean = core_setup(shapes, structure, method, None)
    r = inverse @ mean if method == "woodtaylor" else np.zeros_like(w, np.float64)
    mask = np.ones_like(w)
    mask[[1, 7]] = 0  # already pruned entries stay pruned and count among the zeros
    w[mask == 0] = 0
    reference = offset_groups(shapes, structure)
    removed = n_m_reference(w, inverse, reference, mask, m_by_n, r, greedy=m_by_n[1] > EXHAUSTIVE_MAX_GROUP)
    keep = groups.scores(method, w, mask, stats, (0, len(shapes)), m_by_n[0] / m_by_n[1])
    new_mask = groups.select(keep, mask, [w.size], m_by_n[0] / m_by_n[1], "global")
    expected = np.ones_like(w)
    expected[[i for q in removed for i in q]] = 0
    np.testing.assert_array_equal(new_mask, expected)
    zeros, size = m_by_n
    for q in reference:  # tfmot's meaning: n zeros per m-group; a short group of r keeps min(r, m − n)
        assert np.sum(new_mask[q] == 0) == max(zeros - (size - q.size), int(np.sum(mask[q] == 0)))
    updated = groups.updated_weights(method, w, tf.constant(new_mask == 0), stats, (0, len(shapes))).numpy()
    np.testing.assert_allclose(updated, obs_update(w.astype(np.float64), inverse, removed, r), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- one_shot_prune

def small_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(4)])


def small_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return x, (x[:, 0] + x[:, 1] > 0).astype(np.int64) + 2 * (x[:, 2] > 0)


def per_sample_gradients(model, x, y):
    """(n, d) kernel gradients of each sample's loss, one GradientTape per sample (the plain loop)."""
    kernels = [layer.kernel for layer in model.layers]
    rows = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = LOSS(y[i:i + 1], model(x[i:i + 1], training=False))
        rows.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, kernels)]))
    return np.stack(rows)


@pytest.mark.slow
@pytest.mark.parametrize("method, structure, fisher_block_size", [
    ("woodfisher", dict(block_size=(2, 2)), "model"),
    ("woodtaylor", dict(sparsity_m_by_n=(2, 4)), None),
])
def test_one_shot_prune_equals_numpy_obs_on_a_small_model(method, structure, fisher_block_size):
    model, (x, y) = small_model(), small_data()
    w = np.concatenate([layer.kernel.numpy().ravel() for layer in model.layers]).astype(np.float64)
    g = per_sample_gradients(model, x[:32], y[:32])
    shapes = [(6, 8), (8, 4)]
    report = tfw.one_shot_prune(model, tf.data.Dataset.from_tensor_slices((x, y)), LOSS, 0.5, method=method,
                                num_gradients=32, shuffle_buffer=0, damping=1e-2, fisher_block_size=fisher_block_size,
                                verbose=0, **structure)
    fisher_blocks = [np.arange(80)] if fisher_block_size == "model" else [np.arange(48), np.arange(48, 80)]
    _, inverse = dense_fisher(g, fisher_blocks, 1e-2)
    r = inverse @ g.mean(0) if method == "woodtaylor" else 0.0
    parsed = Structure(block_size=structure.get("block_size", (1, 1)), m_by_n=structure.get("sparsity_m_by_n"))
    groups = offset_groups(shapes, parsed)
    if parsed.m_by_n is None:
        costs = [rho(w - r, inverse, q) / q.size for q in groups]
        removed = [groups[i] for i in select_blocks(costs, [q.size for q in groups], 40)]
    else:
        removed = n_m_reference(w, inverse, groups, np.ones_like(w), (2, 4), r, greedy=False)
    expected = obs_update(w, inverse, removed, r)
    expected[np.concatenate([np.asarray(q, int) for q in removed])] = 0
    pruned = np.concatenate([layer.kernel.numpy().ravel() for layer in model.layers])
    np.testing.assert_array_equal(pruned == 0, expected == 0)
    np.testing.assert_allclose(pruned, expected, rtol=2e-3, atol=2e-4)
    assert report.sparsity == pytest.approx(sum(len(q) for q in removed) / 80)
    assert report.sparsity == pytest.approx(0.5 if parsed.m_by_n is None else 32 / 80)  # 6 inputs: groups of 4 and 2


def conv_mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((6, 6, 6)), keras.layers.Conv2D(5, 3, name="conv"), keras.layers.Flatten(),
                             keras.layers.Dense(10, name="fc1"), keras.layers.Dense(3, name="fc2")])


def copy_of(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def tfmot_masks(model, schedule, **structure):
    """The masks tfmot's own prune_low_magnitude sets at its first training step (SGD with lr 0)."""
    wrapped = sparsity_api.prune_low_magnitude(copy_of(model), schedule, **structure)
    wrapped.compile(keras.optimizers.SGD(0.0), LOSS)
    x = np.zeros((4,) + tuple(model.input_shape[1:]), np.float32)
    wrapped.fit(x, np.zeros(4, np.int64), batch_size=4, epochs=1, verbose=0,
                callbacks=[sparsity_api.UpdatePruningStep()])
    return [mask.numpy() for layer in wrapped.layers if isinstance(layer, PruneLowMagnitude)
            for _, mask, _ in layer.pruning_vars]


@pytest.mark.slow
def test_magnitude_n_m_masks_are_tfmots_own():
    model = conv_mlp()  # kernels (3, 3, 6, 5), (80, 10) and (10, 3): 6 and 10 inputs end in short groups
    expected = tfmot_masks(model, sparsity_api.ConstantSparsity(0.5, 0, frequency=1), sparsity_m_by_n=(2, 4))
    ours = copy_of(model)
    report = tfw.one_shot_prune(ours, None, None, 0.5, method="magnitude", sparsity_m_by_n=(2, 4), verbose=0)
    kernels = [layer.kernel.numpy() for layer in ours.layers if hasattr(layer, "kernel")]
    for mask, kernel in zip(expected, kernels):
        np.testing.assert_array_equal(kernel != 0, mask == 1)
    assert [layer.zeros for layer in report.layers] == [int((m == 0).sum()) for m in expected]


@pytest.mark.slow
@pytest.mark.parametrize("pooling", ["AVG", "MAX"])
@pytest.mark.parametrize("block_size", [(1, 4), (2, 2)])
def test_layerwise_magnitude_block_masks_are_tfmots_own(pooling, block_size):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(12), keras.layers.Dense(8)])
    expected = tfmot_masks(model, sparsity_api.ConstantSparsity(0.5, 0, frequency=1), block_size=block_size,
                           block_pooling_type=pooling)
    ours = copy_of(model)
    tfw.one_shot_prune(ours, None, None, 0.5, method="magnitude", mode="layerwise", block_size=block_size,
                       block_pooling_type=pooling, verbose=0)
    for mask, layer in zip(expected, ours.layers):
        np.testing.assert_array_equal(layer.kernel.numpy() != 0, mask == 1)


def block_constant(kernel, block_size):
    """Whether every (r, c) block of the 2-D ``kernel`` (edges included) is all zero or all nonzero."""
    r, c = block_size
    return all(len(set((kernel[i:i + r, j:j + c] == 0).ravel())) == 1
               for i in range(0, kernel.shape[0], r) for j in range(0, kernel.shape[1], c))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "diagonal_fisher", "woodfisher", "woodtaylor"])
@pytest.mark.parametrize("mode", ["global", "layerwise"])
def test_block_masks_are_constant_on_blocks_and_n_m_exact_for_every_method(method, mode):
    model, (x, y) = small_model(seed=3), small_data(seed=3)
    data = tf.data.Dataset.from_tensor_slices((x, y))
    settings = dict(method=method, mode=mode, num_gradients=32, damping=1e-2, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # AVG pooling, nothing to warn about
        report = tfw.one_shot_prune(model, data, LOSS, 0.6, block_size=(3, 2), **settings)
    for layer in model.layers:
        assert block_constant(layer.kernel.numpy(), (3, 2))
    assert report.sparsity == pytest.approx(0.6, abs=6 / 80)
    model = conv_mlp(seed=3)
    images = tf.data.Dataset.from_tensor_slices((np.random.default_rng(0).normal(size=(32, 6, 6, 6)).astype(np.float32),
                                                 np.arange(32) % 3))
    tfw.one_shot_prune(model, images, LOSS, 0.5, sparsity_m_by_n=(2, 4), **dict(settings, num_gradients=16))
    for layer in model.layers:
        if hasattr(layer, "kernel"):
            kernel = layer.kernel.numpy()
            for q in reference_groups(kernel.shape, Structure(m_by_n=(2, 4))):
                assert np.sum(kernel.ravel()[q] == 0) == max(0, len(q) - 2)


@pytest.mark.slow
def test_multi_step_n_m_reaches_the_pattern_and_keeps_earlier_zeros():
    model, (x, y) = small_model(seed=2), small_data(seed=2)
    data = tf.data.Dataset.from_tensor_slices((x, y))
    report = tfw.one_shot_prune(model, data, LOSS, 0.5, sparsity_m_by_n=(2, 4), steps=2, num_gradients=32,
                                damping=1e-2, verbose=0)
    assert report.stats.recomputations == 2
    for layer in model.layers:
        kernel = layer.kernel.numpy()
        for q in reference_groups(kernel.shape, Structure(m_by_n=(2, 4))):
            assert np.sum(kernel.ravel()[q] == 0) == max(0, len(q) - 2)  # a short group of 2 keeps both


# ----------------------------------------------------------------------------------------------- model.fit

@pytest.mark.slow
def test_prune_woodfisher_fit_keeps_the_n_m_and_block_patterns():
    x, y = small_data(256, seed=4)
    data = tf.data.Dataset.from_tensor_slices((x, y))
    # N:M: as in tfmot, one event at step 1 whatever the schedule, and the pattern survives training.
    pruned = tfw.prune_woodfisher(small_model(4), sparsity_api.PolynomialDecay(0.0, 0.8, 0, 20, frequency=5),
                                  sparsity_m_by_n=(2, 4), num_gradients=32, damping=1e-2)
    pruned.compile(keras.optimizers.Adam(1e-2), LOSS)
    callback = tfw.UpdatePruningStep(data, LOSS)
    with pytest.warns(RuntimeWarning, match=r"sparsity_m_by_n=\(2, 4\): as in tfmot, the masks are set once"):
        pruned.fit(x, y, batch_size=32, epochs=3, callbacks=[callback], verbose=0)
    assert [event["step"] for event in callback.events] == [1]
    for layer in sparsity_api.strip_pruning(pruned).layers:
        kernel = layer.kernel.numpy()
        assert all(np.sum(kernel.ravel()[q] == 0) == max(0, len(q) - 2)
                   for q in reference_groups(kernel.shape, Structure(m_by_n=(2, 4))))
    # Blocks: a gradual ramp of events, each keeping the earlier blocks; the final masks are whole blocks.
    pruned = tfw.prune_woodfisher(small_model(5), tfw.GradualSchedule(0.0, 0.75, 2, 18, frequency=4),
                                  block_size=(1, 4), num_gradients=32, damping=1e-2)
    pruned.compile(keras.optimizers.Adam(1e-2), LOSS)
    callback = tfw.UpdatePruningStep(data, LOSS)
    pruned.fit(x, y, batch_size=32, epochs=3, callbacks=[callback], verbose=0)
    assert [event["step"] for event in callback.events] == [2, 6, 10, 14, 18]
    stripped = sparsity_api.strip_pruning(pruned)
    kernels = [layer.kernel.numpy() for layer in stripped.layers]
    assert all(block_constant(k, (1, 4)) for k in kernels)
    assert np.mean(np.concatenate([k.ravel() for k in kernels]) == 0) == pytest.approx(0.75)  # 15 of 20 blocks


# ----------------------------------------------------------------------------------------------- pruning_policy

def xnnpack_model():
    """A model PruneForLatencyOnXNNPack accepts: 3x3/2 conv after ZeroPadding2D, 1x1 convs, global pooling."""
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.ZeroPadding2D(((1, 1), (1, 1)))(inputs)
    h = keras.layers.Conv2D(8, 3, strides=2, padding="valid", name="stem")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(8, 1, name="pointwise1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(8, 1, name="pointwise2")(h)
    h = keras.layers.GlobalAveragePooling2D(keepdims=True)(h)
    outputs = keras.layers.Flatten()(keras.layers.Conv2D(3, 1, name="head")(h))
    return keras.Model(inputs, outputs)


def test_pruning_policy_accepts_and_refuses_what_tfmot_does():
    policy = sparsity_api.PruneForLatencyOnXNNPack()
    model = xnnpack_model()
    theirs = sparsity_api.prune_low_magnitude(model, pruning_policy=policy)
    ours = tfw.prune_woodfisher(model, pruning_policy=policy, method="magnitude")
    wrapped = lambda m, kind: sorted(layer.layer.name for layer in m.layers if isinstance(layer, kind))  # noqa: E731
    assert wrapped(ours, tfw.PruneWoodFisher) == wrapped(theirs, PruneLowMagnitude) == \
        ["head", "pointwise1", "pointwise2"]
    # One-shot: the same layers, after the policy accepted the model.
    report = tfw.one_shot_prune(model, None, None, 0.5, method="magnitude", pruning_policy=policy, verbose=0)
    assert [layer.name for layer in report.layers] == ["pointwise1/kernel", "pointwise2/kernel", "head/kernel"]
    assert np.all(model.get_layer("stem").kernel.numpy() != 0)
    # A model tfmot refuses is refused, naming the policy and tfmot's reason.
    mlp = small_model()
    with pytest.raises(ValueError, match="Could not find `Conv2D 3x3`"):
        sparsity_api.prune_low_magnitude(mlp, pruning_policy=policy)
    for entry in (lambda: tfw.prune_woodfisher(mlp, pruning_policy=policy),
                  lambda: tfw.one_shot_prune(mlp, None, None, 0.5, method="magnitude", pruning_policy=policy)):
        with pytest.raises(ValueError, match=r"pruning_policy=PruneForLatencyOnXNNPack\(\) rejects model .*"
                                             r"Could not find `Conv2D 3x3`"):
            entry()
    with pytest.raises(TypeError, match="pruning_policy must be a tfmot.sparsity.keras.PruningPolicy"):
        tfw.prune_woodfisher(mlp, pruning_policy="xnnpack")
    # tfmot ignores a policy for a layer or a list: we do too, and say so.
    with pytest.warns(RuntimeWarning, match="is not used for a single layer"):
        tfw.prune_woodfisher(keras.layers.Dense(3), pruning_policy=policy)


# ----------------------------------------------------------------------------------------------- bad input

def test_bad_structures_are_refused_with_their_reason():
    model, (x, y) = conv_mlp(), (np.zeros((8, 6, 6, 6), np.float32), np.zeros(8, np.int64))
    data = tf.data.Dataset.from_tensor_slices((x, y))
    with pytest.raises(ValueError, match=r"block_size=\(1, 4\) prunes r × c blocks of 2-D weights only .*"
                                         r"'conv/kernel' has shape \(3, 3, 6, 5\)"):
        tfw.one_shot_prune(model, data, LOSS, 0.5, block_size=(1, 4), num_gradients=8, verbose=0)
    tfw.one_shot_prune(model, data, LOSS, 0.5, block_size=(1, 4), method="magnitude", layers=["fc1", "fc2"],
                       verbose=0)  # the fix the message suggests
    with pytest.raises(ValueError, match=r"block_size=\(4, 1\) prunes r × c blocks of 2-D weights .*'conv/kernel'"):
        tfw.prune_woodfisher(conv_mlp(), block_size=(4, 1))  # at wrapping time, not at the first batch
    conv1d = keras.Sequential([keras.Input((10, 4)), keras.layers.Conv1D(4, 3, name="c1d")])
    with pytest.raises(ValueError, match=r"sparsity_m_by_n=\(2, 4\) needs 2-D .* or 4-D .*'c1d/kernel' has shape"):
        tfw.one_shot_prune(conv1d, None, None, 0.5, method="magnitude", sparsity_m_by_n=(2, 4), verbose=0)
    for bad, message in (((4, 4), r"\(n, m\) with 0 < n < m"), ((3, 2), r"\(n, m\) with 0 < n < m"),
                         ((0, 4), "a pair of ints ≥ 1"), ((2, -4), "a pair of ints ≥ 1")):
        with pytest.raises(ValueError, match=f"sparsity_m_by_n must be {message}"):
            tfw.one_shot_prune(small_model(), None, None, 0.5, method="magnitude", sparsity_m_by_n=bad)
        with pytest.raises(ValueError, match=f"sparsity_m_by_n must be {message}"):
            tfw.prune_woodfisher(small_model(), sparsity_m_by_n=bad)
    with pytest.raises(ValueError, match="block_size must be a pair of ints ≥ 1"):
        tfw.prune_woodfisher(small_model(), block_size=(0, 4))
    with pytest.raises(ValueError, match=r"fixes the sparsity at 0.5: the target sparsity must be 0.5, got 0.9"):
        tfw.one_shot_prune(small_model(), None, None, 0.9, method="magnitude", sparsity_m_by_n=(2, 4), verbose=0)
    with pytest.raises(ValueError, match=r"were both given"):
        tfw.one_shot_prune(small_model(), None, None, 0.5, block_size=(1, 4), sparsity_m_by_n=(2, 4))
    with pytest.raises(ValueError, match=r"method 'obc' cannot score groups of weights, so it cannot prune with "
                                         r"sparsity_m_by_n=\(2, 4\)"):
        check_method("obc", Structure(m_by_n=(2, 4)))
    with pytest.raises(ValueError, match="cannot score groups"):
        TargetGroups(Structure(block_size=(1, 4)), [(4, 4)], ["w"], "sequential")
    with pytest.warns(RuntimeWarning, match="block_pooling_type='MAX' is not used: method 'woodfisher' scores a block"):
        TargetGroups(Structure(block_size=(1, 4), pooling="MAX"), [(4, 4)], ["w"], "woodfisher")


# ----------------------------------------------------------------------------------------------- export

@pytest.fixture(scope="module")
def mlp64(mnist_flat):
    """784 → 64 → 10, one epoch on the 5k training subset: every Dense input a multiple of 16."""
    (x, y), _ = mnist_flat
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(64, activation="relu", name="fc1"),
                              keras.layers.Dense(10, name="fc2")])
    model.compile("adam", LOSS)
    model.fit(x[:5000], y[:5000], batch_size=64, epochs=1, verbose=0)
    return model


@pytest.mark.parametrize("structure", [dict(sparsity_m_by_n=(2, 4)), dict(block_size=(16, 1)),
                                       dict(block_size=(1, 16))])
def test_structured_models_export_verified_float(structure, mlpnet_npz, mnist_flat, tmp_path):
    (x, y), (xt, _) = mnist_flat
    model = tfw.models.mlpnet(mlpnet_npz)
    target = 0.5 if "sparsity_m_by_n" in structure else 0.8
    tfw.one_shot_prune(model, tf.data.Dataset.from_tensor_slices((x, y)), LOSS, target, num_gradients=64,
                       damping=1e-4, verbose=0, **structure)
    result = export_tflite(model, tmp_path / "structured.tflite", check_inputs=xt[:2000])
    assert result.argmax_agreement >= 0.99 and result.bytes == (tmp_path / "structured.tflite").stat().st_size
    assert result.bytes < result.dense_bytes * (0.8 if target == 0.5 else 0.45)


def test_int8_block_route_of_the_export_message_works_end_to_end(mlp64, mlpnet_npz, mnist_flat, tmp_path):
    (x, y), (xt, _) = mnist_flat
    data = tf.data.Dataset.from_tensor_slices((x, y))
    # The route: Dense kernels pruned in blocks of block_size=(16, 1) by tfw, full int8: sparse, verified.
    model = copy_of(mlp64)
    tfw.one_shot_prune(model, data, LOSS, 0.8, block_size=(16, 1), num_gradients=64, damping=1e-4, verbose=0)
    result = export_tflite(model, tmp_path / "int8.tflite", quantization="int8", representative_dataset=x[:500],
                           check_inputs=xt[:2000])
    assert result.argmax_agreement >= 0.97 and result.size_ratio <= 0.5
    # MLPNet's fc2 and fc3 have 40 and 20 inputs: int8 block-sparse kernels of such sizes give wrong outputs even
    # on TFLite's builtin kernels; the error names them, and the route (only fc1 in blocks) works.
    mlpnet = tfw.models.mlpnet(mlpnet_npz)
    tfw.one_shot_prune(mlpnet, data, LOSS, 0.8, block_size=(16, 1), method="magnitude", mode="layerwise", verbose=0)
    with pytest.raises(TFLiteVerificationError, match=r"'fc2' \(40 inputs.*'fc3' \(20 inputs.*layers=\['fc1'\]"):
        export_tflite(mlpnet, tmp_path / "bad.tflite", quantization="int8", representative_dataset=x[:500],
                      check_inputs=xt[:1000])
    mlpnet = tfw.models.mlpnet(mlpnet_npz)
    tfw.one_shot_prune(mlpnet, data, LOSS, 0.8, block_size=(16, 1), layers=["fc1"], num_gradients=64, damping=1e-4,
                       verbose=0)
    result = export_tflite(mlpnet, tmp_path / "fc1.tflite", quantization="int8", representative_dataset=x[:500],
                           check_inputs=xt[:2000])
    assert result.argmax_agreement >= 0.97 and result.size_ratio <= 0.5


DISTRIBUTED = '''
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import numpy as np
import tf_woodfisher as tfw
import tf_keras as keras
loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
x = np.random.default_rng(0).normal(size=(128, 12)).astype(np.float32)
data = tf.data.Dataset.from_tensor_slices((x, (x[:, 0] > 0).astype(np.int64)))
keras.utils.set_random_seed(0)
base = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(3)])
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
results = {}
for name, structure in (("n_m", dict(sparsity_m_by_n=(2, 4))), ("blocks", dict(block_size=(2, 4)))):
    for where in (None, strategy):
        model = keras.models.clone_model(base)
        model.set_weights(base.get_weights())
        report = tfw.one_shot_prune(model, data, loss, 0.5, num_gradients=32, damping=1e-2, fisher_block_size=8,
                                    strategy=where, verbose=0, **structure)
        key = f"{name}_{'mirrored' if where else 'single'}"
        results[key] = np.concatenate([layer.kernel.numpy().ravel() for layer in model.layers])
        results[key + "_bytes"] = report.gathered_bytes
np.savez(sys.argv[1], **results)
'''


@pytest.mark.slow
def test_structures_under_mirrored_strategy_match_one_device(tmp_path):
    """Group submatrices are computed replica by replica on their share of the Fisher blocks: same masks, weights."""
    import subprocess
    import sys

    script = tmp_path / "worker.py"
    script.write_text(DISTRIBUTED)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out.npz")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = np.load(tmp_path / "out.npz")
    for name in ("n_m", "blocks"):
        assert int(result[f"{name}_mirrored_bytes"]) > 0 == int(result[f"{name}_single_bytes"])
        single, mirrored = result[f"{name}_single"], result[f"{name}_mirrored"]
        np.testing.assert_array_equal(single == 0, mirrored == 0)
        np.testing.assert_allclose(mirrored, single, rtol=0, atol=1e-6)
