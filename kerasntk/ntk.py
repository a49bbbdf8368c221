"""Empirical neural tangent kernels of Keras models, blocked and distributed, and kernel metrics.

Θ(x, x')_{ab} = Σ_p ∂f_a(x)/∂w_p ∂f_b(x')/∂w_p over the model's *trainable* variables, with every layer
in inference mode (`training=False`: BatchNorm uses its moving statistics, so examples are independent).

Shapes and normalisation (the neural-tangents convention): `trace_axes=()` gives the full kernel
(N1, N2, O, O); `trace_axes=(-1,)` gives the trace kernel (N1, N2) = the **mean** over the logit axis of
Θ_{aa}, i.e. the full kernel's trace divided by O.

Implementations (`implementation=`):

- "structured": structured derivatives. Dense/Conv1D/Conv2D layers are differentiated from their inputs and
  output cotangents, BatchNorm γ/β from its normalized inputs and output cotangents
  (`kerasntk._ntk_features`); all other layers with trainable variables (custom layers) through their own
  per-example Jacobian. Needs a functional or Sequential model.
- "jacobian": per-layer Jacobian contraction: every layer through its own per-example Jacobian,
  contracted as one GEMM per block pair; a subclassed model is treated as one layer.
- "ntk_vp": matrix-free Θv products (VJP then `ForwardAccumulator` JVP) applied to basis vectors; costs
  N2·O products per block, for checking and for models the other two cannot handle.
- "auto": "structured" when the model has a functional graph (it is never slower than "jacobian": it
  does the same cotangent pass and replaces per-layer Jacobians by cheaper contractions), else "jacobian".

Cost and memory: one forward pass and O backward passes (vectorized) per block of `batch_size` examples;
for a symmetric kernel (x2 None) only the upper block triangle is computed, each row's features reused
along it. Two blocks' features (batch_size·O·P numbers each) are held at a time, so peak memory grows with
batch_size, not with N. Functions are `tf.function`s without XLA, because on CPU XLA-compiled ResNet-20
steps run about 2x slower than TensorFlow's oneDNN kernels (BENCHMARKS.md, "Training"); the block pair a
replica runs under a strategy compiles with XLA (tests/test_ntk.py), as TPUStrategy requires.
"""

import contextlib
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasntk._ntk_features import Features, functional_graph, trainable_layers  # noqa: E402
from kerasntk._ntk_metrics import (  # noqa: E402,F401  (re-exported public API)
    KernelTrajectory,
    effective_rank,
    eigenvalues,
    kernel_alignment,
    kernel_distance,
    kernel_velocity,
    layer_trajectory_metrics,
    trajectory_metrics,
)

IMPLEMENTATIONS = ("auto", "jacobian", "structured", "ntk_vp")  # the `implementation=` values (module docstring)
FEATURE_BUDGET = 2**30  # bytes: two blocks' Jacobian features per device when no batch_size is given


def empirical_ntk_fn(model, *, trace_axes=(-1,), implementation="auto", batch_size=None, dtype=None, strategy=None,
                     per_layer=False):
    """A function `ntk(x1, x2=None, *, weights=None, out=None)` computing the empirical NTK of `model` as numpy.

    trace_axes: () for the full kernel (N1, N2, O, O); (-1,) for the trace kernel (N1, N2), averaged over logits.
    batch_size: examples per block; peak memory grows with it, not with N (None: `default_batch_size`, the
      largest block whose features fit the memory budget `FEATURE_BUDGET`, 1 GiB per device).
    dtype: dtype of the contraction and of the result (default: the model's compute dtype); derivatives
      are taken in the model's own dtype (build it under `keras.config.set_floatx("float64")` for float64).
    strategy: a tf.distribute strategy whose replicas compute different block pairs (create the model
      in its scope on TPU).
    `ntk(x1)` is Θ(x1, x1), computing only the upper block triangle. `weights`: the point to take the kernel
    at, every weight of the model in `model.get_weights()` order (None: the weights the model holds); the
    model's own weights are put back afterwards. `out` may be a path ending in .npy (memory-mapped array) or
    .nc (NetCDF) to write the kernel block by block; the lazily read kernel is returned (see `open_kernel`).
    per_layer: the kernel decomposed over the layers with trainable variables, Θ = Σ_l Θ_l, along a leading
      `layer` axis (L, N1, N2[, O, O]); the function's `layer_names` name them (a nested model or a
      subclassed one counts as one layer). Not with implementation "ntk_vp".
    """
    trace = _check_trace_axes(trace_axes)
    implementation = _check_implementation(model, implementation)
    if per_layer and implementation == "ntk_vp":
        raise ValueError("per_layer needs implementation 'auto', 'structured' or 'jacobian'; 'ntk_vp' forms no "
                         "per-layer pieces")
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    engine = _Engine(model, implementation, trace, _check_dtype(model, dtype), bool(per_layer))

    def ntk(x1, x2=None, *, weights=None, out=None):
        with _at_weights(model, weights):
            return engine.kernel(x1, x2, batch_size, strategy, out)

    ntk.implementation = implementation
    if per_layer:
        ntk.layer_names = tuple(layer.name for layer in trainable_layers(model))
    return ntk


