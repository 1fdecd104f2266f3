"""Sequential OBS, OBC and SparseGPT (tf_woodfisher.pruning.obs) against NumPy loops with explicit inverses."""
import heapq
import itertools

import numpy as np
import pytest

import tensorflow as tf
from tf_woodfisher.pruning import obs


# ----------------------------------------------------------------------------------------------- references

def greedy_obs_reference(inverse, w, count, n_m=None, removed=None):
    """Exact greedy OBS of one block, NumPy float64, explicit inverse and rank-1 downdates (``removed``: entries
    already out of the problem). Returns (weights, removed, losses per removal, order)."""
    inverse, w = inverse.astype(np.float64).copy(), w.astype(np.float64).copy()
    c = len(w)
    removed = np.zeros(c, bool) if removed is None else removed.copy()
    losses, order = [], []
    for _ in range(count):
        with np.errstate(divide="ignore", invalid="ignore"):
            score = w ** 2 / np.diag(inverse)
        score[removed] = np.inf
        if n_m is not None:
            n, m = n_m
            full = removed.reshape(-1, m).sum(axis=1) >= n
            score[np.repeat(full, m)] = np.inf
        q = int(np.argmin(score))
        losses.append(0.5 * w[q] ** 2 / inverse[q, q])
        order.append(q)
        w = w - inverse[:, q] * w[q] / inverse[q, q]
        w[q], removed[q] = 0.0, True
        inverse = inverse - np.outer(inverse[:, q], inverse[q, :]) / inverse[q, q]
    return w, removed, np.array(losses), order


def global_greedy_reference(inverses, weights, total):
    """Step-by-step global greedy over independent blocks with a heap: each step, the block whose next
    exact-OBS removal costs least removes it (NumPy, explicit inverses). Returns (weights, counts)."""
    blocks = [dict(inverse=inv.astype(np.float64).copy(), w=w.astype(np.float64).copy(),
                   removed=np.zeros(len(w), bool)) for inv, w in zip(inverses, weights)]

    def head(b):
        block = blocks[b]
        with np.errstate(divide="ignore", invalid="ignore"):
            score = block["w"] ** 2 / np.diag(block["inverse"])
        score[block["removed"]] = np.inf
        q = int(np.argmin(score))
        return 0.5 * score[q], b, q

    heap = [head(b) for b in range(len(blocks))]
    heapq.heapify(heap)
    counts = np.zeros(len(blocks), int)
    for _ in range(total):
        _, b, q = heapq.heappop(heap)
        block = blocks[b]
        inverse, w = block["inverse"], block["w"]
        w -= inverse[:, q] * w[q] / inverse[q, q]
        w[q] = 0.0
        block["removed"][q] = True
        block["inverse"] = inverse - np.outer(inverse[:, q], inverse[q, :]) / inverse[q, q]
        counts[b] += 1
        if not block["removed"].all():
            heapq.heappush(heap, head(b))
    return np.stack([b["w"] for b in blocks]), counts


