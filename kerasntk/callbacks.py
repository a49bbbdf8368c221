"""Keras callbacks bringing kerasntk's measurements into any `model.fit` (README "Keras callbacks"; metrics: docs/methods.md).

- `NTKMonitor`: the empirical NTK on a probe set at chosen times; scalars into `logs` (so History,
  CSVLogger and TensorBoard record them, wherever they are in the callback list), the trajectory into
  NetCDF (`parent(time, metric)`, `kernel_distance(time, time_b)`, optionally the kernels).
- `SpawnCheckpoint`: weights, optimizer state and step at chosen times, in the run-directory layout that
  `kerasntk spawn RUN_DIR --time T --child C` reads, so children can be launched from a plain `fit` run.
- `LandscapeProbe`: at the end of training, error/loss barriers and disagreement between the trained
  model and reference weights (e.g. a sibling run's `.weights.h5`), into `logs` and NetCDF.
- `HessianMonitor`: the training loss's sharpness (top Hessian eigenvalue) and Hessian trace on a fixed
  subset at chosen times, into `logs` and NetCDF.

Times follow Keras: hooks count epochs from 0, and a time t (in epochs, fractional allowed, or
"<n>it" in optimizer steps) means "after t epochs of training", i.e. `optimizer.iterations == t·steps`.
Batch-level hooks are installed only when a time needs step resolution: a batch hook stops Keras from
dispatching batches asynchronously and syncs with the host every batch.

Every callback's `on_epoch_end` gets the same `logs`, one callback after another, so a value put there in
`on_epoch_end` would miss the callbacks before it (TensorBoard, CSVLogger). NTKMonitor, HessianMonitor and
LandscapeProbe therefore measure right after the epoch's last train step, inside `model.train_function`
(wrapped while `fit` runs, `_EpochEndLogs`), and their values are in the logs Keras builds for the epoch.
"""

import math
import os
import time as _time
import warnings

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from threadpoolctl import ThreadpoolController  # noqa: E402

from kerasntk import config as cfg  # noqa: E402
from kerasntk import data, fs, hessian, landscape, ntk, results, rundir, training  # noqa: E402
from kerasntk.evaluation import Evaluator  # noqa: E402

LOG_KEYS = ("ntk_velocity", "ntk_distance_from_init", "ntk_alignment", "ntk_effective_rank")
HESSIAN_LOG_KEYS = ("hessian_top_eigenvalue", "hessian_trace", "hessian_trace_stderr")
LANDSCAPE_LOG_KEYS = ("error_barrier", "loss_barrier", "train_error_barrier", "train_loss_barrier", "disagreement",
                      "js_divergence", "weight_distance", "cosine_similarity")
# NumPy's BLAS threads on a probe-sized kernel wait on each other far longer than they compute, worst when
# TensorFlow or other jobs hold the cores: measurements run on one BLAS thread (BENCHMARKS.md, "Callbacks")
_BLAS = ThreadpoolController()


# -- when to act --------------------------------------------------------------------------------------------


class _Timed(keras.callbacks.Callback):
    """A callback acting at chosen optimizer steps: at the start of `fit` and every epoch ("epoch"), every
    n steps (int), or at a list of times. Subclasses implement `_act(step, logs)`; a step is acted on once,
    also across several `fit` calls. With steps_per_execution > 1 a time between two hooks is acted on at
    the first hook after it (the step actually used is what gets recorded)."""

    logged = False  # whether `latest()` goes into every callback's epoch logs (_EpochEndLogs)

    def __init__(self, every, name):
        super().__init__()
        self._every, self._name = _parse_every(every, name), name
        if _needs_step_resolution(self._every):
            self.on_train_batch_end = self._on_batch_end  # only then: it forces a host sync per batch
        self._targets, self._last, self.steps_per_epoch = [], -1, None

    def on_train_begin(self, logs=None):
        self.steps_per_epoch = (self.params or {}).get("steps")
        if not self.steps_per_epoch:
            raise ValueError(f"{self._name} needs the number of steps per epoch: pass steps_per_epoch to fit "
                             "or training data of known length")
        if isinstance(self._every, list):
            self._targets = sorted({d.steps(self.steps_per_epoch) for d in self._every})
        step = self._step()
        self._last = max(self._last, step - 1)
        self._maybe_act(step, logs, boundary=True)
        if self.logged:
            _EpochEndLogs.attach(self)

    def on_epoch_begin(self, epoch, logs=None):
        _EpochEndLogs.epoch_begins(self)

    def on_epoch_end(self, epoch, logs=None):
        self._maybe_act(self._step(), logs, boundary=True)
        if self.logged and logs is not None:
            logs.update(self.latest())

    def on_train_end(self, logs=None):
        _EpochEndLogs.detach(self)

    def epoch_end_logs(self):
        """Act if due at the epoch's last step (called by `_EpochEndLogs`); the values for the epoch's logs."""
        self._maybe_act(self._step(), None, boundary=True)
        return self.latest()

    def _on_batch_end(self, batch, logs=None):
        self._maybe_act(self._step(), logs, boundary=False)

    def _maybe_act(self, step, logs, boundary):
        """Act if a chosen time lies in (last step checked, step]; `boundary`: train begin or an epoch end."""
        if step <= self._last:
            return
        every, last = self._every, self._last
        if every == "epoch":
            due = boundary
        elif isinstance(every, int):
            due = step // every > last // every
        else:
            due = any(last < s <= step for s in self._targets)
        self._last = step
        if due:
            with _BLAS.limit(limits=1, user_api="blas"):
                self._act(step, logs)

    def _step(self):
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def epochs(self, step):
        """Time in epochs of optimizer step `step`."""
        return step / self.steps_per_epoch

    def _act(self, step, logs):
        raise NotImplementedError


