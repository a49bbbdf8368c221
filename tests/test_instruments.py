"""The experiment's curvature, per-layer kernel and replicate outputs, checked by value against direct calls on
the tiny run's checkpoints and kernel caches (the session's `clean_run`), and one more tiny run for replicates."""

import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
import xarray as xr

from kerasntk import callbacks, cli, data, hessian, models, plots, results, training
from kerasntk import config as cfg
from kerasntk.experiment.grid import Grid
from kerasntk.rundir import RunDir
from helpers import tiny


def _setup(npz):
    config = cfg.load(None, tiny(npz))
    arrays = training.load_data(config)
    return config, arrays, Grid.from_config(config, data.steps_per_epoch(arrays, config.train.batch_size))


def _model_at(config, arrays, job_dir, step):
    model = models.get(config.model.name, arrays.input_shape, arrays.num_classes, **config.model.options)
    job_dir.read_checkpoint(tf.train.Checkpoint(model=model), step, partial=True)
    return model


def test_curvature_in_results_equals_a_direct_hessian_call_on_the_checkpoint(clean_run, npz):
    ds, run_dir = clean_run
    config, arrays, grid = _setup(npz)
    h, run = config.hessian, RunDir(run_dir)
    x, y = data.probe_subset(arrays.x_train, arrays.y_train, h.subset_size, h.seed)
    # the same float32 HVPs in another process: only summation order may differ (~1e-7 relative per HVP), which
    # Lanczos (8 steps) and the probe sums carry to ~1e-6; 1e-4 leaves room, far below the values' changes in time
    for step in (0, grid.total):
        model = _model_at(config, arrays, run.parent, step)
        hvp = hessian.hvp_fn(model, x, y, weight_decay=config.train.weight_decay, batch_size=h.batch_size)
        top = hessian.top_eigenvalues(hvp, 1, h.lanczos_steps, h.seed)[0]
        trace, stderr = hessian.trace(hvp, h.probes, h.seed)
        row = ds.parent.sel(time=grid.epochs(step))
        np.testing.assert_allclose(row.sel(metric="hessian_top_eigenvalue"), top, rtol=1e-4)
        np.testing.assert_allclose(row.sel(metric="hessian_trace"), trace, rtol=1e-4)
        np.testing.assert_allclose(row.sel(metric="hessian_trace_stderr"), stderr, rtol=1e-3)
    sharpness = ds.parent.sel(metric="hessian_top_eigenvalue").values
    assert sharpness[-1] > 2 * sharpness[0] > 0  # it changes with training (the run above sharpens ~10x)

    spawn = grid.spawn[1]
    child = _model_at(config, arrays, run.child(spawn, 1), grid.total)
    hvp = hessian.hvp_fn(child, x, y, weight_decay=config.train.weight_decay, batch_size=h.batch_size)
    np.testing.assert_allclose(ds.child.sel(metric="hessian_top_eigenvalue_end", time=grid.epochs(spawn), spawn=1),
                               hessian.top_eigenvalues(hvp, 1, h.lanczos_steps, h.seed)[0], rtol=1e-4)
    assert ds.child.sel(metric="hessian_top_eigenvalue_end").notnull().sum() == 2 * len(grid.spawn)


