"""The results schema (README "Results"; metric definitions in docs/methods.md): xarray Datasets per job, atomic NetCDF writes,
merging job files into one Dataset, and the correlation of metrics across spawn time.

Stacked variables `parent(time, metric)`, `child(time, spawn, metric)`, `pair(time, child_pair, metric)` and
`path(time, child_pair, alpha, metric)` hold metrics of different units; each metric's description and units
are the coordinates `metric_long_name(metric)` and `metric_units(metric)`; `by_metric` splits them into one
variable per metric with its own long_name and units. Missing values are NaN.
The pair dimension is called `child_pair` (coordinates spawn_a, spawn_b): xarray cannot give a dimension
and a multi-dimensional variable (`pair`) the same name.
`time` is the exact time of a step in epochs; `requested_time(time)` the time the config asked for (e.g. 0.25
where `time` is 16/62 = 0.258): `ds.set_xindex("requested_time").sel(requested_time=0.25)` selects by it
(no index is kept on it by default: two indexes on `time` would make runs with other grids unalignable).
Files follow CF-1.8 (`cf_check.py` in benchmarks/ runs the IOOS checker): int32 indices, no fill values on
coordinates, UDUNITS units ("1" for epochs and every dimensionless quantity).
"""

import contextlib
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import subprocess
import sys

import numpy as np
import pandas as pd
import xarray as xr

from kerasntk import fs, rundir

log = logging.getLogger(__name__)

ENGINE = "netcdf4"

# name -> (long_name, units); units as UDUNITS writes them, "1" when dimensionless (errors, losses in nats,
# distances of weights, rates per epoch: UDUNITS has no epoch, so the long name says "per epoch").
# Extend this dict to record metrics of your own.
METRICS = {
    "test_error": ("0-1 error on the test set", "1"),
    "test_loss": ("mean cross-entropy on the test set (nats)", "1"),
    "train_error": ("0-1 error on the training set", "1"),
    "train_loss": ("mean cross-entropy on the training set (nats)", "1"),
    "learning_rate": ("learning rate of the optimizer", "1"),
    "diverged": ("1 when the training loss became non-finite (spawn.diverged=record), else 0", "1"),
    "diverged_at_epoch": ("time in epochs at which the training loss became non-finite", "1"),
    "kernel_velocity": ("NTK velocity S(K_t, K_t+dt) / dt, per epoch", "1"),
    "kernel_velocity_per_lr": ("NTK velocity divided by the learning rate, per epoch", "1"),
    "kernel_distance_from_init": ("NTK distance S(K_0, K_t) from the initial kernel", "1"),
    "kernel_distance_to_final": ("NTK distance S(K_t, K_T) to the final kernel", "1"),
    "kernel_alignment": ("centred kernel-target alignment of the NTK", "1"),
    "kernel_alignment_uncentered": ("uncentred kernel-target alignment of the NTK", "1"),
    "kernel_top_eigenvalue": ("largest eigenvalue of the NTK on the probe set", "1"),
    "kernel_effective_rank": ("effective rank of the NTK on the probe set", "1"),
    "hessian_top_eigenvalue": ("largest eigenvalue of the training loss's Hessian (sharpness)", "1"),
    "hessian_trace": ("trace of the training loss's Hessian (Hutchinson estimate)", "1"),
    "hessian_trace_stderr": ("standard error of the Hutchinson estimate of the Hessian trace", "1"),
    "hessian_top_eigenvalue_end": ("largest eigenvalue of the training loss's Hessian at the end of training", "1"),
    "weight_distance_from_init": ("L2 distance of the trainable weights from initialization", "1"),
    "relative_weight_distance_from_init": ("weight distance from init over the parent's |w_T - w_0|", "1"),
    "linearized_test_error": ("test error of the network linearized at time t, trained on the train set", "1"),
    "linearized_test_loss": ("test cross-entropy of the network linearized at time t (nats)", "1"),
    "linearized_val_selected_test_error": ("linearized network test error at the validation-best epoch", "1"),
    "error_barrier": ("test-error barrier: max over the linear path minus the endpoint mean", "1"),
    "loss_barrier": ("test-loss barrier: max over the linear path minus the endpoint mean (nats)", "1"),
    "train_error_barrier": ("train-error barrier along the linear path", "1"),
    "train_loss_barrier": ("train-loss barrier along the linear path (nats)", "1"),
    "disagreement": ("fraction of test inputs whose predicted classes differ", "1"),
    "js_divergence": ("mean Jensen-Shannon divergence of the softmax outputs on the test set (nats)", "1"),
    "weight_distance": ("L2 distance between the trainable weights", "1"),
    "relative_weight_distance": ("weight distance over the parent's |w_T - w_0|", "1"),
    "cosine_similarity": ("cosine similarity of the trainable weights", "1"),
    "kernel_distance": ("distance S(K, K') between the final NTKs", "1"),
    **{f"{name}_to_parent": (f"{text}, child vs the parent's final weights", "1") for name, text in (
        ("error_barrier", "test-error barrier"), ("loss_barrier", "test-loss barrier (nats)"),
        ("train_error_barrier", "train-error barrier"), ("train_loss_barrier", "train-loss barrier (nats)"),
        ("disagreement", "test disagreement"), ("js_divergence", "mean Jensen-Shannon divergence (nats)"),
        ("weight_distance", "L2 weight distance"), ("relative_weight_distance", "relative weight distance"),
        ("cosine_similarity", "cosine similarity of weights"), ("kernel_distance", "NTK distance"))},
}

