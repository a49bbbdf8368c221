"""Throughput of the kerasntk trainer relative to Keras `model.fit` on the same model, data and batch size.

Both sides do the same work per epoch: SGD with momentum 0.9, softmax cross-entropy, one pass over the
training set and one evaluation on the test set, in the same compile mode: every case runs once with
plain graphs (`jit_compile=False`, kerasntk's default on CPU) and once XLA-compiled (`jit_compile=True`,
kerasntk's default on TPU/GPU). Op determinism (kerasntk's default) is off on both sides: it is process-wide,
and Keras silently ignores `jit_compile=True` while it is on. Compilation is excluded (a warm-up epoch);
each side's epoch time is the median over repeats. Ratio > 1 means kerasntk is faster.

    python benchmarks/train_step.py [--repeats 5]
"""

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasntk import config as cfg  # noqa: E402
from kerasntk import data, models, training  # noqa: E402
from kerasntk.experiment import Grid  # noqa: E402
from kerasntk.rundir import JobDir  # noqa: E402


def synthetic(n_train, n_test, shape, classes=10):
    rng = np.random.default_rng(0)
    make = lambda n: (rng.normal(size=(n,) + shape).astype(np.float32), rng.integers(0, classes, n).astype(np.int32))
    (x, y), (xt, yt) = make(n_train), make(n_test)
    return data.Arrays(x, y, xt, yt, name="synthetic", num_classes=classes, augment=None)


def keras_epoch_times(case, arrays, repeats, xla):
    keras.utils.set_random_seed(0)
    model = models.get(case["model"], arrays.input_shape, arrays.num_classes, **case["options"])
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=xla)
    fit = lambda: model.fit(arrays.x_train, arrays.y_train, batch_size=case["batch"], epochs=1, shuffle=True,
                            validation_data=(arrays.x_test, arrays.y_test), validation_batch_size=case["eval_batch"],
                            verbose=0)
    fit()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fit()
        times.append(time.perf_counter() - start)
    return times


def kerasntk_epoch_times(case, arrays, repeats, xla):
    config = cfg.load(None, [f"model.name={case['model']}", f"train.batch_size={case['batch']}",
                             f"train.length={repeats + 1}ep", "train.lr=0.01", "train.weight_decay=0",
                             f"train.eval_batch_size={case['eval_batch']}", "checkpoints.log_num=0",
                             "checkpoints.every=null", "spawn.times=[]", "linearize.times=[]",
                             f"train.jit_compile={str(xla).lower()}", "train.deterministic=false"])
    config.model.options = dict(case["options"])
    with tempfile.TemporaryDirectory() as job:
        grid = Grid.from_config(config, data.steps_per_epoch(arrays, case["batch"]))
        trainer = training.build_trainer(config, arrays, grid, JobDir(job), tf.distribute.get_strategy())
        trainer.restore()
        trainer.train(until=trainer.steps_per_epoch, verbose=0)  # compile
        times = []
        for epoch in range(2, repeats + 2):
            start = time.perf_counter()
            trainer.train(until=epoch * trainer.steps_per_epoch, verbose=0)
            times.append(time.perf_counter() - start)
    return times


CASES = [
    dict(name="cnn1d / mnist1d", model="cnn1d", options={}, batch=64, eval_batch=1000, data="mnist1d"),
    dict(name="resnet20 / CIFAR-shaped", model="resnet20", options={}, batch=128, eval_batch=256,
         data=(1280, 256, (32, 32, 3))),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for case in CASES:
        arrays = data.load_arrays("mnist1d") if case["data"] == "mnist1d" else synthetic(*case["data"])
        examples = data.steps_per_epoch(arrays, case["batch"]) * case["batch"]
        for xla in (False, True):
            k = statistics.median(keras_epoch_times(case, arrays, args.repeats, xla))
            n = statistics.median(kerasntk_epoch_times(case, arrays, args.repeats, xla))
            rows.append((case["name"], "XLA" if xla else "graph", case["batch"], examples / k, examples / n, k / n))
    print(f"\n{'model / data':28s} {'mode':>5s} {'batch':>5s} {'keras fit ex/s':>15s} {'kerasntk ex/s':>14s} {'ratio':>6s}")
    for name, mode, batch, kf, kn, ratio in rows:
        print(f"{name:28s} {mode:>5s} {batch:5d} {kf:15.0f} {kn:14.0f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
