"""The Colab notebooks, executed headless on CPU with tiny parameters through papermill: any cell error fails.

papermill injects the parameters as users would pass them (`papermill NB OUT -p NAME VALUE`): a cell tagged
`injected-parameters` after the cell tagged `parameters`. The TPU notebook reads CIFAR-10 from
tensorflow-datasets' mock data: an IPython startup file in the kernel's IPYTHONDIR enters
`tfds.testing.mock_data` before the first cell, so the notebook itself runs unchanged (and falls back from
TPU to the CPU, since this machine has none).
"""

import ast
import json
import os
import textwrap
from pathlib import Path
from unittest import mock

import nbformat
import papermill
import pytest

from helpers import write_tfds_metadata  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = ("01_quickstart", "02_paper_cifar10_resnet20_tpu", "03_analyze_results")

# The paper config on 256 mock CIFAR-10 images. ResNet-8 (depth=8: the same BatchNorm residual blocks as
# ResNet-20, one per stage) keeps the seven training jobs under a minute on a loaded 2-core CPU.
MOCK_TRAIN, MOCK_TEST = 256, 64
PAPER_TINY = ["model.options={batchnorm: true, width: 1, depth: 8}", "train.length=1ep", "train.batch_size=32",
              "train.milestones=[]", "checkpoints.log_num=0", "checkpoints.every=null", "spawn.times=[0, 0.5, 1]",
              "spawn.children=2", "ntk.probe_size=10", "landscape.alphas=3", "landscape.train_examples=64",
              "landscape.bn_examples=64", "linearize.times=[0]", "linearize.length=1ep", "linearize.batch_size=32",
              "linearize.validation_examples=32", "hessian.subset_size=64", "hessian.lanczos_steps=4", "hessian.probes=2"]


def execute(name, workdir, env=None, **parameters):
    """Run notebook `name` through papermill in `workdir` with `parameters` (the executed copy is kept there for
    debugging); raises papermill's PapermillExecutionError if a cell fails."""
    kernel_env = {"KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    with mock.patch.dict(os.environ, kernel_env):  # the kernel starts with this process's environment
        return papermill.execute_notebook(str(COLAB / f"{name}.ipynb"), str(workdir / f"{name}.executed.ipynb"),
                                          parameters=parameters, cwd=str(workdir), kernel_name="python3",
                                          execution_timeout=600, progress_bar=False)


def outputs(nb, output_type):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == output_type]


def mock_cifar10_kernel(root):
    """A prepared-looking TFDS directory and an IPYTHONDIR whose startup file serves mock CIFAR-10 from it."""
    data_dir = root / "tensorflow_datasets"
    write_tfds_metadata(data_dir, "cifar10", n_train=MOCK_TRAIN, n_test=MOCK_TEST)
    startup = root / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-mock-cifar10.py").write_text(textwrap.dedent(f"""
        import tensorflow_datasets as tfds
        _mock = tfds.testing.mock_data(num_examples={MOCK_TRAIN}, policy=tfds.testing.MockPolicy.USE_FILES,
                                       data_dir={str(data_dir)!r})
        _mock.__enter__()  # active for the kernel's lifetime
    """))
    return data_dir, {"IPYTHONDIR": str(root / "ipython")}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart notebook executed on a tiny mnist1d run: (executed notebook, run directory)."""
    work = tmp_path_factory.mktemp("quickstart")
    nb = execute("01_quickstart", work, TINY=True, RUN_DIR="runs/quickstart")  # ~20 s
    return nb, work / "runs" / "quickstart"


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """The TPU notebook executed on CPU with mock CIFAR-10 and a tiny config: (executed notebook, run directory)."""
    work = tmp_path_factory.mktemp("paper")
    data_dir, env = mock_cifar10_kernel(work)
    run_dir = work / "run"
    nb = execute("02_paper_cifar10_resnet20_tpu", work, env=env, REPO_DIR=str(REPO), RUN_DIR=str(run_dir),
                 DATA_DIR=str(data_dir), OVERRIDES=PAPER_TINY)
    return nb, run_dir


def test_every_notebook_has_a_parameters_cell_and_no_outputs():
    for name in NOTEBOOKS:
        nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        tags = [c.metadata.get("tags", []) for c in nb.cells]
        assert sum("parameters" in t for t in tags) == 1, name
        assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), f"{name} is committed with outputs"
        assert f"colab.research.google.com/github/kerasntk-dev/kerasntk/blob/main/colab/{name}.ipynb" in nb.cells[0].source


