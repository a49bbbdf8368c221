"""The job graph and its executors: the graph's shape, the progress line, the Ray executor on a real local
cluster (equal results, a killed worker retried), runs on a gs:// run directory (a local GCS emulator)."""


import numpy as np
import pytest

from kerasntk import config as cfg
from kerasntk import experiment, fs
from kerasntk.experiment import Grid, JobFailed, job_graph
from kerasntk.experiment.jobs import combine
from kerasntk.experiment.progress import Progress
from gcs import gcs_bucket, gcs_dir  # noqa: F401  (fixtures)
from helpers import result_arrays, tensorboard_runs, temporary_files, tiny


def test_job_graph_is_a_pure_function_of_config_and_grid(npz):
    config = cfg.load(None, tiny(npz))
    grid = Grid.from_config(config, steps_per_epoch=8)
    jobs = job_graph(config, grid)
    ids = [j.id for j in jobs]
    assert ids == ["parent", "measure_parent", "linearized/s00000000", "linearized/s00000008",
                   "child/s00000000_c0", "child/s00000000_c1", "pairs/s00000000",
                   "child/s00000004_c0", "child/s00000004_c1", "pairs/s00000004",
                   "child/s00000008_c0", "child/s00000008_c1", "pairs/s00000008", "merge", "report"]
    deps = {j.id: j.deps for j in jobs}
    assert deps["pairs/s00000004"] == ("child/s00000004_c0", "child/s00000004_c1")
    assert all(deps[i] == ("parent",) for i in ids if i.startswith(("child", "linearized", "measure")))
    assert set(deps["merge"]) == set(ids) - {"parent", "merge", "report"} and deps["report"] == ("merge",)
    for position, job in enumerate(jobs):  # topological: every dependency comes earlier
        assert set(job.deps) <= set(ids[:position])
    assert job_graph(config, grid) == jobs
    single = job_graph(cfg.load(None, tiny(npz, "spawn.children=1")), grid)
    assert not [j for j in single if j.kind == "pairs"]


def test_several_runs_combine_into_one_graph_with_their_parents_first(npz):
    """Two runs' graphs as one: ids prefixed by the run's name, dependencies within the run, every run's
    parent before any run's children, still topological; a single run keeps its ids."""
    config = cfg.load(None, tiny(npz))
    jobs = job_graph(config, Grid.from_config(config, steps_per_epoch=8))
    plan = combine({"seed0": jobs, "seed1": jobs})
    shown = [c.id for _, _, c in plan]
    assert shown[:4] == ["seed0/parent", "seed1/parent", "seed0/measure_parent", "seed1/measure_parent"]
    assert len(shown) == 2 * len(jobs) == len(set(shown))
    for position, (name, job, c) in enumerate(plan):
        assert c.id == f"{name}/{job.id}" and c.deps == tuple(f"{name}/{d}" for d in job.deps)
        assert set(c.deps) <= set(shown[:position])
    assert [(job, c) for _, job, c in combine({"only": jobs})] == [(job, job) for job in jobs]


def test_progress_line_counts_jobs_and_estimates_from_finished_ones(npz, capsys, monkeypatch):
    config = cfg.load(None, tiny(npz))
    jobs = job_graph(config, Grid.from_config(config, steps_per_epoch=8))
    now = [0.0]
    monkeypatch.setattr("kerasntk.experiment.progress.time.monotonic", lambda: now[0])
    progress = Progress(jobs, slots=2)
    progress.skipped(jobs[0])
    progress.started(jobs[1])
    assert progress.eta() is None  # nothing timed yet
    now[0] = 10.0
    progress.finished(jobs[1])  # measure_parent took 10 s
    now[0] = 12.0
    progress.started(jobs[2])
    now[0] = 30.0
    assert "2/15 done, 1 running, 12 queued, 0 failed | 30s elapsed" in progress.line()
    # 12 queued jobs of kinds not yet timed count 10 s each (the mean of all finished jobs), the running one
    # is past its expected 10 s (counts 0): 120 s of work on 2 slots
    assert progress.eta() == pytest.approx(60.0)
    out = capsys.readouterr().out
    assert "started measure_parent" in out and "done measure_parent (10s)" in out and "\r" not in out


