"""Layer-rule Fisher gradients (one batched forward and backward) against a plain loop of per-group tapes."""
import os

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from tf_woodfisher.fisher.rules import make_rule_gradient_fn, rule_coverage  # noqa: E402

CLASSES = 5
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")


def head(h):
    """Flatten and a Dense to CLASSES logits."""
    if len(h.shape) > 2:
        h = keras.layers.Flatten()(h)
    return keras.layers.Dense(CLASSES, name="head")(h)


def data(model, groups, group_size, seed=0, vocabulary=None, labels_shape=()):
    """x, y shaped (groups, group_size, ...) for the model's inputs."""
    rng = np.random.default_rng(seed)
    n = groups * group_size

    def one(spec):
        shape = [n] + list(spec.shape[1:])
        if spec.dtype.is_integer:
            return rng.integers(0, vocabulary, size=shape).astype(spec.dtype.as_numpy_dtype)
        return rng.normal(size=shape).astype(np.float32)

    inputs = [one(t) for t in model.inputs]
    x = inputs[0] if len(inputs) == 1 else inputs
    y = rng.integers(0, CLASSES, size=(n,) + labels_shape).astype(np.int32)
    group = lambda a: tf.constant(a.reshape((groups, group_size) + a.shape[1:]))  # noqa: E731
    return tf.nest.map_structure(group, x), group(y)


def loop_gradients(model, variables, x, y, loss=LOSS):
    """Per group, a plain GradientTape of the group's mean loss: (g, size) per variable."""
    rows = [[] for _ in variables]
    for i in range(int(y.shape[0])):
        xi = tf.nest.map_structure(lambda t: t[i], x)
        with tf.GradientTape() as tape:
            value = tf.reduce_mean(loss(y[i], model(xi, training=False)))
        for row, g in zip(rows, tape.gradient(value, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)):
            row.append(np.ravel(tf.convert_to_tensor(g).numpy()))
    return [np.stack(r) for r in rows]


def check(model, x, y, variables=None, loss=LOSS, expect_rules=None):
    """Rule gradients equal the loop; returns the function's coverage."""
    variables = list(variables if variables is not None else model.trainable_variables)
    fn = make_rule_gradient_fn(model, variables, loss)
    got = fn(x, y)
    want = loop_gradients(model, variables, x, y, loss)
    assert len(got) == len(variables)
    overall = max(float(np.abs(w).max()) for w in want)  # float32 noise of a gradient that cancels to ~0
    for v, g, w in zip(variables, got, want):
        assert g.dtype == tf.float32 and tuple(g.shape) == w.shape, v.name
        atol = max(2e-6 * float(np.abs(w).max()), 1e-6 * overall, 1e-9)
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=atol, err_msg=v.name)
    assert not any("call" in vars(layer) for layer in model._flatten_layers(include_self=False))
    if expect_rules is not None:
        used = {v.name: c for v, c in zip(variables, fn.coverage)}
        for name_part, expected in expect_rules.items():
            matches = [c for n, c in used.items() if name_part in n]
            assert matches, (name_part, used)
            assert all((c is not None) == expected for c in matches), (name_part, used, fn.fallback_reasons)
    return fn.coverage


def all_rules(coverage):
    return all(c is not None for c in coverage)


def _grouped_convolutions_run():
    """Whether TensorFlow runs a Keras grouped convolution (groups > 1) here at all: without oneDNN (x86 CPUs
    without AVX-512, where TF 2.21 leaves it off), Grappler fuses the convolution with its bias in a graph and
    the fused CPU kernel refuses groups, even in the forward pass."""

    @tf.function
    def forward(x, kernel, bias):
        return tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "VALID"), bias)

    try:
        forward(tf.ones([1, 3, 3, 4]), tf.ones([1, 1, 2, 4]), tf.zeros([4]))  # 2 groups of 2 input channels
        return True
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False


needs_grouped_convolutions = pytest.mark.skipif(
    not _grouped_convolutions_run(),
    reason="TensorFlow cannot run Keras grouped convolutions in a graph on this CPU (oneDNN off: 'Fused conv "
           "implementation does not support grouped convolutions'), not even forward")


