"""Every layer kind that tfmot prunes (and those we add) is pruned by both paths, with unique report names;
per-sample gradients through while_loop-based RNNs and through a user layer's tf.cond match a plain loop of tapes."""
import warnings

import numpy as np
import pytest

import tf_woodfisher as tfw
from tf_woodfisher.fisher.gradients import has_control_flow, make_gradient_fn

tf, keras = tfw.tf, tfw.keras
L = keras.layers
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
PER_SAMPLE = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def sequence_zoo():
    """Embedding, MultiHeadAttention, EinsumDense, LSTM, GRU, stacked cells, Bidirectional, TimeDistributed,
    LocallyConnected1D, Conv1DTranspose (none unrolled)."""
    inp = keras.Input((8,), dtype="int32")
    h = L.Embedding(20, 8, name="emb")(inp)
    h = L.MultiHeadAttention(2, 4, name="mha")(h, h)
    h = L.EinsumDense("btd,de->bte", output_shape=(None, 8), name="einsum")(h)
    h = L.LSTM(6, return_sequences=True, name="lstm")(h)
    h = L.GRU(6, return_sequences=True, name="gru")(h)
    h = L.RNN([L.SimpleRNNCell(5), L.LSTMCell(5)], return_sequences=True, name="stacked")(h)
    h = L.Bidirectional(L.SimpleRNN(4, return_sequences=True), name="bidi")(h)
    h = L.TimeDistributed(L.Dense(4), name="td")(h)
    h = L.LocallyConnected1D(4, 3, name="lc1")(h)
    h = L.Conv1DTranspose(4, 3, name="c1t")(h)
    return keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(h)), name="sequence_zoo")


SEQUENCE_WEIGHTS = [
    "emb/embeddings", "mha/query/kernel", "mha/key/kernel", "mha/value/kernel", "mha/attention_output/kernel",
    "einsum/kernel", "lstm/lstm_cell/kernel", "lstm/lstm_cell/recurrent_kernel", "gru/gru_cell/kernel",
    "gru/gru_cell/recurrent_kernel", "stacked/stacked_rnn_cells/simple_rnn_cell/kernel",
    "stacked/stacked_rnn_cells/simple_rnn_cell/recurrent_kernel", "stacked/stacked_rnn_cells/lstm_cell/kernel",
    "stacked/stacked_rnn_cells/lstm_cell/recurrent_kernel", "bidi/forward_simple_rnn/simple_rnn_cell/kernel",
    "bidi/forward_simple_rnn/simple_rnn_cell/recurrent_kernel", "bidi/backward_simple_rnn/simple_rnn_cell/kernel",
    "bidi/backward_simple_rnn/simple_rnn_cell/recurrent_kernel", "td/kernel", "lc1/kernel", "c1t/kernel",
    "head/kernel"]


def image_zoo():
    """LocallyConnected2D, Conv2DTranspose, DepthwiseConv2D, both SeparableConv2D kernels, Conv3DTranspose."""
    inp = keras.Input((8, 8, 2))
    h = L.LocallyConnected2D(3, 3, name="lc2")(inp)
    h = L.Conv2DTranspose(3, 3, name="c2t")(h)
    h = L.DepthwiseConv2D(3, name="dw")(h)
    h = L.SeparableConv2D(4, 3, name="sep")(h)
    h = L.Conv3DTranspose(2, (2, 2, 1), name="c3t")(L.Reshape((4, 4, 1, 4))(h))
    return keras.Model(inp, L.Dense(3, name="head")(L.Flatten()(h)), name="image_zoo")


IMAGE_WEIGHTS = ["lc2/kernel", "c2t/kernel", "dw/depthwise_kernel", "sep/depthwise_kernel", "sep/pointwise_kernel",
                 "c3t/kernel", "head/kernel"]


def _data(model, n=48, seed=0):
    rng = np.random.default_rng(seed)
    shape = model.inputs[0].shape[1:]
    if model.inputs[0].dtype == tf.int32:
        x = rng.integers(0, 20, (n, *shape)).astype("int32")
    else:
        x = rng.normal(size=(n, *shape)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, rng.integers(0, 3, n)))


def _expected_zeros(size, sparsity=0.5):
    return int(round(sparsity * size))


def _check_layerwise(targets, names, sparsity=0.5):
    got = {t.name.replace("_1/", "/"): t for t in targets}  # clones in the gradual path add "_1" to cell names
    assert sorted(got) == sorted(names)
    for name, target in got.items():
        assert int(np.sum(target.variable.numpy() == 0)) == _expected_zeros(target.size, sparsity), name


@pytest.mark.slow
@pytest.mark.parametrize("build,names", [(sequence_zoo, SEQUENCE_WEIGHTS), (image_zoo, IMAGE_WEIGHTS)])
def test_one_shot_prunes_every_layer_kind(build, names):
    model = build()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing is left dense with a warning
        report = tfw.one_shot_prune(model, _data(model), LOSS, 0.5, mode="layerwise", num_gradients=16, verbose=0)
    assert [layer.name for layer in report.layers] == names  # unique: layer path + weight path
    assert list(report.as_dict()["layers"]) == names  # as_dict keeps every entry (the four MHA kernels)
    _check_layerwise(tfw.find_prunable_weights(model), names)