def sparsegpt_reference(W, H, sparsity, n_m, block, damping):
    """A NumPy transcription of SparseGPT's fasterprune (IST-DASLab/sparsegpt), float64, with exact
    per-block counts (round(sparsity·rows·cumulative columns) differences)."""
    W = W.astype(np.float64).copy()
    H = H.astype(np.float64).copy()
    rows, cols = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damping * np.mean(np.diag(H)) * np.eye(cols)
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    pruned = np.zeros_like(W, bool)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].copy(), U[i1:i2, i1:i2]
        errors = np.zeros_like(W1)
        d = np.diag(U1)
        if n_m is None:
            count = int(round(sparsity * rows * i2)) - int(round(sparsity * rows * i1))
            score = (W1 ** 2 / d[None, :] ** 2).ravel()
            mask1 = np.zeros(score.size, bool)
            mask1[np.argsort(score, kind="stable")[:count]] = True
            mask1 = mask1.reshape(W1.shape) | (W1 == 0)
        else:
            mask1 = W1 == 0
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                score = W1[:, i:i + n_m[1]] ** 2 / d[None, i:i + n_m[1]] ** 2
                score[mask1[:, i:i + n_m[1]]] = -np.inf
                smallest = np.argsort(score, axis=1, kind="stable")[:, :n_m[0]]
                np.put_along_axis(mask1[:, i:i + n_m[1]], smallest, True, axis=1)
            w = W1[:, i]
            q = np.where(mask1[:, i], 0.0, w)
            err = (w - q) / d[i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            errors[:, i] = err
        W1[mask1] = 0
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= errors @ U[i1:i2, i2:]
    return W, pruned


def relu_layer_inputs(rng, cols, samples, hidden=16):
    """Correlated, non-negative inputs with some dead features, like a ReLU layer's: (cols, samples)."""
    mixing = rng.normal(size=(cols, hidden)) * rng.lognormal(0, 0.5, size=(cols, 1))
    x = np.maximum(mixing @ rng.normal(size=(hidden, samples)) + 0.3 * rng.normal(size=(cols, samples)), 0)
    x[rng.random(cols) < 0.1] = 0.0
    return x


def layer_problem(seed=0, rows=6, cols=32, samples=400):
    rng = np.random.default_rng(seed)
    X = relu_layer_inputs(rng, cols, samples)
    return rng.normal(size=(rows, cols)), 2 * X @ X.T / samples, X


def damped_numpy_inverse(H, damping):
    H = H.copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    return np.linalg.inv(H + damping * np.mean(np.diag(H)) * np.eye(len(H)))


# ----------------------------------------------------------------------------------------------- OBC

@pytest.mark.parametrize("n_m", [None, (2, 4), (1, 4)])
def test_obc_equals_bruteforce_greedy_obs(n_m):
    W, H, _ = layer_problem(0)
    H = H + 1e-3 * np.eye(32)  # no dead inputs (those are removed first whatever the pattern, see below)
    sparsity = None if n_m else 0.7
    result = obc_float64(W, H, sparsity, n_m)
    count = int(round(0.7 * 32)) if n_m is None else 32 // n_m[1] * n_m[0]
    inverse = damped_numpy_inverse(H, 0.01)
    for row in range(W.shape[0]):
        w, removed, losses, _ = greedy_obs_reference(inverse, W[row], count, n_m)
        np.testing.assert_allclose(result.weights.numpy()[row], w, atol=1e-10)
        np.testing.assert_array_equal(result.mask.numpy()[row] == 0, removed)
        np.testing.assert_allclose(result.losses[row, :count], losses, atol=1e-10)


def obc_float64(W, H, sparsity, n_m=None):
    return obs.obc_prune(W, H, sparsity=sparsity, n_m=n_m, damping=0.01, dtype=tf.float64)


def test_obc_losses_are_the_reconstruction_error():
    """Σ of a row's recorded losses = ½ δᵀ H_damped δ of its final update (exact OBS bookkeeping)."""
    W, H, _ = layer_problem(1)
    result = obc_float64(W, H, 0.6)
    Hd = np.linalg.inv(damped_numpy_inverse(H, 0.01))
    Wd = W.copy()
    Wd[:, np.diag(H) == 0] = 0
    delta = Wd - result.weights.numpy()
    np.testing.assert_allclose(result.losses.sum(axis=1), 0.5 * np.sum((delta @ Hd) * delta, axis=1), rtol=1e-8)


def test_obc_float32_and_row_batches_agree_with_float64():
    W, H, _ = layer_problem(2, rows=10, cols=48)
    exact = obc_float64(W, H, 0.8)
    batched = obs.obc_prune(W, H, sparsity=0.8, max_memory=3 * 48 * 48 * 4 * 3)  # 3 rows per batch, float32
    e64 = obs.reconstruction_error(W, exact.weights.numpy(), H)
    e32 = obs.reconstruction_error(W, batched.weights.numpy(), H)
    assert abs(e32 - e64) <= 1e-4 * e64
    np.testing.assert_array_equal(batched.mask.numpy(), exact.mask.numpy())


def test_obc_uniform_rows_and_existing_zeros_stay_pruned():
    W, H, _ = layer_problem(3, rows=5, cols=40)
    H = H + 1e-3 * np.eye(40)  # no dead inputs
    W[0, :30] = 0.0  # a row already sparser than the target keeps all its zeros
    result = obc_float64(W, H, 0.5)
    zeros = (result.weights.numpy() == 0).sum(axis=1)
    np.testing.assert_array_equal(zeros, [30, 20, 20, 20, 20])
    assert np.all(result.weights.numpy()[0, :30] == 0)
    np.testing.assert_array_equal(result.mask.numpy() == 0, result.weights.numpy() == 0)


# ----------------------------------------------------------------------------------------------- sequential OBS

def fisher_blocks(rng, blocks, c, m=60, damping=1e-2):
    grads = rng.normal(size=(blocks, m, c)) * rng.lognormal(0, 1, size=(blocks, 1, c))
    fisher = np.einsum("kmc,kmd->kcd", grads, grads) / m + damping * np.eye(c)
    return np.linalg.inv(fisher), rng.normal(size=(blocks, c))


def test_sequential_obs_per_block_counts_equal_bruteforce():
    rng = np.random.default_rng(4)
    inverses, w = fisher_blocks(rng, 5, 12)
    counts = np.array([0, 3, 7, 11, 12])
    result = obs.sequential_obs(tf.constant(inverses), w, counts)
    np.testing.assert_array_equal(result.counts, counts)
    for b in range(5):
        w_ref, removed, losses, order = greedy_obs_reference(inverses[b], w[b], counts[b])
        np.testing.assert_allclose(result.weights.numpy()[b], w_ref, atol=1e-10)
        np.testing.assert_array_equal(result.mask.numpy()[b] == 0, removed)
        np.testing.assert_allclose(result.losses[b, :counts[b]], losses, atol=1e-10)
        np.testing.assert_array_equal(result.order[b, :counts[b]], order)


@pytest.mark.parametrize("total", [1, 17, 40, 59])
def test_sequential_obs_global_target_equals_stepwise_global_greedy(total):
    rng = np.random.default_rng(5)
    inverses, w = fisher_blocks(rng, 6, 10)
    result = obs.sequential_obs(tf.constant(inverses), w, total_remove=total)
    w_ref, counts = global_greedy_reference(inverses, w, total)
    np.testing.assert_array_equal(result.counts, counts)
    assert result.counts.sum() == total
    np.testing.assert_allclose(result.weights.numpy(), w_ref, atol=1e-9)


def test_merge_by_heads_equals_a_heap_merge_of_nonmonotone_curves():
    rng = np.random.default_rng(6)
    losses = rng.exponential(size=(7, 9))  # not sorted: heads matter
    counts = rng.integers(3, 10, size=7)
    for total in (0, 5, 20, int(counts.sum())):
        heads = [(losses[b, 0], b) for b in range(7)]
        heapq.heapify(heads)
        taken = np.zeros(7, int)
        for _ in range(total):
            _, b = heapq.heappop(heads)
            taken[b] += 1
            if taken[b] < counts[b]:
                heapq.heappush(heads, (losses[b, taken[b]], b))
        np.testing.assert_array_equal(obs.merge_by_heads(losses, counts, total), taken)
    with pytest.raises(ValueError, match="only"):
        obs.merge_by_heads(losses, counts, int(counts.sum()) + 1)


def test_group_obs_update_equals_sequential_updates():
    rng = np.random.default_rng(7)
    inverses, w = fisher_blocks(rng, 4, 9)
    result = obs.sequential_obs(tf.constant(inverses), w, 5)
    joint = obs.group_obs_update(tf.constant(inverses), w, result.mask.numpy() == 0)
    np.testing.assert_allclose(joint.numpy(), result.weights.numpy(), atol=1e-10)


def test_sequential_obs_argument_errors():
    inverses, w = fisher_blocks(np.random.default_rng(8), 2, 4)
    with pytest.raises(ValueError, match="exactly one"):
        obs.sequential_obs(tf.constant(inverses), w)
    with pytest.raises(ValueError, match="num_remove"):
        obs.sequential_obs(tf.constant(inverses), w, 5)
    with pytest.raises(ValueError, match="multiple of m"):
        obs.sequential_obs(tf.constant(inverses), w, n_m=(1, 3))


# ----------------------------------------------------------------------------------------------- SparseGPT

@pytest.mark.parametrize("n_m,block", [pytest.param(None, 8, marks=pytest.mark.slow), (None, 64), ((2, 4), 8),
                                       ((1, 4), 12)])
def test_sparsegpt_equals_numpy_transcription_of_the_reference(n_m, block):
    W, H, _ = layer_problem(9, rows=7, cols=40)
    result = obs.sparsegpt_prune(W, H, sparsity=None if n_m else 0.6, n_m=n_m, block_size=block, damping=0.01,
                                 act_order=False, refine=0, dtype=tf.float64)
    w_ref, pruned = sparsegpt_reference(W, H, 0.6, n_m, min(block, 40), 0.01)
    np.testing.assert_array_equal(result.mask.numpy() == 0, pruned)
    np.testing.assert_allclose(result.weights.numpy(), w_ref, atol=1e-10)
    delta = np.where(np.diag(H) > 0, W, 0.0) - result.weights.numpy()  # inputs never active: out at no cost
    # the reported loss: ½δᵀHδ on the damped H, the sweep's Σ err²/2
    Hd = np.linalg.inv(damped_numpy_inverse(H, 0.01))
    np.testing.assert_allclose(result.losses[:, 0], 0.5 * np.sum((delta @ Hd) * delta, axis=1), rtol=1e-8)


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_sparsegpt_act_order_is_the_reference_sweep_of_the_permuted_layer(n_m):
    """act_order: columns by decreasing diag H; N:M: the pattern's groups by decreasing Σ diag H, each
    group's columns by decreasing diag H (the groups stay those of the pattern)."""
    W, H, _ = layer_problem(16, rows=7, cols=40)
    result = obs.sparsegpt_prune(W, H, sparsity=None if n_m else 0.6, n_m=n_m, block_size=8, act_order=True,
                                 refine=0, dtype=tf.float64)
    d = np.diag(H)
    if n_m is None:
        perm = np.argsort(-d, kind="stable")
    else:
        groups = np.argsort(-d.reshape(10, 4).sum(axis=1), kind="stable")
        perm = np.concatenate([g * 4 + np.argsort(-d[g * 4:g * 4 + 4], kind="stable") for g in groups])
    w_ref, pruned = sparsegpt_reference(W[:, perm], H[np.ix_(perm, perm)], 0.6, n_m, 8, 0.01)
    back = np.argsort(perm)
    np.testing.assert_array_equal(result.mask.numpy() == 0, pruned[:, back])
    np.testing.assert_allclose(result.weights.numpy(), w_ref[:, back], atol=1e-10)
    if n_m is not None:
        np.testing.assert_array_equal((result.mask.numpy() == 0).reshape(7, 10, 4).sum(axis=-1), 2)


@pytest.mark.parametrize("n_m", [pytest.param(None, marks=pytest.mark.slow), (2, 4)])
def test_sparsegpt_refine_reaches_the_joint_obs_update_of_its_mask(n_m):
    """refine: CG on the kept weights with the sweep's mask fixed converges to w − H⁻¹E_Q[(H⁻¹)_QQ]⁻¹w_Q per
    row (NumPy, explicit inverse), and never raises a row's loss; the mask is the sweep's."""
    W, H, _ = layer_problem(17, rows=6, cols=32)
    kwargs = dict(sparsity=None if n_m else 0.5, n_m=n_m, act_order=n_m is not None)
    sweep = obs.sparsegpt_prune(W, H, refine=0, dtype=tf.float64, **kwargs)
    refined = obs.sparsegpt_prune(W, H, refine=500, dtype=tf.float64, **kwargs)
    np.testing.assert_array_equal(refined.mask.numpy(), sweep.mask.numpy())
    inverse = damped_numpy_inverse(H, 0.01)
    for r in range(6):
        Q = np.flatnonzero(sweep.mask.numpy()[r] == 0)
        expected = W[r] - inverse[:, Q] @ np.linalg.solve(inverse[np.ix_(Q, Q)], W[r, Q])
        expected[Q] = 0.0
        np.testing.assert_allclose(refined.weights.numpy()[r], expected, rtol=1e-5, atol=1e-6)  # CG stops at 1e-6
    assert np.all(refined.losses <= sweep.losses + 1e-12)
    assert obs.reconstruction_error(W, refined.weights.numpy(), H) < obs.reconstruction_error(
        W, sweep.weights.numpy(), H)
    float32 = obs.sparsegpt_prune(W, H, **kwargs, refine=64)  # the default count, float32: close to exact
    assert obs.reconstruction_error(W, float32.weights.numpy(), H) < 1.01 * obs.reconstruction_error(
        W, refined.weights.numpy(), H)
    with pytest.raises(ValueError, match="refine must be an int"):
        obs.sparsegpt_prune(W, H, 0.5, refine=-1)


def test_sparsegpt_n_m_defaults_and_batched_problems():
    """With n_m the defaults are act_order=True, refine=SPARSEGPT_REFINE; (G, rows, cols) problems each get
    their own column order, as when pruned separately."""
    problems = [layer_problem(s, rows=5, cols=16, samples=200) for s in (18, 19)]
    W = np.stack([p[0] for p in problems])
    H = np.stack([p[1] for p in problems]) + 1e-3 * np.eye(16)
    default = obs.sparsegpt_prune(W[0], H[0], n_m=(2, 4), dtype=tf.float64)
    explicit = obs.sparsegpt_prune(W[0], H[0], n_m=(2, 4), act_order=True, refine=obs.SPARSEGPT_REFINE,
                                   dtype=tf.float64)
    np.testing.assert_array_equal(default.weights.numpy(), explicit.weights.numpy())
    together = obs.sparsegpt_prune(W, H, n_m=(2, 4), dtype=tf.float64).weights.numpy()
    for g in range(2):
        np.testing.assert_allclose(together[g], obs.sparsegpt_prune(W[g], H[g], n_m=(2, 4), dtype=tf.float64)
                                   .weights.numpy(), atol=1e-10)


# SparseGPT's reconstruction error is at most this multiple of OBC's (measured on these correlated ReLU-like
# inputs, seeds 10-12, blocks of 32 and 96 columns: 2.1-3.4× at 50% and 80%, 1.6-2.2× at 95%; magnitude: 3-44×).
SPARSEGPT_OBC_FACTOR = 4.0


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_sparsegpt_error_within_factor_of_obc_and_below_magnitude(sparsity):
    W, H, _ = layer_problem(10, rows=16, cols=96, samples=1000)
    e_obc = obs.reconstruction_error(W, obs.obc_prune(W, H, sparsity).weights.numpy(), H)
    e_sgpt = obs.reconstruction_error(W, obs.sparsegpt_prune(W, H, sparsity, block_size=32).weights.numpy(), H)
    e_mag = obs.reconstruction_error(W, W * obs.magnitude_prune(W, sparsity).numpy(), H)
    assert e_obc <= e_sgpt <= SPARSEGPT_OBC_FACTOR * e_obc
    assert e_sgpt < 0.7 * e_mag


@pytest.mark.parametrize("method", ["obc", "sparsegpt"])
@pytest.mark.parametrize("n_m", [(2, 4), (1, 4), (3, 8)])
def test_n_m_pattern_is_exact(method, n_m):
    W, H, _ = layer_problem(11, rows=8, cols=48)
    H = H + np.eye(48) * 1e-3  # no dead inputs: every group gets exactly n zeros
    prune = obs.obc_prune if method == "obc" else obs.sparsegpt_prune
    result = prune(W, H, n_m=n_m)
    zeros = (result.weights.numpy() == 0).reshape(8, -1, n_m[1]).sum(axis=-1)
    np.testing.assert_array_equal(zeros, n_m[0])
    e_mag = obs.reconstruction_error(W, W * obs.magnitude_prune(W, n_m=n_m).numpy(), H)
    assert obs.reconstruction_error(W, result.weights.numpy(), H) < e_mag


def test_sparsegpt_exact_count_and_existing_zeros():
    W, H, _ = layer_problem(12, rows=9, cols=50)
    H = H + np.eye(50) * 1e-3
    W[2, :40] = 0.0
    result = obs.sparsegpt_prune(W, H, 0.5, block_size=16)
    assert np.all(result.weights.numpy()[2, :40] == 0)
    assert (result.mask.numpy() == 0).sum() >= round(0.5 * 9 * 50)
    W[2, :40] = 1.0
    result = obs.sparsegpt_prune(W, H, 0.5, block_size=16)
    assert (result.mask.numpy() == 0).sum() == round(0.5 * 9 * 50)


def test_batched_problems_equal_separate_ones():
    """(G, rows, cols) with (G, cols, cols): depthwise channels, each with its own H."""
    problems = [layer_problem(s, rows=3, cols=9, samples=100) for s in (13, 14)]
    W = np.stack([p[0] for p in problems])
    H = np.stack([p[1] for p in problems]) + 1e-3 * np.eye(9)
    for prune in (obs.obc_prune, obs.sparsegpt_prune):
        together = prune(W, H, 0.5, dtype=tf.float64).weights.numpy()
        for g in range(2):
            np.testing.assert_allclose(together[g], prune(W[g], H[g], 0.5, dtype=tf.float64).weights.numpy(),
                                       atol=1e-10)


# ----------------------------------------------------------------------------------------------- damping, H

def test_too_few_samples_warns_naming_the_layer_and_zero_damping_raises():
    W, H, _ = layer_problem(15, rows=4, cols=40, samples=20)
    with pytest.warns(RuntimeWarning, match=r"dense_7: .*20 input rows for 40 inputs is singular"):
        obs.obc_prune(W, H, 0.5, name="dense_7", num_inputs=20)
    with pytest.raises(ValueError, match="dense_7: .*singular and damping is 0"):
        obs.sparsegpt_prune(W, H, 0.5, damping=0.0, name="dense_7", num_inputs=20)
    with pytest.raises(ValueError, match="conv_3: H .*not positive definite"):
        obs.obc_prune(W, H, 0.5, damping=0.0, name="conv_3")  # singular H, sample count not given
    with pytest.raises(ValueError, match="damping must be"):
        obs.obc_prune(W, H, 0.5, damping=-1.0)


def test_damping_is_a_fraction_of_mean_diagonal():
    _, H, _ = layer_problem(16, cols=12)
    H = H + np.eye(12) * 1e-2
    inverse, dead = obs.damped_inverse(H, 0.1, dtype=tf.float64)
    expected = np.linalg.inv(H + 0.1 * np.mean(np.diag(H)) * np.eye(12))
    np.testing.assert_allclose(inverse.numpy(), expected, rtol=1e-10)
    assert not dead.any()


def test_dead_inputs_are_pruned_first_for_free():
    W, H, _ = layer_problem(17, rows=3, cols=20)
    H[:5, :] = H[:, :5] = 0.0  # five inputs never active
    result = obc_float64(W, H, 0.25)
    assert np.all(result.weights.numpy()[:, :5] == 0)
    np.testing.assert_allclose(result.losses[:, :5], 0.0)


def test_reconstruction_error_is_relative_output_error():
    W, H, X = layer_problem(18, rows=4, cols=16)
    W_hat = W * (np.random.default_rng(0).random(W.shape) > 0.5)
    expected = np.sum((W @ X - W_hat @ X) ** 2) / np.sum((W @ X) ** 2)
    assert obs.reconstruction_error(W, W_hat, H) == pytest.approx(expected, rel=1e-10)


# ----------------------------------------------------------------------------------------------- allocation

def test_allocate_by_hull_is_optimal_on_convex_curves():
    rng = np.random.default_rng(19)
    curves = [np.concatenate([[0], np.cumsum(np.sort(rng.exponential(size=n)))]) for n in (5, 7, 4)]
    for total in range(0, 17):
        best = min((sum(c[k] for c, k in zip(curves, ks)), ks)
                   for ks in itertools.product(*(range(len(c)) for c in curves)) if sum(ks) == total)
        allocation = obs.allocate_by_hull(curves, total)
        assert allocation.sum() == total
        assert sum(c[k] for c, k in zip(curves, allocation)) == pytest.approx(best[0])
    grid = np.array([[0, 0.0], [10, 1.0], [20, 5.0]])
    # slopes 0.1, 0.4 and 0.2, 0.8: the first segment of each, the second one in part
    np.testing.assert_array_equal(obs.allocate_by_hull([grid, grid * [1, 2]], 15), [10, 5])
    np.testing.assert_array_equal(obs.allocate_by_hull([grid, grid * [1, 2]], 25), [15, 10])
    with pytest.raises(ValueError, match="at most 40"):
        obs.allocate_by_hull([grid, grid], 41)


# ----------------------------------------------------------------------------------------------- OBC rows merged

@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_obc_global_rows_equal_stepwise_global_greedy_over_rows(sparsity):
    W, H, _ = layer_problem(20, rows=5, cols=16)
    H = H + 1e-3 * np.eye(16)
    result = obs.obc_prune(W, H, sparsity, rows="global", dtype=tf.float64, max_memory=2 * 3 * 16 * 16 * 8)
    inverse = damped_numpy_inverse(H, 0.01)
    total = int(round(sparsity * 5 * 16))
    w_ref, counts = global_greedy_reference([inverse] * 5, W, total)
    np.testing.assert_array_equal((result.mask.numpy() == 0).sum(axis=1), counts)
    np.testing.assert_allclose(result.weights.numpy(), w_ref, atol=1e-9)
    assert len(set(counts)) > 1  # the rows do get different sparsities


def test_obc_loss_curve_is_the_loss_of_the_merged_pruning():
    W, H, _ = layer_problem(21, rows=4, cols=12)
    H = H + 1e-3 * np.eye(12)
    curve = obs.obc_loss_curve(W, H, dtype=tf.float64)
    assert curve.shape == (4 * 12 + 1,) and curve[0] == 0 and np.all(np.diff(curve) >= -1e-12)
    Hd = np.linalg.inv(damped_numpy_inverse(H, 0.01))
    for k in (5, 24, 40):
        pruned = obs.obc_prune(W, H, k / 48, rows="global", dtype=tf.float64).weights.numpy()
        delta = W - pruned
        assert curve[k] == pytest.approx(0.5 * np.sum((delta @ Hd) * delta), rel=1e-8)


def test_mask_entries_are_removed_first_with_their_update():
    W, H, _ = layer_problem(22, rows=3, cols=10)
    H = H + 1e-3 * np.eye(10)
    mask = np.ones_like(W)
    mask[:, [2, 7]] = 0  # already pruned in a tfmot mask, but the weight values are not zero
    result = obs.obc_prune(W, H, 0.5, mask=mask, dtype=tf.float64)
    inverse = damped_numpy_inverse(H, 0.01)
    for row in range(3):
        w, inv = W[row].copy(), inverse.copy()
        for q in (2, 7):  # the reference: remove the masked entries first, by exact OBS
            w -= inv[:, q] * w[q] / inv[q, q]
            w[q] = 0
            inv = inv - np.outer(inv[:, q], inv[q]) / inv[q, q]
        w_ref, _, _, _ = greedy_obs_reference(inv, w, 3, removed=np.isin(np.arange(10), [2, 7]))
        np.testing.assert_allclose(result.weights.numpy()[row], w_ref, atol=1e-9)
    sgpt = obs.sparsegpt_prune(W, H, 0.5, mask=mask)
    assert np.all(sgpt.mask.numpy()[:, [2, 7]] == 0) and np.all(sgpt.weights.numpy()[:, [2, 7]] == 0)


def test_compensated_weights_reconstruct_the_dense_outputs():
    rng = np.random.default_rng(23)
    W, _, X = layer_problem(23, rows=4, cols=20, samples=300)  # X: (cols, samples), the dense inputs
    # inputs after upstream pruning: rescaled features, plus noise
    X_pruned = rng.uniform(0.5, 1.5, size=(20, 1)) * X + 0.1 * rng.normal(size=X.shape) * (X > 0)
    n = X.shape[1]
    H, cross, H_dense = 2 * X_pruned @ X_pruned.T / n, 2 * X_pruned @ X.T / n, 2 * X @ X.T / n
    target = obs.compensated_weights(W, H, cross, damping=1e-10)
    least_squares = np.linalg.lstsq(X_pruned.T, X.T @ W.T, rcond=None)[0].T
    np.testing.assert_allclose(target, least_squares, rtol=1e-5, atol=1e-8)
    explicit = np.sum((W @ X - target @ X_pruned) ** 2) / np.sum((W @ X) ** 2)
    assert obs.reconstruction_error(W, target, H, cross, H_dense) == pytest.approx(explicit, rel=1e-8)
    corrected = obs.obc_prune(target, H, 0.5).weights.numpy()
    plain = obs.obc_prune(W, H, 0.5).weights.numpy()
    assert obs.reconstruction_error(W, corrected, H, cross, H_dense) < \
        0.8 * obs.reconstruction_error(W, plain, H, cross, H_dense)


# ----------------------------------------------------------------------------------------------- tfmot adapter

import tf_keras as keras  # noqa: E402  (tf_woodfisher, imported by conftest, set legacy Keras first)

import tf_woodfisher as tfw  # noqa: E402
from tf_woodfisher import compat  # noqa: E402
from tf_woodfisher.tfmot import layerwise  # noqa: E402

L = keras.layers


def single_layer_model(layer, input_shape, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input(input_shape), layer])
    for weight in model.weights:  # nonzero biases would hide nothing here, but keep outputs = x·W
        if "bias" in weight.name:
            weight.assign(tf.zeros_like(weight))
    return model