def test_papermill_reads_every_parameter_with_its_default():
    """`papermill --help-notebook` lists every assignment of the parameters cell (one per line, no tuples)."""
    for name in NOTEBOOKS:
        path = COLAB / f"{name}.ipynb"
        cell = next(c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
        statements = ast.parse(cell.source).body
        assert all(isinstance(s, ast.Assign) and len(s.targets) == 1 and isinstance(s.targets[0], ast.Name)
                   for s in statements), f"{name}: the parameters cell may hold only `NAME = value` lines"
        assigned = {s.targets[0].id: ast.literal_eval(s.value) for s in statements}
        inferred = papermill.inspect_notebook(str(path))
        assert {k: ast.literal_eval(p["default"]) for k, p in inferred.items()} == assigned, name


def test_quickstart_runs_the_experiment_and_shows_results(quickstart):
    nb, run_dir = quickstart
    import xarray as xr

    ds = xr.load_dataset(run_dir / "results.nc")
    assert {"parent", "child", "pair", "path", "correlation"} <= set(ds.data_vars)
    # spawn times 0, ~0.25, 0.5 (on steps), the end, and the t + 0.4 epoch partners of the first three
    assert ds.sizes["spawn"] == 2 and ds.sizes["time"] == 7
    assert (run_dir / "figures" / "barrier_vs_spawn_time.png").exists()
    assert len([o for o in outputs(nb, "display_data") if "image/png" in o.data]) >= 5  # figures and plots shown
    assert ds.parent.sel(metric="hessian_top_eigenvalue").notnull().all()  # every checkpoint: the sharpness section
    shown = [c for c in nb.cells if c.cell_type == "code" and '"layer_kernel_velocity"' in c.source]
    assert len([o for o in shown[0].outputs if "image/png" in o.get("data", {})]) == 2
    assert json.loads(ds.attrs["config"])["spawn"]["times"] == [0, 0.25, 0.5]


@pytest.mark.slow  # ~2 min: the paper notebook's whole experiment (ResNet-20) on mock CIFAR-10
def test_tpu_notebook_falls_back_to_cpu_and_runs_every_job(paper):
    nb, run_dir = paper
    import xarray as xr

    printed = "".join(o.get("text", "") for o in outputs(nb, "stream"))
    assert "no TPU on this machine" in printed and "_DefaultDistributionStrategy with 1 replica(s)" in printed
    assert "TPU target      none (GPUs or the CPU)" in printed and "no problems found" in printed  # the doctor cell
    assert "12/12 jobs done; missing: []" in printed  # parent, measure_parent, linearized, 3 × (2 children + pairs)
    ds = xr.load_dataset(run_dir / "results.nc")
    stored = json.loads(ds.attrs["config"])
    assert stored["data"]["name"] == "cifar10" and stored["model"]["name"] == "resnet20"
    assert ds.sizes["spawn"] == 2 and ds.pair.sel(metric="error_barrier").notnull().sum() == 3
    assert ds.parent.sel(metric="linearized_test_error").notnull().sum() == 1
    assert (run_dir / "figures" / "kernel_dynamics.png").exists()


@pytest.mark.slow  # needs the run above
def test_tpu_notebook_rerun_resumes_without_training(paper, tmp_path):
    """A second execution (after a runtime reset) finds every job done and only merges and reports."""
    nb, run_dir = paper
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "results").glob("*.nc")}
    work = run_dir.parent
    data_dir, env = work / "tensorflow_datasets", {"IPYTHONDIR": str(work / "ipython")}
    again = execute("02_paper_cifar10_resnet20_tpu", tmp_path, env=env, REPO_DIR=str(REPO), RUN_DIR=str(run_dir),
                    DATA_DIR=str(data_dir), OVERRIDES=PAPER_TINY)
    printed = "".join(o.get("text", "") for o in outputs(again, "stream"))
    assert "training to" not in printed and "linearized network from" not in printed  # no job trained again
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "results").glob("*.nc")} == before


@pytest.mark.slow  # a kernel and the doctor's TensorFlow import: 7-25 s here
def test_tpu_notebook_stops_with_the_doctors_diagnosis_when_the_tpu_is_unusable(tmp_path):
    """Asked for this VM's TPU on a machine without one, the doctor cell stops the notebook before any work."""
    with pytest.raises(nbclient.exceptions.CellExecutionError) as stopped:
        execute("02_paper_cifar10_resnet20_tpu", tmp_path, REPO_DIR=str(REPO), RUN_DIR=str(tmp_path / "run"),
                DATA_DIR=str(tmp_path / "tensorflow_datasets"), TPU="local")
    assert "stopped: this runtime cannot run the notebook as asked" in str(stopped.value)
    assert ("kerasntk doctor: error: TPU 'local' asked for, but this machine has no TPU device files"
            in str(stopped.value))
    assert not (tmp_path / "run").exists() and not (tmp_path / "tensorflow_datasets").exists()


def test_analysis_compares_two_runs(quickstart, clean_run, tmp_path):
    """The quickstart's mnist1d run beside the suite's run of the tiny .npz data (another time grid)."""
    (_, mnist_run), (_, tiny_run) = quickstart, clean_run
    nb = execute("03_analyze_results", tmp_path, RUN_DIRS={"mnist1d": str(mnist_run), "tiny": str(tiny_run / "results.nc")})
    html = "".join(o.data.get("text/html", "") for o in outputs(nb, "execute_result"))
    assert "mnist1d" in html and "tiny" in html
    printed = "".join(o.get("text", "") for o in outputs(nb, "stream"))
    assert "mnist1d: mnist1d / cnn1d, 7 times" in printed and "tiny: npz / cnn1d, 7 times" in printed
