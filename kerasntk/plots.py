"""Figures of a merged run (results.merge / open_run): barriers, interpolation curves, kernel dynamics,
S(t, t') heatmap, correlations, child error, the linearized network's error, sharpness against 2/lr and
the per-layer kernel velocity, as PNG and PDF.

Figures are drawn on `matplotlib.figure.Figure` objects (no pyplot, so no global backend change and
nothing pops up); each figure is skipped with a log line when the variables it needs are absent.
Several runs (`results.open_runs`: a `run` dimension, e.g. replicates over parent seeds) are drawn as the
mean over runs with the min–max band across them, the number of runs in the legend; heat maps show the
mean over runs.
"""

import json
import logging

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure

from kerasntk import fs

log = logging.getLogger(__name__)

STABLE_BARRIER = 0.02  # Frankle et al. 2020: a spawn is "stable" below this error barrier

# metrics in the correlation figure (the paper's claim 4), when present; the Dataset holds all of them
CORRELATED = ("error_barrier", "loss_barrier", "train_error_barrier", "disagreement", "js_divergence",
              "weight_distance", "relative_weight_distance", "kernel_distance", "test_error", "kernel_velocity",
              "kernel_velocity_per_lr", "kernel_distance_from_init", "kernel_distance_to_final", "kernel_alignment",
              "linearized_test_error", "hessian_top_eigenvalue", "hessian_trace")


def report(ds, out_dir):
    """Write every figure the Dataset supports to `out_dir` as PNG and PDF; return the written paths."""
    fs.makedirs(out_dir)
    paths = []
    for name, draw in _FIGURES:
        fig = draw(ds)
        if fig is None:
            continue
        for ext in ("png", "pdf"):
            path = fs.join(out_dir, f"{name}.{ext}")
            with fs.atomic_file(path) as tmp:  # a kill never leaves half a figure
                fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
            paths.append(path)
    return paths


# --- figures -------------------------------------------------------------------------------------------


def barrier_vs_spawn_time(ds):
    """Error and loss barriers between children vs spawn time: mean over pairs, min–max band, each pair."""
    panels = [(names, ylabel) for names, ylabel in (
        (("error_barrier", "train_error_barrier"), "error barrier (0–1 error)"),
        (("loss_barrier", "train_loss_barrier"), "loss barrier (nats)")) if any(_has(ds, "pair", n) for n in names)]
    if not panels:
        return _skip("barrier_vs_spawn_time", "pair error_barrier / loss_barrier")
    fig, axes = _figure(len(panels), "Linear-interpolation barriers between children spawned at the same time")
    for ax, (names, ylabel) in zip(axes, panels):
        for name, color in zip(names, ("C0", "C1")):
            if _has(ds, "pair", name):
                _mean_and_spread(ax, ds["pair"].sel(metric=name), "child_pair", color,
                                 f"{'train' if name.startswith('train') else 'test'} set")
        if ylabel.startswith("error"):
            ax.axhline(STABLE_BARRIER, color="gray", ls="--", lw=1,
                       label=f"stable below {STABLE_BARRIER} (Frankle et al.)")
        _spawn_time_axis(ax, ds)
        ax.set(ylabel=ylabel, title=ylabel.split(" (")[0] + " vs spawn time")
        ax.legend(fontsize=8)
    return fig


def interpolation_curves(ds):
    """Error (and loss) along the linear path between two children, mean over pairs, one line per spawn time."""
    names = [n for n in ("test_error", "test_loss", "train_error") if _has(ds, "path", n)]
    if not names:
        return _skip("interpolation_curves", "path test_error")
    path, runs = _mean_of_runs(ds["path"].mean("child_pair"))
    times = ds["time"].values[path.notnull().any(["alpha", "metric"]).values]
    cmap, norm = _time_colors(len(times))
    fig, axes = _figure(len(names), "Along the straight line between two children: w = (1 − α) w_a + α w_b" + runs)
    for ax, name in zip(axes, names):
        for i, t in enumerate(times):
            ax.plot(ds["alpha"], path.sel(time=t, metric=name), color=cmap(norm(i)), marker=".", lw=1.2)
        kind, split = name.split("_")[1], name.split("_")[0]
        unit = "0–1 error" if kind == "error" else "loss (nats)"
        ax.set(xlabel="interpolation coefficient α", ylabel=f"{split} {unit}",
               title=f"{split} {kind} along the path (mean over pairs)")
    bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), ticks=range(len(times)))
    bar.ax.set_yticklabels([f"{t:.3g}" for t in times])
    bar.set_label("spawn time (epoch)")
    return fig


