"""Module boundaries of tf_woodfisher.keras3, checked in fresh processes, and the errors that name the other entry."""
import json
import os
import subprocess
import sys
import textwrap

import keras
import pytest

import tf_woodfisher.keras3 as tfw3

PROBE = """
import json, os, sys
{code}
print(json.dumps({{"legacy": os.environ.get("TF_USE_LEGACY_KERAS"),
                  "old": sorted(m for m in sys.modules if m.split(".")[0] in ("tf_keras",
                                                                              "tensorflow_model_optimization")),
                  "extra": {extra}}}))
"""


def run_python(code, extra="None", env=None):
    env = {"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3", "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run([sys.executable, "-c", PROBE.format(code=textwrap.dedent(code), extra=extra)],
                          capture_output=True, text=True, env=env, timeout=300)


def probe(code, extra="None", env=None):
    result = run_python(code, extra, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_keras3_entry_keeps_keras3_and_loads_no_tf_keras_or_tfmot():
    result = probe("import tf_woodfisher.keras3 as tfw3\nimport tensorflow as tf\nimport keras\n"
                   "m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])\n"
                   "tfw3.find_prunable_weights(m)",
                   extra='{"tf_keras": tf.keras.__name__, "keras": keras.__version__, '
                         '"same_model": tf.keras.Model is keras.Model, "env": "TF_USE_LEGACY_KERAS" in os.environ}')
    assert result["legacy"] is None and result["extra"]["env"] is False
    assert result["old"] == []
    assert result["extra"]["keras"].startswith("3.") and result["extra"]["same_model"] is True
    assert result["extra"]["tf_keras"].startswith("keras")  # Keras 3's tf.keras, not tf_keras


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["jax", "numpy"])
def test_another_backend_is_refused_naming_keras_backend(backend, tmp_path):
    by_env = run_python("import tf_woodfisher.keras3", env={"KERAS_BACKEND": backend})
    assert by_env.returncode != 0 and "KERAS_BACKEND" in by_env.stderr and repr(backend) in by_env.stderr
    # The backend chosen in keras.json (no KERAS_BACKEND): Keras' numpy backend needs jax, missing here; either
    # way the error names KERAS_BACKEND.
    (tmp_path / "keras.json").write_text(json.dumps({"backend": backend, "floatx": "float32", "epsilon": 1e-07,
                                                     "image_data_format": "channels_last"}))
    if backend == "numpy":
        by_config = run_python("import tf_woodfisher.keras3", env={"KERAS_HOME": str(tmp_path)})
        assert by_config.returncode != 0 and "KERAS_BACKEND=tensorflow" in by_config.stderr


@pytest.mark.slow
def test_tf_keras_model_given_to_tfw3_names_the_tfmot_entry_and_back():
    code = """
    import tf_woodfisher as tfw
    import tensorflow as tf
    import keras  # the Keras 3 package, next to tf_keras
    import tf_woodfisher.keras3 as tfw3
    old = tfw.keras.Sequential([tfw.keras.Input((3,)), tfw.keras.layers.Dense(2)])
    new = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    messages = {}
    for name, call in [("tfw3_one_shot", lambda: tfw3.one_shot_prune(old, None, None, 0.5, method="magnitude")),
                       ("tfw3_prune", lambda: tfw3.prune(old)),
                       ("tfw3_export", lambda: tfw3.export_tflite(old, "/tmp/unused.tflite")),
                       ("tfw_one_shot", lambda: tfw.one_shot_prune(new, None, None, 0.5, method="magnitude")),
                       ("tfw_prune", lambda: tfw.prune_woodfisher(new)),
                       ("tfw_export", lambda: tfw.export_tflite(new, "/tmp/unused.tflite"))]:
        try:
            call()
        except ValueError as error:
            messages[name] = str(error)
    """
    messages = probe(code, extra="messages")["extra"]
    assert len(messages) == 6
    for name in ("tfw3_one_shot", "tfw3_prune", "tfw3_export"):
        assert "import tf_woodfisher as tfw" in messages[name], messages[name]
    for name in ("tfw_one_shot", "tfw_prune", "tfw_export"):
        assert "tf_woodfisher.keras3" in messages[name], messages[name]


def test_public_names():
    for name in tfw3.__all__:
        assert getattr(tfw3, name) is not None
    assert tfw3.keras is keras
    assert tfw3.optimizers.GRDA.__module__ == "tf_woodfisher.keras3.optimizers.grda"
