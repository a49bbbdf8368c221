"""Executors: who runs the job graph's jobs, and where.

`run_local` runs them one after another in this process. `run_ray` submits each job as a Ray task as soon
as its dependencies are done, with the resources `config.distribute.job_resources` asks for; a task whose
worker dies (a preempted host, a killed process) is retried and resumes from its job's own checkpoints,
while a job that raises (bad data, a diverged loss) stops the graph: what finished stays, and a re-run
continues. Merge and report run on the driver.
"""

import json
import logging
import os
import time

from kerasntk.experiment import jobs as graph
from kerasntk.experiment.progress import Progress

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """A job of the graph raised; the message names the job and the cause in one line."""

    def __init__(self, job_id, cause):
        from kerasntk import errors

        self.job_id, self.cause = job_id, cause
        kind = "" if errors.os_error(cause) else f"{type(cause).__name__}: "
        super().__init__(f"job {job_id} failed: {kind}{errors.one_line(cause)}")


def run_local(experiment):
    """Run every job of `experiment` that is not done, in graph order, in this process."""
    progress = Progress(experiment.jobs, verbose=experiment.verbose)
    _check_run_dir(experiment)
    for job in experiment.jobs:
        if graph.is_done(job, experiment.run, experiment.grid):
            progress.skipped(job)
            continue
        progress.started(job)
        _run_here(experiment, job, progress)


def run_ray(runs, address=None, verbose=1):
    """Run the job graphs of `runs` ({name: (config, run directory)}) as one graph on the Ray cluster at
    `address` ("auto": the one started on this host with `ray start`), else at RAY_ADDRESS, else on a new
    local cluster of this machine's CPUs, so one run's children train while another's parent does. (Ray's
    own default would also follow /tmp/ray's record of the last cluster, which outlives a cluster that was
    killed rather than stopped, and then waits for it.)"""
    import ray

    from kerasntk import fs
    from kerasntk.experiment.experiment import Experiment

    drivers = {}  # they plan, merge and draw: no accelerator needed; runs with the same data share its arrays
    for name, (config, run_dir) in runs.items():
        loaded = next((d.arrays for d in drivers.values() if d.config.data == config.data), None)
        # absolute: workers run in the cluster's working directory, not ours
        drivers[name] = Experiment(config, fs.absolute(run_dir), verbose=0, arrays=loaded)
    own_cluster = not ray.is_initialized()
    if own_cluster:
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose > 1, logging_level="error")
        if verbose < 2:  # Ray prints worker deaths and retries to stdout whatever log_to_driver says
            ray._private.worker._worker_logs_enabled = False
    try:
        tasks = {name: _task(d.config.distribute, ray.cluster_resources()) for name, d in drivers.items()}
        slots = min(_slots(d.config.distribute.job_resources, ray.cluster_resources()) for d in drivers.values())
        _drive(drivers, tasks, verbose, slots)
    finally:
        if own_cluster:
            ray.shutdown()


def _drive(drivers, tasks, verbose, slots):
    """Submit every job (of every run's graph) whose dependencies are done; wait; repeat. Stop at the first
    failure. drivers: {name: Experiment}; tasks: {name: the Ray task that runs that run's jobs}."""
    import ray

    plan = graph.combine({name: driver.jobs for name, driver in drivers.items()})
    progress = Progress([shown for _, _, shown in plan], slots=slots, verbose=verbose)
    for driver in drivers.values():
        _check_run_dir(driver)
    done, pending = set(), {}
    for name, job, shown in plan:
        if graph.is_done(job, drivers[name].run, drivers[name].grid):
            done.add(shown.id)
            progress.skipped(shown)
    waiting = [row for row in plan if row[2].id not in done]
    try:
        while waiting or pending:
            for row in [row for row in waiting if set(row[2].deps) <= done]:
                (name, job, shown), driver = row, drivers[row[0]]
                waiting.remove(row)
                progress.started(shown)
                if job.trains:
                    pending[tasks[name].remote(driver.run.root, job.id, driver.config.to_dict())] = shown
                else:  # merge and report: on the driver, once everything before them (in their run) is done
                    _run_here(driver, job, progress, shown)
                    done.add(shown.id)
            if not pending:
                continue
            ready, _ = ray.wait(list(pending), num_returns=1)
            shown = pending.pop(ready[0])
            try:
                seconds = ray.get(ready[0])
            except ray.exceptions.RayError as err:  # an application error, or retries exhausted
                progress.failed_job(shown)
                raise JobFailed(shown.id, _cause(err)) from None
            done.add(shown.id)
            progress.finished(shown, seconds)
    finally:  # a failure (or Ctrl-C) leaves no task of any run training unwatched on the cluster
        for ref in pending:
            ray.cancel(ref, force=True)


