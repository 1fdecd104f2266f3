"""Gradual pruning of the authors' ResNet-20 on CIFAR-10: tfmot's prune_low_magnitude against tfw.prune_woodfisher.

Starts every run from the authors' checkpoint (``tfw.models.resnet20_cifar(npz)``, 924 of the 1,017 test
images of the subset right) and prunes, during ``model.fit`` on the 5,085 training images of the CIFAR-10
subset with the standard augmentation (random 32 × 32 crop of the image padded by 4 black pixels, random
horizontal flip), the paper's selection: the 18 3×3 convolutions of the three stages
(``tfw.models.RESNET20_STAGE_CONV_NAMES``; the stem, the two 1×1 shortcuts and the classifier stay dense).
Each of those layers is wrapped on its own (``keras.models.clone_model`` with a ``clone_function``), by

* ``magnitude``: tfmot's ``prune_low_magnitude`` (each wrapped layer pruned to the target: per layer);
* ``woodfisher``: ``tfw.prune_woodfisher(layer, schedule, method='woodfisher', mode='global')`` (one global
  threshold over the WoodFisher scores of the 18 kernels, OBS update of the remaining weights at each event),
  with Fisher chunks of 576 weights of whole filters (``fisher_block_size=576, fisher_block_order='filter'``;
  ``--fisher-block-size layer --fisher-block-order flat`` gives one block per layer);
* ``woodfisher_layerwise`` (not run by default): the same with ``mode='layerwise'``, each layer pruned to the
  target as tfmot does, so that only the choice of weights and the OBS update differ from ``magnitude``;
* ``magnitude_global`` (not run by default): ``tfw.prune_woodfisher(method='magnitude', mode='global')``.

Every method gets the same schedule (tfmot's cubic PolynomialDecay ramp from 0 to the target, a pruning event
every ``--frequency`` steps during the first ``--ramp-epochs`` epochs; ``tfw.GradualSchedule`` is the same
ramp), the same epochs, optimizer, batch size and seeds. The optimizer is SGD with momentum 0.9 and a small
learning rate decayed by a cosine to 0 over the run: the checkpoint was trained with SGD + momentum, so this
continues its own dynamics at the low end of its learning rate; Adam's first steps, normalised per weight, move
every weight by about the learning rate whatever its gradient, which jolts a converged network (and its BN
statistics) and blurs the magnitudes that both pruning methods rank. A seed picks the data order, the
augmentation and the Fisher samples (which come from the unaugmented training images). Each pruned model is
exported with ``tfw.export_tflite`` (float32, sparse=True), verified on the test images. Writes
gradual_cifar10.csv (one row per run), gradual_cifar10.md (tables, with the command at the top) and
gradual_cifar10.png (accuracy and ``.tflite`` size against sparsity) to --out.

    python examples/gradual_pruning_cifar10.py              # 80/90/95 %, 3 seeds (about 25 min on 2 cores with AVX-512)
    python examples/gradual_pruning_cifar10.py --quick --out /tmp/gradual   # smoke test, about a minute
"""
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))  # the scripts' helpers
import common  # noqa: E402  (first: imports tf_woodfisher before TensorFlow)
import gradual_common as gradual  # noqa: E402
import tf_woodfisher as tfw  # noqa: E402  (sets TF_USE_LEGACY_KERAS=1: tf.keras is tf_keras)
import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

DEFAULT_OUT = pathlib.Path(common.RESULTS_DIR)
DEFAULT_CACHE = pathlib.Path(common.CACHE_DIR) / "gradual_cifar10"  # git-ignored
DEFAULT_DATA = os.path.join(common.SHARED_DIR, "datasets", "cifar10")
DEFAULT_NPZ = os.path.join(common.SHARED_DIR, "models", "resnet20_cifar10_reference.npz")
NPZ_ENV_VAR = "TFW_RESNET20_NPZ"
REFERENCE_CORRECT = 924  # test images of the subset the checkpoint classifies right
PRUNED = tfw.models.RESNET20_STAGE_CONV_NAMES
PAD = 4  # pixels of black padding before the random crop
TARGET_GAIN = 1.0  # points of accuracy WoodFisher must gain over tfmot's magnitude at 90 % and 95 %
FULL = dict(sparsities=[0.8, 0.9, 0.95], seeds=[0, 1, 2], methods=["magnitude", "woodfisher"], epochs=4,
            ramp_fraction=0.625, frequency=20, num_gradients=128, train_images=None)
QUICK = dict(sparsities=[0.9], seeds=[0], methods=["magnitude", "woodfisher"], epochs=1, ramp_fraction=0.5,
             frequency=2, num_gradients=16, train_images=640)