@pytest.mark.parametrize("group_size", [1, 3])
def test_dense_mlp_and_rank3_dense(group_size):
    image = keras.Input((6,))
    seq = keras.Input((4, 3))
    vol = keras.Input((2, 3, 2))
    h = keras.layers.Dense(7, activation="tanh")(image)
    s = keras.layers.Dense(5, activation="relu")(seq)  # rank-3 input
    v = keras.layers.Dense(3, use_bias=False)(vol)  # rank-4 input
    merged = keras.layers.Concatenate()([h, keras.layers.Flatten()(s), keras.layers.Flatten()(v)])
    model = keras.Model([image, seq, vol], head(merged))
    x, y = data(model, 4, group_size)
    assert all_rules(check(model, x, y))


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-op", "per-offset-or-looped"])
@pytest.mark.parametrize("group_size", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_conv_variants(group_size, grouped, monkeypatch):
    """Both kernel-gradient paths of rank 1 and 2: one grouped Conv2DBackpropFilter over all groups (where
    TensorFlow has it, e.g. oneDNN) and, without it, per-offset contractions (b = 1) or per-group ops (b > 1)."""
    from tf_woodfisher.fisher import rules

    if grouped and not rules._grouped_conv_supported():
        pytest.skip("no grouped convolution kernel gradient in this TensorFlow build")
    monkeypatch.setattr(rules, "_GROUPED_SUPPORT", [grouped])
    seq = keras.Input((11, 4))
    img = keras.Input((9, 8, 4))
    vol = keras.Input((5, 6, 4, 2))
    outs = [
        keras.layers.Conv1D(3, 3, padding="causal", dilation_rate=2)(seq),
        keras.layers.Conv1D(3, 4, padding="valid", use_bias=False)(seq),
        keras.layers.Conv2D(5, 3, padding="same", activation="relu")(img),
        keras.layers.Conv2D(3, (2, 3), strides=(2, 1), padding="valid")(img),
        keras.layers.Conv2D(3, 3, strides=2, padding="same")(img),
        keras.layers.Conv2D(20, 4, padding="valid")(img),  # 4·4·4 > im2col depth: per-offset matmuls
        keras.layers.Conv3D(2, (2, 3, 2), strides=(1, 2, 1), padding="same")(vol),
    ]
    model = keras.Model([seq, img, vol], head(keras.layers.Concatenate()([keras.layers.Flatten()(o) for o in outs])))
    x, y = data(model, 3, group_size)
    assert all_rules(check(model, x, y))


@needs_grouped_convolutions
@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-op", "per-offset-or-looped"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_grouped_convolution_layers(group_size, grouped, monkeypatch):
    """Layers with groups > 1 (channel groups): strided, dilated and 1×1, on both kernel-gradient paths."""
    from tf_woodfisher.fisher import rules

    if grouped and not rules._grouped_conv_supported():
        pytest.skip("no grouped convolution kernel gradient in this TensorFlow build")
    monkeypatch.setattr(rules, "_GROUPED_SUPPORT", [grouped])
    seq = keras.Input((11, 4))
    img = keras.Input((9, 8, 4))
    outs = [
        keras.layers.Conv1D(4, 2, strides=3, padding="same", groups=2)(seq),
        keras.layers.Conv2D(4, 3, dilation_rate=2, padding="same", groups=2)(img),
        keras.layers.Conv2D(4, 1, groups=2)(img),  # a grouped 1×1 takes the convolution path, not the matmul
    ]
    model = keras.Model([seq, img], head(keras.layers.Concatenate()([keras.layers.Flatten()(o) for o in outs])))
    x, y = data(model, 3, group_size)
    assert all_rules(check(model, x, y))


def _counted(monkeypatch, name):
    """Replace ``rules.<name>`` by a wrapper that records whether each call applied (returned a result); returns
    (the record, the original)."""
    from tf_woodfisher.fisher import rules

    calls, original = [], getattr(rules, name)

    def counted(*args):
        result = original(*args)
        calls.append(result is not None)
        return result

    monkeypatch.setattr(rules, name, counted)
    return calls, original


@pytest.mark.parametrize("group_size", [1, 3])
def test_non_overlapping_windows_use_the_patch_matmul(group_size, monkeypatch):
    """strides = kernel size (a patch embedding): 'valid' with a cropped remainder, 'same' with k dividing the
    size, rank 1, 2 and 3, against the loop; the patch path is taken (the other paths are made to fail)."""
    from tf_woodfisher.fisher import rules

    calls, _ = _counted(monkeypatch, "_patch_kernel_gradient")
    monkeypatch.setattr(rules, "_grouped_kernel_gradient", lambda *a: pytest.fail("grouped path taken"))
    seq, img, vol = keras.Input((10, 3)), keras.Input((9, 8, 2)), keras.Input((4, 6, 4, 1))
    one = keras.Input((9, 8, 1))
    outs = [
        keras.layers.Conv1D(4, 3, strides=3, padding="valid")(seq),  # 10 = 3·3 + 1: the last position cropped
        keras.layers.Conv2D(5, 3, strides=3, padding="valid", use_bias=False)(img),  # 9 × 8 → 3 × 2 windows
        keras.layers.Conv2D(3, (3, 2), strides=(3, 2), padding="same")(one),  # 9/3, 8/2: no padding
        keras.layers.Conv3D(2, 2, strides=2, padding="valid")(vol),
    ]
    model = keras.Model([seq, img, one, vol],
                        head(keras.layers.Concatenate()([keras.layers.Flatten()(o) for o in outs])))
    x, y = data(model, 3, group_size)
    assert all_rules(check(model, x, y))
    assert calls and all(calls), calls


@pytest.mark.parametrize("group_size", [1, 3])
def test_stride_one_convs_over_few_channels_use_the_window_rows(group_size, monkeypatch):
    """Stride 1, K·C ≤ 1.5·O (a first layer over 1–2 channels): 'valid', 'same' and 'causal', dilated or not,
    rank 1, 2 and 3, against the loop; the window-rows path is taken (the other paths are made to fail), and
    a wider input (K·C > 1.5·O) or a strided one is refused by it."""
    from tf_woodfisher.fisher import rules

    calls, original = _counted(monkeypatch, "_window_rows_kernel_gradient")
    for other in ("_grouped_kernel_gradient", "_conv_kernel_gradient", "_looped_kernel_gradient"):
        monkeypatch.setattr(rules, other, lambda *a, name=other: pytest.fail(f"{name} taken"))
    seq, img, two, vol = keras.Input((10, 1)), keras.Input((9, 8, 1)), keras.Input((9, 8, 2)), keras.Input((4, 6, 4, 1))
    outs = [
        keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2)(seq),
        keras.layers.Conv2D(8, 3, padding="valid")(img),
        keras.layers.Conv2D(6, (3, 2), use_bias=False, activation="relu")(img),
        keras.layers.Conv2D(12, 3, padding="same", dilation_rate=2)(two),  # K·C = 18 = 1.5·O
        keras.layers.Conv3D(6, 2, padding="same")(vol),
    ]
    model = keras.Model([seq, img, two, vol],
                        head(keras.layers.Concatenate()([keras.layers.Flatten()(o) for o in outs])))
    x, y = data(model, 3, group_size)
    assert all_rules(check(model, x, y))
    assert calls and all(calls), calls
    cfg = dict(rank=2, kernel_size=(3, 3), strides=(1, 1), dilations=(1, 1), padding="valid")
    x, dz = tf.zeros([2, 9, 8, 2]), tf.zeros([2, 7, 6, 11])
    assert original(x, dz, cfg, 1, 2) is None  # K·C = 18 > 1.5 · 11
    assert original(x, tf.zeros([2, 4, 3, 12]), dict(cfg, strides=(2, 2)), 1, 2) is None


