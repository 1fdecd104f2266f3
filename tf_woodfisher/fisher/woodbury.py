"""The inverse of a block-diagonal empirical Fisher, F = λI + (1/m) GᵀG per block.

For each block, with G (m × c) the block's columns of the m gradients:

* low-rank (Woodbury) form, cheaper when c > m: with K = mλI + GGᵀ = LLᵀ (m × m),
  F⁻¹ = (I − Gᵀ K⁻¹ G)/λ, so diag(F⁻¹) = (1 − ‖L⁻¹G‖²_col)/λ and F⁻¹v = (v − Gᵀ K⁻¹ G v)/λ;
* explicit form, cheaper when c ≲ m: Cholesky F = LLᵀ of the c × c matrix and L⁻¹, so that
  diag(F⁻¹) = ‖L⁻¹‖²_col and F⁻¹v = L⁻ᵀ(L⁻¹v). It needs only GᵀG, which may come already summed
  (a :class:`BlockGrams`, as replicas all-reduce it) instead of G.

The low-rank diagonal 1 − ‖L⁻¹g‖² cancels when c ≈ m (every column lies near the span of the
gradients), so the low-rank form is used only for c ≥ 2m, where it is also the cheaper one; the
form is chosen per group of equal-size blocks, and each group is one batched,
``tf.function``-compiled computation. Nothing here knows about Keras.
"""
import dataclasses
import warnings

import numpy as np

import tensorflow as tf
from tf_woodfisher import compat
from tf_woodfisher.fisher.blocks import BlockGroup, BlockPartition, choose_form, explicit_flops, lowrank_flops
from tf_woodfisher.fisher.distributed import executor_for
from tf_woodfisher.fisher.grams import BlockGrams
from tf_woodfisher.fisher.host import host_tensor, on_host, transposed_blocks

MAX_DAMPING_RETRIES = 3
DAMPING_RETRY_FACTOR = 100.0


def _lowrank(blocks, damping, one_block):
    """blocks (K, m, c) → Cholesky factors L (K, m, m) of mλI + GGᵀ and diag(F⁻¹) (K, c).

    With ``one_block`` (K = 1, a layer block) L⁻¹G is a matmul with the m × m inverse L⁻¹ (a triangular solve
    against the identity): measured 1.3–2.9× faster than the triangular solve against its c columns for m = 64 to
    1000 and c = 2·10⁴ to 2.4·10⁶, with the same diagonal to float32 rounding. For batches of blocks the batched
    triangular solve was as fast or faster (0.8–1.1×), so they keep it. The choice is the caller's, by the group's
    static size (:func:`_solve_group`), never a traced shape that a retrace could generalise."""
    m = tf.shape(blocks)[1]
    gram = tf.matmul(blocks, blocks, transpose_b=True)
    eye = tf.eye(m, batch_shape=[1], dtype=blocks.dtype)
    factor = tf.linalg.cholesky(gram + tf.cast(m, blocks.dtype) * damping * eye)
    if one_block:
        whitened = tf.matmul(tf.linalg.triangular_solve(factor, eye, lower=True), blocks)
    else:
        whitened = tf.linalg.triangular_solve(factor, blocks, lower=True)
    return factor, (1.0 - tf.reduce_sum(tf.square(whitened), axis=1)) / damping


@compat.function(reduce_retracing=True)
def _lowrank_factor(blocks, damping):
    """:func:`_lowrank` of a batch of blocks (K, m, c): the batched triangular solve."""
    return _lowrank(blocks, damping, one_block=False)


@compat.function(reduce_retracing=True)
def _lowrank_factor_of_one_block(blocks, damping):
    """:func:`_lowrank` of one block (1, m, c): the matmul with L⁻¹."""
    return _lowrank(blocks, damping, one_block=True)


@compat.function(reduce_retracing=True)
def _lowrank_matvec(blocks, factor, damping, vectors):
    """F⁻¹v for each block: blocks (K, m, c), factor (K, m, m), vectors (K, c) → (K, c)."""
    projected = tf.einsum("kmc,kc->km", blocks, vectors)[..., None]
    solved = tf.linalg.cholesky_solve(factor, projected)[..., 0]
    return (vectors - tf.einsum("kmc,km->kc", blocks, solved)) / damping


