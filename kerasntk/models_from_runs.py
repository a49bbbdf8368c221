"""Keras models from a run directory's checkpoints: the parent at a checkpoint time, or a child spawned at a
time (its final weights), of a `kerasntk run` or a `SpawnCheckpoint` run, as a `keras.Model` or a file in
Keras's own formats (`.keras`, `.weights.h5`)."""

import numbers

import tensorflow as tf

from kerasntk import config as cfg
from kerasntk import data, fs, models, training
from kerasntk.experiment.grid import Grid
from kerasntk.rundir import RunDir

FORMATS = (".keras", ".weights.h5")


def load_model(run_dir, time, child=None, overrides=()):
    """The model of run `run_dir` at `time` (epochs: 0.5, "2ep"; steps: "100it"): the parent's checkpoint at that
    time, or with `child` the final weights of child `child` spawned at that time. Uncompiled, as the
    measurements use it (BatchNorm layers plain, inference statistics from the checkpoint). The config's data is
    loaded for the grid and the input shape; `overrides` may set this machine's fields (`data.data_dir=...`)."""
    run = RunDir(run_dir)
    config = run.load_config(overrides)
    arrays = training.load_data(config)
    grid = Grid.from_config(config, data.steps_per_epoch(arrays, config.train.batch_size))
    job, step = _checkpoint(run, config, grid, time, child)
    model = models.get(config.model.name, arrays.input_shape, arrays.num_classes, **config.model.options)
    job.read_checkpoint(tf.train.Checkpoint(model=model), step, partial=True)  # the model, not the optimizer
    return model


def export_model(run_dir, time, out, child=None, overrides=()):
    """Write the model `load_model(run_dir, time, child)` to `out`: a whole model (`.keras`) or its weights
    (`.weights.h5`), local or a URL; returns `out`."""
    out = str(out)
    if not out.endswith(FORMATS):
        raise ValueError(f"--out {out!r}: the file name must end in one of {', '.join(FORMATS)}")
    model = load_model(run_dir, time, child, overrides)
    with fs.atomic_file(out) as tmp:
        model.save(tmp) if out.endswith(".keras") else model.save_weights(tmp)
    return out


def _checkpoint(run, config, grid, time, child):
    """(JobDir, step) of the checkpoint that holds the asked model."""
    if child is None:
        step = grid.step_of(time, grid.checkpoints, "a checkpoint time", name="time")
        job, step_in_job, what = run.parent, step, f"the parent's checkpoint at step {step}"
        command = f"kerasntk train {run.config_path} --out {run.root}"
    else:
        step = grid.step_of(time, grid.spawn, "a spawn time", name="time")
        if not (isinstance(child, numbers.Integral) and not isinstance(child, bool) and 0 <= child < config.spawn.children):
            raise cfg.ConfigError(f"child {child!r} is not allowed; allowed: 0..{config.spawn.children - 1}")
        job, step_in_job = run.child(step, child), grid.total
        what = f"the final checkpoint of child {child} spawned at step {step}"
        command = f"kerasntk spawn {run.root} --time {step}it --child {child}"
        diverged = job.divergence()
        if diverged:
            raise cfg.ConfigError(f"child {child} spawned at step {step} diverged ({diverged['reason']}); "
                                  "it has no final weights")
    if not job.has_checkpoint(step_in_job):
        raise cfg.ConfigError(f"{what} is not in {run.root!r} yet; train it first: {command}")
    return job, step_in_job