# variables stacking metrics along `metric` (their units are the metrics' own, when they share one)
_STACKED = ("parent", "parent_layer", "child", "pair", "path")

_VARIABLES = {
    "parent": "metrics of the parent network at time t",
    "parent_layer": "metrics of the parent's per-layer NTK at time t: each layer's kernel alone",
    "child": "end-of-training metrics of child `spawn` spawned from the parent at time t",
    "pair": "metrics between children spawn_a and spawn_b spawned at time t",
    "path": "metrics along the linear path from child spawn_a (alpha=0) to child spawn_b (alpha=1)",
    "kernel_distance": "NTK distance S(K_t, K_t') = 1 - <K_t, K_t'>_F / (|K_t|_F |K_t'|_F) of the parent",
    "correlation": "Spearman correlation across spawn time of the per-time summaries of two metrics",
    "correlation_pearson": "Pearson correlation across spawn time of the per-time summaries of two metrics",
}

_COORDS = {
    "time": ("time on the parent's training clock in epochs, exact: step / steps per epoch "
             "(children: the time they were spawned at)", "1"),
    "time_b": ("second time on the parent's training clock in epochs, exact", "1"),
    "requested_time": ("time in epochs the config asked for, which `time` is its rounding to a step "
                       "(equal to `time` where none was asked)", "1"),
    "step": ("parent optimizer step at time", "1"),
    "spawn": ("child index within one spawn time", "1"),
    "child_pair": ("child pair index b(b-1)/2 + a of the unordered pair a < b", "1"),
    "spawn_a": ("first child of the pair (alpha = 0)", "1"),
    "spawn_b": ("second child of the pair (alpha = 1)", "1"),
    "alpha": ("interpolation coefficient: w = (1 - alpha) w_a + alpha w_b", "1"),
    "layer": ("layer with trainable variables whose NTK term the values are (Θ = Σ_layer Θ_layer)", None),
    "metric": ("metric name", None),
    "metric_b": ("second metric name", None),
    "metric_long_name": ("description of the metric", None),
    "metric_units": ("units of the metric", None),
    "summary_of": ("variable whose per-time summary of the metric is correlated", None),
    "run": ("run the values come from (open_runs)", None),
}

# coordinates that describe only some variables (written into the others' `coordinates` attribute, CF
# readers would attach them there too)
_OWN_COORDS = {"summary_of": ("correlation", "correlation_pearson")}

# non-index coordinates carried along one dimension, re-attached after merging
_LABELS = {"step": "time", "requested_time": "time", "spawn_a": "child_pair", "spawn_b": "child_pair",
           "metric_long_name": "metric", "metric_units": "metric"}

# coordinates that are facts of one run (its grid, its correlations): (run, ...) in open_runs
_PER_RUN = ("step", "requested_time", "summary_of")

