"""Loss-landscape geometry between two networks (docs/methods.md §3): linear interpolation, error and loss
barriers, BatchNorm re-estimation, function-space and weight-space distances.

A *weight set* is a list of numpy arrays in `model.weights` order, i.e. what `model.get_weights()`
returns, BatchNorm moving statistics included. Errors and losses come from `kerasntk.evaluation.Evaluator`;
the other reductions are done in float64 on the host.
"""

import contextlib
import os
import weakref

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from kerasntk import models  # noqa: E402
from kerasntk.evaluation import Evaluator  # noqa: E402

BN_MODES = ("reestimate", "interpolate")  # how `path` treats BatchNorm statistics along the path


def trainable_mask(model):
    """`[v.trainable for v in model.weights]`: which entries of a weight set are trainable."""
    return [bool(v.trainable) for v in model.weights]


def interpolate(w_a, w_b, alpha):
    """(1 − α) w_a + α w_b for every weight (BN moving statistics included), in each weight's dtype.

    Computed in float64 and cast back, so α = 0 and α = 1 return the endpoints exactly and identical
    endpoints give back the same weights at every α.
    """
    _check_pair(w_a, w_b)
    alpha = float(alpha)
    return [
        ((1.0 - alpha) * np.asarray(a, np.float64) + alpha * np.asarray(b, np.float64)).astype(np.asarray(a).dtype)
        for a, b in zip(w_a, w_b)
    ]


def reestimate_batchnorm(model, x_batches, batch_size=512):
    """Set every BatchNormalization layer's moving mean/variance to the exact population statistics of
    its inputs over `x_batches` (an input array, or a list of input batches, which are concatenated).

    Layers are processed in topological order with the whole network in inference mode, each after the
    layers before it were updated, so afterwards every BN layer's moving mean/variance equal the mean and
    (biased, ddof=0) variance of the inputs it actually receives at inference on these examples: no EMA,
    no dependence on batching. Costs about (number of BN layers)/2 forward passes (one truncated pass per
    BN layer, reduced to per-example channel moments on the device). No-op without BatchNormalization.
    """
    x = x_batches if isinstance(x_batches, np.ndarray) else np.concatenate(list(x_batches))
    for layer, probe, positions in _bn_probes(model):
        mean, var = _channel_moments(probe, positions, x, batch_size)
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(var.astype(layer.moving_variance.dtype))


def path(model, w_a, w_b, alphas, eval_sets, *, bn="reestimate", bn_x=None, batch_size=512):
    """Error and loss of `model` along w_α = (1 − α) w_a + α w_b for each α and each named eval set.

    eval_sets: {name: (x, y)}. bn="reestimate" recomputes BN statistics of every w_α (endpoints
    included, so the whole curve is treated alike) on `bn_x` with `reestimate_batchnorm`;
    bn="interpolate" uses the interpolated moving statistics. Returns {f"{name}_error",
    f"{name}_loss": float64 array (len(alphas),)}. The model's weights are restored afterwards.
    """
    alphas = _alphas(alphas)
    reestimate = _bn_mode(model, bn, bn_x)
    if not eval_sets:
        raise ValueError("path needs at least one eval set {name: (x, y)}; got none")
    curves = {f"{name}_{kind}": np.empty(len(alphas)) for name in eval_sets for kind in ("error", "loss")}
    evaluator = Evaluator.shared(model, batch_size)
    with _preserved_weights(model):
        for i, alpha in enumerate(alphas):
            model.set_weights(interpolate(w_a, w_b, alpha))
            if reestimate:
                reestimate_batchnorm(model, bn_x, batch_size)
            for name, (x, y) in eval_sets.items():
                result = evaluator(x, y)
                curves[f"{name}_error"][i] = result["error"]
                curves[f"{name}_loss"][i] = result["loss"]
    return curves


def barrier(curve):
    """max_α curve(α) − ½ (curve(0) + curve(1)) (Frankle et al. 2020; docs/methods.md §3).

    The ends of `curve` must be the two endpoints. For a curve convex in α (e.g. the loss of a linear
    model) this is ½|curve(0) − curve(1)| ≥ 0, and ≤ 0 only when the endpoints are equal.
    """
    curve = np.asarray(curve, np.float64)
    if curve.ndim != 1 or curve.size < 2:
        raise ValueError(f"barrier needs a 1-D curve with at least 2 points; got shape {curve.shape}")
    return float(curve.max() - 0.5 * (curve[0] + curve[-1]))


