"""Tests of kerasntk.ntk against independent references: a per-example per-logit tape.gradient loop,
central finite differences (float64), closed forms for the kernel metrics, and MirroredStrategy."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf
import xarray as xr
from keras import layers

from helpers import float64, randomize, set_float  # noqa: F401  (the float64 fixture, used by every test)
from kerasntk import models, ntk

pytestmark = pytest.mark.usefixtures("float64")  # every model in float64, so references are exact to rounding

# Tiny versions of every zoo model: together they cover Dense, Conv1D/Conv2D with strides, BatchNorm in
# inference mode (with non-trivial moving statistics), residual Add, projections, average/global pooling.
ZOO = {
    "mlp": ((5,), dict(hidden=(4, 3))),
    "cnn": ((6, 6, 2), dict(channels=3)),
    "cnn1d": ((12, 1), dict(channels=3, batchnorm=True)),
    "resnet20": ((8, 8, 3), dict(depth=8)),
    "wide_resnet": ((8, 8, 3), dict(depth=10, width=1)),
}
O = 3  # logits of the test models
# float64 throughout: the references agree with the engine to ~1e-15 relative; 1e-9 leaves room for
# summation-order differences over up to 1e5 parameters while still catching any missing term.
TIGHT = dict(rtol=1e-9)


def _zoo(name, seed=0):
    shape, kw = ZOO[name]
    return randomize(models.get(name, shape, O, **kw), seed), shape


def _naive_jacobian(model, x):
    """J (N, O, P) by a Python loop of tape.gradient per example and per logit (trainable variables only)."""
    rows = []
    for i in range(len(x)):
        per_logit = []
        for a in range(O):
            with tf.GradientTape() as tape:
                y = model(x[i : i + 1], training=False)[0, a]
            grads = tape.gradient(y, model.trainable_variables, unconnected_gradients="zero")
            per_logit.append(np.concatenate([np.ravel(g) for g in grads]))
        rows.append(per_logit)
    return np.array(rows)


def _fd_jacobian(model, x, h=1e-6):
    """J (N, O, P) by central differences, one trainable parameter at a time (error O(h²) + O(ε/h))."""
    forward = tf.function(lambda: model(tf.constant(x), training=False))
    cols = []
    for v in model.trainable_variables:
        base = v.numpy()
        for p in range(base.size):
            step = np.zeros(base.size)
            step[p] = h
            v.assign(base + step.reshape(base.shape))
            plus = forward().numpy()
            v.assign(base - step.reshape(base.shape))
            cols.append((plus - forward().numpy()) / (2 * h))
        v.assign(base)
    return np.stack(cols, axis=-1)


def _kernel(j1, j2, trace):
    k = np.einsum("iap,jbp->ijab", j1, j2)
    return np.einsum("ijaa->ij", k) / O if trace else k


def _close(actual, expected, rtol):
    """Entrywise agreement relative to the kernel's scale (entries near zero cannot meet a pure rtol)."""
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


IMPLEMENTATIONS = ("auto", "structured", "jacobian", "ntk_vp")
# Default run: every model through "auto" (what users get) and every implementation on cnn1d (Conv1D +
# BatchNorm); the per-layer pfor Jacobians and the Θv loop trace slowly, so the other pairs are slow tests.
FAST = {(name, "auto") for name in ZOO} | {("cnn1d", impl) for impl in IMPLEMENTATIONS}


def _cases(names, fast=FAST):
    return [pytest.param(name, impl, marks=() if (name, impl) in fast else pytest.mark.slow)
            for name in names for impl in IMPLEMENTATIONS]


@functools.lru_cache(maxsize=None)
def _naive_case(name):
    """A zoo model (all variables trainable), inputs x1 (5 examples: 3 blocks of 2, the last padded), x2 (2)
    and their tape-loop Jacobians."""
    model, shape = _zoo(name)
    rng = np.random.default_rng(1)
    x1, x2 = rng.normal(size=(5, *shape)), rng.normal(size=(2, *shape))
    return model, x1, x2, _naive_jacobian(model, x1), _naive_jacobian(model, x2)


def _check_kernels(model, implementation, x1, x2, j1, j2, rtol):
    """Full and trace kernels, x2 given or not, one block or padded blocks of 2, against J1 J2ᵀ."""
    full = ntk.empirical_ntk_fn(model, trace_axes=(), implementation=implementation)
    blocked = ntk.empirical_ntk_fn(model, trace_axes=(-1,), implementation=implementation, batch_size=2)
    if implementation == "auto":  # functional models resolve to structured derivatives
        assert full.implementation == "structured"
    _close(full(x1, x2), _kernel(j1, j2, False), rtol)
    _close(full(x1), _kernel(j1, j1, False), rtol)
    _close(blocked(x1), _kernel(j1, j1, True), rtol)
    _close(blocked(x1, x2), _kernel(j1, j2, True), rtol)


