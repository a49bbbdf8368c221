"""Fault injection at named points, for tests of preemption, worker death and divergence (off unless the environment asks).

    KERASNTK_FAULT_POINT=job:point[:n]   fire when job `job` passes `point` with progress >= n (default 1)
    KERASNTK_FAULT_SIGNAL=TERM           the signal the process sends itself: TERM (a preemption) or KILL (a dead worker)
    KERASNTK_FAULT_ONCE=path             fire only if `path` does not exist, and create it first (once across retries)
    KERASNTK_FAULT_DIVERGE=id            the trainer of job `id` sees a non-finite loss at its first chunk

The points (POINTS), each where a rerun must reuse what was stored before it:

    step     a trainer (parent, child/s00000004_c1): after each chunk (and its grid checkpoint), n = the optimizer step
    kernels  measure_parent: after the kernels of the n-th grid checkpoint are cached in parent/kernels/
    epoch    linearized/s00000016: after the n-th epoch's resume checkpoint
    pair     pairs/s00000004: after the n-th pair of children is compared (nothing of the job is stored yet)

E.g. KERASNTK_FAULT_POINT=parent:step:7 KERASNTK_FAULT_SIGNAL=KILL. A trainer turns TERM into a resume checkpoint
at the end of the running chunk; elsewhere TERM ends the process as KILL does.
"""

import os
import signal

POINTS = ("step", "kernels", "epoch", "pair")


def at(job, point, n):
    """Send the configured signal to this process if KERASNTK_FAULT_POINT names `job` at `point` and the
    progress `n` has reached its count."""
    env = os.environ
    asked = env.get("KERASNTK_FAULT_POINT")
    if not asked:
        return
    fields = asked.split(":") + ["1"] * (asked.count(":") == 1)
    if len(fields) != 3 or fields[1] not in POINTS or not fields[2].isdigit():
        raise ValueError(f"KERASNTK_FAULT_POINT={asked!r} is not allowed; allowed: job:point or job:point:n with a "
                         f"point of {', '.join(POINTS)}, e.g. parent:step:7")
    if fields[0] != job or fields[1] != point or n < int(fields[2]):
        return
    once = env.get("KERASNTK_FAULT_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
    env.pop("KERASNTK_FAULT_POINT")
    os.kill(os.getpid(), getattr(signal, f"SIG{env.get('KERASNTK_FAULT_SIGNAL', 'TERM')}"))


def diverges(job):
    """Whether the job named `job` should see a non-finite training loss (KERASNTK_FAULT_DIVERGE=id): a
    divergence for tests of the `Diverged` path, without a learning rate that happens to blow up."""
    return os.environ.get("KERASNTK_FAULT_DIVERGE") == job
