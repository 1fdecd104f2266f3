"""Fisher samples kept in memory (tf_woodfisher.fisher.samples) against reading the dataset through tf.data."""
import numpy as np
import pytest
import tensorflow as tf

from tf_woodfisher.fisher import gradients, samples
from tf_woodfisher.fisher.samples import GatheredChunks

RNG = np.random.default_rng(0)
X = RNG.normal(size=(300, 5)).astype(np.float32)
Y = (np.arange(300) % 7).astype(np.int64)
W = RNG.uniform(size=300).astype(np.float32)


def _read(dataset, batched, num_gradients, group, chunk, seed, buffer):
    """(chunks as NumPy nests, whether they came from memory)."""
    batches = gradients.fisher_batches(dataset, batched, num_gradients, group, chunk, seed, buffer)
    return ([tf.nest.map_structure(lambda t: t.numpy(), c) for c in batches],
            isinstance(batches.chunks, GatheredChunks))


def _through_tf_data(monkeypatch, *args):
    """The chunks read through tf.data, as without the samples module."""
    with monkeypatch.context() as patch:
        patch.setattr(gradients, "cached_chunks", lambda *_: None)
        chunks, cached = _read(*args)
    assert not cached
    return chunks


def _assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert tf.nest.map_structure(lambda t: t.shape, a) == tf.nest.map_structure(lambda t: t.shape, b)
        for u, v in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
            np.testing.assert_array_equal(u, v)


DATASETS = {
    "pairs": lambda: (tf.data.Dataset.from_tensor_slices((X, Y)), False),
    "sample weights": lambda: (tf.data.Dataset.from_tensor_slices((X, Y, W)), False),
    "dict inputs": lambda: (tf.data.Dataset.from_tensor_slices(({"a": X, "b": X[:, :2]}, Y)), False),
    "batched": lambda: (tf.data.Dataset.from_tensor_slices((X, Y)).batch(20, drop_remainder=True), True),
    "mapped": lambda: (tf.data.Dataset.from_tensor_slices((X, Y)).map(lambda x, y: (2 * x, y + 1)), False),
}


@pytest.mark.parametrize("name", sorted(DATASETS))
@pytest.mark.parametrize("seed", [0, 3, 2 ** 40])
def test_kept_samples_are_the_chunks_tf_data_reads(monkeypatch, name, seed):
    dataset, batched = DATASETS[name]()
    args = (dataset, batched, 40, 4, 7, seed, 10_000)  # 160 of 300 samples, chunks of 7 groups of 4
    got, cached = _read(*args)
    assert cached
    _assert_same(got, _through_tf_data(monkeypatch, *args))
    assert len(got) == 6  # 160 samples: five chunks of 28 and one of 20


@pytest.mark.parametrize("global_seed", [None, 0, 11])
def test_kept_samples_follow_the_global_seed_as_shuffle_does(monkeypatch, global_seed):
    dataset, _ = DATASETS["pairs"]()
    _read(dataset, False, 10, 2, 5, 1, 10_000)  # kept before the global seed changes
    if global_seed is not None:
        tf.random.set_seed(global_seed)
    for seed in (0, 5):
        args = (dataset, False, 60, 2, 16, seed, 300)  # a buffer of exactly the dataset's size
        got, cached = _read(*args)
        assert cached
        _assert_same(got, _through_tf_data(monkeypatch, *args))


def test_a_dataset_smaller_than_asked_gives_what_it_holds(monkeypatch):
    dataset, _ = DATASETS["pairs"]()
    args = (dataset, False, 100, 4, 30, 2, 10_000)  # 400 samples asked of 300: 75 groups, the last chunk 15
    got, cached = _read(*args)
    assert cached and [len(c[1]) for c in got] == [30, 30, 15]
    _assert_same(got, _through_tf_data(monkeypatch, *args))


def _augmented():
    """Random augmentation whose draws go on from pass to pass (a generator's state, whatever the global seed)."""
    generator = tf.random.Generator.from_seed(1)
    return tf.data.Dataset.from_tensor_slices((X, Y)).map(lambda x, y: (x + generator.uniform([5]), y))


def test_what_is_not_kept_in_memory():
    base = tf.data.Dataset.from_tensor_slices((X, Y))
    cases = {
        "buffer smaller than the dataset": (base, False, 299),
        "no shuffling": (base, False, 0),
        "unknown size": (base.filter(lambda x, y: y >= 0), False, 10_000),
        "batches of unknown size": (base.batch(20), True, 10_000),
        "reshuffled each pass": (base.shuffle(300), False, 10_000),
        "random augmentation": (_augmented(), False, 10_000),
    }
    for name, (dataset, batched, buffer) in cases.items():
        assert not _read(dataset, batched, 10, 2, 5, 1, buffer)[1], name


def test_a_random_dataset_is_read_anew_at_each_call():
    dataset = _augmented()
    first, cached = _read(dataset, False, 10, 2, 5, 1, 10_000)
    second, _ = _read(dataset, False, 10, 2, 5, 1, 10_000)
    assert not cached
    np.testing.assert_array_equal(first[0][1], second[0][1])  # the same samples, by the same seed
    assert not np.array_equal(first[0][0], second[0][0])  # with fresh augmentation


def test_the_samples_limit_is_in_bytes(monkeypatch):
    monkeypatch.setattr(samples, "CACHED_SAMPLE_BYTES", 300 * (5 * 4 + 8))  # exactly the dataset
    assert _read(tf.data.Dataset.from_tensor_slices((X, Y)), False, 10, 2, 5, 1, 10_000)[1]
    monkeypatch.setattr(samples, "CACHED_SAMPLE_BYTES", 300 * (5 * 4 + 8) - 1)
    assert not _read(tf.data.Dataset.from_tensor_slices((X, Y)), False, 10, 2, 5, 1, 10_000)[1]


def test_gradients_from_kept_samples_equal_those_read_through_tf_data(monkeypatch):
    kernel = tf.Variable(RNG.normal(size=(5, 7)).astype(np.float32))

    def forward(x):
        return tf.matmul(x, kernel)

    def loss(y, logits):
        return tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)

    def collect(dataset):
        return gradients.collect_gradients(forward, [kernel], dataset, loss, 32, 3, batched=False, seed=4).numpy()

    dataset = tf.data.Dataset.from_tensor_slices((X, Y))
    kept = collect(dataset)
    assert samples._SAMPLES[dataset][1] is not None  # the samples were kept
    monkeypatch.setattr(gradients, "cached_chunks", lambda *_: None)
    np.testing.assert_array_equal(kept, collect(dataset))
    assert np.abs(kept).sum() > 0
