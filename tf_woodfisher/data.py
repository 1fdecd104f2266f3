"""MNIST and CIFAR-10 from local folders, with a tensorflow-datasets fallback.

MNIST: the folder is given by the ``path`` argument or the ``TFW_MNIST_DIR`` environment variable. It
holds the original idx files, gzipped or not: the official test set
``t10k-{images-idx3,labels-idx1}-ubyte`` and a training set, either the official ``train-*`` files or
the 5k subset ``train-5k-*``.

CIFAR-10: the folder is given by ``path`` or ``TFW_CIFAR10_DIR``. It holds the complete official python
batches (``data_batch_1`` … ``data_batch_5``, ``test_batch``; directly or in ``cifar-10-batches-py/``),
md5-checked against the official checksums, or else ``cifar10_subset.npz`` (the first 1,017 images of
each official batch, see ``shared/datasets/README.md``).

Without a folder, ``tensorflow_datasets`` is asked for ``mnist`` / ``cifar10`` (this needs a download).
This module imports only NumPy at load time; TensorFlow is imported where a ``tf.data`` pipeline is built.
"""
import gzip
import hashlib
import io
import os
import pickle
import zipfile
import zlib

import numpy as np

MNIST_ENV_VAR = "TFW_MNIST_DIR"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

_SPLIT_PREFIXES = {"train": ("train", "train-5k"), "test": ("t10k",)}


def read_idx(path):
    """Read one idx file (gzipped or not) into a NumPy array of its stored dtype and shape.

    Args:
        path: the idx file (str); a name ending in ``.gz`` is read through gzip.

    Returns:
        The array, with the shape of the idx header and its element type (uint8, int8, big-endian
        int16/int32/float32/float64).

    Raises:
        ValueError: a bad magic number, an unknown element type, or a size that does not match the header.
    """
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
    """The local MNIST folder: ``path``, else ``$TFW_MNIST_DIR``, else None.

    Args:
        path: a folder, or None to read ``$TFW_MNIST_DIR``.

    Returns:
        The folder, or None when neither is set.

    Raises:
        FileNotFoundError: the folder does not exist.
    """
    folder = path or os.environ.get(MNIST_ENV_VAR)
    if folder and not os.path.isdir(folder):
        raise FileNotFoundError(f"MNIST folder {folder!r} does not exist")
    return folder


