"""The one evaluator against numpy references, and the same checkpoint's test error agreeing across files."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import layers

from helpers import float64  # noqa: F401  (fixture)
from kerasntk import data, models, results, rundir
from kerasntk.callbacks import NTKMonitor
from kerasntk.evaluation import Evaluator


def _softmax_regression(rng, d=6, classes=3):
    inputs = keras.Input((d,))
    model = keras.Model(inputs, layers.Dense(classes)(inputs))
    model.set_weights([rng.standard_normal(w.shape).astype(keras.config.floatx()) for w in model.get_weights()])
    return model


def _numpy_reference(model, x, y):
    """Logits, mean cross-entropy and error computed in float64 numpy from the weights."""
    kernel, bias = (w.astype(np.float64) for w in model.get_weights())
    logits = x.astype(np.float64) @ kernel + bias
    log_p = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    return logits, -np.mean(log_p[np.arange(len(y)), y]), np.mean(logits.argmax(1) != y)


def test_matches_numpy_with_a_masked_last_batch_and_one_trace():
    rng = np.random.default_rng(5)
    model = _softmax_regression(rng)
    x, y = rng.standard_normal((50, 6)).astype(np.float32), rng.integers(0, 3, 50)
    evaluator = Evaluator(model, 16)  # 50 = 3 full batches + 2 examples padded to 16
    result = evaluator(x, y, logits=True)
    logits, loss, error = _numpy_reference(model, x, y)
    np.testing.assert_allclose(result["logits"], logits, rtol=1e-5, atol=1e-5)  # float32 matmul
    assert result["loss"] == pytest.approx(loss, rel=1e-5)  # float32 per-example losses
    assert result["error"] == error  # a ratio of exact counts
    for n in (1, 17, 33):  # other sizes, other padding: the same traced function
        assert evaluator(x[:n], y[:n])["error"] == np.mean(logits[:n].argmax(1) != y[:n])
    assert evaluator._functions["metrics"].experimental_get_tracing_count() == 1
    np.testing.assert_array_equal(evaluator.predict(x), result["logits"].astype(np.float32))


@pytest.mark.usefixtures("float64")
def test_float64_model_is_exact_to_float64_rounding():
    rng = np.random.default_rng(6)
    model = _softmax_regression(rng)
    x, y = rng.standard_normal((40, 6)), rng.integers(0, 3, 40)
    result = Evaluator(model, 16)(x, y)
    _, loss, error = _numpy_reference(model, x, y)
    assert result["loss"] == pytest.approx(loss, rel=1e-12)  # sums stay float64 on the device
    assert result["error"] == error


def test_weights_argument_and_xla_compilation():
    rng = np.random.default_rng(7)
    model = models.get("cnn1d", (40, 1), 10, channels=4)
    x, y = rng.standard_normal((30, 40, 1)).astype(np.float32), rng.integers(0, 10, 30)
    w = [rng.standard_normal(v.shape).astype(np.float32) * 0.3 for v in model.get_weights()]
    plain = Evaluator(model, 8)(x, y, weights=w, logits=True)
    np.testing.assert_array_equal(model.get_weights()[0], w[0])  # the weights were loaded into the model
    compiled = Evaluator(model, 8, jit_compile=True)(x, y, logits=True)
    # XLA fuses the convolutions differently: float32 rounding of the logits, the same predictions
    np.testing.assert_allclose(compiled["logits"], plain["logits"], rtol=1e-5, atol=1e-5)
    assert compiled["error"] == plain["error"]
    assert compiled["loss"] == pytest.approx(plain["loss"], rel=1e-6)


def test_mirrored_replicas_split_batches_in_order(mirrored):
    """65 examples in global batches of 32 over 2 replicas: the last batch has 1 real example on replica 0."""
    rng = np.random.default_rng(8)
    with mirrored.scope():
        model = _softmax_regression(rng)
    x, y = rng.standard_normal((65, 6)).astype(np.float32), rng.integers(0, 3, 65)
    result = Evaluator(model, 32)(x, y, logits=True)
    logits, loss, error = _numpy_reference(model, x, y)
    np.testing.assert_allclose(result["logits"], logits, rtol=1e-5, atol=1e-5)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["error"] == error
    assert Evaluator(model, 33).batch_size == 32  # rounded down to a multiple of the replicas


def test_bad_input_is_named():
    model = _softmax_regression(np.random.default_rng(9))
    x = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match="integer class labels"):
        Evaluator(model, 4)(x, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="empty"):
        Evaluator(model, 4)(x[:0], np.zeros(0, int))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        Evaluator(model, 0)


def test_a_checkpoints_test_error_agrees_in_history_parent_nc_and_ntkmonitor(clean_run):
    """The trainer's history.json, measure_parent's parent.nc and NTKMonitor compute a checkpoint's test error
    with the same Evaluator (same batch size, one device): equal exactly, and the test loss too."""
    _, run_dir = clean_run
    run = rundir.RunDir(str(run_dir))
    config = run.load_config()
    arrays = data.load_arrays("npz", path=config.data.path)
    parent_nc = results.load(run.result("parent")).parent
    history = {row["step"]: row for row in run.parent.read_history()}
    assert history, "the parent's history is empty"
    for step, row in history.items():  # every epoch end is a grid checkpoint
        measured = parent_nc.sel(time=parent_nc.time[parent_nc.step == step].item())
        assert measured.sel(metric="test_error").item() == row["test_error"]
        assert measured.sel(metric="test_loss").item() == row["test_loss"]

    step = max(history)
    model = models.get(config.model.name, arrays.input_shape, arrays.num_classes, **config.model.options)
    model.compile(optimizer=keras.optimizers.SGD(0.0), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    run.parent.read_checkpoint(tf.train.Checkpoint(model=model), step, partial=True)
    monitor = NTKMonitor(arrays.x_train[:8], every=["0it"], test_data=(arrays.x_test, arrays.y_test),
                         eval_batch_size=config.train.eval_batch_size)
    model.fit(arrays.x_train[:8], arrays.y_train[:8], batch_size=8, epochs=1, verbose=0, callbacks=[monitor])
    assert monitor.test_scores[0]["error"] == history[step]["test_error"]
    assert monitor.test_scores[0]["loss"] == history[step]["test_loss"]
    assert monitor.dataset().parent.sel(metric="test_error").item() == history[step]["test_error"]
