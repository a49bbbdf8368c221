"""Per-block NTK features of a Keras model, the expensive half of `kerasntk.ntk.empirical_ntk_fn`.

One forward pass of the batch and one backward pass of Σ_i f(x_i) vectorized (pfor) over the O logits give,
at every layer output, the cotangents g_{ia} = ∂f_a(x_i)/∂y (examples are independent in inference mode,
so the batch sum separates them). From them each parameterised layer yields either

- a *Gram* term (layer inputs X (N, k), cotangents G (N, O, c)): Dense-like layers applied once per
  example, whose kernel block is (X₁X₂ᵀ + 1) ⊙ (G₁·G₂) (the +1 is the bias), never forming a Jacobian;
- a *Jacobian* term (N, O, F): the per-example Jacobian of that layer's F parameters only — for
  Dense/Conv from patches × cotangents with one batched GEMM, for BatchNorm from its normalized input ×
  cotangents, for any other layer (custom layers) from a vectorized (pfor) Jacobian of that layer alone.

`contract` turns two blocks' features into the kernel block in the requested dtype.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras.src.models.functional import operation_fn  # noqa: E402


def functional_graph(model):
    """The functional graph that runs `model` (Functional or built Sequential), or None if subclassed."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if hasattr(model, "_run_through_graph") and hasattr(model, "_nodes_by_depth"):
        return model
    return None


def trainable_layers(model):
    """The layers whose trainable variables the NTK differentiates, in graph order: the operations of a
    functional graph owning trainable variables (a nested model counts as one), or the model itself if
    subclassed. The per-layer kernel has one entry per layer, in this order."""
    graph = functional_graph(model)
    if graph is None:
        return [model]
    return [op for op in graph.operations if _trainable(op)]


def _trainable(op):
    """The trainable variables an operation owns (none for plain ops and frozen layers)."""
    return list(getattr(op, "trainable_variables", []) or [])


def structured_kind(op):
    """'dense' or 'conv' when `op` is a Dense/Conv1D/Conv2D whose derivative has the patch × cotangent form,
    'batchnorm' for BatchNormalization (affine per channel in inference mode), else None."""
    if isinstance(op, keras.layers.BatchNormalization):
        return "batchnorm"
    if getattr(op, "quantization_mode", None) or getattr(op, "lora_enabled", False):
        return None
    if not (op.trainable and getattr(op, "kernel", None) is not None and op.kernel.trainable):
        return None
    if op.use_bias and not op.bias.trainable:
        return None
    if isinstance(op, keras.layers.Dense):
        return "dense"
    if isinstance(op, (keras.layers.Conv1D, keras.layers.Conv2D)) and not isinstance(
        op, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose)
    ):
        if op.groups == 1 and op.data_format == "channels_last" and op.padding in ("valid", "same"):
            return "conv"
    return None


def _pre_activation(op, kind, x):
    """The layer's affine output before its activation (same arithmetic as Dense.call / BaseConv.call)."""
    x = tf.cast(x, op.compute_dtype)
    kernel = tf.cast(op.kernel.value, op.compute_dtype)
    y = tf.tensordot(x, kernel, [[x.shape.rank - 1], [0]]) if kind == "dense" else op.convolution_op(x, kernel)
    if op.use_bias:
        y = y + tf.cast(op.bias.value, op.compute_dtype)
    return y


def _patches(op, kind, x):
    """Layer input as (batch, positions, k) rows that multiply the kernel reshaped to (k, filters)."""
    x = tf.cast(x, op.compute_dtype)
    if kind == "dense":
        return tf.reshape(x, (x.shape[0], -1, x.shape[-1]))
    if op.rank == 1:
        x = x[:, None]
    size = [1, 1] if op.rank == 1 else []
    ksize, strides, rates = (tuple(size[:1]) + tuple(v) for v in (op.kernel_size, op.strides, op.dilation_rate))
    p = tf.image.extract_patches(
        x, sizes=[1, *ksize, 1], strides=[1, *strides, 1], rates=[1, *rates, 1], padding=op.padding.upper()
    )
    return tf.reshape(p, (x.shape[0], -1, p.shape[-1]))


