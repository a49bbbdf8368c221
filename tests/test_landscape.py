"""Landscape metrics against closed forms and numpy references."""

import keras
import numpy as np
import pytest
import scipy.spatial.distance
import tensorflow as tf
from keras import layers

from kerasntk import landscape as ls
from kerasntk import models
from kerasntk.evaluation import Evaluator


def evaluate(model, weights, x, y):
    """What the landscape functions evaluate with (their default batch size)."""
    return Evaluator.shared(model, 512)(x, y, weights=weights, logits=True)


def _softmax_regression(d=6, classes=3):
    inputs = keras.Input((d,))
    return keras.Model(inputs, layers.Dense(classes)(inputs))


def _random_weights(model, rng, scale=1.0):
    return [scale * rng.standard_normal(w.shape).astype(np.float32) for w in model.get_weights()]


def _softmax_data(rng, n=64, d=6, classes=3):
    return rng.standard_normal((n, d)).astype(np.float32), rng.integers(0, classes, n)


# --- interpolation and barriers ------------------------------------------------------------------


def test_interpolate_matches_numpy_and_hits_endpoints_exactly():
    rng = np.random.default_rng(0)
    w_a = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]
    w_b = [rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32)]
    for got, a, b in zip(ls.interpolate(w_a, w_b, 0.3), w_a, w_b):
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, 0.7 * a + 0.3 * b, rtol=1e-6)  # float32 rounding only
    assert all(np.array_equal(g, a) for g, a in zip(ls.interpolate(w_a, w_b, 0.0), w_a))
    assert all(np.array_equal(g, b) for g, b in zip(ls.interpolate(w_a, w_b, 1.0), w_b))
    assert all(np.array_equal(g, a) for g, a in zip(ls.interpolate(w_a, w_a, 0.37), w_a))
    with pytest.raises(ValueError, match="shape"):
        ls.interpolate(w_a, [w_b[0].T, w_b[1]], 0.5)


def test_barrier_closed_form_and_validation():
    assert ls.barrier([0.1, 0.5, 0.3]) == pytest.approx(0.5 - 0.2)
    assert ls.barrier([0.2, 0.1, 0.2]) == pytest.approx(0.0)  # max at an endpoint of equal height
    assert ls.barrier([0.0, 0.4]) == pytest.approx(0.2)  # monotone path: half the endpoint gap
    with pytest.raises(ValueError, match="at least 2"):
        ls.barrier([0.3])


def test_identical_endpoints_give_zero_barriers():
    rng = np.random.default_rng(1)
    model = models.get("cnn1d", (40, 1), 10, channels=4)
    x, y = rng.standard_normal((50, 40, 1)).astype(np.float32), rng.integers(0, 10, 50)
    w = model.get_weights()
    scalars, curves = ls.compare(model, w, w, x_test=x, y_test=y, x_train=x[:20], y_train=y[:20],
                                 alphas=np.linspace(0, 1, 5))
    # interpolate returns w itself at every alpha, so every curve is exactly flat
    for name in ("error_barrier", "loss_barrier", "train_error_barrier", "train_loss_barrier",
                 "disagreement", "weight_distance"):
        assert scalars[name] == 0.0, name
    assert scalars["js_divergence"] == pytest.approx(0.0, abs=1e-15)  # log(2) added and removed: 1 ulp
    assert scalars["cosine_similarity"] == pytest.approx(1.0, abs=1e-12)
    assert np.ptp(curves["test_loss"]) == 0.0


def test_convex_model_loss_lies_under_the_chord():
    """Cross-entropy of softmax regression is convex in w: along the line the loss never exceeds the
    chord, so the maximum is at an endpoint and the barrier is exactly ½|L(0) − L(1)|."""
    rng = np.random.default_rng(2)
    model = _softmax_regression()
    x, y = _softmax_data(rng)
    w_a, w_b = _random_weights(model, rng, 2.0), _random_weights(model, rng, 2.0)
    alphas = np.linspace(0, 1, 21)
    curve = ls.path(model, w_a, w_b, alphas, {"test": (x, y)})["test_loss"]
    chord = (1 - alphas) * curve[0] + alphas * curve[-1]
    assert np.all(curve <= chord + 1e-6)  # float32 logits: ~1e-7 relative error on losses of O(1)
    assert ls.barrier(curve) == pytest.approx(0.5 * abs(curve[0] - curve[-1]), abs=1e-6)


