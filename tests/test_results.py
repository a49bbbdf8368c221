"""Results schema: NetCDF round trips, atomic writes under SIGKILL, merging with missing jobs, correlation."""

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap

import netCDF4
import numpy as np
import pint_xarray  # noqa: F401  (registers the .pint accessor)
import pytest
import scipy.stats
import xarray as xr

from kerasntk import fs
from kerasntk import results as rs
from kerasntk.rundir import RunDir

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import cf_check  # noqa: E402

TIMES = np.array([0.0, 0.25, 1.0, 4.0])
STEPS = np.array([0, 25, 100, 400])
SPAWN_TIMES = (0, 2)  # indices into TIMES
PAIRS = [(0, 1), (0, 2), (1, 2)]
ALPHAS = np.linspace(0, 1, 5)


def _parent(attrs=None):
    rng = np.random.default_rng(0)
    metrics = dict(test_error=np.array([0.9, 0.5, 0.3, 0.2]), kernel_velocity=rng.random(4))
    return rs.parent_dataset(STEPS, TIMES, metrics, kernel_distance=rng.random((4, 4)), attrs=attrs)


def _child(i, c):
    return rs.child_dataset(STEPS[i], TIMES[i], c, dict(test_error=0.1 * i + 0.01 * c, test_loss=1.0 + c))


def _pair(i, pairs=PAIRS):
    p = len(pairs)
    curves = dict(test_error=np.arange(p * len(ALPHAS), dtype=float).reshape(p, -1) + i)
    return rs.pair_dataset(STEPS[i], TIMES[i], pairs, dict(error_barrier=np.arange(p) + 0.5 * i), ALPHAS, curves)


def _write_run(run_dir, skip_children=()):
    rs.write_atomic(_parent(attrs=dict(title="run", config="{}")), RunDir(run_dir).result("parent"))
    for i in SPAWN_TIMES:
        rs.write_atomic(_pair(i), RunDir(run_dir).result("pair", STEPS[i]))
        for c in range(3):
            if (i, c) not in skip_children:
                rs.write_atomic(_child(i, c), RunDir(run_dir).result("child", STEPS[i], c))


def test_job_datasets_round_trip_through_netcdf(tmp_path):
    for ds in (_parent(), _child(2, 1), _pair(2)):
        rs.write_atomic(ds, tmp_path / "x.nc")
        loaded = xr.load_dataset(tmp_path / "x.nc", engine="netcdf4")
        xr.testing.assert_identical(loaded, ds)
        assert loaded["time"].dtype == np.float64 and loaded["time"].attrs["units"] == "1"
        assert loaded["step"].dtype == np.int32 and loaded["step"].dims == ("time",)
        for name in loaded.data_vars:
            assert {"long_name", "units"} <= set(loaded[name].attrs), name


def test_dataset_layout_and_units():
    pair = _pair(0, pairs=[(1, 2), (0, 1)])  # given out of order: stored in canonical pair order
    assert pair["path"].dims == ("time", "child_pair", "alpha", "metric")
    assert list(pair["child_pair"].values) == [0, 2]
    assert list(pair["spawn_a"].values) == [0, 1] and list(pair["spawn_b"].values) == [1, 2]
    np.testing.assert_array_equal(pair["pair"].sel(metric="error_barrier").values[0], [1.0, 0.0])
    assert np.isnan(pair["pair"].sel(metric="test_error")).all()  # path-only metric
    parent = _parent()
    assert parent["parent"].attrs["units"] == "1"
    assert parent["metric_units"].sel(metric="kernel_velocity").item() == "1"
    assert "per epoch" in parent["metric_long_name"].sel(metric="kernel_velocity").item()
    assert _child(0, 0)["child"].attrs["units"] == "1"
    assert parent["kernel_distance"].dims == ("time", "time_b")