@pytest.mark.parametrize("group_size", [1, 3])
def test_pointwise_convs(group_size):
    """1×1 convolutions (a Dense over the strided positions: one batched matmul), 'same' and 'valid', strided
    on odd sizes (the grouped 1×1 is in test_grouped_convolution_layers)."""
    seq = keras.Input((9, 4))
    img = keras.Input((9, 7, 4))
    outs = [
        keras.layers.Conv2D(3, 1)(img),
        keras.layers.Conv2D(3, 1, strides=2, padding="same", use_bias=False)(img),
        keras.layers.Conv2D(2, 1, strides=(2, 3), padding="valid", activation="relu")(img),
        keras.layers.Conv1D(3, 1, strides=2, padding="same")(seq),
        keras.layers.Conv1D(2, 1, padding="causal")(seq),
    ]
    model = keras.Model([seq, img], head(keras.layers.Concatenate()([keras.layers.Flatten()(o) for o in outs])))
    x, y = data(model, 3, group_size)
    assert all_rules(check(model, x, y))


@pytest.mark.parametrize("group_size", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_transposed_convs(group_size):
    seq = keras.Input((5, 3))
    img = keras.Input((4, 3, 2))
    vol = keras.Input((2, 3, 2, 2))
    outs = [
        keras.layers.Conv1DTranspose(3, 3, strides=2, padding="same")(seq),
        keras.layers.Conv1DTranspose(2, 4, strides=2, padding="valid", output_padding=1)(seq),
        keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same")(img),
        keras.layers.Conv2DTranspose(2, (3, 2), strides=(2, 1), padding="valid", activation="relu")(img),
        keras.layers.Conv2DTranspose(2, 3, strides=2, padding="same", output_padding=1)(img),
        keras.layers.Conv3DTranspose(2, 2, strides=2, padding="valid")(vol),
    ]
    model = keras.Model([seq, img, vol], head(keras.layers.Concatenate()([keras.layers.Flatten()(o) for o in outs])))
    x, y = data(model, 3, group_size)
    assert all_rules(check(model, x, y))


@pytest.mark.parametrize("group_size", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_depthwise_and_separable(group_size):
    seq = keras.Input((10, 3))
    img = keras.Input((9, 9, 3))
    outs = [
        keras.layers.DepthwiseConv2D(3, depth_multiplier=2, strides=2, padding="same")(img),
        keras.layers.DepthwiseConv2D(3, dilation_rate=2, padding="valid", activation="relu")(img),
        keras.layers.DepthwiseConv1D(3, depth_multiplier=2, padding="same")(seq),
        keras.layers.SeparableConv2D(4, 3, strides=2, depth_multiplier=2, padding="same")(img),
        keras.layers.SeparableConv2D(2, 2, dilation_rate=2, use_bias=False)(img),
        keras.layers.SeparableConv1D(3, 3, padding="causal", dilation_rate=2)(seq),
        keras.layers.SeparableConv1D(2, 2, strides=2, padding="valid")(seq),
    ]
    model = keras.Model([seq, img], head(keras.layers.Concatenate()([keras.layers.Flatten()(o) for o in outs])))
    x, y = data(model, 3, group_size)
    coverage = check(model, x, y)
    assert all_rules(coverage)
    assert any(c == "separable_conv.pointwise_kernel" for c in coverage)
    assert any(c == "separable_conv.depthwise_kernel" for c in coverage)


@pytest.mark.parametrize("group_size", [1, 4])
def test_embedding_and_einsum_dense(group_size):
    tokens = keras.Input((6,), dtype="int32")
    e = keras.layers.Embedding(7, 4, name="embedding")(tokens)  # few ids: rows repeat within and across samples
    a = keras.layers.EinsumDense("abc,cd->abd", output_shape=(6, 3), bias_axes="d", activation="relu")(e)
    b = keras.layers.EinsumDense("...b,bc->...c", output_shape=2, bias_axes="c")(e)
    c = keras.layers.EinsumDense("abc,cde->abde", output_shape=(6, 2, 2), bias_axes="de")(e)
    d = keras.layers.EinsumDense("ab,bc->ac", output_shape=3)(keras.layers.Flatten()(e))
    out = head(keras.layers.Concatenate()([keras.layers.Flatten()(t) for t in (a, b, c)] + [d]))
    model = keras.Model(tokens, out)
    x, y = data(model, 3, group_size, vocabulary=7)
    assert all_rules(check(model, x, y))


@pytest.mark.parametrize("implementation", [pytest.param(1, marks=pytest.mark.slow), 2,
                                            pytest.param(3, marks=pytest.mark.slow)])
def test_locally_connected(implementation):
    seq = keras.Input((7, 2))
    img = keras.Input((5, 4, 2))
    padding = "valid" if implementation == 1 else "same"
    outs = [
        keras.layers.LocallyConnected1D(3, 3, strides=2, implementation=implementation, padding=padding)(seq),
        keras.layers.LocallyConnected2D(2, (2, 3), implementation=implementation, padding=padding,
                                        activation="relu")(img),
    ]
    model = keras.Model([seq, img], head(keras.layers.Concatenate()([keras.layers.Flatten()(o) for o in outs])))
    for group_size in (1, 3):
        x, y = data(model, 2, group_size)
        assert all_rules(check(model, x, y))


class OwnKernel(keras.layers.Layer):
    """A custom layer with its own kernel: no rule."""

    def build(self, input_shape):
        self.kernel = self.add_weight("kernel", shape=(input_shape[-1], 4))

    def call(self, x):
        return tf.tanh(tf.matmul(x, self.kernel)) * 2.0


class TrainingDense(keras.layers.Dense):
    """A Dense whose call depends on training: its rule cannot apply."""

    def call(self, inputs, training=None):
        outputs = super().call(inputs)
        return outputs * (0.5 if training else 1.5)


@pytest.mark.slow
def test_mixed_rules_and_fallbacks_with_batch_norm():
    img = keras.Input((8, 8, 2))
    seq = keras.Input((4, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv_a")(img)
    h = keras.layers.BatchNormalization(name="bn")(h)  # inference: moving statistics, no coupling
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(3, 3, strides=2, name="conv_b")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    r = keras.layers.LSTM(5, unroll=True, name="lstm")(seq)
    r = OwnKernel(name="own")(r)
    t = TrainingDense(3, name="training_dense")(keras.layers.Flatten()(seq))
    td = keras.layers.Flatten()(keras.layers.TimeDistributed(keras.layers.Dense(2), name="td_dense")(seq))
    nested = keras.Sequential([keras.layers.Dense(3, activation="relu", name="inner_dense")], name="nested")
    merged = keras.layers.Concatenate()([h, r, t, td, nested(keras.layers.Flatten()(seq))])
    model = keras.Model([img, seq], head(keras.layers.Dense(6, activation="relu", name="mid")(merged)))
    bn = model.get_layer("bn")  # non-trivial moving statistics
    bn.moving_mean.assign(np.linspace(-0.5, 0.5, 4).astype(np.float32))
    bn.moving_variance.assign(np.linspace(0.5, 2.0, 4).astype(np.float32))
    x, y = data(model, 3, 2)
    expect = {"conv_a": True, "conv_b": True, "mid": True, "head": True, "lstm": False, "own": False,
              "training_dense": False, "bn": False, "td_dense": True, "inner_dense": True}
    check(model, x, y, expect_rules=expect)
    variables = [model.get_layer("conv_a").kernel, model.get_layer("lstm").trainable_variables[0],
                 model.get_layer("own").kernel, model.get_layer("head").bias]
    assert rule_coverage(model, variables) == ["conv.kernel", None, None, "dense.bias"]


@pytest.mark.slow
def test_batch_statistics_couple_samples_so_everything_falls_back():
    img = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(3, 3, name="conv_a")(img)
    h = keras.layers.BatchNormalization(name="bn")(h, training=True)  # batch statistics baked in
    model = keras.Model(img, head(keras.layers.Conv2D(2, 3, name="conv_b")(h)))
    x, y = data(model, 3, 2)
    coverage = check(model, x, y)
    assert coverage == [None] * len(coverage)
    assert rule_coverage(model, model.trainable_variables, x[0]) == [None] * len(coverage)


@pytest.mark.slow
def test_channels_first_and_dynamic_shapes_fall_back():
    seq = keras.Input((None, 3))  # variable length
    c = keras.layers.Conv1D(2, 3, padding="same", name="dyn_conv")(seq)
    d = keras.layers.Dense(2, name="dyn_dense")(c)
    pooled = keras.layers.GlobalMaxPooling1D()(d)
    lc = keras.Input((3, 6))
    first = keras.layers.LocallyConnected1D(2, 2, data_format="channels_first", implementation=2,
                                            name="channels_first")(lc)
    model = keras.Model([seq, lc], head(keras.layers.Concatenate()([pooled, keras.layers.Flatten()(first)])))
    rng = np.random.default_rng(1)
    x = [tf.constant(rng.normal(size=(3, 2, 5, 3)).astype(np.float32)),
         tf.constant(rng.normal(size=(3, 2, 3, 6)).astype(np.float32))]
    y = tf.constant(rng.integers(0, CLASSES, size=(3, 2)).astype(np.int32))
    # A chunk has static inner shapes, so the convolution keeps its rule there ...
    check(model, x, y, expect_rules={"dyn_conv": True, "dyn_dense": True, "channels_first": False, "head": True})
    # ... while a signature with a dynamic length sends it to the fallback (a rank-3 Dense keeps its rule).
    spec = [tf.TensorSpec([None, None, 3]), tf.TensorSpec([None, 3, 6])]
    variables = [model.get_layer("dyn_conv").kernel, model.get_layer("dyn_dense").kernel,
                 model.get_layer("channels_first").kernel]
    assert rule_coverage(model, variables, spec) == [None, "dense.kernel", None]
    assert rule_coverage(model, variables) == ["conv.kernel", "dense.kernel", None]


@pytest.mark.slow
def test_tied_and_shared_weights():
    tokens = keras.Input((5,), dtype="int32")
    embedding = keras.layers.Embedding(9, 4, name="tied_embedding")
    shared = keras.layers.Dense(4, activation="tanh", name="shared")
    e = embedding(tokens)
    h = shared(shared(e))  # one layer called twice: its gradients add up
    pooled = keras.layers.GlobalAveragePooling1D()(h)

    class Tied(keras.layers.Layer):
        def call(self, x):
            return tf.matmul(x, embedding.embeddings, transpose_b=True)[:, :CLASSES]

    model = keras.Model(tokens, Tied()(pooled))
    x, y = data(model, 3, 2, vocabulary=9)
    check(model, x, y, expect_rules={"tied_embedding": False, "shared": True})


def test_sequence_loss_and_nested_outputs():
    seq = keras.Input((4, 3))
    h = keras.layers.Conv1D(4, 2, padding="same")(seq)
    logits = keras.layers.Dense(CLASSES)(h)  # (n, 4, CLASSES): a loss per sample and step, averaged in the group
    model = keras.Model(seq, logits)
    x, y = data(model, 3, 2, labels_shape=(4,))
    assert all_rules(check(model, x, y))


def test_patches_restored_on_error_and_one_trace_for_any_group_count():
    img = keras.Input((5, 5, 1))
    model = keras.Model(img, head(keras.layers.Conv2D(2, 3)(img)))

    def broken_loss(y_true, y_pred):
        raise RuntimeError("boom")

    x, y = data(model, 2, 2)
    with pytest.raises(RuntimeError, match="boom"):
        make_rule_gradient_fn(model, model.trainable_variables, broken_loss)(x, y)
    assert not any("call" in vars(layer) for layer in model._flatten_layers(include_self=False))
    traces = []

    def counting_loss(y_true, y_pred):
        traces.append(1)
        return LOSS(y_true, y_pred)

    fn = make_rule_gradient_fn(model, model.trainable_variables, counting_loss)
    for groups in (2, 5, 3):
        xs, ys = data(model, groups, 2, seed=groups)
        assert fn(xs, ys)[0].shape[0] == groups
    assert len(traces) == 1


@pytest.mark.slow
def test_scalar_loss_uses_fallback():
    image = keras.Input((4,))
    model = keras.Model(image, head(keras.layers.Dense(3)(image)))
    mean_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)  # reduces to a scalar
    x, y = data(model, 3, 2)
    fn = make_rule_gradient_fn(model, model.trainable_variables, mean_loss)
    got = fn(x, y)
    want = loop_gradients(model, model.trainable_variables, x, y, mean_loss)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-6)
    assert fn.coverage == [None] * len(got)


@pytest.mark.slow
def test_pruning_wrapper_writes_kernel_so_it_falls_back():
    tfmot = pytest.importorskip("tensorflow_model_optimization")
    img = keras.Input((6, 6, 2))
    base = keras.Model(img, head(keras.layers.Conv2D(3, 3, name="conv")(img)))
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(
        base, pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, 0))
    kernels = [v for v in wrapped.trainable_variables if "kernel" in v.name]
    x, y = data(wrapped, 3, 2)
    coverage = check(wrapped, x, y, variables=kernels)  # the wrapper assigns kernel·mask in every call
    assert coverage == [None, None]
    biases = [v for v in wrapped.trainable_variables if "bias" in v.name]
    assert all(c is not None for c in check(wrapped, x, y, variables=biases))


@pytest.mark.slow
def test_keras3_layers():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("Keras 3 not installed")
    img = keras3.Input((7, 7, 2))
    seq = keras3.Input((6, 3))
    tokens = keras3.Input((4,), dtype="int32")
    outs = [keras3.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu")(img),
            keras3.layers.DepthwiseConv2D(3, depth_multiplier=2)(img),
            keras3.layers.SeparableConv1D(2, 3, padding="same")(seq),
            keras3.layers.Conv1D(2, 2, padding="causal")(seq),
            keras3.layers.Conv2DTranspose(2, 3, strides=2, padding="same")(img),
            keras3.layers.Dense(3)(seq),
            keras3.layers.Embedding(5, 2)(tokens)]
    merged = keras3.layers.Concatenate()([keras3.layers.Flatten()(o) for o in outs])
    merged = keras3.layers.BatchNormalization()(merged)  # no rule: the default fallback, with Keras 3 variables
    model = keras3.Model([img, seq, tokens], keras3.layers.Dense(CLASSES)(merged))
    bn = model.layers[-2]
    bn.moving_mean.assign(np.linspace(-0.3, 0.3, bn.moving_mean.shape[0]).astype(np.float32))
    loss = keras3.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    variables = [v.value for v in model.trainable_variables]  # the tf.Variables, as a tape watches them
    for group_size in (1, 2):
        rng = np.random.default_rng(group_size)
        shape = (3, group_size)
        x = [tf.constant(rng.normal(size=shape + (7, 7, 2)).astype(np.float32)),
             tf.constant(rng.normal(size=shape + (6, 3)).astype(np.float32)),
             tf.constant(rng.integers(0, 5, size=shape + (4,)).astype(np.int32))]
        y = tf.constant(rng.integers(0, CLASSES, size=shape).astype(np.int32))
        fn = make_rule_gradient_fn(model, model.trainable_variables, loss)
        got = fn(x, y)
        assert sum(c is None for c in fn.coverage) == 2, fn.fallback_reasons  # gamma and beta
        for g, w in zip(got, loop_gradients(model, variables, x, y, loss)):
            np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=2e-6 * max(float(np.abs(w).max()), 1e-3))


