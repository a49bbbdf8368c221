"""The spawning experiment end to end on a tiny problem: schema, metric contract, reruns, dry runs (kills and
reruns: test_kill_points.py)."""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
import xarray as xr

from kerasntk import config as cfg
from kerasntk import experiment
from kerasntk.rundir import RunDir
from helpers import tiny, write_tfds_metadata

CONTRACT = {  # metric names other tools rely on (issue 3's CLI contract)
    "parent": ["test_error", "test_loss", "train_error", "kernel_velocity", "kernel_distance_from_init",
               "kernel_alignment", "linearized_test_error", "linearized_test_loss"],
    "child": ["test_error", "test_loss"],
    "pair": ["error_barrier", "loss_barrier", "train_error_barrier", "disagreement", "js_divergence",
             "weight_distance", "kernel_distance"],
}


def test_run_writes_the_schema_and_the_metric_contract(clean_run, npz):
    ds, run_dir = clean_run
    on_disk = xr.open_dataset(run_dir / "results.nc")
    assert {"time", "spawn", "metric"} <= set(on_disk.dims)
    assert on_disk.parent.dims == ("time", "metric") and on_disk.child.dims == ("time", "spawn", "metric")
    for variable, names in CONTRACT.items():
        missing = set(names) - set(on_disk[variable].dropna("metric", how="all").metric.values)
        assert not missing, f"{variable} lacks {missing}"
    spawn_times = [0.0, 0.5, 1.0]
    child_error = ds.child.sel(metric="test_error").sel(time=spawn_times)
    assert child_error.notnull().all() and ((0 <= child_error) & (child_error <= 1)).all()
    barrier = ds.pair.sel(metric="error_barrier", time=spawn_times)
    assert barrier.notnull().all()
    assert ds.path.sel(metric="test_error").dropna("time", how="all").sizes["alpha"] == 5
    k0, kt = (np.load(p) for p in sorted((run_dir / "parent" / "kernels").glob("step_????????.npy"))[::len(ds.time) - 1])
    naive = 1 - np.sum(k0 * kt) / np.sqrt(np.sum(k0 * k0) * np.sum(kt * kt))  # S(K_0, K_T) from the cached kernels
    assert ds.kernel_distance.values[0, -1] == pytest.approx(naive, rel=1e-9) and naive > 1e-4
    linearized = ds.parent.sel(metric="linearized_test_error")
    assert linearized.sel(time=[0.0, 1.0]).notnull().all() and linearized.notnull().sum() == 2
    assert "config" in on_disk.attrs and cfg.from_dict(__import__("json").loads(on_disk.attrs["config"])) == cfg.load(None, tiny(npz))


def test_rerun_of_a_finished_run_skips_every_job(npz, clean_run):
    run_dir = clean_run[1]
    files = [p for p in run_dir.rglob("*") if p.is_file() and "figures" not in p.parts and not p.name.startswith("results.nc")]
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}
    experiment.run(cfg.load(None, tiny(npz)), str(run_dir), verbose=0)  # only merge and report run again
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files} == stamps


def test_run_dir_with_another_config_is_refused_but_machine_fields_may_differ(tmp_path, npz):
    config = cfg.load(None, tiny(npz))
    RunDir(tmp_path).prepare(config)
    with pytest.raises(cfg.ConfigError, match="different config"):
        RunDir(tmp_path).prepare(cfg.load(None, tiny(npz, "train.lr=0.2")))
    elsewhere = cfg.load(None, tiny(npz, "data.data_dir=/mnt/other", "distribute.tpu=local"))
    assert elsewhere.digest() == config.digest()  # same run name on every machine
    RunDir(tmp_path).prepare(elsewhere)
    assert RunDir(tmp_path).load_config(["distribute.tpu=local"]).distribute.tpu == "local"
    with pytest.raises(cfg.ConfigError, match="only this machine's fields may be set: data.data_dir"):
        RunDir(tmp_path).load_config(["train.lr=0.2"])


def test_paper_config_dry_run_on_mock_cifar10(tmp_path, capsys):
    """The paper config builds its model, data pipeline (mock CIFAR-10) and grids without training."""
    from kerasntk import cli

    write_tfds_metadata(tmp_path, "cifar10", n_train=256, n_test=64)
    small = ["ntk.probe_size=100", "hessian.subset_size=200"]  # within the 256 mock training images
    config = cfg.load("configs/cifar10_resnet20.yaml", [f"data.data_dir={tmp_path}", *small])
    with tfds.testing.mock_data(num_examples=256, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)):
        ex = experiment.Experiment(config, str(tmp_path / "run"), verbose=0)
    plan = ex.plan()
    assert ex.arrays.input_shape == (32, 32, 3) and ex.arrays.augment == "pad_crop_flip"
    assert "resnet20: 27" in plan["model"]  # ResNet-20 with BatchNorm: ~0.27M parameters
    assert plan["spawn_times"][0] == 0 and plan["child_jobs"] == 3 * len(plan["spawn_times"])
    assert plan["checkpoints"][-1] == 200
    assert plan["batchnorm"] == "the batch of 128 (one replica)"
    with tfds.testing.mock_data(num_examples=256, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)):
        assert cli.main(["run", "configs/cifar10_resnet20.yaml", "--set", f"data.data_dir={tmp_path}",
                         "--set", small[0], "--set", small[1], "--out", str(tmp_path / "cli_run"), "--dry-run"]) == 0
    assert "child_jobs" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "cli_run")  # a dry run writes nothing


def test_readme_python_api_config_is_valid(tmp_path):
    """The config of the README's Python API example passes validation against the real data (a dry run)."""
    import re

    import kerasntk as kn

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    call = re.search(r"config = (kn\.config\.load\(None, \[.*\]\))", readme).group(1)
    plan = experiment.Experiment(eval(call, {"kn": kn}), str(tmp_path), verbose=0).plan()
    assert plan["checkpoints"][-1] == 10 and plan["child_jobs"] == 15


def test_spawn_cli_rejects_a_time_off_the_grid(tmp_path, npz):
    config = cfg.load(None, tiny(npz))
    RunDir(tmp_path).prepare(config)
    result = subprocess.run([sys.executable, "-m", "kerasntk.cli", "spawn", str(tmp_path), "--time", "0.3",
                             "--child", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "not a spawn time" in result.stderr and "Traceback" not in result.stderr