def test_metrics_of_several_units_leave_the_stacked_variable_without_units(monkeypatch):
    monkeypatch.setitem(rs.METRICS, "wall_time", ("seconds since the start of training", "s"))
    ds = rs.parent_dataset(STEPS, TIMES, dict(test_error=[0.9, 0.5, 0.3, 0.2], wall_time=[0.0, 1.5, 6.0, 24.0]))
    assert "units" not in ds["parent"].attrs and "metric_units" in ds["parent"].attrs["comment"]
    alone = rs.parent_dataset(STEPS, TIMES, dict(wall_time=[0.0, 1.5, 6.0, 24.0]))
    assert alone["parent"].attrs["units"] == "s" and "comment" not in alone["parent"].attrs


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown metric.*'accuracy'"):
        rs.child_dataset(0, 0.0, 0, dict(accuracy=0.5))
    with pytest.raises(ValueError, match="a < b"):
        rs.pair_dataset(0, 0.0, [(1, 1)], dict(error_barrier=[0.0]), ALPHAS, {})
    with pytest.raises(ValueError, match=r"test_error must have shape \(4,\)"):
        rs.parent_dataset(STEPS, TIMES, dict(test_error=[0.1, 0.2]))
    with pytest.raises(ValueError, match="distinct times"):
        rs.parent_dataset([0, 0], [1.0, 1.0], dict(test_error=[0.1, 0.2]))
    with pytest.raises(ValueError, match="job kind"):
        RunDir("run").result("grandchild")
    with pytest.raises(ValueError, match="no result files"):
        rs.merge("/nonexistent-run-dir")


def test_merge_combines_jobs_and_fills_missing_children_with_nan(tmp_path):
    _write_run(tmp_path, skip_children={(2, 1)})
    ds = rs.merge(tmp_path)
    assert dict(ds.sizes) == dict(time=4, time_b=4, spawn=3, child_pair=3, alpha=5, metric=4, metric_b=4)
    assert ds["step"].dtype == np.int32 and list(ds["step"].values) == list(STEPS)
    assert ds.attrs["title"] == "run"  # global attributes come from parent.nc
    child = ds["child"].sel(metric="test_error")
    assert np.isnan(child.isel(time=2, spawn=1)) and child.isel(time=2, spawn=2) == pytest.approx(0.22)
    assert np.isnan(child.isel(time=1)).all()  # no children spawned at t=0.25
    assert np.isnan(ds["parent"].sel(metric="error_barrier")).all()
    np.testing.assert_array_equal(ds["pair"].sel(metric="error_barrier").isel(time=2), [1.0, 2.0, 3.0])
    assert list(ds["spawn_b"].values) == [1, 2, 2]
    assert ds["metric_units"].sel(metric="kernel_velocity").item() == "1"
    assert ds["correlation"].dims == ("metric", "metric_b") and ds["correlation"].attrs["units"] == "1"
    rs.write_atomic(ds, tmp_path / "results.nc")
    reopened = rs.open_run(tmp_path / "results.nc")
    assert {"time", "spawn", "metric"} <= set(reopened.dims)
    xr.testing.assert_identical(reopened, ds)
    xr.testing.assert_identical(rs.open_run(tmp_path), ds)


def test_merge_rejects_disagreeing_steps(tmp_path):
    _write_run(tmp_path)
    rs.write_atomic(rs.child_dataset(999, TIMES[2], 0, dict(test_error=0.1)), RunDir(tmp_path).result("child", 999, 0))
    with pytest.raises(ValueError, match="disagree on step"):
        rs.merge(tmp_path)


def _correlation_case():
    """Six times, children spawned at five of them (not t=0.5); ties in the barrier."""
    times = np.array([0.0, 0.1, 0.5, 1.0, 2.0, 4.0])
    barrier = np.array([[0.6, 0.5, 0.7], [0.4, 0.3, 0.5], [np.nan] * 3, [0.1, 0.1, 0.1],
                        [0.1, 0.1, 0.1], [0.0, 0.02, 0.01]])
    velocity = np.array([5.0, 3.0, 2.5, 2.0, 2.2, 1.0])
    parent_error = np.array([0.9, 0.7, 0.6, 0.5, 0.4, 0.3])
    child_error = np.array([[0.30, 0.32], [0.28, 0.29], [np.nan] * 2, [0.25, 0.27], [0.26, 0.26], [0.25, 0.25]])
    parts = [rs.parent_dataset(np.arange(6), times, dict(kernel_velocity=velocity, test_error=parent_error))]
    for i, t in enumerate(times):
        if i != 2:
            parts.append(rs.pair_dataset(i, t, PAIRS, dict(error_barrier=barrier[i]), ALPHAS, {}))
            parts += [rs.child_dataset(i, t, c, dict(test_error=child_error[i, c])) for c in range(2)]
    return parts, barrier, velocity, child_error


