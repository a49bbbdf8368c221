"""Wall time of a whole experiment with `--executor ray` over `--executor local`, in one run.

Both sides run the same config from scratch as `kerasntk run` subprocesses, alternating (ray, local, ray,
local, ...: benchmarks/timing.py) so that machine drift falls on both. Ray starts a local cluster with as
many workers as CPUs, one job per worker, `distribute.intra_op_threads` TensorFlow threads each (default
1); local runs the jobs one after another with TensorFlow's default threads. Ratio = ray / local (< 1: ray is faster). Also prints the
per-job times of the last ray run's log, for projections to more hosts.

    python benchmarks/executor.py [--rounds 2] [--threads 1] [--set section.field=value ...]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import timing  # benchmarks/timing.py


def run(out, executor, threads, overrides):
    command = [sys.executable, "-m", "kerasntk.cli", "run", "--out", out, "--executor", executor]
    if executor == "ray":
        command += ["--set", f"distribute.intra_op_threads={threads}"]
    for item in overrides:
        command += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{executor} run failed:\n{proc.stderr[-3000:]}")
    return elapsed, proc.stdout


def job_times(log):
    """{job id: seconds} from the progress lines of a run's log."""
    times = {}
    for job, clock in re.findall(r"\| done (\S+) \(([0-9hms]+)\)", log):
        parts = dict((unit, int(value)) for value, unit in re.findall(r"(\d+)([hms])", clock))
        times[job] = parts.get("h", 0) * 3600 + parts.get("m", 0) * 60 + parts.get("s", 0)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="TensorFlow intra-op threads per Ray job")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logs = {}

    def side(executor):
        def run_once():  # from scratch, in a new run directory
            seconds, logs[executor] = run(tempfile.mkdtemp(prefix=executor, dir=tmp), executor, args.threads,
                                          args.overrides)
            return seconds
        return run_once

    print(timing.machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="kerasntk-executor-") as tmp:
        c = timing.interleave(side("ray"), side("local"), args.rounds, warmup=0,
                              report=lambda r, c: timing.print_round(r, c, ("ray", "local")))
    print(f"\n| executor | median wall time (s) |\n|---|---|\n| local | {statistics.median(c.b):.1f} |"
          f"\n| ray ({os.cpu_count()} workers, {args.threads} thread each) | {statistics.median(c.a):.1f} |")
    print(f"\nratio ray / local: median (min-max) {c.ratio(3)} over {args.rounds} rounds; load {c.load()}; "
          f"{timing.machine()}")
    ray_log = logs.get("ray", "")
    times = job_times(ray_log)
    if times:
        kinds = {}
        for job, seconds in times.items():
            kinds.setdefault(job.split("/")[0], []).append(seconds)
        print("\nper-job wall time in the last ray run (s): " +
              ", ".join(f"{k} {statistics.median(v):.0f} (x{len(v)})" for k, v in kinds.items()))


if __name__ == "__main__":
    main()