def test_convex_model_with_equal_endpoint_losses_has_nonpositive_loss_barrier():
    """Data closed under x -> -x (same labels) and no bias: L(W) = L(-W), so endpoints W and -W have
    equal loss, and convexity forces the loss barrier between them to be <= 0."""
    rng = np.random.default_rng(3)
    x, y = _softmax_data(rng, n=32)
    x, y = np.concatenate([x, -x]), np.concatenate([y, y])
    inputs = keras.Input((x.shape[1],))
    model = keras.Model(inputs, layers.Dense(3, use_bias=False)(inputs))
    (kernel,) = _random_weights(model, rng, 2.0)
    scalars, curves = ls.compare(model, [kernel], [-kernel], x_test=x, y_test=y, x_train=x, y_train=y)
    assert scalars["loss_barrier"] <= 1e-6  # float64 means of identical float32 per-example losses
    assert curves["test_loss"][5] == pytest.approx(np.log(3.0), abs=1e-6)  # alpha=1/2: W=0, uniform output


def _hand_network():
    """x -> v relu(u x + c) + d as the second logit (first logit 0)."""
    inputs = keras.Input((1,))
    hidden = layers.Dense(1, activation="relu")(inputs)
    return keras.Model(inputs, layers.Dense(2)(hidden))


def _hand_weights(u, c, v, d):
    f = np.float32
    return [np.array([[u]], f), np.array([c], f), np.array([[0.0, v]], f), np.array([0.0, d], f)]


def test_hand_built_error_path():
    """Endpoints A (u=1, v=2, d=-1) and B (u=-1, v=-2, d=1) both classify x in {-2,-1,1,2}, y = x > 0,
    perfectly. With s = 1 - 2α the second logit is s (2 relu(s x) - 1): for s > 0 the positives with
    x <= 1/(2s) are wrong, for s < 0 the negatives with |s x| < 1/2 are wrong."""
    x = np.array([[-2.0], [-1.0], [1.0], [2.0]], np.float32)
    y = np.array([0, 0, 1, 1])
    alphas = np.array([0.0, 0.2, 0.4, 0.45, 0.6, 0.8, 1.0])
    expected_error = np.array([0, 0, 2, 2, 2, 0, 0]) / 4  # worked by hand from the rule above
    s = 1 - 2 * alphas[:, None]
    logit = s * (2 * np.maximum(s * x[:, 0], 0) - 1)  # (A, N)
    expected_loss = np.mean(np.where(y == 1, np.logaddexp(0, -logit), np.logaddexp(0, logit)), axis=1)
    model = _hand_network()
    curves = ls.path(model, _hand_weights(1, 0, 2, -1), _hand_weights(-1, 0, -2, 1), alphas,
                     {"test": (x, y)}, bn="interpolate")
    np.testing.assert_array_equal(curves["test_error"], expected_error)
    np.testing.assert_allclose(curves["test_loss"], expected_loss, rtol=1e-6)  # float32 forward pass
    assert ls.barrier(curves["test_error"]) == 0.5


def test_path_restores_weights_and_rejects_bad_options():
    rng = np.random.default_rng(4)
    model = _softmax_regression()
    x, y = _softmax_data(rng)
    before = model.get_weights()
    ls.path(model, _random_weights(model, rng), _random_weights(model, rng), [0, 1], {"t": (x, y)})
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    with pytest.raises(ValueError, match="bn must be one of"):
        ls.path(model, before, before, [0, 1], {"t": (x, y)}, bn="freeze")
    with pytest.raises(ValueError, match="alphas from 0 to 1"):
        ls.compare(model, before, before, x_test=x, y_test=y, x_train=x, y_train=y, alphas=[0.1, 1.0])
    with pytest.raises(ValueError, match="integer class labels"):
        ls.path(model, before, before, [0, 1], {"t": (x, y.astype(np.float32))})


# --- BatchNorm re-estimation -----------------------------------------------------------------------


def _dense_bn_model():
    inputs = keras.Input((5,))
    h = layers.Dense(4)(inputs)
    h = layers.ReLU()(layers.BatchNormalization(epsilon=1e-3)(h))
    h = layers.BatchNormalization(epsilon=1e-3)(layers.Dense(3)(h))
    return keras.Model(inputs, layers.Dense(2)(h))


def _numpy_dense_bn_stats(w, x):
    """Reference: exact statistics of both BN inputs, BN1 normalising with its own statistics."""
    k1, b1, g1, be1, _, _, k2, b2 = w[:8]
    h1 = x.astype(np.float64) @ k1 + b1
    m1, v1 = h1.mean(0), h1.var(0)
    h2 = np.maximum(g1 * (h1 - m1) / np.sqrt(v1 + 1e-3) + be1, 0) @ k2 + b2
    return (m1, v1), (h2.mean(0), h2.var(0))


