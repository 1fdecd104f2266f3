"""The one copy of the helpers of the example and benchmark scripts: paths, MNIST, the reference MLPNet,
accuracy, mean ± sd and percent formatting, markdown tables, CSV files, the command and environment lines.

The benchmarks import it as ``common`` (``python benchmarks/<script>.py`` puts this folder on
``sys.path``); the examples put this folder on ``sys.path`` first (``python examples/<script>.py``):

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import common

Importing it imports tf_woodfisher before TensorFlow, so that ``tf.keras`` is tf_keras (Keras 2); a Keras 3
script imports ``tf_woodfisher.keras3`` first, and then ``common.keras`` is Keras 3 (``common.KERAS3``).
"""
import csv
import os
import platform
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

# A Keras 3 script imports tf_woodfisher.keras3 before this module: then keep Keras 3 (tf_woodfisher is already
# imported as its parent package, without the tfmot entry's side effects), else the tf_keras / tfmot path.
KERAS3 = "tf_woodfisher.keras3" in sys.modules
import tf_woodfisher as tfw  # noqa: E402  (first: sets TF_USE_LEGACY_KERAS=1, unless KERAS3)
import tensorflow as tf  # noqa: E402

if KERAS3:
    import keras  # noqa: E402
else:
    import tf_keras as keras  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
CACHE_DIR = os.path.join(REPO_ROOT, "benchmarks", "out")  # git-ignored
SHARED_DIR = os.path.join(REPO_ROOT, os.pardir, "shared")
DEFAULT_MNIST_DIR = os.path.join(SHARED_DIR, "datasets", "mnist")
DEFAULT_MLPNET_NPZ = os.path.join(SHARED_DIR, "models", "mlpnet_mnist_reference.npz")
MLPNET_ENV_VAR = "TFW_MLPNET_NPZ"
MLPNET_REFERENCE_ACCURACY = 0.9397
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MNIST_HELP = "MNIST idx folder (default: $TFW_MNIST_DIR, else ../shared/datasets/mnist next to the repository " \
             "when present, else tensorflow-datasets)"
MLPNET_HELP = "reference MLPNet .npz (default: $TFW_MLPNET_NPZ, else ../shared/models/mlpnet_mnist_reference.npz " \
              "next to the repository)"


# ----------------------------------------------------------------------------------------------- data, models

def quiet_tensorflow():
    """Silence TensorFlow's Python-side retracing warnings (the C++ logs are cut by TF_CPP_MIN_LOG_LEVEL)."""
    tf.get_logger().setLevel("ERROR")


def mnist_dir(path=None):
    """``path``, else $TFW_MNIST_DIR, else ../shared/datasets/mnist next to the repo if present, else None (tfds)."""
    if path:
        return path
    if os.environ.get(tfw.data.MNIST_ENV_VAR):
        return os.environ[tfw.data.MNIST_ENV_VAR]
    return os.path.normpath(DEFAULT_MNIST_DIR) if os.path.isdir(DEFAULT_MNIST_DIR) else None


def cifar10_dir(path=None):
    """``path``, else $TFW_CIFAR10_DIR, else ../shared/datasets/cifar10 next to the repo."""
    return path or os.environ.get(tfw.data.CIFAR10_ENV_VAR) or os.path.join(SHARED_DIR, "datasets", "cifar10")


def add_mnist_model_options(parser):
    """The options of the MNIST one-shot scripts' models: --data-dir, --weights (MLPNet), --cnn-epochs, --cnn-seed
    (the small CNN trained here, cached under benchmarks/out/)."""
    parser.add_argument("--data-dir", help=MNIST_HELP)
    parser.add_argument("--weights", help=MLPNET_HELP)
    parser.add_argument("--cnn-epochs", type=int, default=3, help="epochs of the small CNN's training")
    parser.add_argument("--cnn-seed", type=int, default=0, help="seed of the small CNN's weights and data order")