@pytest.mark.parametrize("name, implementation", _cases(ZOO))
def test_matches_naive_reference(name, implementation):
    model, x1, x2, j1, j2 = _naive_case(name)
    _check_kernels(model, implementation, x1, x2, j1, j2, **TIGHT)


def _mixed_model():
    """A functional model with what the zoo lacks: activations inside Dense/Conv, dilation, valid padding,
    a frozen layer and a frozen BatchNorm β (must not count), a layer shared by two branches, max pooling
    and concatenation."""
    inputs = keras.Input((7, 7, 2))
    x = layers.Conv2D(3, 3, strides=2, padding="valid", activation="tanh")(inputs)
    y = layers.Conv2D(3, 2, dilation_rate=2, padding="same")(inputs)
    norm = layers.BatchNormalization()
    y = layers.MaxPooling2D(2)(norm(y))
    norm.beta.trainable = False
    x = layers.Flatten()(x)
    y = layers.Flatten()(y)
    shared = layers.Dense(4, activation="relu")
    frozen = layers.Dense(3, trainable=False)
    z = layers.Concatenate()([shared(layers.Dense(5)(x)), shared(layers.Dense(5)(y)), frozen(x)])
    return randomize(keras.Model(inputs, layers.Dense(O, activation="sigmoid")(z)))


def _conv1d_model():
    """Conv1D with stride, valid and same padding, BatchNorm over a non-last axis, a Dense on a 3-D tensor
    (applied per position)."""
    inputs = keras.Input((9, 2))
    x = layers.Conv1D(3, 3, strides=2, padding="valid", activation="relu")(inputs)
    x = layers.BatchNormalization(axis=1)(x)
    x = layers.Conv1D(2, 2, padding="same")(x)
    x = layers.Dense(3, activation="tanh")(x)
    return randomize(keras.Model(inputs, layers.Dense(O)(layers.Flatten()(x))))


class _Subclassed(keras.Model):
    """A model without a functional graph: "auto" must fall back to the whole-model Jacobian."""

    def __init__(self):
        super().__init__(name="subclassed")
        self.hidden, self.out = layers.Dense(4, activation="tanh"), layers.Dense(O)

    def call(self, x, training=False):
        return self.out(self.hidden(x))


FD_MODELS = {**{name: lambda name=name: _zoo(name)[0] for name in ZOO}, "mixed": _mixed_model, "conv1d": _conv1d_model}
# Central differences cost two forward passes per parameter: the ResNets' (77k parameters) are taken over
# the variables of at most FD_MAX_SIZE entries only (the others frozen), which keeps every kind of term —
# stem and 1×1 projection convolutions, BatchNorm γ/β, the logits layer — behind the full residual graph.
FD_MAX_SIZE = 600
FD_FAST = {(name, "auto") for name in ("mlp", "cnn", "cnn1d", "mixed", "conv1d")} | {("mixed", "jacobian")}


@functools.lru_cache(maxsize=None)
def _fd_case(name):
    """A model for finite differences, inputs x1 (3 examples), x2 (2) and their central-difference Jacobians."""
    model = FD_MODELS[name]()
    if name in ("resnet20", "wide_resnet"):
        for v in model.trainable_variables:
            v.trainable = int(np.prod(v.shape)) <= FD_MAX_SIZE
    shape = model.inputs[0].shape[1:]
    rng = np.random.default_rng(2)
    x1, x2 = rng.normal(size=(3, *shape)), rng.normal(size=(2, *shape))
    return model, x1, x2, _fd_jacobian(model, x1), _fd_jacobian(model, x2)


@pytest.mark.parametrize("name, implementation", _cases(FD_MODELS, FD_FAST))
def test_matches_central_finite_differences(name, implementation):
    """J Jᵀ with J from central differences; rtol 1e-6 covers the O(h²) truncation (~1e-12) and the O(ε/h)
    rounding (~1e-10) of h = 1e-6 in float64."""
    model, x1, x2, j1, j2 = _fd_case(name)
    _close(_naive_jacobian(model, x1), j1, rtol=1e-6)  # the two references agree on the same parameters
    _check_kernels(model, implementation, x1, x2, j1, j2, rtol=1e-6)


