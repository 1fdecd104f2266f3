"""The inverse-Fisher engine against a dense NumPy (float64) inverse."""
import itertools
import warnings

import numpy as np
import pytest

import tensorflow as tf
from tf_woodfisher.fisher import BlockPartition, CholeskyError, InverseFisher
from tf_woodfisher.fisher.grams import (BlockGrams, cheaper_to_reduce, gradient_moments, partial_sums,
                                       reduced_block_size, reduced_bytes)
from tf_woodfisher.fisher.woodbury import choose_form


def dense_reference(gradients, partition, damping):
    """diag(F⁻¹) and F⁻¹ as dense float64 arrays, block by block."""
    g = gradients.astype(np.float64)
    m, d = g.shape
    inverse = np.zeros((d, d))
    for group in partition.groups:
        for idx in group.indices:
            block = g[:, idx]
            fisher = damping * np.eye(len(idx)) + block.T @ block / m
            inverse[np.ix_(idx, idx)] = np.linalg.inv(fisher)
    return np.diag(inverse).copy(), inverse


def relative_error(actual, expected):
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


def gradient_matrix(rng, m, d, scale=0.05):
    # Realistic per-sample gradients: mostly small, a few large coordinates, some dead (zero) columns.
    g = rng.normal(0.0, scale, size=(m, d)) * rng.lognormal(0.0, 1.0, size=(1, d))
    g[:, rng.random(d) < 0.1] = 0.0
    return g.astype(np.float32)


CASES = list(itertools.product(
    [5, 64, 200],                # m
    [None, 7, 50, 300, "model"],   # block size (7 and 50 do not divide the segments)
    [1e-5, 1e-3, 1e-1],          # damping λ
))


@pytest.mark.parametrize("m,block_size,damping", CASES)
def test_float32_matches_dense_inverse(m, block_size, damping):
    rng = np.random.default_rng(m * 1000 + (block_size if isinstance(block_size, int) else 1))
    segments = [123, 300, 41]
    g = gradient_matrix(rng, m, sum(segments))
    partition = BlockPartition.from_segments(segments, block_size)
    inv = InverseFisher.from_gradients(g, partition, damping)
    diag_ref, dense = dense_reference(g, partition, damping)
    assert relative_error(inv.diagonal().numpy(), diag_ref) <= 1e-4
    v = rng.normal(size=partition.dim).astype(np.float32)
    assert relative_error(inv.matvec(v).numpy(), dense @ v) <= 1e-4


@pytest.mark.parametrize("form", ["lowrank", "explicit"])
@pytest.mark.parametrize("block_size", [30, None])  # batches of blocks; one block per group (K = 1: L⁻¹ matmul)
def test_both_forms_agree_with_reference_in_float64(form, block_size):
    rng = np.random.default_rng(1)
    g = gradient_matrix(rng, 40, 260, scale=1.0)  # ill-conditioned for float32 at λ = 1e-6
    partition = BlockPartition.from_segments([100, 160], block_size)
    inv = InverseFisher.from_gradients(g, partition, 1e-6, dtype=tf.float64, form=form)
    diag_ref, dense = dense_reference(g, partition, 1e-6)
    assert inv.diagonal().dtype == tf.float64
    assert relative_error(inv.diagonal().numpy(), diag_ref) <= 1e-9
    v = rng.normal(size=260)
    # the 100- and 160-wide blocks are worse conditioned than the 30-wide ones: both forms, and the dense
    # reference, lose a few more digits on F⁻¹v (1.6e-9 and 2.0e-9)
    assert relative_error(inv.matvec(v).numpy(), dense @ v) <= (1e-9 if block_size else 5e-9)