@pytest.mark.slow
@pytest.mark.parametrize("build,names", [(sequence_zoo, SEQUENCE_WEIGHTS), (image_zoo, IMAGE_WEIGHTS)])
def test_gradual_prunes_every_layer_kind(build, names):
    model = build()
    data = _data(model)
    pruned = tfw.prune_woodfisher(model, tfw.OneShotSchedule(0.5, step=1), mode="layerwise", num_gradients=16)
    pruned.compile("adam", LOSS)
    callback = tfw.UpdatePruningStep(data)
    pruned.fit(data.batch(16), epochs=1, callbacks=[callback], verbose=0)
    assert len(callback.events) == 1 and len(callback.events[0]["layers"]) == len(names)
    _check_layerwise(tfw.find_prunable_weights(tfw.strip_pruning(pruned)), names)


class LoopLayer(L.Layer):
    """A custom PrunableLayer whose call runs its own tf.while_loop over the time steps."""

    def build(self, shape):
        self.kernel = self.add_weight("kernel", (shape[-1], 4))
        self.recurrent = self.add_weight("recurrent", (4, 4))

    def call(self, x):
        steps = tf.shape(x)[1]

        def body(t, h):
            return t + 1, tf.tanh(tf.matmul(x[:, t], self.kernel) + tf.matmul(h, self.recurrent))

        return tf.while_loop(lambda t, h: t < steps, body, (0, tf.zeros([tf.shape(x)[0], 4])))[1]

    def get_prunable_weights(self):
        return [self.kernel, self.recurrent]


RNN_MODELS = {
    "lstm": lambda: [L.LSTM(4, return_sequences=True), L.LSTM(3)],
    "gru": lambda: [L.Dense(3), L.GRU(4)],  # a Dense before the loop: its gradient runs back through it
    "simple_rnn": lambda: [L.SimpleRNN(4)],
    "bidirectional": lambda: [L.Bidirectional(L.LSTM(4))],
    "stacked_cells": lambda: [L.RNN([L.LSTMCell(4), L.GRUCell(3)], return_sequences=True), L.Flatten()],
    "custom_while_loop": lambda: [LoopLayer()],
}


FAST_RNN = {("simple_rnn", 1)}  # the fast tier; the rest of the matrix is slow


@pytest.mark.parametrize("kind,group_size", [
    pytest.param(kind, size, marks=() if (kind, size) in FAST_RNN else pytest.mark.slow)
    for kind in sorted(RNN_MODELS) for size in (1, 3)])
def test_rnn_per_sample_gradients_match_a_loop(kind, group_size):
    tf.random.set_seed(1)
    model = keras.Sequential([keras.Input((5, 3)), *RNN_MODELS[kind](), L.Dense(2)])
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, group_size, 5, 3)).astype("float32")
    y = rng.integers(0, 2, (5, group_size))
    variables = model.trainable_variables
    fn = make_gradient_fn(lambda inputs: model(inputs, training=False), variables, PER_SAMPLE)
    got = np.concatenate([rows.numpy() for rows in fn(tf.constant(x), tf.constant(y))], axis=1)
    assert fn.looped is True
    reference = []
    for i in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(PER_SAMPLE(y[i], model(x[i], training=False)))
        reference.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, variables)]))
    reference = np.stack(reference)
    assert np.abs(reference).max() > 0
    assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max()


def test_models_without_loops_stay_vectorised():
    model = keras.Sequential([keras.Input((6, 6, 1)), L.Flatten(), L.Dense(3)])
    variables = model.trainable_variables
    fn = make_gradient_fn(lambda inputs: model(inputs, training=False), variables, PER_SAMPLE)
    x, y = tf.zeros([4, 1, 6, 6, 1]), tf.zeros([4, 1], tf.int64)
    fn(x, y)
    assert fn.looped is False
    graph = tf.function(lambda a, b: fn(a, b)).get_concrete_function(x, y).graph
    # a vectorized_map has no while_loop; the map_fn fallback would add one
    assert not has_control_flow(graph, graph.get_operations())


class Gate(L.Layer):
    """A user's layer with a Python ``if`` on a tensor (AutoGraph makes it a tf.cond); the branch depends on the
    weights only, so the samples stay independent."""

    def build(self, shape):
        self.kernel = self.add_weight("kernel", (shape[-1], 4))

    def call(self, x):
        h = tf.matmul(x, self.kernel)
        if tf.reduce_sum(self.kernel) > 0:
            return tf.tanh(h)
        return 0.5 * h