class _EpochEndLogs:
    """`model.train_function` wrapped while `fit` runs: after an epoch's last call (its last train steps) every
    registered callback's `epoch_end_logs()` goes into the logs it returns, from which Keras builds the epoch's
    logs (when their keys differ from the model's metrics, Keras takes the last step's logs), so every callback's
    `on_epoch_end` sees them in any order. The weights are the epoch's final ones, as in `on_epoch_end`.
    Without a known number of steps per epoch, or in an epoch that ends early (`stop_training`, data exhausted),
    the callbacks measure in their own `on_epoch_end`, and only the callbacks after them see the values."""

    def __init__(self, model):
        self.original, self.callbacks = model.train_function, []
        self.calls, self.calls_per_epoch, self.started = 0, None, False

    @classmethod
    def attach(cls, callback):
        """Register `callback` (at `on_train_begin`, when fit has made its train function)."""
        model = callback.model
        hook = model.train_function if isinstance(model.train_function, cls) else cls(model)
        if hook.started:  # left by a fit that raised before on_train_end: its callbacks are not this fit's
            hook.callbacks, hook.started = [], False
        steps = (callback.params or {}).get("steps")
        hook.calls_per_epoch = math.ceil(steps / model.steps_per_execution) if steps else None
        hook.callbacks.append(callback)
        model.train_function = hook

    @classmethod
    def epoch_begins(cls, callback):
        if isinstance(callback.model.train_function, cls):
            callback.model.train_function.calls = 0

    @classmethod
    def detach(cls, callback):
        """Unregister `callback`; the last one out puts Keras's train function back."""
        hook = callback.model.train_function
        if isinstance(hook, cls):
            hook.callbacks = [c for c in hook.callbacks if c is not callback]
            if not hook.callbacks:
                callback.model.train_function = hook.original

    def __call__(self, iterator):
        logs = self.original(iterator)
        self.started, self.calls = True, self.calls + 1
        if self.calls != self.calls_per_epoch:
            return logs
        logs = dict(logs)
        for callback in self.callbacks:
            logs.update(callback.epoch_end_logs())
        return logs


def _parse_every(every, name):
    """"epoch", a positive int (every n steps), or a list of times (epochs or kerasntk durations)."""
    if isinstance(every, str) and every == "epoch":
        return "epoch"
    if isinstance(every, (int, np.integer)) and not isinstance(every, bool) and every >= 1:
        return int(every)
    if isinstance(every, (list, tuple, np.ndarray)) and len(every):
        return [cfg.parse_duration(t, f"{name} time") for t in every]
    raise ValueError(f"{name}: times {every!r} not allowed; allowed: 'epoch', a positive int (every n steps), "
                     "or a non-empty list of times in epochs (0.5, 2) or steps ('100it')")


def _needs_step_resolution(every):
    """True unless every time falls on an epoch end (only then can batch hooks be left alone)."""
    if every == "epoch":
        return False
    if isinstance(every, int):
        return True
    return any(d.unit == "it" or d.value != int(d.value) for d in every)


# -- NTKMonitor ---------------------------------------------------------------------------------------------