@compat.function(reduce_retracing=True)
def _gram(blocks):
    """(K, m, c) → GᵀG (K, c, c)."""
    return tf.matmul(blocks, blocks, transpose_a=True)


@compat.function(reduce_retracing=True)
def _explicit_inverse_of_gram(grams, num_gradients, damping):
    """grams GᵀG (K, c, c) of m = ``num_gradients`` gradients → L⁻¹ (K, c, c) with LLᵀ = F = λI + GᵀG/m,
    and diag(F⁻¹) = ‖L⁻¹‖²_col (K, c)."""
    eye = tf.eye(tf.shape(grams)[2], batch_shape=[1], dtype=grams.dtype)  # broadcast over the K blocks
    fisher = grams / num_gradients + damping * eye
    inverse_factor = tf.linalg.triangular_solve(tf.linalg.cholesky(fisher), eye, lower=True)
    return inverse_factor, tf.reduce_sum(tf.square(inverse_factor), axis=1)


@compat.function(reduce_retracing=True)
def _explicit_inverse(blocks, damping):
    """blocks (K, m, c) → as :func:`_explicit_inverse_of_gram` of their Gram matrices."""
    num_gradients = tf.cast(tf.shape(blocks)[1], blocks.dtype)
    return _explicit_inverse_of_gram(_gram(blocks), num_gradients, damping)


@compat.function(reduce_retracing=True)
def _explicit_matvec(inverse_factor, vectors):
    """F⁻¹v = L⁻ᵀ(L⁻¹v) for each block: inverse_factor L⁻¹ (K, c, c), vectors (K, c) → (K, c)."""
    return tf.linalg.matvec(inverse_factor, tf.linalg.matvec(inverse_factor, vectors), adjoint_a=True)


@compat.function(reduce_retracing=True)
def _explicit_submatrices(inverse_factor, positions):
    """(F⁻¹)_QQ of groups Q inside each block: inverse_factor L⁻¹ (K, c, c) with F⁻¹ = L⁻ᵀL⁻¹, positions
    (K, n, q) of n groups of q entries in each block → (K, n, q, q)."""
    shape = tf.shape(positions)
    columns = tf.gather(inverse_factor, tf.reshape(positions, [shape[0], -1]), axis=2, batch_dims=1)
    columns = tf.reshape(columns, [shape[0], -1, shape[1], shape[2]])  # (K, c, n, q): the columns L⁻¹[:, Q]
    return tf.einsum("kcns,kcnt->knst", columns, columns)


@compat.function(reduce_retracing=True)
def _lowrank_submatrices(blocks, factor, damping, positions):
    """(F⁻¹)_QQ = (I − (L⁻¹G_Q)ᵀ(L⁻¹G_Q))/λ of groups Q inside each block: blocks G (K, m, c), factor L
    (K, m, m) of mλI + GGᵀ, positions (K, n, q) → (K, n, q, q)."""
    shape = tf.shape(positions)
    columns = tf.gather(blocks, tf.reshape(positions, [shape[0], -1]), axis=2, batch_dims=1)  # (K, m, n·q)
    whitened = tf.linalg.triangular_solve(factor, columns, lower=True)
    whitened = tf.reshape(whitened, [shape[0], -1, shape[1], shape[2]])
    eye = tf.eye(shape[2], dtype=blocks.dtype)
    return (eye - tf.einsum("kmns,kmnt->knst", whitened, whitened)) / damping


@dataclasses.dataclass(frozen=True)
class _SolvedGroup:
    form: str  # 'lowrank' or 'explicit'
    damping: float
    blocks: object  # (K, m, c) for 'lowrank', None for 'explicit'; sharded over replicas under a strategy
    factor: object  # (K, m, m) Cholesky factor L, or (K, c, c) inverse factor L⁻¹ (explicit); sharded likewise
    diagonal: tf.Tensor  # (K, c), gathered


class CholeskyError(RuntimeError):
    """A block's Cholesky factorisation failed even after raising the damping."""


