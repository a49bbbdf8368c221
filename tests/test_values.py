"""The science outputs by value: what the suite's finished tiny run (`clean_run`) wrote is recomputed from its own
files (checkpoints, curves, histories), and kernel learning's selection and resume against hand-made references."""

import itertools
import json
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasntk import config as cfg
from kerasntk import kernel_learning, models, training
from kerasntk.experiment import Grid, child_seeds
from kerasntk.rundir import JobDir, RunDir
from helpers import synthetic_arrays, tiny


def _trainable(config, job, step):
    """The trainable weights (float64, flattened) of `job`'s grid checkpoint at `step`, read into a fresh model."""
    model = models.get(config.model.name, (16, 1), 10, **config.model.options)
    job.read_checkpoint(tf.train.Checkpoint(model=model), step, partial=True)
    return np.concatenate([np.ravel(w.numpy()).astype(np.float64) for w in model.trainable_weights])


@pytest.fixture(scope="module")
def run(clean_run):
    ds, root = clean_run
    config = RunDir(root).load_config()
    grid = Grid.from_config(config, steps_per_epoch=256 // 32)
    return ds, RunDir(root), config, grid


def test_children_have_distinct_seeds_recorded_in_their_checkpoints(run):
    ds, rundir, config, grid = run
    seeds = {(s, c): child_seeds(config, s, c) for s in grid.spawn for c in range(config.spawn.children)}
    parent = (config.train.data_seed, config.train.augment_seed)
    assert len(set(seeds.values()) | {parent}) == len(seeds) + 1  # no two networks share a data order
    for (step, child), (data_seed, augment_seed) in seeds.items():
        meta = rundir.child(step, child).meta(grid.total)
        assert (meta["data_seed"], meta["augment_seed"]) == (data_seed, augment_seed)


def test_pair_distances_recomputed_from_the_childrens_checkpoints(run):
    """weight_distance of every pair (and each child's distance to the parent's end) is ‖w_a − w_b‖ of the
    trainable weights in the checkpoints, computed here in float64 from a fresh model; rtol 1e-9 since both
    sides compute the same float64 norm of the same float32 values, only summed in another order."""
    ds, rundir, config, grid = run
    final = {(s, c): _trainable(config, rundir.child(s, c), grid.total) for s in grid.spawn for c in range(2)}
    parent_final = _trainable(config, rundir.parent, grid.total)
    for step in grid.spawn:
        t = grid.epochs(step)
        want = np.linalg.norm(final[step, 0] - final[step, 1])
        got = ds.pair.sel(time=t, metric="weight_distance").dropna("child_pair").values
        assert want > 1e-3 and got == pytest.approx([want], rel=1e-9)
        for c in range(2):
            to_parent = ds.child.sel(time=t, spawn=c, metric="weight_distance_to_parent").item()
            assert to_parent == pytest.approx(np.linalg.norm(final[step, c] - parent_final), rel=1e-9)


def test_barriers_are_the_path_maximum_minus_the_endpoint_mean(run):
    ds, rundir, config, grid = run
    names = [("error_barrier", "test_error"), ("loss_barrier", "test_loss"),
             ("train_error_barrier", "train_error"), ("train_loss_barrier", "train_loss")]
    checked = 0
    for step, (barrier, curve_name) in itertools.product(grid.spawn, names):
        t = grid.epochs(step)
        curve = ds.path.sel(time=t, metric=curve_name).dropna("child_pair", how="all").values[0]
        assert len(curve) == 5 and np.isfinite(curve).all()
        want = curve.max() - 0.5 * (curve[0] + curve[-1])
        assert ds.pair.sel(time=t, metric=barrier).dropna("child_pair").item() == pytest.approx(want, abs=1e-12)
        checked += 1
    assert checked == 12


def test_linearized_errors_are_the_best_and_the_validation_selected_epochs_of_the_history(run):
    ds, rundir, config, grid = run
    for step in grid.linearize:
        history = rundir.linearized(step).read_history()
        assert len(history) == 1  # linearize.length=1ep: the selection rule is tested below on several epochs
        row = ds.parent.sel(time=grid.epochs(step))
        assert row.sel(metric="linearized_test_error").item() == min(h["test_error"] for h in history)
        selected = min(history, key=lambda h: h["val_error"])
        assert row.sel(metric="linearized_val_selected_test_error").item() == selected["test_error"]
        assert row.sel(metric="linearized_test_loss").item() == selected["test_loss"]


# -- fit_linearized: selection rule and resume ---------------------------------------------------------------

def _linearize(job_dir, length, arrays):
    config = cfg.load(None, ["linearize.validation_examples=32", f"linearize.length={length}",
                             "linearize.batch_size=32"])
    keras.utils.set_random_seed(3)
    model = models.get("cnn1d", arrays.input_shape, arrays.num_classes)
    weights = model.get_weights()
    return kernel_learning.fit_linearized(model, weights, arrays, config, JobDir(job_dir), tf.distribute.get_strategy(),
                                          verbose=0)


def _resume_tensors(job_dir):
    step, _ = JobDir(job_dir).latest_checkpoint(kinds=("resume",))
    reader = tf.train.load_checkpoint(f"{job_dir}/resume/step_{step:08d}/ckpt")
    return {n: reader.get_tensor(n) for n in reader.get_variable_to_shape_map() if n != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def test_fit_linearized_resumed_after_an_epoch_equals_an_uninterrupted_fit(tmp_path):
    """2 epochs in one go vs 1 epoch, then the same job directory asked for 2: bitwise the same checkpoint,
    history (but wall times: there are none) and results (CPU kernels in one process are deterministic)."""
    arrays = synthetic_arrays(n_train=160, n_test=64, shape=(16, 1))
    whole = _linearize(tmp_path / "whole", "2ep", arrays)
    first = _linearize(tmp_path / "resumed", "1ep", arrays)
    assert len(JobDir(tmp_path / "resumed").read_history()) == 1
    resumed = _linearize(tmp_path / "resumed", "2ep", arrays)
    assert resumed == whole and first != whole
    assert JobDir(tmp_path / "resumed").read_history() == JobDir(tmp_path / "whole").read_history()
    a, b = _resume_tensors(tmp_path / "whole"), _resume_tensors(tmp_path / "resumed")
    assert a.keys() == b.keys() and len(a) > 4 and all(np.array_equal(a[k], b[k]) for k in a)


def test_fit_linearized_reports_the_best_epoch_and_the_validation_selected_one(tmp_path):
    """A finished job's stored history (edited to known values) is all fit_linearized reads: the best test
    error is epoch 2's, the validation choice epoch 1's (ties broken by the earlier epoch), never the last."""
    arrays = synthetic_arrays(n_train=160, n_test=64, shape=(16, 1))
    _linearize(tmp_path, "3ep", arrays)
    history = [dict(epoch=1, test_error=0.30, test_loss=1.3, val_error=0.20),
               dict(epoch=2, test_error=0.10, test_loss=1.1, val_error=0.25),
               dict(epoch=3, test_error=0.20, test_loss=1.2, val_error=0.20)]
    JobDir(tmp_path).write_history(history)
    assert _linearize(tmp_path, "3ep", arrays) == dict(linearized_test_error=0.10,
                                                       linearized_val_selected_test_error=0.30,
                                                       linearized_test_loss=1.3)


# -- SpawnCheckpoint: a child's first step is the parent's next step -----------------------------------------

def test_spawn_checkpoint_child_first_step_equals_the_parents_next_step(tmp_path):
    """A Keras fit (SGD lr 0.1, momentum 0.9, batches in order) saves step 2 with SpawnCheckpoint; the child
    kerasntk builds from the run directory (model.keras, config.json: lr, momentum) and restores from that
    checkpoint, given the batch the parent saw at step 3, lands on the parent's weights after step 3.
    Tolerance 1e-6: the same float32 ops in another graph (Keras's train step vs the trainer's)."""
    from kerasntk import callbacks

    a = synthetic_arrays(n_train=128, n_test=32, shape=(16, 1))
    mean, std = a.x_train.mean((0, 1)), a.x_train.std((0, 1))
    x, x_test = (a.x_train - mean) / std, (a.x_test - mean) / std
    keras.utils.set_random_seed(0)
    inputs = keras.Input((16, 1))
    h = keras.layers.GlobalAveragePooling1D()(keras.layers.Conv1D(4, 3, activation="relu")(inputs))
    model = keras.Model(inputs, keras.layers.Dense(10)(h))
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    after = {}
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: after.__setitem__(b + 1, model.get_weights()))
    spawner = callbacks.SpawnCheckpoint(["2it"], tmp_path / "run", data=(x, a.y_train, x_test, a.y_test), batch_size=32)
    model.fit(x, a.y_train, batch_size=32, epochs=1, shuffle=False, verbose=0, callbacks=[record, spawner])

    shutil.move(tmp_path / "run", tmp_path / "moved")  # relocatable: nothing in it names where it was written
    run = RunDir(tmp_path / "moved")
    stored = json.loads((tmp_path / "moved" / "config.json").read_text())
    assert stored["data"]["path"] == "data.npz" and stored["model"]["options"]["path"] == "model.keras"
    config = run.load_config()
    arrays = training.load_data(config)
    grid = Grid.from_config(config, steps_per_epoch=4)
    child = training.build_trainer(config, arrays, grid, run.child(2, 0), tf.distribute.get_strategy())
    assert child.restore(start_from=(run.parent, 2)) == 2
    assert float(child.optimizer.learning_rate) == pytest.approx(0.1) and child.optimizer.momentum == 0.9
    child.replica_step(tf.constant(x[64:96]), tf.constant(a.y_train[64:96]))  # the parent's step 3 batch
    assert child.step == 3
    for got, want in zip(child.model.get_weights(), after[3]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert max(np.abs(g - w).max() for g, w in zip(child.model.get_weights(), after[2])) > 1e-3  # it moved
    assert stored["train"]["momentum"] == 0.9


def test_the_version_that_made_a_run_is_recorded_and_another_one_warns(tmp_path, npz, caplog):
    import kerasntk

    RunDir(tmp_path).prepare(cfg.load(None, tiny(npz)))
    assert json.loads((tmp_path / "version.json").read_text()) == {"kerasntk": kerasntk.__version__}
    with caplog.at_level("WARNING", logger="kerasntk.rundir"):
        RunDir(tmp_path).load_config()
    assert not caplog.records
    (tmp_path / "version.json").write_text('{"kerasntk": "0.0.1"}')
    with caplog.at_level("WARNING", logger="kerasntk.rundir"):
        RunDir(tmp_path).prepare(cfg.load(None, tiny(npz)))
    assert [r.getMessage().count("made by kerasntk 0.0.1; this is kerasntk") for r in caplog.records] == [1]
