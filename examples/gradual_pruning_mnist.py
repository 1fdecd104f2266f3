"""Gradual pruning of the small CNN on MNIST: tfmot's prune_low_magnitude against tfw.prune_woodfisher.

Trains the small CNN (``tfw.models.small_cnn``, two Conv2D and two Dense layers) on the 5k MNIST
training subset (shuffled with seed 0; the dense weights are cached under benchmarks/out/, which git
ignores), then, for each target sparsity and seed, prunes a copy of it gradually during ``model.fit``:

* ``magnitude``: tfmot's ``prune_low_magnitude`` (every layer pruned to the target: per layer);
* ``woodfisher``: ``tfw.prune_woodfisher(method='woodfisher', mode='global')`` (one global threshold
  on the WoodFisher scores, OBS update of the remaining weights at each pruning event);
* ``magnitude_global``: ``tfw.prune_woodfisher(method='magnitude', mode='global')``, the
  global-magnitude baseline that separates the effect of "global" from that of "WoodFisher".

Every method gets the same schedule (tfmot's cubic PolynomialDecay ramp from 0 to the target, a pruning
event every ``--frequency`` steps during the first ``--ramp-epochs`` epochs; ``tfw.GradualSchedule``
is the same ramp for WoodFisher), the same epochs, optimizer (Adam), batch size and seeds. A seed picks
the data order of the fine-tuning and the Fisher samples; the dense starting model is the same for all.
Each pruned model is exported with ``tfw.export_tflite`` (float32, sparse=True), verified on the 10k
test images. Writes gradual_mnist.csv (one row per run), gradual_mnist.md (tables, with the command at
the top) and gradual_mnist.png (accuracy and ``.tflite`` size against sparsity) to --out.

    python examples/gradual_pruning_mnist.py                  # 90/95/98 %, 3 seeds (about 15 min on 2 cores)
    python examples/gradual_pruning_mnist.py --quick --out /tmp/gradual   # smoke test, about 40 s
"""
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts' helpers
import common  # noqa: E402  (first: imports tf_woodfisher before TensorFlow)
import gradual_common as gradual  # noqa: E402
import tf_woodfisher as tfw  # noqa: E402  (sets TF_USE_LEGACY_KERAS=1: tf.keras is tf_keras)
import tf_keras as keras  # noqa: E402

DEFAULT_OUT = pathlib.Path(common.RESULTS_DIR)
DEFAULT_CACHE = pathlib.Path(common.CACHE_DIR) / "gradual_mnist"  # git-ignored
LOSS = common.LOSS
METHODS = gradual.METHODS[:3]  # magnitude, woodfisher, magnitude_global
LABELS = gradual.LABELS
DENSE_SEED = 0  # initial weights and data order of the dense model, and the shuffling of the 5k subset
TARGET_GAIN = 1.0  # points of accuracy WoodFisher must gain over magnitude at 95 % and 98 %
TARGET_SIZE_RATIO = 0.30  # sparse .tflite / dense .tflite at 90 %
FULL = dict(sparsities=[0.9, 0.95, 0.98], seeds=[0, 1, 2], methods=list(METHODS), epochs=6, frequency=20,
            dense_epochs=10, num_gradients=128)
QUICK = dict(sparsities=[0.9], seeds=[0], methods=["magnitude", "woodfisher"], epochs=1, frequency=20,
             dense_epochs=1, num_gradients=16)
FIXED = dict(batch_size=64, prune_lr=5e-4, fisher_batch_size=16, fisher_block_size=2000, damping=1e-4, steps=1)


def parse_args(argv=None):
    parser = gradual.make_parser(__doc__, common.MNIST_HELP, FULL, QUICK, FIXED,
                                 "smoke test: 90 %%, seed 0, 1 dense epoch, 1 pruning epoch, 16 Fisher gradients",
                                 DEFAULT_OUT, DEFAULT_CACHE)
    parser.add_argument("--dense-epochs", type=int, help="epochs of the dense model (default 10; 1 with --quick)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the dense training")
    return gradual.finish_args(parser, argv)


def dense_model(args, data):
    """The trained dense small CNN, from the cache when the same settings trained it before."""
    x_train, y_train = data["train"]
    key = f"small_cnn_n{len(y_train)}_e{args.dense_epochs}_bs{args.batch_size}_lr{args.lr:g}_seed{DENSE_SEED}"
    path = pathlib.Path(args.cache_dir) / f"{key}.weights.h5"
    keras.utils.set_random_seed(DENSE_SEED)
    model = tfw.models.small_cnn()

    def train(model):
        model.compile(keras.optimizers.Adam(args.lr), LOSS, metrics=["accuracy"])
        model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.dense_epochs, shuffle=True,
                  verbose=args.verbose)

    started = time.perf_counter()
    if common.cached_weights(model, path, train):
        print(f"dense model: loaded {path}", flush=True)
        return model, 0.0
    seconds = time.perf_counter() - started
    print(f"dense model: trained {args.dense_epochs} epochs in {seconds:.1f} s, saved to {path}", flush=True)
    return model, seconds