# -- the Ray executor on a real local cluster ----------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster(gcs_bucket):
    """A local Ray cluster of 2 CPUs (Ray has no local mode): the executor's jobs run in its worker processes,
    which inherit the environment at start, the GCS emulator's included."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="error")
    yield ray
    ray.shutdown()


SMALL = ("spawn.times=[0.5]", "linearize.times=[1]")  # 6 jobs for the workers: each starts a fresh process


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, npz):
    """An uninterrupted local run of the tiny experiment with one spawn time and one linearization."""
    run_dir = tmp_path_factory.mktemp("small")
    experiment.run(cfg.load(None, tiny(npz, *SMALL)), str(run_dir), verbose=0)
    return run_dir


@pytest.mark.slow  # two small runs on the workers, ~1 min; the graph they share is tested above
def test_ray_runs_several_runs_as_one_graph(tmp_path, npz, small_run, ray_cluster, capsys):
    """Two runs on the cluster at once: the second run's parent starts before the first run's finishes, and each
    run's results equal the local run's exactly."""
    config = cfg.load(None, tiny(npz, *SMALL))
    experiment.run_all({"a": (config, str(tmp_path / "a")), "b": (config, str(tmp_path / "b"))}, executor="ray")
    events = [line.rsplit(" | ", 1)[-1] for line in capsys.readouterr().out.splitlines() if line.startswith("[kerasntk]")]
    first = {kind: min(i for i, e in enumerate(events) if e.startswith(kind)) for kind in
             ("started b/parent", "done a/parent", "done b/parent", "started a/merge")}
    assert first["started b/parent"] < first["done a/parent"]  # submitted together
    assert first["done b/parent"] < first["started a/merge"]  # and b's parent trained while a's jobs ran
    expected = result_arrays(small_run / "results.nc")
    for name in "ab":
        got = result_arrays(tmp_path / name / "results.nc")
        for variable in expected:
            np.testing.assert_array_equal(expected[variable], got[variable], err_msg=f"{name}: {variable}")


@pytest.mark.slow  # ~1 min; the gs:// killed-worker test covers a retried Ray worker in the default suite
def test_ray_retries_a_worker_killed_mid_training(tmp_path, npz, small_run, ray_cluster, monkeypatch):
    """Every job in its own Ray worker process, two at a time, and SIGKILL of the worker running child 0 of
    spawn step 4 at step 12 of 16 (mid-epoch, after its epoch-1 resume checkpoint at step 8): Ray retries the
    task, the child resumes at step 8, and results.nc equals the local run's exactly (training is
    deterministic on CPU and each job is a pure function of the run directory), no half-written file left."""
    once = tmp_path / "fired"
    for name, value in dict(POINT="child/s00000004_c0:step:12", SIGNAL="KILL", ONCE=str(once)).items():
        monkeypatch.setenv(f"KERASNTK_FAULT_{name}", value)
    run_dir = tmp_path / "killed"
    ds = experiment.run(cfg.load(None, tiny(npz, *SMALL)), str(run_dir), verbose=0, executor="ray")
    assert once.exists()  # the worker was killed
    a, b = result_arrays(small_run / "results.nc"), result_arrays(run_dir / "results.nc")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert ds.child.sel(metric="test_error").dropna("time", how="all").time.values.tolist() == [0.5]
    assert (run_dir / "figures" / "barrier_vs_spawn_time.png").exists()
    assert not temporary_files(run_dir)


def test_a_failing_job_stops_the_graph_with_one_line_and_keeps_what_finished(tmp_path, npz, ray_cluster):
    """A diverged parent (lr 1e6) is an error a retry cannot fix: the run stops at once naming the job
    and the cause; nothing downstream ran."""
    with pytest.raises(JobFailed, match=r"job parent failed: Diverged: parent: the training loss is not finite"):
        experiment.run(cfg.load(None, tiny(npz, "train.lr=1000000.0")), str(tmp_path), verbose=0, executor="ray")
    assert not (tmp_path / "results").exists()


def test_job_resources_the_cluster_lacks_are_refused_before_anything_runs(tmp_path, npz, ray_cluster):
    with pytest.raises(cfg.ConfigError, match=r'distribute.job_resources asks for \{"TPU": 4\}.*cluster has'):
        experiment.run(cfg.load(None, tiny(npz, 'distribute.job_resources={"TPU": 4}')), str(tmp_path),
                       verbose=0, executor="ray")
    assert not (tmp_path / "parent").exists()


def test_ray_on_a_gs_run_directory_with_a_killed_worker(gcs_dir, npz, small_run, ray_cluster, monkeypatch, tmp_path):
    """The same kill on a gs:// run directory (a local GCS emulator server shared by the driver and the
    workers): retried, equal results, no temporary object left in the bucket."""
    once = tmp_path / "fired"
    for name, value in dict(POINT="child/s00000004_c1:step:12", SIGNAL="KILL", ONCE=str(once)).items():
        monkeypatch.setenv(f"KERASNTK_FAULT_{name}", value)
    experiment.run(cfg.load(None, tiny(npz, *SMALL)), gcs_dir, verbose=0, executor="ray")
    assert once.exists()
    a, b = result_arrays(small_run / "results.nc"), result_arrays(fs.join(gcs_dir, "results.nc"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    import fsspec

    bucket, prefix = fsspec.core.url_to_fs(gcs_dir)
    objects = bucket.find(prefix)
    assert len(objects) > 30 and not [o for o in objects if ".tmp" in o]
    assert fs.exists(fs.join(gcs_dir, "figures", "barrier_vs_spawn_time.pdf"))


def test_every_verb_on_a_gs_run_directory_equals_kerasntk_run(gcs_dir, npz, clean_run):
    """train, ntk, linearize, spawn, job, merge and report, one command each, on gs:// (TensorFlow's own gs://
    support is not used: checkpoints are written locally and uploaded): the local run's results exactly."""
    from kerasntk import cli

    sets = [arg for item in tiny(npz) for arg in ("--set", item)]
    assert cli.main(["-q", "train", "--out", gcs_dir, *sets]) == 0
    assert cli.main(["-q", "ntk", gcs_dir]) == 0
    for t in ("0", "1ep"):
        assert cli.main(["-q", "linearize", gcs_dir, "--time", t]) == 0
    for t in ("0", "0.5", "8it"):
        for child in (1, 0):
            assert cli.main(["-q", "spawn", gcs_dir, "--time", t, "--child", str(child)]) == 0
    assert cli.main(["-q", "job", gcs_dir, "merge"]) == 0
    assert cli.main(["-q", "report", gcs_dir]) == 0
    assert fs.exists(fs.join(gcs_dir, "figures", "kernel_distance_matrix.png"))
    a, b = result_arrays(clean_run[1] / "results.nc"), result_arrays(fs.join(gcs_dir, "results.nc"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    with fs.local_dir(fs.join(gcs_dir, "tensorboard")) as board:  # event files uploaded through kerasntk.fs
        assert tensorboard_runs(board) == tensorboard_runs(clean_run[1] / "tensorboard")