KERNEL_LAYERS = {
    "dense": (lambda: L.Dense(5, use_bias=False), (7,)),
    "dense_sequence": (lambda: L.Dense(5, use_bias=False), (3, 7)),
    "einsum": (lambda: L.EinsumDense("abc,cde->abde", output_shape=(3, 2, 4)), (3, 6)),
    "conv1d_causal": (lambda: L.Conv1D(4, 3, padding="causal", dilation_rate=2, use_bias=False), (10, 3)),
    "conv2d_same_strided": (lambda: L.Conv2D(4, 3, strides=2, padding="same", use_bias=False), (9, 9, 3)),
    "conv2d_dilated": (lambda: L.Conv2D(3, 2, dilation_rate=2, use_bias=False), (8, 8, 2)),
    "conv3d": (lambda: L.Conv3D(2, 2, strides=(1, 2, 1), use_bias=False), (4, 5, 4, 2)),
    "depthwise": (lambda: L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", use_bias=False), (6, 6, 3)),
    "separable2d": (lambda: L.SeparableConv2D(4, 3, depth_multiplier=2, use_bias=False), (7, 7, 3)),
    "separable1d": (lambda: L.SeparableConv1D(4, 3, padding="causal", use_bias=False), (9, 3)),
}


@pytest.mark.parametrize("kind", list(KERNEL_LAYERS))
def test_kernel_features_times_matrix_reproduce_the_layer(kind):
    """X (im2col etc.) @ Wᵀ of every kernel equals the layer's own output: the matrix views are right."""
    make, shape = KERNEL_LAYERS[kind]
    model = single_layer_model(make(), shape)
    layer = model.layers[-1]
    kernels = layerwise.find_kernels(tfw.find_prunable_weights(model), "obc", explicit=False)
    x = tf.random.stateless_normal((2,) + shape, seed=(1, 2))
    seen = []
    with compat.capture_call_inputs(layer, seen.append):
        output = model(x).numpy()
    for kernel in kernels:
        W = kernel.to_matrix(kernel.target.variable.numpy())
        np.testing.assert_allclose(kernel.from_matrix(W), kernel.target.variable.numpy())
        X = kernel.features(seen[0]).numpy()
        y = np.einsum("gnc,grc->ngr", X, W)  # (n, G, rows)
        if isinstance(kernel, layerwise._DepthwiseKernel):
            expected = layerwise._depthwise(layer, seen[0], layer.depthwise_kernel,
                                            tuple(layer.depthwise_kernel.shape)).numpy()
            np.testing.assert_allclose(y.reshape(expected.shape), expected, atol=1e-5)
        else:
            np.testing.assert_allclose(y.reshape(output.shape), output, atol=1e-5)


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((24,)), L.Dense(16, activation="relu", name="a"),
                             L.Dense(12, activation="relu", name="b"), L.Dense(4, name="c")])