def kernel_dynamics(ds):
    """The parent's NTK velocity and its distance from the initial (and to the final) kernel vs time."""
    velocity = [n for n in ("kernel_velocity",) if _has(ds, "parent", n)]
    distance = [n for n in ("kernel_distance_from_init", "kernel_distance_to_final") if _has(ds, "parent", n)]
    if not velocity and not distance:
        return _skip("kernel_dynamics", "parent kernel_velocity / kernel_distance_from_init")
    panels = [p for p in ((velocity, "kernel velocity (1/epoch)"), (distance, "kernel distance S")) if p[0]]
    fig, axes = _figure(len(panels), "Evolution of the parent's empirical NTK on the probe set")
    for ax, (names, ylabel) in zip(axes, panels):
        for i, name in enumerate(names):
            _trajectory(ax, ds["parent"].sel(metric=name), f"C{i}", name.replace("_", " "), marker=".")
        if names == velocity:
            ax.set_yscale("log")
        _time_axis(ax, ds["time"].values, "parent training time t (epoch)")
        ax.set(ylabel=ylabel, title=ylabel.split(" (")[0] + " vs time")
        ax.legend(fontsize=8)
    return fig


def kernel_distance_matrix(ds):
    """Heatmap of S(K_t, K_t') between the parent's kernels at every pair of times."""
    if "kernel_distance" not in ds:
        return _skip("kernel_distance_matrix", "kernel_distance")
    matrix, runs = _mean_of_runs(ds["kernel_distance"])
    matrix = matrix.dropna("time", how="all").dropna("time_b", how="all")
    fig, (ax,) = _figure(1, "Kernel distance between the parent's NTKs at two times" + runs)
    image = ax.imshow(matrix.values, cmap="magma", origin="lower", vmin=0)
    _time_ticks(ax.set_xticks, ax.set_xticklabels, matrix["time_b"].values)
    _time_ticks(ax.set_yticks, ax.set_yticklabels, matrix["time"].values)
    ax.set(xlabel="time t' (epoch)", ylabel="time t (epoch)", title="S(K_t, K_t') = 1 − cosine of the kernels")
    fig.colorbar(image, ax=ax, label="S(K_t, K_t')  (0 = same kernel up to scale)")
    return fig


def correlation_matrix(ds):
    """Spearman correlation across spawn time between the key metrics (CORRELATED) with enough data."""
    if "correlation" not in ds:
        return _skip("correlation_matrix", "correlation")
    corr, runs = _mean_of_runs(ds["correlation"])
    keep = [m for m in CORRELATED if m in corr["metric"].values and np.isfinite(corr.sel(metric=m).values).sum() > 1]
    if len(keep) < 2:
        return _skip("correlation_matrix", "two key metrics with finite correlations")
    spawn_times = _spawn_count(ds)
    values = corr.sel(metric=keep, metric_b=keep).values
    size = 0.6 * len(keep) + 3
    fig, (ax,) = _figure(1, "How the metrics move together across spawn time", size=(size + 1, size))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-1, vmax=1)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if abs(v) > 0.6 else "black")
    sources = corr["summary_of"] if "summary_of" in corr.coords else None
    sources = sources.isel(run=0) if sources is not None and "run" in sources.dims else sources
    labels = [f"{m} ({sources.sel(metric=m).item()})" if sources is not None else m for m in keep]
    ax.set_xticks(range(len(keep)), labels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(keep)), labels, fontsize=8)
    ax.set(xlabel="metric", ylabel="metric")
    ax.set_title(f"{corr.attrs.get('method', 'spearman').capitalize()} correlation over {spawn_times} spawn times "
                 f"of per-time summaries{runs}\n(pair metrics: mean over pairs; child metrics: mean over children)",
                 fontsize=9)
    fig.colorbar(image, ax=ax, label="correlation (1)")
    return fig


def child_error_vs_spawn_time(ds):
    """Final test error of the children vs the time they were spawned, with the parent's final error."""
    if not _has(ds, "child", "test_error"):
        return _skip("child_error_vs_spawn_time", "child test_error")
    fig, (ax,) = _figure(1, "Where the children end up")
    _mean_and_spread(ax, ds["child"].sel(metric="test_error"), "spawn", "C0", "children (mean, min–max, each)")
    if _has(ds, "parent", "test_error"):
        final = _mean_of_runs(ds["parent"].sel(metric="test_error"))[0].dropna("time")
        ax.axhline(final[-1], color="k", ls="--", lw=1, label=f"parent at t = {final['time'].values[-1]:.3g} epoch")
    _spawn_time_axis(ax, ds)
    ax.set(ylabel="final test error (0–1)", title="Children's final test error vs spawn time")
    ax.legend(fontsize=8)
    return fig


