"""Test setup: TensorFlow on 2 logical CPU devices (before it initializes), quiet logs, no network."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

from kerasntk import distribute  # noqa: E402

distribute.split_cpu(2)