@pytest.mark.slow
@pytest.mark.parametrize("eager", [True, False])
def test_checked_rules_fall_back_when_a_layer_couples_the_samples(monkeypatch, eager):
    """A Lambda that subtracts the batch mean couples samples: the rules would be wrong; the check catches it,
    with its reference run eagerly (a cheap first call) or compiled (a costly one)."""
    from tf_woodfisher import compat
    from tf_woodfisher.fisher import rules
    from tf_woodfisher.fisher.gradients import make_gradient_fn
    from tf_woodfisher.fisher.rules import make_checked_gradient_fn

    monkeypatch.setattr(rules, "_EAGER_CHECK_SECONDS", float("inf") if eager else 0.0)
    compiled, function = [], compat.function

    def counting(fn=None, **kwargs):
        compiled.append(getattr(fn, "__name__", None))
        return function(fn, **kwargs) if fn is not None else function(**kwargs)

    monkeypatch.setattr(compat, "function", counting)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="tanh", name="d1")(inputs)
    centred = keras.layers.Lambda(lambda t: t - tf.reduce_mean(t, axis=0, keepdims=True))(hidden)
    coupled = keras.Model(inputs, head(centred))
    plain = keras.Model(inputs, head(hidden))
    for model, couples in ((coupled, True), (plain, False)):
        variables = [layer.kernel for layer in model.layers if hasattr(layer, "kernel")]
        forward = lambda x, model=model: model(x, training=False)  # noqa: E731
        x, y = data(model, 6, 4)
        reference = make_gradient_fn(forward, variables, LOSS)(x, y)
        checked = make_checked_gradient_fn(model, forward, variables, LOSS)
        if couples:
            with pytest.warns(RuntimeWarning, match="couple the samples"):
                rows = checked(x, y)
        else:
            rows = checked(x, y)
        for got, expected in zip(rows, reference):
            np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
        again = checked(x, y)  # the decision is kept: no second check, same rows
        for got, expected in zip(again, reference):
            np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    assert compiled.count("one_group") == (0 if eager else 2)  # one reference per model


