"""Tests of kerasntk.linearized against independent references: finite differences, explicit Jacobians
(tape.jacobian / per-example gradient loops), closed-form NTK gradient-descent dynamics and a hand-built
kernel ridge solution. Numerical references run in float64 so tolerances can be tight."""

import numpy as np
import pytest
import tensorflow as tf

import keras
from keras import layers

from kerasntk import data, models
from kerasntk.linearized import kernel_regression, linearize
from helpers import ZOO, synthetic_arrays


def tiny_model(seed=0, dtype="float64", inputs=5, hidden=7, outputs=3, batchnorm=True, dropout=True):
    """A smooth (tanh) MLP; BatchNorm gets non-trivial moving statistics so inference mode matters."""
    keras.utils.set_random_seed(seed)
    x = inp = keras.Input((inputs,), dtype=dtype)
    x = layers.Dense(hidden, activation="tanh", dtype=dtype)(x)
    if batchnorm:
        bn = layers.BatchNormalization(dtype=dtype)
        x = bn(x)
    if dropout:
        x = layers.Dropout(0.5, dtype=dtype)(x)
    x = layers.Dense(hidden, activation="tanh", dtype=dtype)(x)
    model = keras.Model(inp, layers.Dense(outputs, dtype=dtype)(x))
    if batchnorm:
        rng = np.random.default_rng(seed)
        bn.moving_mean.assign(rng.normal(size=hidden))
        bn.moving_variance.assign(rng.uniform(0.5, 2.0, size=hidden))
        bn.gamma.assign(rng.uniform(0.5, 1.5, size=hidden))
    return model


def random_like(variables, scale, seed):
    rng = np.random.default_rng(seed)
    return [scale * rng.normal(size=v.shape) for v in variables]


def set_deltas(lin, values):
    for var, value in zip(lin.trainable_weights, values):
        var.assign(value)


def shifted_outputs(model, x, direction, h):
    """f(x; w + h·direction) in inference mode, restoring w afterwards."""
    saved = [v.numpy() for v in model.trainable_variables]
    for v, w, d in zip(model.trainable_variables, saved, direction):
        v.assign(w + h * d)
    out = model(x, training=False).numpy()
    for v, w in zip(model.trainable_variables, saved):
        v.assign(w)
    return out


def explicit_jacobian(model, x):
    """(N·O, P) Jacobian by a naive loop: one tape.gradient per example and output (independent of pfor)."""
    rows = []
    for i in range(len(x)):
        for a in range(model.output_shape[-1]):
            with tf.GradientTape() as tape:
                out = model(x[i : i + 1], training=False)[0, a]
            grads = tape.gradient(out, model.trainable_variables)
            rows.append(np.concatenate([g.numpy().ravel() for g in grads]))
    return np.stack(rows)


def test_zero_delta_reproduces_network_exactly():
    x = np.random.default_rng(0).normal(size=(6, 40, 1)).astype("float32")
    model = models.get("cnn1d", (40, 1), 10, batchnorm=True)
    ref = model(x, training=False)
    for jvp in ("forward", "transpose"):
        out = linearize(model, jvp=jvp)(x, training=True)  # training is ignored: inference mode
        assert out.dtype == ref.dtype
        np.testing.assert_array_equal(out.numpy(), ref.numpy())  # J·0 is exactly 0
    x64 = np.random.default_rng(1).normal(size=(4, 5))
    tiny = tiny_model()
    np.testing.assert_array_equal(linearize(tiny, order=2)(x64).numpy(), tiny(x64, training=False).numpy())


def test_mixed_precision_network():
    x = np.random.default_rng(15).normal(size=(8, 40, 1)).astype("float32")
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = models.get("cnn1d", (40, 1), 10, channels=8, batchnorm=True)
        lin = linearize(model)
        lin.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(True))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    ref = model(x, training=False)
    assert lin(x).dtype == ref.dtype == tf.float16 and lin.trainable_weights[0].dtype == "float32"
    np.testing.assert_array_equal(lin(x).numpy(), ref.numpy())
    lin.fit(x, np.arange(8), epochs=2, verbose=0)
    assert all(np.isfinite(d.numpy()).all() for d in lin.trainable_weights)
    assert np.abs(lin.trainable_weights[-1].numpy()).max() > 0


