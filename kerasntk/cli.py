"""The `kerasntk` command: run | train | ntk | linearize | spawn | job | check | merge | report | export | doctor."""

import argparse
import contextlib
import logging
import os
import sys
import tempfile

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from kerasntk import __version__  # noqa: E402  (the package's face imports nothing heavy)


def _config_args(parser):
    parser.add_argument("config", nargs="?", help="YAML or JSON config (default: the embedded mnist1d experiment)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config field, e.g. --set train.lr=0.05 (repeatable)")
    parser.add_argument("--out", help="run directory (default: runs/<dataset>_<model>_<config hash>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="load the data, build the model and the grids, print the plan, train nothing")


def _machine_args(parser):
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="this machine's setting for the stored config: data.data_dir or a distribute.* "
                             "field (repeatable)")


def _verbosity_args(parser, defaults):
    """-q (no progress output) and -v (also info log lines, Ray's worker output); after the verb their
    defaults are suppressed so they do not overwrite what was given before it."""
    keep = {} if defaults else {"default": argparse.SUPPRESS}
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output", **keep)
    parser.add_argument("-v", "--verbose", action="store_true", help="also informational log lines", **keep)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="kerasntk",
        description="Deep learning versus kernel learning (Fort et al. 2020) for Keras: train with checkpoints, "
                    "spawn children, measure barriers and empirical NTKs, write xarray/NetCDF results.")
    parser.add_argument("--version", action="version", version=f"kerasntk {__version__}")
    _verbosity_args(parser, defaults=True)
    after_verb = argparse.ArgumentParser(add_help=False)  # -q / -v after the verb too: kerasntk run -q
    _verbosity_args(after_verb, defaults=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def verb(name, help):
        return sub.add_parser(name, help=help, parents=[after_verb])

    p = verb("run", help="the whole spawning experiment: parent, children, metrics, figures")
    _config_args(p)
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="local: the jobs one after another in this process; ray: as Ray tasks, in parallel")
    p.add_argument("--seeds", help="replicates: run the experiment once per parent seed (train.seed, data_seed and "
                                   "augment_seed set to it), e.g. 0,1,2; each in OUT/seed<s> (or runs/<name>), one "
                                   "after another, then the figures of all of them in OUT/figures")
    p.add_argument("--address", help="Ray cluster for --executor ray: HOST:PORT, or 'auto' for the one started "
                                     "on this host by `ray start` (default: RAY_ADDRESS, else a new local cluster)")
    _config_args(verb("train", help="train the parent only, saving the checkpoint grid"))
    p = verb("spawn", help="run one child job of a run directory (then its pairs when siblings are done)")
    p.add_argument("run_dir")
    _machine_args(p)
    p.add_argument("--time", required=True, help="spawn time: epochs (0.5, '2ep') or steps ('100it')")
    p.add_argument("--child", required=True, type=int, help="child index, 0..children-1")
    p = verb("linearize", help="train the parent's linearization at one time (one kernel-learning job)")
    p.add_argument("run_dir")
    _machine_args(p)
    p.add_argument("--time", required=True, help="parent time: epochs (2, '2ep') or steps ('100it')")
    p = verb("ntk", help="measure the parent at every checkpoint: errors, NTKs, kernel metrics")
    p.add_argument("run_dir")
    _machine_args(p)
    p = verb("job", help="run one job of a run directory's job graph by id (see run --dry-run)")
    p.add_argument("run_dir")
    p.add_argument("job_id", help="e.g. parent, measure_parent, child/s00000016_c0, pairs/s00000016, merge")
    _machine_args(p)
    p = verb("check", help="verify a run directory: config, every checkpoint and result against its checksum, "
                           "which jobs are done, failed or to do (exit 1 when something is damaged or failed)")
    p.add_argument("run_dir")
    _machine_args(p)
    p = verb("merge", help="merge a run directory's result files into RUN_DIR/results.nc")
    p.add_argument("run_dir")
    p = verb("report", help="draw the figures of a results file, or of several runs as mean and spread (PNG and PDF)")
    p.add_argument("results", nargs="+", help="a merged results .nc file or a run directory; several: replicates")
    p.add_argument("--out", help="figure directory (default: RUN_DIR/figures, or beside the results file; required "
                                 "for several runs)")
    p = verb("export", help="write the parent at a checkpoint, or a child's final model, as a Keras file")
    p.add_argument("run_dir")
    _machine_args(p)
    p.add_argument("--time", required=True, help="a parent checkpoint time, or with --child the child's spawn time: "
                                                 "epochs (0.5, '2ep') or steps ('100it')")
    p.add_argument("--child", type=int, help="child index, 0..children-1 (default: the parent)")
    p.add_argument("--out", required=True, help="FILE.keras (the whole model) or FILE.weights.h5 (its weights)")
    p = verb("doctor", help="what will run where: versions, TPU, devices, strategy; each known problem with its fix")
    p.add_argument("--tpu", help="check this TPU: 'local' (this TPU VM), a TPU name or grpc:// address "
                                 "(default: the one get_strategy would probe, if any)")
    p.add_argument("--data-dir", help="check this tensorflow-datasets directory holds prepared datasets")
    p.add_argument("--out", help="check a run directory can be written here (local or gs://)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    verbose = 0 if args.quiet else 2 if args.verbose else 1
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="[kerasntk] %(message)s")
    if args.command == "doctor":  # before anything imports TensorFlow: a failing import is its diagnosis
        from kerasntk import doctor

        return doctor.run(args.tpu, args.data_dir, args.out)
    _load_tensorflow(noisy=args.verbose)
    from kerasntk import config as cfg
    from kerasntk import data, errors, training
    from kerasntk.experiment import JobFailed

    try:
        return _dispatch(args, verbose)
    except training.Preempted as err:
        print(f"kerasntk: {err}", file=sys.stderr)
        return 143
    except (cfg.ConfigError, data.DatasetNotAvailable, ValueError, OSError, JobFailed, training.Diverged) as err:
        if os.environ.get("KERASNTK_DEBUG"):  # the full traceback, for bug reports
            raise
        print(f"kerasntk: error: {errors.one_line(err)} (KERASNTK_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kerasntk: interrupted; run the same command again to resume where it stopped", file=sys.stderr)
        return 130