class NTKMonitor(_Timed):
    """Empirical NTK of the model on a fixed probe set during `fit`, with kernel metrics in `logs` and NetCDF.

    x_probe, y_probe: probe inputs and labels (integer (N,) or one-hot (N, C); None: no alignment).
    every: "epoch" (at the start and after every epoch), an int n (every n optimizer steps), or a list
      of times in epochs (fractional allowed) or steps ("100it").
    velocity_dt: the kernel velocity's time step, in epochs or steps ("3it"), as the experiment's
      `ntk.velocity_dt`; None: to the next measurement.
    trace_axes, implementation, batch_size: as `kerasntk.ntk.empirical_ntk_fn`.
    test_data: (x, y) with integer labels: at every measurement also `test_error` and `test_loss`, computed by
      `kerasntk.evaluation.Evaluator` in batches of `eval_batch_size` (as the trainer's history and the
      experiment's `parent`), into the file (not into `logs`, where Keras puts its own validation).
    path: NetCDF file (kerasntk schema: `parent(time, metric)`, `kernel_distance(time, time_b)`, and
      with keep_kernels `ntk(time, probe, probe_b[, logit, logit_b])`), written atomically after every
      `write_every` measurements and at the end of training; `flush()` writes it on demand.
    verbose: 1 prints one line per measurement.

    The metrics are those of `kerasntk.ntk.KernelTrajectory`, the same names and values as `kerasntk ntk`
    writes for the same kernels. The velocity is the forward difference v(t) = S(K_t, K_{t+dt}) / dt, known
    once the kernel at t + dt is measured. Into `logs` at every epoch end (NaN before the first measurement):
    `ntk_velocity`, the latest v(t) known (with velocity_dt None: S(K_prev, K_now) / (t_now − t_prev), the
    velocity of the previous measurement), `ntk_distance_from_init` = S(K_first, K_now), `ntk_alignment`
    (centred, NaN without labels), `ntk_effective_rank`. Kernels are kept in memory (T·N²·8 bytes for the
    trace kernel) to form S(t, t').
    """

    logged = True

    def __init__(self, x_probe, y_probe=None, *, every="epoch", velocity_dt=None, trace_axes=(-1,),
                 implementation="auto", batch_size=None, test_data=None, eval_batch_size=1000, path=None,
                 keep_kernels=False, write_every=1, verbose=0):
        super().__init__(every, "NTKMonitor")
        self.test_data = None if test_data is None else _xy(test_data, "test_data", "NTKMonitor")
        self.eval_batch_size = eval_batch_size
        self.x_probe = np.asarray(x_probe)
        self.y_probe = None if y_probe is None else np.asarray(y_probe)
        if self.y_probe is not None and len(self.y_probe) != len(self.x_probe):
            raise ValueError(f"NTKMonitor: y_probe has {len(self.y_probe)} entries but x_probe {len(self.x_probe)}")
        if not isinstance(write_every, (int, np.integer)) or write_every < 1:
            raise ValueError(f"NTKMonitor: write_every={write_every!r} must be a positive integer (measurements)")
        self.velocity_dt = None if velocity_dt is None else cfg.parse_duration(velocity_dt, "NTKMonitor velocity_dt")
        if self.velocity_dt is not None and self.velocity_dt.value <= 0:
            raise ValueError(f"NTKMonitor: velocity_dt={velocity_dt!r} must be a time > 0 or None")
        self.trace_axes, self.implementation, self.batch_size = tuple(trace_axes), implementation, batch_size
        self.path, self.keep_kernels, self.write_every, self.verbose = path, keep_kernels, int(write_every), verbose
        self.steps, self.trajectory, self.test_scores = [], None, []
        self._ntk_fn, self._evaluator, self._attrs = None, None, None

    @property
    def kernels(self):
        """The kernels measured so far."""
        return self.trajectory.kernels if self.trajectory else []

    @property
    def times(self):
        """The times (epochs) of the measurements so far."""
        return self.trajectory.times if self.trajectory else []

    def on_train_begin(self, logs=None):
        if self._ntk_fn is None:
            self._ntk_fn = ntk.empirical_ntk_fn(self.model, trace_axes=self.trace_axes,
                                                implementation=self.implementation, batch_size=self.batch_size)
            self._evaluator = Evaluator(self.model, self.eval_batch_size)
            self._attrs = results.global_attrs(self._settings(), {})
        super().on_train_begin(logs)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self.flush()

    def latest(self):
        """The logged scalars ({LOG_KEYS: NaN} before the first measurement)."""
        if not self.trajectory:
            return dict.fromkeys(LOG_KEYS, float("nan"))
        metrics = self.trajectory.metrics()
        known = np.flatnonzero(np.isfinite(metrics["kernel_velocity"]))
        nan = np.full(len(self.trajectory), np.nan)
        return dict(ntk_velocity=float(metrics["kernel_velocity"][known[-1]]) if len(known) else float("nan"),
                    ntk_distance_from_init=float(metrics["kernel_distance_from_init"][-1]),
                    ntk_alignment=float(metrics.get("kernel_alignment", nan)[-1]),
                    ntk_effective_rank=float(metrics["kernel_effective_rank"][-1]))

    def _act(self, step, logs):
        start = _time.perf_counter()
        if self.trajectory is None:
            dt = None if self.velocity_dt is None else self.epochs(self.velocity_dt.steps(self.steps_per_epoch))
            self.trajectory = ntk.KernelTrajectory(self.y_probe, dt)
        K = np.asarray(self._ntk_fn(self.x_probe), np.float64)
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.trajectory.add(self.epochs(step), K, lr)
        self.steps.append(step)
        if self.test_data is not None:
            self.test_scores.append(self._evaluator(*self.test_data))
        if self.verbose:
            print(f"NTKMonitor: epoch {self.times[-1]:g} (step {step}): "
                  + ", ".join(f"{k} {v:.4g}" for k, v in self.latest().items())
                  + f" ({_time.perf_counter() - start:.2f} s)", flush=True)
        if len(self.steps) % self.write_every == 0:
            self.flush()

    def dataset(self):
        """The measurements so far as an xarray.Dataset in the kerasntk results schema."""
        if not self.trajectory:
            raise ValueError("NTKMonitor has no measurement yet")
        metrics = dict(self.trajectory.metrics(), learning_rate=np.array(self.trajectory.learning_rates))
        if self.test_scores:
            metrics.update({f"test_{k}": np.array([t[k] for t in self.test_scores]) for k in ("error", "loss")})
        ds = results.parent_dataset(self.steps, np.array(self.times), metrics,
                                    kernel_distance=self.trajectory.distance_matrix(), attrs=self._attrs)
        if self.keep_kernels:
            dims = ("time", "probe", "probe_b") + (() if self.kernels[0].ndim == 2 else ("logit", "logit_b"))
            ds["ntk"] = (dims, np.stack(self.kernels))
            ds["ntk"].attrs.update(long_name="empirical NTK of the model on the probe set", units="1")
        return ds

    def flush(self):
        """Write the measurements so far to `path` atomically (no-op without a path or a measurement)."""
        if self.path and self.trajectory:
            results.write_atomic(self.dataset(), self.path)

    def _settings(self):
        every = self._every if not isinstance(self._every, list) else [str(d) for d in self._every]
        return dict(callback="NTKMonitor", every=every, trace_axes=list(self.trace_axes),
                    velocity_dt=None if self.velocity_dt is None else str(self.velocity_dt),
                    implementation=self._ntk_fn.implementation, batch_size=self.batch_size,
                    probe_size=len(self.x_probe), model=self.model.name)


