"""The inputs a Keras user passes: sample weights, multi-output losses (lists, dicts, loss_weights, compile's),
float64 and mixed-precision models, batched or unbatched data for every model kind; bad inputs named."""
import numpy as np
import pytest

import tf_woodfisher as tfw
from tf_woodfisher.fisher import gradients
from tf_woodfisher.tfmot.problem import input_rank, keras_problem, per_sample_loss

tf, keras = tfw.tf, tfw.keras
L = keras.layers
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
RNG = np.random.default_rng(0)
X = RNG.normal(size=(24, 5)).astype("float32")
Y = RNG.integers(0, 3, 24)
W = RNG.uniform(0.0, 2.0, 24).astype("float32")


def _fixed_weights(model):
    """The same weights every time (tf_keras initialisers do not repeat under tf.random.set_seed)."""
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(size=w.shape).astype(w.dtype.as_numpy_dtype) for w in model.weights])
    return model


def mlp(name="mlp"):
    return _fixed_weights(keras.Sequential([keras.Input((5,)), L.Dense(6, activation="tanh"), L.Dense(3)], name=name))


def two_outputs():
    inp = keras.Input((5,))
    hidden = L.Dense(6, activation="tanh", name="hidden")(inp)
    return _fixed_weights(keras.Model(inp, [L.Dense(3, name="cls")(hidden), L.Dense(2, name="reg")(hidden)]))


def _rows(model, dataset, loss, num_gradients, fisher_batch_size=1, loss_weights=None, batched=None):
    """The Fisher gradient rows the adapter computes (read in order)."""
    config = tfw.WoodFisherConfig(num_gradients=num_gradients, fisher_batch_size=fisher_batch_size, shuffle_buffer=0)
    targets = tfw.find_prunable_weights(model)
    problem = keras_problem(model, targets, dataset, loss, config, loss_weights=loss_weights, batched=batched)
    return gradients.collect_gradients(problem.forward, [t.variable for t in targets], dataset, problem.loss,
                                       num_gradients, fisher_batch_size, shuffle_buffer=0,
                                       batched=problem.batched).numpy()


def _tape_rows(model, groups, loss_of):
    """Reference: one GradientTape per group, ``loss_of(indices, predictions)`` its scalar loss."""
    variables = [t.variable for t in tfw.find_prunable_weights(model)]
    rows = []
    for indices in groups:
        with tf.GradientTape() as tape:
            loss = loss_of(indices, model(X[indices], training=False))
        rows.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, variables)]))
    return np.stack(rows)


def assert_rows_close(got, reference):
    """Equal to float32 precision: entries that cancel to ~0 carry noise of the row's scale (which differs
    between TensorFlow's oneDNN and Eigen CPU kernels), so atol is relative to each row's largest entry."""
    atol = 5e-6 * np.abs(reference).max(axis=1, keepdims=True)
    np.testing.assert_array_less(np.abs(got - reference), atol + 1e-5 * np.abs(reference) + 1e-12)


# ------------------------------------------------------------------------------------------ sample weights

@pytest.mark.slow
def test_sample_weights_give_each_group_its_weighted_mean_loss():
    model = mlp()
    per_sample = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    weighted = tf.data.Dataset.from_tensor_slices((X, Y, W))
    got = _rows(model, weighted, SCCE, 12, fisher_batch_size=2)
    groups = [np.arange(2 * i, 2 * i + 2) for i in range(12)]
    reference = _tape_rows(model, groups, lambda i, p: tf.reduce_mean(W[i] * per_sample(Y[i], p)))
    assert_rows_close(got, reference)
    unweighted = _rows(model, tf.data.Dataset.from_tensor_slices((X, Y)), SCCE, 12, fisher_batch_size=2)
    assert np.abs(unweighted - got).max() > 0.1 * np.abs(got).max()  # the weights are not dropped


@pytest.mark.slow
def test_zero_weights_give_zero_gradients_in_the_core_and_the_adapter():
    model = mlp()
    zero = tf.data.Dataset.from_tensor_slices((X, Y, np.zeros(24, "float32")))
    assert not np.any(_rows(model, zero, SCCE, 8))
    per_sample = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    rows = gradients.collect_gradients(lambda x: model(x, training=False), model.trainable_variables, zero.batch(5),
                                       lambda y, p: per_sample(y, p), 8, batched=True)  # a plain callable loss
    assert rows.shape == (8, 6 * 5 + 6 + 6 * 3 + 3) and not np.any(rows.numpy())