def test_per_layer_kernels_sum_to_the_kernel_and_their_metrics_are_each_layers_own(clean_run, npz):
    ds, run_dir = clean_run
    config, arrays, grid = _setup(npz)
    job = RunDir(run_dir).parent
    whole = [np.load(job.kernel_path(s)) for s in grid.checkpoints]
    layers = [np.load(job.layer_kernel_path(s)) for s in grid.checkpoints]
    assert list(ds.layer.values) == ["conv0", "conv1", "conv2", "logits"] and layers[0].shape == (4, 20, 20)
    for K, K_layers in zip(whole, layers):  # two float32 contractions of the same features: rounding apart
        np.testing.assert_allclose(K_layers.sum(axis=0), K, rtol=1e-5, atol=1e-6 * np.abs(K).max())

    _, y_probe = data.probe_subset(arrays.x_train, arrays.y_train, config.ntk.probe_size, config.ntk.probe_seed)
    times, dt = grid.epochs(np.array(grid.checkpoints)), grid.epochs(grid.velocity_dt)
    onehot = np.eye(arrays.num_classes)[y_probe]
    center = np.eye(len(y_probe)) - 1 / len(y_probe)

    def distance(a, b):
        return 1 - np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b))

    def alignment(K):
        Kc, Yc = center @ K @ center, center @ onehot @ onehot.T @ center
        return np.sum(Kc * Yc) / np.sqrt(np.sum(Kc * Kc) * np.sum(Yc * Yc))

    per_layer = ds.parent_layer
    for l, name in enumerate(ds.layer.values):
        at = dict(layer=name)
        np.testing.assert_allclose(per_layer.sel(metric="kernel_distance_from_init", **at),
                                   [distance(layers[0][l], K[l]) for K in layers], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(per_layer.sel(metric="kernel_alignment", **at),
                                   [alignment(K[l]) for K in layers], rtol=1e-9)
        velocity = per_layer.sel(metric="kernel_velocity", **at).values
        for i, t in enumerate(times):
            partner = np.flatnonzero(np.isclose(times, t + dt))
            expected = distance(layers[i][l], layers[partner[0]][l]) / dt if len(partner) else np.nan
            np.testing.assert_allclose(velocity[i], expected, rtol=1e-9)
    assert np.isfinite(per_layer.sel(metric="kernel_velocity")).sum() == 3 * 4  # spawn times 0, 0.5, 1 have partners


def test_monitor_and_measure_parent_write_the_same_metrics_on_the_same_kernels(clean_run, npz):
    """NTKMonitor fed the run's cached kernels at the run's steps and learning rates writes the metric names and
    values of the run's parent.nc (issue 11: one kernel trajectory)."""
    ds, run_dir = clean_run
    config, arrays, grid = _setup(npz)
    job = RunDir(run_dir).parent
    x_probe, y_probe = data.probe_subset(arrays.x_train, arrays.y_train, config.ntk.probe_size, config.ntk.probe_seed)
    model = keras.Sequential([keras.Input(arrays.input_shape), keras.layers.Flatten(), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    kernels = iter([np.load(job.kernel_path(s)) for s in grid.checkpoints])
    monitor = callbacks.NTKMonitor(x_probe, y_probe, velocity_dt=config.ntk.velocity_dt)
    monitor.set_model(model)
    monitor._ntk_fn, monitor.steps_per_epoch = (lambda x: next(kernels)), grid.steps_per_epoch
    for step in grid.checkpoints:
        model.optimizer.learning_rate = job.meta(step)["learning_rate"]
        monitor._act(step, None)
    written = monitor.dataset().parent
    names = [str(m) for m in written.metric.values]
    kernel_names = {n for n in ds.parent.dropna("metric", how="all").metric.values if n.startswith("kernel_")}
    assert set(names) == kernel_names | {"learning_rate"} and "kernel_top_eigenvalue" in names
    # float64 metrics of identical kernels: equal; only the learning rate passed the optimizer's float32 variable
    for name in names:
        rtol = 1e-7 if name in ("learning_rate", "kernel_velocity_per_lr") else 0
        np.testing.assert_allclose(written.sel(metric=name), ds.parent.sel(metric=name), rtol=rtol, err_msg=name)
    np.testing.assert_array_equal(monitor.dataset().kernel_distance, ds.kernel_distance)


@pytest.mark.slow  # one more tiny training; test_plots draws several runs in the default suite
def test_replicates_run_one_directory_per_seed_and_report_mean_and_spread(clean_run, npz, tmp_path):
    """`kerasntk run --seeds 0,1`: seed 0 is the clean run (copied: its jobs are done), seed 1 trains anew."""
    _, run_dir = clean_run
    shutil.copytree(run_dir, tmp_path / "seed0")
    args = ["-q", "run", "--seeds", "0,1", "--out", str(tmp_path)] + [f"--set={item}" for item in tiny(npz)]
    assert cli.main(args) == 0
    one, other = (results.load(tmp_path / f"seed{s}" / "results.nc") for s in (0, 1))
    assert cfg.from_dict(__import__("json").loads(other.attrs["config"])).train.seed == 1
    assert not np.allclose(one.parent.sel(metric="test_loss"), other.parent.sel(metric="test_loss"))
    assert {f"{name}.png" for name in ("sharpness", "layer_kernel_velocity", "kernel_dynamics")} <= \
        {p.name for p in (tmp_path / "figures").iterdir()}

    runs = results.open_runs([tmp_path / "seed0", tmp_path / "seed1"])
    fig = plots.sharpness(runs)
    line = fig.axes[0].get_lines()[0]
    mean = xr.concat([one, other], "run").parent.sel(metric="hessian_top_eigenvalue").mean("run").values
    np.testing.assert_allclose(line.get_ydata(), mean, rtol=1e-12)
    assert "mean of 2 runs" in fig.axes[0].get_legend().get_texts()[0].get_text()
    assert cli.main(["-q", "report", str(tmp_path / "seed0"), str(tmp_path / "seed1"), "--out",
                     str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "layer_kernel_velocity.pdf").exists()
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["report"])
    assert cli.main(["-q", "report", str(tmp_path / "seed0"), str(tmp_path / "seed1")]) == 2  # needs --out