def mlpnet_npz(path=None):
    """``path``, else $TFW_MLPNET_NPZ, else ../shared/models/mlpnet_mnist_reference.npz next to the repo;
    exits with an error if there is no file there."""
    path = os.path.normpath(path or os.environ.get(MLPNET_ENV_VAR) or DEFAULT_MLPNET_NPZ)
    if not os.path.exists(path):
        sys.exit(f"error: no MLPNet weights at {path}: pass --weights or set ${MLPNET_ENV_VAR}")
    return path


class Mnist:
    """The Fisher/training data (training split, shuffled with ``shuffle_seed``) and the official test set.

    path: see :func:`mnist_dir` (``self.path`` is the folder used, None for tensorflow-datasets).
    """

    def __init__(self, path=None, flatten=False, shuffle_seed=0):
        self.path = mnist_dir(path)
        self.flatten = flatten
        self.x_train, self.y_train = tfw.data.load_mnist("train", self.path, flatten=flatten, shuffle_seed=shuffle_seed)
        self.x_test, self.y_test = tfw.data.load_mnist("test", self.path, flatten=flatten)
        self.train = tf.data.Dataset.from_tensor_slices((self.x_train, self.y_train))

    @property
    def source(self):
        """Where the data came from, for messages."""
        return self.path or "tensorflow-datasets"


def accuracy(model, x, y, batch_size=2500):
    """Top-1 accuracy of a logits (or probabilities) model."""
    logits = np.concatenate([model(x[i:i + batch_size], training=False).numpy() for i in range(0, len(x), batch_size)])
    return float(np.mean(logits.argmax(axis=1) == y))


def check_reference_accuracy(value, expected=MLPNET_REFERENCE_ACCURACY, what="reference MLPNet"):
    """Print the dense accuracy and stop with an error if it is not the published one."""
    print(f"{what}: dense test accuracy {value:.2%} (expected {expected:.2%})", flush=True)
    if abs(value - expected) > 5e-5:
        sys.exit(f"error: the {what} reaches {value:.2%} instead of {expected:.2%}: wrong weights or data")


def kernel_sparsity(variables):
    """Fraction of exact zeros over all entries of ``variables`` (tensors or variables), in [0, 1]."""
    arrays = [np.asarray(v) for v in variables]
    return sum(int(np.count_nonzero(a == 0)) for a in arrays) / sum(a.size for a in arrays)


def prunable_kernels(model):
    """The Dense and Conv2D kernels of a (stripped) model: the weights the pruning methods sparsify."""
    return [layer.kernel for layer in model.layers if isinstance(layer, (keras.layers.Dense, keras.layers.Conv2D))]


