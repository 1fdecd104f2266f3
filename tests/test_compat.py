"""The private hooks of tf_woodfisher.compat fail loudly, naming the hook, when the installed library changes."""
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
