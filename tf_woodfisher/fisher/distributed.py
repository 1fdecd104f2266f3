"""Running the Fisher core under ``tf.distribute``: work split along a leading axis across replicas.

An executor shards a tensor (or a nest of tensors) along axis 0, runs a compiled function on each
shard, and gathers the results back in order (or sums them across replicas). The local executor
does all of it in place. The replica executor gives replica r (of R, over all workers) rows
[r·k, (r+1)·k) of the input zero-padded to R·k rows, runs the function on every replica with
``strategy.run``, and all-gathers with ``strategy.gather`` (sums with ``strategy.reduce``). Every
worker therefore ends with the same full result, so the scores, thresholds and masks computed from
it agree on every replica and worker.
Per-sample gradients are split by sample and the inverse-Fisher blocks by block.
"""
import hashlib

import numpy as np
import tensorflow as tf


class LocalExecutor:
    """No strategy (or one replica): everything runs here.

    The same interface as :class:`ReplicaExecutor`, with every operation the identity.

    Args:
        strategy: a one-replica ``tf.distribute`` strategy whose variables the functions read (e.g. a
            ``MirroredStrategy`` on one device): :meth:`run` then enters its replica context, where such
            variables have a handle to differentiate; None (the default strategy): functions run as they are.

    Attributes:
        num_replicas: always 1.
        gathered_bytes: always 0.
        reduced_bytes: always 0.
    """

    num_replicas = 1
    gathered_bytes = 0
    reduced_bytes = 0

    def __init__(self, strategy=None):
        self.strategy = strategy

    def take_traffic(self):
        """(gathered, reduced) bytes since the last call: always (0, 0) on one replica.

        Returns:
            The pair of ints ``(0, 0)``.
        """
        return 0, 0

    def shard(self, structure):
        """The identity: the one replica holds all rows.

        Args:
            structure: a nest of tensors with equal leading size n.

        Returns:
            ``structure`` itself.
        """
        return structure

    def run(self, fn, *args):
        """Call ``fn`` here (in the replica context of the one-replica strategy, if any).

        Args:
            fn: a (compiled) function of the shards.
            *args: its arguments, as returned by :meth:`shard`.

        Returns:
            ``fn(*args)``.
        """
        if self.strategy is None:
            return fn(*args)
        return self.strategy.run(fn, args=args)

    def gather(self, structure, count):
        """The identity: there is nothing to gather and no padding to drop.

        Args:
            structure: a nest of tensors, the result of :meth:`run`.
            count: rows of the unpadded result (unused: nothing was padded).

        Returns:
            ``structure`` itself.
        """
        return structure

    def reduce_sum(self, structure):
        """The identity: the sum over one replica.

        Args:
            structure: a nest of tensors, the result of :meth:`run`.

        Returns:
            ``structure`` itself.
        """
        return structure

    def check_consistent(self, arrays, what):
        """Nothing to compare with a single replica.

        Args:
            arrays: host arrays (unused).
            what: their description, for error messages (unused).
        """

    def require_divisible(self, count, what):
        """Any count splits over one replica.

        Args:
            count: number of items (unused).
            what: their name, for error messages (unused).
        """


