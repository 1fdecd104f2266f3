"""tf.distribute: MirroredStrategy on 2 logical CPUs and MultiWorkerMirroredStrategy with 2 local workers.

Both run in subprocesses (tests/_distributed_worker.py): logical devices and TF_CONFIG must be set
before TensorFlow starts. Each compares the masks and weights it ends with to a one-device run.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

import tf_woodfisher as tfw
import tensorflow as tf
import tf_keras as keras
from tf_woodfisher.fisher.grams import reduced_bytes

WORKER = pathlib.Path(__file__).with_name("_distributed_worker.py")
TIMEOUT = 420


def environment(mnist_dir, mlpnet_npz, **extra):
    env = dict(os.environ, TFW_MNIST_DIR=mnist_dir, TFW_MLPNET_NPZ=mlpnet_npz, **extra)
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def run_worker(role, out, env):
    result = subprocess.run([sys.executable, str(WORKER), role, str(out)], env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    return np.load(out)


def arrays(npz, prefix):
    keys = sorted((k for k in npz.files if k.startswith(prefix + "_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    return [npz[k] for k in keys]


def assert_same(actual, expected, atol):
    assert len(actual) == len(expected) > 0
    for a, b in zip(actual, expected):
        np.testing.assert_array_equal(a == 0, b == 0)
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_mirrored_strategy_matches_one_device(tmp_path, mnist_dir, mlpnet_npz):
    result = run_worker("mirrored", tmp_path / "mirrored.npz", environment(mnist_dir, mlpnet_npz))
    assert int(result["replicas"]) == 2
    assert float(result["sparsity_0"]) == float(result["sparsity_1"]) == pytest.approx(0.9, abs=1e-4)
    # 2 steps × (64 gradient rows of d = 32,360 float32) + diagonals and products; nothing on one device.
    gradient_bytes = 2 * 64 * 32_360 * 4
    assert gradient_bytes < int(result["gathered_bytes_0"]) < gradient_bytes * 1.1
    assert int(result["gathered_bytes_1"]) == 0
    # One-shot: samples split by replica, blocks split by replica, all-gathered: the same numbers.
    assert_same(arrays(result, "one_shot_mirrored"), arrays(result, "one_shot_single"), atol=1e-6)
    # Gradual pruning in model.fit: same events, same masks, weights equal to float tolerance.
    np.testing.assert_array_equal(result["events_0"], result["events_1"])
    assert_same(arrays(result, "masks_mirrored"), arrays(result, "masks_single"), atol=0)
    assert_same(arrays(result, "gradual_mirrored"), arrays(result, "gradual_single"), atol=1e-5)
    assert_same(arrays(result, "grda_mirrored"), arrays(result, "grda_single"), atol=1e-5)
    # Blocks of 20 entries < m/2: each replica sums its gradients' 20 × 20 Gram matrices (WoodTaylor: and the
    # gradients), or their squares (diagonal Fisher), and only those sums are all-reduced, never the rows.
    sizes = [784 * 40, 40 * 20, 20 * 10]
    gram_bytes = 2 * sum(reduced_bytes(size, 20) for size in sizes)  # 2 steps
    square_bytes = 2 * sum(reduced_bytes(size, 1) for size in sizes)
    for method, payload in (("woodtaylor", gram_bytes), ("diagonal_fisher", square_bytes)):
        gathered, reduced = arrays(result, f"exchanged_{method}_mirrored")
        assert int(reduced) == payload and int(gathered) < gradient_bytes / 10
        assert list(arrays(result, f"exchanged_{method}_single")) == [0, 0]
        assert_same(arrays(result, f"{method}_mirrored"), arrays(result, f"{method}_single"), atol=1e-5)
    # Chunks of 800 weights of whole output units (fisher_block_order='filter'), more than m/2: the rows are
    # all-gathered, and the replicas' blocks of scattered columns give one device's result.
    gathered, reduced = arrays(result, "exchanged_filter_mirrored")
    assert gradient_bytes < int(gathered) < gradient_bytes * 1.1 and int(reduced) == 0
    assert list(arrays(result, "exchanged_filter_single")) == [0, 0]
    assert_same(arrays(result, "filter_mirrored"), arrays(result, "filter_single"), atol=1e-6)


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_two_workers(role, tmp_path, env):
    """Run ``role`` in 2 MultiWorkerMirroredStrategy worker processes on free localhost ports; their outputs."""
    cluster = {"worker": [f"localhost:{free_port()}", f"localhost:{free_port()}"]}
    processes = []
    try:
        for index in range(2):
            config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
            processes.append(subprocess.Popen(
                [sys.executable, str(WORKER), role, str(tmp_path / f"{role}{index}.npz")],
                env=dict(env, TF_CONFIG=config), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for process in processes:
            _, stderr = process.communicate(timeout=TIMEOUT)
            assert process.returncode == 0, stderr[-4000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return [np.load(tmp_path / f"{role}{i}.npz") for i in range(2)]


def test_multi_worker_mirrored_strategy_two_processes(tmp_path, mnist_dir, mlpnet_npz):
    env = environment(mnist_dir, mlpnet_npz)
    single = run_worker("single", tmp_path / "single.npz", env)
    workers = run_two_workers("multiworker", tmp_path, env)
    assert [int(w["replicas"]) for w in workers] == [2, 2]
    for key in ("masks", "gradual", "grda", "reduced"):  # the two workers end bit-identical
        for a, b in zip(arrays(workers[0], key), arrays(workers[1], key)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(arrays(workers[0], "events"), arrays(single, "events"))
    assert_same(arrays(workers[0], "masks"), arrays(single, "masks"), atol=0)
    assert_same(arrays(workers[0], "gradual"), arrays(single, "gradual"), atol=1e-5)
    assert_same(arrays(workers[0], "grda"), arrays(single, "grda"), atol=1e-5)
    # One-shot with blocks of 20 entries: Gram sums all-reduced across the two processes.
    assert int(arrays(workers[0], "exchanged")[1]) > 0 and list(arrays(single, "exchanged")) == [0, 0]
    assert_same(arrays(workers[0], "reduced"), arrays(single, "reduced"), atol=1e-5)


def test_num_samples_not_divisible_by_replicas_and_distributed_dataset(mnist_flat, mlpnet_npz):
    """Bad input, checked in-process on the default strategy's executor and a fake 3-replica strategy."""
    (x, y), _ = mnist_flat
    fisher = tf.data.Dataset.from_tensor_slices((x[:64], y[:64]))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    class ThreeReplicas:
        num_replicas_in_sync = 3

    with pytest.raises(ValueError, match="not divisible by the strategy's 3 replicas"):
        tfw.one_shot_prune(tfw.models.mlpnet(mlpnet_npz), fisher, loss, 0.5, num_gradients=32, strategy=ThreeReplicas(),
                           verbose=0)
    distributed = tf.distribute.MirroredStrategy(["/cpu:0"]).experimental_distribute_dataset(fisher.batch(8))
    with pytest.raises(TypeError, match="not a distributed dataset"):
        tfw.one_shot_prune(tfw.models.mlpnet(mlpnet_npz), distributed, loss, 0.5, num_gradients=32, verbose=0)


def test_workers_that_disagree_are_detected(tmp_path, mnist_dir, mlpnet_npz):
    """Two worker processes: first with different Fisher data, then with different weights; both stop."""
    workers = run_two_workers("disagree", tmp_path, environment(mnist_dir, mlpnet_npz))
    for worker in workers:
        data_error, model_error = worker["errors"]
        assert "the workers disagree on the Fisher samples" in data_error
        assert "the workers disagree on the model's weights" in model_error