def test_single_low_rank_blocks_take_the_inverse_factor_matmul_whatever_was_traced(monkeypatch):
    """A low-rank group of one block goes to the L⁻¹ matmul and a batch of blocks to the batched solve, chosen by the
    group's size outside the compiled functions (so retraces with generalised shapes cannot change it); both match
    the dense float64 inverse."""
    from tf_woodfisher.fisher import woodbury

    calls = []
    for name in ("_lowrank_factor", "_lowrank_factor_of_one_block"):
        original = getattr(woodbury, name)
        monkeypatch.setattr(woodbury, name, lambda blocks, damping, _f=original, _n=name: (
            calls.append((_n, int(blocks.shape[0]))), _f(blocks, damping))[1])
    rng = np.random.default_rng(8)
    for segments in ([300, 260, 300], [410, 300], [300, 300, 300, 77]):  # several K and c: retraces
        g = gradient_matrix(rng, 32, sum(segments))
        for x, partition in ((g, BlockPartition.from_segments(segments, None)),
                             (g, BlockPartition.from_segments(segments, 100))):
            inverse = InverseFisher.from_gradients(x, partition, 1e-3)
            diag_ref, _ = dense_reference(g, partition, 1e-3)
            assert relative_error(inverse.diagonal().numpy(), diag_ref) <= 1e-4
    assert calls and all((name == "_lowrank_factor_of_one_block") == (k == 1) for name, k in calls)
    assert {name for name, _ in calls} == {"_lowrank_factor", "_lowrank_factor_of_one_block"}


def test_form_is_chosen_by_cost():
    assert choose_form(100, 1000) == "lowrank"
    assert choose_form(100, 20) == "explicit"
    rng = np.random.default_rng(2)
    partition = BlockPartition.from_segments([500, 30], None)
    inv = InverseFisher.from_gradients(gradient_matrix(rng, 64, 530), partition, 1e-3)
    assert {(c, form) for c, _, form, _ in inv.forms} == {(500, "lowrank"), (30, "explicit")}


def test_partition_chunks_and_groups():
    partition = BlockPartition.from_segments([10, 7], 4)
    # Chunks never cross a segment: [0..3] [4..7] [8,9] | [10..13] [14,15,16].
    sizes = sorted((g.block_size, g.num_blocks) for g in partition.groups)
    assert sizes == [(2, 1), (3, 1), (4, 3)]
    covered = np.concatenate([g.indices.ravel() for g in partition.groups])
    assert sorted(covered.tolist()) == list(range(17))
    assert BlockPartition.from_segments([10, 7], "model").num_blocks == 1
    assert BlockPartition.from_segments([10, 7]).max_block_size == 10
    with pytest.raises(ValueError, match="block_size"):
        BlockPartition.from_segments([10], 0)
    with pytest.raises(ValueError, match="segment sizes"):
        BlockPartition.from_segments([])


def test_bad_damping_and_shapes():
    partition = BlockPartition.from_segments([4])
    g = np.ones((3, 4), np.float32)
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping"):
            InverseFisher.from_gradients(g, partition, bad)
    with pytest.raises(ValueError, match="columns"):
        InverseFisher.from_gradients(np.ones((3, 5), np.float32), partition, 1e-3)
    with pytest.raises(ValueError, match="dtype"):
        InverseFisher.from_gradients(g, partition, 1e-3, dtype=tf.float16)


def test_cholesky_failure_retries_with_more_damping():
    # Rank-1 gradients: at λ = 1e-12 float32 Cholesky of mλI + GGᵀ is not positive definite.
    g = np.tile(np.float32([[1.0, -1.0, 0.3, 0.5]]), (20, 10))
    partition = BlockPartition.from_segments([40])
    with pytest.warns(RuntimeWarning, match="retrying with damping"):
        inv = InverseFisher.from_gradients(g, partition, 1e-12, form="explicit")
    (_, _, _, used_damping), = inv.forms
    assert used_damping > 1e-12
    assert np.all(np.isfinite(inv.diagonal().numpy()))


def test_cholesky_failure_gives_clear_error_when_retries_exhausted():
    g = np.full((4, 6), np.nan, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CholeskyError, match="inverse_dtype='float64' or a larger damping"):
            InverseFisher.from_gradients(g, BlockPartition.from_segments([6]), 1e-3)


