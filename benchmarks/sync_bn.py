"""Cost of synchronized BatchNorm statistics against per-replica statistics on 2 logical CPUs.

ResNet-20 with BatchNorm on CIFAR-shaped synthetic data, global batch 128 split over a MirroredStrategy of
2 logical CPU devices, plain graphs (XLA cannot span logical CPUs), op determinism off on both sides. The
two trainers alternate rounds of `--steps` train steps (sync, per-replica, sync, ...: benchmarks/timing.py),
after a warm-up round each; ratio = synchronized time / per-replica time per round, median with min-max.

    python benchmarks/sync_bn.py [--rounds 6] [--steps 10]
"""

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kerasntk import distribute  # noqa: E402

distribute.split_cpu(2)  # before TensorFlow initializes

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasntk import config as cfg  # noqa: E402
from kerasntk import data, training  # noqa: E402
from kerasntk.experiment import Grid  # noqa: E402
from kerasntk.rundir import JobDir  # noqa: E402

import timing  # noqa: E402  (benchmarks/timing.py)


def trainer(sync, strategy, arrays, job, steps):
    config = cfg.load(None, ["model.name=resnet20", "train.batch_size=128", f"train.length={steps}it",
                             f"train.steps_per_execution={steps}", "train.deterministic=false",
                             "train.eval_batch_size=256", "checkpoints.log_num=0", "checkpoints.every=null",
                             "spawn.times=[]", "linearize.times=[]", f"model.sync_bn={str(sync).lower()}"])
    grid = Grid.from_config(config, data.steps_per_epoch(arrays, 128))
    return training.build_trainer(config, arrays, grid, JobDir(job), strategy)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    n = 128 * args.steps * (args.rounds + 1)  # one epoch covers every round: no evaluation in between
    arrays = data.Arrays(rng.normal(size=(n, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, n).astype(np.int32),
                         rng.normal(size=(256, 32, 32, 3)).astype(np.float32), rng.integers(0, 10, 256).astype(np.int32),
                         name="synthetic", num_classes=10, augment=None)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    total = args.steps * (args.rounds + 1)
    print(timing.machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        sides = []
        for sync in (True, False):
            side = trainer(sync, strategy, arrays, os.path.join(tmp, str(sync)), total)
            side.restore()
            sides.append(timing.timed(lambda side=side: side.train(until=side.step + args.steps, verbose=0)))
        names = ("synchronized", "per-replica")
        c = timing.interleave(*sides, args.rounds, report=lambda r, c: timing.print_round(r, c, names))
    print(f"\n| BatchNorm statistics | median s / {args.steps} steps |\n|---|---|\n"
          f"| synchronized | {statistics.median(c.a):.2f} |\n| per replica | {statistics.median(c.b):.2f} |")
    print(f"\nratio synchronized / per-replica: median (min-max) {c.ratio(3)} over {args.rounds} rounds; "
          f"load {c.load()}; {timing.machine()}")


if __name__ == "__main__":
    main()