def load_mnist_arrays(split="train", path=None):
    """Images (n, 28, 28) uint8 and labels (n,) int64 of one split ('train' or 'test').

    Reads the idx folder (``path`` or ``$TFW_MNIST_DIR``); without one, falls back to tfds.

    Args:
        split: 'train' (the official ``train-*`` files, else the 5k subset ``train-5k-*``) or 'test'
            (``t10k-*``).
        path: the idx folder, or None for ``$TFW_MNIST_DIR`` (then tfds when that is unset too).

    Returns:
        ``(images, labels)``: uint8 (n, 28, 28) and int64 (n,) labels 0 … 9.

    Raises:
        ValueError: a bad ``split``, an unreadable idx file, or different numbers of images and labels.
        FileNotFoundError: the folder does not exist or lacks the split's idx files.
        RuntimeError: no folder is given and tfds cannot provide MNIST.
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
    """uint8 images → float32 scaled to [0, 1] then (x − 0.1307)/0.3081; shape (n, 784) or (n, 28, 28, 1).

    Args:
        images: (n, 28, 28) uint8 pixel values 0 … 255.
        flatten: return (n, 784) rows instead of (n, 28, 28, 1) NHWC images.

    Returns:
        float32 (n, 784) when ``flatten`` else (n, 28, 28, 1), normalised with :data:`MNIST_MEAN` and
        :data:`MNIST_STD`.
    """
    x = (images.astype(np.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
    return x.reshape(len(x), -1) if flatten else x[..., None]


def load_mnist(split="train", path=None, flatten=False, shuffle_seed=None):
    """Normalised MNIST as NumPy arrays ``(x, y)``; x is (n, 784) when ``flatten`` else (n, 28, 28, 1).

    ``shuffle_seed`` permutes the rows (the 5k subset is stored sorted by class).

    Args:
        split: 'train' or 'test'.
        path: the idx folder (see :func:`load_mnist_arrays`), or None for ``$TFW_MNIST_DIR`` / tfds.
        flatten: x as (n, 784) rows instead of (n, 28, 28, 1) images.
        shuffle_seed: permute the rows with ``np.random.default_rng(shuffle_seed)``; None keeps the
            stored order.

    Returns:
        ``x``: float32 (n, 784) or (n, 28, 28, 1), (x/255 − 0.1307)/0.3081; ``y``: int64 (n,) labels 0 … 9.

    Raises:
        ValueError, FileNotFoundError, RuntimeError: as :func:`load_mnist_arrays`.
    """
    images, labels = load_mnist_arrays(split, path)
    return _shuffled(normalize_images(images, flatten), labels, shuffle_seed)


def _shuffled(x, y, seed):
    """(x, y) with rows permuted by ``seed`` (None: as they are)."""
    if seed is None:
        return x, y
    order = np.random.default_rng(seed).permutation(len(y))
    return x[order], y[order]


def mnist_dataset(split="train", path=None, flatten=False, shuffle_seed=None):
    """The same as :func:`load_mnist`, as an unbatched ``tf.data.Dataset`` of (image, label).

    Args:
        split: 'train' or 'test'.
        path: the idx folder, or None for ``$TFW_MNIST_DIR`` / tfds.
        flatten: images as (784,) float32 vectors instead of (28, 28, 1).
        shuffle_seed: permute the samples once with this seed; None keeps the stored order.

    Returns:
        An unbatched ``tf.data.Dataset`` of (float32 image, int64 label) pairs.

    Raises:
        ValueError, FileNotFoundError, RuntimeError: as :func:`load_mnist_arrays`.
    """
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(load_mnist(split, path, flatten, shuffle_seed))


# --------------------------------------------------------------------------------------------- CIFAR-10

CIFAR10_ENV_VAR = "TFW_CIFAR10_DIR"
#: Per-channel mean and std of the reference ResNet-20's input normalisation: (x/255 − 0.5)/0.5 ∈ [−1, 1].
CIFAR10_MEAN, CIFAR10_STD = 0.5, 0.5
CIFAR10_LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_SUBSET_FILE = "cifar10_subset.npz"
CIFAR10_BATCHES_DIR = "cifar-10-batches-py"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
#: The official md5 of each complete python batch (cifar-10-python.tar.gz).
CIFAR10_BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
#: md5 of the array bytes (C order) of each array of ``cifar10_subset.npz``.
CIFAR10_SUBSET_MD5 = {
    "x_train": "1cd03138cda319861da4963f1e6a81ca",
    "y_train": "be9c71478ba469930b80bb9008589c05",
    "x_test": "0c4c38dfa836385de34b32047bf21481",
    "y_test": "dccf1fa74ac8724bb1790516cb80da42",
}


def _md5(data):
    return hashlib.md5(data).hexdigest()


def cifar10_folder(path=None):
    """The local CIFAR-10 folder: ``path``, else ``$TFW_CIFAR10_DIR``, else None.

    Args:
        path: a folder, or None to read ``$TFW_CIFAR10_DIR``.

    Returns:
        The folder (str), or None when neither is set.

    Raises:
        FileNotFoundError: the folder does not exist (the message names ``TFW_CIFAR10_DIR`` when the
            folder came from it).
    """
    if path:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"CIFAR-10 folder {str(path)!r} does not exist")
        return str(path)
    folder = os.environ.get(CIFAR10_ENV_VAR)
    if folder and not os.path.isdir(folder):
        raise FileNotFoundError(
            f"CIFAR-10 folder {folder!r} from ${CIFAR10_ENV_VAR} does not exist: set {CIFAR10_ENV_VAR} to a "
            f"folder holding the official python batches or {CIFAR10_SUBSET_FILE}, or unset it"
        )
    return folder or None


def _find_cifar10_batches(folder, split):
    """Paths of the split's complete set of python batches in ``folder`` (or its cifar-10-batches-py/), or None."""
    names = _CIFAR10_BATCHES[split]
    for directory in (folder, os.path.join(folder, CIFAR10_BATCHES_DIR)):
        present = [n for n in names if os.path.isfile(os.path.join(directory, n))]
        if len(present) == len(names):
            return [os.path.join(directory, n) for n in names]
        if present:
            missing = [n for n in names if n not in present]
            raise FileNotFoundError(
                f"CIFAR-10 {split} split in {directory}: found {present} but not {missing}; put all of "
                f"{list(names)} there (from {CIFAR10_URL}), or remove them to use {CIFAR10_SUBSET_FILE}"
            )
    return None


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 python batch holds: dicts, lists, bytes, numbers and NumPy arrays."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar10_batch(path, expected_md5=None):
    """Read one CIFAR-10 python batch (a pickle of ``b'data'`` and ``b'labels'``).

    Args:
        path: the batch file, e.g. ``.../cifar-10-batches-py/data_batch_1``.
        expected_md5: the md5 (hex) the file must have, or None for no check. The pickle is only
            unpickled (with a restricted unpickler) after this check.

    Returns:
        ``(images, labels)``: uint8 (n, 32, 32, 3) NHWC in RGB order and int64 (n,) in 0 … 9.

    Raises:
        ValueError: the md5 does not match (a corrupted or truncated file), or the file is not a
            CIFAR-10 python batch.
    """
    with open(path, "rb") as f:
        raw = f.read()
    name = os.path.basename(path)
    if expected_md5 is not None and _md5(raw) != expected_md5:
        raise ValueError(
            f"{path}: md5 {_md5(raw)} ({len(raw):,} bytes) is not the official {expected_md5} of {name}: the "
            f"file is corrupted or truncated (public copies are often cut short after 3 MiB). Replace it with "
            f"the one from {CIFAR10_URL}, or remove the python batches from the folder so that "
            f"{CIFAR10_SUBSET_FILE} is read instead"
        )
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(batch[b"data"] if b"data" in batch else batch["data"])
        labels = np.asarray(batch[b"labels"] if b"labels" in batch else batch["labels"], dtype=np.int64)
    except Exception as error:  # truncated pickles raise EOFError, UnpicklingError, KeyError, TypeError …
        raise ValueError(
            f"{path} is not a readable CIFAR-10 python batch ({type(error).__name__}: {error}); replace it "
            f"with the one from {CIFAR10_URL}"
        ) from error
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: expected uint8 data (n, 3072) and n labels, got data {data.dtype} {data.shape} and "
            f"{labels.shape[0]} labels"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels outside 0 … 9")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def read_cifar10_subset(path, split="train", verify=True):
    """Read one split of ``cifar10_subset.npz``.

    Args:
        path: the npz file.
        split: 'train' (``x_train``/``y_train``, 5,085 images) or 'test' (``x_test``/``y_test``, 1,017).
        verify: check each array against :data:`CIFAR10_SUBSET_MD5` (md5 of its bytes).

    Returns:
        ``(images, labels)``: uint8 (n, 32, 32, 3) NHWC and int64 (n,).

    Raises:
        ValueError: the file is truncated or corrupted (not a readable npz, a bad CRC, a missing array
            or an md5 mismatch), or a bad ``split``.
        FileNotFoundError: there is no such file.
    """
    if split not in _CIFAR10_BATCHES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"CIFAR-10 subset {str(path)!r} does not exist")
    keys = (f"x_{split}", f"y_{split}")
    advice = (f"copy {CIFAR10_SUBSET_FILE} again from shared/datasets/cifar10/ "
              "(file md5 e98607fef967a436a9531a2655089a73)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [k for k in keys if k not in arrays.files]
            if not missing:
                images, labels = (np.ascontiguousarray(arrays[k]) for k in keys)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
        raise ValueError(f"{path} is truncated or corrupted ({type(error).__name__}: {error}): {advice}") from error
    if missing:
        raise ValueError(f"{path} lacks the arrays {missing}: {advice}")
    if verify:
        for key, array in zip(keys, (images, labels)):
            digest = _md5(array.tobytes())
            if digest != CIFAR10_SUBSET_MD5[key]:
                raise ValueError(
                    f"{path}: array {key} has md5 {digest}, not the expected {CIFAR10_SUBSET_MD5[key]}: the file "
                    f"is corrupted or not the shared subset; {advice} (or pass verify=False for a subset of your own)"
                )
    if images.dtype != np.uint8 or images.shape[1:] != (32, 32, 3) or labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: expected uint8 {keys[0]} (n, 32, 32, 3) and n labels, got {images.dtype} "
                         f"{images.shape} and {labels.shape}")
    return images, labels.astype(np.int64)