@pytest.mark.parametrize("block_size", [None, 7, 300, "model"])
def test_column_pieces_match_the_whole_matrix(block_size):
    """Gradients given as one (m, d_j) piece per segment give the same inverse as the (m, d) matrix."""
    rng = np.random.default_rng(3)
    segments = [123, 300, 41, 300]
    g = gradient_matrix(rng, 64, sum(segments))
    partition = BlockPartition.from_segments(segments, block_size)
    pieces = np.split(g, np.cumsum(segments)[:-1], axis=1)
    whole, split = (InverseFisher.from_gradients(x, partition, 1e-3) for x in (g, pieces))
    # the two 300-entry blocks are one stacked group of the whole matrix (a batched triangular solve) but single
    # blocks of the pieces (a matmul with L⁻¹): the same float64 reference to 5e-6 each, and each other to float32
    # rounding of the 1 − ‖L⁻¹g‖² cancellation
    reference = dense_reference(g, partition, 1e-3)[0]
    for inverse in (whole, split):
        np.testing.assert_allclose(inverse.diagonal().numpy(), reference, rtol=2e-5)
    np.testing.assert_allclose(split.diagonal().numpy(), whole.diagonal().numpy(), rtol=2e-5)
    if block_size is None:  # the two 300-entry tensors: one group of two stacked blocks, or one view each
        assert [k for c, k, _, _ in whole.forms if c == 300] == [2]
        assert [k for c, k, _, _ in split.forms if c == 300] == [1, 1]
    v = rng.normal(size=partition.dim).astype(np.float32)
    np.testing.assert_allclose(split.matvec(v).numpy(), whole.matvec(v).numpy(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="same number of rows"):
        InverseFisher.from_gradients([g[:, :123], g[:10, 123:]], partition, 1e-3)


@pytest.mark.parametrize("block_size", [None, 7, 40])
def test_gram_sums_match_rows_and_the_dense_inverse(block_size):
    """Tensors given as BlockGrams (what replicas all-reduce) give the rows' inverse, for any mix of pieces."""
    rng = np.random.default_rng(5)
    segments = [123, 41, 30]
    m, damping = 96, 1e-3
    g = gradient_matrix(rng, m, sum(segments))
    partition = BlockPartition.from_segments(segments, block_size)
    pieces = np.split(g, np.cumsum(segments)[:-1], axis=1)
    grams = [BlockGrams(m, size if block_size is None else block_size,
                        *partial_sums(tf.constant(piece), size if block_size is None else block_size))
             for piece, size in zip(pieces, segments)]
    expected_diagonal, expected = dense_reference(g, partition, damping)
    v = rng.normal(size=partition.dim).astype(np.float32)
    for mixed in ([grams[0], pieces[1], grams[2]], grams):
        inverse = InverseFisher.from_gradients(mixed, partition, damping)
        assert {form for _, _, form, _ in inverse.forms} == {"explicit"}
        assert relative_error(inverse.diagonal().numpy(), expected_diagonal) < 1e-4
        assert relative_error(inverse.matvec(v).numpy(), expected @ v) < 1e-4
    mean, square = gradient_moments([grams[0], pieces[1], grams[2]])
    np.testing.assert_allclose(mean.numpy(), g.mean(axis=0), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(square.numpy(), (g.astype(np.float64) ** 2).mean(axis=0), rtol=1e-5, atol=1e-10)
    with pytest.raises(ValueError, match="needs gradient rows"):
        InverseFisher.from_gradients(grams, partition, damping, form="lowrank")
    other_blocks = BlockPartition.from_segments(segments, 13)
    with pytest.raises(ValueError, match="are not the blocks of"):
        InverseFisher.from_gradients(grams, other_blocks, damping)


def test_all_reduce_is_chosen_only_when_it_moves_fewer_bytes():
    # 4 bytes × (n·c + n) summed, twice (ring all-reduce), against m·n rows of 4 bytes.
    assert reduced_bytes(100, 10) == 4 * (100 * 10 + 100)
    assert reduced_bytes(105, 10) == 4 * (100 * 10 + 25 + 105)
    assert cheaper_to_reduce(1000, 10, 64, 4)          # 2·11·4 = 88 < 256 bytes per entry
    assert not cheaper_to_reduce(1000, 40, 64, 4)      # 2·41·4 = 328 > 256
    assert not cheaper_to_reduce(1000, 20, 64, 2)      # 168 > 128 with half-precision rows
    assert reduced_block_size(1000, 10, 64, 4) == 10
    assert reduced_block_size(5, 10, 64, 4) == 5        # a tensor smaller than the block is one block
    assert reduced_block_size(1000, None, 64, 4) is None and reduced_block_size(1000, "model", 64, 4) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_host_blocks_are_the_column_ranges_transposed(dtype):
    """The one-pass NumPy path of consecutive blocks (CPU float tensors) gives TensorFlow's slice + transpose."""
    from tf_woodfisher.fisher.host import on_host, transposed_blocks

    values = np.random.default_rng(0).normal(size=(6, 53)).astype(dtype)
    piece = tf.constant(values)
    assert on_host(piece) and not on_host(tf.constant(values.astype(np.float16)))
    blocks = transposed_blocks(piece, 3, 4, 12)  # columns 3..50 as four blocks of 12
    assert blocks.dtype == piece.dtype and blocks.shape == (4, 6, 12)
    np.testing.assert_array_equal(blocks.numpy(), np.transpose(values[:, 3:51].reshape(6, 4, 12), (1, 0, 2)))


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_prefault_writes_one_byte_of_every_page_and_nothing_else(threads):
    """Every page, the last partial one included, gets exactly its first byte written, whatever the split over
    threads (more threads than pages too); the other bytes keep their values."""
    import mmap

    from tf_woodfisher.fisher.host import prefault

    page = mmap.PAGESIZE
    for size in (5 * page + 123, 3 * page, 7):
        raw = np.full(size, 7, np.uint8)
        prefault(raw, threads)
        starts = np.arange(0, size, page)
        assert np.all(raw[starts] == 0), (size, threads)
        rest = np.ones(size, bool)
        rest[starts] = False
        assert np.all(raw[rest] == 7), (size, threads)


def test_large_host_buffers_are_prefaulted_aligned_and_shared(monkeypatch):
    """aligned_empty faults a buffer in from PREFAULT_BYTES on (and not below, nor when on_new takes it), stays
    64-byte aligned; host_tensor shares an aligned C-contiguous array's memory and copies any other."""
    from tf_woodfisher.fisher import host

    calls = []
    original = host.prefault
    monkeypatch.setattr(host, "prefault", lambda raw, threads=None: calls.append(raw.nbytes) or original(raw))
    monkeypatch.setattr(host, "PREFAULT_BYTES", 4000)
    small = host.aligned_empty((10, 99), tf.float32)  # 3,960 + 64 bytes: over the (patched) threshold
    tiny = host.aligned_empty((10, 10), tf.float32)
    assert calls == [10 * 99 * 4 + 64] and small.ctypes.data % 64 == 0 and tiny.ctypes.data % 64 == 0
    assert small.shape == (10, 99) and small.dtype == np.float32 and small.flags.c_contiguous
    handed = []
    passed = host.aligned_empty((10, 99), tf.float32, on_new=handed.append)  # its faulting is on_new's
    assert len(calls) == 1 and len(handed) == 1 and handed[0] is passed and passed.ctypes.data % 64 == 0

    order = host.aligned_empty((50,), np.int64)
    order[:] = np.arange(50)[::-1]
    shared = host.host_tensor(order)
    order[0] = 1000  # the tensor is a view of the array
    assert shared.dtype == tf.int64 and int(shared[0]) == 1000
    strided = np.arange(100)[::2]
    copied = host.host_tensor(strided)
    strided[0] = -5
    assert int(copied[0]) == 0 and copied.shape == (50,)


def _page_starts(array, rows):
    """Offsets, in ``array``'s bytes, of the page starts that lie in rows [rows[0], rows[1])."""
    import mmap

    width = array.nbytes // array.shape[0]
    first = (-array.ctypes.data) % mmap.PAGESIZE
    starts = np.arange(first, array.nbytes, mmap.PAGESIZE)
    return starts[(starts >= rows[0] * width) & (starts < rows[1] * width)]


def test_row_faulter_touches_the_page_starts_of_unclaimed_rows_only(monkeypatch):
    """RowFaulter writes the first byte of every page that starts in a row not claimed when it gets there, and
    nothing else: rows of odd widths (pages straddling rows), several buffers, slices smaller than a row; it does not
    start below PREFAULT_BYTES; the buffers are registered only with their number of rows."""
    import time

    from tf_woodfisher.fisher import host

    monkeypatch.setattr(host, "FAULT_SLICE_BYTES", 2 * 4096)  # several slices per row
    monkeypatch.setattr(host, "PREFAULT_BYTES", 1)
    rows = 12
    for claimed in (0, 5, rows):
        faulter = host.RowFaulter(rows)
        arrays = [faulter.add(np.full((rows, width), 255, np.uint8)) for width in (3 * 4096 + 777, 50_001, 10)]
        faulter.claim(claimed)
        faulter.start()
        deadline = time.time() + 30
        while faulter._thread is not None and faulter._thread.is_alive() and time.time() < deadline:
            time.sleep(0.01)
        faulter.stop()
        for array in arrays:
            raw = array.reshape(-1)
            touched = _page_starts(array, (claimed, rows))
            assert np.all(raw[touched] == 0), (claimed, array.shape)
            rest = np.ones(raw.size, bool)
            rest[touched] = False
            assert np.all(raw[rest] == 255), (claimed, array.shape)
    with pytest.raises(ValueError, match="C-contiguous buffers of 12 rows"):
        host.RowFaulter(rows).add(np.zeros((11, 3)))
    monkeypatch.setattr(host, "PREFAULT_BYTES", 10 ** 9)
    idle = host.RowFaulter(2)
    idle.add(np.zeros((2, 3)))
    idle.start()
    assert idle._thread is None
    idle.stop()


def test_row_faulter_never_overwrites_what_the_writer_wrote(monkeypatch):
    """A writer filling the rows in order, claiming each chunk before writing it, while the faulter runs from the last
    rows: every byte ends as the writer wrote it (repeated, with chunks of 1 to 5 rows)."""
    from tf_woodfisher.fisher import host

    monkeypatch.setattr(host, "FAULT_SLICE_BYTES", 4096)
    monkeypatch.setattr(host, "PREFAULT_BYTES", 1)
    rng = np.random.default_rng(0)
    rows = 40
    for chunk in (1, 3, 5):
        faulter = host.RowFaulter(rows)
        arrays = [host.aligned_empty((rows, width), tf.float32, on_new=faulter.add)
                  for width in (70_001, 4096, 13)]
        expected = [rng.uniform(1, 2, a.shape).astype(np.float32) for a in arrays]
        faulter.start()
        try:
            for done in range(0, rows, chunk):
                faulter.claim(done + chunk)
                for array, values in zip(arrays, expected):
                    array[done:done + chunk] = values[done:done + chunk]
        finally:
            faulter.stop()
        for array, values in zip(arrays, expected):
            np.testing.assert_array_equal(array, values)


@pytest.mark.parametrize("block_size", [None, 4, "model"])
def test_partition_inverse_order_is_the_argsort_of_the_groups_entries(block_size):
    """inverse_order (scattered group by group) is the stable argsort of the groups' entries concatenated, for
    equal and distinct segment sizes and for chunks aligned to groups; it is 64-byte aligned."""
    from tf_woodfisher.fisher.blocks import output_unit_groups

    for partition in (BlockPartition.from_segments([10, 7, 10, 3, 7], block_size),
                      BlockPartition.from_segments([12, 20], block_size,
                                                   groups=[output_unit_groups((3, 4)), output_unit_groups((4, 5))])):
        order = np.concatenate([g.indices.reshape(-1) for g in partition.groups])
        np.testing.assert_array_equal(partition.inverse_order, np.argsort(order, kind="stable"))
        assert partition.inverse_order.dtype == np.int64 and partition.inverse_order.ctypes.data % 64 == 0
        np.testing.assert_array_equal(order[partition.inverse_order], np.arange(partition.dim))


def test_host_buffers_are_reused_only_when_nothing_refers_to_them():
    """A pooled buffer comes back only once every tensor and view over it is gone, so a kept result is never
    overwritten; beyond the pool's size buffers are fresh; and an inverse built with a pool equals one without."""
    from tf_woodfisher.fisher.host import HostBuffers, shared_tensor

    pool = HostBuffers(max_bytes=2 * 6 * 10 * 4)
    first = pool.empty((6, 10), tf.float32)
    first[:] = 1.0
    kept = shared_tensor(first, tf.float32)
    address = first.ctypes.data
    del first
    second = pool.empty((6, 10), tf.float32)  # `kept` still uses the first buffer: a new one
    assert second.ctypes.data != address and second.ctypes.data % 64 == 0
    second[:] = 2.0
    np.testing.assert_array_equal(kept.numpy(), np.ones((6, 10)))
    view = np.asarray(kept)[2:]  # a NumPy view of the tensor's memory keeps the buffer taken too
    del kept, second
    assert pool.empty((6, 10), tf.float32).ctypes.data != address
    del view
    assert pool.empty((6, 10), tf.float32).ctypes.data == address  # nothing refers to it any more: reused
    taken = [pool.empty((6, 10), tf.float32) for _ in range(3)]  # the pool holds two: the third is not kept
    assert len({a.ctypes.data for a in taken}) == 3 and pool.empty((6, 10), tf.float16).dtype == np.float16

    rng = np.random.default_rng(3)
    gradients = tf.constant(rng.normal(size=(8, 90)).astype(np.float32))
    partition = BlockPartition.from_segments([90], 20)
    expected = InverseFisher.from_gradients(gradients, partition, 1e-2)
    pool = HostBuffers()
    for _ in range(2):  # the second event takes the first one's blocks again
        got = InverseFisher.from_gradients(gradients, partition, 1e-2, buffers=pool)
        np.testing.assert_allclose(got.diagonal().numpy(), expected.diagonal().numpy(), rtol=1e-6)
        vector = tf.constant(rng.normal(size=90).astype(np.float32))
        np.testing.assert_allclose(got.matvec(vector).numpy(), expected.matvec(vector).numpy(), rtol=1e-5,
                                   atol=1e-5)
        del got


def test_filter_order_chunks_hold_whole_output_units():
    """Aligned to output_unit_groups, chunks of c hold max(1, c // s) whole filters of s weights each, in filter
    order: the blocks of the kernel transposed to (c_out, ...) and cut into consecutive runs of whole filters."""
    from tf_woodfisher.fisher.blocks import output_unit_groups

    shapes = [(3, 3, 4, 6), (3, 3, 6, 5), (7,)]  # filters of 36 and 54 weights, and a vector
    sizes = [int(np.prod(s)) for s in shapes]
    partition = BlockPartition.from_segments(sizes, 80, groups=[output_unit_groups(s) for s in shapes])
    got = sorted(tuple(sorted(block)) for g in partition.groups for block in g.indices.tolist())
    expected, start = [], 0
    for shape, size in zip(shapes, sizes):
        units = start + np.arange(size).reshape(-1, shape[-1]).T if len(shape) > 1 else start + np.arange(size)[:, None]
        per = max(1, 80 // units.shape[1])
        expected += [tuple(sorted(units[j:j + per].ravel().tolist())) for j in range(0, len(units), per)]
        start += size
    assert got == sorted(expected)
    assert sorted(len(b) for b in got) == sorted([72, 72, 72] + [54] * 5 + [7])
    np.testing.assert_array_equal(np.sort(np.concatenate([g.indices.ravel() for g in partition.groups])),
                                  np.arange(sum(sizes)))