# Fisher chunks of 576 weights of whole filters (1, 2 or 4 filters of the 3×3 convolutions, as the authors' chunks of
# PyTorch kernels): +5.5 / +7.4 points over tfmot at 90 / 95% where a block per layer ties (BENCHMARKS.md §10)
FIXED = dict(batch_size=128, prune_lr=0.005, fisher_batch_size=8, fisher_block_size=576, fisher_block_order="filter",
             damping=1e-4, steps=1)


def parse_args(argv=None):
    parser = gradual.make_parser(
        __doc__, "CIFAR-10 folder: the official python batches or cifar10_subset.npz (default: $TFW_CIFAR10_DIR, "
        "else ../shared/datasets/cifar10 next to the repository)", FULL, QUICK, FIXED,
        "smoke test: 90 %%, seed 0, one epoch over the first 640 training images (a fraction of an epoch), "
        "16 Fisher gradients", DEFAULT_OUT, DEFAULT_CACHE)
    parser.add_argument("--weights", help="the authors' ResNet-20 .npz (default: $TFW_RESNET20_NPZ, else "
                                          "../shared/models/resnet20_cifar10_reference.npz next to the repository)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    parser.add_argument("--train-images", type=int, help="train on the first N (shuffled) training images only "
                                                         "(default: all; 640 with --quick)")
    parser.add_argument("--export-all-seeds", action="store_true", help="export every run to .tflite (default: "
                        "the runs of the first seed only; an export and its check take about a minute here)")
    return gradual.finish_args(parser, argv)


def data_dir(path=None):
    """--data-dir, else $TFW_CIFAR10_DIR, else ../shared/datasets/cifar10 next to the repository."""
    return os.path.normpath(path or os.environ.get(tfw.data.CIFAR10_ENV_VAR) or DEFAULT_DATA)


def weights_npz(path=None):
    """--weights, else $TFW_RESNET20_NPZ, else ../shared/models/…; exits with an error if there is no file."""
    path = os.path.normpath(path or os.environ.get(NPZ_ENV_VAR) or DEFAULT_NPZ)
    if not os.path.exists(path):
        sys.exit(f"error: no ResNet-20 weights at {path}: pass --weights or set ${NPZ_ENV_VAR}")
    return path


def augment(sample, seeds):
    """Random crop of the image padded by PAD black pixels (−1 after the normalisation) and a random flip."""
    image, label = sample
    padded = tf.pad(image, [[PAD, PAD], [PAD, PAD], [0, 0]], constant_values=-1.0)
    image = tf.image.stateless_random_crop(padded, tf.shape(image), seeds[:2])
    return tf.image.stateless_random_flip_left_right(image, seeds[2:]), label


