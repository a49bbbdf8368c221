"""SIGKILL at named points (`kerasntk.faults`, no polling) of every kind of job, then a rerun: every checkpoint and
every result bitwise equal to an uninterrupted run, and what was finished before the kill reused, judged by inode
(a file written again is a new inode under `fs.atomic_file`'s rename). The kills are real: `kerasntk run` (or
`train`) in a subprocess signalling itself; the last rerun runs in this process."""

import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest

from kerasntk import config as cfg
from kerasntk import experiment, faults
from kerasntk.rundir import JobDir
from helpers import checkpoint_values, result_arrays, synthetic_arrays, tiny, write_npz


def _cli(verb, out, overrides):
    args = [sys.executable, "-m", "kerasntk.cli", "-q", verb, "--out", str(out)]
    for item in overrides:
        args += ["--set", item]
    return args


def _killed(verb, out, overrides, point, sig="KILL"):
    """Run `kerasntk VERB` until KERASNTK_FAULT_POINT=`point` sends it signal `sig` (KILL, or TERM: a preemption)."""
    env = dict(os.environ, KERASNTK_FAULT_POINT=point, KERASNTK_FAULT_SIGNAL=sig)
    proc = subprocess.run(_cli(verb, out, overrides), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == {"KILL": -signal.SIGKILL, "TERM": 143}[sig], \
        f"{point}: exit {proc.returncode}\n{proc.stderr[-3000:]}"


def _inodes(root):
    """{path under `root`: inode} of every file."""
    return {str(p.relative_to(root)): p.stat().st_ino for p in pathlib.Path(root).rglob("*") if p.is_file()}


def _matches(root, patterns):
    return {pattern: len(list(pathlib.Path(root).glob(pattern))) for pattern in patterns}


def _assert_reused(before, now, rewritten, when):
    """Every file in `before` ({path: inode}) is still there as the same file, except those under the prefixes
    `rewritten` (a killed trainer's own state: it trains on)."""
    again = sorted(p for p, inode in before.items() if now.get(p) != inode and not p.startswith(rewritten))
    assert not again, f"{when}: written again or removed: {again}"


def _kill_in_turn(run, overrides, chain):
    """One `kerasntk run` process per entry of `chain`, killed at its point; each one must reuse what the one
    before left and stop where its entry says. Returns (inodes after the last kill, what the next run may rewrite)."""
    kept, rewritten = {}, ()
    for point, sig, there, not_yet, trains_on in chain:
        _killed("run", run, overrides, point, sig)
        now = _inodes(run)
        _assert_reused(kept, now, rewritten, f"after the kill at {point}")
        assert all(_matches(run, there).values()), (point, _matches(run, there))
        assert not any(_matches(run, not_yet).values()), (point, _matches(run, not_yet))
        kept, rewritten = now, trains_on
    assert not (run / "results.nc").exists()
    return kept, rewritten


def _assert_equal_runs(clean, rerun):
    assert checkpoint_values(rerun) == checkpoint_values(clean)
    a, b = result_arrays(clean / "results.nc"), result_arrays(rerun / "results.nc")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _state(job_dir):
    """A trainer's state in `job_dir` (under the run directory): what a rerun after killing it rewrites."""
    return f"{job_dir}/resume/", f"{job_dir}/history.json"


# The tiny run's jobs in order: parent, measure_parent, linearized/s0 and /s8 (1 epoch of 3 steps each), then per
# spawn step 0, 4, 8 two children and their pairs; grid checkpoints at steps 0, 3, 4, 7, 8, 11, 16 (8 per epoch).
CHAIN = [  # (kill point, signal, files there after the kill, files not there yet, what the next run may rewrite)
    ("measure_parent:kernels:2", "KILL",  # kernels of checkpoints 0 and 3 cached, the parent's result not written
     ["parent/checkpoints/step_00000016/meta.json", "parent/kernels/step_00000003_layers.npy.sha256"],
     ["parent/kernels/step_00000004.npy", "results/parent.nc"], ()),
    ("linearized/s00000000:epoch:1", "KILL",  # its (last) epoch-1 checkpoint saved, its result not written
     ["results/parent.nc", "linearized/s00000000/resume/*/meta.json"], ["results/linearized_s00000000.nc"], ()),
    ("pairs/s00000000:pair:1", "KILL",  # its one pair compared: the job keeps nothing until its result
     ["results/linearized_s00000008.nc", "results/child_s00000000_c1.nc"], ["results/pair_s00000000.nc"], ()),
    ("child/s00000004_c1:step:12", "KILL",  # mid-epoch (8 steps per epoch), a chunk boundary of steps_per_execution=4
     ["results/pair_s00000000.nc", "children/s00000004_c1/resume/step_00000008/meta.json"],
     ["results/child_s00000004_c1.nc", "children/s00000004_c1/checkpoints/*"], _state("children/s00000004_c1")),
]


def test_kills_inside_measurements_kernel_learning_pairs_and_a_child_then_rerun_equal_the_clean_run(tmp_path, npz, clean_run):
    """Four processes, each killed at one point of the tiny run; each next process reuses every file the one
    before left (same inodes: the cached kernels, the linearized job's epoch checkpoint, finished jobs), and
    the final rerun (in this process) ends with the uninterrupted run's checkpoints and results. The killed
    child's trainer state (resume checkpoint, history) is the one thing rewritten: it trains on."""
    run = tmp_path / "killed"
    kept, rewritten = _kill_in_turn(run, tiny(npz), CHAIN)
    experiment.run(cfg.load(None, tiny(npz)), str(run), verbose=0)
    _assert_reused(kept, _inodes(run), rewritten, "after the last rerun")
    _assert_equal_runs(clean_run[1], run)


# -- the parent mid-epoch: steps_per_execution 3, augmentation, BatchNorm ----------------------------------------

BN = ["data.augment=true", "model.name=cnn", 'model.options={"channels": 4, "conv_layers": 2, "batchnorm": true}',
      "train.batch_size=16", "train.steps_per_execution=3", "checkpoints.times=[0.5]", "spawn.times=[]",
      "linearize.times=[]"]  # over the tiny run's settings


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """128 train / 32 test synthetic 8x8 one-channel images of 4 classes (pad-crop-flip needs images)."""
    path = tmp_path_factory.mktemp("images") / "images.npz"
    return write_npz(path, synthetic_arrays(n_train=128, n_test=32, shape=(8, 8, 1), classes=4))


def _history(job_dir):
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in JobDir(job_dir).read_history()]