def test_sample_weights_that_are_not_one_per_sample_are_refused_for_a_plain_loss():
    model = mlp()
    per_sample = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    data = tf.data.Dataset.from_tensor_slices((X, Y, np.ones((24, 3), "float32")))
    with pytest.raises(ValueError, match=r"sample weights of shape \[1, 3\].*one weight per sample"):
        gradients.collect_gradients(lambda x: model(x, training=False), model.trainable_variables, data,
                                    lambda y, p: per_sample(y, p), 8, batched=False)


@pytest.mark.slow
def test_one_shot_with_all_zero_weights_is_magnitude_pruning():
    """F = λI when every gradient is zero: WoodFisher's scores and update are then magnitude pruning's."""
    zero = tf.data.Dataset.from_tensor_slices((X, Y, np.zeros(24, "float32")))
    weighted, magnitude = mlp(), mlp()
    tfw.one_shot_prune(weighted, zero, SCCE, 0.6, num_gradients=16, verbose=0)
    tfw.one_shot_prune(magnitude, None, None, 0.6, method="magnitude", verbose=0)
    for a, b in zip(weighted.trainable_weights, magnitude.trainable_weights):
        np.testing.assert_array_equal(a.numpy() == 0, b.numpy() == 0)
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    unweighted = mlp()
    tfw.one_shot_prune(unweighted, tf.data.Dataset.from_tensor_slices((X, Y)), SCCE, 0.6, num_gradients=16, verbose=0)
    assert any(np.any((a.numpy() == 0) != (b.numpy() == 0))
               for a, b in zip(unweighted.trainable_weights, magnitude.trainable_weights))


def test_per_timestep_sample_weights_match_keras():
    tf.random.set_seed(0)
    model = keras.Sequential([keras.Input((4, 3)), L.Dense(5, activation="tanh"), L.Dense(2)])
    x = RNG.normal(size=(6, 4, 3)).astype("float32")
    y = RNG.integers(0, 2, (6, 4))
    w = RNG.uniform(size=(6, 4)).astype("float32")
    got = _rows(model, tf.data.Dataset.from_tensor_slices((x, y, w)), SCCE, 6)
    model.compile(loss=SCCE)
    variables = [t.variable for t in tfw.find_prunable_weights(model)]
    reference = []
    for i in range(6):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x[i:i + 1], tf.constant(y[i:i + 1]), model(x[i:i + 1], training=False),
                                      tf.constant(w[i:i + 1]))
        reference.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, variables)]))
    assert_rows_close(got, np.stack(reference))


# ------------------------------------------------------------------------------------------ multi-output

YC = RNG.integers(0, 3, 24)
YR = RNG.normal(size=(24, 2)).astype("float32")


@pytest.mark.parametrize("structure", [pytest.param("dict", marks=pytest.mark.slow), "list"])
def test_multi_output_losses_and_weights_match_keras_compute_loss(structure):
    model = two_outputs()
    if structure == "dict":
        losses, weights, labels = {"cls": SCCE, "reg": "mse"}, {"cls": 1.0, "reg": 0.3}, {"cls": YC, "reg": YR}
    else:
        losses, weights, labels = [SCCE, "mse"], [1.0, 0.3], (YC, YR)
    got = _rows(model, tf.data.Dataset.from_tensor_slices((X, labels, W)), losses, 24, loss_weights=weights)
    model.compile(loss=losses, loss_weights=weights)
    variables = [t.variable for t in tfw.find_prunable_weights(model)]
    reference = []
    for i in range(24):
        target = {"cls": tf.constant(YC[i:i + 1]), "reg": tf.constant(YR[i:i + 1])} if structure == "dict" else \
            [tf.constant(YC[i:i + 1]), tf.constant(YR[i:i + 1])]
        with tf.GradientTape() as tape:
            loss = model.compute_loss(X[i:i + 1], target, model(X[i:i + 1], training=False), tf.constant(W[i:i + 1]))
        reference.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, variables)]))
    assert_rows_close(got, np.stack(reference))