class Features:
    """Computes NTK features of blocks of examples for a Keras model with `out_dim` logits.

    structured=False treats every layer through its per-example Jacobian (the "jacobian" implementation);
    a model without a functional graph is treated as a single such layer. trace=True: features for the
    trace kernel (N1, N2), full kernel (N1, N2, O, O) otherwise.
    """

    def __init__(self, model, out_dim, structured, dtype, trace, per_layer=False):
        self.model, self.out_dim, self.structured, self.dtype, self.trace = model, out_dim, structured, dtype, trace
        self.graph, self.per_layer = functional_graph(model), per_layer
        self.layers = trainable_layers(model)
        self._shared = self._shared_layers()

    def _shared_layers(self):
        """Ids of layers called more than once in the graph (their Jacobians add, Gram terms do not)."""
        if self.graph is None:
            return set()
        seen, shared = set(), set()
        for nodes in self.graph._nodes_by_depth.values():
            for node in nodes:
                key = id(node.operation)
                (shared if key in seen else seen).add(key)
        return shared

    def _forward(self, x, tape, records):
        """Run the model in inference mode, watching each parameterised layer's output in `tape`."""

        def wrap(op):
            call = operation_fn(op, training=False)
            if not _trainable(op):
                return call
            kind = structured_kind(op) if self.structured else None

            def recorded(*args, **kwargs):
                if kind in ("dense", "conv"):
                    pre = _pre_activation(op, kind, args[0])
                    tape.watch(pre)
                    records.append((op, kind, args[0], [pre]))
                    return op.activation(pre) if op.activation is not None else pre
                out = call(*args, **kwargs)
                flat = tf.nest.flatten(out)
                tape.watch(flat)
                records.append((op, kind, args[0], flat) if kind else (op, None, (args, kwargs), flat))
                return out

            return recorded

        if self.graph is None:
            return wrap(self.model)(x)
        return self.graph._run_through_graph([x], operation_fn=wrap)

    def features(self, x):
        """Features of block `x` (N, ...), one ([Jacobians (N, O, F)], [(X (N, k), G (N, O, c)) Gram terms]) per
        layer of `self.layers`."""
        n = x.shape[0]
        records = []
        with tf.GradientTape(persistent=True) as tape:
            y = tf.nest.flatten(self._forward(x, tape, records))[0]
            total = tf.reduce_sum(y, axis=0)  # examples are independent: row a holds every ∂f_a(x_i)
        cotangents = tape.jacobian(total, [r[3] for r in records], unconnected_gradients="zero", experimental_use_pfor=True)
        jacobians, grams = {}, {}
        for (op, kind, inputs, outputs), grads in zip(records, cotangents):
            if kind == "batchnorm":
                jac = self._batchnorm_jacobian(op, inputs, grads[0], n)
            elif kind and id(op) not in self._shared and outputs[0].shape[1:-1].num_elements() == 1:
                grams.setdefault(id(op), []).append(self._gram_term(op, kind, inputs, grads[0], n))
                continue
            elif kind:
                jac = self._structured_jacobian(op, kind, inputs, grads[0], n)
            else:
                jac = [self._layer_jacobian(op, inputs, grads, n)]
            previous = jacobians.get(id(op))
            jacobians[id(op)] = jac if previous is None else [a + b for a, b in zip(previous, jac)]
        return [([self._cast(j) for j in jacobians.get(id(op), [])], grams.get(id(op), [])) for op in self.layers]

    def _cast(self, t):
        return tf.cast(t, self.dtype)

    def _per_example(self, g):
        """Cotangents (O, N, ...) as (N, O, ...)."""
        return tf.transpose(g, [1, 0] + list(range(2, g.shape.rank)))

    def _gram_term(self, op, kind, x, g, n):
        """Inputs (N, k) and cotangents (N, O, c) of a layer applied once per example; a bias is a column of ones."""
        x = self._cast(tf.reshape(_patches(op, kind, x), (n, -1)))
        if op.use_bias:
            x = tf.concat([x, tf.ones((n, 1), x.dtype)], axis=1)
        g = self._cast(tf.reshape(self._per_example(g), (n, self.out_dim, -1)))
        return x, g

    def _structured_jacobian(self, op, kind, x, g, n):
        """Per-example Jacobians [kernel, bias] of a Dense/Conv layer: Σ_positions patch ⊗ cotangent, Σ cotangent."""
        p = _patches(op, kind, x)  # (N, P, k)
        o, positions, k = self.out_dim, p.shape[1], p.shape[2]
        g = tf.transpose(tf.reshape(g, (o, n, positions, -1)), [1, 2, 0, 3])  # (N, P, O, c)
        jac = tf.matmul(p, tf.reshape(g, (n, positions, -1)), transpose_a=True)  # (N, k, O·c) as one batched GEMM
        if self.trace:  # the trace kernel sums over logits and parameters alike: any consistent order will do
            jac = tf.reshape(jac, (n, 1, -1))
        else:
            jac = tf.reshape(tf.transpose(tf.reshape(jac, (n, k, o, -1)), [0, 2, 1, 3]), (n, o, -1))
        return [jac, tf.reduce_sum(g, axis=1)] if op.use_bias else [jac]

    def _batchnorm_jacobian(self, op, x, g, n):
        """Per-example Jacobians [γ, β] (trainable ones only) of inference-mode BatchNorm, y = γ·x̂ + β with
        x̂ = (x − moving mean)/√(moving var + ε): Σ over positions of x̂ ⊙ cotangent, and of the cotangent."""
        dtype = tf.float64 if x.dtype == tf.float64 else tf.float32  # BatchNorm computes in ≥ float32
        axis = op.axis % x.shape.rank
        x = tf.reshape(tf.experimental.numpy.moveaxis(tf.cast(x, dtype), axis, -1), (n, -1, x.shape[axis]))
        g = tf.experimental.numpy.moveaxis(tf.cast(g, dtype), axis + 1, -1)  # (O, N, ..., C)
        g = tf.reshape(g, (self.out_dim, n, -1, g.shape[-1]))
        mean, var = tf.cast(op.moving_mean.value, dtype), tf.cast(op.moving_variance.value, dtype)
        jac = []
        if op.scale and op.gamma.trainable:
            jac.append(tf.einsum("ipc,aipc->iac", (x - mean) * tf.math.rsqrt(var + op.epsilon), g))
        if op.center and op.beta.trainable:
            jac.append(self._per_example(tf.reduce_sum(g, axis=2)))
        return jac

    def _layer_jacobian(self, op, call_args, grads, n):
        """Per-example Jacobian of one layer's own trainable variables: its VJP on one example, vectorized
        (pfor) over the O·N (example, logit) rows, so memory stays linear in N."""
        args, kwargs = call_args
        o, call = self.out_dim, operation_fn(op, training=False)
        leaves = tf.nest.flatten((args, kwargs))
        batched = [i for i, leaf in enumerate(leaves) if tf.is_tensor(leaf)]
        tiled = [tf.tile(leaves[i], [o] + [1] * (leaves[i].shape.rank - 1)) for i in batched]  # row a·N + i
        cotangents = [tf.reshape(g, (o * n, *g.shape[2:])) for g in grads]
        variables = [v.value for v in _trainable(op)]

        def one_row(row):
            inputs, cots = row
            values = list(leaves)
            for i, t in zip(batched, inputs):
                values[i] = t[None]
            row_args, row_kwargs = tf.nest.pack_sequence_as((args, kwargs), values)
            with tf.GradientTape() as tape:
                out = tf.nest.flatten(call(*row_args, **row_kwargs))
            vjp = tape.gradient(out, variables, output_gradients=[c[None] for c in cots], unconnected_gradients="zero")
            return tf.concat([tf.reshape(g, (-1,)) for g in vjp], axis=0)

        jac = tf.vectorized_map(one_row, (tiled, cotangents))  # (O·N, F)
        return tf.transpose(tf.reshape(jac, (o, n, -1)), [1, 0, 2])

    def contract(self, f1, f2):
        """Kernel block from two blocks' features: (N1, N2, O, O), or (N1, N2) averaged over logits if trace;
        with per_layer, one such block per layer of `self.layers` along a leading axis."""
        n1, n2 = _rows(f1), _rows(f2)
        k = [self._contract_layer(a, b, n1, n2) for a, b in zip(f1, f2)]
        k = tf.stack(k) if self.per_layer else tf.add_n(k)
        if self.trace:
            return k
        lead = list(range(k.shape.rank - 4))
        return tf.transpose(k, lead + [i + len(lead) for i in (0, 2, 1, 3)])

    def _contract_layer(self, f1, f2, n1, n2):
        """One layer's kernel block: (N1, N2) for the trace kernel, (N1, O, N2, O) for the full one."""
        (jacs1, grams1), (jacs2, grams2) = f1, f2
        o = self.out_dim
        if self.trace:
            k = tf.zeros((n1, n2), self.dtype)
            for j1, j2 in zip(jacs1, jacs2):
                k += tf.matmul(tf.reshape(j1, (n1, -1)), tf.reshape(j2, (n2, -1)), transpose_b=True) / o
            for (x1, g1), (x2, g2) in zip(grams1, grams2):
                gg = tf.matmul(tf.reshape(g1, (n1, -1)), tf.reshape(g2, (n2, -1)), transpose_b=True) / o
                k += tf.matmul(x1, x2, transpose_b=True) * gg
            return k
        k = tf.zeros((n1, o, n2, o), self.dtype)
        for j1, j2 in zip(jacs1, jacs2):
            k += tf.reshape(tf.matmul(tf.reshape(j1, (n1 * o, -1)), tf.reshape(j2, (n2 * o, -1)), transpose_b=True), (n1, o, n2, o))
        for (x1, g1), (x2, g2) in zip(grams1, grams2):
            gg = tf.reshape(tf.matmul(tf.reshape(g1, (n1 * o, -1)), tf.reshape(g2, (n2 * o, -1)), transpose_b=True), (n1, o, n2, o))
            k += tf.matmul(x1, x2, transpose_b=True)[:, None, :, None] * gg
        return k


def _rows(features):
    """Number of examples in a block's features."""
    for jacs, grams in features:
        if jacs or grams:
            return jacs[0].shape[0] if jacs else grams[0][0].shape[0]
    raise ValueError("no layer with trainable variables contributed features")
