"""The one evaluator: loss, error and logits of a Keras classifier on given weights and data.

Every prediction-based number kerasntk reports (the trainer's history, the parent's and children's errors,
landscape curves, kernel learning, callbacks) comes from `Evaluator`, so the "same" number agrees across
files. Its shape follows big_vision's classification evaluator: a compiled per-batch function returning
masked sums, a host loop accumulating them.
"""

import os
import weakref

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


class Evaluator:
    """Mean cross-entropy (nats), 0-1 error and optionally the logits of `model` in inference mode.

    model: a Keras classifier outputting logits (N, O). batch_size: examples per global batch, rounded down
    to a multiple of the strategy's replica count (each replica gets a consecutive slice). strategy: the
    replicas to run on (default: the one the model was built under). jit_compile: XLA-compile the per-replica
    function (as `training.use_xla` decides for the train step).

    Shapes: the data is padded to whole batches with copies of its first example, and a mask drops the
    padding, so every call runs one traced function whatever the data size (one trace for metrics, one with
    logits, one for `predict`).

    Exactness: per batch and replica the device returns the sum of the masked per-example losses in float32
    (float64 for a float64 model) and the number of correct predictions as an int32; the host adds these in
    float64. The error is thus an exact ratio of counts, and the loss carries the rounding of one batch's
    float32 sum (relative ~1e-7·√batch), not a rounding that grows with the data size.
    """

    def __init__(self, model, batch_size=1000, *, strategy=None, jit_compile=False):
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
        self._model = lambda: model
        self.strategy = strategy or model.distribute_strategy
        replicas = self.strategy.num_replicas_in_sync
        self.per_replica = max(int(batch_size) // replicas, 1)
        self.batch_size = self.per_replica * replicas
        self.jit_compile = bool(jit_compile)
        self._functions = {}

    @property
    def model(self):
        return self._model()

    @classmethod
    def shared(cls, model, batch_size=1000):
        """One evaluator per (model, batch size), kept as long as the model lives, so repeated calls on the
        same model (landscape curves, BN probes) reuse one trace."""
        per_model = _SHARED.setdefault(model, {})
        if batch_size not in per_model:
            evaluator = cls(model, batch_size)
            evaluator._model = weakref.ref(model)  # the cache must not keep its key, the model, alive
            per_model[batch_size] = evaluator
        return per_model[batch_size]

    def __call__(self, x, y, *, weights=None, logits=False):
        """{"loss", "error"} (Python floats) of `weights` (a weight set in `model.weights` order; None: the model's
        current weights, which are otherwise replaced) on inputs x and integer labels y (N,); with `logits`,
        also "logits", float64 (N, O)."""
        if weights is not None:
            self.model.set_weights(weights)
        y = _labels(y, len(x))
        loss, correct, outputs = 0.0, 0, []
        for out in self._run("logits" if logits else "metrics", x, y):
            loss += sum(float(v) for v in self._local(out["loss"]))
            correct += sum(int(v) for v in self._local(out["correct"]))
            if logits:
                outputs += self._local(out["logits"])
        result = dict(loss=loss / len(x), error=(len(x) - correct) / len(x))
        if logits:
            result["logits"] = np.concatenate(outputs)[: len(x)].astype(np.float64)
        return result

    def predict(self, x, *, weights=None):
        """The model's outputs on x in inference mode, as numpy in the model's output structure."""
        if weights is not None:
            self.model.set_weights(weights)
        batches = [tf.nest.map_structure(lambda v: np.concatenate(self._local(v)), out) for out in self._run("predict", x)]
        return tf.nest.map_structure(lambda *parts: np.concatenate(parts)[: len(x)], *batches)

    # -- the compiled per-batch function and the host loop ----------------------------------------------------

    def _run(self, kind, *arrays):
        """The `kind` function's outputs (per replica) for every global batch, the last one padded and masked."""
        n = len(arrays[0])
        if n == 0:
            raise ValueError("cannot evaluate on an empty input array")
        pad = -n % self.batch_size
        padded = [np.concatenate([a, np.repeat(a[:1], pad, 0)]) if pad else a for a in arrays]
        mask = np.arange(n + pad) < n
        fn = self._function(kind)
        for start in range(0, n + pad, self.batch_size):
            parts = [a[start:start + self.batch_size] for a in (*padded, mask)]
            yield fn(self.strategy.experimental_distribute_values_from_function(
                lambda ctx, parts=parts: tuple(self._slice(p, ctx.replica_id_in_sync_group) for p in parts)))

    def _slice(self, array, replica):
        """Replica `replica`'s consecutive part of a global batch."""
        return tf.constant(array[replica * self.per_replica:(replica + 1) * self.per_replica])

    def _local(self, value):
        """The replicas' values of one output, as numpy, in replica order (the batch order)."""
        return [v.numpy() for v in self.strategy.experimental_local_results(value)]

    def _function(self, kind):
        """The compiled step of `kind` ("metrics", "logits" or "predict"), built on first use."""
        if kind not in self._functions:
            replica_fn = self._replica_predict if kind == "predict" else self._replica_metrics(kind == "logits")
            if self.jit_compile:
                replica_fn = tf.function(replica_fn, jit_compile=True)
            self._functions[kind] = tf.function(lambda batch: self.strategy.run(replica_fn, args=batch))
        return self._functions[kind]

    def _replica_metrics(self, with_logits):
        def metrics(x, y, mask):
            logits = self.model(x, training=False)
            logits = tf.cast(logits, tf.float64 if logits.dtype == tf.float64 else tf.float32)
            loss = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            correct = tf.logical_and(tf.equal(tf.argmax(logits, -1, output_type=y.dtype), y), mask)
            out = dict(loss=tf.reduce_sum(tf.where(mask, loss, tf.zeros_like(loss))),
                       correct=tf.reduce_sum(tf.cast(correct, tf.int32)))
            if with_logits:
                out["logits"] = logits
            return out

        return metrics

    def _replica_predict(self, x, mask):
        return self.model(x, training=False)


_SHARED = weakref.WeakKeyDictionary()


def _labels(y, n):
    """Integer class labels of shape (n,), as int32."""
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must be integer class labels of shape ({n},); got dtype {y.dtype}, shape {y.shape}")
    return y.astype(np.int32)
