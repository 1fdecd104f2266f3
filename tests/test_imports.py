"""Module boundaries, checked in fresh processes: what each import loads and which environment it leaves."""
import json
import subprocess
import sys
import textwrap

import pytest

PROBE = """
import json, os, sys
before = dict(os.environ)
{code}
keras_like = sorted(m for m in sys.modules if m.split(".")[0] in ("tf_keras", "tensorflow_model_optimization"))
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({{"legacy": os.environ.get("TF_USE_LEGACY_KERAS"), "env_changed": changed,
                  "modules": keras_like, "keras3": sorted(m for m in sys.modules if m.split(".")[0] == "keras"),
                  "extra": {extra}}}))
"""


def probe(code, extra="None"):
    script = PROBE.format(code=textwrap.dedent(code), extra=extra)
    env = {"PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_core_imports_no_tf_keras_no_tfmot_and_sets_nothing():
    plain_tf = probe("import tensorflow")
    core = probe("import tensorflow\nimport tf_woodfisher.fisher, tf_woodfisher.pruning, tf_woodfisher.config")
    assert core["legacy"] is None and core["env_changed"] == plain_tf["env_changed"]  # what TensorFlow sets itself
    assert core["modules"] == []  # neither tf_keras nor tfmot
    assert core["keras3"] == plain_tf["keras3"]  # only the Keras modules `import tensorflow` itself loads


@pytest.mark.slow
def test_tfmot_entry_sets_legacy_keras_before_tensorflow():
    entry = probe("import tf_woodfisher as tfw\nimport tensorflow as tf",
                  extra='{"tf_keras": tf.keras.__name__, "one_shot": tfw.one_shot_prune.__module__}')
    assert entry["legacy"] == "1"
    assert entry["extra"]["tf_keras"].startswith("tf_keras")
    assert entry["extra"]["one_shot"] == "tf_woodfisher.tfmot.oneshot"
    assert "tensorflow_model_optimization" in entry["modules"]


@pytest.mark.slow
def test_core_first_then_the_tfmot_path_on_demand():
    """Importing the core leaves the package lazy: the tfmot names load on first use."""
    result = probe("import tf_woodfisher.config as c\nimport tf_woodfisher as tfw\n"
                   "loaded_before = 'tf_woodfisher.tfmot' "
                   "in sys.modules\nfn = tfw.one_shot_prune", extra='{"before": loaded_before}')
    assert result["extra"]["before"] is False
    assert "tensorflow_model_optimization" in result["modules"]
