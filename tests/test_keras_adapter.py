"""prune_woodfisher in the tfmot workflow: wrapping, model.fit, schedules, logs, save/load, errors."""
import glob

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_woodfisher as tfw
import tensorflow as tf
import tf_keras as keras

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
sparsity_api = tfmot.sparsity.keras


@pytest.fixture(scope="module")
def data(mnist_flat):
    (x, y), (xt, yt) = mnist_flat
    return x[:1024], y[:1024], xt[:2000], yt[:2000]


@pytest.fixture(scope="module")
def fisher(data):
    x, y, _, _ = data
    return tf.data.Dataset.from_tensor_slices((x, y))


def mlp(bn=False):
    layers = [keras.Input((784,)), keras.layers.Dense(32, activation="relu", name="hidden")]
    if bn:
        layers.append(keras.layers.BatchNormalization(name="bn"))
    layers.append(keras.layers.Dense(10, name="out"))
    model = keras.Sequential(layers)
    return model


def trained_mlp(data, bn=False):
    x, y, _, _ = data
    keras.utils.set_random_seed(0)
    model = mlp(bn)
    model.compile(keras.optimizers.Adam(1e-3), LOSS)
    model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    return model


def kernel_sparsity(model):
    kernels = [w.numpy() for w in model.weights if "kernel" in w.name]
    return float(np.mean(np.concatenate([k.ravel() for k in kernels]) == 0))


def masks(model):
    return [m.numpy() for layer in model.submodules if isinstance(layer, tfw.PruneWoodFisher)
            for _, m, _ in layer.pruning_vars]


def data_set(data):
    x, y, _, _ = data
    return tf.data.Dataset.from_tensor_slices((x, y))


def fit_pruned(model, data, schedule, epochs=2, callbacks=(), **kwargs):
    x, y, _, _ = data
    pruned = tfw.prune_woodfisher(model, schedule, num_gradients=32, **kwargs)
    pruned.compile(keras.optimizers.Adam(1e-3), LOSS, ["accuracy"])
    callback = tfw.UpdatePruningStep(tf.data.Dataset.from_tensor_slices((x, y)), LOSS)
    history = pruned.fit(x, y, batch_size=64, epochs=epochs, callbacks=[callback, *callbacks], verbose=0)
    return pruned, callback, history


def test_wrappers_are_tfmot_wrappers_and_strip(data):
    model = trained_mlp(data)
    pruned, callback, history = fit_pruned(model, data, sparsity_api.ConstantSparsity(0.8, 0, frequency=10))
    wrappers = [layer for layer in pruned.layers if isinstance(layer, tfw.PruneWoodFisher)]
    assert wrappers and all(isinstance(w, sparsity_api.prune_low_magnitude(keras.layers.Dense(1)).__class__)
                            for w in wrappers)
    assert len(callback.events) == 3  # steps 10, 20, 30 of 32 (1024 samples / 64)
    stripped = sparsity_api.strip_pruning(pruned)
    assert not any(isinstance(layer, tfw.PruneWoodFisher) for layer in stripped.layers)
    assert kernel_sparsity(stripped) == pytest.approx(0.8, abs=1e-3)
    # Global mode: one threshold; the 25k-weight hidden layer takes more of the cut than the head.
    layers = callback.events[-1]["layers"]
    assert layers["hidden/kernel"] > 0.8 > layers["out/kernel"]
    assert history.history["woodfisher_sparsity"][-1] == pytest.approx(0.8, abs=1e-3)
    assert "sparsity/hidden/kernel" in history.history


def test_layer_and_list_wrapping_and_layerwise_mode(data, fisher):
    x, y, _, _ = data
    layer = tfw.prune_woodfisher(keras.layers.Dense(10, name="head"), sparsity_api.ConstantSparsity(0.5, 0))
    assert isinstance(layer, tfw.PruneWoodFisher) and layer.name == "prune_wood_fisher_head"  # tfmot's naming
    dense = keras.layers.Dense(16, activation="relu")
    wrapped = tfw.prune_woodfisher([keras.layers.InputLayer((784,)), dense, keras.layers.Dense(10)],
                                   tfw.OneShotSchedule(0.6, step=3), mode="layerwise", num_gradients=16)
    assert isinstance(wrapped[0], keras.layers.InputLayer) and wrapped[1].layer is dense
    model = keras.Sequential(wrapped)
    model.compile("adam", LOSS)
    model.fit(x[:256], y[:256], batch_size=64, epochs=1, callbacks=[tfw.UpdatePruningStep(fisher, LOSS)], verbose=0)
    for m in masks(model):
        assert 1 - m.mean() == pytest.approx(0.6, abs=1e-3)


