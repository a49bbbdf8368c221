"""TensorBoard event files of a run (`tensorboard --logdir RUN/tensorboard`), one run per job.

    RUN/tensorboard/parent/, child/sXXXXXXXX_cC/, linearized/sXXXXXXXX/   per epoch: train_loss, train_error,
                                                          test_loss, test_error, learning_rate (+ val_error)
    RUN/tensorboard/measure_parent/                       every metric of results/parent.nc at its checkpoints
    RUN/tensorboard/pairs/                                every pair metric (mean over child pairs) per spawn

The step axis is the optimizer step, on the parent's clock for the parent, its children and its measurements
(a child continues the parent's step count; a linearized network counts its own steps). Each event file is
written whole by `tf.summary` into a local temporary directory and placed with `fs.atomic_file` under a name
made of its step (`events.out.tfevents.step_XXXXXXXXXX`), so local and gs:// run directories take one path
(TensorFlow's own gs:// support is not needed), a live TensorBoard sees each epoch as it ends, and a resumed or
repeated job rewrites the same file with the same values instead of adding duplicates.
"""

import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf

from kerasntk import fs, results

EPOCH_TAGS = {"train_loss": "train_loss", "train_error": "train_error", "test_loss": "test_loss",
              "test_error": "test_error", "val_error": "val_error", "lr": "learning_rate"}


def write(directory, step, rows):
    """Write `rows` ({step: {tag: value}}) as one event file in `directory`, named by `step`; non-finite
    values are left out (TensorBoard draws them as nothing anyway)."""
    with tempfile.TemporaryDirectory(prefix="kerasntk-tensorboard-") as tmp:
        writer = tf.summary.create_file_writer(tmp)
        with writer.as_default():
            for at, values in sorted(rows.items()):
                for tag, value in values.items():
                    if np.isfinite(value):
                        tf.summary.scalar(tag, float(value), step=int(at))
        writer.close()
        (written,) = os.listdir(tmp)
        with fs.atomic_file(fs.join(directory, f"events.out.tfevents.step_{int(step):010d}")) as target:
            shutil.copyfile(os.path.join(tmp, written), target)


def write_epoch(directory, step, row):
    """One epoch of a training job's history (`row`: its history.json entry) at optimizer step `step`."""
    write(directory, step, {step: {tag: row[key] for key, tag in EPOCH_TAGS.items() if key in row}})


def write_job_results(run, job):
    """The TensorBoard view of a measurement job's result file (RunDir `run`, `Job` `job`), if it has one:
    measure_parent → every parent metric at its checkpoints; pairs → the mean over child pairs of every pair
    metric at the spawn step."""
    if job.kind == "measure_parent":
        parent = results.load(run.result("parent")).parent
        rows = {int(s): _metrics(parent.sel(time=t)) for t, s in zip(parent.time.values, parent.step.values)}
        write(run.tensorboard(job.id), int(parent.step.values[0]), rows)
    elif job.kind == "pairs":
        pair = results.load(run.result("pair", job.step)).pair.mean("child_pair", skipna=True)
        write(run.tensorboard("pairs"), job.step, {job.step: _metrics(pair.isel(time=0))})


def _metrics(row):
    """{metric name: value} of a (metric,) DataArray."""
    return {str(name): float(value) for name, value in zip(row.metric.values, row.values)}
