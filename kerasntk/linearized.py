"""Linearized (Taylor-expanded) networks and NTK kernel regression (docs/methods.md §6).

`linearize(model)` returns a Keras model computing f(x; w_t) + J(x; w_t)·Δw (optionally + ½ Δwᵀ H Δw) whose only
trainable weights are Δw, so it trains with plain `compile()/fit()` under any strategy. `kernel_regression` is
ridge regression with the empirical NTK at w_t: a cheap proxy (ours), not the paper's estimator, which trains
the linearized network with SGD.
"""

import collections
import logging
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasntk import ntk  # noqa: E402
from kerasntk.evaluation import Evaluator  # noqa: E402

log = logging.getLogger(__name__)

_ZERO = tf.UnconnectedGradients.ZERO


def _forward_jvp(fn, primals, tangents):
    """(fn(), J·tangents): one forward-mode pass of `fn` with the tensors `primals` pushed along `tangents`."""
    with tf.autodiff.ForwardAccumulator(primals, tangents) as acc:
        y = fn()
    return y, tf.nest.map_structure(lambda t: acc.jvp(t, unconnected_gradients=_ZERO), y)


def _transpose_jvp(fn, primals, tangents):
    """(fn(), J·tangents) by transposing the VJP u ↦ Jᵀu (linear in u) in the same graph.

    XLA-friendly: TF's forward accumulator computes each op's JVP in a nested function whose backward pass hands
    shape tensors across the function boundary, which makes XLA treat every input as a compile-time constant and
    recompile at each step (seen with jit_compile=True on TF 2.21). Here everything stays in one graph.
    """
    with tf.GradientTape(watch_accessed_variables=False) as forward:
        forward.watch(primals)
        y = fn()
    dummy = tf.nest.map_structure(tf.zeros_like, y)  # any value: Jᵀu is linear in u
    with tf.GradientTape(watch_accessed_variables=False) as transpose:
        transpose.watch(dummy)
        vjp = forward.gradient(y, primals, output_gradients=dummy, unconnected_gradients=_ZERO)
    return y, transpose.gradient(vjp, dummy, output_gradients=tangents, unconnected_gradients=_ZERO)


_JVP = {"forward": _forward_jvp, "transpose": _transpose_jvp}


def _taylor_terms(fn, primals, tangents, order, jvp):
    """[fn(), J·t] for order 1, [fn(), J·t, tᵀHt] for order 2 (the JVP of w ↦ J(w)·t: nested JVPs)."""
    jvp = _JVP[jvp]
    if order == 1:
        return list(jvp(fn, primals, tangents))
    values = {}

    def first_order():
        values["y"], jt = jvp(fn, primals, tangents)
        return jt

    jt, hess = jvp(first_order, primals, tangents)
    return [values["y"], jt, hess]


def _call_with(model, variables, values, inputs):
    """model(inputs) in inference mode with `variables` read as the tensors `values` (so they can be watched)."""
    with keras.StatelessScope(state_mapping=list(zip(variables, values))):
        return model(inputs, training=False)


