"""Cost of one linearized train step relative to one ordinary train step of the same model and batch.

Both sides: Keras `compile()` + `train_on_batch`, SGD with momentum 0.9, softmax cross-entropy, same inputs
each step; compilation excluded (warm-up steps), median over repeats. The linearized step runs the frozen
network in inference mode plus a forward-mode JVP and backpropagates through the JVP to Δw. Target ≤ 3×.

    python benchmarks/linearize.py [--repeats 10] [--jit off|on|both] [--resnet-batch 128]
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasntk import models  # noqa: E402
from kerasntk.linearized import linearize  # noqa: E402


def step_times(model, x, y, jit, repeats, warmup=2):
    """Seconds per `train_on_batch` call (median-ready list) after `warmup` compiling/warming calls."""
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    for _ in range(warmup):
        model.train_on_batch(x, y)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.train_on_batch(x, y)  # returns the loss as a Python float: the step has finished
        times.append(time.perf_counter() - start)
    return times


def run_case(name, input_shape, batch, jit, repeats):
    """Median ordinary and linearized step times (s) for zoo model `name` on random data of `batch` examples,
    and the linearized model's total and trainable (Δw) parameter counts."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch,) + input_shape).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, batch).astype(np.int32))
    keras.utils.set_random_seed(0)
    model = models.get(name, input_shape, 10)
    lin = linearize(model)  # snapshot before the ordinary model trains
    plain = statistics.median(step_times(model, x, y, jit, repeats))
    linear = statistics.median(step_times(lin, x, y, jit, repeats))
    return plain, linear, lin.count_params(), sum(int(np.prod(d.shape)) for d in lin.trainable_weights)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--jit", choices=["off", "on", "both"], default="both")
    parser.add_argument("--resnet-batch", type=int, default=128)
    args = parser.parse_args()
    cases = [("cnn1d", (40, 1), 64), ("resnet20", (32, 32, 3), args.resnet_batch)]
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    print(f"TF {tf.__version__}, Keras {keras.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, repeats {args.repeats}")
    print(f"{'model':10} {'batch':>5} {'xla':>5} {'ordinary ms':>12} {'linearized ms':>14} {'ratio':>6} "
          f"{'lin params':>10} {'Δw':>8}")
    for name, shape, batch in cases:
        for jit in modes:
            plain, linear, total, trainable = run_case(name, shape, batch, jit, args.repeats)
            print(f"{name:10} {batch:5d} {str(jit):>5} {1e3 * plain:12.1f} {1e3 * linear:14.1f} "
                  f"{linear / plain:6.2f} {total:10d} {trainable:8d}", flush=True)


if __name__ == "__main__":
    main()
