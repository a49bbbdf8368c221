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