# -- HessianMonitor -----------------------------------------------------------------------------------------


class HessianMonitor(_Timed):
    """The training loss's curvature on a fixed subset during `fit` (`kerasntk.hessian`): the top Hessian
    eigenvalue (sharpness; gradient descent is unstable above 2/lr) and the Hessian trace.

    x, y: the subset (integer labels), e.g. `kerasntk.data.probe_subset(x_train, y_train, 512, seed=0)`.
    every: as `NTKMonitor`. weight_decay: a coupled L2 coefficient to add as kerasntk's trainer does
      (½·λ‖w‖²; 0 when the model trains without one; Keras regularizer losses are not included).
    batch_size, strategy: as `kerasntk.hessian.hvp_fn`. lanczos_steps: Lanczos steps for the eigenvalue;
      num_probes: Hutchinson probes for the trace; seed: of both.
    path, write_every, verbose: as `NTKMonitor`; the file holds `parent(time, metric)` with the three
      logged metrics and the learning rate.

    Into `logs` at every epoch end (the latest measurement; NaN before the first): `hessian_top_eigenvalue`,
    `hessian_trace`, `hessian_trace_stderr` (Hutchinson's standard error). Each measurement costs
    lanczos_steps + num_probes Hessian-vector products over the subset, about 2-3 gradients each.
    """

    logged = True

    def __init__(self, x, y, *, every="epoch", weight_decay=0.0, batch_size=256, strategy=None, lanczos_steps=20,
                 num_probes=20, seed=0, path=None, write_every=1, verbose=0):
        super().__init__(every, "HessianMonitor")
        self.x, self.y = np.asarray(x), np.asarray(y)
        for name, value in (("lanczos_steps", lanczos_steps), ("num_probes", num_probes), ("write_every", write_every)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"HessianMonitor: {name}={value!r} must be a positive integer")
        self.weight_decay, self.batch_size, self.strategy = float(weight_decay), batch_size, strategy
        self.lanczos_steps, self.num_probes, self.seed = int(lanczos_steps), int(num_probes), int(seed)
        self.path, self.write_every, self.verbose = path, int(write_every), verbose
        self.steps, self.times, self.rows = [], [], []
        self._hvp, self._attrs = None, None

    def on_train_begin(self, logs=None):
        if self._hvp is None:
            self._hvp = hessian.hvp_fn(self.model, self.x, self.y, weight_decay=self.weight_decay,
                                       batch_size=self.batch_size, strategy=self.strategy)
            self._attrs = results.global_attrs(self._settings(), dict(seed=self.seed))
        super().on_train_begin(logs)

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        self.flush()

    def latest(self):
        """The logged scalars of the latest measurement (NaN before the first)."""
        if not self.rows:
            return dict.fromkeys(HESSIAN_LOG_KEYS, float("nan"))
        return {k: self.rows[-1][k] for k in HESSIAN_LOG_KEYS}

    def _act(self, step, logs):
        start = _time.perf_counter()
        top = hessian.top_eigenvalues(self._hvp, 1, self.lanczos_steps, self.seed)[0]
        estimate, stderr = hessian.trace(self._hvp, self.num_probes, self.seed)
        row = dict(hessian_top_eigenvalue=float(top), hessian_trace=estimate, hessian_trace_stderr=stderr,
                   learning_rate=float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        self.steps.append(step)
        self.times.append(self.epochs(step))
        self.rows.append(row)
        if self.verbose:
            print(f"HessianMonitor: epoch {self.times[-1]:g} (step {step}): "
                  + ", ".join(f"{k} {v:.4g}" for k, v in row.items()) + f" ({_time.perf_counter() - start:.2f} s)",
                  flush=True)
        if len(self.rows) % self.write_every == 0:
            self.flush()

    def dataset(self):
        """The measurements so far as an xarray.Dataset `parent(time, metric)` in the kerasntk results schema."""
        if not self.rows:
            raise ValueError("HessianMonitor has no measurement yet")
        metrics = {k: np.array([r[k] for r in self.rows]) for k in (*HESSIAN_LOG_KEYS, "learning_rate")}
        return results.parent_dataset(self.steps, np.array(self.times), metrics, attrs=self._attrs)

    def flush(self):
        """Write the measurements so far to `path` atomically (no-op without a path or a measurement)."""
        if self.path and self.rows:
            results.write_atomic(self.dataset(), self.path)

    def _settings(self):
        every = self._every if not isinstance(self._every, list) else [str(d) for d in self._every]
        return dict(callback="HessianMonitor", every=every, weight_decay=self.weight_decay,
                    batch_size=self.batch_size, subset_size=len(self.x), lanczos_steps=self.lanczos_steps,
                    num_probes=self.num_probes, model=self.model.name)


# -- SpawnCheckpoint ----------------------------------------------------------------------------------------


class SpawnCheckpoint(_Timed):
    """Checkpoints at spawn times, in a run directory that `kerasntk spawn` starts children from.

    times: spawn times, in epochs (fractional allowed) or steps ("100it"); step 0 and the end of
      training are always saved too (children compare themselves with the parent's final weights).
    directory: the run directory. Written: config.json (a kerasntk Config: model "keras_file",
      data "npz", the optimizer's learning rate and momentum, the batch size, train.length = the steps
      trained), model.keras, data.npz (when `data` is arrays) and parent/checkpoints/step_XXXXXXXX/.
    data: (x_train, y_train, x_test, y_test) as passed to fit (inputs standardized per channel with the
      training set's mean and std, as kerasntk's loader does), or the path of such an .npz.
    batch_size: the batch size given to fit (children train with it).
    children, reset_momentum: config.spawn fields. data_seed: the children's base data-order seed.

    Requirements (checked when fit starts, ValueError otherwise): the optimizer is
    keras.optimizers.SGD without nesterov and weight_decay, with a constant learning rate or a
    `kerasntk.training.Schedule` whose total_steps equal the planned steps; the loss is
    SparseCategoricalCrossentropy(from_logits=True); the optimizer starts at step 0.
    Children then run `kerasntk spawn DIRECTORY --time T --child C` with T one of the saved times.
    """

    def __init__(self, times, directory, *, data, batch_size, children=3, reset_momentum=False, data_seed=0):
        super().__init__(times, "SpawnCheckpoint")
        if self._every == "epoch" or isinstance(self._every, int):
            raise ValueError(f"SpawnCheckpoint: times must be a list of epochs or steps, got {times!r}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"SpawnCheckpoint: batch_size={batch_size!r} must be the positive batch size given to fit")
        self.directory, self.data, self.batch_size = fs.absolute(directory), data, int(batch_size)
        self.children, self.reset_momentum, self.data_seed = int(children), bool(reset_momentum), int(data_seed)
        self.spawned = []

    def on_train_begin(self, logs=None):
        self._lr = _sgd_settings(self.model)
        if self._step() != 0:
            raise ValueError(f"SpawnCheckpoint: the optimizer is at step {self._step()}; a run directory starts "
                             "at step 0 (use a fresh optimizer)")
        self._run = rundir.RunDir(self.directory)
        if self._run.parent.checkpoint_steps():
            raise ValueError(f"SpawnCheckpoint: {self.directory!r} already holds the checkpoints of a run; "
                             "give each run its own directory")
        self._optimizer = _children_optimizer(self.model)
        self._checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self._optimizer)
        fs.makedirs(self.directory)
        self._data_path, self._n_train = self._write_data()
        with fs.atomic_file(self._run.model_file) as tmp:  # a kill never leaves half a model
            self.model.save(tmp)
        super().on_train_begin(logs)
        _warn_if_epochs_differ(self.steps_per_epoch, data.steps_per_epoch(self._n_train, self.batch_size))
        planned = self.params.get("epochs", 0) * self.steps_per_epoch
        self._check_schedule(planned)
        self._write_config(planned, [s for s in self._targets if s <= planned])
        self._save(0)

    def on_train_end(self, logs=None):
        step = self._step()
        self._save(step)
        self._write_config(step, self.spawned)

    def _act(self, step, logs):
        self._save(step)
        self.spawned.append(step)

    def _save(self, step):
        """Write the checkpoint of `step` in the run directory's format (as the Trainer's grid checkpoints)."""
        _copy_sgd_state(self.model.optimizer, self._optimizer)
        spe = data.steps_per_epoch(self._n_train, self.batch_size)
        epoch, batch = divmod(step, spe)
        self._run.parent.save_checkpoint(self._checkpoint, step, dict(
            time=step / spe, epoch=epoch, batch=batch, data_seed=self.data_seed, augment_seed=0, steps_per_epoch=spe,
            learning_rate=float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))))

    def _write_data(self):
        """(path, training-set size) of data.npz, written from arrays (or the given path), checked to hold what
        kerasntk's loader hands the children."""
        given = self.data
        if isinstance(given, (str, os.PathLike)):
            path = fs.absolute(given)
        else:
            if len(given) != 4:
                raise ValueError("SpawnCheckpoint: data must be (x_train, y_train, x_test, y_test) or an .npz path")
            path = self._run.data_file
            with fs.atomic_file(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **dict(zip(("x_train", "y_train", "x_test", "y_test"), map(np.asarray, given))))
        arrays = data.load_arrays("npz", path=path)
        with np.load(path) as f:
            raw = f["x_train"]
        if raw.shape != arrays.x_train.shape or not np.allclose(raw, arrays.x_train, atol=1e-3, rtol=1e-3):
            raise ValueError("SpawnCheckpoint: children standardize inputs per channel with the training set's mean "
                             "and std (kerasntk.data), so train on standardized inputs (N, ..., C): "
                             "x = (x - x_train.mean(all axes but the last)) / x_train.std(the same axes)")
        return path, len(arrays.x_train)

    def _check_schedule(self, planned):
        if isinstance(self._lr, training.Schedule) and self._lr.total_steps != planned:
            raise ValueError(f"SpawnCheckpoint: the kerasntk Schedule decays over total_steps={self._lr.total_steps} "
                             f"but fit plans {planned} steps; children would follow another schedule")

    def _write_config(self, length, spawn_steps):
        """config.json: what `kerasntk spawn` needs to rebuild the parent's model, optimizer and data."""
        lr = self._lr
        schedule = dict(lr=lr.base_lr, schedule=lr.kind, warmup=f"{lr.warmup_steps}it", gamma=lr.gamma,
                        milestones=[f"{m}it" for m in lr.milestones]) if isinstance(lr, training.Schedule) \
            else dict(lr=lr, schedule="constant")
        config = cfg.from_dict(dict(
            data=dict(name="npz", path=self._run.own_file(self._data_path), augment=False),
            model=dict(name="keras_file", options=dict(path=self._run.own_file(self._run.model_file))),
            train=dict(length=f"{max(length, 1)}it", batch_size=self.batch_size,
                       momentum=float(self.model.optimizer.momentum), weight_decay=0.0, data_seed=self.data_seed,
                       **schedule),
            checkpoints=dict(times=[], log_num=0, every=None),
            spawn=dict(times=[f"{s}it" for s in sorted(set(spawn_steps))], children=self.children,
                       reset_momentum=self.reset_momentum),
            linearize=dict(times=[])))
        cfg.validate(config)
        self._run.write_config(config)


