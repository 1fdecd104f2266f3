"""tfmot's own pruning tests as the acceptance test of the drop-in claim, routed through a thin shim.

    python benchmarks/tfmot_suite.py /tmp/tfmot                    # both methods, the five user-facing files
    python benchmarks/tfmot_suite.py /tmp/tfmot --methods magnitude --files prune_test

``/tmp/tfmot`` is a source checkout of tensorflow/model-optimization at tag v0.8.1 (its tests are read from
there, never copied into this repository). In each child process (one per test file and method, so that an
abort does not stop the run) the shim replaces

* ``prune_low_magnitude`` by ``tfw.prune_woodfisher(..., method=M, mode='layerwise')`` (tfmot's tests expect
  every layer at the target), with ``num_gradients=8``;
* tfmot's ``UpdatePruningStep`` by ``tfw.UpdatePruningStep``, whose Fisher dataset is 8 synthetic samples
  built from the model's inputs and the compiled loss (inputs drawn at random, labels from the model's own
  predictions plus noise);
* ``prune_scope`` by ``tfw.prune_scope``.

The installed tfmot package is used; the checkout's test helpers (``test_utils``) are added to its package
path. Results: a per-file table in ``benchmarks/results/tfmot_suite.md`` (and the per-test outcomes in
``tfmot_suite.json``), with the tests expected to fail through the shim, each with its reason.
"""
import argparse
import fnmatch
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
import types
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
FILES = ("prune_test", "pruning_callbacks_test", "prune_integration_test", "prune_distributed_test",
         "pruning_policy_test")
METHODS = ("magnitude", "woodfisher")
TEST_DIR = os.path.join("tensorflow_model_optimization", "python", "core", "sparsity", "keras")
FISHER_SAMPLES = 8

# Tests that cannot pass through the shim, by design: (glob over "file.Class.test", reason).
EXPECTED = (
    ("prune_test.PruneTest.testPruneScope_NotNeededForTF2SavedModel",
     "refused on purpose: SavedModel reloads pruning wrappers as generic layers and the sparsity is lost on "
     "further training (tfw's error names the alternatives: .keras/.h5, tf.train.Checkpoint, strip_pruning)"),
    ("prune_test.PruneTest.testPruneMiscObject", "checks tfmot's exact error text (tfw's names the accepted "
                                                 "types and hints at tf_woodfisher.keras3 for Keras 3 objects)"),
    ("prune_test.PruneTest.testPruneSubclassModel", "checks tfmot's exact error text (tfw's also points to "
                                                    "tfw.one_shot_prune, which prunes subclassed models)"),
    ("prune_test.PruneTest.testPrune*CustomNonPrunableLayer*",
     "deliberate: tfw prunes subclasses of the built-in layers (isinstance; tfmot's registry matches the exact "
     "class and refuses a Dense subclass that is not a PrunableLayer), the same in one-shot and gradual pruning"),
    ("prune_test.PruneTest.testPruneScope_NeededForKerasModel",
     "deliberate: PruneWoodFisher is registered as Keras-serializable, so an .h5/.keras model loads without "
     "prune_scope (the test expects loading without it to fail)"),
    ("pruning_policy_test.PruningPolicyTest.testPrune*ForLatencyOnXNNPackPolicy*",
     "checks tfmot's exact error text (assertEqual on the message); tfw refuses the same models with its own "
     "wording (pruning_policy belongs to the structures part of issue 15)"),
)
STRUCTURED = ("block_size", "sparsity_m_by_n", "m_by_n", "MByN", "pruning_policy", "Policy", "Block")


# ------------------------------------------------------------------------------------------------ the shim