class InverseFisher:
    """diag(F⁻¹), v ↦ F⁻¹v and the submatrices (F⁻¹)_QQ of groups Q for a block-diagonal empirical Fisher.

    Build with :meth:`from_gradients`. Vectors are flat, of length d, in the gradients' column order.
    """

    def __init__(self, partition, groups, dtype, executor):
        self.partition = partition
        self._groups = groups
        self.dtype = dtype
        self._executor = executor
        self._inverse_order = host_tensor(partition.inverse_order)
        self._location_tables = None  # built by the first submatrices() call

    @classmethod
    def from_gradients(cls, gradients, partition, damping, dtype=tf.float32, form="auto", on_group=None,
                       executor=None, buffers=None):
        """Factorise every block of F = λI + (1/m) GᵀG.

        A group whose Cholesky factorisation fails (or gives a non-finite or non-positive diagonal) is
        retried with the damping multiplied by DAMPING_RETRY_FACTOR, up to MAX_DAMPING_RETRIES times, with
        a RuntimeWarning each time.

        Args:
            gradients: (m, d) tensor, one gradient per row, or a list of (m, d_j) tensors holding consecutive
                columns (one per weight tensor, say: blocks inside one of them are then taken without a copy);
                any float dtype (float16/bfloat16 storage is cast to ``dtype`` one group at a time). An entry of
                the list may instead be a :class:`~tf_woodfisher.fisher.grams.BlockGrams` of its columns: its
                blocks then take the explicit form.
            partition: a :class:`~tf_woodfisher.fisher.blocks.BlockPartition` of d.
            damping: λ > 0, added to the Fisher's diagonal.
            dtype: float32 (default) or float64, the dtype of the factorisation.
            form: 'auto' (:func:`~tf_woodfisher.fisher.blocks.choose_form` per group), 'lowrank' or 'explicit'.
            on_group: optional callable invoked with no argument after each group (progress reporting).
            executor: a :mod:`~tf_woodfisher.fisher.distributed` executor (default: that of the current
                ``tf.distribute`` strategy); with several replicas each factorises its share of every group's
                blocks and diagonals and products are all-gathered.
            buffers: a :class:`~tf_woodfisher.fisher.host.HostBuffers` pool for the (K, m, c) blocks cut from
                the gradients' column ranges, to reuse one across events (None: fresh buffers).

        Returns:
            The :class:`InverseFisher`.

        Raises:
            ValueError: a bad ``dtype``, ``damping`` or ``form``; gradients whose columns do not match the
                partition, pieces with different numbers of rows, no gradient; ``form='lowrank'`` with Gram
                sums; a block that spans pieces given as Gram sums.
            CholeskyError: a group's factorisation fails even after raising the damping.
        """
        dtype = tf.as_dtype(dtype)
        if dtype not in (tf.float32, tf.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype.name}")
        if not (np.isfinite(damping) and damping > 0):
            raise ValueError(f"damping must be a finite number > 0, got {damping}")
        if form not in ("auto", "lowrank", "explicit"):
            raise ValueError(f"form must be 'auto', 'lowrank' or 'explicit', got {form!r}")
        pieces, offsets, m = _column_pieces(gradients)
        d = int(offsets[-1])
        if d != partition.dim:
            raise ValueError(f"gradients have {d} columns but the partition covers {partition.dim}")
        if m < 1:
            raise ValueError("need at least one gradient")
        executor = executor or executor_for(None)
        if executor.num_replicas == 1:
            partition = _one_group_per_piece(partition, offsets)
        solved = []
        for group in partition.groups:
            if _owns_grams(pieces, offsets, group):
                if form == "lowrank":
                    raise ValueError("form='lowrank' needs gradient rows, but some blocks come as Gram sums")
                grams = _group_grams(pieces, offsets, group, dtype)
                solved.append(_solve_group(grams, "explicit", float(damping), dtype, executor, num_gradients=m))
            else:
                blocks = _group_blocks(pieces, offsets, group, dtype, buffers)
                group_form = choose_form(m, group.block_size) if form == "auto" else form
                solved.append(_solve_group(blocks, group_form, float(damping), dtype, executor))
            if on_group is not None:
                on_group()
        return cls(partition, tuple(solved), dtype, executor)

    @property
    def forms(self):
        """The form used for each group, as (block_size, num_blocks, form, damping) tuples.

        ``damping`` is the one finally used (raised when the factorisation had to be retried).
        """
        return [(g.diagonal.shape[1], g.diagonal.shape[0], g.form, g.damping) for g in self._groups]

    def diagonal(self):
        """diag(F⁻¹), shape (d,).

        Returns:
            (d,) tensor of this inverse's dtype, in the gradients' column order.
        """
        return self._to_flat([g.diagonal for g in self._groups])

    def matvec(self, vector):
        """F⁻¹v for a flat vector v of shape (d,); returns shape (d,).

        Args:
            vector: (d,) tensor or array, in the gradients' column order (cast to this inverse's dtype).

        Returns:
            (d,) tensor F⁻¹v of this inverse's dtype.
        """
        vector = tf.cast(vector, self.dtype)  # float32 statistics into a float64 inverse too
        run, results = self._executor.run, []
        for group, solved in zip(self.partition.groups, self._groups):
            pieces = self._executor.shard(tf.gather(vector, group.indices))
            if solved.form == "lowrank":
                damping = tf.constant(solved.damping, self.dtype)
                products = run(_lowrank_matvec, solved.blocks, solved.factor, damping, pieces)
            else:
                products = run(_explicit_matvec, solved.factor, pieces)
            results.append(self._executor.gather(products, group.num_blocks))
        return self._to_flat(results)

    def submatrices(self, members):
        """The principal submatrices (F⁻¹)_QQ of groups Q of entries that each lie inside one Fisher block.

        One compiled, batched computation per group of equal-size blocks: from the stored factor L⁻¹ for
        the explicit form ((F⁻¹)_QQ = (L⁻¹_{:,Q})ᵀL⁻¹_{:,Q}), from (I − GᵀK⁻¹G)/λ restricted to Q for the
        low-rank form. Under a strategy each replica computes those of its share of the blocks.

        Args:
            members: int array (n, q): the flat positions of each group's entries, padded with −1 (a
                group of fewer than q entries); the first entry of every row must be a position.

        Returns:
            (n, q, q) tensor of this inverse's dtype; the rows and columns of padding entries are those
            of the identity (so every matrix stays positive definite).

        Raises:
            ValueError: a position out of range, a row without entries, or a group whose entries lie in
                several Fisher blocks (align the partition to the groups: ``BlockPartition.from_segments``
                with ``groups=``).
        """
        members = np.asarray(members, dtype=np.int64)
        if members.ndim != 2 or members.shape[0] == 0:
            raise ValueError(f"members must be an (n, q) array of flat positions with n ≥ 1, got shape {members.shape}")
        if np.any(members[:, 0] < 0) or np.any(members >= self.partition.dim):
            raise ValueError(f"members must be positions in [0, {self.partition.dim}) padded with -1 after the first")
        valid = members >= 0
        positions = np.where(valid, members, members[:, :1])
        number, block, position = (table[positions] for table in self._locations())
        if np.any(number != number[:, :1]) or np.any(block != block[:, :1]):
            row = int(np.flatnonzero(np.any((number != number[:, :1]) | (block != block[:, :1]), axis=1))[0])
            raise ValueError(f"the group of entries {members[row][valid[row]].tolist()} lies in several Fisher "
                             "blocks: the block partition must contain every group whole")
        run, parts, rows = self._executor.run, [], []
        for index, (group, solved) in enumerate(zip(self.partition.groups, self._groups)):
            mine = np.flatnonzero(number[:, 0] == index)
            if not mine.size:
                continue
            mine = mine[np.argsort(block[mine, 0], kind="stable")]  # the groups block by block
            blocks = block[mine, 0]
            counts = np.bincount(blocks, minlength=group.num_blocks)
            slot = np.arange(mine.size) - np.repeat(np.cumsum(counts) - counts, counts)
            table = np.zeros((group.num_blocks, int(counts.max()), members.shape[1]), np.int64)
            table[blocks, slot] = position[mine]
            table = self._executor.shard(tf.constant(table))
            if solved.form == "lowrank":
                result = run(_lowrank_submatrices, solved.blocks, solved.factor,
                             tf.constant(solved.damping, self.dtype), table)
            else:
                result = run(_explicit_submatrices, solved.factor, table)
            result = self._executor.gather(result, group.num_blocks)
            parts.append(tf.gather_nd(result, np.stack([blocks, slot], axis=1)))
            rows.append(mine)
        order = np.argsort(np.concatenate(rows), kind="stable")
        matrices = tf.gather(tf.concat(parts, axis=0), order)
        mask = tf.constant(valid, self.dtype)
        eye = tf.eye(members.shape[1], dtype=self.dtype)
        return matrices * mask[:, :, None] * mask[:, None, :] + eye * (1.0 - mask[:, :, None])

    def _locations(self):
        """(group number, block number, position in the block) of every flat entry, each an int64 (d,) array."""
        if self._location_tables is None:
            tables = [np.zeros(self.partition.dim, np.int64) for _ in range(3)]
            for index, group in enumerate(self.partition.groups):  # a loop over the few groups, not the blocks
                tables[0][group.indices] = index
                tables[1][group.indices] = np.arange(group.num_blocks)[:, None]
                tables[2][group.indices] = np.arange(group.block_size)[None, :]
            self._location_tables = tuple(tables)
        return self._location_tables

    def _to_flat(self, per_group):
        flat = tf.concat([tf.reshape(t, [-1]) for t in per_group], axis=0)
        return tf.gather(flat, self._inverse_order)