def default_batch_size(model, out_dim, dtype, budget=None):
    """Examples per block when none is given: the largest block such that two blocks' per-example Jacobians
    (a row and a column block, O logits × P trainable parameters per example, in the wider of the model's and
    the contraction's dtype) fit in `budget` bytes. An upper bound on the features (structured derivatives keep
    Dense layers' inputs and cotangents instead); the backward passes' activations come on top (ResNet-20 at
    N = 1024: BENCHMARKS.md, "NTK at scale"). budget: bytes, default `FEATURE_BUDGET`."""
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    itemsize = max(tf.as_dtype(model.compute_dtype).size, tf.as_dtype(dtype).size)
    return max(1, (budget or FEATURE_BUDGET) // (2 * out_dim * params * itemsize))


def ntk_vp_fn(model, x1, x2=None):
    """Matrix-free NTK-vector product v (N2, O) -> Θ(x1, x2)·v (N1, O), Σ over j, b of Θ[i, j, a, b] v[j, b].

    Costs one backward pass on x2 and one forward-mode pass on x1 per product (tf.Tensor in and out), for
    conjugate gradients and kernel regression without forming Θ.
    """
    x1 = _as_input(model, x1)
    x2 = x1 if x2 is None else _as_input(model, x2)
    return tf.function(lambda v: _ntk_vp(model, x1, x2, v))


def _ntk_vp(model, x1, x2, v):
    """Θ(x1, x2)·v = J(x1) (J(x2)ᵀ v): a VJP on x2, then a JVP on x1 along its result."""
    variables = [w.value for w in model.trainable_variables]
    with tf.GradientTape() as tape:
        y2 = model(x2, training=False)
    u = tape.gradient(y2, variables, output_gradients=tf.cast(v, y2.dtype), unconnected_gradients="zero")
    with tf.autodiff.ForwardAccumulator(variables, u) as acc:
        y1 = model(x1, training=False)
    return acc.jvp(y1, unconnected_gradients="zero")


def open_kernel(path):
    """Lazily open a kernel written by `ntk(..., out=path)`: np.memmap for .npy, xarray.DataArray for .nc."""
    if str(path).endswith(".npy"):
        return np.load(path, mmap_mode="r")
    if str(path).endswith(".nc"):
        import xarray as xr

        return xr.open_dataset(path, engine="netcdf4")["kernel"]
    raise ValueError(f"kernel path must end in .npy or .nc, got {path!r}")


@contextlib.contextmanager
def _at_weights(model, weights):
    """`model` holding `weights` (a `model.get_weights()` list; None: as it is) inside, its own weights after."""
    if weights is None:
        yield
        return
    own = model.get_weights()
    expected = [w.shape for w in own]
    given = [np.shape(w) for w in weights]
    if given != expected:
        raise ValueError(f"weights must be {len(expected)} arrays shaped as model.get_weights() of "
                         f"{model.name!r} ({expected}); got {len(given)} shaped {given}")
    try:
        model.set_weights(weights)
        yield
    finally:
        model.set_weights(own)


def _check_trace_axes(trace_axes):
    """True for the trace kernel, False for the full kernel; only the logit axis can be traced."""
    axes = tuple(trace_axes)
    if axes in ((-1,), (1,)):
        return True
    if axes == ():
        return False
    raise ValueError(f"trace_axes must be () (full kernel) or (-1,) (trace over logits), got {trace_axes!r}")


def _check_implementation(model, implementation):
    """Resolve "auto" and validate the implementation name against what the model supports."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}")
    if not model.trainable_variables:
        raise ValueError(f"model {model.name!r} has no trainable variables: its NTK is zero")
    structured_ok = functional_graph(model) is not None
    if implementation == "auto":
        return "structured" if structured_ok else "jacobian"
    if implementation == "structured" and not structured_ok:
        raise ValueError(
            f"implementation 'structured' needs a functional or Sequential model; {model.name!r} is subclassed "
            "(use 'jacobian' or 'auto')"
        )
    return implementation


def _check_dtype(model, dtype):
    """The contraction dtype: a floating dtype, defaulting to the model's compute dtype."""
    dtype = tf.as_dtype(dtype or model.compute_dtype)
    if not dtype.is_floating:
        raise ValueError(f"dtype must be a floating dtype (float32, float64), got {dtype.name}")
    return dtype


def _as_input(model, x):
    """Inputs as a tensor of the model's input dtype."""
    inputs = getattr(model, "inputs", None)
    dtype = inputs[0].dtype if inputs else model.compute_dtype
    return tf.convert_to_tensor(np.asarray(x), dtype=dtype)


class _Engine:
    """Computes a kernel block by block: cached row-block features, upper triangle when symmetric."""

    def __init__(self, model, implementation, trace, dtype, per_layer=False):
        self.model, self.trace, self.dtype, self.per_layer = model, trace, dtype, per_layer
        self.implementation, self.out_dim = implementation, None
        self.pair = tf.function(self._pair)
        self._distributed = {}

    def _setup(self, x):
        """Find the number of logits O (one example's forward pass) and build the feature functions once."""
        if self.out_dim is not None:
            return
        y = self.model(x[:1], training=False)
        if not isinstance(y, tf.Tensor) or y.shape.rank != 2:
            raise ValueError(f"model {self.model.name!r} must output one (batch, logits) tensor, got {y!r}")
        self.out_dim = int(y.shape[-1])
        if self.implementation != "ntk_vp":
            self.feats = Features(self.model, self.out_dim, self.implementation == "structured", self.dtype, self.trace,
                                  self.per_layer)
            self.features = tf.function(self.feats.features)
            self.contract = tf.function(self.feats.contract)

    def _pair(self, xa, xb):
        """One kernel block Θ(xa, xb) computed from scratch (used under a strategy and by ntk_vp)."""
        if self.implementation != "ntk_vp":
            return self.feats.contract(self.feats.features(xa), self.feats.features(xb))
        nb, o = xb.shape[0], self.out_dim
        basis = tf.reshape(tf.eye(nb * o, dtype=self.model.compute_dtype), (nb * o, nb, o))
        cols = tf.map_fn(lambda v: _ntk_vp(self.model, xa, xb, v), basis)  # (nb·O, na, O)
        k = tf.transpose(tf.reshape(tf.cast(cols, self.dtype), (nb, o, xa.shape[0], o)), [2, 0, 3, 1])
        return tf.reduce_mean(tf.linalg.diag_part(k), axis=-1) if self.trace else k

    def kernel(self, x1, x2, batch_size, strategy, out):
        """The kernel of x1 against x2 (x1 itself if None), into memory or into the file `out`."""
        x1 = _as_input(self.model, x1)
        self._setup(x1)
        sym = x2 is None
        x2 = x1 if sym else _as_input(self.model, x2)
        batch_size = batch_size or default_batch_size(self.model, self.out_dim, self.dtype)
        blocks1, blocks2 = _blocks(x1, batch_size), _blocks(x2, batch_size)
        if sym:  # upper triangle, each row right to left: row i+1's features are row i's last column's
            pairs = [(i, j) for i in range(len(blocks1)) for j in range(len(blocks1) - 1, i - 1, -1)]
        else:
            pairs = [(i, j) for i in range(len(blocks1)) for j in range(len(blocks2))]
        shape = (x1.shape[0], x2.shape[0]) + (() if self.trace else (self.out_dim,) * 2)
        layers = [layer.name for layer in self.feats.layers] if self.per_layer else None
        sink = _Sink((len(layers), *shape) if layers else shape, self.dtype.as_numpy_dtype, out, layers)
        lead = (slice(None),) if layers else ()  # the per-layer kernel's leading layer axis

        def write(i, j, k):
            (s1, e1, _), (s2, e2, _) = blocks1[i], blocks2[j]
            k = np.asarray(k)[lead + (slice(e1 - s1), slice(e2 - s2))]
            sink[lead + (slice(s1, e1), slice(s2, e2))] = k
            if sym and i != j:
                k = np.swapaxes(k, len(lead), len(lead) + 1)
                sink[lead + (slice(s2, e2), slice(s1, e1))] = k if self.trace else np.swapaxes(k, -1, -2)

        if strategy is not None and strategy.num_replicas_in_sync > 1:
            self._run_distributed(strategy, blocks1, blocks2, pairs, write)
        elif self.implementation == "ntk_vp":
            for i, j in pairs:
                write(i, j, self.pair(blocks1[i][2], blocks2[j][2]))
        else:
            self._run_cached(blocks1, blocks2, pairs, sym, write)
        return sink.close()

    def _run_cached(self, blocks1, blocks2, pairs, sym, write):
        """Row-block features computed once per row, column features once per pair; when symmetric the
        diagonal and the next row reuse features already computed. At most two blocks' features are held."""
        row = rows = col = cols = None
        for i, j in pairs:
            if i != row:
                if sym and col == i:
                    rows, cols = cols, None
                else:
                    rows = None  # release before computing the next block's features
                    rows = self.features(blocks1[i][2])
                row = i
            if sym and i == j:
                write(i, j, self.contract(rows, rows))
                continue
            cols = None  # likewise
            col, cols = j, self.features(blocks2[j][2])
            write(i, j, self.contract(rows, cols))

    def _run_distributed(self, strategy, blocks1, blocks2, pairs, write):
        """Spread block pairs over the strategy's replicas, R pairs per round (the last round padded)."""
        r = strategy.num_replicas_in_sync
        if id(strategy) not in self._distributed:
            self._distributed[id(strategy)] = tf.function(lambda a, b: strategy.run(self.pair, args=(a, b)))
        step = self._distributed[id(strategy)]
        for start in range(0, len(pairs), r):
            chunk = pairs[start : start + r]
            padded = chunk + [chunk[-1]] * (r - len(chunk))
            xa = strategy.experimental_distribute_values_from_function(
                lambda ctx: blocks1[padded[ctx.replica_id_in_sync_group][0]][2]
            )
            xb = strategy.experimental_distribute_values_from_function(
                lambda ctx: blocks2[padded[ctx.replica_id_in_sync_group][1]][2]
            )
            for (i, j), k in zip(chunk, strategy.experimental_local_results(step(xa, xb))):
                write(i, j, k)


def _blocks(x, batch_size):
    """[(start, stop, block)] covering x; every block padded with zeros to batch_size (static shapes)."""
    n = x.shape[0]
    size = min(int(batch_size), n)
    out = []
    for start in range(0, n, size):
        block = x[start : start + size]
        if block.shape[0] < size:
            block = tf.concat([block, tf.zeros((size - block.shape[0], *x.shape[1:]), x.dtype)], axis=0)
        out.append((start, min(start + size, n), block))
    return out


class _Sink:
    """Where kernel blocks go: a numpy array, a memory-mapped .npy file, or a NetCDF variable."""

    def __init__(self, shape, dtype, path, layers=None):
        self.path, self._nc = path, None
        if path is None:
            self.array = np.zeros(shape, dtype)
        elif str(path).endswith(".npy"):
            self.array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        elif str(path).endswith(".nc"):
            import netCDF4

            self._nc = netCDF4.Dataset(path, "w")
            dims = ("example", "example_b", "logit", "logit_b")[: len(shape) - bool(layers)]
            dims = ("layer", *dims) if layers else dims
            for name, size in zip(dims, shape):
                self._nc.createDimension(name, size)
            if layers:
                self._nc.createVariable("layer", str, ("layer",))[:] = np.array(layers, dtype=object)
            self.array = self._nc.createVariable("kernel", dtype, dims)
            self.array.long_name = "empirical neural tangent kernel"
            self.array.units = "1"
        else:
            raise ValueError(f"out must be None or a path ending in .npy or .nc, got {path!r}")

    def __setitem__(self, index, value):
        self.array[index] = value

    def close(self):
        """The in-memory kernel, or (after flushing the file) the lazily opened one."""
        if self.path is None:
            return self.array
        if self._nc is not None:
            self._nc.close()
        else:
            self.array.flush()
            del self.array
        return open_kernel(self.path)
