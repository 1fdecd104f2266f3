"""2:4 post-training pruning (OBC, SparseGPT: 512 unlabelled calibration inputs) on ResNet-20 and the ViT.

* ResNet-20: the authors' checkpoint on CIFAR-10 (the subset; ``cifar10_oneshot.py``'s data and paper protocol:
  the 18 stage 3×3 convolutions, 2 zeros in every 4 input channels of each kernel position), accuracy on the
  1,017 test images; with --bn also with BatchNorm recalibration on the 5,085 training images.
* ViT: ``tfw.models.vit_tiny()`` trained by ``vit_lstm.py`` (its cached dense weights, or trained here with its
  defaults), its 2-D Dense kernels (patch embedding, MLPs, head; tfmot's N:M takes 2-D and 4-D weights only, so
  the attention's 3-D EinsumDense kernels stay dense), official 10k MNIST test set.

Baseline: tfmot's 2:4 rule (magnitude, ``method='magnitude', sparsity_m_by_n=(2, 4)``). A seed draws the
calibration subset (3 seeds, mean ± sd).

    python benchmarks/nm_post_training.py                 # both models (about 10 minutes on 2 cores)
    python benchmarks/nm_post_training.py --models vit --seeds 1

Outputs: benchmarks/results/nm_post_training.{csv,md} (the summary) and nm_post_training_runs.csv (every run).
"""
import argparse
import time

import common  # first: imports tf_woodfisher before TensorFlow
import tf_woodfisher as tfw
import tensorflow as tf
import numpy as np
import cifar10_oneshot
import vit_lstm

CALIBRATION = 512
METHODS = {"magnitude": dict(method="magnitude"),
           "obc": dict(method="obc", calibration_samples=CALIBRATION),
           "sparsegpt": dict(method="sparsegpt", calibration_samples=CALIBRATION)}


def resnet20(args):
    cifar = cifar10_oneshot.Cifar(argparse.Namespace(data_dir=None, weights=None))

    def accuracy(model):
        return float(cifar.right(model).mean())
    return dict(label="ResNet-20 / CIFAR-10 (stage convolutions)", build=cifar.model, x=cifar.x_train,
                y=cifar.y_train, accuracy=accuracy, layers=cifar10_oneshot.layers_of("stage"), bn=cifar.bn_data)


def vit(args):
    mnist = common.Mnist(args.data_dir)
    vit_args = vit_lstm.parse_args([])
    dense, _ = vit_lstm.dense_model("vit", vit_args, mnist.x_train, mnist.y_train)
    weights = dense.get_weights()

    def build():
        model = tfw.models.vit_tiny()
        model.set_weights(weights)
        return model
    return dict(label="ViT-tiny / MNIST (Dense kernels)", build=build, x=mnist.x_train, y=mnist.y_train,
                accuracy=lambda m: common.accuracy(m, mnist.x_test, mnist.y_test), bn=None,
                layers=lambda layer: isinstance(layer, common.keras.layers.Dense))


MODELS = {"resnet20": resnet20, "vit": vit}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--bn", action="store_true", help="ResNet-20: also each method + BatchNorm recalibration")
    parser.add_argument("--data-dir", help=common.MNIST_HELP)
    parser.add_argument("--out", default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = []
    for key in args.models:
        spec = MODELS[key](args)
        dense = spec["accuracy"](spec["build"]())
        with_bn = args.bn and spec["bn"] is not None
        variants = [(m, False) for m in METHODS] + ([(m, True) for m in METHODS] if with_bn else [])
        for method, bn in variants:
            for seed in range(1 if method == "magnitude" else args.seeds):
                order = np.random.default_rng(seed).permutation(len(spec["y"]))
                data = tf.data.Dataset.from_tensor_slices((spec["x"][order], spec["y"][order]))
                model = spec["build"]()
                tick = time.perf_counter()
                report = tfw.one_shot_prune(model, data, None, 0.5, layers=spec["layers"], sparsity_m_by_n=(2, 4),
                                            recalibrate_batchnorm=spec["bn"] if bn else None, verbose=0,
                                            **METHODS[method])
                rows.append(dict(model=key, label=spec["label"], dense=dense, method=method + " + BN" * bn,
                                 seed=seed, accuracy=spec["accuracy"](model), sparsity=report.sparsity,
                                 seconds=time.perf_counter() - tick))
                print(f"{key} {rows[-1]['method']} seed {seed}: {rows[-1]['accuracy']:.2%} "
                      f"(dense {dense:.2%}, {rows[-1]['seconds']:.0f} s)", flush=True)
    summary = []
    for key in args.models:
        for method in dict.fromkeys(r["method"] for r in rows if r["model"] == key):
            runs = [r for r in rows if r["model"] == key and r["method"] == method]
            mean, sd = common.mean_sd([r["accuracy"] for r in runs])
            magnitude = next(r["accuracy"] for r in rows if r["model"] == key and r["method"] == "magnitude")
            summary.append(dict(model=runs[0]["label"], method=method, n=len(runs),
                                accuracy=common.mean_sd_text(mean, sd if len(runs) > 1 else None),
                                vs_dense=common.points(mean - runs[0]["dense"]),
                                vs_magnitude=common.points(mean - magnitude),
                                seconds=float(np.mean([r["seconds"] for r in runs])),
                                target="met" if method == "magnitude" or (
                                    mean >= runs[0]["dense"] - 0.01 and mean > magnitude) else "missed"))
    common.write_csv(f"{args.out}/nm_post_training_runs.csv", rows)  # one row per run; the .csv: the summary
    columns = {"model": "{model}", "method": "{method}", "n": "{n}", "2:4 accuracy %": "{accuracy}",
               "vs dense": "{vs_dense}", "vs magnitude 2:4": "{vs_magnitude}", "s/run": "{seconds:.1f}",
               "within 1.0 of dense and above magnitude": lambda r: "—" if r["method"] == "magnitude" else r["target"]}
    common.write_results("nm_post_training", summary, "2:4 post-training pruning: OBC and SparseGPT against "
                         "tfmot's 2:4 magnitude rule", f"Calibration: {CALIBRATION} unlabelled training inputs "
                         "per seed (a random subset); 'vs' columns in points; BN: BatchNorm recalibration on the "
                         "training images after pruning.", columns, started, out=args.out)


if __name__ == "__main__":
    main()
