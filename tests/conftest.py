"""Test setup: TensorFlow on 2 logical CPU devices (before it initializes) and quiet logs. No test needs the
network: datasets are generated (mnist1d), synthetic, or tensorflow-datasets mock data."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasntk import distribute  # noqa: E402
from helpers import N_TRAIN, synthetic_arrays, tiny, write_npz  # noqa: E402

distribute.split_cpu(2)


@pytest.fixture(scope="session")
def mirrored():
    """One MirroredStrategy over the 2 logical CPUs for the whole session.

    Separate MirroredStrategy objects in one process draw collective-op keys from separate counters that
    start at the same values, so the runtime can mix up their all-reduces ("Shape mismatch in the
    collective instance"); every test that needs mirroring shares this one.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture(scope="session")
def npz(tmp_path_factory):
    """The tiny experiment's data: 256 train / 64 test synthetic examples of shape (16, 1)."""
    return write_npz(tmp_path_factory.mktemp("data") / "tiny.npz", synthetic_arrays(n_train=256, n_test=64, shape=(16, 1)))


@pytest.fixture(scope="session")
def clean_run(tmp_path_factory, npz):
    """One uninterrupted local run of the tiny experiment, shared by the tests that inspect or compare with it."""
    from kerasntk import config as cfg
    from kerasntk import experiment

    run_dir = tmp_path_factory.mktemp("clean")
    return experiment.run(cfg.load(None, tiny(npz)), str(run_dir), verbose=0), run_dir


@pytest.fixture(scope="session")
def arrays():
    """A standardized mnist1d subset: (x_train, y_train, x_test, y_test)."""
    from kerasntk import data

    a = data.load_arrays("mnist1d")
    x = a.x_train[:N_TRAIN]
    mean, std = x.mean((0, 1)), x.std((0, 1))
    return (x - mean) / std, a.y_train[:N_TRAIN], (a.x_test[:128] - mean) / std, a.y_test[:128]