# where a metric's per-spawn-time summary comes from, first match wins (names shared between variables,
# e.g. test_error in child and parent, take the children's value)
_SUMMARY_SOURCES = (("pair", "child_pair"), ("child", "spawn"), ("parent", None))


# --- building job datasets ---------------------------------------------------------------------------


def parent_dataset(steps, times, metrics, kernel_distance=None, attrs=None, requested_times=None, layer_metrics=None,
                   layers=None):
    """The parent's trajectory: `parent(time, metric)` from {name: array (T,)}, and optionally the
    S(t, t') matrix `kernel_distance(time, time_b)` (T, T) and the per-layer kernel metrics
    `parent_layer(time, layer, metric)` from {name: array (T, L)} with `layers` the L layer names.
    `requested_times`: the times (epochs) asked for, of which `times` are the rounding to steps (default: `times`)."""
    times, steps = _time_axis(times, steps)
    requested = times if requested_times is None else _array(requested_times, times.shape, "requested_times")
    layer_metrics = layer_metrics or {}
    names = _metric_names({**metrics, **layer_metrics})
    data = np.stack([_array(metrics[n], (len(times),), n) if n in metrics else np.full(len(times), np.nan)
                     for n in names], axis=-1)
    ds = xr.Dataset({"parent": (("time", "metric"), data)}, coords=_metric_coords(names))
    ds = ds.assign_coords(time=times, step=("time", steps), requested_time=("time", requested))
    if kernel_distance is not None:
        ds["kernel_distance"] = (("time", "time_b"), _array(kernel_distance, (len(times),) * 2, "kernel_distance"))
        ds = ds.assign_coords(time_b=times)
    if layer_metrics:
        shape = (len(times), len(layers))
        ds["parent_layer"] = (("time", "layer", "metric"), np.stack(
            [_array(layer_metrics[n], shape, n) if n in layer_metrics else np.full(shape, np.nan) for n in names],
            axis=-1))
        ds = ds.assign_coords(layer=np.array([str(name) for name in layers], dtype=object))
    return _finish(ds, attrs)


def child_dataset(step, time, spawn, metrics, attrs=None, requested_time=None):
    """One child's outcome: `child(time=1, spawn=1, metric)` from {name: float}; `requested_time`: the
    spawn time asked for (default: `time`)."""
    names = _metric_names(metrics)
    data = np.array([[[_scalar(metrics[name], name) for name in names]]])
    ds = xr.Dataset({"child": (("time", "spawn", "metric"), data)}, coords=_metric_coords(names))
    ds = ds.assign_coords(**_time_coords(step, time, requested_time),
                          spawn=np.array([_index(spawn, "spawn")], np.int32))
    return _finish(ds, attrs)


def pair_dataset(step, time, pairs, metrics, alphas, curves, attrs=None, requested_time=None):
    """All child pairs of one spawn time: `pair(time=1, child_pair, metric)` from {name: array (P,)} and
    `path(time=1, child_pair, alpha, metric)` from {name: array (P, A)}, P = len(pairs) pairs (a, b), a < b;
    `requested_time`: the spawn time asked for (default: `time`)."""
    index = [_pair_index(a, b) for a, b in pairs]
    if len(set(index)) != len(index) or not index:
        raise ValueError(f"pairs must be a non-empty list of distinct (a, b) with a < b; got {pairs}")
    order = np.argsort(index)
    alphas = np.asarray(alphas, np.float64)
    if alphas.ndim != 1:
        raise ValueError(f"alphas must be 1-D; got shape {alphas.shape}")
    names = _metric_names({**metrics, **curves})
    pair = np.full((1, len(pairs), len(names)), np.nan)
    path = np.full((1, len(pairs), len(alphas), len(names)), np.nan)
    for m, name in enumerate(names):
        if name in metrics:
            pair[0, :, m] = _array(metrics[name], (len(pairs),), name)[order]
        if name in curves:
            path[0, :, :, m] = _array(curves[name], (len(pairs), len(alphas)), name)[order]
    variables = dict(pair=(("time", "child_pair", "metric"), pair),
                     path=(("time", "child_pair", "alpha", "metric"), path))
    ds = xr.Dataset({name: variables[name] for name, given in (("pair", metrics), ("path", curves)) if given},
                    coords=_metric_coords(names))
    ds = ds.assign_coords(**_time_coords(step, time, requested_time), child_pair=np.sort(index).astype(np.int32),
                          alpha=alphas, spawn_a=("child_pair", np.array([pairs[i][0] for i in order], np.int32)),
                          spawn_b=("child_pair", np.array([pairs[i][1] for i in order], np.int32)))
    return _finish(ds, attrs)


