"""Cost of one linearized train step relative to one ordinary train step of the same model and batch.

Both sides: Keras `compile()` + `train_on_batch`, SGD with momentum 0.9, softmax cross-entropy, same inputs
each step; compilation excluded (a warm-up round each); rounds of a few hundred (cnn1d) or 4 (ResNet-20)
steps of the linearized model, then of the ordinary one (benchmarks/timing.py); ratio = linearized /
ordinary time per round, median (min-max). The linearized step runs the frozen network in inference mode
plus a forward-mode JVP and backpropagates through the JVP to Δw. Target ≤ 3×.

    python benchmarks/linearize.py [--rounds 7] [--jit off|on|both] [--resnet-batch 128]
"""

import argparse
import os
import platform
import statistics

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasntk import models  # noqa: E402
from kerasntk.linearized import linearize  # noqa: E402

import timing  # noqa: E402  (benchmarks/timing.py)


def train_steps(model, x, y, jit):
    """A function running one `train_on_batch` of `model` on (x, y), compiled for SGD momentum 0.9."""
    model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    return lambda: model.train_on_batch(x, y)  # returns the loss as a Python float: the step has finished


def run_case(name, input_shape, batch, jit, calls, rounds):
    """Interleaved rounds of `calls` linearized, then ordinary steps of zoo model `name` on random data of
    `batch` examples (`timing.Comparison`), and the linearized model's total and trainable (Δw) parameters."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch,) + input_shape).astype(np.float32))
    y = tf.constant(rng.integers(0, 10, batch).astype(np.int32))
    keras.utils.set_random_seed(0)
    model = models.get(name, input_shape, 10)
    lin = linearize(model)  # snapshot before the ordinary model trains
    c = timing.interleave(timing.timed(train_steps(lin, x, y, jit), calls),
                          timing.timed(train_steps(model, x, y, jit), calls), rounds)
    return c, lin.count_params(), sum(int(np.prod(d.shape)) for d in lin.trainable_weights)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--jit", choices=["off", "on", "both"], default="both")
    parser.add_argument("--resnet-batch", type=int, default=128)
    args = parser.parse_args()
    cases = [("cnn1d", (40, 1), 64, 400), ("resnet20", (32, 32, 3), args.resnet_batch, 4)]  # calls: ~1 s or more
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.jit]
    print(f"TF {tf.__version__}, Keras {keras.__version__}, {platform.processor() or platform.machine()}; "
          f"{timing.machine()}; {args.rounds} rounds; ratio = linearized / ordinary per round, median (min-max)")
    print("| model | batch | xla | steps per round | ordinary ms | linearized ms | ratio | load | lin params | Δw |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, shape, batch, calls in cases:
        for jit in modes:
            c, total, trainable = run_case(name, shape, batch, jit, calls, args.rounds)
            print(f"| {name} | {batch} | {jit} | {calls} | {1e3 * statistics.median(c.b) / calls:.1f} | "
                  f"{1e3 * statistics.median(c.a) / calls:.1f} | {c.ratio()} | {c.load()} | "
                  f"{total} | {trainable} |", flush=True)


if __name__ == "__main__":
    main()