def test_structure_and_param_count():
    model = models.get("cnn1d", (40, 1), 10, batchnorm=True)
    lin = linearize(model)
    lin.build((None, 40, 1))
    assert [tuple(d.shape) for d in lin.trainable_weights] == [tuple(v.shape) for v in model.trainable_variables]
    assert all(np.all(d.numpy() == 0) for d in lin.trainable_weights)
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert lin.count_params() == model.count_params() + trainable  # frozen copy of every weight + Δw


@pytest.mark.parametrize("jvp", ["forward", "transpose"])
def test_jvp_matches_finite_differences_and_explicit_jacobian(jvp):
    model = tiny_model()
    x = np.random.default_rng(2).normal(size=(8, 5))
    lin = linearize(model, jvp=jvp)
    delta = random_like(model.trainable_variables, 0.05, seed=3)
    set_deltas(lin, delta)
    jd = lin(x).numpy() - model(x, training=False).numpy()
    assert np.abs(jd).max() > 1e-3  # the check below is not vacuous
    # Central differences along Δw with step h: error O(h²·|f'''|) ~ 1e-12, rounding ~ 1e-16/h = 1e-13.
    h = 1e-4
    fd = (shifted_outputs(model, x, delta, h) - shifted_outputs(model, x, delta, -h)) / (2 * h)
    np.testing.assert_allclose(jd, fd, rtol=1e-7, atol=1e-9)
    # Explicit Jacobian product (naive per-example loop): equal up to float64 round-off.
    jac = explicit_jacobian(model, x)
    jd_ref = (jac @ np.concatenate([d.ravel() for d in delta])).reshape(jd.shape)
    np.testing.assert_allclose(jd, jd_ref, rtol=1e-10, atol=1e-12)


def test_jvp_matches_tape_jacobian_float32_cnn():
    model = models.get("cnn1d", (40, 1), 10, channels=8, batchnorm=True)
    x = np.random.default_rng(4).normal(size=(3, 40, 1)).astype("float32")
    lin = linearize(model)
    delta = random_like(model.trainable_variables, 1e-2, seed=5)
    set_deltas(lin, delta)
    with tf.GradientTape() as tape:
        out = model(x, training=False)
    jac = tape.jacobian(out, model.trainable_variables)  # (N, O, *shape) per variable
    ref = sum(np.tensordot(j.numpy(), d, axes=d.ndim) for j, d in zip(jac, delta))
    got = lin(x).numpy() - out.numpy()
    # float32 accumulation over ~2k parameters per output: ~1e-6 relative to the largest entry.
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())