def _load_tensorflow(noisy):
    """Import TensorFlow and find its devices; unless `noisy` (-v), keep its start-up lines off stderr.

    Its C++ core prints oneDNN and CUDA notices before absl logging is initialized (TF_CPP_MIN_LOG_LEVEL cannot
    hold them back) and the cuInit error of a machine without a GPU when it first looks for devices, so stderr
    goes to a temporary file meanwhile. After that, TF_CPP_MIN_LOG_LEVEL=2 keeps C++ info and warnings out and
    TensorFlow's Python logger shows errors only.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if noisy else "2")
    quiet = not noisy and "tensorflow" not in sys.modules
    with _stderr_captured() if quiet else contextlib.nullcontext():
        import tensorflow as tf

        tf.config.list_physical_devices()
    if not noisy:
        logging.getLogger("tensorflow").setLevel(logging.ERROR)


@contextlib.contextmanager
def _stderr_captured():
    """File descriptor 2 (what C++ writes to) points to a temporary file in the block; its text is shown only if
    the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _dispatch(args, verbose):
    from kerasntk import config as cfg
    from kerasntk import experiment, plots, results, rundir

    if args.command in ("run", "train"):
        config = cfg.load(args.config, args.overrides)
        if getattr(args, "seeds", None):
            return _run_replicates(config, cfg.parse_seeds(args.seeds), args, verbose)
        run_dir = args.out or os.path.join("runs", config.run_name())
        if args.dry_run:
            for key, value in _experiment(config, run_dir, verbose).plan().items():
                print(f"{key:16s} {value}")
            return 0
        if args.command == "run":
            strategy = _strategy(config) if args.executor == "local" else None  # Ray jobs find their own
            experiment.run(config, run_dir, strategy=strategy, verbose=verbose, executor=args.executor,
                           address=args.address)
            print(f"results: {rundir.RunDir(run_dir).merged}; figures in {rundir.RunDir(run_dir).figures}")
            return 0
        rundir.RunDir(run_dir).prepare(config)
        _experiment(config, run_dir, verbose).run_job("parent")
        print(f"parent trained; checkpoints in {rundir.RunDir(run_dir).parent.path}")
        return 0
    if args.command == "spawn":
        config, ex = _existing_run(args, verbose)
        step = ex.grid.step_of(args.time, ex.grid.spawn, "a spawn time")
        if not 0 <= args.child < config.spawn.children:
            raise cfg.ConfigError(f"--child {args.child} is not allowed; allowed: 0..{config.spawn.children - 1}")
        ex.run_job(experiment.jobs.job_id("child", step, args.child))
        siblings = [j for j in ex.jobs if j.kind == "child" and j.step == step]
        pairs = [j for j in ex.jobs if j.kind == "pairs" and j.step == step]
        if pairs and all(experiment.jobs.is_done(j, ex.run, ex.grid) for j in siblings) and ex.run_job(pairs[0]):
            print(f"all children of spawn step {step} done: pair measurements written")
        return 0
    if args.command == "linearize":
        _, ex = _existing_run(args, verbose)
        ex.run_job(experiment.jobs.job_id("linearized", ex.grid.step_of(args.time, ex.grid.linearize, "a linearization time")))
        return 0
    if args.command == "ntk":
        _, ex = _existing_run(args, verbose)
        ex.run_job("measure_parent")
        print(f"parent kernel metrics: {ex.run.result('parent')}")
        return 0
    if args.command == "job":
        _, ex = _existing_run(args, verbose)
        print(f"{args.job_id}: {'done' if ex.run_job(args.job_id) else 'already done'}")
        return 0
    if args.command == "check":
        _, ex = _existing_run(args, verbose=0)
        rows = ex.status()
        width = max(len(job_id) for job_id, _, _ in rows)
        print(f"run directory {ex.run.root}: config valid, {len(rows)} jobs")
        for job_id, state, detail in rows:
            print(f"  {job_id:{width}s}  {state:8s}  {detail}".rstrip())
        counts = {state: sum(row[1] == state for row in rows) for state in ("done", "to do", "failed", "damaged")}
        print(", ".join(f"{n} {state}" for state, n in counts.items()))
        if counts["damaged"]:
            print(f"`kerasntk run {ex.run.config_path} --out {ex.run.root}` removes the damaged files and recomputes them")
        return 1 if counts["failed"] or counts["damaged"] else 0
    if args.command == "merge":
        run = rundir.RunDir(args.run_dir)
        results.write_atomic(results.merge(run.root), run.merged)
        print(f"merged: {run.merged}")
        return 0
    if args.command == "report":
        if len(args.results) > 1:
            if not args.out:
                raise cfg.ConfigError(f"report of {len(args.results)} runs needs --out DIR for the figures")
            ds, out = results.open_runs(args.results), args.out
        else:
            source = args.results[0]
            ds = results.open_run(source)
            out = args.out or (rundir.RunDir(source).figures if rundir.is_run_dir(source)
                               else os.path.dirname(os.path.abspath(source)))
        print(f"{len(plots.report(ds, out))} figures in {out}")
        return 0
    if args.command == "export":
        from kerasntk import models_from_runs

        print(f"model written: {models_from_runs.export_model(args.run_dir, args.time, args.out, args.child, args.overrides)}")
        return 0
    raise AssertionError(args.command)


