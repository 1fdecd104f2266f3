"""`.keras` files of Keras 3 models mid-pruning: masks, step, schedule and configuration restored by
keras.saving.load_model, resumed training equal to uninterrupted training; stripped models are plain."""
import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_woodfisher.keras3 as tfw3

L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
FIT = dict(batch_size=32, shuffle=False, verbose=0)


def setup(rng):
    x = rng.standard_normal((192, 10)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((10,)), L.Dense(24, activation="relu", name="a"),
                              L.Dense(3, name="b")], name="net")
    return x, y, model.get_weights()


def pruned_model(initial):
    model = keras.Sequential([keras.Input((10,)), L.Dense(24, activation="relu", name="a"),
                              L.Dense(3, name="b")], name="net")
    model.set_weights(initial)
    schedule = tfw3.GradualSchedule(0.2, 0.8, begin_step=3, end_step=9, frequency=3)  # 6 steps per epoch
    pruned = tfw3.prune(model, schedule, num_gradients=24, fisher_batch_size=2, damping=1e-4)
    pruned.compile(keras.optimizers.Adam(5e-3), LOSS)
    return pruned


def state(pruned):
    return [v.numpy() for v in pruned.weights] + [v.numpy() for v in pruned.optimizer.variables]


@pytest.mark.slow
def test_save_mid_pruning_load_and_resume_equals_uninterrupted(rng, tmp_path):
    x, y, initial = setup(rng)
    fisher = tf.data.Dataset.from_tensor_slices((x, y))
    straight = pruned_model(initial)
    straight_callback = tfw3.PruningCallback(fisher, LOSS)
    straight.fit(x, y, epochs=2, callbacks=[straight_callback], **FIT)

    first = pruned_model(initial)
    first.fit(x, y, epochs=1, callbacks=[tfw3.PruningCallback(fisher, LOSS)], **FIT)  # events at steps 3 and 6
    path = str(tmp_path / "mid.keras")
    first.save(path)
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    assert config["registered_name"] == "tf_woodfisher>PrunedModel"

    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, tfw3.PrunedModel)
    assert int(loaded.pruning_step.numpy()) == 6 and int(loaded.masks_step.numpy()) == 6
    assert loaded.schedule == first.schedule and loaded.woodfisher_config == first.woodfisher_config
    for a, b in zip(loaded.masks, first.masks):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(state(loaded), state(first)):
        np.testing.assert_array_equal(a, b)
    assert [t.name for t in loaded.pruning_targets()] == ["a/kernel", "b/kernel"]

    resumed_callback = tfw3.PruningCallback(fisher)  # the loss: the compiled one, restored from the file
    loaded.fit(x, y, epochs=1, callbacks=[resumed_callback], **FIT)  # event at step 9
    assert [e["step"] for e in resumed_callback.events] == [9]
    assert [e["step"] for e in straight_callback.events] == [3, 6, 9]
    assert resumed_callback.events[0]["sparsity"] == pytest.approx(0.8, abs=2e-3)
    for a, b in zip(state(loaded), state(straight)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    for target in loaded.pruning_targets():
        assert np.all(target.variable.numpy()[target.mask.numpy() == 0] == 0)


@pytest.mark.slow
def test_loaded_model_refuses_training_without_the_callback(rng, tmp_path):
    x, y, initial = setup(rng)
    pruned = pruned_model(initial)
    pruned.fit(x[:64], y[:64], epochs=1, callbacks=[tfw3.PruningCallback(method="magnitude")], **FIT)  # steps 1, 2
    pruned.save(tmp_path / "early.keras")
    loaded = keras.saving.load_model(tmp_path / "early.keras")
    with pytest.raises(ValueError, match="Step: 3"):
        loaded.fit(x, y, epochs=1, **FIT)


@pytest.mark.slow
def test_stripped_model_saves_and_loads_as_a_plain_model(rng, tmp_path):
    x, y, initial = setup(rng)
    pruned = pruned_model(initial)
    pruned.fit(x, y, epochs=2, callbacks=[tfw3.PruningCallback(tf.data.Dataset.from_tensor_slices((x, y)))], **FIT)
    stripped = tfw3.strip(pruned)
    stripped.save(tmp_path / "plain.keras")
    with zipfile.ZipFile(tmp_path / "plain.keras") as archive:
        assert "tf_woodfisher" not in archive.read("config.json").decode()
    loaded = keras.saving.load_model(tmp_path / "plain.keras")
    assert type(loaded) is keras.Sequential
    for a, b in zip(loaded.get_weights(), stripped.get_weights()):
        np.testing.assert_array_equal(a, b)
    kernels = np.concatenate([w.ravel() for w in (loaded.layers[0].kernel.numpy(), loaded.layers[1].kernel.numpy())])
    assert np.mean(kernels == 0) == pytest.approx(0.8, abs=2e-3)