def test_second_order_matches_second_difference():
    model = tiny_model(seed=1)
    x = np.random.default_rng(6).normal(size=(8, 5))
    delta = random_like(model.trainable_variables, 0.1, seed=7)
    lin1, lin2 = linearize(model), linearize(model, order=2)
    set_deltas(lin1, delta)
    set_deltas(lin2, delta)
    quad = lin2(x).numpy() - lin1(x).numpy()  # ½ Δwᵀ H Δw
    assert np.abs(quad).max() > 1e-4
    # Second difference [f(w+hd) − 2f(w) + f(w−hd)] / h² = dᵀHd + O(h²·|f''''|); rounding ~ 1e-16/h² = 1e-10.
    h = 1e-3
    f0 = model(x, training=False).numpy()
    second = (shifted_outputs(model, x, delta, h) - 2 * f0 + shifted_outputs(model, x, delta, -h)) / h**2
    np.testing.assert_allclose(quad, 0.5 * second, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("order,jvp", [(1, "forward"), (1, "transpose"), (2, "transpose")])
def test_gradient_wrt_delta_matches_finite_differences(order, jvp):
    """Training differentiates through the JVP: check ∂L/∂Δw along a random direction, eager and traced."""
    model = tiny_model(seed=1)
    x, c = np.random.default_rng(6).normal(size=(8, 5)), np.random.default_rng(7).normal(size=(8, 3))
    delta = random_like(model.trainable_variables, 0.1, seed=7)
    direction = random_like(model.trainable_variables, 1.0, seed=9)
    lin = linearize(model, order=order, jvp=jvp)
    set_deltas(lin, delta)

    def gradient():
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(lin(x) * c)
        return tape.gradient(loss, lin.trainable_weights)

    grads = (gradient(), tf.function(gradient)())
    along = [sum(np.sum(g.numpy() * d) for g, d in zip(grad, direction)) for grad in grads]
    h = 1e-5  # the loss is at most quadratic in Δw: central differences are exact up to rounding ~1e-16/h
    set_deltas(lin, [a + h * b for a, b in zip(delta, direction)])
    plus = np.sum(lin(x).numpy() * c)
    set_deltas(lin, [a - h * b for a, b in zip(delta, direction)])
    fd = (plus - np.sum(lin(x).numpy() * c)) / (2 * h)
    np.testing.assert_allclose(along, [fd, fd], rtol=1e-8)


def test_gradient_descent_matches_closed_form_ntk_dynamics():
    model = tiny_model(seed=2, batchnorm=False, dropout=False)
    rng = np.random.default_rng(8)
    n, o, steps = 6, 3, 40
    # fit() casts float arrays to float32, SGD keeps its learning rate in float32 and losses default to floatx:
    # use float32-representable data and rate and a float64 loss, so that only float64 round-off remains.
    x, y = (rng.normal(size=s).astype("float32").astype("float64") for s in ((n, 5), (n, o)))
    jac = explicit_jacobian(model, x)
    theta = jac @ jac.T  # (N·O, N·O), rows (example, output)
    f0 = model(x, training=False).numpy().reshape(-1)
    lam_max = np.linalg.eigvalsh(theta).max()
    # Keras MSE averages over N·O entries, so GD on Δw moves f by −(2η/NO)·Θ(f − y) each step.
    a_max = 0.02
    lr = float(np.float32(a_max * n * o / (2 * lam_max)))
    scale = 2 * lr / (n * o)
    lin = linearize(model)
    lin.compile(optimizer=keras.optimizers.SGD(lr), loss=keras.losses.MeanSquaredError(dtype="float64"))
    lin.fit(x, y, batch_size=n, epochs=steps, shuffle=False, verbose=0)
    f_t = lin(x).numpy().reshape(-1)
    r0 = f0 - y.reshape(-1)
    discrete = y.reshape(-1) + np.linalg.matrix_power(np.eye(n * o) - scale * theta, steps) @ r0
    assert np.abs(f_t - f0).max() > 0.05 * np.abs(r0).max()  # training moved the outputs substantially
    np.testing.assert_allclose(f_t, discrete, rtol=0, atol=1e-9)  # exact up to float64 round-off
    # Continuous flow f_t = y + e^{−ηΘt}(f0 − y): per eigenvalue |(1−a)^T − e^{−aT}| ≤ T·a²/2, a ≤ a_max.
    evals, evecs = np.linalg.eigh(scale * theta)
    continuous = y.reshape(-1) + evecs @ (np.exp(-evals * steps) * (evecs.T @ r0))
    bound = steps * a_max**2 / 2 * np.linalg.norm(r0)
    assert np.linalg.norm(f_t - continuous) <= bound


def train_small(model, x, y, order=1, strategy=None, jvp="auto", **compile_kw):
    """Δw after 5 full-batch SGD-momentum steps on MSE; model creation and compile inside the strategy scope."""
    with (strategy or tf.distribute.get_strategy()).scope():
        lin = linearize(model, order=order, jvp=jvp)
        lin.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse", **compile_kw)
    lin.fit(x, y, batch_size=len(x), epochs=5, shuffle=False, verbose=0)
    if compile_kw.get("jit_compile") is True:  # Keras drops it silently while op determinism is on
        assert lin.jit_compile is True, "Keras trained without XLA"
    return [d.numpy() for d in lin.trainable_weights]


def test_mirrored_strategy_matches_single_device(mirrored):
    model = tiny_model(seed=3, dtype="float32")
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(16, 5)).astype("float32"), rng.normal(size=(16, 3)).astype("float32")
    single = train_small(model, x, y)
    assert mirrored.num_replicas_in_sync == 2
    distributed = train_small(model, x, y, strategy=mirrored)
    assert np.abs(single[-1]).max() > 1e-3
    # Same math, float32 sums in a different order (per-replica halves all-reduced): ~1e-7 relative.
    for a, b in zip(single, distributed):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