def test_frozen_and_shared_layers_against_naive():
    """Trainable variables only (the frozen Dense is excluded) and shared-layer Jacobians add."""
    model = _mixed_model()
    x = np.random.default_rng(3).normal(size=(4, 7, 7, 2))
    j = _naive_jacobian(model, x)
    assert j.shape[-1] == sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    _close(ntk.empirical_ntk_fn(model, trace_axes=(), batch_size=3)(x), _kernel(j, j, False), **TIGHT)


def test_subclassed_model_uses_whole_model_jacobian():
    model = _Subclassed()
    x = np.random.default_rng(4).normal(size=(3, 5))
    model(x)
    fn = ntk.empirical_ntk_fn(model, trace_axes=())
    assert fn.implementation == "jacobian"
    j = _naive_jacobian(model, x)
    _close(fn(x), _kernel(j, j, False), **TIGHT)
    with pytest.raises(ValueError, match="functional or Sequential"):
        ntk.empirical_ntk_fn(model, implementation="structured")


def test_sequential_model_is_structured():
    model = randomize(keras.Sequential([keras.Input((4,)), layers.Dense(3, activation="relu"), layers.Dense(O)]))
    x = np.random.default_rng(5).normal(size=(3, 4))
    fn = ntk.empirical_ntk_fn(model, trace_axes=())
    assert fn.implementation == "structured"
    j = _naive_jacobian(model, x)
    _close(fn(x), _kernel(j, j, False), **TIGHT)


def test_ntk_vp_fn_matches_kernel_product():
    model, shape = _zoo("cnn")
    rng = np.random.default_rng(6)
    x1, x2, v = rng.normal(size=(3, *shape)), rng.normal(size=(4, *shape)), rng.normal(size=(4, O))
    k = _kernel(_naive_jacobian(model, x1), _naive_jacobian(model, x2), False)
    _close(np.asarray(ntk.ntk_vp_fn(model, x1, x2)(tf.constant(v))), np.einsum("ijab,jb->ia", k, v), **TIGHT)


def test_float64_contraction_of_float32_model():
    """dtype sets the contraction and result dtype; a float32 model's kernel agrees to float32 rounding."""
    set_float("float32")
    model = randomize(models.get("mlp", (5,), O, hidden=(4, 3)))
    x = np.random.default_rng(7).normal(size=(3, 5)).astype("float32")
    k64 = ntk.empirical_ntk_fn(model, dtype="float64")(x)
    k32 = ntk.empirical_ntk_fn(model)(x)
    assert k64.dtype == np.float64 and k32.dtype == np.float32
    _close(k32.astype(np.float64), k64, rtol=1e-5)  # float32 products of ~1e2 terms


@pytest.mark.parametrize("name, implementation", [
    ("cnn1d", "auto"),
    pytest.param("cnn1d", "jacobian", marks=pytest.mark.slow),
    pytest.param("cnn1d", "ntk_vp", marks=pytest.mark.slow),
    pytest.param("resnet20", "auto", marks=pytest.mark.slow),
])
def test_mirrored_strategy_matches_single_device(name, implementation, mirrored):
    """Block pairs spread over 2 logical CPUs (odd pair count: the last round is padded) give the same kernel."""
    strategy = mirrored
    with strategy.scope():
        model, shape = _zoo(name)
    rng = np.random.default_rng(8)
    x1, x2 = rng.normal(size=(3, *shape)), rng.normal(size=(5, *shape))
    for trace_axes in ((), (-1,)):
        kw = dict(trace_axes=trace_axes, batch_size=2, implementation=implementation)
        single, mirrored_fn = ntk.empirical_ntk_fn(model, **kw), ntk.empirical_ntk_fn(model, strategy=strategy, **kw)
        for args in ((x1,), (x1, x2)):
            _close(mirrored_fn(*args), single(*args), **TIGHT)


