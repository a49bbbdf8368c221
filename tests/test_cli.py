"""The command line's own surface: help and version answer without loading TensorFlow."""

import subprocess
import sys

import pytest

import kerasntk

PROBE = """
import sys
from kerasntk import cli
try:
    cli.main([{arg!r}])
except SystemExit as done:
    code = done.code
heavy = sorted(m for m in ("tensorflow", "keras", "matplotlib", "xarray") if m in sys.modules)
print(code, heavy)
"""


@pytest.mark.parametrize("arg", ["--help", "--version"])
def test_help_and_version_import_no_tensorflow(arg):
    """Counted by the modules loaded, not by wall time: the answer must not wait for TensorFlow's import."""
    out = subprocess.run([sys.executable, "-c", PROBE.format(arg=arg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "0 []"
    if arg == "--version":
        assert f"kerasntk {kerasntk.__version__}" in out.stdout


@pytest.mark.parametrize("argv, quiet, verbose", [
    (["-q", "merge", "RUN"], True, False), (["merge", "RUN", "-q"], True, False), (["merge", "RUN"], False, False),
    (["-v", "run", "--dry-run"], False, True), (["run", "-v", "--dry-run"], False, True)])
def test_quiet_and_verbose_before_or_after_the_verb(argv, quiet, verbose):
    from kerasntk import cli

    args = cli.build_parser().parse_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


def _error_cases(tmp, npz):
    """(argv, what the one line must name) of every kind of bad input the CLI answers with exit status 2."""
    from kerasntk import config as cfg
    from kerasntk.rundir import RunDir
    from helpers import tiny

    RunDir(tmp / "run").prepare(cfg.load(None, tiny(npz)))
    (tmp / "empty").mkdir()
    return {
        "config error": (["train", "--out", str(tmp / "a"), "--set", "train.batch_size=0"], "train.batch_size"),
        "unprepared dataset": (["train", "--out", str(tmp / "b"), "--set", "data.name=cifar10",
                                "--set", f"data.data_dir={tmp / 'empty'}"], "tfds build cifar10"),
        "missing npz": (["train", "--out", str(tmp / "c"), "--set", "data.name=npz",
                         "--set", f"data.path={tmp / 'missing.npz'}"], "missing.npz"),
        "not a run directory": (["spawn", str(tmp / "empty"), "--time", "0", "--child", "0"],
                                "not a kerasntk run directory"),
        "spawn time off the grid": (["spawn", str(tmp / "run"), "--time", "0.3", "--child", "0"], "not a spawn time"),
        "report on a missing file": (["report", str(tmp / "missing.nc")], "missing.nc"),
        # "local" fails without the network (no TPU kernels here); a TPU name would first ask the GCE metadata
        # server, which takes a DNS timeout offline and then fails the same way (checked by hand)
        "unreachable TPU": (["run", "--out", str(tmp / "d"), "--set", "distribute.tpu=local"], "cannot reach TPU"),
    }


@pytest.mark.parametrize("case", ["config error", "unprepared dataset", "missing npz", "not a run directory",
                                  "spawn time off the grid", "report on a missing file",
                                  pytest.param("unreachable TPU", marks=pytest.mark.slow)])  # ~25 s: a subprocess
def test_bad_input_is_exit_status_2_and_one_error_line(case, tmp_path, npz, capsys):
    """The CLI's error contract. In this process (an escaping exception fails the test, as a traceback would
    show), except the TPU case: a TPU connection attempt changes TensorFlow's context, so a subprocess."""
    from kerasntk import cli

    argv, names = _error_cases(tmp_path, npz)[case]
    if case == "unreachable TPU":
        proc = subprocess.run([sys.executable, "-m", "kerasntk.cli", *argv], capture_output=True, text=True,
                              timeout=300)
        code, err = proc.returncode, proc.stderr
    else:
        code, err = cli.main(argv), capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kerasntk: error:")]
    assert code == 2 and "Traceback" not in err, err
    assert len(lines) == 1 and names in lines[0], err
    assert not [line for line in err.splitlines() if line.strip() and not line.startswith(("kerasntk: error:", "[kerasntk]"))
                and "WARNING" not in line and "I0000" not in line and "E0000" not in line], err


def test_a_log_file_gets_plain_lines_and_no_tensorflow_start_up_noise(tmp_path, npz):
    """`kerasntk train > log 2>&1` on the tiny config: plain epoch lines (the last epoch's always, others at most
    every 30 s), no carriage return or ANSI escape (Keras's progress bar is for terminals), none of TensorFlow's
    C++ start-up lines (without -v)."""
    from helpers import tiny

    sets = [arg for item in tiny(npz) for arg in ("--set", item)]
    with open(tmp_path / "log", "wb") as log:
        done = subprocess.run([sys.executable, "-m", "kerasntk", "train", *sets, "--out", str(tmp_path / "run")],
                              stdout=log, stderr=subprocess.STDOUT, timeout=600, cwd=tmp_path)
    text = (tmp_path / "log").read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and "\x1b" not in text
    epochs = [line.split(":")[0] for line in text.splitlines() if line.startswith("epoch ")]
    assert epochs[-1] == "epoch 2/2" and set(epochs) <= {"epoch 1/2", "epoch 2/2"} and len(set(epochs)) == len(epochs)
    noise = [line for line in text.splitlines() if line[:5] in ("I0000", "E0000", "W0000")
             or any(mark in line for mark in ("absl::InitializeLog", "oneDNN", "cuInit"))]
    assert not noise, noise