def install_shim(method, checkout):
    """Route tfmot's user-facing entry points to tf_woodfisher (in this process)."""
    import numpy as np

    import tf_woodfisher as tfw  # first: TF_USE_LEGACY_KERAS=1
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    from tensorflow_model_optimization.python.core import keras as tfmot_core_keras
    from tensorflow_model_optimization.python.core.sparsity import keras as tfmot_sparsity_keras
    from tensorflow_model_optimization.python.core.sparsity.keras import prune, pruning_callbacks

    # the checkout's test helpers (not in the pip package)
    tfmot_core_keras.__path__.append(os.path.join(checkout, "tensorflow_model_optimization", "python", "core",
                                                  "keras"))
    tfmot_sparsity_keras.__path__.append(os.path.join(checkout, TEST_DIR))

    def prune_low_magnitude(to_prune, pruning_schedule=None, block_size=(1, 1), block_pooling_type="AVG",
                            pruning_policy=None, sparsity_m_by_n=None, **kwargs):
        schedule = pruning_schedule if pruning_schedule is not None else \
            tfmot.sparsity.keras.ConstantSparsity(0.5, 0)
        return tfw.prune_woodfisher(to_prune, schedule, pruning_policy=pruning_policy, method=method,
                                    mode="layerwise", num_gradients=FISHER_SAMPLES, block_size=block_size,
                                    block_pooling_type=block_pooling_type, sparsity_m_by_n=sparsity_m_by_n,
                                    **kwargs)

    def fisher_data(model, loss):
        """8 synthetic samples that fit the model's inputs and ``loss``."""
        rng = np.random.default_rng(0)
        inputs = []
        for spec in model.inputs:
            shape = [FISHER_SAMPLES] + [d or 1 for d in spec.shape[1:]]
            inputs.append(rng.integers(0, 2, shape).astype(spec.dtype.as_numpy_dtype) if spec.dtype.is_integer
                          else rng.uniform(size=shape).astype(spec.dtype.as_numpy_dtype))  # ≥ 0: fits Embeddings
        x = inputs[0] if len(inputs) == 1 else inputs
        predictions = tfw.tfmot.problem.forward_model(model)(x, training=False)
        loss = tfw.tfmot.problem.per_sample_loss(loss)
        noisy = tf.nest.map_structure(lambda p: p + rng.normal(size=p.shape).astype(p.dtype.as_numpy_dtype),
                                      predictions)
        candidates = [tf.nest.map_structure(lambda p: tf.argmax(p, -1), noisy),
                      tf.nest.map_structure(lambda p: tf.one_hot(tf.argmax(p, -1), p.shape[-1]), noisy), noisy]
        for labels in candidates:
            try:
                value = loss(labels, predictions)
            except Exception:  # noqa: BLE001 (the shim tries label kinds)
                continue
            if value.shape.rank == 1 and bool(tf.reduce_all(tf.math.is_finite(value))):
                return tf.data.Dataset.from_tensor_slices((x, labels))
        raise RuntimeError(f"the shim found no labels that fit the loss {loss!r}")

    class UpdatePruningStep(tfw.UpdatePruningStep):
        def __init__(self):
            super().__init__()

        def on_train_begin(self, logs=None):
            if self.fisher_dataset is None and method != "magnitude":
                if not getattr(self.model, "loss", None):  # a custom training loop: the shim picks the loss
                    self.loss = "mse"
                self.fisher_dataset = fisher_data(self.model, self.loss or self.model.loss)
            super().on_train_begin(logs)

    for module in (prune, tfmot.sparsity.keras):
        module.prune_low_magnitude = prune_low_magnitude
        module.prune_scope = tfw.prune_scope
    original = pruning_callbacks.UpdatePruningStep
    for name, function in list(vars(original).items()):  # its methods call super(UpdatePruningStep, self):
        if isinstance(function, types.FunctionType):     # keep that name bound to tfmot's class
            rebound = types.FunctionType(function.__code__, {**function.__globals__, "UpdatePruningStep": original},
                                         function.__name__, function.__defaults__, function.__closure__)
            setattr(original, name, rebound)
    for module in (pruning_callbacks, tfmot.sparsity.keras):
        module.UpdatePruningStep = UpdatePruningStep


# ------------------------------------------------------------------------------------------------ one file

