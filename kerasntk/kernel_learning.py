"""Kernel learning (docs/methods.md §6): train the parent's linearization at time t and measure its test error.

One job per time t, resumable: its `rundir.JobDir` holds a resume checkpoint of the linearized model and its
optimizer after every epoch plus `history.json`; the result is one row of `parent(time, metric)`.
"""

import math

import keras
import numpy as np
import tensorflow as tf

from kerasntk import config as cfg
from kerasntk import data, faults, summaries
from kerasntk.evaluation import Evaluator
from kerasntk.linearized import linearize
from kerasntk.training import Diverged, EpochLines


def validation_split(arrays, n, seed):
    """(training arrays without `n` held-out examples, (x_val, y_val)): the held-out part selects the epoch."""
    order = np.random.default_rng([seed, 7]).permutation(len(arrays.x_train))
    held, kept = np.sort(order[:n]), np.sort(order[n:])
    train = data.Arrays(arrays.x_train[kept], arrays.y_train[kept], arrays.x_test, arrays.y_test,
                        name=arrays.name, num_classes=arrays.num_classes, augment=arrays.augment)
    return train, (arrays.x_train[held], arrays.y_train[held])


def fit_linearized(model, weights, arrays, config, job, strategy, verbose=1, summary_dir=None, name="linearized"):
    """Train f(x; w_t) + J(x; w_t)·Δw (Δw from 0, softmax cross-entropy, SGD with momentum) and return
    {linearized_test_error (best over epochs, the paper's number), linearized_val_selected_test_error,
    linearized_test_loss (at the selected epoch)}. Each epoch's row also goes to `summary_dir` (TensorBoard);
    `name` is the job's id for fault points (`faults`)."""
    lc = config.linearize
    train_arrays, (x_val, y_val) = validation_split(arrays, lc.validation_examples, config.train.data_seed)
    steps_per_epoch = data.steps_per_epoch(train_arrays, lc.batch_size)
    if steps_per_epoch == 0:
        raise cfg.ConfigError(
            f"linearize.validation_examples={lc.validation_examples} leaves {len(train_arrays.x_train)} training "
            f"examples, fewer than linearize.batch_size={lc.batch_size}; allowed: validation_examples + batch_size "
            f"<= {len(arrays.x_train)}")
    epochs = max(1, math.ceil(cfg.parse_duration(lc.length).steps(steps_per_epoch) / steps_per_epoch))
    with strategy.scope():
        lin = linearize(model, weights=weights)
        optimizer = keras.optimizers.SGD(lc.lr, momentum=lc.momentum)
        lin.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        lin.build(model.input_shape)
        optimizer.build(lin.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=lin, optimizer=optimizer)
    evaluator = Evaluator(lin, config.train.eval_batch_size, strategy=strategy)
    history = _restore(job, checkpoint)
    lines = EpochLines(verbose)
    for epoch in range(len(history), epochs):
        batches = data.train_batches(train_arrays, batch_size=lc.batch_size, epoch=epoch,
                                     order_seed=config.train.data_seed, augment_seed=config.train.augment_seed,
                                     augment=config.data.augment)
        fitted = lin.fit(batches, epochs=1, shuffle=False, verbose=0).history
        loss = fitted["loss"][-1]
        if not np.isfinite(loss):  # checked once per epoch: a NaN model must not be measured or checkpointed
            raise Diverged(f"the linearized network of {job.path} has a non-finite training loss in epoch "
                           f"{epoch + 1}; lower linearize.lr")
        test = evaluator(arrays.x_test, arrays.y_test)
        val = evaluator(x_val, y_val)
        history.append(dict(epoch=epoch + 1, test_error=test["error"], test_loss=test["loss"],
                            val_error=val["error"], train_loss=loss, train_error=1 - fitted["accuracy"][-1],
                            lr=lc.lr))
        lines(f"  linearized epoch {epoch + 1}/{epochs}: test error {test['error']:.4f} "
              f"(validation {val['error']:.4f})", last=epoch + 1 == epochs)
        if summary_dir:  # before the resume checkpoint, as the trainer does
            summaries.write_epoch(summary_dir, int(optimizer.iterations.numpy()), history[-1])
        job.write_history(history)
        job.save_checkpoint(checkpoint, int(optimizer.iterations.numpy()), dict(epoch=epoch + 1), kind="resume")
        faults.at(name, "epoch", epoch + 1)
    selected = min(history, key=lambda h: (h["val_error"], h["epoch"]))
    return dict(linearized_test_error=min(h["test_error"] for h in history),
                linearized_val_selected_test_error=selected["test_error"],
                linearized_test_loss=selected["test_loss"])


def _restore(job, checkpoint):
    """The per-epoch history of an interrupted job, with its latest checkpoint restored (empty if none)."""
    latest = job.latest_checkpoint(kinds=("resume",))
    if latest is None:
        return []
    step, kind = latest
    meta = job.read_checkpoint(checkpoint, step, kind=kind)
    return job.read_history()[:meta["epoch"]]
