"""The trainer: a custom distributed train step, LR schedules, the checkpoint grid, and automatic resume.

A training job lives in a directory holding `resume/` (the latest in-run checkpoint, overwritten),
`checkpoints/step_XXXXXXXX/` (permanent grid checkpoints: model, optimizer slots, step, and `meta.json`
with the data position) and `history.json` (per-epoch losses and errors). Batches are a pure function of
(data seed, epoch, batch index), so a job killed at any point and restarted replays exactly the same steps.
"""

import json
import logging
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from kerasntk import config as cfg
from kerasntk import data, models

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


def checkpoint_steps(config, steps_per_epoch):
    """The checkpoint grid in steps: 0, the end, explicit, spawn and linearization times, log-spaced and
    periodic times."""
    c = config.checkpoints
    total = cfg.parse_duration(config.train.length).steps(steps_per_epoch)
    steps = {0, total}
    for value in list(c.times) + list(config.spawn.times) + list(config.linearize.times):
        steps.add(cfg.parse_duration(value).steps(steps_per_epoch))
    if c.log_num:
        start, stop = cfg.parse_duration(c.log_start), cfg.parse_duration(c.log_stop)
        for value in np.geomspace(start.value, stop.value, c.log_num):
            steps.add(cfg.Duration(float(value), start.unit).steps(steps_per_epoch))
    if c.every is not None:
        every = cfg.parse_duration(c.every).steps(steps_per_epoch)
        steps.update(range(0, total + 1, max(every, 1)))
    dt = velocity_dt_steps(config, steps_per_epoch)
    if dt is not None:  # the partner of every time for the kernel velocity
        steps.update([s + dt for s in steps])
    return sorted(s for s in steps if 0 <= s <= total)


def velocity_dt_steps(config, steps_per_epoch):
    """`ntk.velocity_dt` in steps (at least 1), or None when kernels are off or velocity uses the next checkpoint."""
    n = config.ntk
    if not n.enabled or n.velocity_dt is None:
        return None
    return max(cfg.parse_duration(n.velocity_dt).steps(steps_per_epoch), 1)


def checkpoint_dir(job_dir, step):
    return os.path.join(job_dir, "checkpoints", f"step_{step:08d}")


def saved_checkpoints(job_dir):
    """Steps of the complete grid checkpoints in `job_dir`, sorted."""
    root = os.path.join(job_dir, "checkpoints")
    if not tf.io.gfile.isdir(root):
        return []
    names = [n.rstrip("/") for n in tf.io.gfile.listdir(root)]
    return sorted(int(n[5:]) for n in names if n.startswith("step_") and n[5:].isdigit())


def write_json_atomic(path, obj):
    """Write JSON to a temporary file, then rename it over `path`: readers never see half a file."""
    tf.io.gfile.makedirs(os.path.dirname(path) or ".")
    tmp = f"{path}.tmp{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True))
    tf.io.gfile.rename(tmp, path, overwrite=True)


