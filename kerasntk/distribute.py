"""Choosing a tf.distribute strategy: TPU, then several GPUs, else default (a multi-worker TF_CONFIG is an error)."""

import json
import logging
import os

import tensorflow as tf

log = logging.getLogger(__name__)


def split_cpu(n):
    """Split the host CPU into `n` logical devices (for testing distribution); must precede TF init."""
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
    except RuntimeError:
        if len(tf.config.list_logical_devices("CPU")) != n:
            raise RuntimeError(
                f"cannot split the CPU into {n} logical devices: TensorFlow is already initialized "
                f"with {len(tf.config.list_logical_devices('CPU'))}; call split_cpu before any TF op"
            ) from None


def _connect_tpu(tpu, explicit):
    """TPUStrategy for `tpu` ('' on Colab, 'local' on a TPU VM, a name or grpc address), or None when a
    probe (not `explicit`) finds none."""
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, OSError, tf.errors.NotFoundError, tf.errors.UnavailableError) as err:
        if explicit:  # asked for: failing to reach it is an error
            raise RuntimeError(f"cannot reach TPU {tpu!r}: {err}") from err
        return None
    return tf.distribute.TPUStrategy(resolver)


def get_strategy(tpu=None, logical_cpus=0):
    """The best available strategy.

    tpu: None probes for a TPU quietly (Colab/TPU VM env vars); a string names one and fails loudly.
    logical_cpus: if > 1, MirroredStrategy over that many logical CPUs (testing on one host).
    """
    if tpu is not None or os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME"):
        strategy = _connect_tpu(tpu if tpu is not None else os.environ.get("TPU_NAME", ""), tpu is not None)
        if strategy is not None:
            log.info("TPUStrategy with %d replicas", strategy.num_replicas_in_sync)
            return strategy
    if os.environ.get("TF_CONFIG") and json.loads(os.environ["TF_CONFIG"]).get("cluster"):
        raise ValueError("TF_CONFIG names a multi-worker cluster, which kerasntk does not support (every worker "
                         "would write the same run directory); unset TF_CONFIG and spread the jobs over machines "
                         "with --executor ray or one command per job (README, Commands)")
    if logical_cpus > 1:
        split_cpu(logical_cpus)
        devices = [d.name for d in tf.config.list_logical_devices("CPU")][:logical_cpus]
        return tf.distribute.MirroredStrategy(devices)
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()