def _warn_if_epochs_differ(keras_steps, kerasntk_steps):
    """Keras counts a last partial batch, kerasntk (and so the children and `kerasntk spawn --time`) does not."""
    if keras_steps != kerasntk_steps:
        warnings.warn(f"SpawnCheckpoint: fit runs {keras_steps} steps per epoch but kerasntk counts {kerasntk_steps} "
                      "(it drops the last partial batch), so kerasntk's epoch labels differ from Keras's; pass "
                      "times to `kerasntk spawn --time` in steps ('<n>it', see config.json spawn.times), or use "
                      "a batch size dividing the training set size", stacklevel=2)


def _children_optimizer(model):
    """An SGD built as `training.build_model_and_optimizer` builds the children's: its learning rate is a
    Schedule (no learning-rate variable), so the checkpoint's optimizer object graph is the one they restore.
    The user's optimizer may hold a learning-rate variable, which would shift the slot indices."""
    with model.distribute_strategy.scope():
        optimizer = keras.optimizers.SGD(learning_rate=training.Schedule(1.0, 1, "constant"),
                                         momentum=model.optimizer.momentum)
        optimizer.build(model.trainable_variables)
        model.optimizer.build(model.trainable_variables)  # as its first step would (no-op when built)
    return optimizer


def _copy_sgd_state(source, target):
    """Step and momentum slots of SGD `source` into SGD `target` (built on the same variables)."""
    target.iterations.assign(source.iterations)
    for a, b in zip(target.momentums, source.momentums, strict=True):
        a.assign(b)


