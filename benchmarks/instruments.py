"""What the experiment's curvature and per-layer kernel measurements add to the default run, per checkpoint,
against the whole-kernel NTK the parent measurements already compute at every checkpoint (the baseline).

    python benchmarks/instruments.py              # the default config (kerasntk/configs/default.yaml)
    python benchmarks/instruments.py --rounds 8 --set hessian.probes=20

Sides, each through the `Experiment` methods the run uses, on the default model at its initial weights:
`kernel` (the probe-set trace NTK, baseline), `layer_kernel` (its per-layer terms), `curvature` (sharpness
by Lanczos and trace by Hutchinson: a parent checkpoint), `sharpness` (Lanczos only: a child's end point).
Each round times every side `--calls` times, in an order rotated between rounds, after an untimed first call
(tracing). Reported: the median seconds per call over all calls, and per side the median and min-max over
rounds of its round median / the kernel's; then the time the run adds, checkpoints × (layer_kernel +
curvature) + children × sharpness, from the median seconds.
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from kerasntk import config as cfg  # noqa: E402
from kerasntk import experiment  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=5, help="calls per side and round")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    args = parser.parse_args(argv)
    config = cfg.load(None, args.overrides)
    ex = experiment.Experiment(config, tempfile.mkdtemp(), verbose=0)
    w = ex.model.get_weights()
    sides = {"kernel": lambda: ex.kernel(w), "layer_kernel": lambda: ex.layer_kernel(w),
             "curvature": lambda: ex.curvature(w), "sharpness": lambda: ex.curvature(w, trace=False)}
    for fn in sides.values():
        fn()  # trace
    names = list(sides)
    times = {name: [] for name in names}
    ratios = {name: [] for name in names}
    for r in range(args.rounds):
        medians = {}
        for name in names[r % len(names):] + names[: r % len(names)]:
            calls = []
            for _ in range(args.calls):
                start = time.perf_counter()
                sides[name]()
                calls.append(time.perf_counter() - start)
            times[name] += calls
            medians[name] = np.median(calls)
        for name in names:
            ratios[name].append(medians[name] / medians["kernel"])
    h, n = config.hessian, config.ntk
    print(f"probe {n.probe_size} examples; Hessian subset {h.subset_size} in blocks of {h.batch_size}, "
          f"{h.lanczos_steps} Lanczos steps, {h.probes} probes; {args.rounds} rounds of {args.calls} calls")
    print("| side | s per call (median) | / kernel, median | / kernel, min–max |")
    print("|---|---|---|---|")
    for name in names:
        print(f"| {name} | {np.median(times[name]):.3f} | {np.median(ratios[name]):.2f} | "
              f"{min(ratios[name]):.2f}–{max(ratios[name]):.2f} |")
    checkpoints, children = len(ex.grid.checkpoints), len(ex.grid.spawn) * config.spawn.children
    added = checkpoints * (np.median(times["layer_kernel"]) + np.median(times["curvature"])) \
        + children * np.median(times["sharpness"])
    print(f"added to the run: {checkpoints} checkpoints x (layer_kernel + curvature) + {children} children x "
          f"sharpness = {added:.0f} s")


if __name__ == "__main__":
    main()
