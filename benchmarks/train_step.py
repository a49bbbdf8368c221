"""Throughput of the kerasntk trainer relative to Keras `model.fit` on the same model, data and batch size.

Both sides do the same work per epoch: SGD with momentum 0.9, softmax cross-entropy, one pass over the
training set and one evaluation on the test set, 32 train steps per compiled call, in the same compile mode:
every case runs once with plain graphs (`jit_compile=False`, kerasntk's default on CPU) and once XLA-compiled
(`jit_compile=True`, kerasntk's default on TPU/GPU). Op determinism (kerasntk's default) is off on both sides:
it is process-wide, and Keras silently ignores `jit_compile=True` while it is on. Both write a checkpoint of
weights and optimizer after every epoch: kerasntk its resume checkpoint, `fit` through Keras's equivalent,
`keras.callbacks.BackupAndRestore` (removed at the end of each `fit` call, so every round starts afresh). The
sides alternate (benchmarks/timing.py): a warm-up (compilation) each, then
rounds of `epochs` epochs of fit, then of kerasntk; ratio = fit time / kerasntk time per round (> 1: kerasntk
is faster), median (min-max) over rounds, of wall-clock time and of this process's CPU time.

    python benchmarks/train_step.py [--rounds 7] [--fit-input arrays|batches]
"""

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasntk import config as cfg  # noqa: E402
from kerasntk import data, models, training  # noqa: E402
from kerasntk.experiment import Grid  # noqa: E402
from kerasntk.rundir import JobDir  # noqa: E402

import timing  # noqa: E402  (benchmarks/timing.py)


def synthetic(n_train, n_test, shape, classes=10):
    rng = np.random.default_rng(0)
    make = lambda n: (rng.normal(size=(n,) + shape).astype(np.float32), rng.integers(0, classes, n).astype(np.int32))
    (x, y), (xt, yt) = make(n_train), make(n_test)
    return data.Arrays(x, y, xt, yt, name="synthetic", num_classes=classes, augment=None)


def keras_side(case, arrays, xla, backup_dir, fit_input="arrays"):
    """`epochs` epochs of `model.fit` (training, test-set evaluation, a backup in `backup_dir`), as a function.
    fit_input "arrays": fit
    on the numpy arrays (Keras's own pipeline, as users call it); "batches": on kerasntk's training batches (epoch
    0's order in every epoch) and test batches in tf.data pipelines without the autotuning model thread, as the
    trainer's."""
    keras.utils.set_random_seed(0)
    model = models.get(case["model"], arrays.input_shape, arrays.num_classes, **case["options"])
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=xla,
                  steps_per_execution=STEPS_PER_EXECUTION)
    backup = [keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch")]
    if fit_input == "arrays":
        return lambda: model.fit(arrays.x_train, arrays.y_train, batch_size=case["batch"], epochs=case["epochs"],
                                 shuffle=True, validation_data=(arrays.x_test, arrays.y_test),
                                 validation_batch_size=case["eval_batch"], verbose=0, callbacks=backup)
    train = data.train_batches(arrays, batch_size=case["batch"], epoch=0, order_seed=0, augment_seed=0)
    test = data.eval_batches(arrays.x_test, arrays.y_test, case["eval_batch"]).with_options(train.options())
    return lambda: model.fit(train, epochs=case["epochs"], validation_data=test, verbose=0, callbacks=backup)


def kerasntk_side(case, arrays, xla, job):
    """`epochs` epochs of the kerasntk trainer (training, test-set evaluation, resume checkpoint), as a function."""
    config = cfg.load(None, [f"model.name={case['model']}", f"train.batch_size={case['batch']}",
                             "train.length=10000ep", "train.lr=0.01", "train.weight_decay=0",
                             f"train.eval_batch_size={case['eval_batch']}", "checkpoints.log_num=0",
                             "checkpoints.every=null", "spawn.times=[]", "linearize.times=[]",
                             f"train.jit_compile={str(xla).lower()}", "train.deterministic=false",
                             f"train.steps_per_execution={STEPS_PER_EXECUTION}"])
    config.model.options = dict(case["options"])
    grid = Grid.from_config(config, data.steps_per_epoch(arrays, case["batch"]))
    trainer = training.build_trainer(config, arrays, grid, JobDir(job), tf.distribute.get_strategy())
    trainer.restore()
    return lambda: trainer.train(until=trainer.step + case["epochs"] * trainer.steps_per_epoch, verbose=0)


STEPS_PER_EXECUTION = 32  # train steps per compiled call on both sides (kerasntk's default)
CASES = [  # epochs: per side and round, so that a round takes seconds
    dict(name="cnn1d / mnist1d", model="cnn1d", options={}, batch=64, eval_batch=1000, data="mnist1d", epochs=5),
    dict(name="resnet20 / CIFAR-shaped", model="resnet20", options={}, batch=128, eval_batch=256,
         data=(1280, 256, (32, 32, 3)), epochs=1),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--fit-input", choices=("arrays", "batches"), default="arrays",
                        help="fit on numpy arrays (default) or on kerasntk's tf.data batches (see keras_side)")
    args = parser.parse_args()
    print(timing.machine(), f"TF {tf.__version__}, Keras {keras.__version__}", flush=True)
    rows = []
    for case in CASES:
        arrays = data.load_arrays("mnist1d") if case["data"] == "mnist1d" else synthetic(*case["data"])
        examples = data.steps_per_epoch(arrays, case["batch"]) * case["batch"] * case["epochs"]
        for xla in (False, True):
            mode = "XLA" if xla else "graph"
            print(f"{case['name']}, {mode}: fit, kerasntk", flush=True)
            with tempfile.TemporaryDirectory() as job, tempfile.TemporaryDirectory() as backup:
                fit = keras_side(case, arrays, xla, os.path.join(backup, "fit"), args.fit_input)  # fit removes it
                c = timing.interleave(timing.timed(fit),
                                      timing.timed(kerasntk_side(case, arrays, xla, job)), args.rounds,
                                      report=lambda r, c: timing.print_round(r, c, ("fit", "kerasntk")))
            rows.append((case["name"], mode, case["batch"], examples / statistics.median(c.a),
                         examples / statistics.median(c.b), c.ratio(), c.cpu_ratio(), c.load()))
    print(f"\n{args.rounds} rounds per row; ratio = fit time / kerasntk time per round (> 1: kerasntk faster), "
          f"median (min-max), of wall-clock and of this process's CPU time; fit on {args.fit_input}; "
          f"{timing.machine()}")
    print("| model / data | mode | batch | keras fit ex/s | kerasntk ex/s | ratio | CPU-time ratio | load |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mode, batch, kf, kn, ratio, cpu_ratio, load in rows:
        print(f"| {name} | {mode} | {batch} | {kf:.0f} | {kn:.0f} | {ratio} | {cpu_ratio} | {load} |")


if __name__ == "__main__":
    main()