# --- writing and reading -----------------------------------------------------------------------------


def write_atomic(ds, path):
    """Write `ds` as NetCDF4 to `path` (local or gs://), never half-written and sealed with its SHA-256 (`fs.atomic_file`)."""
    ds = _with_coordinates_attributes(ds)
    with fs.atomic_file(path, sealed=True) as tmp:
        ds.to_netcdf(tmp, engine=ENGINE, encoding=_encoding(ds))


def load(path):
    """A NetCDF file (local or gs://) loaded into memory, verified against its seal if it has one."""
    with fs.local_path(path) as local:
        fs.verify(path, local)
        return xr.load_dataset(local, engine=ENGINE)


def merge(paths_or_run_dir):
    """One Dataset from job files (a run directory, whose results/*.nc are read, or a list of paths):
    outer join on every dimension with NaN where a job is missing, global attributes from parent.nc,
    plus `correlation(metric, metric_b)` (Spearman)."""
    paths = _job_paths(paths_or_run_dir)
    datasets = [load(p) for p in paths]
    datasets, labels = _pop_labels(datasets, _LABELS)
    merged = xr.merge(datasets, compat="no_conflicts", join="outer", fill_value=np.nan, combine_attrs="override")
    merged = _put_labels(merged, labels, _LABELS)
    _warn_orphan_times(datasets, merged)
    if "time" in merged.coords and ("child" in merged or "pair" in merged):
        merged["correlation"] = correlation(merged)
        merged["correlation_pearson"] = correlation(merged, method="pearson")
    return _finish(merged, None)


def open_run(run_dir_or_file):
    """The merged results of a run: a merged NetCDF file (e.g. RUN_DIR/results.nc) is loaded as is, a run
    directory is merged from its job files."""
    path = os.fspath(run_dir_or_file)
    return merge(path) if rundir.is_run_dir(path) or fs.isdir(path) else load(path)


def open_runs(paths, names=None):
    """One Dataset along a `run` dimension (labelled by `names`, default the paths) from several runs (run
    directories or merged files), whose grids may differ: an outer join on every coordinate, NaN where a
    run has no value. The facts of one run's grid and correlations (step, requested_time, summary_of)
    become (run, ...) coordinates; global attributes all runs share are kept, the others (config,
    history) are dropped: `open_run(path).attrs` has them. In memory; no dask."""
    paths = [os.fspath(p) for p in paths]
    names = paths if names is None else [str(n) for n in names]
    if not paths or len(names) != len(paths) or len(set(names)) != len(names):
        raise ValueError(f"open_runs needs one or more runs with distinct names; got paths {paths}, names {names}")
    shared = {name: dim for name, dim in _LABELS.items() if name not in _PER_RUN}
    datasets = [open_run(p) for p in paths]
    datasets = [ds.reset_coords([n for n in _PER_RUN if n in ds.coords]) for ds in datasets]
    datasets, labels = _pop_labels(datasets, shared, strict=False)
    runs = xr.concat(datasets, pd.Index(np.array(names, dtype=object), name="run"), data_vars="all",
                     coords="different", compat="equals", join="outer", fill_value={"summary_of": "none"},
                     combine_attrs="drop_conflicts")
    runs = _put_labels(runs.set_coords([n for n in _PER_RUN if n in runs]), labels, shared)
    return _finish(runs, None)