def calibration(samples=300, seed=0):
    x = np.maximum(np.random.default_rng(seed).normal(size=(samples, 24)), 0).astype(np.float32)
    return x, tf.data.Dataset.from_tensor_slices((x, np.zeros(samples, np.int64)))


@pytest.mark.slow
def test_one_shot_obc_layerwise_equals_the_core_on_the_first_layer_and_ignores_labels():
    x, with_labels = calibration()
    model, twin, reference = mlp(), mlp(), mlp()
    report = tfw.one_shot_prune(model, with_labels, None, 0.5, method="obc", mode="layerwise", verbose=0,
                                reconstruction_target="inputs", calibration_samples=200)
    tfw.one_shot_prune(twin, tf.data.Dataset.from_tensor_slices(x), None, 0.5, method="obc",
                       mode="layerwise", verbose=0, reconstruction_target="inputs", calibration_samples=200)
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)  # labels ignored
    batched = mlp()
    tfw.one_shot_prune(batched, tf.data.Dataset.from_tensor_slices(x).batch(64), None, 0.5, method="obc",
                       mode="layerwise", verbose=0, reconstruction_target="inputs", calibration_samples=200)
    for a, b in zip(model.get_weights(), batched.get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)  # batched or not (200 samples of 64-sample batches)
    X = x[:200].astype(np.float64)
    H = 2 * X.T @ X / 200
    expected = obs.obc_prune(reference.layers[0].kernel.numpy().T, H, 0.5, rows="global").weights.numpy().T
    np.testing.assert_allclose(model.layers[0].kernel.numpy(), expected, atol=1e-5)
    assert [layer.sparsity for layer in report.layers] == [0.5, 0.5, 0.5]
    errors = report.as_dict()["reconstruction_errors"]
    assert set(errors) == {"a/kernel", "b/kernel", "c/kernel"} and all(0 < e < 1 for e in errors.values())
    assert report.stats.calibration_seconds > 0 and "rel. error" in str(report)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["obc", "sparsegpt"])