def _column_pieces(gradients):
    """(pieces, offsets, m): the gradients as a list of (m, d_j) column pieces or :class:`BlockGrams`, the
    first column of each (plus d at the end), and m. Raises ValueError if the pieces disagree on m."""
    pieces = [g if isinstance(g, BlockGrams) else tf.convert_to_tensor(g)
              for g in (gradients if isinstance(gradients, (list, tuple)) else [gradients])]
    rows = {piece.num_gradients if isinstance(piece, BlockGrams) else int(piece.shape[0]) for piece in pieces}
    if len(rows) != 1:
        raise ValueError(f"the gradient pieces must have the same number of rows, got {sorted(rows)}")
    widths = [piece.size if isinstance(piece, BlockGrams) else int(piece.shape[1]) for piece in pieces]
    return pieces, np.cumsum([0] + widths), rows.pop()


def _owners(offsets, group):
    """Index of the piece holding the first entry of each block of ``group``."""
    return np.searchsorted(offsets, group.indices[:, 0], side="right") - 1


def _spans_pieces(offsets, group, owner):
    """True if a block of ``group`` runs past the end of the piece ``owner`` holding its first entry."""
    return bool(np.any(group.indices[:, -1] >= offsets[owner + 1]))


def _owns_grams(pieces, offsets, group):
    return any(isinstance(pieces[j], BlockGrams) for j in np.unique(_owners(offsets, group)))


