"""Curvature of the training loss: Hessian-vector products, top eigenvalues (Lanczos), trace (Hutchinson).

The loss is the trainer's (`kerasntk.training`): L(w) = mean softmax cross-entropy over a fixed subset
+ ½·weight_decay·‖w‖² over the model's trainable variables (coupled L2). BatchNorm runs in inference mode
(moving statistics, `training=False`): L is then one fixed function of w, each example's loss independent
of the others, so H = ∇²L is a well-defined symmetric matrix that does not depend on how the subset is cut
into blocks. (With batch statistics the loss would depend on the blocking and the moving statistics on
the calls made.)

Functions read the model's *current* weights on every call: to measure a checkpoint, load it into the
model (`model.set_weights`, a `tf.train.Checkpoint` restore) first.

H·v is forward-over-reverse: the JVP (`tf.autodiff.ForwardAccumulator`) along v of the gradient
(`tf.GradientTape`), about the cost of 2-3 gradients. The subset is cut into blocks of `batch_size`
examples (the last padded and masked out, so one traced function serves every block) and summed, so memory
grows with the block, not the subset; under a `tf.distribute` strategy each replica takes one block per
round and the rounds' results are summed across replicas (`strategy.reduce("SUM")`).

    hvp = hessian.hvp_fn(model, x, y, weight_decay=5e-4, batch_size=256)
    hessian.top_eigenvalues(hvp, k=1, num_steps=20)     # sharpness
    hessian.trace(hvp, num_probes=20)                   # (estimate, standard error)
"""

import math
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def hvp_fn(model, x, y, *, weight_decay=0.0, batch_size=256, strategy=None):
    """A function v -> H·v, the Hessian of the training loss on (x, y) at the model's current weights.

    x, y: the fixed subset (integer labels), e.g. `kerasntk.data.probe_subset(x_train, y_train, n, seed)`.
    weight_decay: the coupled L2 coefficient the model trains with (config train.weight_decay).
    batch_size: examples per block; strategy: spreads blocks over its replicas (default: the current one).
    v: a flat vector (P,) or a list of arrays shaped like `model.trainable_variables`; H·v comes back as
    numpy in the same form. The function carries `size` (P), `shapes` and `layers` (the layer name of
    each trainable variable, in order).
    """
    blocks = _Blocks(model, x, y, batch_size, strategy)

    def replica_hvp(xb, yb, mask, v):
        variables = _variables(model)
        with tf.autodiff.ForwardAccumulator(variables, v) as acc:
            with tf.GradientTape() as tape:
                loss = _data_loss(model, xb, yb, mask, blocks.count)
            grads = tape.gradient(loss, variables, unconnected_gradients="zero")
        return acc.jvp(grads, unconnected_gradients="zero")

    summed = blocks.summed(replica_hvp)
    dtypes = [w.dtype for w in model.trainable_variables]

    def hvp(v):
        flat = not isinstance(v, (list, tuple))
        parts = _unflatten(v, blocks.shapes) if flat else [np.asarray(p) for p in v]
        if [p.shape for p in parts] != blocks.shapes:
            raise ValueError(f"v must be a flat vector of {blocks.size} entries or arrays shaped "
                             f"{blocks.shapes}, got {[p.shape for p in parts]}")
        parts = [tf.constant(p, dtype) for p, dtype in zip(parts, dtypes)]
        hv = [h + weight_decay * p for h, p in zip(summed(parts), parts)]  # ∇²(½λ‖w‖²) = λI
        hv = [h.numpy() for h in hv]
        return np.concatenate([h.ravel() for h in hv]) if flat else hv

    hvp.size, hvp.shapes, hvp.layers = blocks.size, blocks.shapes, blocks.layers
    return hvp


