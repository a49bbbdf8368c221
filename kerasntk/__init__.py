"""kerasntk: empirical NTKs, loss-landscape geometry and the spawning experiment of Fort et al. 2020."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"
