"""The Fisher samples of an event, kept in memory between events when that changes nothing but the cost.

Every event of a run reads its samples anew through tf.data: shuffle the dataset with the event's seed,
take m·b samples, batch them into chunks. With a shuffle buffer that holds the whole dataset, that pass
reads every sample through the pipeline (on the 5,000 MNIST images of the gradual example, 20–30 ms of an
event that takes about 0.2 s). Such a dataset, when it is small and reads the same samples every time, is
read once instead (twice, to see that both passes agree): its samples are stacked in memory, and each
event gathers its chunks by the indices of a shuffled ``Dataset.range`` with the same buffer and seed,
which is the very permutation tf.data makes of the samples themselves (the shuffle's draws depend on the
seeds, the buffer and the number of elements, not on the elements). Nothing here knows about Keras.
"""
import math
import weakref
from typing import Iterator, Optional

import numpy as np
import tensorflow as tf

from tf_woodfisher import compat


CACHED_SAMPLE_BYTES = 2 ** 28  # the largest Fisher dataset (unbatched, in bytes) kept in memory between events
COMPARED_SAMPLES = 1024  # samples per part of the second pass, compared with the first


def cached_chunks(dataset: tf.data.Dataset, batched: bool, count: int, chunk: int, seed: int,
                  shuffle_buffer: int) -> Optional["GatheredChunks"]:
    """The chunks of ``count`` shuffled samples of ``dataset`` from samples kept in memory, or None.

    None (read the dataset through tf.data instead) unless all of these hold: ``shuffle_buffer`` is at
    least the dataset's number of samples (so a tf.data pass reads them all anyway), that number is known,
    every component of a sample has a static shape and a numeric or bool dtype, the samples take at most
    :data:`CACHED_SAMPLE_BYTES`, and two passes over the dataset, read once when it is first seen, give
    the same samples (random augmentation or a reshuffling stage make them differ: such a dataset is read
    through tf.data at every event).

    Args:
        dataset: a ``tf.data.Dataset`` of (x, y) or (x, y, sample_weight) tuples, batched or not.
        batched: whether ``dataset`` yields batches.
        count: samples to take (m·b; fewer if the dataset holds fewer).
        chunk: samples per chunk (the last may hold fewer).
        seed: the shuffle seed, as ``Dataset.shuffle`` takes it.
        shuffle_buffer: the shuffle buffer, in samples.

    Returns:
        A :class:`GatheredChunks` giving the same chunks as
        ``dataset[.unbatch()].shuffle(shuffle_buffer, seed, reshuffle_each_iteration=False).take(count)
        .batch(chunk)``, or None.
    """
    size = _size(dataset, batched)
    if size is None or shuffle_buffer < size[0] or size[0] * size[1] > CACHED_SAMPLE_BYTES:
        return None
    samples = _samples(dataset, batched)
    if samples is None:
        return None
    return GatheredChunks(samples, samples.order(seed, shuffle_buffer, min(count, samples.count)), chunk)


class _Samples:
    """A dataset's samples stacked in memory: ``components`` (flat, each (n, ...)) of ``structure``."""

    def __init__(self, components, structure, count):
        self.components, self.structure, self.count = components, structure, count

        @compat.function
        def permutation(seed, seed2, buffer, take):
            indices = tf.data.experimental.to_variant(tf.data.Dataset.range(count))
            shuffled = tf.raw_ops.ShuffleDatasetV3(  # what Dataset.shuffle builds, with the seeds as inputs
                input_dataset=indices, buffer_size=buffer, seed=seed, seed2=seed2,
                seed_generator=tf.raw_ops.DummySeedGenerator(), output_types=[tf.int64], output_shapes=[[]],
                reshuffle_each_iteration=False)
            shuffled = tf.data.experimental.from_variant(shuffled, tf.TensorSpec([], tf.int64))
            return shuffled.take(take).batch(count).get_single_element()

        self._permutation = permutation

    def order(self, seed: int, buffer: int, count: int) -> tf.Tensor:
        """The first ``count`` indices of the permutation ``Dataset.shuffle(buffer, seed)`` makes of the samples."""
        seed, seed2 = tf.compat.v1.random.get_seed(seed)  # as Dataset.shuffle pairs it with the global seed
        return self._permutation(*(tf.constant(v, tf.int64) for v in (seed, seed2, buffer, count)))


class GatheredChunks:
    """Chunks gathered from samples in memory: iterating gives tuples like the batches of a tf.data chunk stage.

    Args:
        samples: the stacked samples.
        order: (k,) int64 indices of the samples to take, in order.
        chunk: samples per chunk (the last may hold fewer).
    """

    def __init__(self, samples: _Samples, order: tf.Tensor, chunk: int):
        self.samples, self.order, self.chunk = samples, order, chunk

    def __iter__(self) -> Iterator:
        total = int(self.order.shape[0])
        for start in range(0, total, self.chunk):
            indices = self.order[start:start + self.chunk]
            yield tf.nest.pack_sequence_as(self.samples.structure,
                                           [tf.gather(t, indices) for t in self.samples.components])


_SAMPLES = weakref.WeakKeyDictionary()  # dataset → (batched, its _Samples or None: not to be kept)


def _samples(dataset, batched) -> Optional[_Samples]:
    """``dataset``'s samples, read and stacked once per dataset (None when it is not to be kept)."""
    try:
        known = _SAMPLES.get(dataset)
    except TypeError:  # not weakly referenceable
        return None
    if known is not None and known[0] == batched:
        return known[1]
    samples = _read(dataset, batched)
    _SAMPLES[dataset] = (batched, samples)
    return samples


def _size(dataset, batched) -> Optional[tuple]:
    """(samples, bytes per sample) of ``dataset`` told from its spec and cardinality, or None when unknown or when a
    sample is not a nest of dense numeric tensors of static shape."""
    specs = tf.nest.flatten(dataset.element_spec)
    if not all(isinstance(s, tf.TensorSpec) and s.shape.is_fully_defined() and (s.shape.rank or not batched)
               and (s.dtype.is_floating or s.dtype.is_integer or s.dtype.is_bool) for s in specs):
        return None
    cardinality = int(dataset.cardinality())
    if cardinality <= 0:  # empty, infinite or unknown
        return None
    if not batched:
        return cardinality, sum(s.dtype.size * s.shape.num_elements() for s in specs)
    sizes = {int(s.shape[0]) for s in specs}
    if len(sizes) != 1:
        return None
    return cardinality * sizes.pop(), sum(s.dtype.size * math.prod(s.shape[1:]) for s in specs)  # full batches


def _read(dataset, batched) -> Optional[_Samples]:
    """The samples of ``dataset`` stacked, or None when two passes over it differ."""
    count = _size(dataset, batched)[0]
    unbatched = dataset.unbatch() if batched else dataset
    first = tf.nest.flatten(unbatched.batch(count).get_single_element())
    # Random augmentation, a reshuffling stage or a generator can make passes differ: such a dataset is read
    # anew at every event, as it would be without this module. The second pass is compared part by part.
    done, held = 0, [np.asarray(t) for t in first]
    for part in unbatched.batch(COMPARED_SAMPLES):
        part = [np.asarray(t) for t in tf.nest.flatten(part)]
        size = len(part[0])
        if done + size > count or not all(np.array_equal(h[done:done + size], p) for h, p in zip(held, part)):
            return None
        done += size
    return _Samples(first, dataset.element_spec, count) if done == count else None
