"""The `kerasntk` command: run | train | ntk | linearize | spawn | merge | report."""

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _config_args(parser):
    parser.add_argument("config", nargs="?", help="YAML or JSON config (default: the embedded mnist1d experiment)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set train.lr=0.05 (repeatable)")
    parser.add_argument("--out", help="run directory (default: runs/<dataset>_<model>_<config hash>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="load the data, build the model and the grids, print the plan, train nothing")


def _machine_args(parser):
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="this machine's setting for the stored config: data.data_dir, distribute.tpu or "
                             "distribute.logical_cpus (repeatable)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="kerasntk",
        description="Deep learning versus kernel learning (Fort et al. 2020) for Keras: train with checkpoints, "
                    "spawn children, measure barriers and empirical NTKs, write xarray/NetCDF results.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    _config_args(sub.add_parser("run", help="the whole spawning experiment: parent, children, metrics, figures"))
    _config_args(sub.add_parser("train", help="train the parent only, saving the checkpoint grid"))
    p = sub.add_parser("spawn", help="run one child job of a run directory (for sweeps over many machines)")
    p.add_argument("run_dir")
    _machine_args(p)
    p.add_argument("--time", required=True, help="spawn time: epochs (0.5, '2ep') or steps ('100it')")
    p.add_argument("--child", required=True, type=int, help="child index, 0..children-1")
    p = sub.add_parser("linearize", help="train the parent's linearization at one time (one kernel-learning job)")
    p.add_argument("run_dir")
    _machine_args(p)
    p.add_argument("--time", required=True, help="parent time: epochs (2, '2ep') or steps ('100it')")
    p = sub.add_parser("ntk", help="measure the parent at every checkpoint: errors, NTKs, kernel metrics")
    p.add_argument("run_dir")
    _machine_args(p)
    p = sub.add_parser("merge", help="merge a run directory's result files into RUN_DIR/results.nc")
    p.add_argument("run_dir")
    p = sub.add_parser("report", help="draw the figures of a results file (PNG and PDF)")
    p.add_argument("results", help="a merged results .nc file or a run directory")
    p.add_argument("--out", help="figure directory (default: beside the results)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    verbose = 0 if args.quiet else 1
    from kerasntk import config as cfg
    from kerasntk import data

    try:
        return _dispatch(args, verbose)
    except (cfg.ConfigError, data.DatasetNotAvailable, ValueError, FileNotFoundError) as err:
        if os.environ.get("KERASNTK_DEBUG"):  # the full traceback, for bug reports
            raise
        print(f"kerasntk: error: {err} (KERASNTK_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kerasntk: interrupted; run the same command again to resume where it stopped", file=sys.stderr)
        return 130


def _dispatch(args, verbose):
    from kerasntk import config as cfg
    import xarray as xr

    from kerasntk import distribute, plots, results, spawn

    if args.command in ("run", "train"):
        config = cfg.load(args.config, args.overrides)
        run_dir = args.out or os.path.join("runs", config.run_name())
        strategy = distribute.get_strategy(config.distribute.tpu, config.distribute.logical_cpus)
        experiment = spawn.Experiment(config, run_dir, strategy=strategy, verbose=verbose)
        if args.dry_run:
            for key, value in experiment.plan().items():
                print(f"{key:12s} {value}")
            return 0
        spawn.prepare_run_dir(config, run_dir)
        if args.command == "train":
            experiment.train_parent()
            print(f"parent trained; checkpoints in {spawn.parent_dir(run_dir)}")
            return 0
        experiment.run()
        figures = plots.report(results.open_run(run_dir), run_dir)
        print(f"results: {os.path.join(run_dir, 'results.nc')}; {len(figures)} figures in {run_dir}")
        return 0
    if args.command == "spawn":
        config, experiment = _existing_run(args, verbose)
        step = _job_step(experiment, args.time, experiment.spawn_steps, "a spawn time")
        if not 0 <= args.child < config.spawn.children:
            raise cfg.ConfigError(f"--child {args.child} is not allowed; allowed: 0..{config.spawn.children - 1}")
        experiment.run_child(step, args.child)
        if experiment.measure_pairs(step):
            print(f"all children of spawn step {step} done: pair measurements written")
        return 0
    if args.command == "linearize":
        _, experiment = _existing_run(args, verbose)
        experiment.run_linearized(_job_step(experiment, args.time, experiment.grid, "a checkpoint"))
        return 0
    if args.command == "ntk":
        _existing_run(args, verbose)[1].measure_parent()
        print(f"parent kernel metrics: {results.job_path(args.run_dir, 'parent')}")
        return 0
    if args.command == "merge":
        path = os.path.join(args.run_dir, "results.nc")
        results.write_atomic(results.open_run(args.run_dir), path)
        print(f"merged: {path}")
        return 0
    if args.command == "report":
        source = args.results
        ds = results.open_run(source) if os.path.isdir(source) else xr.load_dataset(source)
        out = args.out or (source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source)))
        print(f"{len(plots.report(ds, out))} figures in {out}")
        return 0
    raise AssertionError(args.command)


def _existing_run(args, verbose):
    """(config, Experiment) of the prepared run directory `args.run_dir`, with this machine's `--set` fields."""
    from kerasntk import distribute, spawn

    config = spawn.load_run_config(args.run_dir, args.overrides)
    strategy = distribute.get_strategy(config.distribute.tpu, config.distribute.logical_cpus)
    return config, spawn.Experiment(config, args.run_dir, strategy=strategy, verbose=verbose)


def _job_step(experiment, time, allowed, what):
    """The step of `--time`, which must be one of the run's `allowed` steps (`what` names them)."""
    from kerasntk import config as cfg

    step = cfg.parse_duration(time, "--time").steps(experiment.steps_per_epoch)
    if step not in allowed:
        raise cfg.ConfigError(f"--time {time!r} (step {step}) is not {what} of this run; allowed steps: {list(allowed)}")
    return step


if __name__ == "__main__":
    sys.exit(main())
