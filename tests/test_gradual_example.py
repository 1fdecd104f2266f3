"""examples/gradual_pruning_mnist.py in its --quick configuration: both methods reach the target, files written."""
import csv
import importlib.util
import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "gradual_pruning_mnist.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("gradual_pruning_mnist", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_prunes_both_methods_and_writes_results(example, mnist_dir, tmp_path):
    out, cache = tmp_path / "results", tmp_path / "cache"
    argv = ["--quick", "--data-dir", mnist_dir, "--out", str(out), "--cache-dir", str(cache)]
    rows, summary = example.main(argv)

    assert sorted(row["method"] for row in rows) == ["magnitude", "woodfisher"]
    for row in rows:
        assert row["target_sparsity"] == 0.9
        assert row["sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert row["pruning_events"] >= 1
        assert row["tflite_sparse_bytes"] < 0.3 * row["tflite_dense_bytes"]
        assert row["tflite_argmax_agreement"] >= 0.99
        assert (cache / f"{row['method']}_s0.9_seed0.tflite").exists()
    by_method = {row["method"]: row for row in rows}
    # tfmot prunes every layer to the target; WoodFisher picks one global threshold.
    assert all(by_method["magnitude"][f"sparsity_{name}"] == pytest.approx(0.9, abs=0.01)
               for name in ("conv1", "conv2", "fc1", "fc2"))
    assert by_method["magnitude"]["pruning_events"] == by_method["woodfisher"]["pruning_events"]
    assert by_method["woodfisher"]["woodfisher_event_seconds"] > 0
    assert by_method["woodfisher"]["test_accuracy"] > 0.8

    with open(out / "gradual_mnist.csv", newline="") as f:
        written = list(csv.DictReader(f))
    assert [(r["method"], float(r["sparsity"])) for r in written] == [
        (r["method"], pytest.approx(r["sparsity"], abs=1e-5)) for r in rows]
    text = (out / "gradual_mnist.md").read_text()
    assert text.splitlines()[3].startswith("python examples/gradual_pruning_mnist.py --quick")
    assert "## Targets" in text and "woodfisher − magnitude" in text
    assert (out / "gradual_mnist.png").stat().st_size > 0
    assert sorted(summary) == [("magnitude", 0.9), ("woodfisher", 0.9)]
