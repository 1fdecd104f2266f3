"""The NumPy reference of gRDA and a small regression problem, for the tf_keras and the Keras 3 optimizer's tests.

Imports neither Keras (tests_keras3 runs in a Keras 3 process, tests in a tf_keras one).
"""
import numpy as np
import tensorflow as tf


def reference_grda(weights, grad_fn, lrs, c, mu, momentum, excluded):
    """NumPy gRDA in float64: returns (weights, accumulators (None for excluded), tau) after len(lrs) steps."""
    w = [x.copy() for x in weights]
    a = [None if ex else x.copy() for x, ex in zip(weights, excluded)]
    b = [np.zeros_like(x) for x in weights]
    tau = 0.0
    for k, lr in enumerate(lrs, start=1):
        grads = grad_fn(w)
        tau += c * lr ** (mu + 0.5) * (k ** mu - (k - 1) ** mu)
        for i, g in enumerate(grads):
            b[i] = momentum * b[i] + g
            if a[i] is None:
                w[i] = w[i] - lr * b[i]
            else:
                a[i] = a[i] - lr * b[i]
                w[i] = np.sign(a[i]) * np.maximum(np.abs(a[i]) - tau, 0.0)
    return w, a, tau


def regression_problem(rng):
    """Two thresholded variables (kernel, extra) and one excluded bias with analytic float64 gradients."""
    x = rng.standard_normal((32, 6))
    kernel_true = rng.standard_normal((6, 2)) * (rng.random((6, 2)) < 0.5)
    y = x @ kernel_true + 0.3 + 0.05 * rng.standard_normal((32, 2))
    extra_target = rng.standard_normal(5) * 0.2
    init = [rng.standard_normal((6, 2)) * 0.1, np.zeros(2), rng.standard_normal(5)]

    def grad_fn(w):
        residual = x @ w[0] + w[1] - y
        return [x.T @ residual / len(x), residual.mean(0), w[2] - extra_target]

    def loss_fn(kernel, bias, extra):
        residual = tf.matmul(x, kernel) + bias - y
        fit_term = 0.5 * tf.reduce_sum(tf.reduce_mean(residual ** 2, axis=0))
        return fit_term + 0.5 * tf.reduce_sum((extra - extra_target) ** 2)

    return init, grad_fn, loss_fn