@pytest.fixture
def keras_xla():
    """Keras ignores compile(jit_compile=True) while op determinism is on (kerasntk turns it on only while its
    own jobs run); make sure it is off for one test and restore it."""
    from tensorflow.python.framework import config as tf_config

    was_on = tf_config.is_op_determinism_enabled()
    tf_config.disable_op_determinism()
    yield
    if was_on:
        tf_config.enable_op_determinism()


@pytest.mark.parametrize("order", [1, 2])
def test_jit_compiled_training_matches_graph(order, keras_xla):
    model = tiny_model(seed=4, dtype="float32")
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(8, 5)).astype("float32"), rng.normal(size=(8, 3)).astype("float32")
    graph = train_small(model, x, y, order=order, jit_compile=False)  # "auto" → forward accumulator (order 1)
    jit = train_small(model, x, y, order=order, jit_compile=True)  # "auto" → transposed VJP under XLA
    assert np.abs(graph[-1]).max() > 1e-3
    for a, b in zip(graph, jit):  # XLA fuses/reorders float32 ops: agreement to ~1e-6 relative
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)



@pytest.mark.parametrize("name, shape, options", ZOO, ids=[f"{z[0]}-{i}" for i, z in enumerate(ZOO)])
def test_linearized_step_compiles_with_xla_for_every_zoo_model(name, shape, options):
    """TPU readiness of the kernel-learning job: the linearized train step of every zoo model, with the JVP
    that TPUStrategy selects ("transpose") and a batch from the experiment's own input pipeline (static
    shapes, drop_remainder), compiles with XLA and trains Δw. The step is built by hand: Keras silently
    drops `compile(jit_compile=True)` once op determinism is enabled, as the kerasntk trainer does."""
    model = models.get(name, shape, 4, **options)
    lin = linearize(model, jvp="transpose")
    optimizer = keras.optimizers.SGD(0.05, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    batches = data.train_batches(synthetic_arrays(32, 16, shape, 4), batch_size=8, epoch=0, order_seed=0,
                                 augment_seed=0)
    assert all(dim is not None for dim in batches.element_spec[0].shape)  # static batch shape
    x, y = next(iter(batches))
    lin(x)
    optimizer.build(lin.trainable_variables)

    @tf.function(jit_compile=True)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, lin(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, lin.trainable_variables), lin.trainable_variables))
        return loss

    assert "HloModule" in step.experimental_get_compiler_ir(x, y)(stage="hlo")
    for x, y in batches.take(2):
        step(x, y)
    deltas = [d.numpy() for d in lin.trainable_weights]
    assert all(np.isfinite(d).all() for d in deltas) and any(np.abs(d).max() > 0 for d in deltas)

def test_snapshot_is_frozen_and_weights_argument(tmp_path):
    model = models.get("cnn1d", (40, 1), 10, channels=8)
    rng = np.random.default_rng(11)
    x, labels = rng.normal(size=(16, 40, 1)).astype("float32"), rng.integers(0, 10, 16)
    start = model.get_weights()
    lin = linearize(model)
    before = lin(x).numpy()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.fit(x, labels, epochs=2, verbose=0)
    assert not np.allclose(model(x).numpy(), before)
    np.testing.assert_array_equal(lin(x).numpy(), before)  # the original's training leaves lin untouched
    np.testing.assert_array_equal(linearize(model, weights=start)(x).numpy(), before)