def _run_replicates(config, seeds, args, verbose):
    """`kerasntk run --seeds`: one run directory per parent seed, run one after another (with --executor ray as
    one job graph: every run's jobs go to the cluster as their dependencies finish); with --out, the figures
    of all of them in OUT/figures."""
    from kerasntk import experiment, plots, results

    replicas = experiment.replicate_dirs(config, seeds, args.out)
    if args.dry_run:
        for seed, (_, run_dir) in replicas.items():
            print(f"seed {seed}: {run_dir}")
        return 0
    strategy = _strategy(config) if args.executor == "local" else None  # Ray jobs find their own
    experiment.run_all({f"seed{seed}": replica for seed, replica in replicas.items()}, strategy=strategy,
                       verbose=verbose, executor=args.executor, address=args.address)
    for seed, (_, run_dir) in replicas.items():
        print(f"seed {seed}: results in {run_dir}")
    dirs = [run_dir for _, run_dir in replicas.values()]
    if args.out and len(dirs) > 1:
        from kerasntk import fs

        out = fs.join(args.out, "figures")
        print(f"{len(plots.report(results.open_runs(dirs, names=[f'seed{s}' for s in replicas]), out))} figures of "
              f"{len(dirs)} runs in {out}")
    else:
        print(f"figures of all runs: kerasntk report {' '.join(dirs)} --out DIR")
    return 0


def _strategy(config):
    """The strategy `config.distribute` asks for; one it cannot have is a config error (one line)."""
    from kerasntk import config as cfg
    from kerasntk import distribute

    d = config.distribute
    try:
        return distribute.get_strategy(d.tpu, d.logical_cpus)
    except RuntimeError as err:  # a TPU asked for but not reached, CPUs that cannot be split any more
        raise cfg.ConfigError(f"distribute: {err}") from None


def _experiment(config, run_dir, verbose):
    from kerasntk import experiment

    return experiment.Experiment(config, run_dir, strategy=_strategy(config), verbose=verbose)


def _existing_run(args, verbose):
    """(config, Experiment) of the prepared run directory `args.run_dir`, with this machine's `--set` fields."""
    from kerasntk import rundir

    config = rundir.RunDir(args.run_dir).load_config(args.overrides)
    return config, _experiment(config, args.run_dir, verbose)


if __name__ == "__main__":
    sys.exit(main())