class Linearized(keras.Model):
    """f(x; w_t) + J(x; w_t)·Δw (+ ½ Δwᵀ H Δw if order=2) around a frozen copy `base` of the network.

    `base` runs in inference mode (BatchNorm moving statistics, no dropout) with its weights frozen; the Δw
    variables (zeros at construction, one per trainable variable of the original network, same order and
    shapes) are the only trainable weights. Build instances with `linearize`.
    """

    def __init__(self, base, primal_index, order=1, jvp="auto", **kwargs):
        # A plain (not mixed) policy in the variables' dtype: no autocast scope around `call`, so w_t and Δw are
        # read in full precision; a mixed-precision base still autocasts inside its own layers.
        super().__init__(dtype=base.weights[primal_index[0]].dtype, **kwargs)
        self.jvp = jvp
        # Hand inputs to the base network untouched, so it casts them exactly as it does when called alone.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.base = base
        self.order = order
        self._primal_index = tuple(primal_index)
        for k, i in enumerate(self._primal_index):  # one attribute each, so tf.train.Checkpoint tracks them too
            var = base.weights[i]
            delta = self.add_weight(
                shape=var.shape, dtype=var.dtype, initializer="zeros", autocast=False, name=f"delta_{k}_{var.name}"
            )
            setattr(self, f"delta_{k}", delta)

    @property
    def deltas(self):
        """The Δw variables, in the order of the original network's trainable variables."""
        return [getattr(self, f"delta_{k}") for k in range(len(self._primal_index))]

    def build(self, input_shape):
        """Nothing to create (all weights exist at construction); checks the shape against the base network's."""
        expected = getattr(self.base, "input_shape", None)
        if isinstance(expected, tuple) and input_shape is not None and len(tuple(input_shape)) != len(expected):
            raise ValueError(f"input_shape {tuple(input_shape)} does not match the network's input shape {expected}")

    @property
    def base_variables(self):
        """The frozen base variables w_t that Δw perturbs (the original network's trainable variables)."""
        weights = self.base.weights
        return [weights[i] for i in self._primal_index]

    def call(self, inputs, training=None):
        """The Taylor expansion at w_t evaluated at w_t + Δw; `training` is ignored (base in inference mode)."""
        variables = self.base_variables
        # Differentiate with respect to tensors substituted for the frozen variables (see _call_with): both JVP
        # methods and their nesting for order 2 then see plain tensors, never variable handles.
        primals = [tf.identity(v.value) for v in variables]
        tangents = [tf.convert_to_tensor(d.value) for d in self.deltas]
        terms = _taylor_terms(
            lambda: _call_with(self.base, variables, primals, inputs), primals, tangents, self.order, self._jvp_method()
        )
        if self.order == 2:
            terms[2] = tf.nest.map_structure(lambda h: 0.5 * h, terms[2])
        return tf.nest.map_structure(lambda *parts: tf.add_n(list(parts)), *terms)

    def _jvp_method(self):
        """"forward" (tf.autodiff.ForwardAccumulator) for order 1 unless `jvp` or an XLA compile
        (`compile(jit_compile=True)`, TPUStrategy) asks for "transpose"; always "transpose" for order 2."""
        if self.jvp != "auto":
            return self.jvp
        xla = getattr(self, "_jit_compile", None) is True or "TPU" in type(tf.distribute.get_strategy()).__name__
        return "transpose" if xla or self.order == 2 else "forward"


def _frozen_copy(model, weights):
    """A clone of `model` holding `weights` (model.weights order; default its current values), all frozen."""
    values = model.get_weights() if weights is None else [np.asarray(w) for w in weights]
    if len(values) != len(model.weights):
        raise ValueError(
            f"weights has {len(values)} arrays; {model.name} has {len(model.weights)} (in model.weights order)"
        )
    for value, var in zip(values, model.weights):
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"weights for {var.path} have shape {tuple(value.shape)}; expected {tuple(var.shape)}")
    try:
        base = keras.models.clone_model(model)
    except Exception as err:  # clone_model raises many types for models it cannot rebuild
        raise ValueError(
            f"cannot clone {type(model).__name__} {model.name!r} ({err}); pass a Functional or Sequential model, "
            "or a subclassed one whose get_config/from_config round-trips"
        ) from err
    if len(base.weights) != len(model.weights):
        raise ValueError(f"clone of {model.name!r} is unbuilt or differs in its weights; build the model first")
    base.set_weights(values)
    base.trainable = False
    return base