class ReplicaExecutor:
    """Shards along axis 0 over ``strategy.num_replicas_in_sync`` replicas (all workers).

    Args:
        strategy: the ``tf.distribute.Strategy`` to run on (R = its ``num_replicas_in_sync``).

    Attributes:
        num_replicas: R, replicas in sync over all workers.
        gathered_bytes: bytes of all-gathered results (each replica receives (R−1)/R of them).
        reduced_bytes: the payload, in bytes, of sum all-reduces (a ring all-reduce moves 2(R−1)/R of it
            per replica).
    """

    def __init__(self, strategy):
        self.strategy = strategy
        self.num_replicas = strategy.num_replicas_in_sync
        self.gathered_bytes = 0
        self.reduced_bytes = 0

    def take_traffic(self):
        """(gathered, reduced) bytes exchanged since the last call (or since creation), then reset to 0.

        Returns:
            The pair of ints ``(gathered_bytes, reduced_bytes)`` before the reset.
        """
        traffic = self.gathered_bytes, self.reduced_bytes
        self.gathered_bytes = self.reduced_bytes = 0
        return traffic

    def shard(self, structure):
        """A nest of tensors with equal leading size n → a nest of PerReplica shards of ceil(n/R) rows.

        Replica r gets rows [r·k, (r+1)·k) of the input zero-padded to R·k rows, k = ceil(n/R).

        Args:
            structure: a nest of tensors with equal leading size n.

        Returns:
            The same nest of PerReplica values, each shard of k rows.
        """
        leaves = tf.nest.flatten(structure)
        total = padded_rows(int(leaves[0].shape[0]), self.num_replicas)
        per_replica = total // self.num_replicas
        padded = [_pad_rows(t, total) for t in leaves]

        def replica_value(context):
            start = context.replica_id_in_sync_group * per_replica
            return tf.nest.pack_sequence_as(structure, [t[start:start + per_replica] for t in padded])

        return self.strategy.experimental_distribute_values_from_function(replica_value)

    def run(self, fn, *args):
        """Run ``fn`` on every replica with ``strategy.run``.

        Args:
            fn: a (compiled) function of one replica's shards.
            *args: its arguments, PerReplica values as returned by :meth:`shard`.

        Returns:
            The PerReplica results.
        """
        return self.strategy.run(fn, args=args)

    def gather(self, structure, count):
        """All-gather PerReplica results along axis 0 and drop the padding rows beyond ``count``.

        Adds the gathered bytes to ``gathered_bytes``.

        Args:
            structure: a nest of PerReplica tensors, the result of :meth:`run`.
            count: rows of the unpadded result (n of the input to :meth:`shard`).

        Returns:
            The nest of tensors of ``count`` rows, the same on every worker.
        """
        return tf.nest.map_structure(lambda t: self._gather(t)[:count], structure)

    def reduce_sum(self, structure):
        """Sum-all-reduce a nest of PerReplica values across the replicas: a nest of tensors.

        Adds the reduced payload to ``reduced_bytes``.

        Args:
            structure: a nest of PerReplica tensors, the result of :meth:`run`.

        Returns:
            The nest of tensors, each the sum over the replicas.
        """
        return tf.nest.map_structure(self._reduce, structure)

    def _reduce(self, per_replica):
        total = self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)
        self.reduced_bytes += total.shape.num_elements() * total.dtype.size
        return total

    def _gather(self, per_replica):
        gathered = self.strategy.gather(per_replica, axis=0)
        self.gathered_bytes += gathered.shape.num_elements() * gathered.dtype.size
        return gathered

    def require_divisible(self, count, what):
        """Raise ValueError unless ``count`` items split evenly over the replicas.

        Args:
            count: number of items (e.g. Fisher gradients).
            what: their name, for the error message (e.g. ``'num_gradients'``).

        Raises:
            ValueError: ``count`` is not a multiple of R.
        """
        if count % self.num_replicas:
            raise ValueError(f"{what}={count} is not divisible by the strategy's {self.num_replicas} replicas: "
                             "each replica must compute the same number of Fisher gradients")

    def check_consistent(self, arrays, what):
        """Raise ValueError unless ``arrays`` (a list of host arrays) are identical on every worker.

        Compares a SHA-256 digest of their bytes, all-gathered from every replica.

        Args:
            arrays: a list of NumPy arrays (any shape and dtype).
            what: their description, for the error message.

        Raises:
            ValueError: the workers disagree.
        """
        hasher = hashlib.sha256()
        for array in arrays:
            hasher.update(np.ascontiguousarray(array).tobytes())
        digest = np.frombuffer(hasher.digest()[:8], np.int64)
        digests = self._gather(self.strategy.experimental_distribute_values_from_function(
            lambda _: tf.constant(digest))).numpy()
        if np.any(digests != digests[0]):
            raise ValueError(f"the workers disagree on {what}: every worker must use the same model and the same "
                             "deterministic Fisher dataset (seed its shuffling, do not shard it by worker)")


def padded_rows(count, num_replicas):
    """Rows after zero-padding ``count`` rows to split evenly over ``num_replicas``: ceil(count / R) · R.

    Args:
        count: rows before padding.
        num_replicas: R, replicas to split over (≥ 1).

    Returns:
        ceil(count / R) · R (an int).
    """
    return -(-count // num_replicas) * num_replicas


def _pad_rows(tensor, rows):
    missing = rows - int(tensor.shape[0])
    if missing == 0:
        return tensor
    padding = [[0, missing]] + [[0, 0]] * (tensor.shape.rank - 1)
    return tf.pad(tensor, padding)


def executor_for(strategy=None):
    """A new executor for ``strategy`` (None: the current ``tf.distribute`` strategy, usually the default).

    Whoever creates an executor owns its byte counters (:meth:`ReplicaExecutor.take_traffic`):
    a pruning event passes its executor to every stage so that its report counts all its traffic.

    Args:
        strategy: a ``tf.distribute.Strategy``, or None for the current one.

    Returns:
        A :class:`LocalExecutor` when the strategy has one replica in sync, else a :class:`ReplicaExecutor`.
    """
    strategy = strategy or tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync == 1:
        # A one-replica strategy's variables (MirroredVariable) have a handle only in its replica context.
        default = strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy()
        return LocalExecutor(None if default else strategy)
    return ReplicaExecutor(strategy)