def by_metric(stacked):
    """One variable per metric from a stacked DataArray (`ds.parent`, `ds.child`, `ds.pair`, `ds.path`,
    `ds.correlation`), each with its own long_name and units (from `metric_long_name`/`metric_units`, else
    METRICS), so that e.g. pint-xarray's `.pint.quantify()` reads them; metrics without a value are left out."""
    if "metric" not in stacked.dims:
        raise ValueError(f"by_metric needs a DataArray with a metric dimension; got dims {stacked.dims}")
    names = [str(m) for m in stacked["metric"].values]
    attrs = {}
    for name in names:
        if "metric_units" in stacked.coords:
            attrs[name] = dict(long_name=str(stacked["metric_long_name"].sel(metric=name).item()),
                               units=str(stacked["metric_units"].sel(metric=name).item()))
        elif name in METRICS:
            attrs[name] = dict(zip(("long_name", "units"), METRICS[name]))
        else:
            raise ValueError(f"metric {name!r} has no metric_units coordinate and is not in results.METRICS")
    filled = stacked.notnull().any([d for d in stacked.dims if d != "metric"]).values
    labels = [c for c in stacked.coords if c != "metric" and "metric" in stacked[c].dims]
    ds = stacked.drop_vars(labels).isel(metric=np.flatnonzero(filled)).to_dataset(dim="metric")
    for name in ds.data_vars:
        ds[name].attrs = attrs[str(name)]
    ds.attrs = {k: v for k, v in stacked.attrs.items() if k == "long_name"}
    return ds


def correlation(ds, method="spearman"):
    """Correlation (method 'spearman' or 'pearson') across spawn time of per-time summaries of every
    metric: pair metrics averaged over pairs, child metrics over children, parent metrics as they are
    (a name in several variables uses the first of pair, child, parent). Only spawn times (times with any
    child or pair value) count; each pair of metrics uses the times where both are finite, and needs at
    least 3 of them (else NaN). Ranks are computed with numpy (ties averaged, as scipy's rankdata)."""
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be 'spearman' or 'pearson'; got {method!r}")
    names = [str(m) for m in ds["metric"].values]
    summaries, sources = _summaries(ds, names)
    matrix = np.array([[_correlate(summaries[a], summaries[b], method) for b in names] for a in names])
    coords = dict(metric=ds["metric"].values, metric_b=names,
                  summary_of=("metric", np.array([sources[n] for n in names], dtype=object)))
    return xr.DataArray(matrix, dims=("metric", "metric_b"), coords=coords,
                        attrs=dict(method=method, long_name=f"{method.capitalize()} correlation across spawn time",
                                   units="1"))


def global_attrs(config_dict, seeds, **extra):
    """CF-style global attributes: conventions, title, source, history, references, the config as JSON,
    the seeds as JSON, package versions, the git commit of the kerasntk source (or 'unknown'), and `extra`
    (facts of how the run executed, such as what BatchNorm normalized over)."""
    from kerasntk import __version__

    if hasattr(config_dict, "__dataclass_fields__"):
        import dataclasses

        config_dict = dataclasses.asdict(config_dict)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return dict(
        Conventions="CF-1.8",
        title="Deep learning versus kernel learning: NTK evolution and loss-landscape barriers (kerasntk)",
        source=f"kerasntk {__version__}",
        history=f"{now} created by kerasntk {__version__}: {' '.join(sys.argv)}",
        references="Fort et al., Deep learning versus kernel learning, NeurIPS 2020, arXiv:2010.15110",
        config=json.dumps(config_dict, sort_keys=True, default=str),
        seeds=json.dumps(seeds, sort_keys=True, default=str),
        git_commit=_git_commit(),
        python_version=platform.python_version(),
        **{f"{name}_version": _package_version(*dists) for name, dists in (
            ("numpy", ("numpy",)), ("tensorflow", ("tensorflow", "tensorflow-cpu", "tensorflow-tpu")),
            ("keras", ("keras",)), ("xarray", ("xarray",)), ("netcdf4", ("netCDF4", "netcdf4")))},
        **extra,
    )


# --- helpers -----------------------------------------------------------------------------------------


def _metric_names(metrics):
    """Metric names in the given order, each known to METRICS."""
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {sorted(METRICS)} "
                         "(add new ones to kerasntk.results.METRICS as name: (long_name, units))")
    if not metrics:
        raise ValueError("metrics must name at least one metric")
    return list(metrics)


def _metric_coords(names):
    return dict(metric=np.array(names, dtype=object),
                metric_long_name=("metric", np.array([METRICS[n][0] for n in names], dtype=object)),
                metric_units=("metric", np.array([METRICS[n][1] for n in names], dtype=object)))


