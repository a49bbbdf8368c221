"""Every time of a run resolved to optimizer steps, once: the loop and the jobs only see steps."""

import dataclasses

import numpy as np

from kerasntk import config as cfg


@dataclasses.dataclass(frozen=True)
class Grid:
    """A run's times in steps.

    checkpoints: the parent's checkpoint grid (0, the end, explicit, spawn and linearization times,
      log-spaced and periodic times, and the kernel-velocity partner t + dt of each of them).
    requested: the time in epochs the config asked for at each checkpoint step (the first of spawn,
      linearize, checkpoint and log-spaced times, the end, that rounds to it), or the step's exact time
      where none was asked (periodic and velocity-partner steps); distinct steps get distinct values.
    spawn / linearize: the steps children are spawned at / the parent is linearized at.
    velocity_dt: the kernel velocity's dt in steps (None: to the next checkpoint, or kernels off).
    warmup / milestones: the learning-rate schedule's steps.
    """

    steps_per_epoch: int
    total: int
    checkpoints: tuple
    requested: tuple
    spawn: tuple
    linearize: tuple
    velocity_dt: int | None
    warmup: int
    milestones: tuple

    @classmethod
    def from_config(cls, config, steps_per_epoch):
        def steps(value):
            return cfg.parse_duration(value).steps(steps_per_epoch)

        asked = {}  # step -> the first time asked for that rounds to it, in epochs

        def ask(durations):
            for d in durations:
                asked.setdefault(d.steps(steps_per_epoch), d.value if d.unit == "ep" else d.value / steps_per_epoch)

        t, c, n = config.train, config.checkpoints, config.ntk
        total = steps(t.length)
        spawn = sorted({steps(v) for v in config.spawn.times})
        linearize = sorted({steps(v) for v in config.linearize.times})
        ask(cfg.parse_duration(v) for v in [*config.spawn.times, *config.linearize.times, *c.times, 0, t.length])
        grid = {0, total, *spawn, *linearize, *(steps(v) for v in c.times)}
        if c.log_num:
            start, stop = cfg.parse_duration(c.log_start), cfg.parse_duration(c.log_stop)
            log_times = [cfg.Duration(float(v), start.unit) for v in np.geomspace(start.value, stop.value, c.log_num)]
            ask(log_times)
            grid.update(d.steps(steps_per_epoch) for d in log_times)
        if c.every is not None:
            grid.update(range(0, total + 1, max(steps(c.every), 1)))
        dt = max(steps(n.velocity_dt), 1) if n.enabled and n.velocity_dt is not None else None
        if dt is not None:  # the partner of every time for the kernel velocity
            grid.update([s + dt for s in grid])
        checkpoints = tuple(sorted(s for s in grid if 0 <= s <= total))
        return cls(steps_per_epoch=steps_per_epoch, total=total, checkpoints=checkpoints,
                   requested=tuple(float(asked.get(s, s / steps_per_epoch)) for s in checkpoints), spawn=tuple(spawn),
                   linearize=tuple(linearize), velocity_dt=dt, warmup=steps(t.warmup),
                   milestones=tuple(steps(m) for m in t.milestones))

    def epochs(self, step):
        """Time in epochs of `step` (a number or an array of steps)."""
        return np.asarray(step) / self.steps_per_epoch if np.ndim(step) else step / self.steps_per_epoch

    def requested_time(self, step):
        """The time in epochs asked for at checkpoint `step` (a number or an array of grid steps)."""
        lookup = dict(zip(self.checkpoints, self.requested))
        return np.array([lookup[int(s)] for s in step]) if np.ndim(step) else lookup[int(step)]

    def step_of(self, time, allowed, what, name="--time"):
        """The step of `time` (epochs or "<n>it"), which must be one of `allowed` (`what` names them)."""
        step = cfg.parse_duration(time, name).steps(self.steps_per_epoch)
        if step not in allowed:
            times = ", ".join(f"{self.requested_time(s):g} ({s}it)" for s in allowed)
            raise cfg.ConfigError(f"{name} {time!r} (step {step}) is not {what} of this run; allowed: {times}")
        return step