class _Recorder(unittest.TextTestResult):
    """Records each test's outcome, and the test under way in a progress file (read if the process dies)."""

    def __init__(self, *args, progress=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcomes, self.progress = {}, progress

    def startTest(self, test):
        with open(self.progress, "w") as f:
            f.write(test.id())
        super().startTest(test)

    def _note(self, test, outcome, err=None):
        message = ""
        if err is not None:
            message = "".join(traceback.format_exception_only(err[0], err[1])).strip().splitlines()
            message = message[-1][:300] if message else ""
        self.outcomes[test.id()] = (outcome, message)

    def addSuccess(self, test):
        super().addSuccess(test)
        self._note(test, "pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._note(test, "fail", err)

    def addError(self, test, err):
        super().addError(test, err)
        self._note(test, "error", err)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self.outcomes[test.id()] = ("skip", reason)


def run_one(checkout, name, method, out):
    """Run one tfmot test file through the shim; write {test id: (outcome, message)} to ``out``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if method != "tfmot":
        install_shim(method, checkout)
    else:
        import tf_woodfisher  # noqa: F401  (TF_USE_LEGACY_KERAS=1, as in the shim's runs)
        from tensorflow_model_optimization.python.core import keras as core_keras
        from tensorflow_model_optimization.python.core.sparsity import keras as sparsity_keras

        core_keras.__path__.append(os.path.join(checkout, "tensorflow_model_optimization", "python", "core", "keras"))
        sparsity_keras.__path__.append(os.path.join(checkout, TEST_DIR))
    spec = importlib.util.spec_from_file_location(f"tfmot_suite_{name}", os.path.join(checkout, TEST_DIR,
                                                                                      name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    suite = unittest.defaultTestLoader.loadTestsFromModule(module)
    progress = out + ".progress"
    runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=1,
                                     resultclass=lambda *a, **k: _Recorder(*a, progress=progress, **k))
    result = runner.run(suite)
    outcomes = {test_id.split(".", 1)[1]: value for test_id, value in result.outcomes.items()}
    with open(out, "w") as f:
        json.dump(outcomes, f, indent=1)  # then the normal interpreter teardown: its exit status is reported


# ------------------------------------------------------------------------------------------------ the table

def expected_reason(test_id):
    for pattern, reason in EXPECTED:
        if fnmatch.fnmatchcase(test_id, pattern):
            return reason
    return None


def classify(file, test_id, message):
    """Who owns a failure: 'expected' (with its reason), 'structured' (section 2), or 'adapter'."""
    full = f"{file}.{test_id}"
    reason = expected_reason(full)
    if reason:
        return "expected", reason
    if any(word in full or word in message for word in STRUCTURED):
        return "structured", "block / N:M / pruning_policy (structured sparsity: another helper's part)"
    return "adapter", message


def run_all(checkout, methods, files, timeout):
    results = {}
    for method in methods:
        for name in files:
            out = os.path.join(RESULTS, f".tfmot_suite_{method}_{name}.json")
            for stale in (out, out + ".progress"):
                if os.path.exists(stale):
                    os.remove(stale)
            started = time.perf_counter()
            cmd = [sys.executable, os.path.abspath(__file__), checkout, "--run-one", name, "--method", method,
                   "--out", out]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                code, tail = proc.returncode, proc.stderr[-3000:]
            except subprocess.TimeoutExpired as error:
                code, tail = "timeout", (error.stderr or b"")[-3000:].decode(errors="replace") \
                    if isinstance(error.stderr, bytes) else str(error.stderr)[-3000:]
            seconds = time.perf_counter() - started
            outcomes = json.load(open(out)) if os.path.exists(out) else {}
            crashed = None
            if not outcomes:
                last = open(out + ".progress").read() if os.path.exists(out + ".progress") else "?"
                crashed = f"process ended with {code} during {last}"
                print(tail, file=sys.stderr)
            elif code != 0:
                crashed = f"process ended with {code} after its tests (at interpreter teardown)"
            results[(method, name)] = {"outcomes": outcomes, "crashed": crashed, "seconds": seconds}
            passed = sum(1 for o, _ in outcomes.values() if o in ("pass", "skip"))
            print(f"{method:>10} {name:<26} {passed}/{len(outcomes)} passed (or skipped) in {seconds:.0f} s"
                  f"{'  ' + crashed if crashed else ''}", flush=True)
            for stale in (out, out + ".progress"):
                if os.path.exists(stale):
                    os.remove(stale)
    return results


def write_report(results, methods, files, argv, started):
    sys.path.insert(0, HERE)
    import common

    header = ["file"] + [f"{m}: passed / tests" for m in methods] + \
        [f"{m}: expected · structured · adapter" for m in methods]
    rows, details = [], []
    for name in files:
        cells, owners = [name], []
        for method in methods:
            entry = results[(method, name)]
            outcomes = entry["outcomes"]
            passed = sum(1 for o, _ in outcomes.values() if o in ("pass", "skip"))
            cells.append(f"{passed} / {len(outcomes)}" + (" (crashed)" if entry["crashed"] else ""))
            counts = {"expected": 0, "structured": 0, "adapter": 0}
            for test_id, (outcome, message) in sorted(outcomes.items()):
                if outcome in ("pass", "skip"):
                    continue
                owner, reason = classify(name, test_id, message)
                counts[owner] += 1
                details.append((method, name, test_id, outcome, owner, reason))
            owners.append(f"{counts['expected']} · {counts['structured']} · {counts['adapter']}")
            if entry["crashed"]:
                details.append((method, name, "(process)", "crash", "adapter", entry["crashed"]))
        rows.append(cells + owners)
    lines = ["# tfmot's pruning tests through the tf_woodfisher shim", "",
             "tensorflow/model-optimization v0.8.1, the five user-facing test files, each run in its own process "
             "with `prune_low_magnitude` → `tfw.prune_woodfisher(..., method=M, mode='layerwise')`, "
             "`UpdatePruningStep` → `tfw.UpdatePruningStep` (8 synthetic Fisher samples), "
             "`prune_scope` → `tfw.prune_scope` (see `benchmarks/tfmot_suite.py`). Skipped tests count as passed "
             "(tfmot skips them itself). Failures: *expected* (tests of tfmot internals, exact error texts, or "
             "behaviour tf_woodfisher refuses on purpose; each reason below), *structured* (block / N:M / "
             "pruning_policy: another part of issue 15), *adapter* (to fix).", "",
             common.markdown_table(header, rows), ""]
    if details:
        lines += ["| method | file | test | outcome | owner | reason / message |", "|---|---|---|---|---|---|"]
        for method, name, test_id, outcome, owner, reason in details:
            lines.append(f"| {method} | {name} | `{test_id.split('.', 1)[-1]}` | {outcome} | {owner} | "
                         f"{reason.replace('|', '/')} |")
        lines.append("")
    lines.append(common.produced_by(time.perf_counter() - started, argv=argv, script="benchmarks/tfmot_suite.py"))
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "tfmot_suite.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, "tfmot_suite.json"), "w") as f:
        json.dump({f"{m}/{n}": v for (m, n), v in results.items()}, f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", help="a tensorflow/model-optimization source checkout (tag v0.8.1)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS) + ["tfmot"],
                        help="'tfmot': tfmot itself, no shim (the baseline)")
    parser.add_argument("--files", nargs="+", default=list(FILES), choices=FILES)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per file and method")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    checkout = os.path.abspath(args.checkout)
    if not os.path.isfile(os.path.join(checkout, TEST_DIR, "prune_test.py")):
        parser.error(f"{checkout} is not a tfmot source checkout: {TEST_DIR}/prune_test.py is missing")
    if args.run_one:
        run_one(checkout, args.run_one, args.method, args.out)
        return
    started = time.perf_counter()
    results = run_all(checkout, args.methods, args.files, args.timeout)
    write_report(results, args.methods, args.files, sys.argv[1:] if argv is None else argv, started)


if __name__ == "__main__":
    main()
