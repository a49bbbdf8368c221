"""The experiment as a job graph: a pure function from a config and its grid to jobs with dependencies.

    parent ─┬─ measure_parent ──────────────────────────────┐
            ├─ linearized(t)            for t in linearize   ├─ merge ── report
            └─ child(t, c) ── pairs(t)  for t in spawn       ┘

A job is done when its marker, the file it writes last, exists in the run directory (`is_done`).
"""

import dataclasses

from kerasntk import fs


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


def is_done(job, run, grid):
    """Whether `job`'s marker exists in RunDir `run`: the parent's final grid checkpoint, a measurement's
    result file. Merge and report are never done: they are cheap and follow every job that ran before them."""
    if job.always:
        return False
    if job.kind == "parent":
        return run.parent.has_checkpoint(grid.total)
    kind = {"measure_parent": "parent", "pairs": "pair"}.get(job.kind, job.kind)
    return fs.exists(run.result(kind, job.step, job.child))


def by_id(jobs, job_id):
    """The job named `job_id`; a ValueError listing the ids otherwise."""
    for job in jobs:
        if job.id == job_id:
            return job
    raise ValueError(f"no job {job_id!r} in this run; its jobs are: {', '.join(j.id for j in jobs)}")
