"""Tests of kerasntk.hessian against independent references: the dense Hessian (`tape.jacobian` of the
gradient of the loss written out here in one batch), central differences of gradients, its eigenvalues and
trace, one device against MirroredStrategy; and the HessianMonitor callback against the direct functions."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import float64, randomize, set_float  # noqa: F401  (the float64 fixture)
from kerasntk import hessian, models
from kerasntk.callbacks import HessianMonitor

# Tiny zoo models: Dense, Conv1D with stride, inference-mode BatchNorm with non-trivial moving statistics,
# and (slow) a ResNet's residual graph with BatchNorm, whose variables of more than 600 entries are frozen
# so the dense Hessian stays small (P = 51, 117 and 1,811).
ZOO = {"mlp": ((5,), dict(hidden=(4, 3))), "cnn1d": ((12, 1), dict(channels=3, batchnorm=True)),
       "resnet20": ((8, 8, 3), dict(depth=8))}
CASES = ["mlp", "cnn1d", pytest.param("resnet20", marks=pytest.mark.slow)]
O, N, WD = 3, 10, 0.01  # logits; subset size (blocks of 4: the last one padded); weight decay
# float64: the blocked forward-over-reverse products and the dense Hessian are the same sums in other orders,
# equal to ~1e-15 relative; 1e-10 still catches any missing or doubled term (the weight decay alone is 1e-2).
TIGHT = 1e-10

pytestmark = pytest.mark.usefixtures("float64")


@functools.lru_cache(maxsize=None)
def _case(name):
    """A float64 zoo model with random weights, a subset (x, y) of N examples and the dense Hessian H (P, P)."""
    set_float("float64")
    shape, kw = ZOO[name]
    model = randomize(models.get(name, shape, O, **kw))
    for v in model.trainable_variables:
        v.trainable = v.shape.num_elements() <= 600
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(N, *shape)), rng.integers(0, O, N)
    return model, x, y, _dense_hessian(model, x, y)


def _loss(model, x, y):
    """The trainer's loss written out: mean cross-entropy in inference mode + ½·λ‖w‖² (trainable variables)."""
    ce = keras.losses.sparse_categorical_crossentropy(y, model(x, training=False), from_logits=True)
    return tf.reduce_mean(ce) + 0.5 * WD * tf.add_n([tf.reduce_sum(tf.square(v)) for v in model.trainable_variables])


def _flat(tensors):
    return tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)


def _dense_hessian(model, x, y):
    variables = model.trainable_variables
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = _loss(model, x, y)
        gradient = _flat(inner.gradient(loss, variables))
    rows = outer.jacobian(gradient, variables)
    return tf.concat([tf.reshape(r, (gradient.shape[0], -1)) for r in rows], axis=1).numpy()


def _close(actual, expected, rtol=TIGHT):
    """Agreement relative to the largest entry (entries near zero cannot meet a pure rtol)."""
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("name", CASES)
def test_hvp_matches_the_dense_hessian(name):
    """Flat and structured vectors, blocks of 4 with the last one padded and masked."""
    model, x, y, H = _case(name)
    np.testing.assert_allclose(H, H.T, atol=1e-12 * np.abs(H).max())  # inference-mode BatchNorm: symmetric
    hvp = hessian.hvp_fn(model, x, y, weight_decay=WD, batch_size=4)
    assert hvp.size == H.shape[0] and len(hvp.layers) == len(model.trainable_variables)
    v = np.random.default_rng(2).normal(size=hvp.size)
    _close(hvp(v), H @ v)
    structured = hvp(hessian._unflatten(v, hvp.shapes))
    assert [p.shape for p in structured] == hvp.shapes
    _close(np.concatenate([p.ravel() for p in structured]), H @ v)


@pytest.mark.parametrize("name", ["mlp", pytest.param("cnn1d", marks=pytest.mark.slow),
                                  pytest.param("resnet20", marks=pytest.mark.slow)])
def test_top_eigenvalues_and_trace_match_the_dense_hessian(name):
    """Lanczos with as many steps as parameters spans the whole space: the top eigenvalues to rounding (the
    acceptance bound is rtol 1e-6); Hutchinson's Rademacher estimate within 3 of its standard errors; with
    √P times the standard basis as probes, every zᵀHz is P·H_ii, so each layer's estimate is the exact trace
    of its diagonal block, and their sum the exact trace."""
    model, x, y, H = _case(name)
    hvp = hessian.hvp_fn(model, x, y, weight_decay=WD, batch_size=N)  # one block: blocking is tested above
    exact = np.linalg.eigvalsh(H)[::-1]
    np.testing.assert_allclose(hessian.top_eigenvalues(hvp, 3, num_steps=hvp.size), exact[:3], rtol=1e-6)
    estimate, stderr = hessian.trace(hvp, num_probes=30, seed=3)
    assert abs(estimate - np.trace(H)) <= 3 * stderr and stderr > 0
    if name == "resnet20":
        return  # P = 1,723 more products for the basis: the small models check it
    scale = np.abs(np.diag(H)).sum()
    per_layer = hessian.trace(hvp, probes=np.sqrt(hvp.size) * np.eye(hvp.size), per_layer=True)
    owner = np.repeat(hvp.layers, [int(np.prod(s)) for s in hvp.shapes])
    assert list(per_layer) == list(dict.fromkeys(hvp.layers))
    for layer, (value, _) in per_layer.items():
        assert abs(value - np.trace(H[np.ix_(owner == layer, owner == layer)])) <= TIGHT * scale
    assert abs(sum(v for v, _ in per_layer.values()) - np.trace(H)) <= TIGHT * scale
    layers_of_estimate = hessian.trace(hvp, num_probes=30, seed=3, per_layer=True)  # the same probes as above
    assert abs(sum(v for v, _ in layers_of_estimate.values()) - estimate) <= 1e-12 * abs(estimate)