def gradient_fn(model, x, y, *, weight_decay=0.0, batch_size=256, strategy=None):
    """A function () -> (L, ∇L as a flat numpy vector) of the same loss as `hvp_fn`, at the current weights."""
    blocks = _Blocks(model, x, y, batch_size, strategy)

    def replica_gradient(xb, yb, mask):
        variables = _variables(model)
        with tf.GradientTape() as tape:
            loss = _data_loss(model, xb, yb, mask, blocks.count)
        return [loss] + tape.gradient(loss, variables, unconnected_gradients="zero")

    summed = blocks.summed(replica_gradient)

    def gradient():
        loss, *grads = summed()
        w = [v.numpy() for v in model.trainable_variables]
        loss = float(loss) + 0.5 * weight_decay * sum(float(np.sum(np.square(p, dtype=np.float64))) for p in w)
        return loss, np.concatenate([(g.numpy() + weight_decay * p).ravel() for g, p in zip(grads, w)])

    return gradient


def top_eigenvalues(hvp, k=1, num_steps=20, seed=0):
    """The k largest (algebraic) eigenvalues of H, descending, by `num_steps` Lanczos steps from a seeded
    random start with full reorthogonalization (float64 on the host; num_steps vectors of P are kept).

    The extreme eigenvalues converge first; with num_steps = P the result is exact to rounding. Stops
    early when the Krylov space is invariant (then the values found are exact and may be fewer than k).
    """
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= hvp.size:
        raise ValueError(f"k must be an integer in [1, {hvp.size}] (the parameter count), got {k!r}")
    if not isinstance(num_steps, (int, np.integer)) or num_steps < k:
        raise ValueError(f"num_steps must be an integer >= k = {k}, got {num_steps!r}")
    steps = min(int(num_steps), hvp.size)
    q = np.random.default_rng(seed).standard_normal(hvp.size)
    basis = np.zeros((steps, hvp.size))
    alpha, beta = [], []
    for j in range(steps):
        basis[j] = q / np.linalg.norm(q)
        w = np.asarray(hvp(basis[j]), np.float64)
        alpha.append(basis[j] @ w)
        for _ in range(2):  # Gram-Schmidt twice: orthogonal to every earlier vector to rounding
            w -= basis[: j + 1].T @ (basis[: j + 1] @ w)
        b = np.linalg.norm(w)
        if j == steps - 1 or b <= 1e-10 * max(np.abs(alpha).max(), *beta, 1e-300):
            break
        beta.append(b)
        q = w
    t = np.diag(alpha) + np.diag(beta[: len(alpha) - 1], 1) + np.diag(beta[: len(alpha) - 1], -1)
    return np.linalg.eigvalsh(t)[::-1][:k]


def trace(hvp, num_probes=20, seed=0, *, probes=None, per_layer=False):
    """Hutchinson's estimate of tr H: the mean of zᵀHz over Rademacher probes z, and its standard error
    (the probes' sample standard deviation / √num_probes; NaN for one probe).

    probes: an array (M, P) to use instead (any z with E[zzᵀ] = I; √P times the standard basis gives
    the exact trace). per_layer: instead a dict {layer name: (estimate, standard error)} of the traces of
    H's diagonal blocks (Σ over a layer's coordinates of z_i (Hz)_i, from the same probes); the layers'
    estimates sum to the total's.
    """
    if probes is None:
        if not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
            raise ValueError(f"num_probes must be a positive integer, got {num_probes!r}")
        probes = np.random.default_rng(seed).integers(0, 2, (num_probes, hvp.size)) * 2.0 - 1.0
    probes = np.asarray(probes, np.float64)
    if probes.ndim != 2 or probes.shape[1] != hvp.size:
        raise ValueError(f"probes must be an array (M, {hvp.size}), got shape {probes.shape}")
    products = np.stack([z * np.asarray(hvp(z), np.float64) for z in probes])  # (M, P)
    if not per_layer:
        return _mean_and_stderr(products.sum(axis=1))
    names = list(dict.fromkeys(hvp.layers))
    owner = np.repeat([names.index(n) for n in hvp.layers], [math.prod(s) for s in hvp.shapes])
    sums = np.stack([products[:, owner == i].sum(axis=1) for i in range(len(names))], axis=1)  # (M, L)
    return {name: _mean_and_stderr(sums[:, i]) for i, name in enumerate(names)}


def _mean_and_stderr(samples):
    stderr = np.std(samples, ddof=1) / np.sqrt(len(samples)) if len(samples) > 1 else float("nan")
    return float(np.mean(samples)), float(stderr)