def disagreement(logits_a, logits_b):
    """Fraction of examples on which the two networks' argmax predictions differ."""
    logits_a, logits_b = _logit_pair(logits_a, logits_b)
    return float(np.mean(logits_a.argmax(-1) != logits_b.argmax(-1)))


def js_divergence(logits_a, logits_b):
    """Mean over examples of the Jensen–Shannon divergence of the two softmax outputs, in nats
    (natural log; 0 for identical outputs, at most ln 2). JS(p, q) = ½ KL(p‖m) + ½ KL(q‖m), m = (p+q)/2.
    """
    logits_a, logits_b = _logit_pair(logits_a, logits_b)
    log_p, log_q = _log_softmax(logits_a), _log_softmax(logits_b)
    log_m = np.logaddexp(log_p, log_q) - np.log(2.0)
    kl_pm = np.sum(np.exp(log_p) * (log_p - log_m), axis=-1)
    kl_qm = np.sum(np.exp(log_q) * (log_q - log_m), axis=-1)
    return float(np.mean(0.5 * (kl_pm + kl_qm)))


def weight_distances(w_a, w_b, mask, reference_norm=None):
    """L2 distance, relative distance and cosine similarity of the trainable weights (mask True).

    relative_weight_distance = ‖w_a − w_b‖ / reference_norm (docs/methods.md §3: the parent's ‖w_T − w_0‖);
    NaN when reference_norm is None. Computed in float64.
    """
    _check_pair(w_a, w_b)
    if len(mask) != len(w_a):
        raise ValueError(f"mask has {len(mask)} entries but the weight sets have {len(w_a)}")
    a = _flat([w for w, keep in zip(w_a, mask) if keep])
    b = _flat([w for w, keep in zip(w_b, mask) if keep])
    if a.size == 0:
        raise ValueError("mask selects no weights; it must mark at least one weight trainable")
    distance = float(np.linalg.norm(a - b))
    if reference_norm is not None and not reference_norm > 0:
        raise ValueError(f"reference_norm must be positive or None; got {reference_norm}")
    return dict(
        weight_distance=distance,
        relative_weight_distance=distance / reference_norm if reference_norm is not None else float("nan"),
        cosine_similarity=float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))),
    )


def compare(model, w_a, w_b, *, x_test, y_test, x_train, y_train, alphas=None, bn="reestimate",
            bn_x=None, reference_norm=None, batch_size=512):
    """All landscape metrics between weight sets w_a and w_b → (scalars, curves).

    alphas: grid from 0 to 1 (default 11 points). bn_x: inputs for BN re-estimation (default x_train;
    pass a few thousand examples: each α costs ~(number of BN layers)/2 forward passes over them).
    scalars: error_barrier, loss_barrier (test set), train_error_barrier, train_loss_barrier,
    disagreement, js_divergence (test set, the two networks as given, with their own BN statistics),
    weight_distance, relative_weight_distance, cosine_similarity. curves: test_error, test_loss,
    train_error, train_loss along α, arrays (len(alphas),). Model weights are restored.
    """
    alphas = _alphas(np.linspace(0.0, 1.0, 11) if alphas is None else alphas)
    if alphas[0] != 0.0 or alphas[-1] != 1.0:
        raise ValueError(f"compare needs alphas from 0 to 1 (barriers use the endpoints); got {alphas}")
    eval_sets = dict(test=(x_test, y_test), train=(x_train, y_train))
    curves = path(model, w_a, w_b, alphas, eval_sets, bn=bn, bn_x=x_train if bn_x is None else bn_x,
                  batch_size=batch_size)
    evaluator = Evaluator.shared(model, batch_size)
    with _preserved_weights(model):
        logits_a = evaluator(x_test, y_test, weights=w_a, logits=True)["logits"]
        logits_b = evaluator(x_test, y_test, weights=w_b, logits=True)["logits"]
    scalars = dict(
        error_barrier=barrier(curves["test_error"]),
        loss_barrier=barrier(curves["test_loss"]),
        train_error_barrier=barrier(curves["train_error"]),
        train_loss_barrier=barrier(curves["train_loss"]),
        disagreement=disagreement(logits_a, logits_b),
        js_divergence=js_divergence(logits_a, logits_b),
        **weight_distances(w_a, w_b, trainable_mask(model), reference_norm),
    )
    return scalars, curves