def _group_grams(pieces, offsets, group, dtype):
    """The (K, c, c) Gram sums GᵀG of the blocks of ``group`` in ``dtype``: taken from the pieces that are
    :class:`BlockGrams`, computed from the rows of the others. Raises ValueError if a block spans pieces."""
    owner = _owners(offsets, group)
    if _spans_pieces(offsets, group, owner):
        raise ValueError("a block spans several weight tensors, but some of them come as Gram sums: "
                         "use a block size within tensors")
    if not np.all(np.diff(group.indices, axis=1) == 1):
        raise ValueError("blocks of non-consecutive entries (aligned to a sparsity structure) cannot be taken from "
                         "Gram sums of consecutive chunks: collect the gradient rows")
    parts = []
    for j in np.unique(owner):
        local = group.indices[owner == j] - offsets[j]
        if isinstance(pieces[j], BlockGrams):
            parts.append(tf.cast(pieces[j].grams(local[:, 0], group.block_size), dtype))
        else:
            parts.append(_gram(tf.cast(_piece_blocks(pieces[j], local), dtype)))
    return parts[0] if len(parts) == 1 else tf.concat(parts, axis=0)


def _one_group_per_piece(partition, offsets):
    """``partition`` with each group whose blocks are all whole pieces split into one group per block, so
    that every such block is a view of its piece, never a stacked copy (same blocks, same order)."""
    groups = []
    for group in partition.groups:
        starts = group.indices[:, 0]
        piece = np.searchsorted(offsets, starts, side="right") - 1
        whole = (starts == offsets[piece]) & (offsets[piece + 1] - starts == group.block_size)
        groups += [BlockGroup(block[None]) for block in group.indices] if group.num_blocks > 1 and whole.all() \
            else [group]
    return dataclasses.replace(partition, groups=tuple(groups))


