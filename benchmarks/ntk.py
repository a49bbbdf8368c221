"""Benchmark kerasntk's empirical NTK against neural-tangents (same architecture, same weights), and at scale.

    python benchmarks/ntk.py --nt-python /tmp/ntvenv/bin/python          # the comparison table
    python benchmarks/ntk.py --scale                                      # ResNet-20 / cnn1d, time and peak RSS
    python benchmarks/ntk.py --scale --cases resnet20_default             # one case: default arguments only

neural-tangents runs in its own virtualenv (`python -m venv /tmp/ntvenv && /tmp/ntvenv/bin/pip install
"jax[cpu]==0.4.23" "jaxlib==0.4.23" "neural-tangents==0.6.5" "numpy<2"`): this script re-runs itself with
`--nt-worker` under that python, handing architecture, inputs and Keras weights over in an .npz. Each row
builds the model in Keras and in `stax` (standard parameterization), asserts the kernels agree, then
times both with compilation excluded (first call discarded). Rounds alternate the two frameworks
(benchmarks/timing.py) so that both see the same load on a shared machine; reported: each side's median
time per call and the ratio kerasntk / neural-tangents (best implementation) of each round, median (min-max).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

import timing  # benchmarks/timing.py

# neural-tangents implementations timed per row (1 Jacobian contraction, 3 structured derivatives): its
# Jacobian contraction is 3-4x slower than its structured derivatives on the CNN at N=128, and takes minutes
# and > 12 GB on the MLP, so only structured derivatives (its best) are timed at N=512 and on the MLP.
ROWS = {  # name: (zoo model, input shape, N, neural-tangents implementations)
    "cnn128": ("cnn", (32, 32, 3), 128, (1, 3)),
    "cnn512": ("cnn", (32, 32, 3), 512, (3,)),
    "mlp256": ("mlp", (784,), 256, (3,)),
}
NT_NAMES = {1: "jacobian_contraction", 2: "ntk_vector_products", 3: "structured_derivatives"}


def _median_time(fn, repeats):
    """Median wall time of `fn()` over `repeats` calls after one untimed (compiling) call; also its result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


# ---------------------------------------------------------------- neural-tangents side (runs under --nt-python)


def _stax_model(arch, weights):
    """The stax twin of the zoo's cnn / mlp (standard parameterization) and its params from Keras weights.

    `weights` is the Keras list [kernel, bias, ...]; stax biases carry leading singleton axes.
    """
    from neural_tangents import stax

    dense = lambda width: stax.Dense(width, parameterization="standard", b_std=1.0)  # noqa: E731
    conv = lambda width: stax.Conv(width, (3, 3), padding="SAME", parameterization="standard", b_std=1.0)  # noqa: E731
    kernels, biases = weights[0::2], weights[1::2]
    layers, params = [], []
    for kernel, bias in zip(kernels[:-1], biases[:-1]):
        layers += [conv(kernel.shape[-1]) if arch == "cnn" else dense(kernel.shape[-1]), stax.Relu()]
        params += [(kernel, bias.reshape((1,) * (kernel.ndim - 1) + (-1,))), ()]
    if arch == "cnn":
        layers += [stax.AvgPool((2, 2), strides=(2, 2), padding="VALID"), stax.Flatten()]
        params += [(), ()]
    layers.append(dense(kernels[-1].shape[-1]))
    params.append((kernels[-1], biases[-1].reshape(1, -1)))
    return stax.serial(*layers)[1], params


def _nt_worker(spec_path, out_path):
    """Time neural-tangents' implementations on the model and weights in `spec_path`; save kernel and times."""
    import jax
    import neural_tangents as nt

    spec = np.load(spec_path)
    weights = [spec[f"w{i}"] for i in range(int(spec["num_weights"]))]
    apply_fn, params = _stax_model(str(spec["arch"]), weights)
    x = jax.numpy.asarray(spec["x"])
    out = {}
    for impl in spec["implementations"]:
        fn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(), vmap_axes=0, implementation=int(impl)))
        times, k = _median_time(lambda: fn(x, None, params).block_until_ready(), int(spec["repeats"]))
        out[f"times{impl}"] = np.asarray(times)
        out["kernel"] = np.asarray(k)
    np.savez(out_path, **out)


# ---------------------------------------------------------------- kerasntk side


def _keras_row(name, repeats, seed=0):
    """Model, inputs and a timing closure for one row of the comparison table."""
    import kerasntk.ntk as kntk
    from kerasntk import models

    arch, shape, n, _ = ROWS[name]
    model = models.get(arch, shape, 10)
    rng = np.random.default_rng(seed)
    for w in model.trainable_variables:  # random biases too, so that the bias terms are checked
        w.assign(rng.normal(scale=1 / np.sqrt(np.prod(w.shape[:-1]) or 1), size=w.shape).astype("float32"))
    x = rng.normal(size=(n, *shape)).astype("float32")
    fn = kntk.empirical_ntk_fn(model, trace_axes=())
    return model, x, lambda: fn(x)


def _run_nt(nt_python, name, model, x, repeats, workdir):
    """Run the neural-tangents worker for one row; returns {impl: times} and its kernel."""
    spec, out = os.path.join(workdir, f"{name}_in.npz"), os.path.join(workdir, f"{name}_out.npz")
    weights = [np.asarray(w) for w in model.trainable_variables]
    np.savez(
        spec, arch=ROWS[name][0], x=x, repeats=repeats, implementations=np.asarray(ROWS[name][3]),
        num_weights=len(weights), **{f"w{i}": w for i, w in enumerate(weights)},
    )
    subprocess.run([nt_python, os.path.abspath(__file__), "--nt-worker", spec, out], check=True)
    result = np.load(out)
    return {int(k[5:]): list(result[k]) for k in result.files if k.startswith("times")}, result["kernel"]


