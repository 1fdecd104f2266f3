"""The liveness estimate of a traced function's transient bytes (fisher/graph_memory.py), against hand counts
and against TensorFlow's own allocator peak."""
import json
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_woodfisher.fisher.graph_memory import transient_bytes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_chain_holds_two_buffers_and_the_result_and_views_are_not_counted():
    weights = tf.Variable(tf.ones([1000, 300]))

    @tf.function
    def chain(x):
        a = x * 2.0  # (n, 1000)
        b = a + 1.0  # a is freed after this op: two buffers live
        return tf.reduce_sum(b * b, axis=1)  # b * b: b and its square live; the (n,) result is not counted

    @tf.function
    def layer(x):
        h = tf.matmul(x, weights)  # (n, 300)
        return tf.reshape(tf.nn.relu(h), [-1])  # the relu is returned through a view: only h counts

    spec = tf.TensorSpec([None, 1000])
    assert transient_bytes(chain.get_concrete_function(spec), [tf.TensorSpec([100, 1000])]) == 2 * 100 * 1000 * 4
    assert transient_bytes(chain.get_concrete_function(spec), [tf.TensorSpec([7, 1000])]) == 2 * 7 * 1000 * 4
    assert transient_bytes(layer.get_concrete_function(spec), [tf.TensorSpec([100, 1000])]) == 100 * 300 * 4
    with pytest.raises(ValueError, match="static shape"):
        transient_bytes(chain.get_concrete_function(spec), [tf.TensorSpec([None, 1000])])


_MEASURE = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_CPU_ALLOCATOR_USE_BFC"] = "true"
    import numpy as np
    import tensorflow as tf
    import tf_keras as keras
    import tf_woodfisher as tfw
    from tf_woodfisher.fisher.gradients import fisher_loss
    from tf_woodfisher.fisher.rules import make_rule_gradient_fn
    g, b = int(sys.argv[1]), int(sys.argv[2])
    model = tfw.models.small_cnn() if sys.argv[3] == "small_cnn" else tfw.models.resnet20()
    shape = model.input_shape[1:]
    variables = [t.variable for t in tfw.find_prunable_weights(model)]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="none")
    fn = make_rule_gradient_fn(model, variables, loss)
    x = tf.random.normal([g, b, *shape])
    y = tf.zeros([g, b], tf.int32)
    [r.numpy() for r in fn(x, y)]
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    tf.config.experimental.reset_memory_stats("CPU:0")
    rows = fn(x, y)
    [r.numpy() for r in rows]
    peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] - before
    returned = sum(int(r.shape.num_elements()) * 4 for r in rows)
    print(json.dumps(dict(peak=peak, returned=returned,
                          estimate=fn.transient_bytes(tf.TensorSpec(x.shape), tf.TensorSpec(y.shape, tf.int32)))))
""")


@pytest.mark.slow
@pytest.mark.parametrize("model,groups,group_size", [("small_cnn", 64, 16), ("small_cnn", 256, 1), ("resnet20", 8, 16)])
def test_the_estimate_with_its_margin_bounds_the_allocators_peak(model, groups, group_size):
    """One call of the rule gradient function, measured by TensorFlow's BFC CPU allocator in a fresh process:
    its peak (the returned rows aside) is within TRANSIENT_MARGIN × the estimate, and above a third of it."""
    from tf_woodfisher.fisher.memory import TRANSIENT_MARGIN

    result = subprocess.run([sys.executable, "-c", _MEASURE, str(groups), str(group_size), model],
                            capture_output=True, text=True, cwd=ROOT, timeout=600, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    measured = json.loads(lines[-1])
    transient = measured["peak"] - measured["returned"]
    assert transient <= TRANSIENT_MARGIN * measured["estimate"], measured
    assert transient >= measured["estimate"] / 3, measured
