"""WoodFisherConfig: one validation for every entry point, old names, unknown keywords, serialisation."""
import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tf_woodfisher as tfw
from tf_woodfisher.config import FIELDS, WoodFisherConfig, resolve_config, validate_sparsity

BAD_VALUES = [
    ("method", "obs", "method must be one of"),
    ("mode", "joint", "mode must be one of"),
    ("num_gradients", 0, "num_gradients must be an int ≥ 1"),
    ("num_gradients", 2.5, "num_gradients must be an int ≥ 1"),
    ("num_gradients", True, "num_gradients must be an int ≥ 1"),
    ("fisher_batch_size", -1, "fisher_batch_size must be an int ≥ 1"),
    ("fisher_block_size", 0, "fisher_block_size must be None, 'model' or an int ≥ 1"),
    ("fisher_block_size", "layer", "fisher_block_size must be None, 'model' or an int ≥ 1"),
    ("fisher_block_order", "rows", "fisher_block_order must be one of"),
    ("fisher_block_order", "filter", "fisher_block_order='filter' .* needs an int fisher_block_size"),
    ("damping", 0.0, "damping must be a finite number > 0"),
    ("damping", float("nan"), "damping must be a finite number > 0"),
    ("damping", "1e-5", "damping must be a finite number > 0"),
    ("steps", 0, "steps must be an int ≥ 1"),
    ("update", 1, "update must be True or False"),
    ("inverse_dtype", "float16", "inverse_dtype must be one of"),
    ("gradient_dtype", "int8", "gradient_dtype must be one of"),
    ("max_memory", "lots", "max_memory"),
    ("shuffle_buffer", -1, "shuffle_buffer must be an int ≥ 0"),
    ("seed", -3, "seed must be an int ≥ 0"),
    ("block_size", (0, 1), "block_size must be a pair of ints ≥ 1"),
    ("block_pooling_type", "SUM", "block_pooling_type must be one of"),
    ("sparsity_m_by_n", (4, 2), r"sparsity_m_by_n must be \(n, m\) with 0 < n < m"),
    ("sparsity_m_by_n", (2, 4, 8), "sparsity_m_by_n must be a pair of ints ≥ 1"),
]


@pytest.mark.parametrize("name,value,message", BAD_VALUES)
def test_every_knob_is_validated_with_its_name(name, value, message):
    with pytest.raises(ValueError, match=message):
        WoodFisherConfig(**{name: value})
    with pytest.raises(ValueError, match=message):  # the same error through overrides
        resolve_config(WoodFisherConfig(), {name: value})


def test_numpy_scalars_are_numbers_and_stored_as_python_values():
    config = WoodFisherConfig(num_gradients=np.int64(256), damping=np.float32(1e-4), fisher_block_size=np.int32(20),
                              steps=np.int16(3), seed=np.uint8(7))
    assert config.num_gradients == 256 and type(config.num_gradients) is int
    assert config.damping == pytest.approx(1e-4) and type(config.damping) is float
    assert (config.fisher_block_size, config.steps, config.seed) == (20, 3, 7)
    assert validate_sparsity(np.float32(0.9)) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="target_sparsity must be a number in"):
        validate_sparsity(np.float64(1.0))


def test_config_is_frozen_keyword_only_and_round_trips():
    config = WoodFisherConfig(method="woodtaylor", sparsity_m_by_n=[2, 4], block_pooling_type="MAX")
    assert config.sparsity_m_by_n == (2, 4) and WoodFisherConfig(block_size=[1, 4]).block_size == (1, 4)
    with pytest.raises(Exception):
        config.method = "magnitude"
    with pytest.raises(TypeError):
        WoodFisherConfig("woodfisher")  # keyword-only
    assert WoodFisherConfig.from_dict(config.to_dict()) == config
    assert set(config.to_dict()) == set(FIELDS)
    assert config.replace(steps=4).steps == 4 and config.steps == 1


