"""The README's code blocks, executed: Python blocks run (on the suite's tiny run where they read a run), every
`kerasntk` command of the shell blocks parses; what needs a TPU, the network or a long run is marked."""

import os
import re
import shlex

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", README, re.S)


def _block(language, marker):
    """The one block of `language` containing `marker`."""
    found = [code for lang, code in BLOCKS if lang == language and marker in code]
    assert len(found) == 1, f"{len(found)} {language} blocks contain {marker!r}"
    return found[0]


def test_every_block_is_covered_here():
    markers = {"python": ["xr.open_dataset", "results.by_metric", "kn.load_model", "kn.config.load", "SpawnCheckpoint"],
               "bash": ["pip install -e . && kerasntk run", "tensorboard --logdir", "ray start --head",
                        'pip install -e ".[tpu]"']}
    assert sorted((lang, m) for lang, ms in markers.items() for m in ms for code in [_block(lang, m)]) and \
        len(BLOCKS) == sum(map(len, markers.values()))


def test_results_blocks_run_on_the_suites_run(clean_run):
    """As written but for the run's path and a requested time of the tiny grid (0.5 epoch, not 0.25)."""
    run_dir = str(clean_run[1])
    first = _block("python", "xr.open_dataset").replace("runs/<run>", run_dir).replace("requested_time=0.25",
                                                                                      "requested_time=0.5")
    second = _block("python", "results.by_metric").replace('"runs/a"', repr(run_dir)).replace(
        '"runs/b/results.nc"', repr(os.path.join(run_dir, "results.nc")))
    scope = {}
    exec(first, scope)
    assert scope["ds"].sizes["time"] > 0
    exec(second, scope)
    assert scope["runs"].sizes["run"] == 2


def test_models_from_runs_block_runs_on_the_suites_run(clean_run):
    """As written but for the run's path: the tiny run has a checkpoint at epoch 2 and a spawn time 0.5."""
    scope = {}
    exec(_block("python", "kn.load_model").replace("runs/<run>", str(clean_run[1])), scope)
    assert scope["parent"].count_params() == scope["child"].count_params() > 0


def test_tensorboard_block_points_at_what_a_run_writes(clean_run):
    """`tensorboard --logdir runs/<run>/tensorboard` (a server: not started here) names a directory a run fills."""
    logdir = _block("bash", "tensorboard --logdir").split("--logdir", 1)[1].split()[0]
    assert os.listdir(logdir.replace("runs/<run>", str(clean_run[1])))


def test_callbacks_block_runs_as_written(tmp_path, monkeypatch):
    """In an empty directory, exactly as written: the sibling's weights, the three files and the run directory."""
    monkeypatch.chdir(tmp_path)
    exec(_block("python", "SpawnCheckpoint"), {})
    assert {"sibling.weights.h5", "ntk.nc", "landscape.nc", "my_run"} <= set(os.listdir(tmp_path))
    assert "step_00000320" in os.listdir(tmp_path / "my_run" / "parent" / "checkpoints")  # the end: 4 x 80 steps


@pytest.mark.slow
def test_python_api_block_runs(tmp_path, monkeypatch):
    """A 10-epoch experiment, ResNet-20 kernels and Hessian-vector products on 1000 examples: slow. The names the block leaves to the reader (x1, K1, K2, y,
    x_train, y_train, x_test, y_test, w, w0, K_0, K_1, Ks_0, Ks_1, times) are defined first, small."""
    import numpy as np

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(4, 4))
    prelude = dict(x1=rng.normal(size=(4, 32, 32, 3)).astype("float32"), K1=kernel @ kernel.T, K2=np.eye(4),
                   y=np.array([0, 1, 2, 3]), x_train=rng.normal(size=(1000, 32, 32, 3)).astype("float32"),
                   y_train=np.arange(1000) % 10, times=[0.0, 1.0])
    prelude.update(x_test=prelude["x_train"][:16], y_test=prelude["y_train"][:16])
    from kerasntk import models

    resnet = models.get("resnet20", input_shape=(32, 32, 3), num_classes=10)
    prelude.update(w=resnet.get_weights(), w0=resnet.get_weights())  # another initialisation of the block's model
    prelude.update(K_0=prelude["K1"], K_1=prelude["K1"] + np.eye(4))
    code = _block("python", "kn.config.load")
    setup, _, rest = code.partition("layers = ")
    scope = dict(prelude)
    exec(setup, scope)
    scope["Ks_0"] = scope["Ks_1"] = None
    rest = "layers = " + rest
    per_layer, _, tail = rest.partition("kn.ntk.layer_trajectory_metrics")
    exec(per_layer, scope)
    scope["Ks_0"], scope["Ks_1"] = scope["Ks"], scope["Ks"]
    exec("kn.ntk.layer_trajectory_metrics" + tail, scope)
    assert scope["ds"].sizes["time"] > 0


@pytest.mark.parametrize("marker, needs", [("pip install -e . && kerasntk run", "the network (pip) and ~5 min"),
                                           ("ray start --head", "Cloud TPU VMs, a Ray cluster and a gs:// bucket"),
                                           ('pip install -e ".[tpu]"', "a Cloud TPU VM and the network")])
def test_shell_blocks_commands_parse(marker, needs):
    """Each `kerasntk` command of a shell block is accepted by the CLI's parser (verbs and flags exist); running
    the block needs {needs}, so it is not run here."""
    from kerasntk import cli

    code = _block("bash", marker).replace("\\\n", " ")
    commands = [part.strip() for line in code.splitlines() for part in line.split("#")[0].split("&&")]
    kerasntk = [shlex.split(c)[1:] for c in commands if c.startswith("kerasntk ")]
    assert kerasntk, f"no kerasntk command in the block needing {needs}"
    for argv in kerasntk:
        cli.build_parser().parse_args(argv)