def test_correlation_equals_scipy_spearman_on_a_hand_made_case(tmp_path):
    parts, barrier, velocity, child_error = _correlation_case()
    for k, ds in enumerate(parts):
        rs.write_atomic(ds, tmp_path / f"{k}.nc")
    ds = rs.merge(sorted(glob.glob(str(tmp_path / "*.nc"))))
    spawned = [0, 1, 3, 4, 5]  # t=0.5 had no children, so it does not count
    mean_barrier, mean_child = barrier[spawned].mean(1), child_error[spawned].mean(1)
    corr = ds["correlation"]
    expected = scipy.stats.spearmanr(mean_barrier, velocity[spawned]).statistic
    assert corr.sel(metric="error_barrier", metric_b="kernel_velocity") == pytest.approx(expected, abs=1e-12)
    # test_error is in child and parent: the children's mean is the summary
    expected = scipy.stats.spearmanr(mean_child, mean_barrier).statistic
    assert corr.sel(metric="test_error", metric_b="error_barrier") == pytest.approx(expected, abs=1e-12)
    assert corr["summary_of"].sel(metric="test_error").item() == "child"
    assert corr.sel(metric="kernel_velocity", metric_b="kernel_velocity") == pytest.approx(1.0)
    pearson = rs.correlation(ds, method="pearson").sel(metric="error_barrier", metric_b="kernel_velocity")
    assert pearson == pytest.approx(np.corrcoef(mean_barrier, velocity[spawned])[0, 1], abs=1e-12)
    with pytest.raises(ValueError, match="method must be"):
        rs.correlation(ds, method="kendall")


def test_rank_matches_scipy_rankdata_with_ties():
    x = np.random.default_rng(1).integers(0, 5, 40).astype(float)
    np.testing.assert_array_equal(rs._rank(x), scipy.stats.rankdata(x))


def test_write_atomic_failure_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "results" / "parent.nc"
    rs.write_atomic(_parent(), target)
    before = target.read_bytes()

    def broken(self, path, **kw):
        with open(path, "wb") as f:
            f.write(b"CDF half a file")
        raise OSError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", broken)
    with pytest.raises(OSError, match="disk full"):
        rs.write_atomic(_child(0, 0), target)
    assert target.read_bytes() == before and fs.seal_problem(target) is None  # the old file, still sealed
    assert sorted(os.listdir(target.parent)) == ["parent.nc", "parent.nc.sha256"]


