"""The parent-child spawning experiment as a job graph over one run directory, run locally or on Ray."""

import os

from kerasntk.experiment.executors import JobFailed, run_ray
from kerasntk.experiment.experiment import Experiment, child_seeds
from kerasntk.experiment.grid import Grid
from kerasntk.experiment.jobs import Job, job_graph

__all__ = ["Experiment", "Grid", "Job", "JobFailed", "child_seeds", "job_graph", "replicate_dirs", "run", "run_all",
           "run_ray"]


def run(config, run_dir=None, strategy=None, verbose=1, executor="local", address=None):
    """Run the whole spawning experiment of `config` in `run_dir` (default runs/<name>; local or gs://)
    and return the merged xarray.Dataset. executor: "local" runs the jobs one after another in this process
    on `strategy` (default: the one `config.distribute` asks for); "ray" runs them as Ray tasks on the
    cluster at `address` (None: a local one), as their dependencies finish."""
    run_dir = run_dir or os.path.join("runs", config.run_name())
    return run_all({"": (config, run_dir)}, strategy, verbose, executor, address)[""]


def run_all(runs, strategy=None, verbose=1, executor="local", address=None):
    """Run several experiments, {name: (config, run directory)} (e.g. `replicate_dirs`), and return {name:
    merged Dataset}. "ray" runs their jobs as one graph, so one run's children train while another's parent
    does; "local" runs one experiment after another, on `strategy` (default: the one the runs' common
    `distribute` section asks for)."""
    from kerasntk import distribute, results
    from kerasntk.experiment import executors
    from kerasntk.rundir import RunDir

    if executor not in ("local", "ray"):
        raise ValueError(f"executor {executor!r} is not allowed; allowed: local, ray")
    if not runs:
        raise ValueError("no runs given; allowed: {name: (config, run directory)} with at least one run")
    sections = [config.distribute for config, _ in runs.values()]
    if any(d != sections[0] for d in sections):
        raise ValueError(f"the runs share the machines, so their distribute sections must agree; got {sections}")
    for config, run_dir in runs.values():
        RunDir(run_dir).prepare(config)
    if executor == "ray":
        executors.run_ray(runs, address=address, verbose=verbose)
    else:
        strategy = strategy or distribute.get_strategy(sections[0].tpu, sections[0].logical_cpus)
        for config, run_dir in runs.values():
            executors.run_local(Experiment(config, run_dir, strategy=strategy, verbose=verbose))
    return {name: results.load(RunDir(run_dir).merged) for name, (_, run_dir) in runs.items()}


def replicate_dirs(config, seeds, out=None):
    """{seed: (config, run directory)} of the replicates of `config` with the parent seeds `seeds`
    (`config.with_parent_seed`): OUT/seed<s> when `out` is given, else runs/<run name> (the name's hash covers
    the seed)."""
    from kerasntk import config as cfg
    from kerasntk import fs

    replicas = {}
    for seed in seeds:
        seeded = cfg.with_parent_seed(config, seed)
        replicas[seed] = (seeded, fs.join(out, f"seed{seed}") if out else os.path.join("runs", seeded.run_name()))
    return replicas