def test_one_shot_global_beats_magnitude_and_dense_target_beats_inputs_target(method):
    x, data = calibration(400)
    dense_out = mlp()(x).numpy()

    def output_error(**kwargs):
        model = mlp()
        report = tfw.one_shot_prune(model, data, None, 0.8, method=method, verbose=0, **kwargs)
        assert abs(report.sparsity - 0.8) < 1e-3
        return np.sum((model(x).numpy() - dense_out) ** 2) / np.sum(dense_out ** 2), report

    e_dense, report = output_error()
    e_inputs, _ = output_error(reconstruction_target="inputs")
    magnitude = mlp()
    tfw.one_shot_prune(magnitude, None, None, 0.8, method="magnitude", verbose=0)
    e_magnitude = np.sum((magnitude(x).numpy() - dense_out) ** 2) / np.sum(dense_out ** 2)
    assert e_dense < e_inputs < e_magnitude
    assert len({round(layer.sparsity, 2) for layer in report.layers}) > 1  # global: non-uniform per layer


def test_n_m_follows_tfmots_convention_also_for_short_groups():
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_utils

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 6)), L.Conv2D(8, 3, activation="relu", name="conv"),
                              L.Flatten(), L.Dense(5, name="out")])
    x = np.random.default_rng(0).normal(size=(64, 8, 8, 6)).astype(np.float32)
    tfw.one_shot_prune(model, tf.data.Dataset.from_tensor_slices(x), None, 0.5, method="sparsegpt",
                       sparsity_m_by_n=(2, 4), verbose=0)
    conv, dense = model.get_layer("conv").kernel, model.get_layer("out").kernel
    for kernel in (conv, dense):
        assert pruning_utils.is_pruned_m_by_n(kernel, (2, 4))
    # 6 input channels: groups of 4 and 2; tfmot keeps min(r, m − n) = 2 of a short group of 2 (no zeros)
    zeros = (conv.numpy() == 0).transpose(3, 0, 1, 2).reshape(-1, 6)
    np.testing.assert_array_equal(zeros[:, :4].sum(axis=1), 2)
    np.testing.assert_array_equal(zeros[:, 4:].sum(axis=1), 0)
    np.testing.assert_array_equal((dense.numpy() == 0).T.reshape(5, -1, 4).sum(axis=-1), 2)


