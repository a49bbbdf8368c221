"""Tests of kerasntk.callbacks under model.fit: values against kerasntk.ntk / numpy, interruption, spawning."""

import csv
import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
import xarray as xr
from keras.src.utils.python_utils import is_default  # what Keras checks before dispatching batches async

from helpers import BATCH, Recorder, tensorboard_scalars, tiny_model
from kerasntk import callbacks, landscape, ntk

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
class Raise(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


def naive_distance(a, b):
    """S(K1, K2) = 1 − ⟨K1, K2⟩ / (‖K1‖ ‖K2‖) straight from the definition."""
    return 1 - np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))


def naive_alignment(K, y):
    """Centred alignment ⟨HKH, HYYᵀH⟩ / (‖HKH‖ ‖HYYᵀH‖) with explicit H matrices."""
    n = len(y)
    H = np.eye(n) - np.ones((n, n)) / n
    Y = np.eye(10)[y]
    a, b = H @ K @ H, H @ Y @ Y.T @ H
    return np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b))


def naive_effective_rank(K):
    lam = np.clip(np.linalg.eigvalsh(K), 0, None)
    p = lam[lam > 0] / lam.sum()
    return np.exp(-np.sum(p * np.log(p)))


# -- when callbacks run -----------------------------------------------------------------------------------


def test_epoch_times_override_no_batch_hook(arrays):
    x = arrays[0][:8]
    assert is_default(callbacks.NTKMonitor(x, every="epoch").on_train_batch_end)
    assert is_default(callbacks.NTKMonitor(x, every=[0, 1, 3]).on_train_batch_end)
    assert is_default(callbacks.SpawnCheckpoint([1, "2ep"], "/tmp/x", data="d.npz", batch_size=4).on_train_batch_end)
    assert not is_default(callbacks.NTKMonitor(x, every=5).on_train_batch_end)
    assert not is_default(callbacks.NTKMonitor(x, every=[0.5]).on_train_batch_end)
    assert not is_default(callbacks.SpawnCheckpoint(["3it"], "/tmp/x", data="d.npz", batch_size=4).on_train_batch_end)
    assert is_default(callbacks.LandscapeProbe([], (x, x), (x, x)).on_train_batch_end)


def test_bad_arguments_name_what_is_allowed(arrays):
    x = arrays[0][:8]
    with pytest.raises(ValueError, match="allowed: 'epoch', a positive int"):
        callbacks.NTKMonitor(x, every=0)
    with pytest.raises(ValueError, match="not a duration"):
        callbacks.NTKMonitor(x, every=["soon"])
    with pytest.raises(ValueError, match="write_every"):
        callbacks.NTKMonitor(x, write_every=0)
    with pytest.raises(ValueError, match="list of epochs or steps"):
        callbacks.SpawnCheckpoint("epoch", "/tmp/x", data="d.npz", batch_size=4)


def test_steps_and_fractional_epochs(arrays, tmp_path):
    x, y = arrays[0], arrays[1]
    by_steps = callbacks.NTKMonitor(x[:8], every=3)
    by_times = callbacks.NTKMonitor(x[:8], every=[0.5, "5it", 2])
    tiny_model().fit(x, y, batch_size=BATCH, epochs=3, verbose=0, callbacks=[by_steps, by_times])
    assert by_steps.steps == [0, 3, 6, 9, 12]
    assert by_times.steps == [2, 5, 8]
    np.testing.assert_allclose(by_times.times, [0.5, 1.25, 2.0])


# -- NTKMonitor -------------------------------------------------------------------------------------------