def train_dataset(x, y, batch_size, seed):
    """The augmented, shuffled, batched training data of a run: new order and augmentation each epoch, all
    fixed by ``seed`` (stateless random ops, their seeds drawn from ``Dataset.random(seed)``)."""
    samples = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(4)
    return (tf.data.Dataset.zip((samples, seeds)).map(augment, num_parallel_calls=tf.data.AUTOTUNE,
                                                      deterministic=True)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def setup(args, data, dense_weights):
    """The gradual.Setup of the runs: the 18 stage convolutions wrapped, SGD + momentum with a cosine decay,
    the augmented tf.data pipeline of each seed."""
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    steps_per_epoch, _ = gradual.schedule_steps(args, len(y_train))

    def build():
        base = tfw.models.resnet20_cifar()
        base.set_weights(dense_weights)
        return base

    def fit(model, callback, seed):
        model.fit(train_dataset(x_train, y_train, args.batch_size, 1000 + seed), epochs=args.epochs,
                  callbacks=[callback], verbose=args.verbose)

    def optimizer():
        lr = keras.optimizers.schedules.CosineDecay(args.prune_lr, args.epochs * steps_per_epoch)
        return keras.optimizers.SGD(lr, momentum=args.momentum)

    return gradual.Setup(build=build, fit=fit, optimizer=optimizer, fisher=data["fisher"], x_test=x_test,
                         y_test=y_test, num_train=len(y_train), layers=PRUNED,
                         export_seeds=None if args.export_all_seeds else args.seeds[:1])


def markdown(summary, args, info):
    seeds = ", ".join(str(s) for s in args.seeds)
    steps_per_epoch = info["steps_per_epoch"]
    share = [s["event_seconds"] / s["fit_seconds"] for (m, _), s in summary.items() if m in gradual.WOODFISHER]
    methods = gradual.present_methods(summary, args)
    lines = gradual.header("Gradual pruning of the authors' ResNet-20 on CIFAR-10: tfmot magnitude vs WoodFisher",
                           info) + [
        f"* Data: CIFAR-10 from `{info['data']}`: {info['num_train']:,} training images"
        + (" (the subset: the first 1,017 of each official batch)" if info["num_train"] == 5085 else "")
        + f" for fine-tuning and Fisher samples, accuracy on {info['num_test']:,} test images"
        + (" (±0.9 points standard error at 90%; all runs on the same images)" if info["num_test"] == 1017 else "")
        + ". Augmentation: random 32 × 32 crop of the image padded by 4 black pixels, random horizontal "
        "flip (`tf.data`, stateless ops seeded by the run's seed); the Fisher samples are the unaugmented images.",
        f"* Start: the authors' checkpoint (`tfw.models.resnet20_cifar(npz)`, {info['num_params']:,} parameters): "
        f"test accuracy {info['dense_accuracy']:.2%} ({info['dense_correct']} of {info['num_test']:,}).",
        f"* Pruned: the 18 3×3 convolutions of the stages (`tfw.models.RESNET20_STAGE_CONV_NAMES`, "
        f"{info['num_kernel']:,} kernel weights; the paper's protocol), each wrapped on its own with "
        "`keras.models.clone_model(model, clone_function=...)`; the stem, the 1×1 shortcuts and the classifier "
        "stay dense. Sparsity = fraction of zeros over those 18 kernels.",
        f"* Pruning runs: {common.plural(args.epochs, 'epoch')} ({steps_per_epoch} steps each, batch "
        f"{args.batch_size}), SGD momentum {args.momentum:g}, learning rate {args.prune_lr:g} decayed by a cosine "
        "to 0 over the run (the checkpoint was trained with SGD + momentum: this continues its own dynamics; "
        "Adam's per-weight normalised first steps move every weight by about the learning rate and jolt a "
        f"converged network). {gradual.ramp_text(args, info)} "
        f"Seeds {seeds}: a seed sets the data order, the augmentation and the Fisher samples.",
        f"* WoodFisher: {gradual.woodfisher_call(args, 'layer')} on each selected layer (Fisher data: "
        f"`tfw.UpdatePruningStep(fisher_dataset, loss)`): one global threshold over the 18 kernels, "
        f"{gradual.update_text(args)} at each event."
        + (" `woodfisher_layerwise`: the same with `mode='layerwise'` (each layer pruned to the target, as tfmot "
           "does)." if "woodfisher_layerwise" in methods else "")
        + " Fisher events took " + (f"{min(share):.0%}–{max(share):.0%}" if share else "—") + " of the fit time.",
        "* Magnitude: `tfmot.sparsity.keras.prune_low_magnitude(layer, schedule)` on each selected layer, which "
        "prunes every layer to the target (per layer).",
        "* `.tflite`: `tfw.export_tflite(model, path, sparse=True)` (float32), verified under XNNPACK against the "
        "Keras model on the test images (argmax agreement); dense = the same conversion without "
        "`EXPERIMENTAL_SPARSITY`.",
        "",
    ]
    targets = gradual.target_lines(summary, (0.9, 0.95), TARGET_GAIN)
    return "\n".join(lines + gradual.result_sections(summary, args, info, targets))


def main(argv=None):
    args = parse_args(argv)
    common.quiet_tensorflow()
    started = time.perf_counter()
    folder, npz = data_dir(args.data_dir), weights_npz(args.weights)
    x_train, y_train = tfw.data.load_cifar10("train", folder, shuffle_seed=0)
    x_test, y_test = tfw.data.load_cifar10("test", folder)
    x_train, y_train = x_train[:args.train_images], y_train[:args.train_images]
    data = {"train": (x_train, y_train), "test": (x_test, y_test),
            "fisher": tf.data.Dataset.from_tensor_slices((x_train, y_train))}
    steps_per_epoch, end_step = gradual.announce(args, "CIFAR-10", folder, len(y_train), len(y_test))

    dense = tfw.models.resnet20_cifar(npz)
    dense_accuracy = common.accuracy(dense, x_test, y_test)
    dense_correct = round(dense_accuracy * len(y_test))
    print(f"dense ResNet-20 from {npz}: {dense_correct} of {len(y_test):,} test images right", flush=True)
    if len(y_test) == 1017 and dense_correct != REFERENCE_CORRECT:
        sys.exit(f"error: the checkpoint classifies {dense_correct} test images right instead of "
                 f"{REFERENCE_CORRECT}: wrong weights or data")

    return gradual.run_and_report(
        args, setup(args, data, dense.get_weights()), markdown, "gradual_cifar10",
        f"ResNet-20, CIFAR-10 subset, {args.epochs} epochs of gradual pruning", __file__, argv, started, dense,
        PRUNED, num_train=len(y_train), num_test=len(y_test), data=os.path.relpath(folder, common.REPO_ROOT),
        dense_accuracy=dense_accuracy, dense_correct=dense_correct,
        num_params=sum(int(w.shape.num_elements()) for w in dense.trainable_weights),
        steps_per_epoch=steps_per_epoch, end_step=end_step)


if __name__ == "__main__":
    main()
