"""Gradual pruning of Keras 3 models in model.fit without wrappers: masks, callback events, optimizer slots,
schedules, custom loops, and bad input."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_woodfisher.keras3 as tfw3
from tf_woodfisher.keras3.pruned import MaskConstraint

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture
def data(rng):
    x = rng.standard_normal((256, 12)).astype(np.float32)
    y = (x[:, :3].argmax(1) + (x[:, 3] > 1)).astype(np.int64) % 3
    return x, y


def mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((12,)), L.Dense(32, activation="relu", name="hidden"),
                             L.Dense(16, activation="relu", name="middle"), L.Dense(3, name="out")], name="mlp")


class MaskChecker(keras.callbacks.Callback):
    """After every batch: every masked entry is exactly zero; at every batch start after an event, the optimizer
    slots of masked entries are zero. Records the sparsity after each batch."""

    def __init__(self, pruned):
        super().__init__()
        self.pruned, self.sparsities, self.checked_slots = pruned, [], 0
        self.last_masks_step = -1

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.pruned.masks_step.numpy())
        if step != self.last_masks_step:  # the pruning callback (listed first) has just run an event
            self.last_masks_step = step
            optimizer = self.model.optimizer
            for target in self.pruned.pruning_targets():
                name = "_".join(["mlp", *target.name.split("/")])
                slots = [v for v in optimizer.variables if v.name.startswith(name + "_")]
                for slot in slots:
                    assert np.all(slot.numpy()[target.mask.numpy() == 0] == 0), slot.name
                self.checked_slots += len(slots)

    def on_train_batch_end(self, batch, logs=None):
        zeros = total = 0
        for target in self.pruned.pruning_targets():
            weight, mask = target.variable.numpy(), target.mask.numpy()
            assert np.all(weight[mask == 0] == 0), target.name
            zeros, total = zeros + int(np.sum(weight == 0)), total + weight.size
        self.sparsities.append(zeros / total)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [lambda: keras.optimizers.Adam(1e-2),
                                       lambda: keras.optimizers.SGD(0.05, momentum=0.9)], ids=["adam", "sgd"])
def test_masks_hold_after_every_step_and_events_follow_the_schedule(data, optimizer):
    x, y = data
    schedule = tfw3.GradualSchedule(0.0, 0.8, begin_step=2, end_step=8, frequency=2)
    pruned = tfw3.prune(mlp(), schedule, num_gradients=32, fisher_batch_size=2)
    pruned.compile(optimizer(), LOSS)
    callback = tfw3.PruningCallback(tf.data.Dataset.from_tensor_slices((x, y)), LOSS)
    checker = MaskChecker(pruned)
    before = {t.name: t.variable.numpy().copy() for t in pruned.pruning_targets()}
    history = pruned.fit(x, y, batch_size=32, epochs=2, callbacks=[callback, checker], verbose=0, shuffle=False)
    assert [e["step"] for e in callback.events] == [2, 4, 6, 8]
    expected = [float(schedule(step)[1]) for step in (2, 4, 6, 8)]
    assert [e["sparsity"] for e in callback.events] == pytest.approx(expected, abs=2e-3)
    assert checker.sparsities[-1] == pytest.approx(0.8, abs=2e-3)
    assert checker.checked_slots > 0
    assert int(pruned.pruning_step.numpy()) == 16 and int(pruned.masks_step.numpy()) == 8
    for target in pruned.pruning_targets():  # kept weights trained on
        kept = target.mask.numpy() == 1
        assert not np.allclose(target.variable.numpy()[kept], before[target.name][kept])
    assert history.history["woodfisher_sparsity"][-1] == pytest.approx(0.8, abs=2e-3)
    assert set(history.history) >= {"sparsity/hidden/kernel", "sparsity/out/kernel", "woodfisher_seconds"}


def test_custom_training_loop_keeps_zeros_through_the_constraints(data):
    x, y = data
    pruned = tfw3.prune(mlp(), tfw3.OneShotSchedule(0.7, step=1), method="magnitude")
    optimizer = keras.optimizers.Adam(1e-2)
    callback = tfw3.PruningCallback()
    callback.set_model(pruned)
    pruned.compile(optimizer, LOSS)
    callback.on_train_begin()

    @tf.function
    def step(xb, yb):
        with tf.GradientTape() as tape:
            loss = LOSS(yb, pruned(xb, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, pruned.trainable_variables), pruned.trainable_variables))

    for i in range(5):
        callback.on_train_batch_begin(i)
        step(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32])
        for target in pruned.pruning_targets():
            assert np.all(target.variable.numpy()[target.mask.numpy() == 0] == 0)
    assert callback.events[0]["sparsity"] == pytest.approx(0.7, abs=1e-3)


@pytest.mark.slow
def test_training_without_the_callback_is_refused_at_the_pruning_step(data):
    x, y = data
    pruned = tfw3.prune(mlp(), tfw3.OneShotSchedule(0.5, step=3), method="magnitude")
    pruned.compile(keras.optimizers.SGD(0.01), LOSS)
    with pytest.raises(ValueError, match=r"without tfw3.PruningCallback\(\).*Step: 3"):
        pruned.fit(x, y, batch_size=32, epochs=1, verbose=0)
    assert int(pruned.pruning_step.numpy()) == 2  # fit stops before step 3, the pruning step
    xla = tfw3.prune(mlp(), tfw3.OneShotSchedule(0.5, step=3), method="magnitude")
    xla.compile(keras.optimizers.SGD(0.01), LOSS, jit_compile=True)  # XLA drops graph assertions; fit still stops
    with pytest.raises(ValueError, match=r"without tfw3.PruningCallback\(\)"):
        xla.fit(x, y, batch_size=32, epochs=1, verbose=0)
    # A custom loop: the training call of step 3 itself fails (inference calls count no step).
    pruned(x[:4], training=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"without tfw3.PruningCallback\(\)"):
        pruned(x[:4], training=True)
    keep = tfw3.prune(mlp(), tfw3.KeepMasks())  # a schedule that never prunes trains without the callback
    keep.compile(keras.optimizers.SGD(0.01), LOSS)
    keep.fit(x, y, batch_size=32, epochs=1, verbose=0)


@pytest.mark.slow
def test_masks_from_zeros_keep_zeros_while_fine_tuning(data):
    x, y = data
    model = mlp()
    tfw3.one_shot_prune(model, None, None, 0.6, method="magnitude", verbose=0)
    zeros = [layer.kernel.numpy() == 0 for layer in model.layers]
    pruned = tfw3.masks_from_zeros(model)
    pruned.compile(keras.optimizers.Adam(1e-2), LOSS)
    pruned.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[tfw3.PruningCallback()])
    stripped = tfw3.strip(pruned)
    assert stripped is model
    for layer, zero in zip(model.layers, zeros):
        np.testing.assert_array_equal(layer.kernel.numpy() == 0, zero)


def test_strip_gives_the_plain_model_without_masks(data):
    x, y = data
    model = mlp()
    pruned = tfw3.prune(model, tfw3.OneShotSchedule(0.5), method="magnitude")
    pruned.compile(keras.optimizers.SGD(0.01), LOSS)
    pruned.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[tfw3.PruningCallback()])
    stripped = tfw3.strip(pruned)
    assert stripped is model and not any("mask" in w.path for w in stripped.weights)
    assert not any(isinstance(w.constraint, MaskConstraint) for w in stripped.weights)
    kernels = np.concatenate([layer.kernel.numpy().ravel() for layer in stripped.layers])
    assert np.mean(kernels == 0) == pytest.approx(0.5, abs=1e-3)
    assert tfw3.strip(stripped) is stripped
    again = tfw3.prune(stripped, tfw3.KeepMasks())  # stripped: masks may be attached again
    assert len(again.masks) == 3


def test_schedules_arithmetic_and_config_round_trip():
    constant = tfw3.ConstantSparsity(0.6, begin_step=4, end_step=20, frequency=4)
    assert [bool(constant(s)[0]) for s in range(0, 26, 2)] == [s in (4, 8, 12, 16, 20) for s in range(0, 26, 2)]
    assert float(constant(8)[1]) == pytest.approx(0.6)
    ramp = tfw3.GradualSchedule(0.1, 0.9, begin_step=10, end_step=50, frequency=10)
    for step in (0, 10, 20, 35, 50, 80):
        progress = min(1.0, max(0.0, (step - 10) / 40))
        assert float(ramp(step)[1]) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - progress) ** 3, abs=1e-6)
        assert bool(ramp(step)[0]) == (10 <= step <= 50 and step % 10 == 0)
    one = tfw3.OneShotSchedule(0.75, step=5)
    assert [bool(one(s)[0]) for s in (4, 5, 6)] == [False, True, False]
    for schedule in (constant, ramp, one, tfw3.KeepMasks(), tfw3.PolynomialDecay(0.0, 0.5, 0, 100, power=2)):
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
        assert type(clone) is type(schedule) and clone == schedule
    with pytest.raises(ValueError, match="use end_step=45"):
        tfw3.GradualSchedule(0.0, 0.9, begin_step=5, end_step=48, frequency=10)
    with pytest.raises(ValueError, match=r"final_sparsity must be a number in \[0, 1\)"):
        tfw3.PolynomialDecay(0.0, 1.0, 0, 10)
    with pytest.raises(ValueError, match="end_step cannot be -1"):
        tfw3.PolynomialDecay(0.0, 0.5, 0, -1)
    with pytest.raises(ValueError, match="step must be an int ≥ 1"):
        tfw3.OneShotSchedule(0.5, step=0)


def test_bad_input(data):
    x, y = data
    model = mlp()
    pruned = tfw3.prune(model, tfw3.KeepMasks())
    with pytest.raises(ValueError, match="already has WoodFisher masks attached"):
        tfw3.prune(pruned)
    with pytest.raises(ValueError, match="already has WoodFisher masks attached"):
        tfw3.prune(model)  # its weights are held by `pruned`
    with pytest.raises(TypeError, match="tfw3.PruningCallback"):
        tfw3.prune(mlp(), tfw3.KeepMasks(), fisher_dataset=tf.data.Dataset.range(3))
    with pytest.raises(TypeError, match="second argument is the pruning schedule"):
        tfw3.prune(mlp(), tf.data.Dataset.range(3))
    with pytest.raises(ValueError, match="must be a tf_woodfisher.keras3 schedule"):
        tfw3.prune(mlp(), lambda step: (True, 0.5))
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        tfw3.prune(mlp(), tfw3.KeepMasks(), nonsense=1)
    plain = mlp()
    plain.compile(keras.optimizers.SGD(0.01), LOSS)
    with pytest.raises(ValueError, match="needs a model made by tfw3.prune"):
        plain.fit(x, y, epochs=1, verbose=0, callbacks=[tfw3.PruningCallback()])
    woodfisher = tfw3.prune(mlp(), tfw3.OneShotSchedule(0.5))
    woodfisher.compile(keras.optimizers.SGD(0.01), LOSS)
    with pytest.raises(ValueError, match="needs fisher_dataset="):
        woodfisher.fit(x, y, epochs=1, verbose=0, callbacks=[tfw3.PruningCallback()])
    woodfisher.compile(keras.optimizers.SGD(0.01), LOSS, steps_per_execution=4)
    with pytest.raises(ValueError, match="steps_per_execution=1"):
        woodfisher.fit(x, y, epochs=1, verbose=0, callbacks=[tfw3.PruningCallback(tf.data.Dataset.from_tensor_slices(
            (x, y)))])
    with pytest.raises(TypeError, match="unexpected keyword argument 'nonsense'"):
        tfw3.PruningCallback(nonsense=1)