def test_parent_killed_mid_epoch_with_chunks_augmentation_and_batchnorm_resumes_bitwise(tmp_path, images):
    """`kerasntk train` of a BatchNorm CNN with pad-crop-flip, 8 steps per epoch in chunks of at most 3 between
    grid checkpoints (0-3-4-7-8-11-14-16), killed after step 14: it resumes from the mid-epoch grid checkpoint at
    step 11 (epoch 1's partial sums, the BatchNorm moving statistics, the augmentation's batch position), replays
    steps 11-14 and ends bitwise equal to an uninterrupted parent with the same history; the checkpoints before
    the kill are not written again."""
    config = tiny(images, *BN)
    clean, run = tmp_path / "clean", tmp_path / "killed"
    experiment.Experiment(cfg.load(None, config), str(clean), verbose=0).run_job("parent")
    _killed("train", run, config, "parent:step:14")
    parent = JobDir(run / "parent")
    assert parent.checkpoint_steps() == [0, 3, 4, 7, 8, 11] and parent.checkpoint_steps("resume") == [8]
    meta = parent.meta(11)
    assert (meta["epoch"], meta["batch"], meta["epoch_totals"][2]) == (1, 3, 3 * 16)  # resumed mid-epoch
    before = _inodes(run)
    experiment.Experiment(cfg.load(None, config), str(run), verbose=0).run_job("parent")
    _assert_reused(before, _inodes(run), _state("parent"), "after the rerun")
    assert checkpoint_values(run) == checkpoint_values(clean) and len(checkpoint_values(clean)) == 7
    assert _history(run / "parent") == _history(clean / "parent") and len(_history(clean / "parent")) == 2


