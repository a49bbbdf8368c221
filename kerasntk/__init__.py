"""kerasntk: empirical NTKs, loss-landscape geometry and the spawning experiment of Fort et al. 2020."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"

from kerasntk import (callbacks, config, data, distribute, experiment, fs, landscape, models, ntk,  # noqa: E402
                      plots, results, rundir, training)
from kerasntk.experiment import run  # noqa: E402
from kerasntk.linearize import Linearized, kernel_regression, linearize  # noqa: E402

__all__ = ["Linearized", "callbacks", "config", "data", "distribute", "experiment", "fs", "kernel_regression",
           "landscape", "linearize", "models", "ntk", "plots", "results", "rundir", "run", "training"]
