"""kerasntk: empirical NTKs, loss-landscape geometry and the spawning experiment of Fort et al. 2020.

Submodules and the top-level names load on first use, so `import kerasntk` (and `kerasntk --help`) does
not import TensorFlow until something needs it. On a TPU VM, importing the package first sets the variables
of TensorFlow's PJRT TPU path (`distribute.set_tpu_environment`), which TensorFlow reads when imported.
"""

import importlib
import os

from kerasntk import distribute

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
distribute.set_tpu_environment()

__version__ = "0.1.0"

_MODULES = ("callbacks", "config", "data", "distribute", "errors", "evaluation", "experiment", "faults", "fs",
            "hessian", "kernel_learning", "landscape", "linearized", "models", "models_from_runs", "ntk", "plots",
            "results", "rundir", "training")
_NAMES = {"Linearized": "linearized", "kernel_regression": "linearized", "linearize": "linearized",
          "load_model": "models_from_runs", "run": "experiment"}

__all__ = sorted(_MODULES + tuple(_NAMES))


def __getattr__(name):
    if name in _MODULES:
        return importlib.import_module(f"kerasntk.{name}")
    if name in _NAMES:
        return getattr(importlib.import_module(f"kerasntk.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'kerasntk' has no attribute {name!r}")


def __dir__():
    return __all__