def _variables(model):
    """The trainable variables' underlying tf.Variables (what the tape and the accumulator watch)."""
    return [w.value for w in model.trainable_variables]


def _data_loss(model, x, y, mask, count):
    """This block's share of the mean cross-entropy over the whole subset, in inference mode."""
    logits = model(x, training=False)
    per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    return tf.reduce_sum(per_example * tf.cast(mask, per_example.dtype)) / tf.cast(count, per_example.dtype)


def _unflatten(v, shapes):
    v = np.asarray(v)
    size = sum(math.prod(s) for s in shapes)
    if v.shape != (size,):
        raise ValueError(f"v must be a flat vector of {size} entries or a list of arrays shaped {shapes}, "
                         f"got shape {v.shape}")
    return [p.reshape(s) for p, s in zip(np.split(v, np.cumsum([math.prod(s) for s in shapes])[:-1]), shapes)]


def layer_names(model):
    """The name of the innermost layer owning each trainable variable, in `model.trainable_variables` order
    (the model's own name for a variable no sub-layer owns)."""
    owner = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):  # pre-order: deeper layers last
        for v in layer.trainable_variables:
            owner[id(v)] = layer.name
    return [owner.get(id(v), model.name) for v in model.trainable_variables]


class _Blocks:
    """A subset cut into masked blocks of one static shape, R per round (one per replica), and the rounds
    of a per-replica function summed over blocks and replicas."""

    def __init__(self, model, x, y, batch_size, strategy):
        x, y = np.asarray(x), np.asarray(y)
        if len(x) == 0 or len(x) != len(y):
            raise ValueError(f"x and y must hold the same positive number of examples, got {len(x)} and {len(y)}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"y must be integer class labels (N,), got dtype {y.dtype} and shape {y.shape}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not model.trainable_variables:
            raise ValueError(f"model {model.name!r} has no trainable variables: its loss Hessian is empty")
        self.strategy = strategy or tf.distribute.get_strategy()
        replicas = self.strategy.num_replicas_in_sync
        size = min(int(batch_size), len(x))
        rounds = -(-len(x) // (size * replicas))
        pad = rounds * replicas * size - len(x)
        mask = np.concatenate([np.ones(len(x)), np.zeros(pad)])
        x, y = np.concatenate([x, np.repeat(x[:1], pad, 0)]), np.concatenate([y, np.repeat(y[:1], pad, 0)])
        dtype = model.inputs[0].dtype if getattr(model, "inputs", None) else model.compute_dtype
        split = lambda a: a.reshape(rounds, replicas, size, *a.shape[1:])  # noqa: E731
        self.x, self.y, self.mask = split(x.astype(dtype)), split(y.astype(np.int32)), split(mask.astype(dtype))
        self.count = len(mask) - pad
        self.shapes = [tuple(w.shape) for w in model.trainable_variables]
        self.size = sum(math.prod(s) for s in self.shapes)
        self.layers = layer_names(model)
        self._rounds = None

    def _distributed(self):
        """Per round, the (x, y, mask) blocks placed on the replicas' devices (once, then kept)."""
        if self._rounds is None:
            def per_replica(array, r):
                return self.strategy.experimental_distribute_values_from_function(
                    lambda ctx: tf.constant(array[r, ctx.replica_id_in_sync_group]))

            self._rounds = [[per_replica(a, r) for a in (self.x, self.y, self.mask)] for r in range(len(self.x))]
        return self._rounds

    def summed(self, replica_fn):
        """A function (*args) -> Σ over every block of replica_fn(x_block, y_block, mask_block, *args), a list."""
        strategy = self.strategy

        @tf.function
        def round_sum(xb, yb, mb, *args):
            return strategy.reduce("SUM", strategy.run(replica_fn, args=(xb, yb, mb, *args)), axis=None)

        def total(*args):
            out = None
            for blocks in self._distributed():
                part = round_sum(*blocks, *args)
                out = part if out is None else [a + b for a, b in zip(out, part)]
            return out

        return total
