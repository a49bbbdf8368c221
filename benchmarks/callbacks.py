"""Overhead of `NTKMonitor(every="epoch")` in `model.fit` on the default model (cnn1d on mnist1d).

Same model, data, batch size (64) and optimizer (SGD momentum 0.9) with and without the monitor; the probe
set is the default experiment's (ntk.probe_size 128, ntk.batch_size 64). Compilation of the train step is
excluded (a warm-up epoch); the monitor's first fit, which traces its NTK functions, is reported
separately (one monitor instance is reused, as one would across epochs of one run). Runs alternate (without, with) `--repeats` times; fit times are medians.
Ratio = fit time with the monitor / without (1 = no overhead).

    python benchmarks/callbacks.py [--epochs 5] [--repeats 3]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from kerasntk import config as cfg  # noqa: E402
from kerasntk import data, models  # noqa: E402
from kerasntk.callbacks import NTKMonitor  # noqa: E402


def compiled_model(arrays):
    keras.utils.set_random_seed(0)
    model = models.get("cnn1d", arrays.input_shape, arrays.num_classes)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def timed_fit(model, arrays, epochs, callbacks):
    start = time.perf_counter()
    model.fit(arrays.x_train, arrays.y_train, batch_size=64, epochs=epochs, verbose=0, callbacks=callbacks)
    return time.perf_counter() - start


def main(epochs, repeats):
    arrays = data.load_arrays("mnist1d")
    n = cfg.NTKConfig()
    x_probe, y_probe = data.probe_subset(arrays.x_train, arrays.y_train, n.probe_size, n.probe_seed)
    model = compiled_model(arrays)
    timed_fit(model, arrays, 1, [])  # compile the train step
    monitor = NTKMonitor(x_probe, y_probe, every="epoch", batch_size=n.batch_size)  # one instance: traced once
    first_ntk = timed_fit(model, arrays, 1, [monitor]) - timed_fit(model, arrays, 1, [])
    without, with_monitor, per_measurement, counts = [], [], [], []
    for _ in range(repeats):
        without.append(timed_fit(model, arrays, epochs, []))
        before = len(monitor.kernels)
        with_monitor.append(timed_fit(model, arrays, epochs, [monitor]))
        counts.append(len(monitor.kernels) - before)
        per_measurement.append((with_monitor[-1] - without[-1]) / counts[-1])
    a, b = statistics.median(without), statistics.median(with_monitor)
    print(f"cnn1d / mnist1d ({len(arrays.x_train)} train), batch 64, {epochs} epochs, probe {len(x_probe)}, "
          f"{counts[0]} NTK measurements per fit (start and every epoch end), {repeats} repeats")
    print(f"fit without NTKMonitor: {a:.2f} s (median of {[round(t, 2) for t in without]})")
    print(f"fit with NTKMonitor:    {b:.2f} s (median of {[round(t, 2) for t in with_monitor]})")
    print(f"ratio with/without: {b / a:.2f}; extra time per measurement ~{statistics.median(per_measurement):.3f} s; "
          f"first fit with the monitor (1 epoch, 2 measurements incl. tracing): +{first_ntk:.2f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    main(args.epochs, args.repeats)