def load_cifar10_arrays(split="train", path=None, verify=True):
    """Images (n, 32, 32, 3) uint8 (NHWC, RGB) and labels (n,) int64 of one CIFAR-10 split.

    Reads the folder (``path`` or ``$TFW_CIFAR10_DIR``): the complete official python batches of the split
    when they are there (``data_batch_1`` … ``5`` for 'train', 50,000 images; ``test_batch`` for 'test',
    10,000), directly in the folder or in its ``cifar-10-batches-py/``; otherwise ``cifar10_subset.npz``
    (5,085 training / 1,017 test images). Without a folder, falls back to tfds (a download).

    Args:
        split: 'train' or 'test'.
        path: the folder, or None for ``$TFW_CIFAR10_DIR`` (then tfds when that is unset too).
        verify: md5-check the files (the official checksums :data:`CIFAR10_BATCH_MD5`, and
            :data:`CIFAR10_SUBSET_MD5` for the subset's arrays).

    Returns:
        ``(images, labels)``.

    Raises:
        ValueError: a bad ``split``, or a file that is corrupted, truncated or fails its md5 check.
        FileNotFoundError: the folder does not exist, holds only some of the split's batches, or holds
            neither the batches nor the subset.
        RuntimeError: no folder is given and tfds cannot provide CIFAR-10.
    """
    if split not in _CIFAR10_BATCHES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = cifar10_folder(path)
    if not folder:
        images, labels = _load_cifar10_tfds(split)
        return images, labels.astype(np.int64)
    batches = _find_cifar10_batches(folder, split)
    if batches is not None:
        parts = [read_cifar10_batch(b, CIFAR10_BATCH_MD5.get(os.path.basename(b)) if verify else None)
                 for b in batches]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    subset = os.path.join(folder, CIFAR10_SUBSET_FILE)
    if os.path.isfile(subset):
        return read_cifar10_subset(subset, split, verify)
    raise FileNotFoundError(
        f"no CIFAR-10 {split} split in {folder}: expected the python batches {list(_CIFAR10_BATCHES[split])} "
        f"(there or in {CIFAR10_BATCHES_DIR}/) or {CIFAR10_SUBSET_FILE}"
    )