def linearized_error(ds):
    """Test error of the network linearized at time t (kernel learning with the time-t NTK) beside the
    parent's own test error at t and its final test error."""
    if not _has(ds, "parent", "linearized_test_error"):
        return _skip("linearized_error", "parent linearized_test_error")
    fig, (ax,) = _figure(1, "Kernel learning with the NTK frozen at time t")
    for name, label in (("linearized_test_error", "network linearized at t, trained (best test error)"),
                        ("test_error", "parent network at t")):
        if _has(ds, "parent", name):
            color = "C0" if name == "linearized_test_error" else "C1"
            _trajectory(ax, ds["parent"].sel(metric=name), color, label, marker=".")
            if name == "test_error":
                final = float(_mean_of_runs(ds["parent"].sel(metric=name))[0].dropna("time")[-1])
                ax.axhline(final, color="gray", ls="--", lw=1, label=f"parent's final test error ({final:.3f})")
    _time_axis(ax, ds["time"].values, "time t the network is linearized at (epoch)")
    ax.set(ylabel="test error (0–1)", title="Linearized vs nonlinear test error")
    ax.legend(fontsize=8, loc="lower left")
    return fig


def sharpness(ds):
    """The training loss's sharpness (top Hessian eigenvalue) vs time with the stability limit 2/lr of gradient
    descent at the schedule's learning rate (and (2 + 2β)/lr, heavy-ball momentum β's, when the config is
    known), and the Hessian trace with its Hutchinson standard error."""
    if not _has(ds, "parent", "hessian_top_eigenvalue"):
        return _skip("sharpness", "parent hessian_top_eigenvalue")
    trace = _has(ds, "parent", "hessian_trace")
    fig, axes = _figure(1 + trace, "Curvature of the parent's training loss on the Hessian subset")
    ax = axes[0]
    _trajectory(ax, ds["parent"].sel(metric="hessian_top_eigenvalue"), "C0", "sharpness λ_max", marker=".")
    if _has(ds, "parent", "learning_rate"):
        lr = _mean_of_runs(ds["parent"].sel(metric="learning_rate"))[0]
        lr = lr.where(lr > 0).dropna("time")  # a schedule decayed to 0 has no limit
        ax.plot(lr["time"], 2 / lr, color="k", ls="--", lw=1, label="2 / learning rate")
        momentum = _momentum(ds)
        if momentum:
            ax.plot(lr["time"], (2 + 2 * momentum) / lr, color="gray", ls=":", lw=1,
                    label=f"(2 + 2β) / learning rate, momentum β = {momentum:g}")
    ax.set_yscale("log")
    _time_axis(ax, ds["time"].values, "parent training time t (epoch)")
    ax.set(ylabel="top eigenvalue of the Hessian (1)", title="sharpness vs time")
    ax.legend(fontsize=8)
    if trace:
        ax = axes[1]
        series = ds["parent"].sel(metric="hessian_trace")
        if "run" not in series.dims and _has(ds, "parent", "hessian_trace_stderr"):
            stderr = ds["parent"].sel(metric="hessian_trace_stderr")
            keep = series.notnull().values
            ax.fill_between(series["time"][keep], (series - stderr)[keep], (series + stderr)[keep], color="C1",
                            alpha=0.2, lw=0, label="± one standard error (Hutchinson)")
        _trajectory(ax, series, "C1", "trace (Hutchinson estimate)", marker=".")
        _time_axis(ax, ds["time"].values, "parent training time t (epoch)")
        ax.set(ylabel="trace of the Hessian (1)", title="Hessian trace vs time")
        ax.legend(fontsize=8)
    return fig


def layer_kernel_velocity(ds):
    """Heat map of each layer's NTK velocity S(Θ_l(t), Θ_l(t + dt)) / dt against time (log colour scale): which
    layers' kernels move, and when."""
    if not _has(ds, "parent_layer", "kernel_velocity"):
        return _skip("layer_kernel_velocity", "parent_layer kernel_velocity")
    velocity, runs = _mean_of_runs(ds["parent_layer"].sel(metric="kernel_velocity"))
    velocity = velocity.dropna("time", how="all").transpose("layer", "time")
    fig, (ax,) = _figure(1, "Which layers' kernels move: the parent's per-layer NTK velocity" + runs, size=(9, 3.6))
    values = velocity.values
    positive = values[np.isfinite(values) & (values > 0)]
    norm = colors.LogNorm(positive.min(), positive.max()) if len(positive) else None
    image = ax.imshow(np.where(values > 0, values, np.nan), aspect="auto", cmap="viridis", norm=norm,
                      interpolation="nearest")
    _time_ticks(ax.set_xticks, ax.set_xticklabels, velocity["time"].values, most=10)
    ax.set_yticks(range(velocity.sizes["layer"]), [str(layer) for layer in velocity["layer"].values], fontsize=8)
    ax.set(xlabel="parent training time t (epoch; one column per time with a velocity)", ylabel="layer",
           title="S(Θ_l(t), Θ_l(t + dt)) / dt for each layer's kernel Θ_l alone")
    fig.colorbar(image, ax=ax, label="kernel velocity (1/epoch)")
    return fig


