"""The Keras 3 path against the tf_keras path (each in its own process), and MirroredStrategy against one device."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

WORKER = pathlib.Path(__file__).with_name("_worker.py")


def run(mode, out, mnist_dir, mlpnet_npz):
    env = dict(os.environ, TFW_MNIST_DIR=mnist_dir, TFW_MLPNET_NPZ=mlpnet_npz, TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("TF_USE_LEGACY_KERAS", None)
    result = subprocess.run([sys.executable, str(WORKER), mode, str(out)], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), np.load(out)


def test_same_mlpnet_same_config_same_masks_and_weights_through_both_paths(tmp_path, mnist_dir, mlpnet_npz):
    old_summary, old = run("tfw", tmp_path / "tfw.npz", mnist_dir, mlpnet_npz)
    new_summary, new = run("tfw3", tmp_path / "tfw3.npz", mnist_dir, mlpnet_npz)
    assert old_summary["layers"] == new_summary["layers"]  # the same names and per-layer sparsities
    assert new_summary["sparsity"] == pytest.approx(0.9, abs=1e-4)
    original = np.load(mlpnet_npz)
    for i, key in enumerate(("fc1_kernel", "fc2_kernel", "fc3_kernel")):
        a, b = old[f"kernel_{i}"], new[f"kernel_{i}"]
        np.testing.assert_array_equal(a == 0, b == 0)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
        kept = a != 0
        assert not np.allclose(a[kept], original[key][kept])  # the OBS update moved the kept weights
    for name in ("constant", "polynomial", "gradual", "one_shot"):  # tf_woodfisher.keras3's schedules = tfmot's
        np.testing.assert_array_equal(new[f"{name}_prune"], old[f"{name}_prune"])
        np.testing.assert_allclose(new[f"{name}_sparsity"], old[f"{name}_sparsity"], rtol=0, atol=1e-7)
        assert old[f"{name}_prune"].any()


def test_mirrored_strategy_equals_one_device_for_one_shot_and_gradual(tmp_path, mnist_dir, mlpnet_npz):
    summary, arrays = run("mirrored", tmp_path / "mirrored.npz", mnist_dir, mlpnet_npz)
    assert summary["replicas"] == 2
    # Replicas sum the gradients in another order; F⁻¹ (λ = 1e-5) amplifies that float32 noise to about 1e-5 of
    # the weights' scale on CPUs without oneDNN (1e-6 with it). Dropped or doubled samples would move them by 1e-2.
    for kind, atol in (("one_shot", 3e-5), ("gradual", 3e-5), ("mask", 0)):
        for i in range(3):
            single, mirrored = arrays[f"{kind}_single_{i}"], arrays[f"{kind}_mirrored_{i}"]
            np.testing.assert_array_equal(single == 0, mirrored == 0)
            np.testing.assert_allclose(mirrored, single, rtol=0, atol=atol)
    sparsity = np.mean(np.concatenate([arrays[f"gradual_mirrored_{i}"].ravel() for i in range(3)]) == 0)
    assert sparsity == pytest.approx(0.9, abs=1e-3)