def test_old_names_and_unknown_keywords():
    assert resolve_config(None, {"num_samples": 64}).num_gradients == 64  # unambiguous old name: an alias
    with pytest.raises(TypeError, match="'num_samples' and 'num_gradients' are the same setting"):
        resolve_config(None, {"num_samples": 64, "num_gradients": 32})
    with pytest.raises(TypeError, match="fisher_block_size=100"):
        resolve_config(None, {"block_size": 100})  # block_size is tfmot's (r, c) now
    with pytest.raises(TypeError, match="fisher_block_size='model'"):
        resolve_config(None, {"block_size": "model"})
    with pytest.raises(TypeError, match="inverse_dtype"):
        resolve_config(None, {"dtype": "float64"})
    with pytest.raises(TypeError, match="steps=k"):
        resolve_config(None, {"recompute_steps": 2})
    with pytest.raises(TypeError, match="unexpected keyword argument 'dampning'"):
        resolve_config(None, {"dampning": 1e-3}, "one_shot_prune")
    with pytest.raises(TypeError, match="config must be a tfw.WoodFisherConfig"):
        resolve_config("woodfisher", {})


def test_every_entry_point_takes_the_config_and_overrides(rng):
    """The same knob error from one_shot_prune, prune_woodfisher and UpdatePruningStep; a config reaches each."""
    keras = tfw.keras
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    data = tfw.tf.data.Dataset.from_tensor_slices((rng.normal(size=(16, 4)).astype("float32"), rng.integers(0, 3, 16)))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    entries = [lambda **kw: tfw.one_shot_prune(model, data, loss, 0.5, verbose=0, **kw),
               lambda **kw: tfw.prune_woodfisher(model, tfw.OneShotSchedule(0.5), **kw),
               lambda **kw: tfw.UpdatePruningStep(data, loss, **kw)]
    for entry in entries:
        with pytest.raises(ValueError, match="fisher_batch_size must be an int ≥ 1"):
            entry(fisher_batch_size=0)
        with pytest.raises(TypeError, match="unexpected keyword argument 'numgradients'"):
            entry(numgradients=8)
    config = WoodFisherConfig(method="magnitude", mode="layerwise", max_memory="1GB", gradient_dtype="bfloat16")
    assert tfw.one_shot_prune(model, None, None, 0.5, config, verbose=0).config == config
    wrapped = tfw.prune_woodfisher(model, tfw.OneShotSchedule(0.5), config, steps=2)
    wrapper = next(layer for layer in wrapped.layers if isinstance(layer, tfw.PruneWoodFisher))
    assert wrapper.woodfisher_config == config.replace(steps=2)
    assert tfw.UpdatePruningStep(data, loss, config, num_gradients=8).overrides == {"num_gradients": 8}


def test_structures_are_tfmot_options():
    keras = tfw.keras
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(8)])
    wrapped = tfw.prune_woodfisher(model, tfmot.sparsity.keras.ConstantSparsity(0.5, 0), block_size=(1, 1))
    assert next(layer for layer in wrapped.layers if isinstance(layer, tfw.PruneWoodFisher)).block_size == (1, 1)
    wrapped = tfw.prune_woodfisher(model, tfmot.sparsity.keras.ConstantSparsity(0.5, 0), sparsity_m_by_n=(2, 4))
    assert next(layer for layer in wrapped.layers if isinstance(layer, tfw.PruneWoodFisher)).sparsity_m_by_n == (2, 4)
    tfw.one_shot_prune(model, None, None, 0.5, method="magnitude", sparsity_m_by_n=(2, 4), verbose=0)
    kernel = model.layers[0].kernel.numpy()  # [in, out]: every 4 consecutive inputs of an output hold 2 zeros
    assert np.all((kernel.T.reshape(8, 2, 4) == 0).sum(axis=2) == 2)
    with pytest.raises(ValueError, match=r"block_size=\(1, 4\) and sparsity_m_by_n=\(2, 4\) were both given"):
        WoodFisherConfig(block_size=(1, 4), sparsity_m_by_n=(2, 4))


def test_filter_block_order_needs_single_weight_masks():
    assert WoodFisherConfig(fisher_block_size=64, fisher_block_order="filter").fisher_block_order == "filter"
    for structure in (dict(block_size=(1, 4)), dict(sparsity_m_by_n=(2, 4))):
        with pytest.raises(ValueError, match="no block_size / sparsity_m_by_n structure"):
            WoodFisherConfig(fisher_block_size=64, fisher_block_order="filter", **structure)
