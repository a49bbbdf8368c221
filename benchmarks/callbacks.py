"""Overhead of `NTKMonitor(every="epoch")` in `model.fit` on the default model (cnn1d on mnist1d), and how
much of a measurement is the kernel itself and how much its bookkeeping.

Same model, data, batch size (64) and optimizer (SGD momentum 0.9) with and without the monitor; the probe
set is the default experiment's (ntk.probe_size 128, ntk.batch_size 64). One monitor instance is reused
(traced once, as across the epochs of one run). Sides alternate (benchmarks/timing.py) after a warm-up each:
  fit:         `--epochs` epochs of fit with the monitor, then without; ratio = with / without.
  measurement: `--calls` measurements as fit triggers them (the monitor's epoch-end hook: kernel, metrics,
               bookkeeping), then as many probe-set kernels alone; ratio = measurement / kernel.
  BLAS threads: the same measurements (on one BLAS thread, as the hook runs them), then measurements with
               NumPy's default BLAS threads; ratio = one thread / default.

    python benchmarks/callbacks.py [--epochs 5] [--rounds 7] [--calls 10]
"""

import argparse
import os
import statistics

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402

from kerasntk import config as cfg  # noqa: E402
from kerasntk import data, models  # noqa: E402
from kerasntk.callbacks import NTKMonitor  # noqa: E402

import timing  # noqa: E402  (benchmarks/timing.py)


def compiled_model(arrays):
    keras.utils.set_random_seed(0)
    model = models.get("cnn1d", arrays.input_shape, arrays.num_classes)
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main(epochs, rounds, calls):
    arrays = data.load_arrays("mnist1d")
    n = cfg.NTKConfig()
    x_probe, y_probe = data.probe_subset(arrays.x_train, arrays.y_train, n.probe_size, n.probe_seed)
    model = compiled_model(arrays)
    monitor = NTKMonitor(x_probe, y_probe, every="epoch", batch_size=n.batch_size)
    fit = lambda callbacks: model.fit(arrays.x_train, arrays.y_train, batch_size=64, epochs=epochs, verbose=0,
                                      callbacks=callbacks)
    print(f"cnn1d / mnist1d ({len(arrays.x_train)} train), batch 64, probe {len(x_probe)}; {timing.machine()}",
          flush=True)
    fit([monitor]), fit([])  # warm-up: tracing
    measured = len(monitor.kernels)
    fits = timing.interleave(timing.timed(lambda: fit([monitor])), timing.timed(lambda: fit([])), rounds, warmup=0)
    per_fit = (len(monitor.kernels) - measured) / rounds

    def measurement():  # the epoch-end hook at a new step, as in fit
        monitor._maybe_act(monitor._last + monitor.steps_per_epoch, None, boundary=True)

    def default_threads():  # the same measurement without the hook's one-BLAS-thread limit
        monitor._act(monitor._last + monitor.steps_per_epoch, None)
        monitor._last += monitor.steps_per_epoch

    kernel = lambda: monitor._ntk_fn(x_probe)
    parts = timing.interleave(timing.timed(measurement, calls), timing.timed(kernel, calls), rounds)
    threads = timing.interleave(timing.timed(measurement, calls), timing.timed(default_threads, calls), rounds)
    extra = [(a - b) / per_fit for a, b in zip(fits.a, fits.b)]
    bookkeeping = [(a - b) / calls for a, b in zip(parts.a, parts.b)]
    print(f"\n{rounds} rounds, median (min-max)")
    print("| comparison | per round | ratio | load |\n|---|---|---|---|")
    print(f"| fit with / without NTKMonitor | {epochs} epochs, {per_fit:g} measurements | {fits.ratio()} "
          f"| {fits.load()} |")
    print(f"| measurement / kernel alone | {calls} calls | {parts.ratio()} | {parts.load()} |")
    print(f"| measurement, one BLAS thread / NumPy's default threads | {calls} calls | {threads.ratio()} "
          f"| {threads.load()} |")
    print(f"\nfit without {statistics.median(fits.b):.2f} s, with {statistics.median(fits.a):.2f} s; "
          f"extra per measurement {timing.spread(extra, 3)} s")
    print(f"kernel alone {statistics.median(parts.b) / calls:.3f} s, "
          f"measurement {statistics.median(parts.a) / calls:.3f} s; "
          f"bookkeeping per measurement {timing.spread(bookkeeping, 3)} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    main(args.epochs, args.rounds, args.calls)
