"""Figures from a synthetic merged run: every figure is written, absent variables are skipped cleanly."""

import logging

import numpy as np
import pytest
from matplotlib import image

from kerasntk import plots
from kerasntk import results as rs

TIMES = np.array([0.0, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0])
SPAWN = [0, 2, 4, 5, 6, 7, 8, 9]  # indices of the spawn times
PAIRS = [(0, 1), (0, 2), (1, 2)]
ALPHAS = np.linspace(0, 1, 11)
FIGURES = ("barrier_vs_spawn_time", "interpolation_curves", "kernel_dynamics", "kernel_distance_matrix",
           "correlation_matrix", "child_error_vs_spawn_time", "linearized_error", "sharpness", "layer_kernel_velocity")
LAYERS = ["conv0", "conv1", "logits"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return synthetic_run(tmp_path_factory.mktemp("jobs"))


def synthetic_run(tmp_path):
    """A merged run shaped like the paper's: barriers and kernel velocity decay with time."""
    rng = np.random.default_rng(0)
    steps = (TIMES * 100).astype(np.int64)
    decay = np.exp(-TIMES / 1.5)
    kernels = np.cumsum(rng.standard_normal((len(TIMES), 20)) * decay[:, None], axis=0) + 5.0
    cos = kernels @ kernels.T / np.outer(np.linalg.norm(kernels, axis=1), np.linalg.norm(kernels, axis=1))
    parent = dict(test_error=0.2 + 0.7 * decay, kernel_velocity=0.05 + 2 * decay,
                  kernel_distance_from_init=1 - cos[0], kernel_distance_to_final=1 - cos[-1],
                  linearized_test_error=0.25 + 0.5 * decay, learning_rate=0.05 * (1 + np.cos(np.pi * TIMES / 30)),
                  hessian_top_eigenvalue=40 * (1 - decay) + 1, hessian_trace=400 * (1 - decay) + 10,
                  hessian_trace_stderr=np.full(len(TIMES), 5.0))
    layer = dict(kernel_velocity=np.outer(0.05 + 2 * decay, [3.0, 2.0, 1.0]),
                 kernel_distance_from_init=np.outer(1 - cos[0], [0.5, 1.0, 1.5]))
    jobs = [rs.parent_dataset(steps, TIMES, parent, kernel_distance=1 - cos, layer_metrics=layer, layers=LAYERS)]
    for i in SPAWN:
        barrier = 0.5 * decay[i] + 0.02 * rng.random(3)
        hump = 4 * ALPHAS * (1 - ALPHAS)
        curves = dict(test_error=0.2 + np.outer(barrier, hump), test_loss=0.6 + 2 * np.outer(barrier, hump))
        metrics = dict(error_barrier=barrier, loss_barrier=2 * barrier, train_error_barrier=0.8 * barrier,
                       disagreement=0.6 * barrier + 0.05, weight_distance=10 * barrier + 1)
        jobs.append(rs.pair_dataset(steps[i], TIMES[i], PAIRS, metrics, ALPHAS, curves))
        jobs += [rs.child_dataset(steps[i], TIMES[i], c, dict(test_error=0.2 + 0.1 * decay[i] + 0.01 * c))
                 for c in range(3)]
    paths = []
    for k, ds in enumerate(jobs):
        paths.append(tmp_path / f"job{k}.nc")
        rs.write_atomic(ds, paths[-1])
    return rs.merge(paths)


def test_report_writes_every_figure_as_png_and_pdf(run, tmp_path):
    paths = plots.report(run, tmp_path / "figures")
    expected = {str(tmp_path / "figures" / f"{name}.{ext}") for name in FIGURES for ext in ("png", "pdf")}
    assert set(paths) == expected
    png = image.imread(tmp_path / "figures" / "barrier_vs_spawn_time.png")
    assert png.shape[0] > 300 and png.shape[1] > 600 and png[..., :3].std() > 0.05  # not blank


def test_figures_are_labelled(run):
    ds = run
    for name in FIGURES:
        fig = getattr(plots, name)(ds)
        assert fig._suptitle is not None and fig._suptitle.get_text(), name
        for ax in fig.axes:
            if ax.get_label() == "<colorbar>":
                continue
            assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel(), (name, ax.get_title())
    labels = [t.get_text() for t in plots.correlation_matrix(ds).axes[0].get_yticklabels()]
    assert labels[0] == "error_barrier (pair)" and "test_error (child)" in labels  # key metrics, with source
    assert all(label.split(" (")[0] in plots.CORRELATED for label in labels)
    barrier_axes = plots.barrier_vs_spawn_time(ds).axes[0]
    assert barrier_axes.get_xscale() == "symlog"  # spawn time 0 stays on the log-like axis
    assert {t.get_text() for t in barrier_axes.get_legend().get_texts()} >= {"test set", "train set"}


def test_sharpness_and_layer_velocity_figures_draw_the_values(run):
    ax = plots.sharpness(run).axes[0]
    sharp, limit = ax.get_lines()[:2]
    np.testing.assert_allclose(sharp.get_ydata(), run.parent.sel(metric="hessian_top_eigenvalue"))
    lr = run.parent.sel(metric="learning_rate").values
    np.testing.assert_allclose(limit.get_ydata(), 2 / lr[lr > 0])  # the decayed end (lr 0) has no limit
    assert limit.get_label() == "2 / learning rate" and ax.get_yscale() == "log"
    heat = plots.layer_kernel_velocity(run).axes[0]
    image = heat.get_images()[0].get_array()
    np.testing.assert_allclose(image, run.parent_layer.sel(metric="kernel_velocity").transpose("layer", "time"))
    assert [t.get_text() for t in heat.get_yticklabels()] == LAYERS


def test_several_runs_are_drawn_as_mean_and_band_with_their_number(run, tmp_path):
    other = run.copy(deep=True)
    other["parent"] = other.parent * 1.5
    other["pair"] = other.pair * 0.5
    for name, ds in (("a", run), ("b", other)):
        rs.write_atomic(ds, tmp_path / f"{name}.nc")
    runs = rs.open_runs([tmp_path / "a.nc", tmp_path / "b.nc"], names=["a", "b"])
    assert set(plots.report(runs, tmp_path / "figures")) == {
        str(tmp_path / "figures" / f"{name}.{ext}") for name in FIGURES for ext in ("png", "pdf")}
    ax = plots.kernel_dynamics(runs).axes[0]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), 1.25 * run.parent.sel(metric="kernel_velocity"))
    band = ax.collections[0].get_paths()[0].vertices[:, 1]  # the min-max band: from run a's to run b's values
    assert band.min() == pytest.approx(float(run.parent.sel(metric="kernel_velocity").min()))
    assert band.max() == pytest.approx(1.5 * float(run.parent.sel(metric="kernel_velocity").max()))
    assert ax.get_legend().get_texts()[0].get_text() == "kernel velocity (mean of 2 runs, band: min–max)"
    barrier = plots.barrier_vs_spawn_time(runs).axes[0].get_lines()[0].get_ydata()
    expected = 0.75 * run.pair.sel(metric="error_barrier").mean("child_pair").dropna("time").values
    np.testing.assert_allclose(barrier, expected)
    assert "mean of 2 runs" in plots.kernel_distance_matrix(runs)._suptitle.get_text()


def test_absent_variables_are_skipped_with_a_log_line(tmp_path, caplog):
    parent_only = rs.parent_dataset([0, 10, 20], [0.0, 0.5, 1.0], dict(test_error=[0.9, 0.5, 0.4]))
    with caplog.at_level(logging.INFO, logger="kerasntk.plots"):
        paths = plots.report(parent_only, tmp_path)
    assert paths == []
    skipped = [r.getMessage() for r in caplog.records if "skipping figure" in r.getMessage()]
    assert len(skipped) == len(FIGURES)
    assert any("linearized_test_error" in m for m in skipped)


def test_partial_run_draws_only_what_it_has(run, tmp_path):
    ds = run.drop_vars(["kernel_distance", "correlation", "path"])
    names = {p.rsplit("/", 1)[1].split(".")[0] for p in plots.report(ds, tmp_path)}
    assert names == set(FIGURES) - {"kernel_distance_matrix", "correlation_matrix", "interpolation_curves"}