def _sgd_settings(model):
    """The optimizer's learning rate (float or kerasntk Schedule), after checking children can reproduce it."""
    opt = model.optimizer
    if type(opt) is not keras.optimizers.SGD:
        raise ValueError(f"SpawnCheckpoint: children train with keras.optimizers.SGD (momentum allowed); "
                         f"the model's optimizer is {type(opt).__name__}")
    if opt.nesterov or opt.weight_decay:
        raise ValueError("SpawnCheckpoint: SGD with nesterov=True or weight_decay is not supported; allowed: "
                         f"SGD(learning_rate, momentum) (got nesterov={opt.nesterov}, weight_decay={opt.weight_decay})")
    lr = opt._learning_rate
    if isinstance(lr, keras.optimizers.schedules.LearningRateSchedule) and not isinstance(lr, training.Schedule):
        raise ValueError(f"SpawnCheckpoint: learning-rate schedule {type(lr).__name__} is not supported; allowed: a "
                         "constant learning rate or kerasntk.training.Schedule (constant, cosine, step; warmup)")
    loss = getattr(model, "loss", None)
    if not (isinstance(loss, keras.losses.SparseCategoricalCrossentropy) and loss.get_config().get("from_logits")):
        raise ValueError("SpawnCheckpoint: children minimise softmax cross-entropy on logits; compile with "
                         f"loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True) (got {loss!r})")
    if isinstance(lr, training.Schedule):
        return lr
    return float(np.format_float_positional(np.float32(keras.ops.convert_to_numpy(lr))))  # 0.05, not 0.0500000007