def _group_blocks(pieces, offsets, group, dtype, buffers=None):
    """The (K, m, c) blocks of ``group`` in ``dtype``, taken piece by piece (see :func:`_piece_blocks`).

    Blocks spanning several pieces (block_size='model' over a list) or out of order are gathered from
    the pieces side by side.
    """
    owner = _owners(offsets, group)
    if _spans_pieces(offsets, group, owner) or np.any(np.diff(owner) < 0):
        pieces, offsets, owner = [tf.concat(pieces, axis=1)], offsets[[0, -1]], np.zeros_like(owner)
    parts = [_piece_blocks(pieces[j], group.indices[owner == j] - offsets[j], buffers) for j in np.unique(owner)]
    return tf.cast(parts[0] if len(parts) == 1 else tf.concat(parts, axis=0), dtype)


def _piece_blocks(piece, indices, buffers=None):
    """(K, m, c) blocks of one (m, n) piece, indices (K, c) local to it: consecutive columns are a reshape
    of a column range (no copy at all for a single block over the whole piece), others a gather."""
    m, (count, size) = int(piece.shape[0]), indices.shape
    if not np.all(np.diff(indices.reshape(-1)) == 1):
        return tf.transpose(tf.gather(piece, indices, axis=1), [1, 0, 2])
    begin = int(indices[0, 0])
    if count > 1 and on_host(piece):  # one pass instead of TensorFlow's copy of the range, then its transpose
        return transposed_blocks(piece, begin, count, size, buffers)
    columns = piece if indices.size == piece.shape[1] else piece[:, begin:begin + indices.size]
    if count == 1:
        return tf.reshape(columns, [1, m, size])
    return tf.transpose(tf.reshape(columns, [m, count, size]), [1, 0, 2])


def _solve_group(blocks, form, damping, dtype, executor, num_gradients=None):
    """Factorise a group's blocks (K, m, c), or its Gram sums (K, c, c) of ``num_gradients`` gradients."""
    sharded = executor.shard(blocks)
    for attempt in range(MAX_DAMPING_RETRIES + 1):
        try:
            damping_t = tf.constant(damping, dtype)
            if num_gradients is not None:
                factor, diagonal = executor.run(_explicit_inverse_of_gram, sharded,
                                                tf.constant(num_gradients, dtype), damping_t)
            else:
                if form != "lowrank":
                    factorise = _explicit_inverse
                elif int(blocks.shape[0]) == 1:
                    factorise = _lowrank_factor_of_one_block
                else:
                    factorise = _lowrank_factor
                factor, diagonal = executor.run(factorise, sharded, damping_t)
            diagonal = executor.gather(diagonal, int(blocks.shape[0]))
            result = _SolvedGroup(form, damping, sharded if form == "lowrank" else None, factor, diagonal)
            if bool(tf.reduce_all(tf.math.is_finite(result.diagonal))) and bool(tf.reduce_all(result.diagonal > 0)):
                return result
            reason = "non-finite or non-positive diagonal of the inverse"
        except tf.errors.InvalidArgumentError as error:
            reason = str(error).splitlines()[0]
        if attempt == MAX_DAMPING_RETRIES:
            break
        warnings.warn(
            f"Cholesky factorisation of a {form} Fisher block group {tuple(blocks.shape)} failed at damping "
            f"{damping:g} ({reason}); retrying with damping {damping * DAMPING_RETRY_FACTOR:g}",
            RuntimeWarning,
            stacklevel=3,
        )
        damping *= DAMPING_RETRY_FACTOR
    raise CholeskyError(
        f"Cholesky factorisation of a {form} Fisher block group {tuple(blocks.shape)} failed even at damping "
        f"{damping:g}: the gradients are ill-conditioned; use inverse_dtype='float64' or a larger damping"
    )


__all__ = ["InverseFisher", "BlockPartition", "CholeskyError", "choose_form", "explicit_flops", "lowrank_flops"]