def linearize(model, weights=None, order=1, jvp="auto"):
    """The linearized network f(x; w_t) + J(x; w_t)·Δw as a `Linearized` keras.Model (order=2 adds ½ΔwᵀHΔw).

    w_t is a snapshot: `weights` (a list of arrays in `model.weights` order, e.g. a checkpoint) or the model's
    current values; later training of `model` does not change the result. Δw (the only trainable weights) starts
    at zero, one variable per trainable variable of `model` in the same order. Call it inside `strategy.scope()`
    to train under a tf.distribute strategy. `model` must be built (Functional or Sequential, or a subclassed
    model that `keras.models.clone_model` can rebuild). order=2 (beyond the paper's linear model) nests two JVPs.

    jvp: "forward" computes J·Δw in forward mode with `tf.autodiff.ForwardAccumulator`; "transpose" transposes
    the VJP in one graph (same numbers, needed under XLA, where the accumulator recompiles at every step);
    "auto" (default) uses "forward" for order 1 except when compiled with `jit_compile=True` or under
    TPUStrategy. Pass "transpose" when calling the model inside your own `tf.function(jit_compile=True)`.
    order=2 needs "transpose": on TF 2.21 backprop through nested forward accumulators returns wrong gradients
    in graph mode and fails eagerly (the forward values are right).
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 (linear) or 2 (quadratic), got {order!r}")
    if jvp not in ("auto", *_JVP):
        raise ValueError(f"jvp must be 'auto', 'forward' or 'transpose', got {jvp!r}")
    if order == 2 and jvp == "forward":
        raise ValueError(
            "order=2 needs jvp='transpose' or 'auto': TF cannot backpropagate through nested forward accumulators"
        )
    if not isinstance(model, keras.Model):
        raise ValueError(f"model must be a keras.Model, got {type(model).__name__}")
    if not model.built:
        raise ValueError(f"model {model.name!r} is not built: call it on a batch or build(input_shape) first")
    if not model.trainable_variables:
        raise ValueError(f"model {model.name!r} has no trainable variables to linearize in")
    by_id = {id(v): i for i, v in enumerate(model.weights)}
    primal_index = [by_id[id(v)] for v in model.trainable_variables]  # trainable_variables order
    base = _frozen_copy(model, weights)
    lin = Linearized(base, primal_index, order=order, jvp=jvp, name=f"{model.name}_linearized")
    lin.build(getattr(base, "input_shape", None))
    return lin


KernelRegression = collections.namedtuple("KernelRegression", "predictions method iterations residual")
KernelRegression.__doc__ = """Kernel regression outcome: test predictions (N_test, O), the solver used, CG iterations
(0 for the closed form) and the final relative residual ‖(Θ+λI)α − r‖ / ‖r‖."""


class _NTKOperator:
    """Matrix-free empirical NTK of `model` at its current weights: Jᵀv (VJP), Ju (JVP), Θv = J(Jᵀv); full Θ.

    Inference mode, trainable variables only, examples processed in blocks of `batch_size`.
    """

    def __init__(self, model, batch_size):
        self.model = model
        self.variables = list(model.trainable_variables)
        self.batch_size = batch_size
        self._evaluator = Evaluator(model, batch_size)
        self._vjp = tf.function(self._vjp_block, reduce_retracing=True)
        self._jvp = tf.function(self._jvp_block, reduce_retracing=True)

    def _vjp_block(self, x, v):
        with tf.GradientTape() as tape:
            y = self.model(x, training=False)
            s = tf.reduce_sum(y * tf.cast(v, y.dtype))
        return tape.gradient(s, self.variables, unconnected_gradients=_ZERO)

    def _jvp_block(self, x, tangents):
        primals = [tf.identity(v.value) for v in self.variables]
        return _forward_jvp(lambda: _call_with(self.model, self.variables, primals, x), primals, tangents)[1]

    def _blocks(self, n):
        return [slice(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]

    def outputs(self, x):
        """f(x; w_t) as float64, shape (N, O)."""
        return self._evaluator.predict(x).astype(np.float64)

    def vjp(self, x, v):
        """Jᵀv = Σᵢ ∂(f(xᵢ)·vᵢ)/∂w for v of shape (N, O): a list of tensors shaped like the trainable variables."""
        parts = [self._vjp(x[b], v[b]) for b in self._blocks(len(x))]
        return [tf.add_n(list(group)) for group in zip(*parts)]

    def jvp(self, x, tangents):
        """J·u for u a list shaped like the trainable variables: float64 (N, O)."""
        dtypes = [v.dtype for v in self.variables]
        tangents = [tf.cast(t, d) for t, d in zip(tangents, dtypes)]
        return np.concatenate([self._jvp(x[b], tangents).numpy() for b in self._blocks(len(x))]).astype(np.float64)

    def matvec(self, x, v):
        """Θ(X, X)·v for v of shape (N, O): one VJP and one JVP pass over X."""
        return self.jvp(x, self.vjp(x, v))

    def kernel(self, x):
        """The full Θ(X, X) as an (N·O, N·O) float64 matrix, rows ordered (example, output), from kerasntk.ntk."""
        dtype = self.variables[0].dtype
        full = ntk.empirical_ntk_fn(self.model, trace_axes=(), batch_size=self.batch_size, dtype=dtype)(x)
        n, _, o, _ = full.shape
        gram = np.asarray(full, dtype=np.float64).transpose(0, 2, 1, 3).reshape(n * o, n * o)
        return 0.5 * (gram + gram.T)


def _targets(y, num_outputs):
    """One-hot float64 targets (N, O) from integer labels (N,), or float targets already shaped (N, O)."""
    y = np.asarray(y)
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
        if y.min() < 0 or y.max() >= num_outputs:
            raise ValueError(f"y_train labels must lie in [0, {num_outputs}), got range [{y.min()}, {y.max()}]")
        return np.eye(num_outputs)[y]
    if y.ndim == 2 and y.shape[1] == num_outputs:
        return y.astype(np.float64)
    raise ValueError(f"y_train must be integer labels (N,) or targets (N, {num_outputs}); got {y.dtype} {y.shape}")


def _conjugate_gradients(matvec, b, tol, max_iter):
    """Solve A x = b for symmetric positive definite A given as `matvec`; returns (x, iterations, rel. residual)."""
    x = np.zeros_like(b)
    r = b.copy()
    p = r.copy()
    rr = np.vdot(r, r)
    b_norm = np.sqrt(np.vdot(b, b)) or 1.0
    if rr == 0:  # b = 0 (targets equal the network's outputs): x = 0 exactly
        return x, 0, 0.0
    for it in range(1, max_iter + 1):
        ap = matvec(p)
        step = rr / np.vdot(p, ap)
        x += step * p
        r -= step * ap
        rr_new = np.vdot(r, r)
        if np.sqrt(rr_new) <= tol * b_norm:
            return x, it, np.sqrt(rr_new) / b_norm
        p = r + (rr_new / rr) * p
        rr = rr_new
    log.warning("kernel regression CG stopped at max_iter=%d, relative residual %.2e", max_iter, np.sqrt(rr) / b_norm)
    return x, max_iter, np.sqrt(rr) / b_norm


_CLOSED_MAX_ROWS = 4096  # N·O above which "auto" uses CG: the (N·O)² kernel (128 MB) and its O((N·O)³) solve


def kernel_regression(
    model, x_train, y_train, x_test, *, ridge=1e-3, method="auto", tol=1e-6, max_iter=1000, batch_size=256
):
    """NTK kernel ridge regression at the model's current weights w_t (a proxy, ours; not the paper's estimator).

    Predicts f(x_test) + Θ(x_test, X) (Θ(X, X) + ridge·I)⁻¹ (Y − f(X)) with the full (N·O × N·O)
    empirical NTK Θ = J Jᵀ (trainable variables, inference mode, no averaging over outputs) and one-hot Y from
    integer labels (or float targets (N, O)). It is the t → ∞ limit of gradient descent on the linearized
    network with MSE, plus a ridge.
    method: "closed" solves with the explicit kernel from `kerasntk.ntk.empirical_ntk_fn` (small N); "cg" runs
    matrix-free conjugate gradients with NTK-vector products Θv = J(Jᵀv) (one VJP and one JVP pass over X per
    iteration); "auto" uses "closed" up to N·O = 4096. Both predict with one VJP over X and one JVP over x_test.
    `ridge` is absolute (in the kernel's units); CG stops at relative residual `tol` or after `max_iter` steps.
    Returns a `KernelRegression` with float64 predictions (N_test, O).
    """
    if method not in ("auto", "closed", "cg"):
        raise ValueError(f"method must be 'auto', 'closed' or 'cg', got {method!r}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    op = _NTKOperator(model, batch_size)
    x_train, x_test = np.asarray(x_train), np.asarray(x_test)
    f_train = op.outputs(x_train)
    if f_train.ndim != 2:
        raise ValueError(f"model must output logits of shape (N, O), got shape {f_train.shape}")
    n, o = f_train.shape
    residual = _targets(y_train, o) - f_train
    if method == "auto":
        method = "closed" if n * o <= _CLOSED_MAX_ROWS else "cg"
    if method == "closed":
        kernel = op.kernel(x_train) + ridge * np.eye(n * o)
        alpha = np.linalg.solve(kernel, residual.reshape(-1)).reshape(n, o)
        iterations = 0
        rel = np.linalg.norm(kernel @ alpha.reshape(-1) - residual.reshape(-1)) / (np.linalg.norm(residual) or 1.0)
    else:
        alpha, iterations, rel = _conjugate_gradients(
            lambda v: op.matvec(x_train, v) + ridge * v, residual, tol, max_iter
        )
    predictions = op.outputs(x_test) + op.jvp(x_test, op.vjp(x_train, alpha))
    return KernelRegression(predictions, method, iterations, float(rel))