def _time_axis(times, steps):
    """times (float64) and steps (int32) of a trajectory, checked."""
    times = np.asarray(times, np.float64)
    steps = np.asarray(steps)
    if times.ndim != 1 or times.shape != steps.shape or len(np.unique(times)) != len(times):
        raise ValueError(f"times and steps must be 1-D of one length with distinct times; got {times}, {steps}")
    if not np.issubdtype(steps.dtype, np.integer):
        raise ValueError(f"steps must be integers; got dtype {steps.dtype}")
    return times, steps.astype(np.int32)


def _array(values, shape, name):
    values = np.asarray(values, np.float64)
    if values.shape != shape:
        raise ValueError(f"{name} must have shape {shape}; got {values.shape}")
    return values


def _scalar(value, name):
    return float(_array(value, (), name))


def _index(value, name):
    if int(value) != value or value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value}")
    return int(value)


def _pair_index(a, b):
    """Position of the unordered pair a < b in colex order (0,1), (0,2), (1,2), (0,3), ...; independent of
    the number of children, so pair indices agree across spawn times."""
    a, b = _index(a, "spawn_a"), _index(b, "spawn_b")
    if not a < b:
        raise ValueError(f"a child pair (a, b) needs a < b; got ({a}, {b})")
    return b * (b - 1) // 2 + a


def _time_coords(step, time, requested_time):
    """time, step and requested_time coordinates of a job at one time."""
    requested = float(time) if requested_time is None else _scalar(requested_time, "requested_time")
    return dict(time=[float(time)], step=("time", np.array([step], np.int32)), requested_time=("time", [requested]))


def _finish(ds, attrs):
    """Set long_name/units on every variable and coordinate and the global attributes."""
    for name, long_name in _VARIABLES.items():
        if name in ds:
            units = _units(ds, name)
            for stale in ("units", "comment"):
                ds[name].attrs.pop(stale, None)
            ds[name].attrs.update(long_name=long_name, **(dict(units=units) if units else dict(comment=_MIXED)))
    for name, (long_name, units) in _COORDS.items():
        if name in ds.coords:
            ds[name].attrs.update(dict(long_name=long_name, units=units) if units else dict(long_name=long_name))
    if attrs:
        ds.attrs.update(attrs)
    return ds


_MIXED = "no single unit: each metric's is in metric_units (results.by_metric gives one variable per metric)"


def _units(ds, name):
    """The unit all values of variable `name` share ("1" for the matrices), None when the metrics a stacked
    variable holds have several (UDUNITS has no "mixed" unit)."""
    if name not in _STACKED:
        return "1"
    present = ds[name].notnull().any([d for d in ds[name].dims if d != "metric"]).values
    units = set(ds["metric_units"].values[present])
    return None if len(units) > 1 else units.pop() if units else "1"


def _encoding(ds):
    """CF encoding: compressed float data, no fill value on coordinates, int32 integers (CF-1.8 has no int64)."""
    int32 = np.iinfo(np.int32)
    encoding = {name: dict(_FillValue=None) for name in ds.coords}
    for name, var in ds.variables.items():
        if var.dtype.kind == "f" and name not in ds.coords:
            encoding[name] = dict(zlib=True, complevel=4)
        elif var.dtype.kind in "iu" and var.size and int32.min <= var.min() and var.max() <= int32.max:
            encoding.setdefault(name, {})["dtype"] = "int32"
    return encoding


def _with_coordinates_attributes(ds):
    """A shallow copy of `ds` whose variables' CF `coordinates` attributes name only the auxiliary
    coordinates that describe them (xarray would list every coordinate whose dimensions fit)."""
    ds = ds.copy()
    for name, var in ds.data_vars.items():
        own = [c for c in ds.coords if c not in var.dims and set(ds[c].dims) <= set(var.dims)
               and name in _OWN_COORDS.get(c, (name,))]
        ds[name].encoding["coordinates"] = " ".join(sorted(own)) or None
    return ds


