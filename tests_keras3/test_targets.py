"""Which weights of Keras 3 models are pruned: every layer kind, names, selection, warnings and errors."""
import warnings

import keras
import numpy as np
import pytest

import tf_woodfisher.keras3 as tfw3
from tf_woodfisher.keras3.targets import unpruned_weight_count

L = keras.layers


def names(model, **kwargs):
    return {t.name: t.shape for t in tfw3.find_prunable_weights(model, **kwargs)}


def built(layer, input_shape, dtype="float32"):
    model = keras.Sequential([keras.Input(input_shape, dtype=dtype), layer])
    return model, layer


@pytest.mark.parametrize("make, input_shape, expected", [
    (lambda: L.Dense(3, name="d"), (4,), {"d/kernel": (4, 3)}),
    (lambda: L.EinsumDense("ab,bc->ac", 3, name="e"), (4,), {"e/kernel": (4, 3)}),
    (lambda: L.Conv1D(2, 3, name="c"), (8, 4), {"c/kernel": (3, 4, 2)}),
    (lambda: L.Conv2D(2, 3, name="c"), (8, 8, 4), {"c/kernel": (3, 3, 4, 2)}),
    (lambda: L.Conv3D(2, 3, name="c"), (5, 5, 5, 1), {"c/kernel": (3, 3, 3, 1, 2)}),
    (lambda: L.Conv1DTranspose(2, 3, name="c"), (8, 4), {"c/kernel": (3, 2, 4)}),
    (lambda: L.Conv2DTranspose(2, 3, name="c"), (8, 8, 4), {"c/kernel": (3, 3, 2, 4)}),
    (lambda: L.Conv3DTranspose(2, 3, name="c"), (4, 4, 4, 1), {"c/kernel": (3, 3, 3, 2, 1)}),
    (lambda: L.DepthwiseConv1D(3, name="dw"), (8, 4), {"dw/kernel": (3, 4, 1)}),
    (lambda: L.DepthwiseConv2D(3, name="dw"), (8, 8, 4), {"dw/kernel": (3, 3, 4, 1)}),
    (lambda: L.SeparableConv1D(2, 3, name="s"), (8, 4), {"s/depthwise_kernel": (3, 4, 1),
                                                         "s/pointwise_kernel": (1, 4, 2)}),
    (lambda: L.SeparableConv2D(2, 3, name="s"), (8, 8, 4), {"s/depthwise_kernel": (3, 3, 4, 1),
                                                            "s/pointwise_kernel": (1, 1, 4, 2)}),
    (lambda: L.LSTM(3, name="r"), (5, 4), {"r/lstm_cell/kernel": (4, 12), "r/lstm_cell/recurrent_kernel": (3, 12)}),
    (lambda: L.GRU(3, name="r"), (5, 4), {"r/gru_cell/kernel": (4, 9), "r/gru_cell/recurrent_kernel": (3, 9)}),
    (lambda: L.SimpleRNN(3, name="r"), (5, 4), {"r/simple_rnn_cell/kernel": (4, 3),
                                                "r/simple_rnn_cell/recurrent_kernel": (3, 3)}),
    (lambda: L.RNN(L.StackedRNNCells([L.LSTMCell(3, name="a"), L.GRUCell(2, name="b")]), name="r"), (5, 4),
     {"r/stacked_rnn_cells/a/kernel": (4, 12), "r/stacked_rnn_cells/a/recurrent_kernel": (3, 12),
      "r/stacked_rnn_cells/b/kernel": (3, 6), "r/stacked_rnn_cells/b/recurrent_kernel": (2, 6)}),
    (lambda: L.Bidirectional(L.LSTM(3), name="bi"), (5, 4),
     {"bi/forward_lstm/lstm_cell/kernel": (4, 12), "bi/forward_lstm/lstm_cell/recurrent_kernel": (3, 12),
      "bi/backward_lstm/lstm_cell/kernel": (4, 12), "bi/backward_lstm/lstm_cell/recurrent_kernel": (3, 12)}),
    (lambda: L.TimeDistributed(L.Dense(3, name="dense"), name="td"), (5, 4), {"td/dense/kernel": (4, 3)}),
])
def test_every_layer_kind(make, input_shape, expected):
    model, layer = built(make(), input_shape)
    found = names(model)
    assert {n: tuple(s) for n, s in found.items()} == expected
    targets = tfw3.find_prunable_weights(model)
    assert all(t.owner is layer for t in targets)
    layer_variables = {id(v.value) for v in layer.weights}
    assert all(id(t.variable) in layer_variables for t in targets)  # the tf.Variables behind the Keras ones