def test_monitor_values_equal_kerasntk_ntk_on_the_same_weights(arrays, tmp_path):
    x, y, x_test, y_test = arrays
    probe_x, probe_y = x_test[:32], y_test[:32]
    model, recorder = tiny_model(), Recorder()
    monitor = callbacks.NTKMonitor(probe_x, probe_y, path=tmp_path / "ntk.nc", keep_kernels=True)
    history = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, callbacks=[recorder, monitor])

    same_architecture = tiny_model()
    fn = ntk.empirical_ntk_fn(same_architecture, trace_axes=(-1,))
    reference = []
    for weights in recorder.weights:
        same_architecture.set_weights(weights)
        reference.append(np.asarray(fn(probe_x), np.float64))
    # same weights, same float32 computation: only summation order may differ (oneDNN threads)
    np.testing.assert_allclose(np.stack(monitor.kernels), np.stack(reference), rtol=1e-5, atol=1e-7)
    assert monitor.steps == recorder.steps == [0, 4, 8, 12]

    # logged scalars (epochs 1..3) against the definitions. Kernels agree to ~1e-6 relative (above), so
    # distances (differences of near-1 ratios, ~1e-3 here) to ~1e-4 relative; alignment and rank to 1e-5
    h = history.history
    expected_velocity = [naive_distance(reference[i], reference[i + 1]) for i in range(3)]
    np.testing.assert_allclose(h["ntk_velocity"], expected_velocity, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(h["ntk_distance_from_init"], [naive_distance(reference[0], k) for k in reference[1:]],
                               rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(h["ntk_alignment"], [naive_alignment(k, probe_y) for k in reference[1:]], rtol=1e-5)
    np.testing.assert_allclose(h["ntk_effective_rank"], [naive_effective_rank(k) for k in reference[1:]], rtol=1e-5)

    ds = xr.load_dataset(tmp_path / "ntk.nc")
    np.testing.assert_array_equal(ds["time"], [0, 1, 2, 3])
    velocity = ds["parent"].sel(metric="kernel_velocity").values
    np.testing.assert_allclose(velocity[:-1], expected_velocity, rtol=1e-4, atol=1e-7)  # forward differences
    assert np.isnan(velocity[-1])
    S = np.array([[naive_distance(a, b) for b in reference] for a in reference])
    np.testing.assert_allclose(ds["kernel_distance"], S, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(ds["ntk"], np.stack(monitor.kernels))
    np.testing.assert_allclose(ds["parent"].sel(metric="learning_rate"), 0.1, rtol=1e-6)


def test_monitor_under_mirrored_strategy_matches_one_device(arrays, tmp_path, mirrored):
    x, y, x_test, y_test = arrays
    with mirrored.scope():
        model = tiny_model()
    recorder = Recorder()
    monitor = callbacks.NTKMonitor(x_test[:16], y_test[:16], path=tmp_path / "ntk.nc")
    model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[recorder, monitor])
    single = tiny_model()
    fn = ntk.empirical_ntk_fn(single)
    for weights, kernel in zip(recorder.weights, monitor.kernels):
        single.set_weights(weights)
        np.testing.assert_allclose(kernel, fn(x_test[:16]), rtol=1e-5, atol=1e-7)
    assert len(monitor.kernels) == 3 and xr.load_dataset(tmp_path / "ntk.nc").sizes["time"] == 3


def test_exception_in_fit_leaves_every_completed_measurement(arrays, tmp_path):
    x, y, x_test, y_test = arrays
    monitor = callbacks.NTKMonitor(x_test[:16], y_test[:16], path=tmp_path / "ntk.nc")
    with pytest.raises(RuntimeError, match="interrupted"):
        tiny_model().fit(x, y, batch_size=BATCH, epochs=5, verbose=0, callbacks=[monitor, Raise(epoch=1)])
    ds = xr.load_dataset(tmp_path / "ntk.nc")
    np.testing.assert_array_equal(ds["time"], [0, 1, 2])
    np.testing.assert_allclose(ds["kernel_distance"], ntk_distance_matrix(monitor.kernels), atol=1e-12)


def ntk_distance_matrix(kernels):
    return np.array([[naive_distance(a, b) for b in kernels] for a in kernels])


KILLED_FIT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import keras, numpy as np
from helpers import tiny_model
from kerasntk import callbacks

x, y = np.load({arrays!r}).values()
class Kill(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)
each = callbacks.NTKMonitor(x[:16], y[:16], path={each!r})
periodic = callbacks.NTKMonitor(x[:16], y[:16], path={periodic!r}, write_every=2)
tiny_model().fit(x, y, batch_size=64, epochs=5, verbose=0, callbacks=[each, periodic, Kill()])
"""


def test_sigkill_leaves_readable_files_after_each_and_periodic_writes(arrays, tmp_path):
    np.savez(tmp_path / "xy.npz", x=arrays[0], y=arrays[1])
    script = KILLED_FIT.format(tests=os.path.join(ROOT, "tests"), arrays=str(tmp_path / "xy.npz"),
                               each=str(tmp_path / "each.nc"), periodic=str(tmp_path / "periodic.nc"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == -9, proc.stderr[-3000:]
    # killed after the measurement at epoch 2: write_every=1 has all three, write_every=2 the first two
    np.testing.assert_array_equal(xr.load_dataset(tmp_path / "each.nc")["time"], [0, 1, 2])
    np.testing.assert_array_equal(xr.load_dataset(tmp_path / "periodic.nc")["time"], [0, 1])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


# -- SpawnCheckpoint --------------------------------------------------------------------------------------


def test_spawn_checkpoints_start_a_child_through_kerasntk_spawn(arrays, tmp_path):
    run = tmp_path / "run"
    model, recorder = tiny_model(), Recorder()
    spawner = callbacks.SpawnCheckpoint([1, 2], run, data=arrays, batch_size=BATCH, children=2)
    model.fit(arrays[0], arrays[1], batch_size=BATCH, epochs=3, verbose=0, callbacks=[recorder, spawner])
    assert sorted(os.listdir(run / "parent" / "checkpoints")) == [f"step_{s:08d}" for s in (0, 4, 8, 12)]

    # the checkpoint at epoch 1 holds the weights, step and momentum slots fit had then
    prefix = str(run / "parent" / "checkpoints" / "step_00000004" / "ckpt")
    fresh = tiny_model()
    tf.train.Checkpoint(model=fresh).read(prefix).expect_partial()
    for got, want in zip(fresh.get_weights(), recorder.weights[1]):
        np.testing.assert_array_equal(got, want)
    names = dict(tf.train.list_variables(prefix))
    assert tf.train.load_variable(prefix, "optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE") == 4
    slots = [tf.train.load_variable(prefix, f"optimizer/_variables/{i + 1}/.ATTRIBUTES/VARIABLE_VALUE")
             for i in range(len(recorder.momenta[1]))]
    assert "optimizer/_learning_rate/.ATTRIBUTES/VARIABLE_VALUE" not in names  # the children's object graph
    for got, want in zip(slots, recorder.momenta[1]):
        np.testing.assert_array_equal(got, want)

    command = [sys.executable, "-m", "kerasntk.cli", "-q", "spawn", str(run), "--time", "1", "--child", "0"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    child = xr.load_dataset(run / "results" / "child_s00000004_c0.nc")
    assert child["child"].sel(metric="test_error").item() <= 1.0
    assert np.isfinite(child["child"].sel(metric="weight_distance_to_parent").item())


def test_spawn_checkpoint_under_mirrored_strategy(arrays, tmp_path, mirrored):
    with mirrored.scope():
        model = tiny_model()
    recorder = Recorder()
    spawner = callbacks.SpawnCheckpoint(["2it"], tmp_path / "run", data=arrays, batch_size=BATCH)
    model.fit(arrays[0], arrays[1], batch_size=BATCH, epochs=1, verbose=0, callbacks=[recorder, spawner])
    prefix = str(tmp_path / "run" / "parent" / "checkpoints" / "step_00000004" / "ckpt")
    fresh = tiny_model()
    tf.train.Checkpoint(model=fresh).read(prefix).expect_partial()
    for got, want in zip(fresh.get_weights(), recorder.weights[-1]):
        np.testing.assert_array_equal(got, want)
    assert os.path.isdir(tmp_path / "run" / "parent" / "checkpoints" / "step_00000002")


@pytest.mark.parametrize("model_kw, message", [
    (dict(optimizer=keras.optimizers.Adam), "keras.optimizers.SGD"),
    (dict(optimizer=lambda: keras.optimizers.SGD(0.1, nesterov=True, momentum=0.9)), "nesterov"),
    (dict(loss=lambda: keras.losses.SparseCategoricalCrossentropy()), "from_logits=True"),
])
def test_spawn_checkpoint_rejects_what_children_cannot_reproduce(arrays, tmp_path, model_kw, message):
    model = tiny_model(**{k: v() for k, v in model_kw.items()})
    spawner = callbacks.SpawnCheckpoint([1], tmp_path / "run", data=arrays, batch_size=BATCH)
    with pytest.raises(ValueError, match=message):
        model.fit(arrays[0], arrays[1], batch_size=BATCH, epochs=1, verbose=0, callbacks=[spawner])


def test_spawn_checkpoint_rejects_unstandardized_inputs(arrays, tmp_path):
    x, y, x_test, y_test = arrays
    spawner = callbacks.SpawnCheckpoint([1], tmp_path / "run", data=(3 * x + 1, y, x_test, y_test), batch_size=BATCH)
    with pytest.raises(ValueError, match="standardize"):
        tiny_model().fit(3 * x + 1, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[spawner])


def test_spawn_checkpoint_warns_when_keras_and_kerasntk_epochs_differ(arrays, tmp_path):
    x, y = arrays[0][:250], arrays[1][:250]  # Keras: 4 steps per epoch (last one partial), kerasntk: 3
    x = (x - x.mean((0, 1))) / x.std((0, 1))
    spawner = callbacks.SpawnCheckpoint(["2it"], tmp_path / "run", data=(x, y, arrays[2], arrays[3]), batch_size=BATCH)
    with pytest.warns(UserWarning, match="drops the last partial batch"):
        tiny_model().fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[spawner])


# -- LandscapeProbe ---------------------------------------------------------------------------------------


def test_landscape_probe_against_a_sibling_run(arrays, tmp_path):
    x, y, x_test, y_test = arrays
    sibling = tiny_model(seed=1)
    sibling.fit(x, y, batch_size=BATCH, epochs=2, verbose=0)
    sibling.save_weights(tmp_path / "sibling.weights.h5")
    model = tiny_model(seed=0)
    probe = callbacks.LandscapeProbe(str(tmp_path / "sibling.weights.h5"), (x_test, y_test), (x, y),
                                     alphas=5, path=tmp_path / "landscape.nc")
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[probe])
    assert int(model.optimizer.iterations.numpy()) == 8  # the reference's optimizer state was not kept

    scalars, curves = landscape.compare(model, model.get_weights(), sibling.get_weights(), x_test=x_test,
                                        y_test=y_test, x_train=x, y_train=y, alphas=np.linspace(0, 1, 5))
    for name in callbacks.LANDSCAPE_LOG_KEYS:  # NaN in the first epoch: CSVLogger fixes its columns there
        assert np.isnan(history.history[name][0])
        assert history.history[name][1:] == [pytest.approx(scalars[name], rel=1e-6, abs=1e-9)]
    # independent checks: disagreement from argmax, distance from the flat weight vectors
    pred = lambda m: m.predict(x_test, verbose=0).argmax(-1)  # noqa: E731
    assert probe.scalars["disagreement"] == pytest.approx(np.mean(pred(model) != pred(sibling)))
    flat = lambda m: np.concatenate([w.ravel() for w in m.get_weights()])  # noqa: E731 (all weights trainable)
    assert probe.scalars["weight_distance"] == pytest.approx(np.linalg.norm(flat(model) - flat(sibling)), rel=1e-5)

    ds = xr.load_dataset(tmp_path / "landscape.nc")
    np.testing.assert_allclose(ds["path"].sel(metric="test_error").values[0, 0], curves["test_error"])
    assert ds["step"].item() == 8 and ds["time"].item() == 2.0


def test_landscape_probe_with_checkpoint_reference_under_mirrored(arrays, tmp_path, mirrored):
    x, y, x_test, y_test = arrays
    with mirrored.scope():
        model = tiny_model()
    w0 = model.get_weights()
    spawner = callbacks.SpawnCheckpoint([1], tmp_path / "run", data=arrays, batch_size=BATCH)
    start = tmp_path / "run" / "parent" / "checkpoints" / "step_00000000"
    probe = callbacks.LandscapeProbe(start, (x_test, y_test), (x, y), alphas=3)
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[spawner, probe])
    flat = lambda ws: np.concatenate([w.ravel() for w in ws])  # noqa: E731
    assert history.history["weight_distance"][-1] == pytest.approx(
        np.linalg.norm(flat(model.get_weights()) - flat(w0)), rel=1e-5)


# -- the example ------------------------------------------------------------------------------------------


def test_example_main_runs_with_tiny_settings(tmp_path):
    path = os.path.join(ROOT, "examples", "fit_with_callbacks.py")
    spec = importlib.util.spec_from_file_location("fit_with_callbacks", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main(epochs=2, train_examples=256, batch_size=64, out=str(tmp_path))
    assert len(history.history["ntk_velocity"]) == 2
    barrier = history.history["error_barrier"]  # NaN until the probe measures after the last epoch
    assert len(barrier) == 2 and np.isnan(barrier[0]) and 0 <= barrier[1] <= 1
    assert xr.load_dataset(tmp_path / "ntk.nc").sizes["time"] == 3
    assert xr.load_dataset(tmp_path / "landscape.nc")["pair"].sel(metric="error_barrier").notnull().all()
    assert sorted(os.listdir(tmp_path / "run" / "parent" / "checkpoints")) == [
        f"step_{s:08d}" for s in (0, 2, 4, 8)]


# -- logs for every callback ------------------------------------------------------------------------------


def test_monitor_and_probe_values_reach_tensorboard_and_csvlogger_before_them(arrays, tmp_path):
    """NTKMonitor and LandscapeProbe after keras.callbacks.TensorBoard and CSVLogger in the list: both record
    the values of that epoch (as History, last in the list, does)."""
    x, y, x_test, y_test = arrays
    sibling = tiny_model(seed=1)
    board = keras.callbacks.TensorBoard(str(tmp_path / "logs"))
    csv_logger = keras.callbacks.CSVLogger(str(tmp_path / "log.csv"))
    monitor = callbacks.NTKMonitor(x_test[:16], y_test[:16])
    probe = callbacks.LandscapeProbe(sibling.get_weights(), (x_test, y_test), (x, y), alphas=3)
    model = tiny_model()
    history = model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0,
                        callbacks=[board, csv_logger, monitor, probe]).history
    assert model.train_function is not None and not isinstance(model.train_function, callbacks._EpochEndLogs)

    assert len(monitor.steps) == 3  # at the start and after each of the 2 epochs
    nan = float("nan")
    m = monitor.trajectory.metrics()  # after epoch e (measurement e + 1): the velocity known, v(t_e)
    expected = dict(ntk_velocity=m["kernel_velocity"][:2], ntk_distance_from_init=m["kernel_distance_from_init"][1:],
                    ntk_alignment=m["kernel_alignment"][1:], ntk_effective_rank=m["kernel_effective_rank"][1:])
    expected.update({key: [nan, probe.scalars[key]] for key in callbacks.LANDSCAPE_LOG_KEYS})
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    board = tensorboard_scalars(tmp_path / "logs" / "train")
    for key, values in expected.items():
        np.testing.assert_allclose(history[key], values, rtol=1e-6)
        np.testing.assert_allclose([float(row[key]) for row in rows], values, rtol=1e-6)
        np.testing.assert_allclose([board[f"epoch_{key}"][epoch] for epoch in (0, 1)], values, rtol=1e-6)