# --- helpers -------------------------------------------------------------------------------------

_PROBES = weakref.WeakKeyDictionary()


def _bn_probes(model):
    """[(bn_layer, probe, positions)] in topological order: the probe is a sub-model from the model input
    to the per-example channel moments of the layer's input, `positions` the number of values per example
    and channel (e.g. H·W for images). Cached per model so each probe traces once."""
    if model not in _PROBES:
        bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        if len(bns) != sum(isinstance(layer, keras.layers.BatchNormalization) for layer in model._flatten_layers()):
            raise ValueError("reestimate_batchnorm supports BatchNormalization layers at the top level of a "
                             "functional or Sequential model; this model nests them inside sub-models")
        _PROBES[model] = [(layer, keras.Model(model.input, _ExampleMoments(layer.axis)(layer.input)),
                           int(np.prod(layer.input.shape[1:])) // layer.input.shape[layer.axis]) for layer in bns]
    return _PROBES[model]


class _ExampleMoments(keras.layers.Layer):
    """Per example and channel (`axis`): the mean over the remaining (spatial) axes and the sum of squared
    deviations from it, shapes (N, C) each, so only O(N·C) numbers leave the device."""

    def __init__(self, axis, **kwargs):
        super().__init__(**kwargs)
        self.channel_axis = axis

    def call(self, h):
        h = ops.moveaxis(ops.cast(h, "float32"), self.channel_axis, -1)
        h = ops.reshape(h, (-1, int(np.prod(h.shape[1:-1])), h.shape[-1]))
        mean = ops.mean(h, axis=1)
        return mean, ops.sum(ops.square(h - mean[:, None, :]), axis=1)


def _channel_moments(probe, positions, x, batch_size):
    """Population mean and biased variance per channel, combining per-example moments in float64
    (Chan et al.: M2 = Σ_i M2_i + n Σ_i (mean_i − mean)², n positions per example)."""
    means, m2s = (np.asarray(a, np.float64) for a in Evaluator.shared(probe, batch_size).predict(x))
    mean = means.mean(0)
    m2 = m2s.sum(0) + positions * np.sum((means - mean) ** 2, axis=0)
    return mean, m2 / (positions * len(means))


@contextlib.contextmanager
def _preserved_weights(model):
    """Restore the model's weights on exit."""
    saved = model.get_weights()
    try:
        yield
    finally:
        model.set_weights(saved)


def _bn_mode(model, bn, bn_x):
    """Validate `bn`; True when BN statistics must be re-estimated (mode 'reestimate' and BN present)."""
    if bn not in BN_MODES:
        raise ValueError(f"bn must be one of {BN_MODES}; got {bn!r}")
    reestimate = bn == "reestimate" and models.has_batchnorm(model)
    if reestimate and bn_x is None:
        raise ValueError("bn='reestimate' on a model with BatchNormalization needs bn_x (training inputs)")
    return reestimate


def _alphas(alphas):
    """Validate an interpolation grid: 1-D, non-empty, finite."""
    alphas = np.asarray(alphas, np.float64)
    if alphas.ndim != 1 or alphas.size < 1 or not np.all(np.isfinite(alphas)):
        raise ValueError(f"alphas must be a non-empty 1-D array of finite values; got {alphas}")
    return alphas


def _log_softmax(logits):
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _logit_pair(logits_a, logits_b):
    logits_a, logits_b = np.asarray(logits_a, np.float64), np.asarray(logits_b, np.float64)
    if logits_a.shape != logits_b.shape or logits_a.ndim != 2:
        raise ValueError(f"logits must be two (N, classes) arrays of one shape; got {logits_a.shape}, {logits_b.shape}")
    return logits_a, logits_b


def _check_pair(w_a, w_b):
    """Two weight sets of matching length and shapes."""
    if len(w_a) != len(w_b):
        raise ValueError(f"weight sets differ in length: {len(w_a)} vs {len(w_b)} arrays")
    for i, (a, b) in enumerate(zip(w_a, w_b)):
        if np.shape(a) != np.shape(b):
            raise ValueError(f"weight {i} has shape {np.shape(a)} in w_a but {np.shape(b)} in w_b")


def _flat(weights):
    return np.concatenate([np.ravel(np.asarray(w, np.float64)) for w in weights]) if weights else np.zeros(0)
