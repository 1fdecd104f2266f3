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
    """No strategy (or one replica): everything runs here."""

    num_replicas = 1
    gathered_bytes = 0
    reduced_bytes = 0

    def take_traffic(self):
        """(gathered, reduced) bytes since the last call: always (0, 0) on one replica."""
        return 0, 0

    def shard(self, structure):
        return structure

    def run(self, fn, *args):
        return fn(*args)

    def gather(self, structure, count):
        return structure

    def reduce_sum(self, structure):
        return structure

    def check_consistent(self, arrays, what):
        """Nothing to compare with a single replica."""

    def require_divisible(self, count, what):
        """Any count splits over one replica."""


class ReplicaExecutor:
    """Shards along axis 0 over ``strategy.num_replicas_in_sync`` replicas (all workers).

    ``gathered_bytes`` counts the bytes of all-gathered results (each replica receives (R−1)/R of them);
    ``reduced_bytes`` the payload of sum all-reduces (a ring all-reduce moves 2(R−1)/R of it per replica).
    """

    def __init__(self, strategy):
        self.strategy = strategy
        self.num_replicas = strategy.num_replicas_in_sync
        self.gathered_bytes = 0
        self.reduced_bytes = 0

    def take_traffic(self):
        """(gathered, reduced) bytes exchanged since the last call (or since creation), then reset to 0."""
        traffic = self.gathered_bytes, self.reduced_bytes
        self.gathered_bytes = self.reduced_bytes = 0
        return traffic

    def shard(self, structure):
        """A nest of tensors with equal leading size n → a nest of PerReplica shards of ceil(n/R) rows."""
        leaves = tf.nest.flatten(structure)
        total = padded_rows(int(leaves[0].shape[0]), self.num_replicas)
        per_replica = total // self.num_replicas
        padded = [_pad_rows(t, total) for t in leaves]

        def replica_value(context):
            start = context.replica_id_in_sync_group * per_replica
            return tf.nest.pack_sequence_as(structure, [t[start:start + per_replica] for t in padded])

        return self.strategy.experimental_distribute_values_from_function(replica_value)

    def run(self, fn, *args):
        return self.strategy.run(fn, args=args)

    def gather(self, structure, count):
        """All-gather PerReplica results along axis 0 and drop the padding rows beyond ``count``."""
        return tf.nest.map_structure(lambda t: self._gather(t)[:count], structure)

    def reduce_sum(self, structure):
        """Sum-all-reduce a nest of PerReplica values across the replicas: a nest of tensors."""
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
        """Raise ValueError unless ``count`` items split evenly over the replicas."""
        if count % self.num_replicas:
            raise ValueError(f"{what}={count} is not divisible by the strategy's {self.num_replicas} replicas: "
                             "each replica must compute the same number of Fisher gradients")

    def check_consistent(self, arrays, what):
        """Raise ValueError unless ``arrays`` (a list of host arrays) are identical on every worker."""
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
    """Rows after zero-padding ``count`` rows to split evenly over ``num_replicas``: ceil(count / R) · R."""
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
    """
    strategy = strategy or tf.distribute.get_strategy()
    if strategy.num_replicas_in_sync == 1:
        return LocalExecutor()
    return ReplicaExecutor(strategy)