def test_keras_own_layers_and_losses_skip_the_check_and_anything_else_keeps_it(monkeypatch):
    """keeps_samples_apart accepts a model of Keras' own sample-wise layers only (nested models too, axes counted
    back from the end that miss the batch axis) and refuses a Lambda, a subclass of a Keras layer, a call replaced on
    the instance, a recurrent layer, a subclassed model, a normalisation or softmax over the batch axis and an
    activation that is not Keras' own;
    KerasFisherLoss.builtin accepts Keras' losses by name, object or function, per output, and refuses a lambda, a
    custom Loss and Keras' wrapper class around a custom function. Through keras_problem the check's reference is
    never traced for a trusted model and loss, and is for an untrusted one of either; a coupling Lambda still falls
    back."""
    from tf_woodfisher import compat
    from tf_woodfisher.config import WoodFisherConfig
    from tf_woodfisher.fisher import rules
    from tf_woodfisher.fisher.gradients import fisher_loss, make_gradient_fn
    from tf_woodfisher.fisher.rules import keeps_samples_apart
    from tf_woodfisher.tfmot import find_prunable_weights
    from tf_woodfisher.tfmot.problem import keras_problem, per_sample_loss
    from tf_keras.src.losses import LossFunctionWrapper

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="tanh", name="d1")(inputs)
    normed = keras.layers.Dropout(0.1)(keras.layers.BatchNormalization()(hidden))
    plain = keras.Model(inputs, head(normed))
    nested = keras.Model(inputs, keras.Sequential([keras.layers.Dense(4), keras.layers.ReLU()])(plain(inputs)))
    coupled = keras.Model(inputs, head(keras.layers.Lambda(lambda t: t - tf.reduce_mean(t, 0, keepdims=True))(hidden)))

    class MyDense(keras.layers.Dense):
        pass

    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    subclass = keras.Model(inputs, MyDense(3)(inputs))
    replaced = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)])
    replaced.layers[0].call = lambda x, **kwargs: x
    recurrent = keras.Sequential([keras.Input((4, 6)), keras.layers.LSTM(3)])
    net = Net()
    net(tf.zeros([1, 6]))
    normalised = keras.Sequential([keras.Input((5, 6)), keras.layers.LayerNormalization(axis=-2),
                                   keras.layers.Softmax(axis=1)])
    across = [keras.Sequential([keras.Input((6,)), keras.layers.UnitNormalization(axis=-2)]),
              keras.Sequential([keras.Input((6,)), keras.layers.Softmax(axis=0)]),
              keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation=lambda t: t - tf.reduce_mean(t))]),
              keras.Sequential([keras.Input((6,)), keras.layers.Activation(tf.nn.relu)])]  # not Keras' own: checked
    assert keeps_samples_apart(plain) and keeps_samples_apart(nested) and keeps_samples_apart(normalised)
    for model in (coupled, subclass, replaced, recurrent, net, *across):
        assert not keeps_samples_apart(model), model.name

    class MyLoss(keras.losses.Loss):
        def call(self, y_true, y_pred):
            return tf.reduce_mean(tf.square(y_pred), axis=-1)

    trusted = ["sparse_categorical_crossentropy", "mse", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
               keras.losses.MeanSquaredError(), keras.losses.categorical_crossentropy, ["mse", None],
               {"head": "mse"}]
    untrusted = [lambda y, p: tf.reduce_mean(tf.square(p), -1), MyLoss(), ["mse", MyLoss()]]
    assert all(per_sample_loss(loss).builtin for loss in trusted)
    assert not any(per_sample_loss(loss).builtin for loss in untrusted)
    wrapped = per_sample_loss("mse")
    wrapped.losses = LossFunctionWrapper(lambda y, p: tf.reduce_mean(tf.square(p), -1))  # Keras' class, user's fn
    assert not wrapped.builtin

    monkeypatch.setattr(rules, "_EAGER_CHECK_SECONDS", 0.0)  # a reference, if any, is compiled: counted
    compiled, function = [], compat.function
    monkeypatch.setattr(compat, "function", lambda fn=None, **kw: compiled.append(getattr(fn, "__name__", None))
                        or (function(fn, **kw) if fn is not None else function(**kw)))
    logits = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    own_loss = lambda y, p: keras.losses.sparse_categorical_crossentropy(y, p, from_logits=True)  # noqa: E731
    config = WoodFisherConfig(method="woodfisher", num_gradients=8)
    for model, loss, checks in ((plain, logits, 0), (plain, own_loss, 1), (coupled, logits, 1)):
        x, y = data(model, 6, 4)
        dataset = tf.data.Dataset.from_tensor_slices((np.reshape(x, (24, -1)), np.reshape(y, (24,))))
        problem = keras_problem(model, find_prunable_weights(model), dataset, loss, config)
        variables = [t.variable for t in find_prunable_weights(model)]
        loss_fn = fisher_loss(problem.loss, dataset)
        reference = make_gradient_fn(problem.forward, variables, loss_fn)(x, y)
        before = compiled.count("one_group")
        gradient_fn = problem.make_gradient_fn(problem.forward, variables, loss_fn)
        if model is coupled:
            with pytest.warns(RuntimeWarning, match="couple the samples"):
                rows = gradient_fn(x, y)
        else:
            rows = gradient_fn(x, y)
        assert compiled.count("one_group") - before == checks, (model.name, loss)
        for got, expected in zip(rows, reference):
            np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_size", [1, 3])
