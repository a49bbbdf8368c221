"""Benchmark kerasntk.hessian: one Hessian-vector product against one gradient of the same loss on the same
batch, and the cost of the curvature measurements per checkpoint at the default run's sizes.

    python benchmarks/hessian.py                      # both tables
    python benchmarks/hessian.py --rounds 8

Ratio table: `hvp_fn` and `gradient_fn` (the same blocked, strategy-spread machinery, one block of the
batch), float32, random weights; after a warm-up round each (tracing), each round times a row's number of
calls of HVPs, then of gradients (benchmarks/timing.py). Reported: the median time per call of each side,
and the ratio HVP / gradient of each round: its median and min-max over rounds.

Per-checkpoint table: top-1 eigenvalue by `--lanczos-steps` Lanczos steps plus the trace by `--probes`
Hutchinson probes, on a subset of `--subset` mnist1d training examples in blocks of `--batch`, the default
run's model (cnn1d); median and min-max over rounds.
"""

import argparse
import os
import statistics

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from kerasntk import data, hessian, models  # noqa: E402

import timing  # noqa: E402  (benchmarks/timing.py)

RATIO_ROWS = {  # name: (zoo model, options, input shape, batch, calls per side and round: ~1 s or more)
    "cnn1d (mnist1d, default run)": ("cnn1d", {}, (40, 1), 512, 100),
    "ResNet-20 (CIFAR-10 shape, BN)": ("resnet20", {}, (32, 32, 3), 128, 3),
}


def ratio_row(model_name, options, shape, batch, rounds, calls):
    """(`timing.Comparison` of rounds of `calls` HVPs against `calls` gradients, parameters)."""
    keras.utils.set_random_seed(0)
    model = models.get(model_name, shape, 10, **options)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(batch, *shape)).astype("float32"), rng.integers(0, 10, batch)
    hvp = hessian.hvp_fn(model, x, y, weight_decay=5e-4, batch_size=batch)
    gradient = hessian.gradient_fn(model, x, y, weight_decay=5e-4, batch_size=batch)
    v = rng.normal(size=hvp.size)
    return timing.interleave(timing.timed(lambda: hvp(v), calls), timing.timed(gradient, calls), rounds), hvp.size


def checkpoint_row(subset, batch, lanczos_steps, probes, rounds):
    """Seconds of top-1 eigenvalue + trace at the default run's model on `subset` mnist1d examples."""
    arrays = data.load_arrays("mnist1d")
    x, y = data.probe_subset(arrays.x_train, arrays.y_train, subset, seed=0)
    keras.utils.set_random_seed(0)
    model = models.get("cnn1d", arrays.input_shape, arrays.num_classes)
    hvp = hessian.hvp_fn(model, x, y, weight_decay=5e-4, batch_size=batch)
    hvp(np.zeros(hvp.size))  # trace
    measure = timing.timed(lambda: (hessian.top_eigenvalues(hvp, 1, lanczos_steps), hessian.trace(hvp, probes)))
    return [measure() for _ in range(rounds)], hvp.size


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--subset", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--lanczos-steps", type=int, default=20)
    parser.add_argument("--probes", type=int, default=20)
    args = parser.parse_args()
    print(f"one HVP vs one gradient, same batch ({args.rounds} rounds, sides alternating); {timing.machine()}")
    print("| model | parameters | batch | calls per side and round | HVP s | gradient s | ratio median (min-max) "
          "| load |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (model_name, options, shape, batch, calls) in RATIO_ROWS.items():
        c, size = ratio_row(model_name, options, shape, batch, args.rounds, calls)
        print(f"| {name} | {size:,} | {batch} | {calls} | {statistics.median(c.a) / calls:.4f} | "
              f"{statistics.median(c.b) / calls:.4f} | {c.ratio()} | {c.load()} |", flush=True)
    seconds, size = checkpoint_row(args.subset, args.batch, args.lanczos_steps, args.probes, args.rounds)
    hvps = args.lanczos_steps + args.probes
    print(f"\nper checkpoint: top-1 eigenvalue ({args.lanczos_steps} Lanczos steps) + trace ({args.probes} probes), "
          f"cnn1d ({size:,} parameters) on {args.subset} mnist1d examples in blocks of {args.batch}")
    print(f"seconds: median (min-max) {timing.spread(seconds)} over {args.rounds} rounds "
          f"({hvps} HVPs: {statistics.median(seconds) / hvps:.3f} s each); {timing.machine()}")


if __name__ == "__main__":
    main()