def test_reestimate_batchnorm_equals_numpy_population_statistics():
    rng = np.random.default_rng(6)
    model = _dense_bn_model()
    model.set_weights(_random_weights(model, rng))
    x = (3 * rng.standard_normal((101, 5)) + 1).astype(np.float32)
    ls.reestimate_batchnorm(model, x, batch_size=32)  # uneven batches: 32, 32, 32, 5
    bns = [layer for layer in model.layers if isinstance(layer, layers.BatchNormalization)]
    for bn, (mean, var) in zip(bns, _numpy_dense_bn_stats(model.get_weights(), x)):
        # float32 forward pass, float64 accumulation: relative error ~1e-6
        np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-5)
    batched_stats = [w.copy() for w in model.get_weights()]
    ls.reestimate_batchnorm(model, [x[:7], x[7:]])  # independent of the batching
    for a, b in zip(batched_stats, model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_reestimate_batchnorm_conv_reduces_over_positions():
    rng = np.random.default_rng(7)
    inputs = keras.Input((9, 2))
    conv = layers.Conv1D(3, 3)(inputs)
    model = keras.Model(inputs, layers.BatchNormalization()(conv))
    kernel, bias = (rng.standard_normal((3, 2, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32))
    model.set_weights([kernel, bias] + model.get_weights()[2:])
    x = rng.standard_normal((20, 9, 2)).astype(np.float32)
    patches = np.stack([x[:, p:p + 3] for p in range(7)], axis=1).astype(np.float64)  # (N, 7, 3, 2)
    out = np.einsum("npkc,kco->npo", patches, kernel) + bias  # 'valid' convolution by hand
    ls.reestimate_batchnorm(model, x)
    bn = model.layers[-1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), out.mean((0, 1)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), out.var((0, 1)), rtol=1e-5)


def test_reestimate_under_mirrored_strategy(mirrored):
    """Variables created under a 2-replica MirroredStrategy; 65 examples in batches of 32 leave a last
    batch of 1 that cannot be split evenly over the replicas."""
    strategy = mirrored
    with strategy.scope():
        model = _dense_bn_model()
    rng = np.random.default_rng(8)
    model.set_weights(_random_weights(model, rng))
    x, y = rng.standard_normal((65, 5)).astype(np.float32), rng.integers(0, 2, 65)
    ls.reestimate_batchnorm(model, x, batch_size=32)
    (m1, v1), _ = _numpy_dense_bn_stats(model.get_weights(), x)
    np.testing.assert_allclose(model.layers[2].moving_mean.numpy(), m1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.layers[2].moving_variance.numpy(), v1, rtol=1e-5)


def test_path_reestimates_batchnorm_at_every_alpha():
    rng = np.random.default_rng(9)
    model = _dense_bn_model()
    w_a, w_b = _random_weights(model, rng), _random_weights(model, rng)
    w_a[4], w_a[5] = np.zeros(4, np.float32), np.ones(4, np.float32)  # stale moving statistics
    w_a[11], w_b[11] = np.abs(w_a[11]), np.abs(w_b[11])  # valid moving variances for BN 2
    x, y = rng.standard_normal((40, 5)).astype(np.float32), rng.integers(0, 2, 40)
    bn_x = rng.standard_normal((30, 5)).astype(np.float32)
    curves = ls.path(model, w_a, w_b, [0.0, 0.5], {"test": (x, y)}, bn="reestimate", bn_x=bn_x)
    model.set_weights(ls.interpolate(w_a, w_b, 0.5))
    ls.reestimate_batchnorm(model, bn_x)
    assert curves["test_loss"][1] == pytest.approx(evaluate(model, None, x, y)["loss"], rel=1e-12)
    interpolated = ls.path(model, w_a, w_b, [0.0], {"test": (x, y)}, bn="interpolate")
    assert interpolated["test_loss"][0] == pytest.approx(evaluate(model, w_a, x, y)["loss"], rel=1e-12)
    assert interpolated["test_loss"][0] != pytest.approx(curves["test_loss"][0], rel=1e-3)
    with pytest.raises(ValueError, match="needs bn_x"):
        ls.path(model, w_a, w_b, [0.0, 1.0], {"test": (x, y)})


def test_reestimate_is_a_noop_without_batchnorm():
    rng = np.random.default_rng(10)
    model = _softmax_regression()
    before = model.get_weights()
    ls.reestimate_batchnorm(model, rng.standard_normal((8, 6)).astype(np.float32))
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


# --- function-space and weight-space distances ----------------------------------------------------


def test_disagreement_closed_form():
    a = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 2.0]])
    b = np.array([[0.0, 1.0, 0.0], [0.0, 9.0, 0.0], [5.0, 0.0, 0.0], [1.0, 3.0, 2.0]])
    assert ls.disagreement(a, b) == 0.5  # rows 0 and 2 differ
    with pytest.raises(ValueError, match="one shape"):
        ls.disagreement(a, b[:, :2])