def test_rows_known_finite_are_certified_from_the_layer_operands_and_never_hide_a_non_finite_row(
        group_size, monkeypatch):
    """GradientRows.finite: the rows of a Dense layer, whose inputs and output gradients hold fewer entries per group
    than its rows, are certified finite (and equal the loop); a convolution's, whose operands hold more, are not (left
    to the count). Rows that overflow to infinity or hold a NaN are never certified, and collect_gradient_columns still
    counts them and names the variable; with normal rows it skips the count of every certified variable."""
    from tf_woodfisher.fisher import gradients

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    model = keras.Model(inputs, head(keras.layers.Dense(16, activation="tanh", name="wide")(
        keras.layers.Flatten()(conv))))
    x, y = data(model, 4, group_size)
    check(model, x, y)
    variables = list(model.trainable_variables)
    fn = make_rule_gradient_fn(model, variables, LOSS)
    rows = fn(x, y)
    flags = dict(zip([v.name for v in variables], np.asarray(rows.finite).tolist()))
    assert flags == {v.name: not v.name.startswith("conv") for v in variables}, flags

    def collect(fn, x, y, loss):
        dataset = tf.data.Dataset.from_tensor_slices((np.reshape(x, (-1, *x.shape[2:])), np.reshape(y, (-1,))))
        return gradients.collect_gradient_columns(lambda t: model(t, training=False), variables, dataset, loss,
                                                  int(x.shape[0]), group_size, shuffle_buffer=0, batched=False,
                                                  gradient_fn=fn)

    counted = []
    original = gradients._count_non_finite

    def counting(pieces, known_finite=None):
        counted.append([int(p.shape.num_elements()) for p, k in
                        zip(pieces, [False] * len(pieces) if known_finite is None else known_finite) if not k])
        return original(pieces, known_finite)

    monkeypatch.setattr(gradients, "_count_non_finite", counting)
    columns = collect(fn, x, y, LOSS)
    for got, want in zip(columns, rows):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert counted == [[int(v.shape.num_elements()) * 4 for v in variables if v.name.startswith("conv")]]

    # inputs × 1e4 and the wide kernel × 1e-4: the wide layer's inputs are about 1e4 and its tanh does not
    # saturate; the loss × 1e36 stays finite (about 1e36), but the wide rows, its inputs ⊗ dz with dz about 1e35,
    # overflow from finite operands
    wide = model.get_layer("wide").kernel
    kept = wide.numpy()
    wide.assign(kept * 1e-4)
    scaled = lambda labels, logits: 1e36 * LOSS(labels, logits)  # noqa: E731
    big = x.numpy() * 1e4
    scaled_fn = make_rule_gradient_fn(model, variables, scaled)
    overflowed = scaled_fn(tf.constant(big), y)
    index = [v.name for v in variables].index(wide.name)
    assert np.all(np.isfinite(scaled(y[0], model(big[0], training=False)).numpy()))
    assert not np.all(np.isfinite(overflowed[index].numpy()))
    assert not np.asarray(overflowed.finite)[index]
    with pytest.raises(ValueError, match="NaN or infinite gradients in [1-9].*first in wide"):
        collect(scaled_fn, big, y, scaled)
    wide.assign(kept)
    bad = x.numpy().copy()
    bad[-1, -1, 2, 3] = np.nan
    nan_rows = fn(tf.constant(bad), y)
    assert not np.asarray(nan_rows.finite).any()
    with pytest.raises(ValueError, match="NaN or infinite gradients"):
        collect(fn, bad, y, LOSS)


