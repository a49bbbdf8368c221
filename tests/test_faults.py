"""Faults of training and of the environment, injected into copies of the tiny experiment's clean run: each gives
one `kerasntk: error:` line (or one warning per repaired file), leaves no temporary file, and a rerun after the
cause is removed gives results equal to the undisturbed run.

A full disk and a read-only run directory are real: a small tmpfs mounted for the test (this machine's tests run
as root; where mounting is not permitted those two tests are skipped and say so). Divergence comes from the
`KERASNTK_FAULT_DIVERGE` hook, so the same config can be rerun once the fault is gone; one test also diverges
for real with an absurd learning rate.
"""

import contextlib
import errno
import json
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

from kerasntk import cli, errors, fs, results
from helpers import checkpoint_values, result_arrays, temporary_files, tiny

PARENT_CKPT = "parent/checkpoints/step_00000004"
CHILD_CKPT = "children/s00000008_c1/checkpoints/step_00000016"
DATA = "ckpt.data-00000-of-00001"


def _kerasntk(capsys, *argv):
    """(exit status, stdout, stderr) of the kerasntk command run in this process."""
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _run(npz, run_dir, *extra):
    return ["run", *[a for o in tiny(npz, *extra) for a in ("--set", o)], "--out", run_dir, "-q"]


def _one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kerasntk: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _copy(clean_run, to):
    shutil.copytree(clean_run[1], to)
    return pathlib.Path(to)


def _remove(run_dir, *names):
    for name in names:
        fs.remove(str(run_dir / name))
        fs.remove(str(run_dir / name) + fs.SEAL)


def _assert_same_results(run_dir, clean_run):
    clean, again = result_arrays(clean_run[1] / "results.nc"), result_arrays(run_dir / "results.nc")
    for name in clean:
        np.testing.assert_array_equal(again[name], clean[name], err_msg=name)
    assert checkpoint_values(run_dir) == checkpoint_values(clean_run[1])


@contextlib.contextmanager
def _tmpfs(path, megabytes):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the full-disk and read-only "
                    "faults need one")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def test_check_on_a_healthy_run_exits_0_with_every_job_done(clean_run, capsys):
    status, out, _ = _kerasntk(capsys, "check", clean_run[1])
    assert status == 0, out
    rows = [line.split() for line in out.splitlines()[1:-1]]
    assert rows and all(row[1] == "done" for row in rows), out
    assert out.splitlines()[-1] == f"{len(rows)} done, 0 to do, 0 failed, 0 damaged"