@pytest.mark.slow
def test_layerwise_bad_input_is_named():
    _, data = calibration()
    with pytest.raises(ValueError, match="fixes the sparsity at 0.5"):
        tfw.one_shot_prune(mlp(), data, None, 0.7, method="obc", sparsity_m_by_n=(2, 4), verbose=0)
    depthwise = single_layer_model(L.DepthwiseConv2D(3), (6, 6, 4))
    images = tf.data.Dataset.from_tensor_slices(np.ones((8, 6, 6, 4), np.float32))
    with pytest.raises(ValueError, match=r"'depthwise_conv2d.*/depthwise_kernel' \(DepthwiseConv2D\)"):
        tfw.one_shot_prune(depthwise, images, None, 0.5, method="obc", sparsity_m_by_n=(2, 4), verbose=0)
    keras.utils.set_random_seed(0)
    tokens = keras.Sequential([keras.Input((5,), dtype="int32"), L.Embedding(20, 8, name="emb"), L.Flatten(),
                               L.Dense(3, name="head")])
    ids = tf.data.Dataset.from_tensor_slices(np.arange(50, dtype=np.int32).reshape(10, 5) % 20)
    with pytest.warns(RuntimeWarning, match=r"leaves dense .*emb/embeddings \(Embedding, 160 weights\)"):
        report = tfw.one_shot_prune(tokens, ids, None, 0.5, method="obc", verbose=0)
    assert [layer.name for layer in report.layers] == ["head/kernel"] and report.unpruned_weights >= 160
    with pytest.raises(ValueError, match=r"method 'sparsegpt' cannot prune 'emb/embeddings' \(Embedding\)"):
        tfw.one_shot_prune(tokens, ids, None, 0.5, method="sparsegpt", layers=["emb", "head"], verbose=0)
    with pytest.warns(RuntimeWarning, match=r"a/kernel: H = 2XXᵀ/n from 10 input rows for 24 inputs is singular"):
        tfw.one_shot_prune(mlp(), data, None, 0.5, method="obc", calibration_samples=10, verbose=0)
    with pytest.raises(ValueError, match=r"a/kernel: .*singular and damping is 0"):
        tfw.one_shot_prune(mlp(), data, None, 0.5, method="obc", calibration_samples=10, percdamp=0.0, verbose=0)
    with pytest.raises(ValueError, match="calibration dataset is empty"):
        tfw.one_shot_prune(mlp(), data.take(0), None, 0.5, method="obc", verbose=0)


