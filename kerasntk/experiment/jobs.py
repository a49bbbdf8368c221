"""The experiment as a job graph: a pure function from a config and its grid to jobs with dependencies.

    parent ─┬─ measure_parent ──────────────────────────────┐
            ├─ linearized(t)            for t in linearize   ├─ merge ── report
            └─ child(t, c) ── pairs(t)  for t in spawn       ┘

A job is done when all its outputs are complete in the run directory (`is_done`): checkpoints with their
meta.json, result files with their seal.
"""

import dataclasses

from kerasntk import fs, rundir


@dataclasses.dataclass(frozen=True)
class Job:
    """One unit of work: `id` names it in logs, errors and the CLI; `deps` are the ids it waits for."""

    id: str
    kind: str  # parent | measure_parent | linearized | child | pairs | merge | report
    step: int | None = None
    child: int | None = None
    deps: tuple = ()

    @property
    def always(self):
        return self.kind in ("merge", "report")

    @property
    def trains(self):
        """Whether the job needs an accelerator (merge and report only read files and draw)."""
        return not self.always


def job_id(kind, step=None, child=None):
    """The id of a job: its kind, with the spawn or linearization step and the child index where it has them."""
    if child is not None:
        return f"{kind}/s{int(step):08d}_c{int(child)}"
    return kind if step is None else f"{kind}/s{int(step):08d}"


def job_graph(config, grid):
    """The jobs of an experiment in a topological order (every job after its dependencies)."""
    jobs = [Job("parent", "parent"), Job("measure_parent", "measure_parent", deps=("parent",))]
    jobs += [Job(job_id("linearized", s), "linearized", step=s, deps=("parent",)) for s in grid.linearize]
    for s in grid.spawn:
        children = [Job(job_id("child", s, c), "child", step=s, child=c, deps=("parent",))
                    for c in range(config.spawn.children)]
        jobs += children
        if config.spawn.children > 1:
            jobs.append(Job(job_id("pairs", s), "pairs", step=s, deps=tuple(j.id for j in children)))
    measured = tuple(j.id for j in jobs if j.kind != "parent")
    jobs.append(Job("merge", "merge", deps=measured))
    jobs.append(Job("report", "report", deps=("merge",)))
    return jobs


def job_dir(job, run):
    """The `JobDir` of a training job (parent, child, linearized) in RunDir `run`; None for the others."""
    if job.kind == "parent":
        return run.parent
    if job.kind == "child":
        return run.child(job.step, job.child)
    return run.linearized(job.step) if job.kind == "linearized" else None


def outputs(job, run, grid):
    """(checkpoint directories, sealed files) that `job` leaves in RunDir `run`: every grid checkpoint of the
    parent; a child's final checkpoint (none when it diverged and was recorded) and result; a measurement's
    result file. Merge and report leave nothing that counts: they always run."""
    if job.always:
        return [], []
    kind = {"measure_parent": "parent", "pairs": "pair"}.get(job.kind, job.kind)
    files = [] if job.kind == "parent" else [run.result(kind, job.step, job.child)]
    if job.kind == "parent":
        return [run.parent.checkpoint_path(s) for s in grid.checkpoints], files
    if job.kind == "child" and not job_dir(job, run).divergence():
        return [job_dir(job, run).checkpoint_path(grid.total)], files
    return [], files


def is_done(job, run, grid):
    """Whether every output of `job` is complete in RunDir `run` (a checkpoint's meta.json, a file's seal).
    Merge and report are never done: they are cheap and follow every job that ran before them."""
    if job.always:
        return False
    checkpoints, files = outputs(job, run, grid)
    return all(map(rundir.is_checkpoint_dir, checkpoints)) and all(map(fs.is_sealed, files))


def damaged(job, run, grid):
    """(path, problem) of `job`'s checkpoints (grid and resume) and sealed files that fail the sizes and
    checksums recorded when they were written."""
    found = job_dir(job, run).damaged() if job_dir(job, run) else []
    for path in outputs(job, run, grid)[1]:
        problem = fs.seal_problem(path) if fs.is_sealed(path) else None
        if problem:
            found.append((path, problem))
    return found


def combine(graphs):
    """Several runs' job graphs ({name: [Job]}) as one: [(name, job, its job in the combined graph)], where ids
    are prefixed "name/" (unchanged for a single run) and the jobs are interleaved by their place in their own
    graph, so every run's parent comes before any run's children. Still topological: a job's dependencies
    come earlier in its own graph."""
    rows = []
    for r, (name, jobs) in enumerate(graphs.items()):
        label = (lambda i, name=name: f"{name}/{i}") if len(graphs) > 1 else (lambda i: i)
        for k, job in enumerate(jobs):
            combined = dataclasses.replace(job, id=label(job.id), deps=tuple(label(d) for d in job.deps))
            rows.append(((k, r), name, job, combined))
    return [row[1:] for row in sorted(rows, key=lambda row: row[0])]


def by_id(jobs, job_id):
    """The job named `job_id`; a ValueError listing the ids otherwise."""
    for job in jobs:
        if job.id == job_id:
            return job
    raise ValueError(f"no job {job_id!r} in this run; its jobs are: {', '.join(j.id for j in jobs)}")
