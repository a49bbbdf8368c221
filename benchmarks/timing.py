"""Interleaved A/B timing shared by the benchmarks: on a shared machine, drift must land on both sides.

After a warm-up (tracing, compilation), the two sides run in turns A B A B ... for several rounds; each
round gives a ratio A / B, and a comparison is quoted as the median of those ratios with their min-max,
next to the machine's core count and load average during the rounds. The process's CPU time per side and
round is kept too: other processes' load and waits that use no CPU (sleeps, locks) move it far less.
"""

import os
import platform
import statistics
import time
from dataclasses import dataclass, field


def timed(fn, calls=1):
    """A side that calls `fn()` `calls` times and returns the seconds taken (a work unit for `interleave`)."""

    def side():
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - start

    return side


@dataclass
class Comparison:
    """Seconds per round of sides A and B, this process's CPU seconds in them (`cpu_a`, `cpu_b`: all its threads,
    not subprocesses), and the 1-minute load average at the start of each round."""

    a: list = field(default_factory=list)
    b: list = field(default_factory=list)
    loads: list = field(default_factory=list)
    cpu_a: list = field(default_factory=list)
    cpu_b: list = field(default_factory=list)

    @property
    def ratios(self):
        return [a / b for a, b in zip(self.a, self.b)]

    def ratio(self, digits=2):
        """'median (min-max)' of the per-round ratios A / B."""
        return spread(self.ratios, digits)

    def cpu_ratio(self, digits=2):
        """'median (min-max)' of the per-round ratios of CPU time, A / B."""
        return spread([a / b for a, b in zip(self.cpu_a, self.cpu_b)], digits)

    def load(self):
        """'min-max' of the load average over the rounds."""
        return f"{min(self.loads):.1f}-{max(self.loads):.1f}"


def interleave(a, b, rounds, warmup=1, report=None):
    """Run sides `a` and `b` (callables returning their seconds, e.g. `timed(...)`) `warmup` times each
    untimed, then in turns A B for `rounds` rounds. `report(r, comparison)` is called after each round."""
    for _ in range(warmup):
        a(), b()
    result = Comparison()
    for r in range(rounds):
        result.loads.append(os.getloadavg()[0])
        for side, seconds, cpu in ((a, result.a, result.cpu_a), (b, result.b, result.cpu_b)):
            start = time.process_time()
            seconds.append(side())
            cpu.append(time.process_time() - start)
        if report:
            report(r, result)
    return result


def spread(values, digits=2):
    """'median (min-max)' of `values`."""
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def machine():
    """The machine in one line: cores, processor, load averages (1, 5, 15 min) now."""
    loads = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{os.cpu_count()} cores ({platform.machine()}), load average {loads} (1, 5, 15 min)"


def print_round(r, comparison, names=("A", "B")):
    """A progress line for `interleave(report=...)`: the round's seconds, ratio and load."""
    print(f"  round {r + 1}: {names[0]} {comparison.a[-1]:.3f} s, {names[1]} {comparison.b[-1]:.3f} s, "
          f"ratio {comparison.ratios[-1]:.3f}, load {comparison.loads[-1]:.2f}", flush=True)