def test_hvp_matches_central_differences_of_gradients():
    """H·v ≈ (∇L(w + hv) − ∇L(w − hv)) / 2h with h = 1e-5, ‖v‖ = 1: truncation O(h²‖∇³L‖) ~ 1e-10 and
    rounding O(ε‖∇L‖/h) ~ 1e-11, so 1e-6 of ‖Hv‖∞ is a bound ReLU kinks crossed by ±h could break, not
    rounding. The blocked gradient itself is checked against the tape's gradient of the loss written out."""
    model, x, y, H = _case("cnn1d")
    hvp = hessian.hvp_fn(model, x, y, weight_decay=WD, batch_size=4)
    gradient = hessian.gradient_fn(model, x, y, weight_decay=WD, batch_size=4)
    loss, g = gradient()
    with tf.GradientTape() as tape:
        reference = _loss(model, x, y)
    _close(g, _flat(tape.gradient(reference, model.trainable_variables)).numpy())
    assert abs(loss - float(reference)) <= 1e-12 * abs(loss)
    v = np.random.default_rng(4).normal(size=hvp.size)
    v /= np.linalg.norm(v)
    w = [p.numpy() for p in model.trainable_variables]
    h, steps = 1e-5, hessian._unflatten(v, hvp.shapes)
    try:
        for sign in (1, -1):
            for p, value, step in zip(model.trainable_variables, w, steps):
                p.assign(value + sign * h * step)
            if sign == 1:
                plus = gradient()[1]
        minus = gradient()[1]
    finally:
        for p, value in zip(model.trainable_variables, w):
            p.assign(value)
    _close(hvp(v), (plus - minus) / (2 * h), rtol=1e-6)


def test_mirrored_strategy_equals_one_device(mirrored):
    """N = 10 in blocks of 4 over 2 replicas: 2 rounds, the last with a partly and a wholly masked block."""
    with mirrored.scope():
        model = randomize(models.get("mlp", (5,), O, hidden=(4, 3), batchnorm=True))
    rng = np.random.default_rng(5)
    x, y, v = rng.normal(size=(N, 5)), rng.integers(0, O, N), rng.normal(size=65)
    one = hessian.hvp_fn(model, x, y, weight_decay=WD, batch_size=4)(v)
    _close(hessian.hvp_fn(model, x, y, weight_decay=WD, batch_size=4, strategy=mirrored)(v), one)
    _close(hessian.gradient_fn(model, x, y, weight_decay=WD, batch_size=4, strategy=mirrored)()[1],
           hessian.gradient_fn(model, x, y, weight_decay=WD, batch_size=4)()[1])


def test_bad_arguments_are_named():
    model, x, y, _ = _case("mlp")
    with pytest.raises(ValueError, match="integer class labels"):
        hessian.hvp_fn(model, x, y.astype(float))
    with pytest.raises(ValueError, match="batch_size"):
        hessian.hvp_fn(model, x, y, batch_size=0)
    with pytest.raises(ValueError, match="same positive number"):
        hessian.hvp_fn(model, x, y[:3])
    hvp = hessian.hvp_fn(model, x, y)
    with pytest.raises(ValueError, match="flat vector of 51"):
        hvp(np.zeros(50))
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 51\]"):
        hessian.top_eigenvalues(hvp, 0)
    with pytest.raises(ValueError, match="num_steps"):
        hessian.top_eigenvalues(hvp, 3, num_steps=2)
    with pytest.raises(ValueError, match="probes must be"):
        hessian.trace(hvp, probes=np.ones((2, 3)))


def test_hessian_monitor_logs_the_direct_functions_values(tmp_path):
    """In a float32 model.fit (what users run), the logged values after the last epoch are those of the direct
    functions at the trained weights (the same float32 products: equal up to thread-order rounding)."""
    set_float("float32")
    keras.utils.set_random_seed(0)
    model = models.get("mlp", (12,), O, hidden=(4,), batchnorm=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(32, 12)).astype("float32"), rng.integers(0, O, 32)
    monitor = HessianMonitor(x[:12], y[:12], weight_decay=WD, batch_size=8, lanczos_steps=10, num_probes=5,
                             path=str(tmp_path / "hessian.nc"))
    history = model.fit(x, y, batch_size=16, epochs=2, callbacks=[monitor], verbose=0).history
    hvp = hessian.hvp_fn(model, x[:12], y[:12], weight_decay=WD, batch_size=8)
    top = hessian.top_eigenvalues(hvp, 1, 10)[0]
    estimate, stderr = hessian.trace(hvp, 5)
    np.testing.assert_allclose([history[k][-1] for k in ("hessian_top_eigenvalue", "hessian_trace",
                                                         "hessian_trace_stderr")], [top, estimate, stderr], rtol=1e-5)
    assert monitor.steps == [0, 2, 4] and history["hessian_top_eigenvalue"][0] != top  # at 0 and each epoch's end
    from kerasntk import results

    ds = results.load(tmp_path / "hessian.nc")
    np.testing.assert_allclose(ds.parent.sel(metric="hessian_trace").values,
                               [r["hessian_trace"] for r in monitor.rows], rtol=1e-12)
    np.testing.assert_array_equal(ds.time.values, [0.0, 1.0, 2.0])