# Compiling a ResNet's block pair takes 15-20 s on the loaded 2-core machine: the ResNets are slow tests.
@pytest.mark.parametrize("name, implementation", _cases(ZOO, fast={(name, "auto") for name in ("mlp", "cnn", "cnn1d")}))
def test_block_pair_compiles_with_xla_for_every_zoo_model(name, implementation):
    """TPU readiness (issue 6): the function each replica runs under a strategy, `_Engine._pair` (features of
    two blocks and their contraction), compiles with XLA for static block shapes, and gives the graph's kernel."""
    set_float("float32")  # what TPUs run
    model, shape = _zoo(name)
    x = np.random.default_rng(10).normal(size=(5, *shape)).astype("float32")
    blocks = ntk._blocks(tf.constant(x), 2)  # 5 examples in blocks of 2: the last one is zero-padded
    assert [tuple(b.shape) for _, _, b in blocks] == [(2, *shape)] * 3  # one static shape for every block
    engine = ntk._Engine(model, ntk._check_implementation(model, implementation), False, tf.float32)
    engine._setup(blocks[0][2])
    compiled = tf.function(engine._pair, jit_compile=True)
    xa, xb = blocks[0][2], blocks[2][2]
    assert "HloModule" in compiled.experimental_get_compiler_ir(xa, xb)(stage="hlo")
    # XLA fuses and reorders float32 sums over up to 8e4 parameters: agreement to ~1e-6 of the kernel's scale
    _close(compiled(xa, xb).numpy(), engine.pair(xa, xb).numpy(), rtol=1e-5)


def _per_layer_against_single_layers(model, x1, x2, implementation):
    """Per-layer trace kernels (padded blocks of 2, symmetric and not) against the kernel computed with only
    that layer trainable; returns the per-layer kernels of x1 with itself."""
    fn = ntk.empirical_ntk_fn(model, implementation=implementation, batch_size=2, per_layer=True)
    pieces, cross = fn(x1), fn(x1, x2)
    assert pieces.shape == (len(fn.layer_names), len(x1), len(x1)) and len(set(fn.layer_names)) == len(fn.layer_names)
    layers, variables = {layer.name: layer.trainable for layer in model.layers}, [v.trainable for v in model.weights]

    def restore():
        for layer in model.layers:
            layer.trainable = layers[layer.name]
        for v, flag in zip(model.weights, variables):
            v.trainable = flag

    try:
        for index, name in enumerate(fn.layer_names):
            for layer in model.layers:  # freeze the others (setting a layer trainable would unfreeze its variables)
                if layer.name != name:
                    layer.trainable = False
            alone = ntk.empirical_ntk_fn(model, implementation=implementation, batch_size=2)
            _close(pieces[index], alone(x1), **TIGHT)
            _close(cross[index], alone(x1, x2), **TIGHT)
            restore()
    finally:
        restore()
    return pieces


@pytest.mark.parametrize("name, implementation", [
    ("mixed", "auto"),
    pytest.param("cnn1d", "auto", marks=pytest.mark.slow),
    pytest.param("mixed", "jacobian", marks=pytest.mark.slow),
    pytest.param("resnet20", "auto", marks=pytest.mark.slow),
])
def test_per_layer_kernels_are_single_layer_kernels_summing_to_the_kernel(name, implementation):
    """Θ = Σ_l Θ_l, each Θ_l the kernel of layer l's variables alone (float64: to rounding, as TIGHT); "mixed"
    has a shared layer (both calls in one piece) and a frozen layer (no piece)."""
    model = _zoo(name)[0] if name in ZOO else _mixed_model()
    shape = model.inputs[0].shape[1:]
    rng = np.random.default_rng(11)
    x1, x2 = rng.normal(size=(5, *shape)), rng.normal(size=(3, *shape))
    pieces = _per_layer_against_single_layers(model, x1, x2, implementation)
    _close(pieces.sum(axis=0), ntk.empirical_ntk_fn(model, batch_size=2, implementation=implementation)(x1), **TIGHT)
    full = ntk.empirical_ntk_fn(model, trace_axes=(), per_layer=True, implementation=implementation)
    _close(full(x1, x2).sum(axis=0), ntk.empirical_ntk_fn(model, trace_axes=(), implementation=implementation)(x1, x2),
           **TIGHT)


def test_per_layer_kernels_sum_to_the_kernel_in_float32(tmp_path, mirrored):
    """In float32 the layers' pieces sum to the kernel to 1e-5 of its scale: the same products, summed in
    another order (float32 rounding ~1e-7 per term, over a few layers' terms). Also spread over 2 replicas
    (the same per-layer blocks) and written to NetCDF with the layer names as coordinate."""
    set_float("float32")
    with mirrored.scope():
        model, shape = _zoo("cnn1d")
    x = np.random.default_rng(12).normal(size=(5, *shape)).astype("float32")
    fn = ntk.empirical_ntk_fn(model, trace_axes=(), batch_size=2, per_layer=True)
    pieces = fn(x)
    assert fn.layer_names == ("conv0", "bn0", "conv1", "bn1", "conv2", "bn2", "logits")
    _close(pieces.sum(axis=0), ntk.empirical_ntk_fn(model, trace_axes=(), batch_size=2)(x), rtol=1e-5)
    spread = ntk.empirical_ntk_fn(model, trace_axes=(), batch_size=2, per_layer=True, strategy=mirrored)
    _close(spread(x), pieces, rtol=1e-6)  # the same float32 blocks, computed on another logical device
    written = fn(x, out=str(tmp_path / "layers.nc"))
    assert list(written.layer.values) == list(fn.layer_names) and written.dims[0] == "layer"
    np.testing.assert_array_equal(np.asarray(written), pieces)


