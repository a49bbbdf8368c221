"""Test setup: TensorFlow on 2 logical CPU devices (before it initializes) and quiet logs. No test needs the
network: datasets are generated (mnist1d), synthetic, or tensorflow-datasets mock data."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from kerasntk import distribute  # noqa: E402

distribute.split_cpu(2)


@pytest.fixture(scope="session")
def mirrored():
    """One MirroredStrategy over the 2 logical CPUs for the whole session.

    Separate MirroredStrategy objects in one process draw collective-op keys from separate counters that
    start at the same values, so the runtime can mix up their all-reduces ("Shape mismatch in the
    collective instance"); every test that needs mirroring shares this one.
    """
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
