"""Strategy selection: an explicitly requested TPU must be reached or fail loudly; probing falls back quietly
(with a warning) to the default, also on a (fake) TPU VM and for a TPU name that cannot be resolved."""

import subprocess
import sys

# In a subprocess: a TPU connection attempt may change the TensorFlow context of the test process.
PROBE = """
import logging, os, sys
os.environ.pop("TPU_NAME", None); os.environ.pop("COLAB_TPU_ADDR", None)
from kerasntk import distribute
logging.basicConfig(format="logged: %(message)s", stream=sys.stdout)
for tpu in ("", "local"):
    try:
        distribute.get_strategy(tpu)
        print("no error for", repr(tpu))
    except RuntimeError as err:
        print("error:", str(err).splitlines()[0])
print("probe:", type(distribute.get_strategy()).__name__)
os.environ[distribute.DEVICE_ROOT_VAR] = sys.argv[1]  # device files of a TPU VM, without its TPU
print("probe on a TPU VM:", type(distribute.get_strategy()).__name__)
os.environ.pop(distribute.DEVICE_ROOT_VAR)
os.environ["TPU_NAME"] = "no-such-tpu"
print("probe TPU_NAME:", type(distribute.get_strategy()).__name__)
"""


def test_explicit_tpu_without_a_tpu_is_an_error_and_probing_falls_back_to_the_default(tmp_path):
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "accel0").touch()
    out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         check=True).stdout
    assert "error: cannot reach TPU ''" in out and "error: cannot reach TPU 'local'" in out, out
    assert "no error" not in out and "probe: _DefaultDistributionStrategy" in out, out
    assert "logged: TPU 'local' not reachable, using GPUs or the CPU" in out  # unset tpu probes this VM's TPU
    assert "probe on a TPU VM: _DefaultDistributionStrategy" in out
    assert "logged: TPU 'no-such-tpu' not reachable" in out and "probe TPU_NAME: _DefaultDistributionStrategy" in out