def setup(args, data, dense_weights):
    """The gradual.Setup of the runs: the whole small CNN wrapped, Adam, the arrays shuffled by Keras."""
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]

    def build():
        base = tfw.models.small_cnn()
        base.set_weights(dense_weights)
        return base

    def fit(model, callback, seed):
        model.fit(x_train, y_train, batch_size=args.batch_size, epochs=args.epochs, shuffle=True,
                  callbacks=[callback], verbose=args.verbose)

    return gradual.Setup(build=build, fit=fit, optimizer=lambda: keras.optimizers.Adam(args.prune_lr),
                         fisher=data["fisher"], x_test=x_test, y_test=y_test, num_train=len(y_train))


def markdown(summary, args, info):
    methods = gradual.present_methods(summary, args)
    seeds = ", ".join(str(s) for s in args.seeds)
    steps_per_epoch = info["steps_per_epoch"]
    lines = gradual.header("Gradual pruning of the small CNN on MNIST: tfmot magnitude vs WoodFisher", info) + [
        f"* Data: the 5k MNIST training subset ({info['num_train']:,} images, shuffled with seed {DENSE_SEED}) for "
        f"training and Fisher samples; accuracy on the official {info['num_test']:,}-image test set.",
        f"* Dense model: `tfw.models.small_cnn()` (two Conv2D, two Dense; {info['num_kernel']:,} kernel weights), "
        f"Adam lr {args.lr:g}, batch {args.batch_size}, {common.plural(args.dense_epochs, 'epoch')}: test accuracy "
        f"{info['dense_accuracy']:.2%}. It is the starting point of every run.",
        f"* Pruning runs: {common.plural(args.epochs, 'epoch')} ({steps_per_epoch} steps each), "
        f"Adam lr {args.prune_lr:g}, batch "
        f"{args.batch_size}. {gradual.ramp_text(args, info)} "
        f"Seeds {seeds}: a seed sets the data order and the Fisher samples.",
        f"* WoodFisher: {gradual.woodfisher_call(args, 'model')} (Fisher data: "
        f"`tfw.UpdatePruningStep(fisher_dataset, loss)`), one global threshold over all kernels, "
        f"{gradual.update_text(args)} at each event.",
        "* Magnitude: `tfmot.sparsity.keras.prune_low_magnitude`, which prunes every layer to the target "
        "(per layer)." + (" `magnitude_global`: `tfw.prune_woodfisher(method='magnitude', mode='global')`, "
                          "one global magnitude threshold." if "magnitude_global" in methods else ""),
        "* Sparsity: fraction of zeros in the Dense and Conv2D kernels (biases are not pruned). `.tflite`: "
        "`tfw.export_tflite(model, path, sparse=True)` (float32), verified under XNNPACK against the Keras model "
        "on the test images; dense = the same conversion without `EXPERIMENTAL_SPARSITY`.",
        "",
    ]
    targets = gradual.target_lines(summary, (0.95, 0.98), TARGET_GAIN, TARGET_SIZE_RATIO)
    return "\n".join(lines + gradual.result_sections(summary, args, info, targets))


def main(argv=None):
    args = parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    mnist = common.Mnist(args.data_dir, shuffle_seed=DENSE_SEED)
    (x_train, y_train), (x_test, y_test) = (mnist.x_train, mnist.y_train), (mnist.x_test, mnist.y_test)
    data = {"train": (x_train, y_train), "test": (x_test, y_test), "fisher": mnist.train}
    steps_per_epoch, end_step = gradual.announce(args, "MNIST", mnist.source, len(y_train), len(y_test))

    dense, dense_seconds = dense_model(args, data)
    dense_accuracy = common.accuracy(dense, x_test, y_test)
    print(f"dense model: test accuracy {dense_accuracy:.2%}", flush=True)
    return gradual.run_and_report(
        args, setup(args, data, dense.get_weights()), markdown, "gradual_mnist",
        f"small CNN, MNIST 5k, {args.epochs} epochs of gradual pruning", __file__, argv, started, dense,
        num_train=len(y_train), num_test=len(y_test), dense_accuracy=dense_accuracy, dense_seconds=dense_seconds,
        steps_per_epoch=steps_per_epoch, end_step=end_step)


if __name__ == "__main__":
    main()