# -- LandscapeProbe -----------------------------------------------------------------------------------------


class LandscapeProbe(keras.callbacks.Callback):
    """At the end of training: barriers, disagreement and distances between the model and reference weights.

    reference: a `.weights.h5` file (model.save_weights), a kerasntk checkpoint directory
      (RUN_DIR/parent/checkpoints/step_X or any directory holding `ckpt.index`), or a weight set
      (list of arrays in model.weights order), e.g. a sibling run of the same architecture.
    test_data, train_data: (x, y) with integer labels; barriers on both, disagreement on test.
    alphas, bn, bn_x, batch_size: as `kerasntk.landscape.compare` (bn_x defaults to train_data's x).
    path: NetCDF file with `pair(time, child_pair, metric)` and `path(time, child_pair, alpha, metric)`,
      spawn_a = 0 the trained model (alpha 0), spawn_b = 1 the reference (alpha 1).

    Runs after the last epoch's last train step, so the scalars (error_barrier, loss_barrier,
    train_error_barrier, train_loss_barrier, disagreement, js_divergence, weight_distance,
    cosine_similarity) are in that epoch's logs for every callback (History, CSVLogger, TensorBoard; NaN in
    the epochs before); if
    training stops early it runs in `on_train_end` (NetCDF and `self.scalars` only). Model weights are left
    as trained.
    """

    def __init__(self, reference, test_data, train_data, *, alphas=11, bn="reestimate", bn_x=None,
                 batch_size=512, path=None):
        super().__init__()
        self.reference, self.path, self.batch_size = reference, path, int(batch_size)
        self.test_data = _xy(test_data, "test_data", "LandscapeProbe")
        self.train_data = _xy(train_data, "train_data", "LandscapeProbe")
        self.alphas = np.linspace(0.0, 1.0, alphas) if isinstance(alphas, (int, np.integer)) else np.asarray(alphas)
        self.bn, self.bn_x = bn, bn_x
        self.scalars, self.curves = None, None

    def on_train_begin(self, logs=None):
        self.scalars, self.curves, self._epoch = None, None, None
        _EpochEndLogs.attach(self)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        _EpochEndLogs.epoch_begins(self)

    def on_epoch_end(self, epoch, logs=None):
        if self._last_epoch(epoch) and self.scalars is None:  # the epoch ended early: not measured at its last step
            self.measure()
        if logs is not None:
            logs.update(self._logged(epoch))

    def on_train_end(self, logs=None):
        _EpochEndLogs.detach(self)
        if self.scalars is None:
            self.measure(None)

    def epoch_end_logs(self):
        """Measure after the last epoch's last step (called by `_EpochEndLogs`); the values for the epoch's logs."""
        if self._last_epoch(self._epoch):
            self.measure()
        return self._logged(self._epoch)

    def _logged(self, epoch):
        """The scalars in the last epoch, NaN before it (CSVLogger fixes its columns at the first epoch)."""
        return dict(self.scalars) if self._last_epoch(epoch) else dict.fromkeys(LANDSCAPE_LOG_KEYS, float("nan"))

    def _last_epoch(self, epoch):
        return bool(self.params) and epoch is not None and epoch + 1 == self.params.get("epochs")

    def measure(self, logs=None):
        """Compare the current weights with the reference now; returns the scalars (also into logs, path)."""
        w_model = self.model.get_weights()
        w_ref = _reference_weights(self.model, self.reference)
        (x_test, y_test), (x_train, y_train) = self.test_data, self.train_data
        self.scalars, self.curves = landscape.compare(
            self.model, w_model, w_ref, x_test=x_test, y_test=y_test, x_train=x_train, y_train=y_train,
            alphas=self.alphas, bn=self.bn, bn_x=self.bn_x, batch_size=self.batch_size)
        self.scalars.pop("relative_weight_distance")  # NaN: no parent travel to divide by
        if logs is not None:
            logs.update(self.scalars)
        if self.path:
            self._write()
        return self.scalars

    def _write(self):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        spe = self.params.get("steps") if self.params else None
        t = step / spe if spe else float(step)
        ds = results.pair_dataset(step, t, [(0, 1)], {k: np.array([v]) for k, v in self.scalars.items()},
                                  self.alphas, {k: v[None] for k, v in self.curves.items()},
                                  attrs=results.global_attrs(dict(callback="LandscapeProbe", bn=self.bn,
                                                                  reference=_describe(self.reference)), {}))
        results.write_atomic(ds, self.path)