@pytest.mark.parametrize("positive", [True, False])
def test_gradients_through_a_user_layers_cond_match_a_loop(positive):
    """tf.vectorized_map cannot differentiate a tf.cond (it fails on the cond's intermediates): the vectorised
    path takes tf.map_fn for it, and the rule path uses it for the layer's weights while the Dense gets its rule."""
    from tf_woodfisher.fisher.rules import make_rule_gradient_fn

    tf.random.set_seed(3)
    model = keras.Sequential([keras.Input((5,)), L.Dense(6, name="dense"), Gate(name="gate"), L.Dense(2, name="head")])
    gate = model.get_layer("gate").kernel
    gate.assign(tf.abs(gate) if positive else -tf.abs(gate))
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(size=(4, 3, 5)).astype("float32"))
    y = tf.constant(rng.integers(0, 2, (4, 3)))
    variables = model.trainable_variables
    reference = []
    for i in range(4):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(PER_SAMPLE(y[i], model(x[i], training=False)))
        reference.append(np.concatenate([g.numpy().ravel() for g in tape.gradient(loss, variables)]))
    reference = np.stack(reference)
    vectorised = make_gradient_fn(lambda inputs: model(inputs, training=False), variables, PER_SAMPLE)
    rules = make_rule_gradient_fn(model, variables, PER_SAMPLE)
    for fn in (vectorised, rules):
        got = np.concatenate([rows.numpy() for rows in fn(x, y)], axis=1)
        assert np.abs(got - reference).max() <= 1e-5 * np.abs(reference).max()
    assert vectorised.looped is True
    assert rules.coverage == ["dense.kernel", "dense.bias", None, "dense.kernel", "dense.bias"]  # the Dense rule
    assert rules.fallback_reasons == {gate.name: "no rule for Gate"}


class Scale(L.Layer):
    """A layer with weights that is neither known nor a PrunableLayer: left dense, with a warning."""

    def build(self, shape):
        self.scale = self.add_weight("scale", (shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale


def test_unknown_layers_are_left_dense_with_a_warning_and_counted_in_the_report():
    model = keras.Sequential([keras.Input((6,)), L.Dense(8, name="d1"), Scale(name="scale"),
                              L.BatchNormalization(name="bn"), L.Dense(3, name="d2")])
    data = _data(model)
    with pytest.warns(RuntimeWarning, match=r"scale \(Scale, 8 weights\)"):
        report = tfw.one_shot_prune(model, data, LOSS, 0.5, method="magnitude", verbose=0)
    assert [layer.name for layer in report.layers] == ["d1/kernel", "d2/kernel"]
    pruned = sum(int(np.sum(layer.kernel.numpy() == 0)) for layer in (model.layers[0], model.layers[3]))
    total = sum(int(w.shape.num_elements()) for w in model.trainable_weights)  # zero biases are not pruned
    assert report.sparsity == pytest.approx(0.5)  # of the prunable weights
    assert report.unpruned_weights == 8 + 8 + 3 + 8 + 8  # biases, the Scale layer, the BatchNorm's gamma/beta
    assert report.model_sparsity == pytest.approx(pruned / total)  # of all (trainable) weights
    assert report.as_dict()["model_sparsity"] == pytest.approx(pruned / total)
    with pytest.raises(ValueError, match="'scale' .*cannot be pruned"):
        tfw.one_shot_prune(model, data, LOSS, 0.5, method="magnitude", layers=["d1", "scale"], verbose=0)


def test_four_attention_kernels_have_their_own_report_entries():
    inp = keras.Input((4, 6))
    model = keras.Model(inp, L.MultiHeadAttention(2, 3, name="att")(inp, inp))
    report = tfw.one_shot_prune(model, None, None, 0.5, method="magnitude", mode="layerwise", verbose=0)
    layers = report.as_dict()["layers"]
    assert list(layers) == ["att/query/kernel", "att/key/kernel", "att/value/kernel", "att/attention_output/kernel"]
    assert all(v == pytest.approx(0.5) for v in layers.values())


@pytest.mark.slow
def test_one_shot_on_a_tfmot_wrapped_lstm():
    """The reported crash: one-shot WoodFisher on a model wrapped by tfmot's prune_low_magnitude, with an LSTM."""
    import tensorflow_model_optimization as tfmot

    model = keras.Sequential([keras.Input((5, 3)), L.LSTM(4, name="lstm"), L.Dense(3, name="head")])
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(model, tfmot.sparsity.keras.ConstantSparsity(0.5, 0))
    rng = np.random.default_rng(0)
    data = tf.data.Dataset.from_tensor_slices((rng.normal(size=(16, 5, 3)).astype("float32"), rng.integers(0, 3, 16)))
    report = tfw.one_shot_prune(wrapped, data, LOSS, 0.5, mode="layerwise", num_gradients=8, verbose=0)
    assert [layer.name for layer in report.layers] == ["lstm/lstm_cell/kernel", "lstm/lstm_cell/recurrent_kernel",
                                                      "head/kernel"]
    for layer in wrapped.layers:
        for weight, mask, _ in layer.pruning_vars:  # the masks are set, and the weights zeroed under them
            assert float(np.mean(mask.numpy() == 0)) == pytest.approx(0.5, abs=0.02)
            assert np.all(weight.numpy()[mask.numpy() == 0] == 0)