def test_per_layer_needs_per_layer_features():
    with pytest.raises(ValueError, match="per_layer needs"):
        ntk.empirical_ntk_fn(_zoo("mlp")[0], implementation="ntk_vp", per_layer=True)


@pytest.mark.parametrize("suffix", [".npy", ".nc"])
def test_kernel_written_block_by_block_to_disk(tmp_path, suffix):
    model, shape = _zoo("mlp")
    x = np.random.default_rng(9).normal(size=(5, *shape))
    fn = ntk.empirical_ntk_fn(model, trace_axes=(), batch_size=2)
    path = str(tmp_path / f"kernel{suffix}")
    lazy = fn(x, out=path)
    assert not isinstance(lazy, np.ndarray) or isinstance(lazy, np.memmap)
    np.testing.assert_array_equal(np.asarray(ntk.open_kernel(path)), fn(x))
    np.testing.assert_array_equal(np.asarray(lazy[1:3, 4]), fn(x)[1:3, 4])


def test_kernel_at_given_weights_equals_a_model_holding_them_and_leaves_the_model_as_it_was():
    """`ntk(x, weights=w)` is the kernel of a second model holding `w` (BatchNorm's moving statistics
    included), computed the same way, so equal to the last bit; the model's own weights come back."""
    model, shape = _zoo("cnn1d")  # with BatchNorm
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, *shape))
    own = model.get_weights()
    other = keras.models.clone_model(model)
    other.set_weights([w + rng.normal(scale=0.1, size=w.shape).astype(w.dtype) for w in own])
    kernel = ntk.empirical_ntk_fn(model, batch_size=2)
    at_other = kernel(x, weights=other.get_weights())
    np.testing.assert_array_equal(at_other, ntk.empirical_ntk_fn(other, batch_size=2)(x))
    for mine, before in zip(model.get_weights(), own):
        np.testing.assert_array_equal(mine, before)
    assert not np.allclose(kernel(x), at_other, rtol=1e-3)  # the weights changed the kernel
    with pytest.raises(ValueError, match=r"weights must be \d+ arrays shaped as model.get_weights\(\)"):
        kernel(x, weights=own[:-1])
    with pytest.raises(ValueError):  # inputs of the wrong shape fail inside the computation ...
        kernel(x[:, :5], weights=other.get_weights())
    for mine, before in zip(model.get_weights(), own):  # ... and the model's own weights are back
        np.testing.assert_array_equal(mine, before)


def test_bad_arguments_are_named():
    model, shape = _zoo("mlp")
    with pytest.raises(ValueError, match="trace_axes"):
        ntk.empirical_ntk_fn(model, trace_axes=(0,))
    with pytest.raises(ValueError, match="implementation must be one of"):
        ntk.empirical_ntk_fn(model, implementation="fast")
    with pytest.raises(ValueError, match="batch_size"):
        ntk.empirical_ntk_fn(model, batch_size=0)
    with pytest.raises(ValueError, match="floating dtype"):
        ntk.empirical_ntk_fn(model, dtype="int32")
    with pytest.raises(ValueError, match=r"\.npy or \.nc"):
        ntk.empirical_ntk_fn(model)(np.zeros((2, *shape)), out="kernel.txt")