def test_polynomial_decay_and_gradual_schedule_with_recomputation(data):
    schedule = sparsity_api.PolynomialDecay(0.2, 0.7, begin_step=0, end_step=30, frequency=10)
    pruned, callback, _ = fit_pruned(trained_mlp(data), data, schedule, epochs=2)  # 32 steps
    assert [e["step"] for e in callback.events] == [10, 20, 30]
    assert callback.events[-1]["sparsity"] == pytest.approx(0.7, abs=1e-3)
    gradual = tfw.GradualSchedule(0.0, 0.9, begin_step=0, end_step=20, frequency=10)
    pruned, callback, _ = fit_pruned(trained_mlp(data), data, gradual, epochs=2, fisher_block_size=500, steps=3)
    assert kernel_sparsity(sparsity_api.strip_pruning(pruned)) == pytest.approx(0.9, abs=1e-3)
    before = [m.copy() for m in masks(pruned)]
    assert [(e["step"], e["stats"].recomputations) for e in callback.events] == [(10, 3), (20, 3)]
    # Masks are monotone: training on does not revive pruned weights.
    x, y, _, _ = data
    pruned.fit(x, y, batch_size=64, epochs=1, callbacks=[tfw.UpdatePruningStep(data_set(data), LOSS)], verbose=0)
    for old, new in zip(before, masks(pruned)):
        assert np.all(new[old == 0] == 0)


def test_fisher_pass_keeps_step_and_batchnorm_and_resets_slots(data):
    x, y, _, _ = data
    model = trained_mlp(data, bn=True)
    pruned = tfw.prune_woodfisher(model, tfw.OneShotSchedule(0.7, step=5), num_gradients=32)
    pruned.compile(keras.optimizers.Adam(1e-3), LOSS)
    callback = tfw.UpdatePruningStep(tf.data.Dataset.from_tensor_slices((x, y)), LOSS)
    pruned.fit(x[:256], y[:256], batch_size=64, epochs=1, callbacks=[callback], verbose=0)  # steps 1..4
    bn = next(layer for layer in pruned.submodules if isinstance(layer, keras.layers.BatchNormalization))
    moving_mean = bn.moving_mean.numpy().copy()
    wrapper = next(layer for layer in pruned.layers if isinstance(layer, tfw.PruneWoodFisher) and layer.pruning_vars)
    step = int(wrapper.pruning_step.numpy())
    callback.prune(step + 1, 0.7)
    assert int(wrapper.pruning_step.numpy()) == step
    np.testing.assert_array_equal(bn.moving_mean.numpy(), moving_mean)
    kernel, mask, _ = wrapper.pruning_vars[0]
    slots = tfw.compat.optimizer_slots(pruned.optimizer, kernel)
    assert len(slots) == 2  # Adam m and v
    for slot in slots:
        assert np.all(slot.numpy()[mask.numpy() == 0] == 0)
        assert np.any(slot.numpy()[mask.numpy() == 1] != 0)


def test_woodfisher_beats_tfmot_magnitude_in_one_shot_fit(data):
    """The same one-shot schedule at 95% in model.fit: WoodFisher scores and update vs tfmot's magnitude."""
    x, y, xt, yt = data
    base = trained_mlp(data)
    copy = keras.models.clone_model(base)  # wrapped models share layers with what they wrap: one copy each
    copy.set_weights(base.get_weights())
    schedule = sparsity_api.ConstantSparsity(0.95, begin_step=1, end_step=1, frequency=1)
    magnitude = sparsity_api.prune_low_magnitude(copy, schedule)
    magnitude.compile(keras.optimizers.SGD(0.0), LOSS, ["accuracy"])
    magnitude.fit(x[:64], y[:64], batch_size=64, epochs=1, callbacks=[sparsity_api.UpdatePruningStep()], verbose=0)
    woodfisher = tfw.prune_woodfisher(base, schedule, num_gradients=256, fisher_batch_size=4)
    woodfisher.compile(keras.optimizers.SGD(0.0), LOSS, ["accuracy"])
    woodfisher.fit(x[:64], y[:64], batch_size=64, epochs=1, verbose=0,
                   callbacks=[tfw.UpdatePruningStep(tf.data.Dataset.from_tensor_slices((x, y)), LOSS)])
    acc_magnitude = magnitude.evaluate(xt, yt, verbose=0)[1]
    acc_woodfisher = woodfisher.evaluate(xt, yt, verbose=0)[1]
    assert kernel_sparsity(sparsity_api.strip_pruning(woodfisher)) == pytest.approx(0.95, abs=1e-3)
    assert acc_woodfisher >= acc_magnitude + 0.05


