"""tfw3.optimizers.GRDA (Keras 3): the rule against the same NumPy reference as the tf_keras optimizer, schedules,
sparse gradients, skipped steps, .keras state, MirroredStrategy, and bad input."""
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from grda_reference import reference_grda, regression_problem  # the NumPy rule shared with tests/test_grda.py
from tf_woodfisher.keras3.optimizers import GRDA

LR_SCHEDULE = dict(initial_learning_rate=0.2, decay_steps=10, decay_rate=0.7)


def make_lr(kind):
    return 0.1 if kind == "constant" else keras.optimizers.schedules.ExponentialDecay(**LR_SCHEDULE)


def lr_values(kind, steps):
    """γ_k for k = 1..steps as the optimizer sees them: float32 values of the constant or schedule(k − 1)."""
    if kind == "constant":
        return [float(np.float32(0.1))] * steps
    schedule = make_lr(kind)
    return [float(schedule(k)) for k in range(steps)]


def variables_of(init):
    return [keras.Variable(w, name=n) for w, n in zip(init, ["kernel", "bias", "extra"])]


@pytest.mark.parametrize("lr_kind,momentum", [pytest.param("constant", 0.0, marks=pytest.mark.slow),
                                              pytest.param("constant", 0.9, marks=pytest.mark.slow),
                                              pytest.param("schedule", 0.0, marks=pytest.mark.slow), ("schedule", 0.9)])
def test_matches_numpy_reference_over_100_steps(rng, lr_kind, momentum):
    init, grad_fn, loss_fn = regression_problem(rng)
    variables = variables_of(init)
    c, mu, steps = 0.2, 0.6, 100
    opt = GRDA(make_lr(lr_kind), c=c, mu=mu, momentum=momentum, exclude="bias")

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(*variables)
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))

    for _ in range(steps):
        step()
    ref_w, ref_a, ref_tau = reference_grda(init, grad_fn, lr_values(lr_kind, steps), c, mu, momentum,
                                           excluded=[False, True, False])
    assert int(opt.iterations.numpy()) == steps
    np.testing.assert_allclose(opt.threshold.numpy(), ref_tau, rtol=1e-6)
    for var, w in zip(variables, ref_w):
        np.testing.assert_allclose(var.numpy(), w, atol=1e-6, rtol=0)
    for acc, a in zip(opt._accumulators, ref_a):
        assert (acc is None) == (a is None)
        if acc is not None:
            np.testing.assert_allclose(acc.numpy(), a, atol=1e-6, rtol=0)
    zeros = np.count_nonzero(variables[0].numpy() == 0) + np.count_nonzero(variables[2].numpy() == 0)
    assert 0 < zeros < 12 + 5 and np.all(variables[1].numpy() != 0)


def test_threshold_closed_form_with_constant_lr():
    variables = [keras.Variable(np.ones((3, 3), np.float32) * i, name=f"v{i}") for i in range(5)]
    opt = GRDA(0.05, c=0.01, mu=0.55)
    for _ in range(7):
        opt.apply_gradients((tf.ones_like(v), v) for v in variables)
    np.testing.assert_allclose(opt.threshold.numpy(), 0.01 * np.float32(0.05) ** 1.05 * 7 ** 0.55, rtol=1e-6)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_indexed_slices_match_dense_gradients(rng, momentum):
    table = rng.standard_normal((8, 3)).astype(np.float32)
    ids = tf.constant([1, 3, 3, 6])
    target = tf.constant(rng.standard_normal((4, 3)).astype(np.float32))

    def run(densify):
        var = keras.Variable(table, name="embedding")
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
    untouched = [0, 2, 4, 5, 7]
    assert np.all(np.abs(sparse[untouched]) < np.abs(table[untouched]))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradient_skips_the_whole_step(rng, bad):
    init = [rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)]
    grads = [[rng.standard_normal(w.shape).astype(np.float32) for w in init] for _ in range(6)]
    bad_grads = [grads[0][0].copy(), grads[0][1]]
    bad_grads[0][2, 1] = bad

    def run(insert_bad):
        variables = [keras.Variable(w, name=n) for w, n in zip(init, ["kernel", "bias"])]
        opt = GRDA(0.1, c=0.1, mu=0.6, momentum=0.9, exclude="bias")
        for step, g in enumerate(grads):
            if insert_bad and step == 3:
                before = [v.numpy().copy() for v in list(opt.variables) + variables]
                opt.apply_gradients(zip([tf.constant(b) for b in bad_grads], variables))
                for u, v in zip(before, [v.numpy() for v in list(opt.variables) + variables]):
                    np.testing.assert_array_equal(u, v)
                assert int(opt.iterations.numpy()) == 3
            opt.apply_gradients(zip([tf.constant(b) for b in g], variables))
        return [v.numpy() for v in list(opt.variables) + variables]

    for u, v in zip(run(True), run(False)):
        np.testing.assert_allclose(u, v, atol=1e-7, rtol=0)