def test_sigkill_during_write_atomic_leaves_no_partial_file(tmp_path):
    """A child process is SIGKILLed inside write_atomic after the data is written but before the rename
    (os.fsync is hooked to block there): the target keeps its old complete content and merge ignores the
    leftover hidden temporary file."""
    target = RunDir(tmp_path).result("child", 0, 0)
    rs.write_atomic(_child(0, 0), target)
    before = open(target, "rb").read()
    script = textwrap.dedent(f"""
        import os, sys, time
        import numpy as np
        from kerasntk import results as rs
        def blocking_fsync(fd):
            print("writing", flush=True)
            time.sleep(600)
        os.fsync = blocking_fsync
        ds = rs.child_dataset(0, 0.0, 0, dict(test_error=0.5))
        rs.write_atomic(ds, {str(target)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        leftovers = glob.glob(os.path.join(os.path.dirname(target), ".*.tmp*"))
        assert len(leftovers) == 1 and os.path.getsize(leftovers[0]) > 0  # the new data exists, unrenamed
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert open(target, "rb").read() == before
    merged = rs.merge(tmp_path)
    assert merged["child"].sel(metric="test_error").item() == 0.0


def test_global_attrs_are_netcdf_serialisable(tmp_path):
    attrs = rs.global_attrs(dict(model=dict(name="cnn1d"), epochs=30), seeds=dict(parent=0, children=[1, 2]))
    assert attrs["Conventions"] == "CF-1.8" and "2010.15110" in attrs["references"]
    assert attrs["source"].startswith("kerasntk ")
    assert json.loads(attrs["config"]) == dict(model=dict(name="cnn1d"), epochs=30)
    assert json.loads(attrs["seeds"])["children"] == [1, 2]
    assert attrs["tensorflow_version"] != "not installed" and attrs["git_commit"]
    rs.write_atomic(_parent(attrs), tmp_path / "p.nc")
    assert xr.load_dataset(tmp_path / "p.nc").attrs["config"] == attrs["config"]


def test_files_follow_cf_on_disk(tmp_path):
    """int32 indices, no fill value on coordinates, `coordinates` attributes naming only what describes each
    variable (summary_of describes the correlations, not parent/child/pair/path)."""
    _write_run(tmp_path)
    rs.write_atomic(rs.merge(tmp_path), tmp_path / "results.nc")
    with netCDF4.Dataset(tmp_path / "results.nc") as nc:
        for name in ("step", "spawn", "child_pair", "spawn_a", "spawn_b"):
            assert nc[name].dtype == np.int32, name
        for name in ("time", "time_b", "alpha", "requested_time"):
            assert "_FillValue" not in nc[name].ncattrs(), name
        for name in ("parent", "child", "pair", "path"):
            assert "summary_of" not in nc[name].coordinates.split() and "metric_units" in nc[name].coordinates.split()
        assert "summary_of" in nc["correlation"].coordinates.split() and nc["correlation"].units == "1"
        assert nc["time"].units == "1" and "epochs" in nc["time"].long_name


def test_requested_times_select_what_was_asked_for(tmp_path):
    """A spawn asked at 0.25 epoch lands on step 16 of 62 (0.258): requested_time keeps 0.25 through the job
    files, merge and NetCDF; job files written without requested_time count as asked at their exact time."""
    steps = np.array([0, 16, 124])
    times, asked = steps / 62, np.array([0.0, 0.25, 2.0])
    rs.write_atomic(rs.parent_dataset(steps, times, dict(test_error=[0.9, 0.5, 0.2]), requested_times=asked),
                    RunDir(tmp_path).result("parent"))
    rs.write_atomic(rs.child_dataset(16, times[1], 0, dict(test_error=0.3), requested_time=0.25),
                    RunDir(tmp_path).result("child", 16, 0))
    rs.write_atomic(rs.child_dataset(0, 0.0, 0, dict(test_error=0.4)).drop_vars("requested_time"),
                    RunDir(tmp_path).result("child", 0, 0))  # an older file
    rs.write_atomic(rs.merge(tmp_path), tmp_path / "results.nc")
    ds = xr.open_dataset(tmp_path / "results.nc").set_xindex("requested_time")
    np.testing.assert_array_equal(ds["requested_time"].values, asked)
    at = ds.sel(requested_time=0.25)
    assert at["time"].item() == 16 / 62 and at["step"].item() == 16
    assert at["child"].sel(metric="test_error", spawn=0).item() == 0.3
    assert ds.sel(requested_time=[0.0, 2.0])["parent"].sel(metric="test_error").values.tolist() == [0.9, 0.2]
    with pytest.raises(KeyError):
        ds.sel(time=0.25)  # the exact time is 0.258...


def test_open_runs_joins_runs_of_different_grids_along_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write_run(a)
    times_b, steps_b = np.array([0.0, 0.5, 4.0]), np.array([0, 31, 248])  # another grid, 62 steps per epoch
    rs.write_atomic(rs.parent_dataset(steps_b, times_b, dict(test_error=[0.8, 0.4, 0.1], train_loss=[2.0, 1.0, 0.1]),
                                      requested_times=[0.0, 0.5, 4.0], attrs=dict(title="run", config='{"x": 1}')),
                    RunDir(b).result("parent"))
    rs.write_atomic(rs.child_dataset(31, 0.5, 0, dict(test_error=0.25)), RunDir(b).result("child", 31, 0))
    runs = rs.open_runs([a, b], names=["a", "b"])
    assert list(runs["run"].values) == ["a", "b"] and runs.chunks == {}  # in memory, no dask
    assert list(runs["time"].values) == [0.0, 0.25, 0.5, 1.0, 4.0]
    parent = runs["parent"].sel(metric="test_error")
    np.testing.assert_array_equal(parent.sel(run="a").values, [0.9, 0.5, np.nan, 0.3, 0.2])
    np.testing.assert_array_equal(parent.sel(run="b").values, [0.8, np.nan, 0.4, np.nan, 0.1])
    assert runs["child"].sel(run="b", time=0.5, spawn=0, metric="test_error").item() == 0.25
    assert np.isnan(runs["pair"].sel(run="b")).all()
    assert np.isnan(runs["parent"].sel(run="a", metric="train_loss")).all()
    np.testing.assert_array_equal(runs["step"].sel(run="b").values, [0, np.nan, 31, np.nan, 248])
    assert runs["step"].dims == ("run", "time") and runs["metric_units"].dims == ("metric",)
    assert runs.attrs == dict(title="run")  # the attributes the runs share; their configs differ
    xr.testing.assert_identical(runs.sel(run="a", drop=True)["kernel_distance"].dropna("time", how="all")
                                .dropna("time_b", how="all").drop_vars(["step", "requested_time"]),
                                rs.open_run(a)["kernel_distance"].drop_vars(["step", "requested_time"]))
    with pytest.raises(ValueError, match="distinct names"):
        rs.open_runs([a, b], names=["x", "x"])


def test_by_metric_gives_variables_pint_can_quantify(monkeypatch):
    monkeypatch.setitem(rs.METRICS, "wall_time", ("seconds since the start of training", "s"))
    ds = rs.parent_dataset(STEPS, TIMES, dict(test_error=[0.9, 0.5, 0.3, 0.2], wall_time=[0.0, 1.5, 6.0, 24.0]),
                           kernel_distance=np.zeros((4, 4)))
    split = rs.by_metric(ds["parent"])
    assert set(split.data_vars) == {"test_error", "wall_time"} and split["wall_time"].dims == ("time",)
    assert split["test_error"].attrs == dict(long_name=rs.METRICS["test_error"][0], units="1")
    quantified = split.pint.quantify()
    assert str(quantified["test_error"].pint.units) == "dimensionless"
    np.testing.assert_allclose(quantified["wall_time"].pint.to("ms").pint.magnitude, [0.0, 1500.0, 6000.0, 24000.0])
    merged = rs.by_metric(_pair(0)["pair"])  # metrics without a value (the path-only test_error) are left out
    assert list(merged.data_vars) == ["error_barrier"]
    with pytest.raises(ValueError, match="metric dimension"):
        rs.by_metric(ds["kernel_distance"])


def test_a_run_passes_the_cf_checker_but_for_the_documented_time_axis(clean_run):
    """The IOOS checker (offline, ~1 s) on a tiny experiment's results.nc: no high-priority failure but
    §5.1, which CF's reading of a dimension called `time` as calendar time forces (README "Results")."""
    path = clean_run[1] / "results.nc"
    scored, possible, failures, _ = cf_check.check(str(path))
    assert set(failures) == set(cf_check.FORCED), failures
    assert scored >= possible - 6  # §5.1 is worth 6 points (one per variable on `time`, parent_layer included)
    quantified = xr.open_dataset(path).pint.quantify()  # every unit in the file is one pint reads
    assert {str(v.pint.units) for v in quantified.data_vars.values()} == {"dimensionless"}