def test_finite_certificate_is_the_bound_on_the_operands_norms():
    """_finite_certificate against the bound computed by NumPy in float64: calls · Π_t max(√n_t ‖t‖₂, 1) below
    float32's largest value / 2^10, over operand magnitudes from 1 to 1e19 (squares that overflow float32 withhold it:
    that norm is infinite), a NaN or an infinity anywhere, and the number of calls."""
    from tf_woodfisher.fisher.rules import _finite_certificate

    limit = float(np.finfo(np.float32).max) / 2 ** 10
    rng = np.random.default_rng(0)
    seen = set()
    for scale_a in (1.0, 1e8, 1e15, 1e16, 1e17, 1e18, 1e19):
        for scale_b in (1e-3, 1.0, 1e15, 1e17):
            for calls in (1, 3, 2 ** 20):
                a = (rng.normal(size=(40, 25)) * scale_a).astype(np.float32)
                b = (rng.normal(size=(40, 4)) * scale_b).astype(np.float32)
                norms = [np.sqrt(np.sum(np.square(t, dtype=np.float32), dtype=np.float32)) for t in (a, b)]
                bound = calls * np.prod([max(np.sqrt(t.size) * float(n), 1.0) for t, n in zip((a, b), norms)])
                expected = bool(np.all(np.isfinite(norms)) and bound < limit)
                got = bool(_finite_certificate([tf.constant(a), tf.constant(b)], calls))
                assert got == expected, (scale_a, scale_b, calls, bound)
                seen.add(expected)
    assert seen == {True, False}
    finite = np.ones((10, 3), np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        broken = finite.copy()
        broken[4, 1] = bad
        assert not bool(_finite_certificate([tf.constant(finite), tf.constant(broken)], 1))
    assert bool(_finite_certificate([tf.constant(finite)] * 2, 1))