def save_weights(model, path):
    """``model.save_weights(path)``, creating the folder first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    model.save_weights(str(path))


def cached_weights(model, path, train):
    """Load ``model``'s weights from ``path`` (a .weights.h5 file) when it exists, else run ``train(model)``
    and save the weights there. Returns True when they were loaded."""
    if os.path.exists(path):
        model.load_weights(str(path))
        return True
    train(model)
    save_weights(model, path)
    return False


def ramp_steps(num_train, batch_size, ramp_epochs, frequency, what="the ramp"):
    """(steps per epoch, end_step) of a gradual pruning ramp over ``ramp_epochs`` epochs whose last event
    falls on a multiple of ``frequency``; exits with an error if the ramp is shorter than one frequency."""
    steps_per_epoch = -(-num_train // batch_size)
    ramp = int(ramp_epochs * steps_per_epoch)
    end_step = ramp // frequency * frequency
    if end_step < frequency:
        sys.exit(f"error: {what} ({ramp_epochs:g} epochs = {ramp} steps) is shorter than one --frequency "
                 f"({frequency} steps)")
    return steps_per_epoch, end_step


# ----------------------------------------------------------------------------------------------- numbers, text

def mean_sd(values):
    """(mean, sample standard deviation; 0 for one value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def plural(count, word, many=None):
    """'1 epoch', '3 epochs' (``many``: the plural when it is not word + 's', e.g. 'passes')."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def percent(fraction, sign=False, missing="—"):
    """A fraction as a percentage with two decimals: '91.23' ('91.23%' with ``sign``); ``missing`` for None."""
    return missing if fraction is None else f"{100 * fraction:.2f}{'%' * sign}"


def points(difference, missing="—"):
    """A difference of fractions in percentage points, signed: '+1.23'; ``missing`` for None."""
    return missing if difference is None else f"{100 * difference:+.2f}"


def format_optional(value, spec, missing="—"):
    """``format(value, spec)``, or ``missing`` for None."""
    return missing if value is None else format(value, spec)


def mean_sd_text(mean, sd=None, sign=False, missing="—"):
    """'91.23 ± 0.45' (percentages of fractions; '91.23' when ``sd`` is None; '%' after each with ``sign``)."""
    if mean is None:
        return missing
    return percent(mean, sign) + ("" if sd is None else f" ± {percent(sd, sign)}")


def markdown_table(header, rows, align=None):
    """A GitHub markdown table; ``align`` is a string of 'l'/'r' per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def read_csv(path, **types):
    """The rows (dicts) of the csv at ``path``, the columns named in ``types`` converted by them
    (``seed=int``); [] when there is no such file."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [dict(r, **{k: convert(r[k]) for k, convert in types.items()}) for r in csv.DictReader(f)]


def write_csv(path, rows, fields=None, float_format=None, append=False):
    """Write the dicts ``rows`` to ``path`` (columns: ``fields``, default the keys of the first row; other
    keys are left out). float_format: a format spec for floats ('.6g'), None to write them as they are.
    append: add the rows to an existing file (the header is written only when the file is new)."""
    fields = list(fields or rows[0])
    new = not (append and os.path.exists(path))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w" if new else "a", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: format(v, float_format) if float_format and isinstance(v, float) else v
                             for k, v in row.items()})


# ----------------------------------------------------------------------------------------------- provenance

def command_line(argv=None, script=None):
    """The command that is running (``script`` with ``argv``; default: sys.argv), as typed from the repo root."""
    script = os.path.relpath(os.path.abspath(script or sys.argv[0]), REPO_ROOT)
    argv = sys.argv[1:] if argv is None else argv
    return " ".join(["python", shlex.quote(script)] + [shlex.quote(str(a)) for a in argv])


def environment_line():
    """One line naming the software and the machine the numbers come from."""
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    if KERAS3:
        stack = f"Keras {keras.__version__}"
    else:
        import tensorflow_model_optimization as tfmot

        stack = f"tf_keras {keras.__version__}, tfmot {getattr(tfmot, '__version__', '?')}"
    return (f"TensorFlow {tf.__version__} ({device}), {stack}, NumPy {np.__version__}, Python "
            f"{platform.python_version()}, {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
            f"{time.strftime('%Y-%m-%d')}")


def produced_by(seconds, argv=None, script=None):
    """'Produced by `<command>` in 1.2 min (<environment>).' for a run of ``seconds``."""
    return f"Produced by `{command_line(argv, script)}` in {seconds / 60:.1f} min ({environment_line()})."


def table_cells(columns, rows):
    """The cells of a table of ``rows`` (dicts): ``columns`` maps each header to a format template filled
    with the row's keys ('{seconds:.2f} s') or to a callable row → cell."""
    return [[fmt(row) if callable(fmt) else fmt.format(**row) for fmt in columns.values()] for row in rows]


def write_results(name, rows, title, notes, columns, started, out=RESULTS_DIR, fields=None, align=None):
    """Write <out>/<name>.csv (rows: a list of dicts; columns ``fields``, default all) and <out>/<name>.md
    (title, :func:`produced_by` since ``started`` (a time.perf_counter() value), notes, then the table of
    ``columns`` (see :func:`table_cells`) with the alignment ``align`` of :func:`markdown_table`), and print
    the markdown."""
    os.makedirs(out, exist_ok=True)
    write_csv(os.path.join(out, f"{name}.csv"), rows, fields)
    table = markdown_table(list(columns), table_cells(columns, rows), align)
    text = "\n".join([f"# {title}", "", produced_by(time.perf_counter() - started), "", notes, "", table, ""])
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(text)
    print("\n" + text, flush=True)
    return text