class Trainer:
    """Trains one network (a parent or a child) under a strategy, with grid checkpoints and resume.

    config: a validated `kerasntk.config.Config`. job_dir: where this job's checkpoints live.
    arrays: the loaded `kerasntk.data.Arrays` (loaded from the config when None).
    data_seed / augment_seed: override the config's (children use their own).
    """

    def __init__(self, config, job_dir, *, strategy=None, arrays=None, data_seed=None, augment_seed=None):
        self.config, self.job_dir = config, job_dir
        t = config.train
        if t.deterministic:
            tf.config.experimental.enable_op_determinism()
        self.strategy = strategy or tf.distribute.get_strategy()
        self.arrays = arrays if arrays is not None else load_data(config)
        self.steps_per_epoch = data.steps_per_epoch(self.arrays, t.batch_size)
        self.total_steps = cfg.validate_against(config, self.steps_per_epoch, self.strategy.num_replicas_in_sync)
        self.data_seed = t.data_seed if data_seed is None else data_seed
        self.augment_seed = t.augment_seed if augment_seed is None else augment_seed
        self.model, self.optimizer = build_model_and_optimizer(config, self.arrays, self.total_steps,
                                                               self.steps_per_epoch, self.strategy)
        self.checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.optimizer)
        self.resume_manager = tf.train.CheckpointManager(self.checkpoint, os.path.join(job_dir, "resume"), 1)
        self.history = []
        self._run_chunk = self._make_chunk_fn()
        self._eval_batch = self._make_eval_fn()

    @property
    def step(self):
        return int(self.optimizer.iterations.numpy())

    def epoch(self, step=None):
        """Time in epochs of `step` (default: the current step)."""
        return (self.step if step is None else step) / self.steps_per_epoch

    # -- state -------------------------------------------------------------------------------------------

    def restore(self, start_from=None, reset_momentum=False):
        """Resume from this job's latest checkpoint; else start from checkpoint `start_from`; else from init.

        Returns the step training continues from.
        """
        latest = self.resume_manager.latest_checkpoint
        if latest:
            self.checkpoint.read(latest).assert_existing_objects_matched()
            self.history = [h for h in self._read_history() if h["step"] <= self.step]
            log.info("resumed %s at step %d", self.job_dir, self.step)
        elif start_from:
            self.checkpoint.read(os.path.join(start_from, "ckpt")).assert_existing_objects_matched()
            if reset_momentum:
                for slot in self.optimizer.momentums:
                    slot.assign(tf.zeros_like(slot))
            log.info("started %s from %s (step %d)", self.job_dir, start_from, self.step)
        return self.step

    def save_grid_checkpoint(self):
        """Write a permanent checkpoint of the current step (weights, optimizer, step, data position)."""
        step = self.step
        final = checkpoint_dir(self.job_dir, step)
        if tf.io.gfile.exists(os.path.join(final, "meta.json")):
            return final
        tmp = f"{final}.tmp"
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.rmtree(tmp)
        self.checkpoint.write(os.path.join(tmp, "ckpt"))
        epoch, batch = divmod(step, self.steps_per_epoch)
        write_json_atomic(os.path.join(tmp, "meta.json"), dict(
            step=step, time=self.epoch(step), epoch=epoch, batch=batch, data_seed=self.data_seed,
            augment_seed=self.augment_seed, steps_per_epoch=self.steps_per_epoch,
            learning_rate=float(self.optimizer.learning_rate.numpy())))
        if tf.io.gfile.exists(final):  # a stale, incomplete copy from an interrupted rename
            tf.io.gfile.rmtree(final)
        tf.io.gfile.rename(tmp, final)
        return final

    def _save_resume(self):
        write_json_atomic(os.path.join(self.job_dir, "history.json"), self.history)
        self.resume_manager.save(checkpoint_number=self.step)

    def _read_history(self):
        path = os.path.join(self.job_dir, "history.json")
        if not tf.io.gfile.exists(path):
            return []
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)

    # -- the loop ----------------------------------------------------------------------------------------

    def train(self, until=None, save_steps=(), verbose=1):
        """Train to step `until` (default: the end), saving grid checkpoints at `save_steps` and resume
        checkpoints at every epoch end. Returns the history (one dict per completed epoch)."""
        until = self.total_steps if until is None else until
        save_steps = sorted(set(s for s in save_steps if self.step <= s <= until))
        if self.step in save_steps:
            self.save_grid_checkpoint()
        while self.step < until:
            epoch, batch = divmod(self.step, self.steps_per_epoch)
            epoch_end = min((epoch + 1) * self.steps_per_epoch, until)
            totals = self._train_epoch_part(epoch, batch, epoch_end, save_steps, verbose)
            if self.step % self.steps_per_epoch == 0 or self.step == self.total_steps:
                self._end_epoch(epoch, totals, verbose)
        return self.history

    def _train_epoch_part(self, epoch, batch, stop, save_steps, verbose):
        """Run steps from the current one to `stop` within `epoch`, checkpointing on the grid on the way."""
        t = self.config.train
        batches = data.train_batches(self.arrays, batch_size=t.batch_size, epoch=epoch, order_seed=self.data_seed,
                                     augment_seed=self.augment_seed, start_batch=batch,
                                     augment=self.config.data.augment)
        iterator = iter(self.strategy.experimental_distribute_dataset(batches))
        bar = keras.utils.Progbar(self.steps_per_epoch, verbose=verbose, unit_name="step") if verbose else None
        totals = np.zeros(3)
        while self.step < stop:
            next_save = min([s for s in save_steps if s > self.step] + [stop])
            n = min(t.steps_per_execution, next_save - self.step)
            totals += self._run_chunk(iterator, tf.constant(n)).numpy()
            if self.step in save_steps:
                self.save_grid_checkpoint()
            if bar:
                bar.update(self.step - epoch * self.steps_per_epoch,
                           [("loss", totals[0] / totals[2]), ("error", 1 - totals[1] / totals[2])])
        return totals

    def _end_epoch(self, epoch, totals, verbose):
        test = self.evaluate(self.arrays.x_test, self.arrays.y_test)
        row = dict(epoch=self.epoch(), step=self.step, lr=float(self.optimizer.learning_rate.numpy()),
                   train_loss=totals[0] / max(totals[2], 1), train_error=1 - totals[1] / max(totals[2], 1),
                   test_loss=test["loss"], test_error=test["error"], wall_time=time.time())
        self.history.append(row)
        if verbose:
            print(f"epoch {self.epoch():g}/{self.epoch(self.total_steps):g}: "
                  f"train loss {row['train_loss']:.4f} error {row['train_error']:.4f} | "
                  f"test loss {row['test_loss']:.4f} error {row['test_error']:.4f}", flush=True)
        self._save_resume()

    # -- compiled functions -----------------------------------------------------------------------------

    def _make_chunk_fn(self):
        """A tf.function running n train steps from a distributed iterator; returns summed (loss, correct, count)."""
        t, model, optimizer, strategy = self.config.train, self.model, self.optimizer, self.strategy
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

    def _make_eval_fn(self):
        model, strategy = self.model, self.strategy

        def replica_eval(x, y, mask):
            logits = model(x, training=False)
            loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), tf.float32)
            return tf.stack([tf.reduce_sum(loss * mask), tf.reduce_sum(correct * mask), tf.reduce_sum(mask)])

        @tf.function
        def eval_batch(x, y, mask):
            return strategy.reduce("SUM", strategy.run(replica_eval, args=(x, y, mask)), axis=None)

        return eval_batch

    def evaluate(self, x, y):
        """Mean cross-entropy and 0-1 error of the current weights on (x, y), in inference mode.

        The last batch is padded to the full eval batch (masked out), so every call has one static shape.
        """
        batch = self.config.train.eval_batch_size
        batch = batch - batch % self.strategy.num_replicas_in_sync or self.strategy.num_replicas_in_sync
        pad = -len(x) % batch
        mask = np.concatenate([np.ones(len(x), np.float32), np.zeros(pad, np.float32)])
        x = np.concatenate([x, np.repeat(x[:1], pad, 0)])
        y = np.concatenate([y, np.repeat(y[:1], pad, 0)]).astype(np.int32)
        ds = tf.data.Dataset.from_tensor_slices((x, y, mask)).batch(batch, drop_remainder=True)
        totals = np.zeros(3)
        for xb, yb, mb in self.strategy.experimental_distribute_dataset(ds):
            totals += self._eval_batch(xb, yb, mb).numpy()
        return dict(loss=float(totals[0] / totals[2]), error=float(1 - totals[1] / totals[2]))


def use_xla(jit_compile, strategy):
    """Whether train steps are XLA-compiled: "auto" means on accelerators only (on CPU, TensorFlow's
    oneDNN kernels train ResNet-20 1.3-3x faster than XLA: BENCHMARKS.md); never across logical CPUs."""
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


def build_model_and_optimizer(config, arrays, total_steps, steps_per_epoch, strategy):
    """The seeded model and its SGD-momentum optimizer, created and built inside the strategy's scope."""
    t = config.train
    schedule = Schedule(
        t.lr, total_steps, t.schedule,
        warmup_steps=cfg.parse_duration(t.warmup).steps(steps_per_epoch),
        milestones=[cfg.parse_duration(m).steps(steps_per_epoch) for m in t.milestones], gamma=t.gamma)
    with strategy.scope():
        keras.utils.set_random_seed(t.seed)
        model = models.get(config.model.name, arrays.input_shape, arrays.num_classes, **config.model.options)
        optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=t.momentum)
        optimizer.build(model.trainable_variables)
    return model, optimizer
