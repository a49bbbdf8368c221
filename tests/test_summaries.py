"""TensorBoard event files of a run (kerasntk.summaries), read back with TensorFlow's event reader and compared
with the job files they come from. Event files store float32: values agree to float32 rounding (rtol 1e-6)."""

import json

import numpy as np

from helpers import tensorboard_runs, tensorboard_scalars
from kerasntk import results, summaries
from kerasntk.rundir import RunDir

EPOCH_TAGS = ["learning_rate", "test_error", "test_loss", "train_error", "train_loss"]


def _history(path):
    """{tag: {step: value}} of a history.json, steps as TensorBoard records them."""
    rows = json.loads(path.read_text())
    return {tag: {row["step"]: row[key] for row in rows} for key, tag in summaries.EPOCH_TAGS.items() if key in rows[0]}


def _assert_equal(recorded, expected):
    assert sorted(recorded) == sorted(expected)
    for tag in expected:
        assert sorted(recorded[tag]) == sorted(expected[tag]), tag
        np.testing.assert_allclose([recorded[tag][s] for s in sorted(expected[tag])],
                                   [expected[tag][s] for s in sorted(expected[tag])], rtol=1e-6, err_msg=tag)


def test_every_job_of_a_run_has_its_tensorboard_run(clean_run):
    _, run_dir = clean_run
    run = RunDir(run_dir)
    runs = tensorboard_runs(run.tensorboard())
    children = sorted(p.name for p in (run_dir / "children").iterdir())
    linearized = sorted(p.name for p in (run_dir / "linearized").iterdir())
    assert sorted(runs) == sorted(["parent", "measure_parent", "pairs"] + [f"child/{c}" for c in children]
                                  + [f"linearized/{s}" for s in linearized])

    # training curves: the parent's and every child's history.json (steps on the parent's clock)
    for name in ["parent"] + [f"child/{c}" for c in children]:
        history = _history(run_dir / name.replace("child/", "children/") / "history.json")
        assert sorted(history) == EPOCH_TAGS
        _assert_equal(runs[name], history)
    assert min(runs["child/s00000004_c0"]["test_error"]) == 8  # spawned at step 4: first epoch end at step 8
    for s in linearized:  # the linearized network counts its own steps: compare by epoch order
        history = json.loads((run_dir / "linearized" / s / "history.json").read_text())
        recorded = runs[f"linearized/{s}"]
        assert sorted(recorded) == sorted(EPOCH_TAGS + ["val_error"])
        np.testing.assert_allclose([recorded["test_error"][k] for k in sorted(recorded["test_error"])],
                                   [row["test_error"] for row in history], rtol=1e-6)

    # the parent's metrics at its checkpoints, kernel metrics included: results/parent.nc
    parent = results.load(run.result("parent")).parent
    expected = {str(m): {int(s): float(v) for s, v in zip(parent.step.values, parent.sel(metric=m).values)
                         if np.isfinite(v)} for m in parent.metric.values}
    assert {"kernel_velocity", "kernel_alignment", "kernel_distance_from_init", "test_error"} <= set(expected)
    _assert_equal(runs["measure_parent"], {k: v for k, v in expected.items() if v})

    # barriers against spawn time: the mean over child pairs of results.nc's pair variable
    ds = results.load(run.merged)
    pair = ds.pair.mean("child_pair").dropna("time", how="all")  # the merge's other times are NaN
    for metric in ("error_barrier", "loss_barrier", "train_error_barrier", "disagreement"):
        recorded = runs["pairs"][metric]
        assert sorted(recorded) == [int(s) for s in ds.step.sel(time=pair.time).values]
        np.testing.assert_allclose([recorded[s] for s in sorted(recorded)], pair.sel(metric=metric).values, rtol=1e-6)


def test_a_rewritten_step_replaces_its_file(tmp_path):
    """A resumed epoch writes the same file again: one file per step, the last values."""
    summaries.write_epoch(str(tmp_path), 8, dict(train_loss=2.0, test_error=0.5, lr=0.1))
    summaries.write_epoch(str(tmp_path), 8, dict(train_loss=1.5, test_error=0.25, lr=0.1))
    summaries.write_epoch(str(tmp_path), 16, dict(train_loss=1.0, test_error=0.125, lr=0.05))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "events.out.tfevents.step_0000000008", "events.out.tfevents.step_0000000016"]
    assert tensorboard_scalars(tmp_path) == {"train_loss": {8: 1.5, 16: 1.0}, "test_error": {8: 0.25, 16: 0.125},
                                             "learning_rate": {8: np.float32(0.1), 16: np.float32(0.05)}}