def _xy(pair, name, owner):
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{owner}: {name} must be a pair (x, y) of arrays with integer labels y")
    return np.asarray(pair[0]), np.asarray(pair[1])


def _describe(reference):
    return os.fspath(reference) if isinstance(reference, (str, os.PathLike)) else "weights given in memory"


def _reference_weights(model, reference):
    """The reference as a weight set of `model`, read by loading it into the model, then restoring the model's
    weights and optimizer state."""
    if isinstance(reference, (list, tuple)):
        return [np.asarray(w) for w in reference]
    path = os.fspath(reference)
    current = model.get_weights()
    optimizer_state = [v.numpy() for v in model.optimizer.variables] if model.optimizer else []
    try:
        if path.endswith(".weights.h5"):
            model.load_weights(path)
        elif rundir.is_checkpoint_dir(path):
            rundir.read_checkpoint_dir(tf.train.Checkpoint(model=model), path, partial=True)
        else:
            raise ValueError(f"LandscapeProbe: reference {path!r} is neither a .weights.h5 file nor a kerasntk "
                             "checkpoint directory (holding meta.json); allowed: those two or a list of weight arrays")
        return model.get_weights()
    finally:  # load_weights also restores optimizer variables saved with the reference
        model.set_weights(current)
        for variable, value in zip(model.optimizer.variables if model.optimizer else [], optimizer_state):
            variable.assign(value)