@pytest.mark.slow
def test_gradual_path_uses_compiles_losses_and_loss_weights():
    model = two_outputs()
    pruned = tfw.prune_woodfisher(model, tfw.OneShotSchedule(0.5, step=1), num_gradients=8)
    cls, reg = pruned.output_names  # as with tfmot, the wrappers rename the output layers
    losses, weights = {cls: SCCE, reg: "mse"}, {cls: 0.2, reg: 2.0}
    pruned.compile("sgd", loss=losses, loss_weights=weights)
    data = tf.data.Dataset.from_tensor_slices((X, {cls: YC, reg: YR}))
    callback = tfw.UpdatePruningStep(data)
    pruned.fit(data.batch(8), epochs=1, callbacks=[callback], verbose=0)
    assert callback.events and callback.events[0]["sparsity"] == pytest.approx(0.5, abs=0.01)
    fisher_loss = callback.pruner.problem.loss  # per sample; its mean is Keras' loss of the batch
    outputs = pruned(X, training=False)
    keras_loss = float(pruned.compute_loss(X, {cls: tf.constant(YC), reg: tf.constant(YR)}, outputs))
    assert float(tf.reduce_mean(fisher_loss({cls: YC, reg: YR}, outputs))) == pytest.approx(keras_loss, rel=1e-5)


def test_loss_structures_that_do_not_match_the_outputs_are_named():
    model = two_outputs()
    data = tf.data.Dataset.from_tensor_slices((X, {"cls": YC, "reg": YR}))
    with pytest.raises(ValueError, match=r"3 losses given for a model with 2 outputs \('cls', 'reg'\)"):
        tfw.one_shot_prune(model, data, [SCCE, "mse", "mse"], 0.5, verbose=0)
    with pytest.raises(ValueError, match=r"losses name 'clss' match no output of the model; its outputs are "
                                         r"'cls', 'reg'"):
        tfw.one_shot_prune(model, data, {"clss": SCCE, "reg": "mse"}, 0.5, verbose=0)
    with pytest.raises(ValueError, match=r"1 loss_weights given for a model with 2 outputs"):
        tfw.one_shot_prune(model, data, [SCCE, "mse"], 0.5, loss_weights=[1.0], verbose=0)
    only_cls = tf.data.Dataset.from_tensor_slices((X, {"cls": YC}))
    with pytest.raises(ValueError, match=r"the labels dict has no entry for output 'reg'"):
        tfw.one_shot_prune(model, only_cls, {"cls": SCCE, "reg": "mse"}, 0.5, verbose=0)
    with pytest.raises(TypeError, match="loss_weights must be a list"):
        per_sample_loss("mse", ["cls", "reg"], loss_weights=0.5)
    with pytest.raises(ValueError, match="loss_weights= goes with loss="):
        tfw.UpdatePruningStep(data, loss_weights=[1.0, 2.0])


# ------------------------------------------------------------------------------------------ dtypes

@pytest.fixture
def float64():
    keras.backend.set_floatx("float64")
    yield
    keras.backend.set_floatx("float32")


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.slow
def test_float64_models_keep_their_precision(float64):
    model = keras.Sequential([keras.Input((5,)), L.Dense(6, activation="tanh"), L.Dense(3)])
    before = [w.numpy().copy() for w in model.trainable_weights]
    assert all(w.dtype == np.float64 for w in before)
    data = tf.data.Dataset.from_tensor_slices((X.astype("float64"), Y))
    tfw.one_shot_prune(model, data, SCCE, 0.5, num_gradients=16, update=False, verbose=0)
    for old, new in zip(before, model.trainable_weights):
        kept = new.numpy() != 0
        np.testing.assert_array_equal(new.numpy()[kept], old[kept])  # bit for bit: no round trip via float32


