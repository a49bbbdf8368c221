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