def small_model(initial=None):
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(16, activation="relu", name="fc1"),
                              keras.layers.Dense(3, name="fc2")])
    if initial is not None:
        model.set_weights(initial)
    return model


def compiled(model):
    lr = keras.optimizers.schedules.ExponentialDecay(0.2, decay_steps=5, decay_rate=0.8)
    model.compile(GRDA(lr, c=0.05, mu=0.6, momentum=0.5, exclude=["bias"]),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.slow
def test_keras_file_resume_equals_uninterrupted_and_c_zero_is_sgd(rng, tmp_path):
    x = rng.standard_normal((80, 10)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    initial = small_model().get_weights()
    fit = dict(batch_size=16, shuffle=False, verbose=0)
    straight = compiled(small_model(initial))
    straight.fit(x, y, epochs=2, **fit)
    first = compiled(small_model(initial))
    first.fit(x, y, epochs=1, **fit)
    first.save(tmp_path / "model.keras")
    resumed = keras.saving.load_model(tmp_path / "model.keras")
    assert isinstance(resumed.optimizer, GRDA) and resumed.optimizer.get_config()["exclude"] == ["bias"]
    resumed.fit(x, y, epochs=1, **fit)
    a, b = straight.optimizer, resumed.optimizer
    assert int(a.iterations.numpy()) == int(b.iterations.numpy()) == 10 and a.threshold.numpy() > 0
    for u, v in zip(a.variables, b.variables):
        np.testing.assert_allclose(v.numpy(), u.numpy(), atol=1e-6, rtol=0)
    for u, v in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_allclose(v, u, atol=1e-6, rtol=0)
    assert any(np.count_nonzero(w == 0) for w in straight.get_weights())

    grda, sgd = small_model(initial), small_model(initial)
    grda.compile(GRDA(0.1, c=0.0, mu=0.6), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    sgd.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    grda.fit(x, y, epochs=1, **fit)
    sgd.fit(x, y, epochs=1, **fit)
    for u, v in zip(grda.get_weights(), sgd.get_weights()):
        np.testing.assert_allclose(u, v, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_mirrored_strategy_matches_single_device(tmp_path):
    worker = pathlib.Path(__file__).parents[1] / "tests" / "_grda_distributed_worker.py"  # shared with tests/
    out = tmp_path / "result.npz"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, str(worker), str(out), "keras3"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["replicas"] == 2 and summary["zeros"] > 0
    assert summary["iterations"] == summary["expected_iterations"]
    with np.load(out) as arrays:
        single = [arrays[k] for k in sorted(arrays.files) if k.startswith("single_")]
        mirrored = [arrays[k] for k in sorted(arrays.files) if k.startswith("mirrored_")]
    assert len(single) == len(mirrored) > 0
    for s, m in zip(single, mirrored):
        np.testing.assert_allclose(m, s, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(c=-0.1), r"c must be finite and >= 0"),
    (dict(mu=0.0), r"mu must be finite and > 0"),
    (dict(mu="0.6"), r"mu must be a real number"),
    (dict(learning_rate=0.0), r"learning_rate must be finite and > 0"),
    (dict(momentum=1.0), r"momentum must be < 1"),
    (dict(exclude=["bias", 3]), r"exclude must hold variable-name regex strings"),
    (dict(exclude="(unclosed"), r"exclude pattern '\(unclosed' is not a valid regex"),
    (dict(weight_decay=1e-4), r"weight_decay is not supported"),
    (dict(use_ema=True), r"use_ema is not supported"),
    (dict(gradient_accumulation_steps=2), r"gradient_accumulation_steps is not supported"),
])
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match="GRDA: " + message):
        GRDA(**kwargs)


def test_config_round_trip():
    opt = GRDA(keras.optimizers.schedules.ExponentialDecay(**LR_SCHEDULE), c=0.02, mu=0.55, momentum=0.3,
               exclude=["bias", "batch_normalization"], clipnorm=1.0)
    config = GRDA.from_config(opt.get_config()).get_config()
    assert (config["c"], config["mu"], config["momentum"], config["clipnorm"]) == (0.02, 0.55, 0.3, 1.0)
    assert config["exclude"] == ["bias", "batch_normalization"]
    assert config["learning_rate"]["config"]["decay_rate"] == 0.7
    assert keras.optimizers.deserialize(keras.optimizers.serialize(opt)).get_config()["mu"] == 0.55