def test_save_and_load_weights(tmp_path):
    model = models.get("cnn1d", (40, 1), 10, channels=8, batchnorm=True)
    rng = np.random.default_rng(12)
    x, labels = rng.normal(size=(16, 40, 1)).astype("float32"), rng.integers(0, 10, 16)
    lin = linearize(model)
    lin.compile(optimizer=keras.optimizers.SGD(0.1), loss=keras.losses.SparseCategoricalCrossentropy(True))
    lin.fit(x, labels, epochs=2, verbose=0)
    path = str(tmp_path / "lin.weights.h5")
    lin.save_weights(path)
    other = linearize(models.get("cnn1d", (40, 1), 10, channels=8, batchnorm=True))  # different init
    assert not np.allclose(other(x).numpy(), lin(x).numpy())
    other.load_weights(path)
    np.testing.assert_array_equal(other(x).numpy(), lin(x).numpy())
    # tf.train.Checkpoint (the kerasntk Trainer's format) must hold Δw as well as the frozen base.
    saved = tf.train.Checkpoint(model=lin).write(str(tmp_path / "ckpt"))
    third = linearize(models.get("cnn1d", (40, 1), 10, channels=8, batchnorm=True))
    tf.train.Checkpoint(model=third).read(saved).assert_existing_objects_matched()
    np.testing.assert_array_equal(third(x).numpy(), lin(x).numpy())


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="order"):
        linearize(model, order=3)
    with pytest.raises(ValueError, match="not built"):
        linearize(keras.Sequential([layers.Dense(2)]))
    with pytest.raises(ValueError, match="transpose"):
        linearize(model, order=2, jvp="forward")
    with pytest.raises(ValueError, match="arrays"):
        linearize(model, weights=model.get_weights()[:-1])
    bad = model.get_weights()
    bad[0] = bad[0][:, :2]
    with pytest.raises(ValueError, match="shape"):
        linearize(model, weights=bad)
    x = np.zeros((4, 5))
    with pytest.raises(ValueError, match="method"):
        kernel_regression(model, x, np.zeros(4, int), x, method="lu")
    with pytest.raises(ValueError, match="y_train"):
        kernel_regression(model, x, np.full(4, 3), x)


def test_kernel_regression_closed_cg_and_hand_computed():
    model = tiny_model(seed=5)
    rng = np.random.default_rng(13)
    x_train, labels, x_test = rng.normal(size=(10, 5)), rng.integers(0, 3, 10), rng.normal(size=(4, 5))
    ridge = 1e-2
    closed = kernel_regression(model, x_train, labels, x_test, ridge=ridge, method="closed", batch_size=4)
    cg = kernel_regression(model, x_train, labels, x_test, ridge=ridge, method="cg", tol=1e-12, batch_size=3)
    assert (closed.method, cg.method) == ("closed", "cg") and cg.iterations > 1
    # Hand-computed: explicit Jacobians by a per-example loop, dense solve, all float64.
    j_train, j_test = explicit_jacobian(model, x_train), explicit_jacobian(model, x_test)
    y = np.eye(3)[labels].reshape(-1)
    f_train = model(x_train, training=False).numpy().reshape(-1)
    alpha = np.linalg.solve(j_train @ j_train.T + ridge * np.eye(30), y - f_train)
    ref = model(x_test, training=False).numpy() + (j_test @ j_train.T @ alpha).reshape(4, 3)
    assert np.abs(ref - model(x_test, training=False).numpy()).max() > 1e-2
    np.testing.assert_allclose(closed.predictions, ref, rtol=1e-8, atol=1e-10)  # float64 throughout
    # CG to relative residual 1e-12; the condition number (≤ ‖Θ‖/ridge) bounds the solution error.
    np.testing.assert_allclose(cg.predictions, closed.predictions, rtol=1e-6, atol=1e-8)


def test_kernel_regression_float32_zoo_model_auto():
    model = models.get("cnn1d", (40, 1), 10, channels=4)
    rng = np.random.default_rng(14)
    x_train, labels, x_test = rng.normal(size=(12, 40, 1)).astype("float32"), rng.integers(0, 10, 12), rng.normal(
        size=(5, 40, 1)
    ).astype("float32")
    auto = kernel_regression(model, x_train, labels, x_test, ridge=1e-1)
    cg = kernel_regression(model, x_train, labels, x_test, ridge=1e-1, method="cg", tol=1e-7)
    assert auto.method == "closed"
    # float32 kernel entries (relative error ~1e-6) through a solve with condition number ≤ ‖Θ‖/ridge.
    np.testing.assert_allclose(cg.predictions, auto.predictions, rtol=1e-3, atol=1e-3)
