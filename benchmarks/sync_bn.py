"""Cost of synchronized BatchNorm statistics against per-replica statistics on 2 logical CPUs.

ResNet-20 with BatchNorm on CIFAR-shaped synthetic data, global batch 128 split over a MirroredStrategy of
2 logical CPU devices, plain graphs (XLA cannot span logical CPUs), op determinism off on both sides. The
two trainers alternate rounds of `--steps` train steps (sync, per-replica, sync, ...), after a warm-up
round each; ratio = synchronized time / per-replica time per round, median with min-max.

    python benchmarks/sync_bn.py [--rounds 6] [--steps 10]
"""

import argparse
import os
import statistics
import tempfile
import time

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
    with tempfile.TemporaryDirectory() as tmp:
        sides = {sync: trainer(sync, strategy, arrays, os.path.join(tmp, str(sync)), total) for sync in (True, False)}
        for side in sides.values():
            side.restore()
            side.train(until=args.steps, verbose=0)  # warm-up: tracing
        ratios, times = [], {True: [], False: []}
        for r in range(1, args.rounds + 1):
            load = os.getloadavg()[0]
            for sync in (True, False):
                start = time.perf_counter()
                sides[sync].train(until=(r + 1) * args.steps, verbose=0)
                times[sync].append(time.perf_counter() - start)
            ratios.append(times[True][-1] / times[False][-1])
            print(f"round {r}: synchronized {times[True][-1]:.2f} s, per-replica {times[False][-1]:.2f} s, "
                  f"ratio {ratios[-1]:.3f}, load {load:.2f}", flush=True)
    print(f"\n| BatchNorm statistics | median s / {args.steps} steps |\n|---|---|\n"
          f"| synchronized | {statistics.median(times[True]):.2f} |\n| per replica | {statistics.median(times[False]):.2f} |")
    print(f"\nratio synchronized / per-replica: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}) over {args.rounds} rounds")


if __name__ == "__main__":
    main()