def test_layerwise_config_rules():
    config = tfw.WoodFisherConfig(method="obc")
    assert not config.needs_gradients and not config.needs_inverse and config.calibration_samples == 512
    for bad, match in [(dict(steps=2), "steps must be 1"), (dict(block_size=(1, 4)), "block_size"),
                       (dict(percdamp=-0.1), "percdamp"), (dict(calibration_samples=0), "calibration_samples"),
                       (dict(reconstruction_target="outputs"), "reconstruction_target")]:
        with pytest.raises(ValueError, match=match):
            tfw.WoodFisherConfig(method="obc", **bad)
    with pytest.raises(ValueError, match="sequential=True .* int fisher_block_size"):
        tfw.WoodFisherConfig(method="woodfisher", sequential=True, fisher_block_size="model")
    with pytest.raises(ValueError, match="one_shot_prune"):
        from tf_woodfisher.pruning import Pruner, PruningProblem
        Pruner(PruningProblem(tfw.find_prunable_weights(mlp())), config)


@pytest.mark.slow
def test_tfmot_wrapped_model_gets_masks_and_multi_head_attention_is_pruned():
    import tensorflow_model_optimization as tfmot

    x, data = calibration()
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(mlp())
    tfw.one_shot_prune(wrapped, data, None, 0.6, method="obc", verbose=0)
    for layer in wrapped.layers:
        weight, mask, _ = layer.pruning_vars[0]
        np.testing.assert_array_equal(mask.numpy() == 0, weight.numpy() == 0)
        assert abs(np.mean(mask.numpy() == 0) - 0.6) < 0.2
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 8))
    attention = L.MultiHeadAttention(2, 4, name="mha")
    model = keras.Model(inputs, L.Dense(3, name="head")(attention(inputs, inputs)))
    seq = tf.data.Dataset.from_tensor_slices(np.random.default_rng(0).normal(size=(40, 6, 8)).astype(np.float32))
    report = tfw.one_shot_prune(model, seq, None, 0.5, method="sparsegpt", mode="layerwise", verbose=0)
    assert len(report.layers) == 5 and all(abs(layer.sparsity - 0.5) < 0.02 for layer in report.layers)