def test_damaged_checkpoints_and_results_are_named_then_recomputed_exactly(tmp_path, npz, clean_run, capsys, caplog):
    run_dir = _copy(clean_run, tmp_path / "run")
    (run_dir / PARENT_CKPT / DATA).write_bytes((run_dir / PARENT_CKPT / DATA).read_bytes()[:100])  # truncated
    flipped = bytearray((run_dir / CHILD_CKPT / DATA).read_bytes())
    flipped[len(flipped) // 2] ^= 0x01  # one bit: same size, other checksum
    (run_dir / CHILD_CKPT / DATA).write_bytes(bytes(flipped))
    pair = run_dir / "results/pair_s00000004.nc"
    pair.write_bytes(pair.read_bytes()[: pair.stat().st_size // 2])

    status, out, _ = _kerasntk(capsys, "check", run_dir)
    assert status == 1
    assert f"{PARENT_CKPT}: {DATA} has 100 bytes where" in out
    assert f"{CHILD_CKPT}: {DATA} differs from its SHA-256" in out
    assert "results/pair_s00000004.nc: its SHA-256 differs" in out

    # a job that reads a damaged checkpoint names it, the job that wrote it and the command that recomputes it
    _remove(run_dir, "results/parent.nc")
    status, _, err = _kerasntk(capsys, "job", run_dir, "measure_parent")
    line = _one_error_line(err)
    assert status == 2 and f"{run_dir / PARENT_CKPT} is damaged" in line and "written by job parent" in line
    assert f"kerasntk run {run_dir / 'config.json'} --out {run_dir}" in line

    caplog.clear()
    status, _, err = _kerasntk(capsys, *_run(npz, run_dir))
    assert status == 0, err
    repaired = [r.getMessage() for r in caplog.records if "was damaged" in r.getMessage()]
    assert sorted(m.split(" was damaged")[0] for m in repaired) == sorted(
        str(run_dir / p) for p in (PARENT_CKPT, CHILD_CKPT, "results/pair_s00000004.nc"))
    _assert_same_results(run_dir, clean_run)
    assert not temporary_files(run_dir)
    assert _kerasntk(capsys, "check", run_dir)[0] == 0


def test_a_full_disk_is_one_line_and_the_rerun_after_freeing_space_continues(tmp_path, npz, clean_run, capsys):
    with _tmpfs(tmp_path / "disk", megabytes=8) as disk:
        run_dir = _copy(clean_run, disk / "run")
        shutil.rmtree(run_dir / "children/s00000004_c1")
        _remove(run_dir, "results/child_s00000004_c1.nc", "results/pair_s00000004.nc")
        filler = disk / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()

        status, _, err = _kerasntk(capsys, *_run(npz, run_dir))
        line = _one_error_line(err)
        assert status == 2
        assert "job child/s00000004_c1 failed: no space left on device" in line.lower()
        assert f"({run_dir}/" in line and "free space there" in line  # the place in the run being written
        assert not temporary_files(run_dir)

        filler.unlink()
        status, _, err = _kerasntk(capsys, *_run(npz, run_dir))
        assert status == 0, err
        _assert_same_results(run_dir, clean_run)
        assert not (run_dir / "failed").exists() or not list((run_dir / "failed").iterdir())


def test_a_read_only_run_directory_is_one_line_and_the_rerun_once_writable_continues(tmp_path, npz, clean_run, capsys):
    with _tmpfs(tmp_path / "disk", megabytes=16) as disk:
        run_dir = _copy(clean_run, disk / "run")
        _remove(run_dir, "results/child_s00000008_c0.nc")
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)

        status, _, err = _kerasntk(capsys, *_run(npz, run_dir))
        line = _one_error_line(err)
        assert status == 2
        assert f"job child/s00000008_c0 failed: read-only file system ({run_dir / 'results'})" in line
        assert "choose a writable run directory" in line

        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        assert _kerasntk(capsys, *_run(npz, run_dir))[0] == 0
        _assert_same_results(run_dir, clean_run)
        assert not temporary_files(run_dir)


def test_a_diverged_parent_stops_with_one_line_is_recorded_and_retried(tmp_path, npz, clean_run, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setenv("KERASNTK_FAULT_DIVERGE", "parent")
    status, _, err = _kerasntk(capsys, *_run(npz, run_dir))
    line = _one_error_line(err)
    assert status == 2
    assert "job parent failed: Diverged: parent: the training loss is not finite in steps 0-3" in line
    assert "lower train.lr or add train.warmup" in line
    assert json.loads((run_dir / "failed/parent.json").read_text())["error"] == "Diverged"
    assert [p.name for p in (run_dir / "parent/checkpoints").iterdir()] == ["step_00000000"]  # nothing NaN kept
    assert not (run_dir / "results").exists() and not temporary_files(run_dir)
    status, out, _ = _kerasntk(capsys, "check", run_dir)
    assert status == 1 and "parent" in out and "failed    Diverged: parent: the training loss" in out

    monkeypatch.delenv("KERASNTK_FAULT_DIVERGE")
    train = _run(npz, run_dir)
    train[0] = "train"
    assert _kerasntk(capsys, *train)[0] == 0
    assert not (run_dir / "failed/parent.json").exists()
    clean = {k: v for k, v in checkpoint_values(clean_run[1]).items() if k.startswith("parent/")}
    assert checkpoint_values(run_dir) == clean


def test_a_learning_rate_that_really_diverges_is_caught_at_the_first_chunk(tmp_path, npz, capsys):
    status, _, err = _kerasntk(capsys, *_run(npz, tmp_path / "run", "train.lr=1e12"))
    assert status == 2
    assert "job parent failed: Diverged: parent: the training loss is not finite in steps 0-3" in _one_error_line(err)


def test_a_diverged_child_can_be_recorded_as_a_result(tmp_path, npz, clean_run, capsys, monkeypatch):
    run_dir = _copy(clean_run, tmp_path / "run")
    stored = json.loads((run_dir / "config.json").read_text())
    stored["spawn"]["diverged"] = "record"  # the same run, asked to keep diverged children
    (run_dir / "config.json").write_text(json.dumps(stored))
    shutil.rmtree(run_dir / "children/s00000004_c1")
    _remove(run_dir, "results/child_s00000004_c1.nc", "results/pair_s00000004.nc")
    monkeypatch.setenv("KERASNTK_FAULT_DIVERGE", "child/s00000004_c1")

    status, _, err = _kerasntk(capsys, *_run(npz, run_dir, "spawn.diverged=record"))
    assert status == 0, err
    assert "not finite" in json.loads((run_dir / "children/s00000004_c1/diverged.json").read_text())["reason"]
    ds, clean = results.load(run_dir / "results.nc"), results.load(clean_run[1] / "results.nc")
    child = ds.child.sel(time=0.5, spawn=1)
    assert child.sel(metric="diverged") == 1 and np.isnan(child.sel(metric="test_error"))
    assert np.isnan(ds.pair.sel(time=0.5)).all()  # its only pair
    others = dict(time=[0.0, 1.0], metric=clean.metric.values)  # the other spawn times, unchanged
    np.testing.assert_array_equal(ds.pair.sel(**others).values, clean.pair.sel(**others).values)
    np.testing.assert_array_equal(ds.child.sel(metric="test_error", time=0.5, spawn=0),
                                  clean.child.sel(metric="test_error", time=0.5, spawn=0))


def test_one_line_names_environment_faults_from_python_and_from_tensorflow():
    assert errors.one_line(OSError(errno.ENOENT, "No such file or directory", "/r/parent/.history.json.x.tmp")) == (
        "no such file or directory (/r/parent): it vanished while kerasntk ran (a removed or unmounted directory?): "
        "restore it, then run the same command again: it continues where it stopped")
    tf_message = ("{{function_node __wrapped__SaveV2_dtypes_2_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
                  "/r/parent/resume/.step_00000008.ab.tmp/ckpt_temp/part-00000.tempstate1; No space left on device "
                  "[Op:SaveV2]")
    assert errors.one_line(RuntimeError(tf_message)).startswith("no space left on device (/r/parent/resume): free space")
    assert errors.one_line(ValueError("two\n  lines")) == "two lines"