def test_tensorboard_summaries_and_pruning_summaries(data, tmp_path):
    x, y, _, _ = data
    callback = tfw.UpdatePruningStep(tf.data.Dataset.from_tensor_slices((x, y)), LOSS, log_dir=str(tmp_path / "wf"))
    pruned = tfw.prune_woodfisher(trained_mlp(data), tfw.OneShotSchedule(0.5, step=2), num_gradients=16)
    pruned.compile("adam", LOSS)
    pruned.fit(x[:256], y[:256], batch_size=64, epochs=1, verbose=0,
               callbacks=[callback, sparsity_api.PruningSummaries(log_dir=str(tmp_path / "tfmot"))])
    assert glob.glob(str(tmp_path / "wf" / "events.out.tfevents.*"))
    assert glob.glob(str(tmp_path / "tfmot" / "**" / "events.out.tfevents.*"), recursive=True)
    tags = set()
    for path in glob.glob(str(tmp_path / "wf" / "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            tags.update(v.tag for v in event.summary.value)
    assert {"woodfisher/sparsity", "woodfisher/event_seconds", "woodfisher/sparsity/hidden/kernel"} <= tags


def test_tfmot_callback_alone_is_refused(data, fisher):
    x, y, _, _ = data
    pruned = tfw.prune_woodfisher(trained_mlp(data), tfw.OneShotSchedule(0.5, step=2))
    pruned.compile("adam", LOSS)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"tfw.UpdatePruningStep\(\)"):
        pruned.fit(x[:128], y[:128], batch_size=64, callbacks=[sparsity_api.UpdatePruningStep()], verbose=0)


@pytest.mark.parametrize("fmt", [".keras", ".h5", "checkpoint"])
def test_save_load_resume_keeps_masks_step_and_schedule(fmt, data, tmp_path):
    x, y, _, _ = data
    fisher = tf.data.Dataset.from_tensor_slices((x, y))
    schedule = sparsity_api.PolynomialDecay(0.3, 0.8, begin_step=0, end_step=40, frequency=8)
    pruned = tfw.prune_woodfisher(trained_mlp(data), schedule, num_gradients=16, fisher_block_size=300)
    pruned.compile(keras.optimizers.Adam(1e-3), LOSS)
    pruned.fit(x, y, batch_size=64, epochs=1, callbacks=[tfw.UpdatePruningStep(fisher, LOSS)], verbose=0)  # 1..16
    saved_masks, step = masks(pruned), int(pruned.layers[0].pruning_step.numpy())
    assert step == 16 and 0.3 < 1 - np.mean(np.concatenate([m.ravel() for m in saved_masks])) < 0.8
    if fmt == "checkpoint":
        tf.train.Checkpoint(model=pruned).write(str(tmp_path / "ckpt"))
        restored = tfw.prune_woodfisher(trained_mlp(data), schedule, num_gradients=16, fisher_block_size=300)
        tf.train.Checkpoint(model=restored).read(str(tmp_path / "ckpt")).assert_existing_objects_matched()
        restored.compile(keras.optimizers.Adam(1e-3), LOSS)
    else:
        path = str(tmp_path / f"model{fmt}")
        pruned.save(path)
        with tfw.prune_scope():
            restored = keras.models.load_model(path)
    wrapper = restored.layers[0]
    assert isinstance(wrapper, tfw.PruneWoodFisher) and int(wrapper.pruning_step.numpy()) == 16
    assert wrapper.pruning_schedule.get_config() == schedule.get_config()
    assert wrapper.woodfisher_config.fisher_block_size == 300 and wrapper.woodfisher_config.num_gradients == 16
    for a, b in zip(saved_masks, masks(restored)):
        np.testing.assert_array_equal(a, b)
    # Resume: the Fisher data is the callback's; without it the event would say what to pass.
    with pytest.raises(ValueError, match="needs fisher_dataset="):
        restored.fit(x[:64], y[:64], batch_size=64, epochs=1, callbacks=[tfw.UpdatePruningStep()], verbose=0)
    callback = tfw.UpdatePruningStep(fisher_dataset=fisher, loss=LOSS)
    restored.fit(x, y, batch_size=64, epochs=2, callbacks=[callback], verbose=0)  # steps 17..48
    assert [e["step"] for e in callback.events] == [24, 32, 40]
    assert kernel_sparsity(sparsity_api.strip_pruning(restored)) == pytest.approx(0.8, abs=1e-3)


def test_savedmodel_is_refused(data, fisher, tmp_path):
    pruned = tfw.prune_woodfisher(trained_mlp(data), sparsity_api.ConstantSparsity(0.5, 0))
    with pytest.raises(ValueError, match="SavedModel"):
        tf.saved_model.save(pruned, str(tmp_path / "sm"))


def test_custom_prunable_layer_is_pruned_by_woodfisher(data, fisher):
    class Projection(keras.layers.Layer, sparsity_api.PrunableLayer):
        def build(self, input_shape):
            self.w = self.add_weight("w", shape=(input_shape[-1], 10))

        def call(self, inputs):
            return tf.matmul(inputs, self.w)

        def get_prunable_weights(self):
            return [self.w]

    x, y, _, _ = data
    model = keras.Sequential([keras.Input((784,)), Projection(name="projection")])
    pruned = tfw.prune_woodfisher(model, tfw.OneShotSchedule(0.9, step=1), num_gradients=32)
    pruned.compile("sgd", LOSS)
    pruned.fit(x[:64], y[:64], batch_size=64, epochs=1, callbacks=[tfw.UpdatePruningStep(fisher, LOSS)], verbose=0)
    (mask,) = masks(pruned)
    assert 1 - mask.mean() == pytest.approx(0.9, abs=1e-3)


def test_masks_from_zeros_keeps_zeros_during_fine_tuning(data):
    x, y, _, _ = data
    model = trained_mlp(data)
    tfw.one_shot_prune(model, None, None, 0.7, method="magnitude", verbose=0)
    wrapped = tfw.masks_from_zeros(model)
    wrapped.compile(keras.optimizers.Adam(1e-2), LOSS)
    wrapped.fit(x, y, batch_size=64, epochs=1, callbacks=[tfw.UpdatePruningStep()], verbose=0)  # magnitude: no data
    assert kernel_sparsity(sparsity_api.strip_pruning(wrapped)) == pytest.approx(0.7, abs=1e-3)


def test_bad_input(data, fisher):
    x, y, _, _ = data
    model = trained_mlp(data)
    with pytest.raises(ValueError, match="sparsity"):
        sparsity_api.ConstantSparsity(1.2, 0)  # tfmot's own check, for its schedules
    with pytest.raises(ValueError, match="target_sparsity"):
        tfw.OneShotSchedule(1.0)
    def fit_with(callback, schedule=tfw.OneShotSchedule(0.5)):
        pruned = tfw.prune_woodfisher(model, schedule, num_gradients=8)
        pruned.compile("adam", LOSS)
        pruned.fit(x[:64], y[:64], batch_size=64, epochs=1, callbacks=[callback], verbose=0)

    with pytest.raises(ValueError, match="empty"):
        fit_with(tfw.UpdatePruningStep(fisher.take(0), LOSS))
    with pytest.raises(ValueError, match="needs fisher_dataset"):
        fit_with(tfw.UpdatePruningStep(None, LOSS))
    with pytest.raises(ValueError, match="does not match the model's outputs"):
        fit_with(tfw.UpdatePruningStep(fisher, keras.losses.CategoricalCrossentropy()))
    with pytest.raises(ValueError, match="PruningSchedule"):
        tfw.prune_woodfisher(model, 0.5)
    with pytest.raises(TypeError, match="UpdatePruningStep"):
        tfw.prune_woodfisher(model, fisher)  # the old positional Fisher data
    with pytest.raises(TypeError, match="unexpected keyword argument 'num_sample'"):
        tfw.prune_woodfisher(model, tfw.OneShotSchedule(0.5), num_sample=8)
    with pytest.raises(TypeError, match="fisher_block_size=300"):
        tfw.prune_woodfisher(model, tfw.OneShotSchedule(0.5), block_size=300)
    with pytest.raises(ValueError, match="damping must be a finite number > 0"):
        tfw.UpdatePruningStep(fisher, LOSS, damping=-1.0)
    wrapped = tfw.prune_woodfisher(model, tfw.OneShotSchedule(0.5))
    rewrapped = tfw.prune_woodfisher(wrapped, tfw.OneShotSchedule(0.5))  # as tfmot: wrappers are used as they are
    assert all(a is b for a, b in zip(rewrapped.layers, wrapped.layers))
    with pytest.raises(ValueError, match="already wrapped"):
        tfw.prune_woodfisher(wrapped.layers[0], tfw.OneShotSchedule(0.5))  # a single wrapped layer
    with pytest.raises(ValueError, match="already wrapped"):
        tfw.masks_from_zeros(sparsity_api.prune_low_magnitude(trained_mlp(data)))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(10)

        def call(self, inputs):
            return self.dense(inputs)

    with pytest.raises(ValueError, match="Subclassed models are not supported"):
        tfw.prune_woodfisher(Subclassed(), tfw.OneShotSchedule(0.5))

    class Overshoot(sparsity_api.PruningSchedule):
        def __call__(self, step):
            return tf.equal(step, 2), tf.constant(1.5)

        def get_config(self):
            return {}

    bad = tfw.prune_woodfisher(trained_mlp(data), Overshoot(), num_gradients=8)
    bad.compile("adam", LOSS)
    with pytest.raises(ValueError, match=r"the schedule's sparsity at step 2 must be a number in \[0, 1\)"):
        bad.fit(x[:128], y[:128], batch_size=64, callbacks=[tfw.UpdatePruningStep(fisher, LOSS)], verbose=0)


class EveryThirdLate(sparsity_api.PruningSchedule):
    """A user's schedule with Python control flow on the step (autograph turns it into a tf.cond)."""

    def __call__(self, step):
        if step % 3 == 0 and step > 300:
            return tf.constant(True), tf.cast(step, tf.float32) / 1e4
        return tf.constant(False), tf.constant(0.0)

    def get_config(self):
        return {}


@pytest.mark.slow
def test_schedule_decisions_read_per_batch_equal_the_schedule_called_at_each_step():
    from tf_woodfisher.keras_common import ScheduleDecisions

    # Steps across window boundaries (256, then 512 more: 768), a jump ahead, and back (the resynchronisation).
    steps = [*range(0, 300), *range(740, 800), *range(5000, 5010), 3, 299, 301]
    for schedule in (sparsity_api.PolynomialDecay(0.2, 0.7, begin_step=0, end_step=600, frequency=10),
                     sparsity_api.ConstantSparsity(0.5, begin_step=5, end_step=700, frequency=7),
                     tfw.GradualSchedule(0.0, 0.9, begin_step=40, end_step=440, frequency=40),
                     tfw.OneShotSchedule(0.8, step=7), tfw.KeepMasks(), EveryThirdLate()):
        decisions = ScheduleDecisions(schedule)
        for step in steps:
            should_prune, sparsity = schedule(tf.constant(step, tf.int64))
            read = decisions.at(step)
            assert read[0] is bool(should_prune), (schedule, step)
            assert read[1] == pytest.approx(float(sparsity), rel=1e-5), (schedule, step)  # graph vs eager: a few ulps


def test_gradual_schedule_that_would_miss_its_target_is_refused():
    with pytest.raises(ValueError, match=r"not a multiple of frequency=40.*use end_step=120"):
        tfw.GradualSchedule(0.0, 0.9, begin_step=0, end_step=150, frequency=40)


def test_fisher_seeds_of_different_runs_do_not_collide():
    from tf_woodfisher.pruning.pruner import fisher_seed

    seeds = {fisher_seed(base, step) for base in range(5) for step in range(50)}
    assert len(seeds) == 250
    assert fisher_seed(3, 7) == fisher_seed(3, 7)
