import pytest

import tf_woodfisher as tfw


def test_layer_sparsity_and_accuracy_plots_are_written(mlpnet_npz, tmp_path):
    report = tfw.one_shot_prune(tfw.models.mlpnet(mlpnet_npz), None, None, 0.9, method="magnitude", verbose=0)
    figure = tfw.plots.plot_layer_sparsity(report, tmp_path / "layers.png")
    bars = figure.axes[0].patches
    assert [round(b.get_height(), 4) for b in bars] == [round(100 * layer.sparsity, 4) for layer in report.layers]
    assert (tmp_path / "layers.png").stat().st_size > 1000
    curves = {"magnitude": [(0.5, 0.93), (0.9, 0.90, 0.01)], "woodfisher": [(0.9, 0.93), (0.5, 0.94)]}
    figure = tfw.plots.plot_accuracy_vs_sparsity(curves, tmp_path / "acc.png", dense_accuracy=0.9397)
    lines = [container.lines[0] for container in figure.axes[0].containers]  # one errorbar per method
    assert list(lines[0].get_xdata()) == [50.0, 90.0] and list(lines[1].get_ydata()) == pytest.approx([94.0, 93.0])
    assert (tmp_path / "acc.png").stat().st_size > 1000
