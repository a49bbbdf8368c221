"""Projected wall time of a config's whole experiment on 1, 8 and 32 hosts, from per-job costs measured here.

The job graph of the config (`kerasntk.experiment.job_graph`, with CIFAR-10's 50,000 training examples) is
scheduled on H identical hosts, one job per host at a time, longest ready job first (Ray runs whatever is
ready; the longest-first order is the best case among greedy orders). Job costs come from timings of the
config's model on this machine, in seconds:

    parent / child(t)   steps to train x one train step, + one test-set evaluation per epoch
    linearized(t)       linearize.length epochs of the linearized step (+ test and validation evaluation)
    measure_parent      per checkpoint: the probe-set NTK + evaluations of the test set and train subset
    pairs(t)            per child pair: alphas x (BatchNorm re-estimation + test + train-subset evaluations)

The NTK is timed on `--probe` examples and scaled by (probe_size / probe)^2 (the kernel's pairs dominate;
features are linear in N, so this overestimates slightly). Ratios between hosts counts hold for any
accelerator on which these relative costs are alike; the absolute hours are this CPU's.

    python benchmarks/projection.py [configs/cifar10_resnet20.yaml] [--probe 64] [--hosts 1 8 32]
"""

import argparse
import heapq
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasntk import config as cfg  # noqa: E402
from kerasntk import models, ntk  # noqa: E402
from kerasntk.experiment import Grid, job_graph  # noqa: E402
from kerasntk.linearized import linearize  # noqa: E402

N_TRAIN, N_TEST, SHAPE, CLASSES = 50_000, 10_000, (32, 32, 3), 10


def median_time(fn, repeats):
    fn()  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure(config, probe, repeats):
    """Seconds of one train step, one linearized step, one inference example and one probe-set NTK."""
    t = config.train
    model = models.get(config.model.name, SHAPE, CLASSES, **config.model.options)
    x = np.random.default_rng(0).normal(size=(t.batch_size,) + SHAPE).astype(np.float32)
    y = np.arange(t.batch_size) % CLASSES
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(t.lr, momentum=t.momentum), loss=loss)
    step = median_time(lambda: model.train_on_batch(x, y), repeats)
    infer = median_time(lambda: model.predict_on_batch(x), repeats) / t.batch_size
    lin = linearize(model)
    lin.compile(optimizer=keras.optimizers.SGD(config.linearize.lr, momentum=0.9), loss=loss)
    lin_step = median_time(lambda: lin.train_on_batch(x, y), repeats)
    fn = ntk.empirical_ntk_fn(model, trace_axes=(-1,), batch_size=min(probe, config.ntk.batch_size))
    kernel = median_time(lambda: fn(x[:probe] if probe <= len(x) else np.resize(x, (probe,) + SHAPE)), 1)
    return dict(step=step, linearized_step=lin_step, inference=infer,
                ntk=kernel * (config.ntk.probe_size / probe) ** 2)


def job_costs(config, grid, seconds):
    """Seconds of every job of the graph."""
    t, la, li = config.train, config.landscape, config.linearize
    eval_epoch = N_TEST * seconds["inference"]
    per_epoch = grid.steps_per_epoch * seconds["step"] + eval_epoch
    lin_steps = (N_TRAIN - li.validation_examples) // li.batch_size
    lin_epochs = cfg.parse_duration(li.length).steps(lin_steps) / lin_steps
    lin_epoch = lin_steps * seconds["linearized_step"] + (N_TEST + li.validation_examples) * seconds["inference"]
    checkpoint = seconds["ntk"] + (N_TEST + la.train_examples) * seconds["inference"]
    pair = la.alphas * (la.bn_examples + N_TEST + la.train_examples) * seconds["inference"]
    pairs = config.spawn.children * (config.spawn.children - 1) // 2
    costs = {}
    for job in job_graph(config, grid):
        costs[job.id] = dict(
            parent=lambda: grid.total / grid.steps_per_epoch * per_epoch,
            child=lambda: (grid.total - job.step) / grid.steps_per_epoch * per_epoch,
            linearized=lambda: lin_epochs * lin_epoch,
            measure_parent=lambda: len(grid.checkpoints) * checkpoint,
            pairs=lambda: pairs * pair,
        ).get(job.kind, lambda: 0.0)()
    return costs


def makespan(jobs, costs, hosts):
    """Wall time of the graph on `hosts` hosts, longest ready job first."""
    done_at, running, ready, clock = {}, [], [], 0.0
    waiting = list(jobs)
    while waiting or running or ready:
        for job in [j for j in waiting if all(d in done_at for d in j.deps)]:
            waiting.remove(job)
            start = max([clock] + [done_at[d] for d in job.deps])
            heapq.heappush(ready, (-costs[job.id], start, job.id))
        while ready and len(running) < hosts:
            cost, start, job_id = heapq.heappop(ready)
            heapq.heappush(running, (max(clock, start) - cost, job_id))
        if running:
            clock, job_id = heapq.heappop(running)
            done_at[job_id] = clock
    return max(done_at.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="configs/cifar10_resnet20.yaml")
    parser.add_argument("--probe", type=int, default=64, help="examples of the timed NTK (scaled to probe_size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    config = cfg.load(args.config)
    grid = Grid.from_config(config, N_TRAIN // config.train.batch_size)
    seconds = measure(config, args.probe, args.repeats)
    print("measured (s): " + ", ".join(f"{k} {v:.4g}" for k, v in seconds.items()))
    jobs = job_graph(config, grid)
    costs = job_costs(config, grid, seconds)
    kinds = {}
    for job in jobs:
        kinds.setdefault(job.kind, []).append(costs[job.id] / 3600)
    print("\n| job kind | jobs | hours each (min-max) |\n|---|---|---|")
    for kind, hours in kinds.items():
        if max(hours) > 0:
            print(f"| {kind} | {len(hours)} | {min(hours):.2f}-{max(hours):.2f} |")
    serial = sum(costs.values())
    critical = costs["parent"] + max(costs[j.id] for j in jobs if j.kind in ("child", "measure_parent", "linearized"))
    print(f"\n| hosts | wall time (h) | speed-up |\n|---|---|---|")
    for hosts in args.hosts:
        wall = makespan(jobs, costs, hosts)
        print(f"| {hosts} | {wall / 3600:.1f} | {serial / wall:.1f}x |")
    print(f"\nall jobs one after another: {serial / 3600:.1f} h; critical path (parent, then its longest "
          f"dependent job): {critical / 3600:.1f} h; {len(jobs)} jobs, {len(grid.checkpoints)} checkpoints")


if __name__ == "__main__":
    tf.get_logger().setLevel("ERROR")
    main()
