"""One progress line for the whole experiment: jobs done / running / queued / failed, elapsed time, ETA."""

import sys
import time


def _clock(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """Counts jobs through their states and prints one plain line per change (no carriage returns, so a
    log file stays readable). The ETA assumes a queued job takes as long as the finished jobs of its kind
    (all finished jobs when none of its kind has finished) and that `slots` jobs run at once."""

    def __init__(self, jobs, slots=1, stream=None, verbose=1):
        self.kinds = {job.id: job.kind for job in jobs}
        self.queued, self.running, self.done, self.failed = set(self.kinds), {}, {}, set()
        self.slots, self.stream, self.verbose = max(1, slots), stream or sys.stdout, verbose
        self.start = time.monotonic()

    def skipped(self, job):
        """A job found done in the run directory (it does not count towards the ETA)."""
        self.queued.discard(job.id)
        self.done[job.id] = None

    def started(self, job):
        self.queued.discard(job.id)
        self.running[job.id] = time.monotonic()
        self._print(f"started {job.id}")

    def finished(self, job, seconds=None):
        """`job` is done; `seconds` is how long it ran (default: since it started here, queueing included)."""
        started = self.running.pop(job.id)
        self.done[job.id] = time.monotonic() - started if seconds is None else seconds
        self._print(f"done {job.id} ({_clock(self.done[job.id])})")

    def failed_job(self, job):
        self.running.pop(job.id, None)
        self.queued.discard(job.id)
        self.failed.add(job.id)
        self._print(f"failed {job.id}")

    def eta(self):
        """Seconds until every queued and running job is done, or None before any job has finished."""
        timed = {job_id: s for job_id, s in self.done.items() if s is not None}
        if not timed:
            return None
        overall = sum(timed.values()) / len(timed)

        def expected(job_id):
            same = [s for other, s in timed.items() if self.kinds[other] == self.kinds[job_id]]
            return sum(same) / len(same) if same else overall

        now = time.monotonic()
        left = sum(expected(j) for j in self.queued)
        left += sum(max(expected(j) - (now - started), 0.0) for j, started in self.running.items())
        return left / self.slots

    def line(self):
        eta = self.eta()
        return (f"[kerasntk] jobs: {len(self.done)}/{len(self.kinds)} done, {len(self.running)} running, "
                f"{len(self.queued)} queued, {len(self.failed)} failed | {_clock(time.monotonic() - self.start)} "
                f"elapsed | ETA {'unknown' if eta is None else _clock(eta)}")

    def _print(self, event):
        if self.verbose:
            print(f"{self.line()} | {event}", file=self.stream, flush=True)