_FIGURES = (("barrier_vs_spawn_time", barrier_vs_spawn_time), ("interpolation_curves", interpolation_curves),
            ("kernel_dynamics", kernel_dynamics), ("kernel_distance_matrix", kernel_distance_matrix),
            ("correlation_matrix", correlation_matrix), ("child_error_vs_spawn_time", child_error_vs_spawn_time),
            ("linearized_error", linearized_error), ("sharpness", sharpness),
            ("layer_kernel_velocity", layer_kernel_velocity))


# --- helpers -----------------------------------------------------------------------------------------


def _has(ds, var, metric):
    """True when variable `var` holds a finite value of `metric`."""
    return var in ds and metric in ds["metric"].values and bool(ds[var].sel(metric=metric).notnull().any())


def _spawn_count(ds):
    """Number of times at which children or pairs have results."""
    spawned = np.zeros(ds.sizes["time"], bool)
    for var in ("child", "pair"):
        if var in ds:
            spawned |= ds[var].notnull().any([d for d in ds[var].dims if d != "time"]).values
    return int(spawned.sum())


def _skip(figure, missing):
    log.info("skipping figure %s: no %s in the results", figure, missing)
    return None


def _figure(panels, suptitle, size=None):
    fig = Figure(figsize=size or (5.2 * panels, 4.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    fig.suptitle(suptitle)
    return fig, axes


def _trajectory(ax, series, color, label, **style):
    """A series over time, NaN times left out: as is for one run; with a `run` dimension, the mean over runs
    as the line and the min–max across runs as a band, the number of runs in the label."""
    if "run" in series.dims:
        series = series.dropna("time", how="all")
        ax.fill_between(series["time"].values, series.min("run"), series.max("run"), color=color, alpha=0.2, lw=0)
        label = f"{label} (mean of {series.sizes['run']} runs, band: min–max)"
        series = series.mean("run")
    series = series.dropna("time")
    ax.plot(series["time"], series, color=color, label=label, **style)


def _mean_of_runs(da):
    """(`da` averaged over its `run` dimension, " (mean of n runs)"), or (`da`, "") for one run."""
    if "run" not in da.dims:
        return da, ""
    return da.mean("run"), f" (mean of {da.sizes['run']} runs)"


def _momentum(ds):
    """The parent's SGD momentum from the results' config attribute (None when absent, e.g. several runs)."""
    try:
        return float(json.loads(ds.attrs["config"])["train"]["momentum"])
    except (KeyError, TypeError, ValueError):
        return None


def _mean_and_spread(ax, series, over, color, label):
    """Mean over `over` as a line, the min–max band shaded, each member as a faint dot (spawn times only); with
    a `run` dimension, each run's mean over `over`, drawn as `_trajectory` draws several runs."""
    if "run" in series.dims:
        return _trajectory(ax, series.mean(over), color, label, marker="o", ms=4)
    series = series.dropna("time", how="all")
    t = series["time"].values
    ax.fill_between(t, series.min(over), series.max(over), color=color, alpha=0.2, lw=0)
    for member in series[over].values:
        ax.plot(t, series.sel({over: member}), ls="none", marker=".", ms=3, color=color, alpha=0.5)
    ax.plot(t, series.mean(over), color=color, marker="o", ms=4, label=label)


def _spawn_time_axis(ax, ds):
    _time_axis(ax, ds["time"].values, "spawn time (epoch, symlog: linear below the first nonzero time)")


def _time_axis(ax, times, label):
    """Log-like time axis that keeps t = 0: symlog, linear up to the smallest positive time, with ticks at
    0 and at the decades in range (symlog's default ticks also label negative times)."""
    positive = times[times > 0]
    if len(positive):
        linthresh = float(positive.min())
        ax.set_xscale("symlog", linthresh=linthresh, linscale=0.5)
        decades = 10.0 ** np.arange(np.ceil(np.log10(linthresh)), np.floor(np.log10(positive.max())) + 1)
        ticks = np.r_[0.0, decades]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlim(-0.15 * linthresh, 1.3 * positive.max())
    ax.set_xlabel(label)


def _time_colors(n):
    """A colormap and norm giving each of n spawn times (ordered) its own colour."""
    palette = colormaps["viridis"](np.linspace(0, 0.95, max(n, 1)))
    return colors.ListedColormap(palette), colors.BoundaryNorm(np.arange(n + 1) - 0.5, max(n, 1))


def _time_ticks(set_ticks, set_labels, times, most=8):
    """Tick at most `most` of the times on an index axis, labelled with their values."""
    idx = np.unique(np.linspace(0, len(times) - 1, min(most, len(times))).round().astype(int))
    set_ticks(idx)
    set_labels([f"{times[i]:.3g}" for i in idx])