def compare(nt_python, rows, repeats, rounds):
    """The comparison table: kerasntk vs neural-tangents' best implementation, median times and the ratio
    kerasntk / neural-tangents of each round's `repeats` calls (benchmarks/timing.py)."""
    print(timing.machine())
    print(f"{'row':8s} {'kerasntk s':>11s} {'NT best s':>10s} {'NT impl':>24s} {'ratio median (min-max)':>23s} "
          f"{'load':>8s}  all NT medians")
    with tempfile.TemporaryDirectory() as workdir:
        for name in rows:
            model, x, run = _keras_row(name, repeats)
            kernels, nt_times = {"ours": run()}, {}  # the first call traces

            def neural_tangents():
                """One worker run: `repeats` calls of each implementation; the seconds of the best one."""
                times, kernels["nt"] = _run_nt(nt_python, name, model, x, repeats, workdir)
                for impl, t in times.items():
                    nt_times.setdefault(impl, []).extend(t)
                return min(sum(t) for t in times.values())

            c = timing.interleave(timing.timed(run, repeats), neural_tangents, rounds, warmup=0)
            # float32 in two frameworks: entries near zero differ by rounding of the large ones, hence atol
            k_nt = kernels["nt"]
            np.testing.assert_allclose(kernels["ours"], k_nt, rtol=1e-4, atol=1e-4 * np.abs(k_nt).max())
            medians = {impl: float(np.median(t)) for impl, t in nt_times.items()}
            best = min(medians, key=medians.get)
            detail = ", ".join(f"{NT_NAMES[i]} {t:.3f}" for i, t in medians.items())
            print(f"{name:8s} {np.median(c.a) / repeats:11.3f} {medians[best]:10.3f} {NT_NAMES[best]:>24s} "
                  f"{c.ratio():>23s} {c.load():>8s}  {detail}", flush=True)


# ---------------------------------------------------------------- scale


# Block sizes: peak RSS grows with the block (features of a row and a column block, O backward passes);
# ResNet-20 (272k parameters, O = 10: 11 MB of features per example) peaked at 3.2 GB with blocks of 64 and
# 2.8 GB with 48 (N = 256). "resnet20_default" passes no block size: the one ntk.FEATURE_BUDGET gives.
SCALE = {  # name: (zoo model, input shape, options, trace_axes, block size or None for the default)
    "cnn1d": ("cnn1d", (40, 1), {}, (), 128),
    "resnet20": ("resnet20", (32, 32, 3), {}, (-1,), 64),
    "resnet20_default": ("resnet20", (32, 32, 3), {}, (-1,), None),
}


def _scale_case(name, n, batch_size):
    """Compute one scale kernel in this process; print a JSON line with time and peak RSS."""
    import kerasntk.ntk as kntk
    from kerasntk import models

    arch, shape, options, trace_axes, _ = SCALE[name]
    model = models.get(arch, shape, 10, **options)
    x = np.random.default_rng(0).normal(size=(n, *shape)).astype("float32")
    if batch_size is None:  # the defaults, as a user calls it
        fn = kntk.empirical_ntk_fn(model, trace_axes=trace_axes)
        batch_size = f"default ({kntk.default_batch_size(model, 10, model.compute_dtype)})"
    else:
        fn = kntk.empirical_ntk_fn(model, trace_axes=trace_axes, batch_size=batch_size)
    start = time.perf_counter()
    k = fn(x)
    seconds = time.perf_counter() - start
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"case": name, "n": n, "batch_size": batch_size, "shape": list(k.shape),
                      "seconds": round(seconds, 1), "peak_rss_gb": round(rss_gb, 2),
                      "finite": bool(np.isfinite(k).all())}), flush=True)


def scale(cases):
    """Run each scale case in a fresh process (so peak RSS is its own)."""
    for name, n, batch_size in cases:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--scale-case", name, str(n), str(batch_size or 0)],
                       check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nt-python", help="python of the neural-tangents virtualenv")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows among {', '.join(ROWS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per framework per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the two frameworks")
    parser.add_argument("--scale", action="store_true", help="run the scale benchmark instead")
    parser.add_argument("--resnet-n", type=int, default=1024)
    parser.add_argument("--cnn1d-n", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, help="block size of the scale runs (default: per case, see SCALE)")
    parser.add_argument("--cases", default=",".join(SCALE), help=f"comma-separated scale cases among {', '.join(SCALE)}")
    parser.add_argument("--nt-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--scale-case", nargs=3, metavar=("NAME", "N", "BS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nt_worker:
        return _nt_worker(*args.nt_worker)
    if args.scale_case:
        return _scale_case(args.scale_case[0], int(args.scale_case[1]), int(args.scale_case[2]) or None)
    if args.scale:
        cases = args.cases.split(",")
        if set(cases) - set(SCALE):
            parser.error(f"unknown cases {sorted(set(cases) - set(SCALE))}; allowed: {', '.join(SCALE)}")
        return scale([(name, args.cnn1d_n if SCALE[name][0] == "cnn1d" else args.resnet_n,
                       args.batch_size or SCALE[name][4]) for name in cases])
    if not args.nt_python:
        parser.error("--nt-python is required for the comparison (or pass --scale)")
    rows = args.rows.split(",")
    unknown = set(rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; allowed: {', '.join(ROWS)}")
    compare(args.nt_python, rows, args.repeats, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