# ----------------------------------------------------------------------------------------------- sequential=True

@pytest.mark.parametrize("mode", ["global", "layerwise"])
def test_sequential_event_equals_bruteforce_greedy_on_the_fisher_blocks(mode):
    from tf_woodfisher.fisher import BlockPartition, InverseFisher

    rng = np.random.default_rng(24)
    segments, c, m, damping = [14, 9], 4, 30, 1e-2  # chunks of 4 (and the short last ones): 4,4,4,2 | 4,4,1
    gradients = (rng.normal(size=(m, 23)) * rng.lognormal(0, 1, size=(1, 23))).astype(np.float64)
    partition = BlockPartition.from_segments(segments, c)
    inverse = InverseFisher.from_gradients(tf.constant(gradients), partition, damping, dtype=tf.float64)
    values = rng.normal(size=23)
    mask = np.ones(23)
    mask[[3, 15]] = 0
    values[[3, 15]] = 0
    new_mask, new_values = obs.sequential_event([(0, inverse)], values, mask, segments, 0.5, mode)
    # reference: explicit inverse of each block, the step-by-step global greedy (heap) over them
    starts = [0, 4, 8, 12, 14, 18, 22]
    blocks = [np.arange(s, e) for s, e in zip(starts, starts[1:] + [23])]
    inverses = [np.linalg.inv(damping * np.eye(len(b)) + gradients[:, b].T @ gradients[:, b] / m) for b in blocks]
    expected_w, expected_mask = values.copy(), np.ones(23)
    groups = [range(7)] if mode == "global" else [range(4), range(4, 7)]
    for members in groups:
        total = round(0.5 * sum(len(blocks[i]) for i in members))
        # pruned zeros are removed first at no cost: the heap greedy picks them first too
        w_ref, _ = _padded_greedy(inverses, values, blocks, members, total)
        for i, w in zip(members, w_ref):
            expected_w[blocks[i]] = w
            expected_mask[blocks[i]] = (w != 0)
    np.testing.assert_array_equal(new_mask, expected_mask)
    np.testing.assert_allclose(new_values, expected_w, atol=1e-9)
    assert new_mask[3] == 0 and new_mask[15] == 0


def _padded_greedy(inverses, values, blocks, members, total):
    """global_greedy_reference over blocks of different sizes (each its own heap entry)."""
    import heapq as hq

    state = [dict(inv=inverses[i].copy(), w=values[blocks[i]].copy(), removed=np.zeros(len(blocks[i]), bool))
             for i in members]

    def head(b):
        with np.errstate(divide="ignore", invalid="ignore"):
            score = state[b]["w"] ** 2 / np.diag(state[b]["inv"])
        score[state[b]["removed"]] = np.inf
        q = int(np.argmin(score))
        return 0.5 * score[q], b, q

    heap = [head(b) for b in range(len(state))]
    hq.heapify(heap)
    for _ in range(total):
        _, b, q = hq.heappop(heap)
        inv, w = state[b]["inv"], state[b]["w"]
        w -= inv[:, q] * w[q] / inv[q, q]
        w[q] = 0.0
        state[b]["removed"][q] = True
        state[b]["inv"] = inv - np.outer(inv[:, q], inv[q]) / inv[q, q]
        if not state[b]["removed"].all():
            hq.heappush(heap, head(b))
    return [s["w"] for s in state], None


@pytest.mark.slow
def test_one_shot_sequential_woodfisher_runs_and_composes_with_steps():
    x, _ = calibration(200)
    labels = np.argmax(mlp(1)(x).numpy(), axis=1)
    data = tf.data.Dataset.from_tensor_slices((x, labels))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    results = {}
    for sequential in (False, True):
        model = mlp()
        report = tfw.one_shot_prune(model, data, loss, 0.7, method="woodfisher", fisher_block_size=8,
                                    num_gradients=64, damping=1e-3, sequential=sequential, steps=2, verbose=0)
        assert report.sparsity == pytest.approx(0.7, abs=1e-3)
        results[sequential] = np.concatenate([w.ravel() for w in model.get_weights()])
    assert not np.allclose(results[False], results[True])


@pytest.mark.slow
def test_layerwise_seed_is_not_silently_ignored():
    """obc/sparsegpt calibrate on the dataset's first inputs: a seed draws nothing, and says so."""
    _, data = calibration()
    first = mlp()
    tfw.one_shot_prune(first, data, None, 0.5, method="sparsegpt", verbose=0)
    seeded = mlp()
    with pytest.warns(RuntimeWarning, match=r"seed=3 is not used by method 'sparsegpt'.*shuffle the dataset"):
        tfw.one_shot_prune(seeded, data, None, 0.5, method="sparsegpt", seed=3, verbose=0)
    for a, b in zip(first.get_weights(), seeded.get_weights()):
        np.testing.assert_array_equal(a, b)
