"""gRDA optimizer: the update rule against NumPy, sparsity behaviour, save/restore, distribution, bad input."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tensorflow as tf
import tf_keras as keras
from tf_woodfisher.models import mlpnet
from tf_woodfisher.optimizers import GRDA

from grda_reference import reference_grda, regression_problem  # the NumPy rule, shared with tests_keras3

LR_SCHEDULE = dict(initial_learning_rate=0.2, decay_steps=10, decay_rate=0.7)


def make_lr(kind):
    if kind == "constant":
        return 0.1
    return keras.optimizers.schedules.ExponentialDecay(**LR_SCHEDULE)


def lr_values(kind, steps):
    """γ_k for k = 1..steps as the optimizer sees them: float32 values of the constant or schedule(k − 1)."""
    if kind == "constant":
        return [float(np.float32(0.1))] * steps
    schedule = make_lr(kind)
    return [float(schedule(k)) for k in range(steps)]


@pytest.mark.parametrize("lr_kind,momentum", [pytest.param("constant", 0.0, marks=pytest.mark.slow),
                                              pytest.param("constant", 0.9, marks=pytest.mark.slow),
                                              pytest.param("schedule", 0.0, marks=pytest.mark.slow), ("schedule", 0.9)])
def test_matches_numpy_reference(rng, lr_kind, momentum):
    init, grad_fn, loss_fn = regression_problem(rng)
    names = ["dense/kernel", "dense/bias", "extra/kernel"]
    variables = [tf.Variable(w, name=n) for w, n in zip(init, names)]
    c, mu, steps = 0.2, 0.6, 100
    opt = GRDA(make_lr(lr_kind), c=c, mu=mu, momentum=momentum, exclude="bias")
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = loss_fn(*variables)
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))

    ref_w, ref_a, ref_tau = reference_grda(init, grad_fn, lr_values(lr_kind, steps), c, mu, momentum,
                                           excluded=[False, True, False])
    assert opt.iterations.numpy() == steps
    np.testing.assert_allclose(opt.threshold.numpy(), ref_tau, rtol=1e-6)
    for var, w in zip(variables, ref_w):
        np.testing.assert_allclose(var.numpy(), w, atol=1e-6, rtol=0)
    for acc, a in zip(opt._accumulators, ref_a):
        assert (acc is None) == (a is None)
        if acc is not None:
            np.testing.assert_allclose(acc.numpy(), a, atol=1e-6, rtol=0)
    # The run must exercise the threshold: some kernel entries are zero and some are not; the bias is not thresholded.
    zeros = np.count_nonzero(variables[0].numpy() == 0) + np.count_nonzero(variables[2].numpy() == 0)
    assert 0 < zeros < 12 + 5
    assert np.all(variables[1].numpy() != 0)


def test_threshold_closed_form_with_constant_lr():
    """τ_k = c γ^{μ+½} k^μ is advanced once per step, however many variables there are."""
    variables = [tf.Variable(tf.ones((3, 3)) * i, name=f"v{i}") for i in range(5)]
    opt = GRDA(0.05, c=0.01, mu=0.55)
    for _ in range(7):
        opt.apply_gradients((tf.ones_like(v), v) for v in variables)
    np.testing.assert_allclose(opt.threshold.numpy(), 0.01 * np.float32(0.05) ** 1.05 * 7 ** 0.55, rtol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_indexed_slices_match_dense_gradients(rng, momentum):
    table = rng.standard_normal((8, 3)).astype(np.float32)
    ids = tf.constant([1, 3, 3, 6])  # repeated and missing rows
    target = tf.constant(rng.standard_normal((4, 3)).astype(np.float32))

    def run(densify):
        var = tf.Variable(table, name="embedding")
        opt = GRDA(0.3, c=0.05, mu=0.6, momentum=momentum)
        for _ in range(15):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum((tf.gather(var, ids) - target) ** 2)
            grad = tape.gradient(loss, var)
            assert isinstance(grad, tf.IndexedSlices)
            opt.apply_gradients([(tf.convert_to_tensor(grad) if densify else grad, var)])
        return var.numpy()

    sparse, dense = run(False), run(True)
    np.testing.assert_allclose(sparse, dense, atol=1e-6)
    # Rows 0, 2, 4, 5, 7 get no gradient but are still thresholded by the growing τ.
    untouched = [0, 2, 4, 5, 7]
    assert np.all(np.abs(sparse[untouched]) < np.abs(table[untouched]))


@pytest.mark.slow
def test_xla_compiled_step_matches_eager(rng):
    init, _, loss_fn = regression_problem(rng)
    schedule = make_lr("schedule")

    def run(jit):
        variables = [tf.Variable(w, name=n) for w, n in zip(init, ["k/kernel", "k/bias", "e/kernel"])]
        opt = GRDA(schedule, c=0.2, mu=0.6, momentum=0.5, exclude="bias", jit_compile=jit)
        opt.jit_compile = jit  # tf_keras turns per-variable XLA on only when a GPU is present; force it on CPU

        def step():
            with tf.GradientTape() as tape:
                loss = loss_fn(*variables)
            opt.apply_gradients(zip(tape.gradient(loss, variables), variables))

        step = tf.function(step, jit_compile=True) if jit else step
        for _ in range(20):
            step()
        return [v.numpy() for v in variables] + [opt.threshold.numpy()]

    for compiled, eager in zip(run(True), run(False)):
        np.testing.assert_allclose(compiled, eager, atol=1e-6, rtol=0)


def test_recovers_support_of_sparse_linear_regression(rng):
    n, d, s = 200, 40, 8
    x = rng.standard_normal((n, d))
    w_true = np.zeros(d)
    support = rng.choice(d, s, replace=False)
    w_true[support] = rng.choice([-1.0, 1.0], s) * rng.uniform(0.5, 2.0, s)
    y = x @ w_true + 0.1 * rng.standard_normal(n)
    w_init = rng.normal(0.0, 0.1, d)

    def fit(opt, steps=300):
        w = tf.Variable(w_init, name="w")

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                loss = 0.5 * tf.reduce_mean((tf.linalg.matvec(x, w) - y) ** 2)
            opt.apply_gradients([(tape.gradient(loss, w), w)])

        for _ in range(steps):
            step()
        return w.numpy()

    w = fit(GRDA(0.1, c=0.5, mu=0.51))
    np.testing.assert_array_equal(w == 0, w_true == 0)
    np.testing.assert_allclose(w[support], w_true[support], atol=0.1)
    assert np.count_nonzero(fit(keras.optimizers.SGD(0.1)) == 0) == 0  # least squares alone finds no zeros


def _train_mlpnet(optimizer, data, epochs, initial_weights):
    (x, y), _ = data
    model = mlpnet()
    model.set_weights(initial_weights)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:2000], y[:2000], batch_size=50, epochs=epochs, shuffle=False, verbose=0)
    return model


def test_larger_mu_gives_more_zeros_and_c_zero_is_sgd(mnist_flat):
    initial = mlpnet().get_weights()
    zeros = []
    for mu in (0.51, 0.6, 0.7):
        model = _train_mlpnet(GRDA(0.1, c=0.01, mu=mu), mnist_flat, 2, initial)
        zeros.append(sum(np.count_nonzero(w == 0) for w in model.get_weights()))
    total = sum(w.size for w in initial)
    assert 0 < zeros[0] < zeros[1] < zeros[2] < total, zeros

    grda = _train_mlpnet(GRDA(0.1, c=0.0, mu=0.6), mnist_flat, 1, initial).get_weights()
    sgd = _train_mlpnet(keras.optimizers.SGD(0.1), mnist_flat, 1, initial).get_weights()
    for a, b in zip(grda, sgd):
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=0)
    assert not np.allclose(grda[0], initial[0], atol=1e-3)


def _small_model(initial_weights=None):
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="relu", name="fc1"),
                              keras.layers.Dense(3, name="fc2")])
    if initial_weights is not None:
        model.set_weights(initial_weights)
    return model


def _compile(model):
    lr = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=5, decay_rate=0.8)
    model.compile(GRDA(lr, c=0.05, mu=0.6, momentum=0.5, exclude=["bias"]),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["keras", "h5", "checkpoint"])
def test_interrupted_and_resumed_run_equals_uninterrupted(rng, tmp_path, fmt):
    x = rng.standard_normal((80, 10)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    initial = _small_model().get_weights()
    fit = dict(batch_size=16, shuffle=False, verbose=0)

    straight = _compile(_small_model(initial))
    straight.fit(x, y, epochs=2, **fit)

    first = _compile(_small_model(initial))
    first.fit(x, y, epochs=1, **fit)
    if fmt == "checkpoint":
        path = tf.train.Checkpoint(model=first, optimizer=first.optimizer).save(str(tmp_path / "ckpt"))
        resumed = _compile(_small_model())
        tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(path).assert_existing_objects_matched()
    else:
        path = str(tmp_path / f"model.{fmt}")
        first.save(path)
        resumed = keras.models.load_model(path)
        assert isinstance(resumed.optimizer, GRDA) and resumed.optimizer.get_config()["exclude"] == ["bias"]
    resumed.fit(x, y, epochs=1, **fit)

    a, b = straight.optimizer, resumed.optimizer
    assert a.iterations.numpy() == b.iterations.numpy() == 10
    assert a.threshold.numpy() > 0
    np.testing.assert_allclose(b.threshold.numpy(), a.threshold.numpy(), rtol=1e-6)
    for u, v in zip(a.variables, b.variables):
        np.testing.assert_allclose(v.numpy(), u.numpy(), atol=1e-6, rtol=0)
    for u, v in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(v, u, atol=1e-6, rtol=0)
    assert any(np.count_nonzero(w == 0) for w in straight.get_weights())


@pytest.mark.slow
def test_mirrored_strategy_matches_single_device(tmp_path):
    worker = pathlib.Path(__file__).with_name("_grda_distributed_worker.py")
    out = tmp_path / "result.npz"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(worker), str(out)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["replicas"] == 2
    with np.load(out) as arrays:
        single = [arrays[k] for k in sorted(arrays.files) if k.startswith("single_")]
        mirrored = [arrays[k] for k in sorted(arrays.files) if k.startswith("mirrored_")]
    assert len(single) == len(mirrored) > 0
    for s, m in zip(single, mirrored):
        np.testing.assert_allclose(m, s, atol=1e-5, rtol=1e-5)
    assert summary["zeros"] > 0 and summary["iterations"] == summary["expected_iterations"]


def _opt_state(opt, variables):
    return [v.numpy().copy() for v in list(opt.variables) + list(variables)]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("sparse", [False, True])
def test_non_finite_gradient_skips_the_whole_step(rng, bad, sparse):
    init = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)]
    grads = [[rng.standard_normal(w.shape).astype(np.float32) for w in init] for _ in range(6)]
    bad_grads = [grads[0][0].copy(), grads[0][1]]
    bad_grads[0][2, 1] = bad

    def as_grad(g, i):
        if sparse and i == 0:  # rows 0, 2 of the kernel as IndexedSlices
            return tf.IndexedSlices(tf.constant(g[[0, 2]]), tf.constant([0, 2]), tf.constant(g.shape))
        return tf.constant(g)

    def run(insert_bad):
        variables = [tf.Variable(w, name=n) for w, n in zip(init, ["d/kernel", "d/bias"])]
        opt = GRDA(0.1, c=0.1, mu=0.6, momentum=0.9, exclude="bias")
        for step, g in enumerate(grads):
            if insert_bad and step == 3:
                before = _opt_state(opt, variables)
                opt.apply_gradients((as_grad(b, i), v) for i, (b, v) in enumerate(zip(bad_grads, variables)))
                for u, v in zip(before, _opt_state(opt, variables)):
                    np.testing.assert_array_equal(u, v)
                assert opt.iterations.numpy() == 3
            opt.apply_gradients((as_grad(b, i), v) for i, (b, v) in enumerate(zip(g, variables)))
        assert all(np.all(np.isfinite(s)) for s in _opt_state(opt, variables))
        return _opt_state(opt, variables)

    for u, v in zip(run(True), run(False)):
        np.testing.assert_allclose(u, v, atol=1e-7, rtol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(c=-0.1), r"c must be finite and >= 0"),
        (dict(c=float("nan")), r"c must be finite"),
        (dict(mu=0.0), r"mu must be finite and > 0"),
        (dict(mu=-0.5), r"mu must be finite and > 0"),
        (dict(mu=float("inf")), r"mu must be finite"),
        (dict(mu=float("nan")), r"mu must be finite"),
        (dict(mu="0.6"), r"mu must be a real number"),
        (dict(learning_rate=0.0), r"learning_rate must be finite and > 0"),
        (dict(learning_rate=-0.01), r"learning_rate must be finite and > 0"),
        (dict(learning_rate=float("inf")), r"learning_rate must be finite"),
        (dict(momentum=1.0), r"momentum must be < 1"),
        (dict(momentum=-0.1), r"momentum must be finite and >= 0"),
        (dict(exclude=["bias", 3]), r"exclude must hold variable-name regex strings"),
        (dict(exclude="(unclosed"), r"exclude pattern '\(unclosed' is not a valid regex"),
        (dict(weight_decay=1e-4), r"weight_decay is not supported"),
        (dict(use_ema=True), r"use_ema is not supported"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match="GRDA: " + message):
        GRDA(**kwargs)


def test_config_round_trip():
    schedule = keras.optimizers.schedules.ExponentialDecay(**LR_SCHEDULE)
    opt = GRDA(schedule, c=0.02, mu=0.55, momentum=0.3, exclude=["bias", "batch_normalization"])
    clone = GRDA.from_config(opt.get_config())
    config = clone.get_config()
    assert (config["c"], config["mu"], config["momentum"]) == (0.02, 0.55, 0.3)
    assert config["exclude"] == ["bias", "batch_normalization"]
    assert config["learning_rate"]["config"]["decay_rate"] == 0.7
    assert keras.optimizers.get(keras.optimizers.serialize(opt)).get_config()["mu"] == 0.55
