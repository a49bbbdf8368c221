"""Strategy selection: an explicitly requested TPU must be reached or fail loudly; probing falls back quietly."""

import subprocess
import sys

# In a subprocess: a TPU connection attempt may change the TensorFlow context of the test process.
PROBE = """
import os
os.environ.pop("TPU_NAME", None); os.environ.pop("COLAB_TPU_ADDR", None)
from kerasntk import distribute
for tpu in ("", "local"):
    try:
        distribute.get_strategy(tpu)
        print("no error for", repr(tpu))
    except RuntimeError as err:
        print("error:", str(err).splitlines()[0])
print("probe:", type(distribute.get_strategy()).__name__)
"""


def test_explicit_tpu_without_a_tpu_is_an_error_and_probing_falls_back_to_the_default():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, check=True).stdout
    assert "error: cannot reach TPU ''" in out and "error: cannot reach TPU 'local'" in out, out
    assert "no error" not in out and "probe: _DefaultDistributionStrategy" in out, out