def _check_run_dir(experiment):
    """Before running: remove damaged checkpoints and results (their jobs run again) and name the jobs that
    failed in an earlier run (they run again too: a full disk may be fixed, a divergence recurs)."""
    for line in experiment.repair():
        log.warning(line)
    for job_id, failure in experiment.run.failures().items():
        log.warning("job %s failed in an earlier run (%s: %s); running it again", job_id, failure["error"],
                    failure["message"])


def _run_here(experiment, job, progress, shown=None):
    """Run `job` in this process; an error becomes JobFailed naming it (a preemption stays Preempted).
    shown: the job as the progress line names it (default: `job`)."""
    from kerasntk.training import Preempted

    shown = shown or job
    try:
        experiment.run_job(job)
    except Preempted:
        raise
    except Exception as err:
        progress.failed_job(shown)
        raise JobFailed(shown.id, err) from err
    progress.finished(shown)


def _run_job_in_worker(run_dir, job_id, config_dict):
    """A Ray task: one job of the graph, on the strategy its config asks for; returns the seconds it ran (the
    driver's clock would count the time it queued). A preempted job (SIGTERM: its resume checkpoint is
    saved) ends the worker process, which Ray counts as a worker death and retries."""
    from kerasntk import config as cfg
    from kerasntk import distribute
    from kerasntk.experiment.experiment import Experiment
    from kerasntk.training import Preempted

    start = time.monotonic()
    config = cfg.from_dict(config_dict)
    d = config.distribute
    try:
        Experiment(config, run_dir, strategy=distribute.get_strategy(d.tpu, d.logical_cpus), verbose=0).run_job(job_id)
    except Preempted:
        os._exit(143)
    return time.monotonic() - start


def _task(d, available):
    """The Ray task running the training jobs of a run whose `distribute` section is `d`."""
    import ray

    return ray.remote(max_calls=_max_calls(d.job_resources))(_run_job_in_worker).options(**_task_options(d, available))


def _task_options(d, available):
    """Ray options of a training job: its resources (checked against the cluster's, since Ray would leave an
    impossible task pending silently), retries on worker death only, TensorFlow's thread pools."""
    from kerasntk import config as cfg

    missing = {k: v for k, v in d.job_resources.items() if available.get(k, 0) < v}
    if missing:
        raise cfg.ConfigError(f"distribute.job_resources asks for {json.dumps(missing)} per job but the Ray cluster "
                              f"has {json.dumps({k: available.get(k, 0) for k in missing})}; allowed: amounts the "
                              f"cluster offers ({json.dumps(dict(sorted(available.items())))})")
    resources = dict(d.job_resources)
    # the driver's kerasntk settings (cache directory, debug, fault injection in tests) apply to its jobs
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow",
           **{k: v for k, v in os.environ.items() if k.startswith("KERASNTK_")}}
    if d.intra_op_threads:  # read by TensorFlow when it starts (the worker is a fresh process)
        env.update(TF_NUM_INTRAOP_THREADS=str(d.intra_op_threads), TF_NUM_INTEROP_THREADS=str(d.intra_op_threads),
                   OMP_NUM_THREADS=str(d.intra_op_threads))
    return dict(num_cpus=resources.pop("CPU", 0), num_gpus=resources.pop("GPU", 0), resources=resources,
                max_retries=d.max_retries, retry_exceptions=False, runtime_env={"env_vars": env})


def _max_calls(job_resources):
    """Jobs a worker process runs before it ends: one when jobs hold an accelerator (a TPU host belongs to
    one process, so the next job's process must find it released), unlimited for CPU jobs (a fresh process
    would spend seconds importing TensorFlow per job: 40 jobs of the default experiment)."""
    return 1 if any(k != "CPU" and v > 0 for k, v in job_resources.items()) else 0


def _slots(job_resources, available):
    """How many jobs the cluster runs at once."""
    counts = [int(available.get(k, 0) // v) for k, v in job_resources.items() if v > 0]
    return max(1, min(counts)) if counts else 1


def _cause(err):
    """The application exception inside a RayTaskError (the error itself when there is none, e.g. a worker
    that died more often than max_retries)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err
