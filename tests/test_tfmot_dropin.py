"""What tfmot's own tests revealed (benchmarks/tfmot_suite.py): one-replica strategies, wrapped layers reused,
tfmot's callback keywords, at least one weight kept per layer."""
import numpy as np
import pytest

import tf_woodfisher as tfw
from tf_woodfisher.fisher.distributed import LocalExecutor, executor_for

tf, keras = tfw.tf, tfw.keras
L = keras.layers
RNG = np.random.default_rng(0)
X = RNG.normal(size=(32, 10)).astype("float32")
Y = keras.utils.to_categorical(RNG.integers(0, 5, 32), 5)


def dense_model():
    return keras.Sequential([keras.Input((10,)), L.Dense(8, activation="relu"), L.Dense(5, activation="softmax")])


@pytest.mark.slow
def test_one_replica_mirrored_strategy_runs_woodfisher_events():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = tfw.prune_woodfisher(dense_model(), tfw.OneShotSchedule(0.5, step=1), num_gradients=8,
                                     mode="layerwise")
        model.compile(loss="categorical_crossentropy", optimizer="sgd")
    data = tf.data.Dataset.from_tensor_slices((X, Y))
    callback = tfw.UpdatePruningStep(data)
    model.fit(X, Y, epochs=1, batch_size=16, callbacks=[callback], verbose=0)  # the replica context: no error
    kernels = [w for w in tfw.strip_pruning(model).trainable_weights if "kernel" in w.name]
    assert [float(np.mean(k.numpy() == 0)) for k in kernels] == [0.5, 0.5]


def test_executor_of_a_one_replica_strategy_enters_its_replica_context():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    executor = executor_for(strategy)
    assert isinstance(executor, LocalExecutor) and executor.strategy is strategy
    assert executor_for(None).strategy is None
    with strategy.scope():
        variable = tf.Variable(2.0)

    @tf.function
    def grad():
        with tf.GradientTape() as tape:
            tape.watch(variable)  # needs the handle: only in the replica context
            loss = variable * variable
        return tape.gradient(loss, variable)

    assert float(executor.run(grad)) == 4.0


@pytest.mark.slow
def test_wrapped_layers_inside_a_model_or_list_are_reused():
    inner = tfw.prune_woodfisher(L.Dense(4), tfw.OneShotSchedule(0.5))
    model = keras.Sequential([keras.Input((10,)), L.Dense(4), inner])
    pruned = tfw.prune_woodfisher(model, tfw.OneShotSchedule(0.5))
    assert pruned.layers[1] is inner and isinstance(pruned.layers[0], tfw.PruneWoodFisher)
    layers = tfw.prune_woodfisher([L.Dense(3), inner], tfw.OneShotSchedule(0.5))
    assert layers[1] is inner and isinstance(layers[0], tfw.PruneWoodFisher)
    with pytest.raises(ValueError, match="already wrapped"):
        tfw.prune_woodfisher(inner, tfw.OneShotSchedule(0.5))


def test_callback_takes_tfmots_keywords():
    model = tfw.prune_woodfisher(dense_model(), tfw.OneShotSchedule(0.5, step=1), method="magnitude")
    model.compile(loss="categorical_crossentropy", optimizer="sgd")
    callback = tfw.UpdatePruningStep()
    callback.set_model(model)
    callback.on_train_begin()
    callback.on_train_batch_begin(batch=-1)
    logs = {}
    callback.on_epoch_end(batch=-1, logs=logs)  # tfmot's name for the epoch argument
    assert logs["woodfisher_sparsity"] == pytest.approx(0.5, abs=0.01)


def test_at_least_one_weight_stays_in_each_layer():
    model = dense_model()
    tfw.one_shot_prune(model, None, None, 0.999, method="magnitude", mode="layerwise", verbose=0)
    assert [int(np.count_nonzero(k.numpy())) for k in (model.layers[0].kernel, model.layers[1].kernel)] == [1, 1]
