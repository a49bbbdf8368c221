"""Fault injection at named points, for tests of preemption, worker death and divergence (off unless the environment asks).

    KERASNTK_FAULT_STEP=s        fire at the first chunk boundary at or after optimizer step s
    KERASNTK_FAULT_SIGNAL=TERM   the signal the process sends itself: TERM (a preemption) or KILL (a dead worker)
    KERASNTK_FAULT_JOB=id        only in the job with this id (e.g. child/s00000004_c0); default: any job
    KERASNTK_FAULT_ONCE=path     fire only if `path` does not exist, and create it first (once across retries)
    KERASNTK_FAULT_DIVERGE=id    the trainer of job `id` sees a non-finite loss at its first chunk
"""

import os
import signal


def at_step(job, step):
    """Send the configured signal to this process if a fault is asked for here."""
    env = os.environ
    at = env.get("KERASNTK_FAULT_STEP")
    if not at or step < int(at) or env.get("KERASNTK_FAULT_JOB", job) != job:
        return
    once = env.get("KERASNTK_FAULT_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
    env.pop("KERASNTK_FAULT_STEP")
    os.kill(os.getpid(), getattr(signal, f"SIG{env.get('KERASNTK_FAULT_SIGNAL', 'TERM')}"))


def diverges(job):
    """Whether the job named `job` should see a non-finite training loss (KERASNTK_FAULT_DIVERGE=id): a
    divergence for tests of the `Diverged` path, without a learning rate that happens to blow up."""
    return os.environ.get("KERASNTK_FAULT_DIVERGE") == job