def test_embedding_and_the_four_attention_kernels():
    tokens = keras.Input((6,), dtype="int32")
    h = L.Embedding(20, 8, name="emb")(tokens)
    h = L.MultiHeadAttention(2, 4, name="mha")(h, h)
    model = keras.Model(tokens, L.Dense(2, name="out")(L.GlobalAveragePooling1D()(h)))
    assert names(model) == {"emb/embeddings": (20, 8), "mha/query/kernel": (8, 2, 4), "mha/key/kernel": (8, 2, 4),
                            "mha/value/kernel": (8, 2, 4), "mha/attention_output/kernel": (2, 4, 8),
                            "out/kernel": (8, 2)}
    mha = model.get_layer("mha")
    kernels = [t.variable for t in tfw3.find_prunable_weights(model) if t.name.startswith("mha/")]
    assert [id(v) for v in kernels] == [id(d.kernel.value) for d in (mha.query_dense, mha.key_dense,
                                                                      mha.value_dense, mha.output_dense)]


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="sub")
        self.hidden = L.Dense(5, name="hidden")
        self.blocks = [L.Dense(4, name="block_a"), L.Dense(4, name="block_b")]
        self.head = L.Dense(2, name="head")

    def call(self, x):
        h = self.hidden(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_sequential_functional_subclassed_and_nested_names_are_unique():
    inner = keras.Sequential([keras.Input((4,)), L.Dense(4, name="d"), L.Dense(4, name="e")], name="inner")
    x = keras.Input((4,))
    model = keras.Model(x, L.Dense(2, name="d")(inner(x)), name="outer")
    assert names(model) == {"inner/d/kernel": (4, 4), "inner/e/kernel": (4, 4), "d/kernel": (4, 2)}
    sub = Subclassed()
    sub(np.zeros((1, 3), "float32"))
    assert list(names(sub)) == ["hidden/kernel", "block_a/kernel", "block_b/kernel", "head/kernel"]
    shared = L.Dense(4, name="shared")
    y = shared(shared(keras.Input((4,))))
    twice = keras.Sequential([keras.Input((4,)), shared, shared])
    assert y is not None and list(names(twice)) == ["shared/kernel", "shared/kernel_1"]


def test_selection_by_name_pattern_object_and_predicate():
    model = keras.Sequential([keras.Input((4,)), L.Dense(4, name="conv_a"), L.Dense(4, name="conv_b"),
                              L.Dense(2, name="head")])
    assert list(names(model, layers="conv*")) == ["conv_a/kernel", "conv_b/kernel"]
    assert list(names(model, layers=[model.layers[2]])) == ["head/kernel"]
    assert list(names(model, layers=lambda layer: layer.name.endswith("b"))) == ["conv_b/kernel"]
    with pytest.raises(ValueError, match="matches no layer"):
        tfw3.find_prunable_weights(model, layers="nothing*")
    with pytest.raises(TypeError, match="layer names, layer objects or a predicate"):
        tfw3.find_prunable_weights(model, layers=[3])


def test_unknown_layers_with_weights_warn_and_normalisations_stay_silent():
    class Scale(L.Layer):
        def build(self, input_shape):
            self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

        def call(self, x):
            return x * self.scale

    model = keras.Sequential([keras.Input((4,)), L.Dense(4, name="d"), L.BatchNormalization(name="bn"),
                              L.LayerNormalization(name="ln"), Scale(name="scale")])
    with pytest.warns(RuntimeWarning, match=r"left dense.*scale \(Scale, 4 weights\)") as record:
        targets = tfw3.find_prunable_weights(model)
    assert [t.name for t in targets] == ["d/kernel"]
    assert not any("bn" in str(w.message) or "ln (" in str(w.message) for w in record)
    assert unpruned_weight_count(model, targets) == 4 + 2 * 4 + 2 * 4 + 4  # bias, bn γβ, ln γβ, scale
    with pytest.raises(ValueError, match="was selected but cannot be pruned"):
        tfw3.find_prunable_weights(model, layers="scale")

    class OwnList(Scale):
        def get_prunable_weights(self):
            return [self.scale]

    own = keras.Sequential([keras.Input((4,)), OwnList(name="own")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert names(own) == {"own/" + own.layers[0].scale.name: (4,)}


def test_models_that_cannot_be_pruned():
    with pytest.raises(ValueError, match="no prunable layers"):
        tfw3.find_prunable_weights(keras.Sequential([keras.Input((4,)), L.ReLU()]))
    with pytest.raises(ValueError, match="not built"):
        tfw3.find_prunable_weights(Subclassed())
    with pytest.raises(ValueError, match="expected a Keras 3 keras.Model"):
        tfw3.find_prunable_weights(L.Dense(3))
