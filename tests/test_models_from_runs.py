"""kn.load_model and `kerasntk export`: models from a run's checkpoints, checked against the run's recorded
test errors and against the weights `model.fit` had, and exported files read back by Keras itself."""

import keras
import numpy as np
import pytest

import kerasntk as kn
from kerasntk import callbacks, cli, data
from kerasntk import config as cfg
from helpers import BATCH, Recorder, tiny_model

# The tiny run (tests/helpers.py TINY): 256 training examples in batches of 32, 8 steps per epoch, 2 epochs;
# children spawned at 0, 0.5 and 1 epoch (steps 0, 4, 8), 2 per spawn time; the checkpoint grid adds every epoch
# and each time's kernel-velocity partner 0.4 epoch (3 steps) later.


def error_and_loss(model, x, y):
    """Test error and mean cross-entropy of `model` on (x, y), from its logits in float64 with numpy."""
    logits = np.asarray(model.predict(x, verbose=0), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return np.mean(logits.argmax(-1) != y), -np.mean(log_p[np.arange(len(y)), y])


def recorded(ds, variable, step, **where):
    """(test_error, test_loss) recorded in `ds[variable]` at parent step `step`."""
    at = ds[variable].isel(time=int(np.flatnonzero(ds.step.values == step)[0])).sel(**where)
    return at.sel(metric="test_error").item(), at.sel(metric="test_loss").item()


@pytest.fixture(scope="module")
def test_set(npz):
    a = data.load_arrays("npz", path=npz)  # standardized as the run's loader does
    return a.x_test, a.y_test


@pytest.mark.parametrize("time, step, child", [(1, 8, None), ("16it", 16, None), ("0.5ep", 4, 1)])
def test_loaded_model_scores_the_recorded_test_error(clean_run, test_set, time, step, child):
    ds, run_dir = clean_run
    model = kn.load_model(run_dir, time, child=child)
    error, loss = error_and_loss(model, *test_set)
    want_error, want_loss = recorded(ds, "parent", step) if child is None else recorded(ds, "child", step, spawn=child)
    # the same float32 weights and inputs; only the summation order of the logits may differ (1e-7), which flips
    # no argmax here: the error (a count of 64 examples) is equal, the loss equal to float32 accuracy
    assert error == want_error
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)


def test_export_round_trips_through_keras_files(clean_run, test_set, tmp_path):
    run_dir = clean_run[1]
    x = test_set[0]
    want = kn.load_model(run_dir, 1).predict(x, verbose=0)
    assert cli.main(["-q", "export", str(run_dir), "--time", "1", "--out", str(tmp_path / "parent.keras")]) == 0
    np.testing.assert_array_equal(keras.saving.load_model(tmp_path / "parent.keras").predict(x, verbose=0), want)

    kn.models_from_runs.export_model(run_dir, 1, tmp_path / "parent.weights.h5")
    other = kn.load_model(run_dir, 0)  # the same architecture at another checkpoint
    assert np.abs(other.predict(x, verbose=0) - want).max() > 1e-2
    other.load_weights(tmp_path / "parent.weights.h5")
    np.testing.assert_array_equal(other.predict(x, verbose=0), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent.keras", "parent.weights.h5"]  # no temporaries


@pytest.mark.parametrize("kw, message", [
    (dict(time=0.75), r"time 0\.75 \(step 6\) is not a checkpoint time of this run; allowed: 0 \(0it\), "
                      r"0\.375 \(3it\), 0\.5 \(4it\), 0\.875 \(7it\), 1 \(8it\), 1\.375 \(11it\), 2 \(16it\)$"),
    (dict(time=2, child=0), r"time 2 \(step 16\) is not a spawn time of this run; allowed: 0 \(0it\), 0\.5 \(4it\), "
                            r"1 \(8it\)$"),
    (dict(time="4it", child=2), r"child 2 is not allowed; allowed: 0\.\.1"),
    (dict(time="soon"), r"time: 'soon' is not a duration"),
])
def test_bad_times_and_children_are_one_line_errors(clean_run, kw, message):
    with pytest.raises(cfg.ConfigError, match=message) as info:
        kn.load_model(clean_run[1], **kw)
    assert "\n" not in str(info.value)


def test_export_refuses_other_formats_and_missing_checkpoints(clean_run, tmp_path, capsys):
    assert cli.main(["export", str(clean_run[1]), "--time", "1", "--out", str(tmp_path / "model.h5")]) == 2
    err = capsys.readouterr().err
    assert "must end in one of .keras, .weights.h5" in err and err.count("\n") == 1
    unfinished = tmp_path / "unfinished"
    kn.rundir.RunDir(unfinished).prepare(kn.rundir.RunDir(clean_run[1]).load_config())
    with pytest.raises(cfg.ConfigError, match=r"checkpoint at step 8 is not in .* yet; train it first: kerasntk train"):
        kn.load_model(unfinished, 1)


def test_spawn_checkpoint_run_gives_the_weights_fit_had(arrays, tmp_path):  # noqa: F811
    run, recorder = tmp_path / "run", Recorder()
    spawner = callbacks.SpawnCheckpoint([1], run, data=arrays, batch_size=BATCH)
    tiny_model().fit(arrays[0], arrays[1], batch_size=BATCH, epochs=2, verbose=0, callbacks=[recorder, spawner])
    for time, epoch in ((1, 1), ("8it", 2)):  # the spawn time and the end
        model = kn.load_model(run, time)
        for got, want in zip(model.get_weights(), recorder.weights[epoch], strict=True):
            np.testing.assert_array_equal(got, want)

