"""MNIST from a local folder of idx files, with a tensorflow-datasets fallback.

The folder is given by the ``path`` argument or the ``TFW_MNIST_DIR`` environment variable. It holds
the original idx files, gzipped or not: the official test set ``t10k-{images-idx3,labels-idx1}-ubyte``
and a training set, either the official ``train-*`` files or the 5k subset ``train-5k-*``.
Without a folder, ``tensorflow_datasets`` is asked for ``mnist`` (this needs a download).
"""
import gzip
import os

import numpy as np

from tf_woodfisher._keras import tf

MNIST_ENV_VAR = "TFW_MNIST_DIR"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

_SPLIT_PREFIXES = {"train": ("train", "train-5k"), "test": ("t10k",)}


def read_idx(path):
    """Read one idx file (gzipped or not) into a NumPy array of its stored dtype and shape."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown idx element type {data[2]:#x}")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {array.size} values")
    return array.reshape(shape)


def _find_split_files(folder, split):
    for prefix in _SPLIT_PREFIXES[split]:
        found = []
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{prefix}-{kind}-ubyte"
            candidates = [os.path.join(folder, name + ext) for ext in (".gz", "")]
            existing = [c for c in candidates if os.path.exists(c)]
            if not existing:
                break
            found.append(existing[0])
        if len(found) == 2:
            return found
    expected = " or ".join(f"{p}-images-idx3-ubyte[.gz]" for p in _SPLIT_PREFIXES[split])
    raise FileNotFoundError(f"no MNIST {split} split in {folder}: expected {expected} and its labels")


def mnist_folder(path=None):
    """The local MNIST folder: ``path``, else ``$TFW_MNIST_DIR``, else None."""
    folder = path or os.environ.get(MNIST_ENV_VAR)
    if folder and not os.path.isdir(folder):
        raise FileNotFoundError(f"MNIST folder {folder!r} does not exist")
    return folder


def load_mnist_arrays(split="train", path=None):
    """Images (n, 28, 28) uint8 and labels (n,) int64 of one split ('train' or 'test').

    Reads the idx folder (``path`` or ``$TFW_MNIST_DIR``); without one, falls back to tfds.
    """
    if split not in _SPLIT_PREFIXES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = mnist_folder(path)
    if folder:
        images_path, labels_path = _find_split_files(folder, split)
        images, labels = read_idx(images_path), read_idx(labels_path)
    else:
        images, labels = _load_tfds(split)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels.astype(np.int64)


def _load_tfds(split):
    try:
        import tensorflow_datasets as tfds

        images, labels = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1, as_supervised=True))
    except Exception as error:  # tfds raises many kinds of errors when it cannot download
        raise RuntimeError(
            f"no local MNIST folder (pass path= or set ${MNIST_ENV_VAR}) and tensorflow_datasets "
            f"could not provide it: {error}"
        ) from error
    return images[..., 0], labels


def normalize_images(images, flatten=False):
    """uint8 images → float32 scaled to [0, 1] then (x − 0.1307)/0.3081; shape (n, 784) or (n, 28, 28, 1)."""
    x = (images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    return x.reshape(len(x), -1) if flatten else x[..., None]


def load_mnist(split="train", path=None, flatten=False, shuffle_seed=None):
    """Normalised MNIST as NumPy arrays ``(x, y)``; x is (n, 784) when ``flatten`` else (n, 28, 28, 1).

    ``shuffle_seed`` permutes the rows (the 5k subset is stored sorted by class).
    """
    images, labels = load_mnist_arrays(split, path)
    x, y = normalize_images(images, flatten), labels
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(y))
        x, y = x[order], y[order]
    return x, y


def mnist_dataset(split="train", path=None, flatten=False, shuffle_seed=None):
    """The same as :func:`load_mnist`, as an unbatched ``tf.data.Dataset`` of (image, label)."""
    return tf.data.Dataset.from_tensor_slices(load_mnist(split, path, flatten, shuffle_seed))
