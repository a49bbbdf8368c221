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
           "correlation_matrix", "child_error_vs_spawn_time", "linearized_error")


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
                  linearized_test_error=0.25 + 0.5 * decay)
    jobs = [rs.parent_dataset(steps, TIMES, parent, kernel_distance=1 - cos)]
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
