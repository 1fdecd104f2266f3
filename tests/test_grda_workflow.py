"""The gRDA workflow end to end: train sparse with GRDA, fix the zeros as masks, fine-tune, export a sparse .tflite."""
import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_woodfisher as tfw
import tf_keras as keras

NUM_TRAIN, NUM_TEST = 500, 2000
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def kernels(model):
    """The Dense kernels of a (stripped) model, as arrays."""
    return [layer.kernel.numpy() for layer in model.layers if isinstance(layer, keras.layers.Dense)]


def zero_fraction(arrays):
    return sum(int(np.sum(a == 0)) for a in arrays) / sum(a.size for a in arrays)


def accuracy(model, x, y):
    return float(np.mean(model.predict(x, batch_size=1000, verbose=0).argmax(axis=1) == y))


def test_grda_masks_from_zeros_fine_tune_and_sparse_tflite(mnist_flat, tmp_path):
    (x_train, y_train), (x_test, y_test) = mnist_flat
    x_train, y_train = x_train[:NUM_TRAIN], y_train[:NUM_TRAIN]
    x_test, y_test = x_test[:NUM_TEST], y_test[:NUM_TEST]

    # 1. gRDA from scratch: with c = 0.05 the threshold passes most kernel entries within 10 epochs
    #    (≈ 87 % zeros, ≈ 80 % test accuracy).
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(64, activation="relu", name="fc1"),
                              keras.layers.Dense(10, name="fc2")])
    model.compile(tfw.optimizers.GRDA(0.1, c=0.05, mu=0.6, exclude="bias"), LOSS, metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=10, shuffle=True, verbose=0)
    grda_sparsity = zero_fraction(kernels(model))
    grda_accuracy = accuracy(model, x_test, y_test)
    assert grda_sparsity >= 0.5, f"gRDA left only {grda_sparsity:.1%} of the kernel entries at zero"
    assert grda_accuracy > 0.75
    zeros = [k == 0 for k in kernels(model)]

    # 2. Its zeros become fixed masks; one epoch of Adam fine-tuning keeps every one of them.
    wrapped = tfw.masks_from_zeros(model)
    wrapped.compile(keras.optimizers.Adam(1e-3), LOSS, metrics=["accuracy"])
    wrapped.fit(x_train, y_train, batch_size=32, epochs=1, shuffle=True, verbose=0,
                callbacks=[tfw.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(wrapped)
    tuned = kernels(stripped)
    for layer_zeros, kernel in zip(zeros, tuned):
        assert np.all(kernel[layer_zeros] == 0), "fine-tuning revived weights that gRDA had zeroed"
    masks = [mask.numpy() for layer in wrapped.layers if hasattr(layer, "pruning_vars")
             for _, mask, _ in layer.pruning_vars]
    assert [np.array_equal(mask == 0, layer_zeros) for mask, layer_zeros in zip(masks, zeros)] == [True, True]
    assert zero_fraction(tuned) == pytest.approx(grda_sparsity)
    tuned_accuracy = accuracy(stripped, x_test, y_test)
    assert tuned_accuracy >= grda_accuracy - 0.03, (grda_accuracy, tuned_accuracy)

    # 3. Sparse .tflite of the wrapped model (export_tflite strips it), verified on the test images.
    path = tmp_path / "grda.tflite"
    export = tfw.export_tflite(wrapped, str(path), sparse=True, check_inputs=x_test[:500])
    assert path.stat().st_size == export.bytes
    assert export.bytes < export.dense_bytes, (export.bytes, export.dense_bytes)
    assert export.argmax_agreement == 1.0
    assert export.num_checked == 500