def _job_paths(paths_or_run_dir):
    """Job files to merge, parent.nc first (its attributes become the run's)."""
    if isinstance(paths_or_run_dir, (str, os.PathLike)):
        paths = rundir.RunDir(paths_or_run_dir).result_paths()
        where = f"the results of run directory {os.fspath(paths_or_run_dir)!r}"
    else:
        paths, where = [os.fspath(p) for p in paths_or_run_dir], "the given list"
    if not paths:
        raise ValueError(f"no result files to merge in {where}")
    return sorted(paths, key=lambda p: os.path.basename(p) != "parent.nc")


def _pop_labels(datasets, label_dims, strict=True):
    """Remove the non-index coordinates `label_dims` ({coord: dim}, which an outer join would turn into
    NaN-padded floats) and return them as {coord: {index value: label}}, checking the datasets agree (where
    they do not: an error, or with strict=False a warning and the first one's label). Files written before
    requested_time existed count as asking for their exact times."""
    labels = {name: {} for name in label_dims}
    stripped = []
    for ds in datasets:
        if "requested_time" in label_dims and "time" in ds.dims and "requested_time" not in ds.coords:
            ds = ds.assign_coords(requested_time=ds["time"].variable)
        for name, dim in label_dims.items():
            if name not in ds.coords:
                continue
            for key, value in zip(ds[dim].values, ds[name].values):
                if labels[name].setdefault(key, value) != value:
                    message = f"disagree on {name} at {dim}={key!r}: {labels[name][key]!r} vs {value!r}"
                    if strict:
                        raise ValueError(f"job files {message}")
                    log.warning("runs %s; keeping the first", message)
        stripped.append(ds.drop_vars([n for n in label_dims if n in ds.coords]))
    return stripped, labels


def _put_labels(ds, labels, label_dims):
    """Re-attach the coordinates `_pop_labels` removed, along the joined dimensions."""
    return ds.assign_coords({name: (dim, np.array([labels[name][v] for v in ds[dim].values]))
                             for name, dim in label_dims.items() if dim in ds.dims and labels[name]})


def _warn_orphan_times(datasets, merged):
    """Log child/pair spawn times that the parent's trajectory does not contain (a float mismatch)."""
    parent = [ds for ds in datasets if "parent" in ds]
    if parent:
        orphans = sorted(set(merged["time"].values) - set(parent[0]["time"].values))
        if orphans:
            log.warning("spawn times %s are not among the parent's times; check they come from one grid", orphans)


def _summaries(ds, names):
    """{metric: (time,) per-time summary}, NaN outside the spawn times, and {metric: source variable}."""
    spawned = np.zeros(ds.sizes["time"], bool)
    for var, dim in _SUMMARY_SOURCES[:2]:
        if var in ds:
            spawned |= ds[var].notnull().any([d for d in ds[var].dims if d != "time"]).values
    summaries, sources = {}, {}
    for name in names:
        summaries[name], sources[name] = np.full(ds.sizes["time"], np.nan), "none"
        for var, dim in _SUMMARY_SOURCES:
            if var in ds and bool(ds[var].sel(metric=name).notnull().any()):
                series = ds[var].sel(metric=name)
                summaries[name] = (series.mean(dim) if dim else series).values.astype(np.float64)
                sources[name] = var
                break
        summaries[name] = np.where(spawned, summaries[name], np.nan)
    return summaries, sources


def _correlate(a, b, method):
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if method == "spearman":
        a, b = _rank(a), _rank(b)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return np.nan
    return float(np.corrcoef(a, b)[0, 1])


def _rank(x):
    """Ranks 1..n with ties given their average rank (scipy.stats.rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    new = np.r_[True, sorted_x[1:] != sorted_x[:-1]]
    group = np.cumsum(new) - 1
    starts = np.r_[np.flatnonzero(new), len(x)]
    ranks = np.empty(len(x))
    ranks[order] = 0.5 * (starts[group] + starts[group + 1] - 1) + 1
    return ranks


def _git_commit():
    """HEAD of the git checkout kerasntk runs from (editable installs), else 'unknown'."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    try:
        top, commit = subprocess.run(["git", "-C", package_dir, "rev-parse", "--show-toplevel", "HEAD"],
                                     capture_output=True, text=True, timeout=10, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown"
    return commit if os.path.samefile(top, os.path.dirname(package_dir)) else "unknown"


def _package_version(*dists):
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(dist)
    return "not installed"