def test_js_divergence_closed_forms():
    rng = np.random.default_rng(11)
    a, b = rng.standard_normal((30, 4)), rng.standard_normal((30, 4))
    assert ls.js_divergence(a, a) == pytest.approx(0.0, abs=1e-15)
    # disjoint (numerically) supports: ln 2
    assert ls.js_divergence([[200.0, 0.0]], [[0.0, 200.0]]) == pytest.approx(np.log(2.0), rel=1e-12)
    softmax = lambda z: np.exp(z) / np.exp(z).sum(1, keepdims=True)  # noqa: E731
    # scipy returns the Jensen-Shannon *distance* (square root of the divergence), natural log by default
    reference = np.mean([scipy.spatial.distance.jensenshannon(p, q) ** 2 for p, q in zip(softmax(a), softmax(b))])
    assert ls.js_divergence(a, b) == pytest.approx(reference, rel=1e-10)
    assert ls.js_divergence(a, b) == pytest.approx(ls.js_divergence(b, a), rel=1e-12)


def test_weight_distances_against_numpy():
    rng = np.random.default_rng(12)
    w_a = [rng.standard_normal((3, 2)), rng.standard_normal(5), rng.standard_normal(2)]
    w_b = [rng.standard_normal((3, 2)), rng.standard_normal(5), rng.standard_normal(2)]
    mask = [True, False, True]
    a = np.concatenate([w_a[0].ravel(), w_a[2]])
    b = np.concatenate([w_b[0].ravel(), w_b[2]])
    got = ls.weight_distances(w_a, w_b, mask, reference_norm=2.5)
    assert got["weight_distance"] == pytest.approx(np.sqrt(np.sum((a - b) ** 2)), rel=1e-12)
    assert got["relative_weight_distance"] == pytest.approx(got["weight_distance"] / 2.5, rel=1e-12)
    assert got["cosine_similarity"] == pytest.approx(a @ b / np.sqrt((a @ a) * (b @ b)), rel=1e-12)
    assert np.isnan(ls.weight_distances(w_a, w_b, mask)["relative_weight_distance"])
    with pytest.raises(ValueError, match="mask has 2 entries"):
        ls.weight_distances(w_a, w_b, mask[:2])
    with pytest.raises(ValueError, match="reference_norm"):
        ls.weight_distances(w_a, w_b, mask, reference_norm=0.0)


def test_trainable_mask_excludes_batchnorm_moving_statistics():
    model = _dense_bn_model()
    mask = ls.trainable_mask(model)
    names = [v.path for v, keep in zip(model.weights, mask) if not keep]
    assert len(mask) == len(model.get_weights()) and len(names) == 4
    assert all("moving" in name for name in names)


def test_compare_scalars_match_components():
    rng = np.random.default_rng(13)
    model = _softmax_regression()
    x, y = _softmax_data(rng, n=40)
    w_a, w_b = _random_weights(model, rng), _random_weights(model, rng)
    scalars, curves = ls.compare(model, w_a, w_b, x_test=x, y_test=y, x_train=x[:20], y_train=y[:20],
                                 reference_norm=3.0)
    assert set(curves) == {"test_error", "test_loss", "train_error", "train_loss"}
    assert all(c.shape == (11,) for c in curves.values())
    assert scalars["error_barrier"] == ls.barrier(curves["test_error"])
    assert scalars["train_loss_barrier"] == ls.barrier(curves["train_loss"])
    la, lb = evaluate(model, w_a, x, y)["logits"], evaluate(model, w_b, x, y)["logits"]
    assert scalars["disagreement"] == ls.disagreement(la, lb)
    assert scalars["relative_weight_distance"] == pytest.approx(scalars["weight_distance"] / 3.0)
    assert curves["test_error"][0] == evaluate(model, w_a, x, y)["error"]
