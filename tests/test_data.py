import gzip

import numpy as np
import pytest

import tf_woodfisher as tfw


def test_mnist_folder_shapes_and_classes(mnist_dir):
    x, y = tfw.data.load_mnist("train", mnist_dir, shuffle_seed=0)
    assert x.shape == (5000, 28, 28, 1) and x.dtype == np.float32
    assert np.bincount(y).tolist() == [500] * 10
    assert len(set(y[:50].tolist())) > 5  # shuffled, no longer sorted by class
    xt, yt = tfw.data.load_mnist("test", mnist_dir, flatten=True)
    assert xt.shape == (10000, 784)
    # Normalisation (x/255 − 0.1307)/0.3081: background pixels map to −0.4242.
    assert np.isclose(xt.min(), -0.1307 / 0.3081, atol=1e-6)


def test_env_var_and_dataset(mnist_dir, monkeypatch):
    monkeypatch.setenv("TFW_MNIST_DIR", mnist_dir)
    ds = tfw.data.mnist_dataset("test", flatten=True)
    x, y = next(iter(ds.batch(4)))
    assert x.shape == (4, 784) and y.dtype.name == "int64"


def test_bad_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tfw.data.load_mnist("test", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        tfw.data.load_mnist("test", str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        tfw.data.load_mnist("valid", str(tmp_path))


def test_read_idx_rejects_garbage(tmp_path):
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        tfw.data.read_idx(str(bad))


def test_reference_mlpnet_accuracy(mlpnet_npz, mnist_flat):
    _, (x, y) = mnist_flat
    model = tfw.models.mlpnet(mlpnet_npz)
    correct = int((model.predict(x, batch_size=2000, verbose=0).argmax(1) == y).sum())
    assert correct == 9397  # the published 93.97%