def test_default_block_size_comes_from_the_feature_budget(monkeypatch):
    """batch_size=None: the largest blocks whose two blocks' Jacobians (O·P float64 numbers per example) fit
    ntk.FEATURE_BUDGET; with a budget for blocks of 2, 5 examples run as 3 blocks and match J Jᵀ."""
    model, x1, _, j1, _ = _naive_case("cnn1d")
    per_example = O * sum(v.numpy().size for v in model.trainable_variables) * 8
    assert ntk.default_batch_size(model, O, tf.float64) == ntk.FEATURE_BUDGET // (2 * per_example)
    monkeypatch.setattr(ntk, "FEATURE_BUDGET", 2 * 2 * per_example + per_example // 2)
    sizes = []
    blocks = ntk._blocks
    monkeypatch.setattr(ntk, "_blocks", lambda x, batch_size: sizes.append(batch_size) or blocks(x, batch_size))
    _close(ntk.empirical_ntk_fn(model, trace_axes=(-1,))(x1), _kernel(j1, j1, True), **TIGHT)
    assert sizes == [2, 2]
    monkeypatch.setattr(ntk, "FEATURE_BUDGET", 1)  # smaller than one example: blocks of one
    assert ntk.default_batch_size(model, O, tf.float64) == 1


def test_ntk_cli_measures_every_checkpoint_of_a_run(tmp_path):
    """`kerasntk ntk RUN_DIR` computes the probe-set kernel of every parent checkpoint and writes parent(time,
    metric) kernel metrics and kernel_distance(time, time_b), equal to those of kernels recomputed here."""
    from kerasntk import cli
    from kerasntk.experiment import Experiment
    from kerasntk.rundir import RunDir
    from kerasntk import config as cfg
    from helpers import synthetic_arrays

    set_float("float32")  # the experiment trains in float32
    arrays = synthetic_arrays(n_train=128, n_test=32, shape=(16, 1))
    npz = tmp_path / "tiny.npz"
    np.savez(npz, x_train=arrays.x_train, y_train=arrays.y_train, x_test=arrays.x_test, y_test=arrays.y_test)
    config = cfg.load(None, [f"data.path={npz}", "data.name=npz", "train.length=2ep", "train.batch_size=32",
                             "checkpoints.log_num=0", "checkpoints.every=1ep", "spawn.times=[]",
                             "linearize.times=[]", "ntk.probe_size=12", "ntk.batch_size=5"])
    run_dir = str(tmp_path / "run")
    RunDir(run_dir).prepare(config)
    experiment = Experiment(config, run_dir, verbose=0)
    experiment.train_parent()
    assert cli.main(["-q", "ntk", run_dir]) == 0
    ds = xr.load_dataset(RunDir(run_dir).result("parent"))
    steps = experiment.grid.checkpoints
    assert ds.parent.dims == ("time", "metric") and ds.kernel_distance.dims == ("time", "time_b")
    assert ds.sizes["time"] == len(steps) >= 3  # every checkpoint of the grid (epochs 0, 1, 2 at least)
    model, fn = experiment.model, None
    kernels = []
    for step in steps:  # recompute every checkpoint's kernel from its weights
        model.set_weights(experiment.weights_at(RunDir(run_dir).parent, step))
        fn = fn or ntk.empirical_ntk_fn(model, batch_size=5)
        kernels.append(fn(experiment.x_probe).astype(np.float64))
        assert kernels[-1].shape == (12, 12)
    # float32 kernels from the same engine and blocks: S agrees to float32 rounding of the kernels
    S = np.array([[ntk.kernel_distance(a, b) for b in kernels] for a in kernels])
    np.testing.assert_allclose(ds.kernel_distance.values, S, atol=1e-5)
    assert S[0, -1] > 1e-3  # training moved the kernel: the comparison is not between constant kernels
    parent = ds.parent.sel(metric=["kernel_distance_from_init", "kernel_alignment", "kernel_effective_rank"])
    assert parent.notnull().all()
    np.testing.assert_allclose(parent.sel(metric="kernel_distance_from_init"), S[0], atol=1e-5)
    y = np.eye(arrays.num_classes)[experiment.y_probe]
    np.testing.assert_allclose(parent.sel(metric="kernel_alignment"), [ntk.kernel_alignment(k, y) for k in kernels], rtol=1e-4)


# ------------------------------------------------------------------------------------------- metrics


def _psd(n, seed=0, o=None):
    """A random positive semi-definite trace (n, n) or full (n, n, o, o) kernel."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n * (o or 1), 7))
    m = a @ a.T
    return m if o is None else m.reshape(n, o, n, o).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("o", [None, 3])
def test_kernel_distance_closed_forms(o):
    K = _psd(6, o=o)
    assert abs(ntk.kernel_distance(K, 3.5 * K)) < 1e-14
    assert abs(ntk.kernel_distance(K, -K) - 2) < 1e-14
    K2 = _psd(6, seed=1, o=o)
    expected = 1 - np.sum(K * K2) / np.sqrt(np.sum(K * K) * np.sum(K2 * K2))
    assert abs(ntk.kernel_distance(K, K2) - expected) < 1e-14


def test_metrics_reduce_in_float64():
    """S(K, K) of a large float32 kernel is 0 to float64 rounding (float32 sums would leave ~1e-7)."""
    K = np.random.default_rng(0).uniform(size=(700, 700)).astype(np.float32)
    assert abs(ntk.kernel_distance(K, K)) < 1e-12


@pytest.mark.parametrize("centered", [True, False])
def test_alignment_of_label_kernel_with_itself_is_one(centered):
    y = np.array([0, 1, 2, 1, 0, 2, 2])
    Y = np.eye(3)[y]
    assert abs(ntk.kernel_alignment(Y @ Y.T, y, centered=centered) - 1) < 1e-12
    full = np.einsum("ia,jb->ijab", Y, Y)  # vec(Y)vec(Y)ᵀ as (N, N, O, O)
    assert abs(ntk.kernel_alignment(full, Y, centered=centered) - 1) < 1e-12


def test_centered_alignment_closed_form():
    """Against the definition with explicit H = I − 11ᵀ/N (Cortes et al. 2012)."""
    K, y = _psd(5), np.array([0, 1, 1, 0, 1])
    H = np.eye(5) - 1 / 5
    Y = np.eye(2)[y]
    Kc, Tc = H @ K @ H, H @ Y @ Y.T @ H
    expected = np.sum(Kc * Tc) / (np.linalg.norm(Kc) * np.linalg.norm(Tc))
    assert abs(ntk.kernel_alignment(K, y) - expected) < 1e-12


@pytest.mark.parametrize("o", [None, 2])
def test_metrics_invariant_to_example_permutation(o):
    K, K2 = _psd(6, o=o), _psd(6, seed=3, o=o)
    y = np.array([0, 1, 1, 0, 1, 0])
    perm = np.random.default_rng(1).permutation(6)
    p = lambda k: k[perm][:, perm]  # noqa: E731
    yp = y[perm]
    assert abs(ntk.kernel_distance(p(K), p(K2)) - ntk.kernel_distance(K, K2)) < 1e-12
    if o is None:
        assert abs(ntk.kernel_alignment(p(K), yp) - ntk.kernel_alignment(K, y)) < 1e-12
    np.testing.assert_allclose(ntk.eigenvalues(p(K), 4), ntk.eigenvalues(K, 4), rtol=1e-10)
    assert abs(ntk.effective_rank(p(K)) - ntk.effective_rank(K)) < 1e-10


def test_spectrum_closed_forms():
    lam = np.array([5.0, 3.0, 2.0, 0.0])
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))
    K = q @ np.diag(lam) @ q.T
    np.testing.assert_allclose(ntk.eigenvalues(K, 3), [5, 3, 2], atol=1e-12)
    p = lam[:3] / lam.sum()
    assert abs(ntk.effective_rank(K) - np.exp(-np.sum(p * np.log(p)))) < 1e-10
    assert abs(ntk.effective_rank(np.eye(6)) - 6) < 1e-10
    assert abs(ntk.effective_rank(np.ones((6, 6))) - 1) < 1e-10
    with pytest.raises(ValueError, match="k must be"):
        ntk.eigenvalues(K, 5)


def test_velocity_and_trajectory_metrics():
    kernels = [_psd(4, seed=s) for s in range(4)]
    times = np.array([0.0, 0.5, 1.5, 3.0])
    lrs = np.array([0.1, 0.1, 0.05, 0.01])
    y = np.array([0, 1, 0, 1])
    v = ntk.kernel_velocity(kernels, times)
    for i in range(3):
        assert abs(v[i] - ntk.kernel_distance(kernels[i], kernels[i + 1]) / (times[i + 1] - times[i])) < 1e-14
    assert np.isnan(v[-1])
    metrics, S = ntk.trajectory_metrics(kernels, times, y, learning_rates=lrs)
    assert S.shape == (4, 4) and np.allclose(S, S.T) and np.all(np.diag(S) == 0)
    assert abs(S[1, 3] - ntk.kernel_distance(kernels[1], kernels[3])) < 1e-14
    np.testing.assert_allclose(metrics["kernel_velocity"], v, rtol=1e-14)
    np.testing.assert_allclose(metrics["kernel_velocity_per_lr"][:3], v[:3] / lrs[:3], rtol=1e-14)
    np.testing.assert_allclose(metrics["kernel_distance_from_init"], S[0])
    np.testing.assert_allclose(metrics["kernel_distance_to_final"], S[:, -1])
    assert metrics["kernel_alignment"][2] == ntk.kernel_alignment(kernels[2], y)
    assert metrics["kernel_alignment_uncentered"][2] == ntk.kernel_alignment(kernels[2], y, centered=False)
    assert metrics["kernel_effective_rank"][0] == ntk.effective_rank(kernels[0])
    assert all(m.shape == (4,) for m in metrics.values())
    assert np.all(np.isnan(ntk.trajectory_metrics(kernels, times, y)[0]["kernel_velocity_per_lr"]))


def test_kernel_trajectory_added_one_at_a_time_equals_the_whole_trajectory():
    """The accumulator's metrics after each add equal the batch definitions on the kernels so far."""
    kernels = [_psd(4, seed=s) for s in range(5)]
    times, lrs, y = np.array([0.0, 0.4, 1.0, 1.4, 1.8]), np.array([0.1, 0.1, 0.05, 0.05, 0.0]), np.array([0, 1, 0, 1])
    trajectory = ntk.KernelTrajectory(y, dt=0.4)
    for n in range(1, 6):
        trajectory.add(times[n - 1], kernels[n - 1], lrs[n - 1])
        metrics = trajectory.metrics()
        S = np.array([[ntk.kernel_distance(a, b) if a is not b else 0.0 for b in kernels[:n]] for a in kernels[:n]])
        np.testing.assert_allclose(trajectory.distance_matrix(), S, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(metrics["kernel_velocity"], ntk.kernel_velocity(kernels[:n], times[:n], dt=0.4))
        np.testing.assert_allclose(metrics["kernel_distance_to_final"], S[:, -1], rtol=1e-12, atol=1e-15)
        assert metrics["kernel_top_eigenvalue"][-1] == ntk.eigenvalues(kernels[n - 1], 1)[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        np.testing.assert_array_equal(metrics["kernel_velocity_per_lr"], metrics["kernel_velocity"] / lrs)
    with pytest.raises(ValueError, match="strictly increasing"):
        trajectory.add(1.8, kernels[0])
    with pytest.raises(ValueError, match="one shape"):
        trajectory.add(2.0, _psd(5))
    with pytest.raises(ValueError, match="empty"):
        ntk.KernelTrajectory().metrics()
    unlabelled = ntk.KernelTrajectory()
    unlabelled.add(0.0, kernels[0])
    assert "kernel_alignment" not in unlabelled.metrics() and np.isnan(unlabelled.metrics()["kernel_velocity_per_lr"][0])


def test_layer_trajectory_metrics_are_each_layers_own():
    """Per-layer distance from init, velocity and alignment equal the whole-kernel metrics of each layer's kernels."""
    kernels = [np.stack([_psd(4, seed=10 * t + layer) for layer in range(3)]) for t in range(4)]
    times, y = np.array([0.0, 0.4, 0.8, 2.0]), np.array([0, 1, 0, 1])
    metrics = ntk.layer_trajectory_metrics(kernels, times, y, dt=0.4)
    assert set(metrics) == {"kernel_distance_from_init", "kernel_velocity", "kernel_alignment"}
    for layer in range(3):
        alone, _ = ntk.trajectory_metrics([K[layer] for K in kernels], times, y, dt=0.4)
        for name, values in metrics.items():
            assert values.shape == (4, 3)
            np.testing.assert_array_equal(values[:, layer], alone[name])
    assert "kernel_alignment" not in ntk.layer_trajectory_metrics(kernels, times)
    with pytest.raises(ValueError, match="per-layer kernels"):
        ntk.layer_trajectory_metrics([_psd(4)], [0.0])


def test_velocity_over_a_fixed_dt():
    """v(t) = S(K_t, K_{t+dt}) / dt, the paper's definition: only times whose t + dt is measured get one."""
    kernels = [_psd(4, seed=s) for s in range(5)]
    times = np.array([0.0, 0.4, 1.0, 1.4, 1.8])
    v = ntk.kernel_velocity(kernels, times, dt=0.4)
    expected = [ntk.kernel_distance(kernels[a], kernels[b]) / 0.4 for a, b in ((0, 1), (2, 3), (3, 4))]
    np.testing.assert_allclose(v[[0, 2, 3]], expected, rtol=1e-12)
    assert np.isnan(v[1]) and np.isnan(v[4])  # no kernel at 0.8 or 2.2
    metrics, _ = ntk.trajectory_metrics(kernels, times, np.array([0, 1, 0, 1]), dt=0.4)
    np.testing.assert_array_equal(metrics["kernel_velocity"], v)


def test_metric_errors_are_named():
    K = _psd(4)
    with pytest.raises(ValueError, match="same shape"):
        ntk.kernel_distance(K, _psd(5))
    with pytest.raises(ValueError, match="strictly increasing"):
        ntk.kernel_velocity([K, K], [1.0, 1.0])
    with pytest.raises(ValueError, match="trace kernel"):
        ntk.effective_rank(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="y must be"):
        ntk.kernel_alignment(K, np.zeros((3,), int))
