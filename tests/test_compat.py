"""The private hooks of tf_woodfisher.compat do what they promise, and fail loudly, naming the hook, when the installed
library changes."""
import numpy as np
import pytest
import tensorflow as tf

from tf_woodfisher import compat


def test_missing_pfor_converter_names_the_hook(monkeypatch):
    from tensorflow.python.ops.parallel_for import pfor

    monkeypatch.setattr(pfor, "_pfor_converter_registry", {})
    with pytest.raises(compat.CompatibilityError, match=r"pfor_converter\('Conv2DBackpropFilter'\).*tensorflow"):
        with compat.pfor_converter("Conv2DBackpropFilter", lambda original: original):
            pass


def test_converter_is_restored_after_use_and_after_an_error():
    from tensorflow.python.ops.parallel_for import pfor

    original = pfor._pfor_converter_registry["Conv2DBackpropFilter"]
    with pytest.raises(RuntimeError):
        with compat.pfor_converter("Conv2DBackpropFilter", lambda o: (lambda pfor_input: o(pfor_input))):
            assert pfor._pfor_converter_registry["Conv2DBackpropFilter"] is not original
            raise RuntimeError("inside")
    assert pfor._pfor_converter_registry["Conv2DBackpropFilter"] is original


def test_version_check_warns_only_for_other_versions(monkeypatch):
    assert compat.check_versions("tensorflow") == []  # the pinned version is installed
    monkeypatch.setitem(compat.TESTED, "tensorflow", "9.99")
    with pytest.warns(RuntimeWarning, match=r"tensorflow 2\.21.*tested: 9\.99"):
        assert compat.check_versions("tensorflow") == [("tensorflow", tf.__version__, "9.99")]


class _Branchy(tf.keras.layers.Layer):
    """A user's layer with Python control flow on a tensor, which only AutoGraph turns into a tf.cond."""

    def call(self, x):
        if tf.reduce_sum(x) > 0:
            return 2.0 * x
        return -x


def _branchy_loss(y, p):
    """A user's loss with Python control flow on a tensor: squared error, or 3× it for a negative batch."""
    error = tf.reduce_sum((p - y) ** 2, axis=-1)
    if tf.reduce_sum(y) < 0:
        return 3.0 * error
    return error


def test_library_functions_run_as_written_while_user_code_still_converts():
    model = tf.keras.Sequential([tf.keras.Input((3,)), _Branchy()])
    loss = compat.user_code(_branchy_loss)

    @compat.function
    def ours(x, y):
        return model(x), loss(y, x)

    plus, minus = tf.ones([2, 3]), -tf.ones([2, 3])
    for x, want_out, want_loss in ((plus, 2.0 * plus, [0.0, 0.0]), (minus, -minus, [0.0, 0.0])):
        out, value = ours(x, x)
        np.testing.assert_allclose(out.numpy(), want_out.numpy())
        np.testing.assert_allclose(value.numpy(), want_loss)
    np.testing.assert_allclose(ours(plus, minus)[1].numpy(), [36.0, 36.0])  # 3 · Σ (1 − (−1))²

    @compat.function
    def written(x):  # tf_woodfisher's own code is traced as written: a Python `if` on a tensor fails loudly
        if tf.reduce_sum(x) > 0:
            return x
        return -x

    with pytest.raises(TypeError, match="bool"):
        written(plus)