@pytest.mark.slow
def test_float64_models_in_the_gradual_path(float64):
    model = keras.Sequential([keras.Input((5,)), L.Dense(6, activation="tanh"), L.Dense(3)])
    data = tf.data.Dataset.from_tensor_slices((X.astype("float64"), Y))
    pruned = tfw.prune_woodfisher(model, tfw.OneShotSchedule(0.7, step=1), num_gradients=16)
    pruned.compile("sgd", SCCE)
    callback = tfw.UpdatePruningStep(data)
    pruned.fit(data.batch(8), epochs=1, callbacks=[callback], verbose=0)
    assert callback.events[0]["sparsity"] == pytest.approx(0.7, abs=0.01)
    stripped = tfw.strip_pruning(pruned)
    assert all(w.dtype == tf.float64 for w in stripped.trainable_weights)
    assert np.mean(stripped.layers[0].kernel.numpy() == 0) > 0.5


@pytest.mark.slow
def test_mixed_precision_models_end_to_end(mixed_float16):
    tf.random.set_seed(0)
    model = keras.Sequential([keras.Input((5,)), L.Dense(6, activation="tanh"), L.Dense(3),
                              L.Activation("linear", dtype="float32")])
    assert model.layers[0].compute_dtype == "float16"
    data = tf.data.Dataset.from_tensor_slices((X, Y))
    report = tfw.one_shot_prune(model, data, SCCE, 0.5, num_gradients=16, verbose=0)
    assert report.sparsity == pytest.approx(0.5)
    pruned = tfw.prune_woodfisher(model, tfw.OneShotSchedule(0.7, step=1), num_gradients=16)
    pruned.compile("sgd", SCCE)
    callback = tfw.UpdatePruningStep(data)
    history = pruned.fit(data.batch(8), epochs=1, callbacks=[callback], verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert callback.events[0]["sparsity"] == pytest.approx(0.7, abs=0.01)


# ------------------------------------------------------------------------------------------ batched or not

class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden, self.out = L.Dense(6, activation="tanh"), L.Dense(3)

    def call(self, x):
        return self.out(self.hidden(x))


def _subclassed(built_by):
    tf.random.set_seed(0)
    model = Subclassed()
    if built_by == "call":
        model(X[:2])
    else:
        model.build((None, 5))
    return model


@pytest.mark.parametrize("kind", [pytest.param("sequential", marks=pytest.mark.slow),
                                  pytest.param("subclassed_called", marks=pytest.mark.slow),
                                  pytest.param("subclassed_built", marks=pytest.mark.slow)])
def test_batched_and_unbatched_data_are_told_apart_for_every_model_kind(kind):
    model = mlp() if kind == "sequential" else _subclassed(kind.split("_")[1].replace("called", "call"))
    single = tf.data.Dataset.from_tensor_slices((X, Y))
    reference = _rows(model, single, SCCE, 12)
    for data in (single.batch(5), single.batch(4, drop_remainder=True), single.batch(1, drop_remainder=True)):
        np.testing.assert_array_equal(_rows(model, data, SCCE, 12), reference)


@pytest.mark.slow
def test_batching_that_cannot_be_told_asks_for_batched():
    model = Subclassed()
    model.hidden.build((None, 5))  # built layer by layer: the model does not know its input rank
    model.out.build((None, 6))
    model.built = True
    assert input_rank(model) is None
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(4, drop_remainder=True)
    with pytest.raises(ValueError, match="pass batched=True or batched=False"):
        tfw.one_shot_prune(model, data, SCCE, 0.5, num_gradients=8, verbose=0)
    report = tfw.one_shot_prune(model, data, SCCE, 0.5, num_gradients=8, batched=True, verbose=0)
    assert report.sparsity == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"batched=False, but .* say it yields batches"):
        tfw.one_shot_prune(mlp(), data, SCCE, 0.5, num_gradients=8, batched=False, verbose=0)
    with pytest.raises(ValueError, match=r"inputs have ranks \[4\], but the model's inputs have ranks \[2\]"):
        tfw.one_shot_prune(mlp(), tf.data.Dataset.from_tensor_slices((X[:, None, None], Y)).batch(4), SCCE, 0.5,
                           num_gradients=8, verbose=0)
    with pytest.raises(ValueError, match="pass batched=True or batched=False"):  # the core alone knows no model
        gradients.collect_gradients(lambda x: model(x), model.trainable_variables, data, SCCE, 8)
