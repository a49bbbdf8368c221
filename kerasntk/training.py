"""The trainer: a custom distributed train step, LR schedules, grid checkpoints and automatic resume.

A training job's files (checkpoints, resume state, history) live in a `rundir.JobDir`. Batches are a pure
function of (data seed, epoch, batch index), so a job killed at any point and restarted from its last
resume checkpoint replays exactly the same steps.
"""

import contextlib
import logging
import math
import os
import random
import signal
import sys
import threading
import time

import keras
import numpy as np
import tensorflow as tf

from kerasntk import data, faults, models, summaries
from kerasntk.evaluation import Evaluator

log = logging.getLogger(__name__)


@keras.saving.register_keras_serializable("kerasntk")
class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup, then constant, cosine decay to 0 at `total_steps`, or steps down by `gamma` at milestones."""

    def __init__(self, base_lr, total_steps, kind="cosine", warmup_steps=0, milestones=(), gamma=0.1):
        self.base_lr, self.total_steps, self.kind = float(base_lr), int(total_steps), kind
        self.warmup_steps, self.milestones, self.gamma = int(warmup_steps), tuple(int(m) for m in milestones), float(gamma)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        if self.kind == "cosine":
            span = float(max(self.total_steps - self.warmup_steps, 1))
            progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
            lr = 0.5 * self.base_lr * (1.0 + tf.cos(math.pi * progress))
        elif self.kind == "step":
            passed = tf.add_n([tf.cast(step >= m, tf.float32) for m in self.milestones] or [tf.zeros(())])
            lr = self.base_lr * tf.pow(self.gamma, passed)
        else:
            lr = tf.constant(self.base_lr)
        if self.warmup_steps:
            lr = lr * tf.minimum(1.0, (step + 1.0) / self.warmup_steps)
        return lr

    def get_config(self):
        return dict(base_lr=self.base_lr, total_steps=self.total_steps, kind=self.kind,
                    warmup_steps=self.warmup_steps, milestones=self.milestones, gamma=self.gamma)


class EpochLines:
    """A job's per-epoch lines: every epoch on a terminal or with verbose 2 (-v); into a file or a pipe, the last
    epoch and otherwise at most one line per `every` seconds, so a log grows with wall time, not with jobs × epochs
    (the default run has ~700 child and linearized epochs; every epoch is in history.json and TensorBoard)."""

    def __init__(self, verbose, every=30.0):
        self.verbose, self.every = verbose, every
        self.each = verbose > 1 or sys.stdout.isatty()
        self.printed = time.monotonic()

    def __call__(self, line, last):
        now = time.monotonic()
        if self.verbose and (self.each or last or now - self.printed >= self.every):
            print(line, flush=True)
            self.printed = now


class Preempted(RuntimeError):
    """Training stopped on SIGTERM after saving a resume checkpoint; run the job again to continue."""


class Diverged(RuntimeError):
    """The training loss became NaN or infinite; nothing after the last finite chunk is saved."""


class Trainer:
    """Trains one network (a parent or a child) under a strategy, with grid checkpoints and resume.

    model, optimizer: built inside `strategy.scope()` (`build_model_and_optimizer`).
    arrays: `kerasntk.data.Arrays`. job: the `rundir.JobDir` holding this job's checkpoints and history.
    train: the config's train section (batch size, weight decay, steps per execution, XLA, eval batch).
    total_steps, steps_per_epoch: from the run's `Grid`. augment: the data section's augmentation setting.
    data_seed, augment_seed: this network's seeds (children have their own).
    name: how log lines and errors name the job. summary_dir: where each epoch's row also goes as a TensorBoard
    event file (`summaries.write_epoch`; None: nowhere).
    """

    def __init__(self, model, optimizer, arrays, job, *, train, total_steps, steps_per_epoch, data_seed,
                 augment_seed, augment=None, strategy=None, name="training", summary_dir=None):
        self.model, self.optimizer, self.arrays, self.job, self.train_config = model, optimizer, arrays, job, train
        self.total_steps, self.steps_per_epoch = int(total_steps), int(steps_per_epoch)
        self.data_seed, self.augment_seed, self.augment, self.name = int(data_seed), int(augment_seed), augment, name
        self.summary_dir = summary_dir
        self.strategy = strategy or tf.distribute.get_strategy()
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer)
        self.history = []
        self._partial = np.zeros(3)  # (loss sum, correct, count) of the current epoch so far
        self._last_finite_loss = None
        self._run_chunk = self._make_chunk_fn()
        self.evaluator = Evaluator(model, train.eval_batch_size, strategy=self.strategy,
                                   jit_compile=use_xla(train.jit_compile, self.strategy))

    @property
    def step(self):
        return int(self.optimizer.iterations.numpy())

    def epoch(self, step=None):
        """Time in epochs of `step` (default: the current step)."""
        return (self.step if step is None else step) / self.steps_per_epoch

    # -- state -------------------------------------------------------------------------------------------

    def restore(self, start_from=None, reset_momentum=False, before=None):
        """Resume from this job's latest checkpoint (resume or grid) at or before step `before` (default: any);
        else start from `start_from` (a (JobDir, step) grid checkpoint, e.g. the parent's at a spawn time); else
        from init. Returns the step. (`before` re-creates a missing grid checkpoint from the one preceding it.)"""
        own = self.job.latest_checkpoint(before)
        if own:
            step, kind = own
            meta = self.job.read_checkpoint(self.checkpoint, step, kind=kind)
            self._partial = np.array(meta.get("epoch_totals", [0.0, 0.0, 0.0]))
            self.history = self.job.read_history()
            log.info("%s: resumed at step %d", self.name, self.step)
        elif start_from:
            source, step = start_from
            source.read_checkpoint(self.checkpoint, step)
            if reset_momentum:
                for slot in self.optimizer.momentums:
                    slot.assign(tf.zeros_like(slot))
            log.info("%s: started from %s step %d", self.name, source.path, self.step)
        return self.step

    def save_grid_checkpoint(self):
        """Write a permanent checkpoint of the current step (weights, optimizer, step, data position)."""
        return self.job.save_checkpoint(self.checkpoint, self.step, self._meta())

    def _save_resume(self):
        self.job.write_history(self.history)
        self.job.save_checkpoint(self.checkpoint, self.step, self._meta(), kind="resume")

    def _meta(self):
        """A checkpoint's metadata: time, data position, learning rate and the running epoch's partial sums (so
        any checkpoint, grid or resume, can be resumed from)."""
        epoch, batch = divmod(self.step, self.steps_per_epoch)
        ended = batch == 0 or self.step == self.total_steps  # the next step starts an epoch: nothing running
        return dict(time=self.epoch(), epoch=epoch, batch=batch, data_seed=self.data_seed,
                    augment_seed=self.augment_seed, steps_per_epoch=self.steps_per_epoch,
                    learning_rate=float(self.optimizer.learning_rate.numpy()),
                    epoch_totals=[0.0, 0.0, 0.0] if ended else self._partial.tolist())

    # -- the loop ----------------------------------------------------------------------------------------

    def train(self, until=None, save_steps=(), verbose=1):
        """Train to step `until` (default: the end), saving grid checkpoints at `save_steps` and resume
        checkpoints at every epoch end. Returns the history (one dict per completed epoch).

        SIGTERM (a preemption, a cancelled Ray task) saves a resume checkpoint at the next chunk boundary
        and raises `Preempted`; a NaN or infinite loss raises `Diverged`.
        """
        until = self.total_steps if until is None else until
        save_steps = sorted(set(s for s in save_steps if self.step <= s <= until))
        if self.step in save_steps:
            self.save_grid_checkpoint()
        lines = EpochLines(verbose)
        with deterministic_ops(self.train_config.deterministic), _sigterm_flag() as stop:
            while self.step < until:
                epoch, batch = divmod(self.step, self.steps_per_epoch)
                epoch_end = min((epoch + 1) * self.steps_per_epoch, until)
                self._train_epoch_part(epoch, batch, epoch_end, save_steps, verbose, stop)
                if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                    self._end_epoch(lines)
        return self.history

    def _train_epoch_part(self, epoch, batch, stop_step, save_steps, verbose, stop):
        """Run steps from the current one to `stop_step` within `epoch`, checkpointing on the grid on the way."""
        t = self.train_config
        batches = data.train_batches(self.arrays, batch_size=t.batch_size, epoch=epoch, order_seed=self.data_seed,
                                     augment_seed=self.augment_seed, start_batch=batch, augment=self.augment)
        iterator = iter(self.strategy.experimental_distribute_dataset(batches))
        # Keras's bar redraws with \r and ANSI codes wherever it writes: only on a terminal (else the epoch line)
        interactive = verbose and sys.stdout.isatty()
        bar = keras.utils.Progbar(self.steps_per_epoch, verbose=verbose, unit_name="step") if interactive else None
        while self.step < stop_step:
            next_save = min([s for s in save_steps if s > self.step] + [stop_step])
            n = min(t.steps_per_execution, next_save - self.step)
            before = self.step
            chunk = self._run_chunk(iterator, tf.constant(n)).numpy()
            self._check_finite(chunk, before)
            self._partial += chunk
            if self.step in save_steps:
                self.save_grid_checkpoint()
            faults.at(self.name, "step", self.step)
            if stop:
                self._save_resume()
                raise Preempted(f"{self.name}: stopped by SIGTERM at step {self.step} (epoch {self.epoch():.3f}); "
                                "a resume checkpoint is saved, run the same command again to continue")
            if bar:
                totals = self._partial
                bar.update(self.step - epoch * self.steps_per_epoch,
                           [("loss", totals[0] / totals[2]), ("error", 1 - totals[1] / totals[2])])

    def _check_finite(self, chunk, first_step):
        if np.isfinite(chunk[0]) and not faults.diverges(self.name):
            self._last_finite_loss = chunk[0] / max(chunk[2], 1)
            return
        last = "none" if self._last_finite_loss is None else f"{self._last_finite_loss:.4g}"
        raise Diverged(f"{self.name}: the training loss is not finite in steps {first_step}-{self.step} "
                       f"(epoch {self.epoch(first_step):.3f}); last finite loss {last}; lower train.lr "
                       "or add train.warmup")

    def _end_epoch(self, lines):
        test = self.evaluator(self.arrays.x_test, self.arrays.y_test)
        totals, self._partial = self._partial, np.zeros(3)
        row = dict(epoch=self.epoch(), step=self.step, lr=float(self.optimizer.learning_rate.numpy()),
                   train_loss=totals[0] / max(totals[2], 1), train_error=1 - totals[1] / max(totals[2], 1),
                   test_loss=test["loss"], test_error=test["error"], wall_time=time.time())
        # one row per epoch end, replacing a row of the same step (a resumed job recomputes the same row)
        self.history = sorted([h for h in self.history if h["step"] != row["step"]] + [row], key=lambda h: h["step"])
        lines(f"epoch {self.epoch():g}/{self.epoch(self.total_steps):g}: "
              f"train loss {row['train_loss']:.4f} error {row['train_error']:.4f} | "
              f"test loss {row['test_loss']:.4f} error {row['test_error']:.4f}", last=self.step == self.total_steps)
        if self.summary_dir:  # before the resume checkpoint: a job killed in between rewrites the same file
            summaries.write_epoch(self.summary_dir, self.step, row)
        self._save_resume()

    # -- compiled functions -----------------------------------------------------------------------------

    def _make_chunk_fn(self):
        """A tf.function running n train steps from a distributed iterator; returns summed (loss, correct, count)."""
        t, model, optimizer, strategy = self.train_config, self.model, self.optimizer, self.strategy
        variables = model.trainable_variables
        replicas = strategy.num_replicas_in_sync

        def replica_step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
                loss = tf.nn.compute_average_loss(per_example, global_batch_size=t.batch_size)
                if t.weight_decay:
                    l2 = tf.add_n([tf.reduce_sum(tf.square(v)) for v in variables])
                    loss += 0.5 * t.weight_decay * l2 / replicas
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), tf.float32)
            return tf.stack([tf.reduce_sum(per_example), tf.reduce_sum(correct), tf.cast(tf.size(y), tf.float32)])

        if use_xla(t.jit_compile, strategy):
            replica_step = tf.function(replica_step, jit_compile=True)
        self.replica_step = replica_step

        @tf.function
        def run_chunk(iterator, n):
            totals = tf.zeros(3)
            for _ in tf.range(n):
                x, y = next(iterator)
                totals += strategy.reduce("SUM", strategy.run(replica_step, args=(x, y)), axis=None)
            return totals

        return run_chunk


def use_xla(jit_compile, strategy):
    """Whether train steps are XLA-compiled: "auto" means on accelerators only (on CPU, TensorFlow's
    oneDNN kernels train ResNet-20 about 2x as fast as XLA: BENCHMARKS.md); never across logical CPUs."""
    if _replicas_share_a_host_cpu(strategy):
        return False
    if jit_compile == "auto":
        return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))
    return bool(jit_compile)


def _replicas_share_a_host_cpu(strategy):
    """True for MirroredStrategy over logical CPUs, where XLA cannot reach the other replicas' variables
    (TF's known issue "tf.Variable on a different device"); those steps run as ordinary graphs."""
    if not isinstance(strategy, tf.distribute.MirroredStrategy):
        return False
    devices = strategy.extended.worker_devices
    return len(devices) > 1 and all("CPU" in d.upper() for d in devices)


def load_data(config):
    """The config's dataset as in-memory arrays."""
    d = config.data
    data_dir = os.path.expanduser(d.data_dir) if d.data_dir else None
    return data.load_arrays(d.name, data_dir=data_dir, path=d.path, seed=d.seed)


def sync_batchnorm(setting, strategy):
    """Whether BatchNorm statistics are synchronized: `model.sync_bn` true, or "auto" on several replicas."""
    return setting is True or (setting == "auto" and strategy.num_replicas_in_sync > 1)


def batchnorm_statistics(setting, strategy, batch_size):
    """In words, the examples each BatchNorm layer's training statistics are computed over."""
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return f"the batch of {batch_size} (one replica)"
    if sync_batchnorm(setting, strategy):
        return f"the global batch of {batch_size}, synchronized across {replicas} replicas"
    return f"each replica's {batch_size // replicas} of the global batch of {batch_size} ({replicas} replicas)"


def build_model_and_optimizer(config, arrays, grid, strategy):
    """The seeded model and its SGD-momentum optimizer (schedule on `grid`), built inside the strategy's scope."""
    t = config.train
    schedule = Schedule(t.lr, grid.total, t.schedule, warmup_steps=grid.warmup, milestones=grid.milestones,
                        gamma=t.gamma)
    with strategy.scope(), seeded(t.seed):
        model = models.get(config.model.name, arrays.input_shape, arrays.num_classes,
                           sync_bn=sync_batchnorm(config.model.sync_bn, strategy), **config.model.options)
        optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=t.momentum)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def build_trainer(config, arrays, grid, job, strategy, *, data_seed=None, augment_seed=None, name="training",
                  summary_dir=None):
    """A Trainer of the config's seeded model and optimizer on `arrays`, with the times of `grid` (a Grid),
    writing to `job` (a JobDir) and TensorBoard files to `summary_dir`; seeds default to the config's (children
    pass their own)."""
    t = config.train
    model, optimizer = build_model_and_optimizer(config, arrays, grid, strategy)
    return Trainer(model, optimizer, arrays, job, train=t, total_steps=grid.total,
                   steps_per_epoch=grid.steps_per_epoch, data_seed=t.data_seed if data_seed is None else data_seed,
                   augment_seed=t.augment_seed if augment_seed is None else augment_seed,
                   augment=config.data.augment, strategy=strategy, name=name, summary_dir=summary_dir)


@contextlib.contextmanager
def deterministic_ops(enabled):
    """TensorFlow op determinism on for the block when `enabled`, and as it was after: it is process-wide, and
    Keras drops a user's `compile(jit_compile=True)` while it is on."""
    from tensorflow.python.framework import config as tf_config  # the public API cannot read or undo it

    was_on = tf_config.is_op_determinism_enabled()
    if enabled and not was_on:
        tf_config.enable_op_determinism()
    try:
        yield
    finally:
        if enabled and not was_on:
            tf_config.disable_op_determinism()


@contextlib.contextmanager
def seeded(seed):
    """`keras.utils.set_random_seed(seed)` for the block, with the global random state it resets (Python,
    NumPy, TensorFlow's global seed and op-seed sequence, Keras's seed generator) restored after, so seeding a
    model leaves a user's later draws as they would have been."""
    from keras.src.backend.common import global_state
    from tensorflow.python.eager import context

    ctx, keras_keys = context.context(), ("global_random_seed", "global_seed_generator")
    saved = (random.getstate(), np.random.get_state(), ctx._seed, getattr(ctx, "_rng", None) and ctx._rng.getstate(),
             [global_state.get_global_attribute(k) for k in keras_keys])
    keras.utils.set_random_seed(seed)
    try:
        yield
    finally:
        py, npy, ctx._seed, rng, keras_values = saved
        random.setstate(py)
        np.random.set_state(npy)
        ctx._rng = None if rng is None else random.Random()
        if rng is not None:
            ctx._rng.setstate(rng)
        for key, value in zip(keras_keys, keras_values):
            global_state.set_global_attribute(key, value)


class _Flag:
    def __init__(self):
        self.raised = False

    def __bool__(self):
        return self.raised


@contextlib.contextmanager
def _sigterm_flag():
    """A flag raised by SIGTERM while the block runs (the previous handler is restored after). Signal
    handlers can only be installed in the main thread; elsewhere the flag never rises."""
    flag = _Flag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag.raised = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
