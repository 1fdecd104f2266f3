"""Plots of pruning results (matplotlib, the optional ``plot`` extra: ``pip install tf_woodfisher[plot]``)."""


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'tf_woodfisher[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(figure, path):
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure


def plot_layer_sparsity(layers, path=None, title="Per-layer sparsity"):
    """Bar chart of the sparsity of each pruned tensor.

    Args:
        layers: a :class:`~tf_woodfisher.pruning.report.PruningReport`, its ``layers``, or a mapping
            name → sparsity in [0, 1] (e.g. an event of ``tfw.UpdatePruningStep().events``:
            ``event['layers']``).
        path: file to write (120 dpi; the format follows the extension), or None to write nothing.
        title: the axes' title.

    Returns:
        The matplotlib Figure (sparsity in % per tensor).

    Raises:
        ImportError: matplotlib is not installed (the ``plot`` extra).
    """
    if hasattr(layers, "layers"):
        layers = layers.layers
    pairs = list(layers.items()) if isinstance(layers, dict) else [(layer.name, layer.sparsity) for layer in layers]
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(max(4.0, 0.6 * len(pairs) + 2), 3.2))
    axes.bar(range(len(pairs)), [100 * value for _, value in pairs], color="tab:blue")
    axes.set_xticks(range(len(pairs)), [name for name, _ in pairs], rotation=45, ha="right")
    axes.set_ylabel("sparsity (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    return _finish(figure, path)


def plot_accuracy_vs_sparsity(curves, path=None, title="Accuracy against sparsity", dense_accuracy=None):
    """Line plot of accuracy (%) against sparsity (%), one line per method.

    Args:
        curves: mapping method name → list of (sparsity, accuracy) or (sparsity, accuracy, sd) tuples, with
            sparsity and accuracy as fractions (sd drawn as error bars).
        path: file to write (120 dpi; the format follows the extension), or None to write nothing.
        title: the axes' title.
        dense_accuracy: optional horizontal reference line, a fraction.

    Returns:
        The matplotlib Figure.

    Raises:
        ImportError: matplotlib is not installed (the ``plot`` extra).
    """
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        points = sorted(points)
        xs = [100 * p[0] for p in points]
        ys = [100 * p[1] for p in points]
        errors = [100 * p[2] if len(p) > 2 else 0.0 for p in points]
        axes.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name)
    if dense_accuracy is not None:
        axes.axhline(100 * dense_accuracy, color="gray", linestyle="--", label="dense")
    axes.set_xlabel("sparsity (%)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return _finish(figure, path)