BN_RUN = [*BN, "spawn.times=[0.5]", "linearize.times=[1]", "linearize.length=2ep"]
BN_CHAIN = [  # steps: 8 per epoch, grid 0, 3, 4, 7, 8, 11, 16; children spawned at 4; kernel learning from 8
    ("parent:step:14", "KILL", ["parent/checkpoints/step_00000011/meta.json"], ["parent/checkpoints/step_00000016"],
     _state("parent")),
    ("linearized/s00000008:epoch:1", "KILL",  # after epoch 1 of 2
     ["results/parent.nc", "linearized/s00000008/resume/*/meta.json"], ["results/linearized_s00000008.nc"],
     _state("linearized/s00000008")),
    ("child/s00000004_c0:step:9", "TERM",  # preempted: a resume checkpoint at the end of the chunk 8-11, mid-epoch
     ["results/linearized_s00000008.nc", "children/s00000004_c0/resume/step_00000011/meta.json"],
     ["results/child_s00000004_c0.nc"], _state("children/s00000004_c0")),
    ("pairs/s00000004:pair:1", "KILL", ["results/child_s00000004_c1.nc"], ["results/pair_s00000004.nc"], ()),
]


@pytest.mark.slow  # ~100 s: a whole BatchNorm run uninterrupted, then four killed processes and a rerun
def test_a_batchnorm_run_with_augmentation_killed_in_every_kind_of_job_equals_the_clean_run(tmp_path, images):
    """The BatchNorm CNN with pad-crop-flip and chunks of 3 through the whole experiment: the parent killed
    mid-epoch, kernel learning killed after epoch 1 of 2, a child preempted (SIGTERM) mid-epoch, the pairs
    killed; the rerun ends with every checkpoint and result bitwise equal to an uninterrupted run."""
    config = tiny(images, *BN_RUN)
    clean, run = tmp_path / "clean", tmp_path / "killed"
    experiment.run(cfg.load(None, config), str(clean), verbose=0)
    kept, rewritten = _kill_in_turn(run, config, BN_CHAIN)
    experiment.run(cfg.load(None, config), str(run), verbose=0)
    _assert_reused(kept, _inodes(run), rewritten, "after the last rerun")
    _assert_equal_runs(clean, run)


# -- the hook itself ---------------------------------------------------------------------------------------------

def test_a_fault_point_fires_once_at_its_job_point_and_count(monkeypatch):
    fired = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: fired.append(1))
    try:
        monkeypatch.setenv("KERASNTK_FAULT_SIGNAL", "USR1")
        monkeypatch.setenv("KERASNTK_FAULT_POINT", "pairs/s00000004:pair:2")
        faults.at("pairs/s00000004", "pair", 1)  # before the count
        faults.at("pairs/s00000008", "pair", 2)  # another job
        faults.at("pairs/s00000004", "kernels", 2)  # another point
        assert not fired
        faults.at("pairs/s00000004", "pair", 3)  # the first call at or past the count
        faults.at("pairs/s00000004", "pair", 4)  # once per process
        assert fired == [1]
        monkeypatch.setenv("KERASNTK_FAULT_POINT", "measure_parent:kernels")  # the count defaults to 1
        faults.at("measure_parent", "kernels", 1)
        assert fired == [1, 1]
        monkeypatch.setenv("KERASNTK_FAULT_POINT", "parent:step:seven")
        with pytest.raises(ValueError, match=r"KERASNTK_FAULT_POINT='parent:step:seven' is not allowed; allowed: job:point"):
            faults.at("parent", "step", 7)
        monkeypatch.setenv("KERASNTK_FAULT_POINT", "parent:setp:7")  # a misspelt point would never fire
        with pytest.raises(ValueError, match="with a point of step, kernels, epoch, pair"):
            faults.at("parent", "step", 7)
    finally:
        signal.signal(signal.SIGUSR1, previous)