def _load_cifar10_tfds(split):
    try:
        import tensorflow_datasets as tfds

        images, labels = tfds.as_numpy(tfds.load("cifar10", split=split, batch_size=-1, as_supervised=True))
    except Exception as error:  # tfds raises many kinds of errors when it cannot download
        raise RuntimeError(
            f"no local CIFAR-10 folder (pass path= or set ${CIFAR10_ENV_VAR}) and tensorflow_datasets "
            f"could not provide it: {error}"
        ) from error
    return images, labels


def normalize_cifar10(images):
    """uint8 images (n, 32, 32, 3) → float32 (x/255 − 0.5)/0.5, in [−1, 1] (the reference ResNet-20's input).

    Args:
        images: (n, 32, 32, 3) uint8 NHWC pixel values 0 … 255 (any array-like).

    Returns:
        float32 (n, 32, 32, 3) in [−1, 1].
    """
    return (np.asarray(images, dtype=np.float32) / 255.0 - CIFAR10_MEAN) / CIFAR10_STD


def load_cifar10(split="train", path=None, shuffle_seed=None, verify=True):
    """Normalised CIFAR-10 as NumPy arrays ``(x, y)``.

    Args:
        split: 'train' or 'test'.
        path: the folder (see :func:`load_cifar10_arrays`), or None for ``$TFW_CIFAR10_DIR`` / tfds.
        shuffle_seed: permute the rows with ``np.random.default_rng(shuffle_seed)``; None keeps the
            official order.
        verify: md5-check the files.

    Returns:
        ``x``: float32 (n, 32, 32, 3), (x/255 − 0.5)/0.5 ∈ [−1, 1]; ``y``: int64 (n,) labels 0 … 9
        (names in :data:`CIFAR10_LABEL_NAMES`).

    Raises:
        ValueError, FileNotFoundError, RuntimeError: as :func:`load_cifar10_arrays`.
    """
    images, labels = load_cifar10_arrays(split, path, verify)
    return _shuffled(normalize_cifar10(images), labels, shuffle_seed)


def cifar10_dataset(split="train", path=None, shuffle_seed=None, verify=True):
    """The same as :func:`load_cifar10`, as an unbatched ``tf.data.Dataset`` of (image, label).

    Args:
        split: 'train' or 'test'.
        path: the folder (see :func:`load_cifar10_arrays`), or None for ``$TFW_CIFAR10_DIR`` / tfds.
        shuffle_seed: permute the samples once with this seed; None keeps the official order.
        verify: md5-check the files.

    Returns:
        An unbatched ``tf.data.Dataset`` of (float32 (32, 32, 3) image in [−1, 1], int64 label) pairs.

    Raises:
        ValueError, FileNotFoundError, RuntimeError: as :func:`load_cifar10_arrays`.
    """
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(load_cifar10(split, path, shuffle_seed, verify))
