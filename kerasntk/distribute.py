"""Choosing a tf.distribute strategy: TPU, then several GPUs, else default (a multi-worker TF_CONFIG is an error).

Also the TPU VM's environment for TensorFlow's PJRT TPU path, which must be in place before TensorFlow is
imported: `import kerasntk` calls `set_tpu_environment`, so this module imports TensorFlow only inside the
functions that need it.
"""

import glob
import importlib.util
import json
import logging
import os
import sys

log = logging.getLogger(__name__)

# TPU chips appear as /dev/accel0.. on v2-v4 and as /dev/vfio/0.. on v5e and later.
TPU_DEVICE_PATTERNS = ("dev/accel*", "dev/vfio/[0-9]*")
# Where TPU device files are looked for ("/"); tests point it at a temporary directory.
DEVICE_ROOT_VAR = "KERASNTK_DEVICE_ROOT"
# Set to 0 to leave the TPU environment variables alone (e.g. for the stream-executor runtime).
TPU_ENV_VAR = "KERASNTK_TPU_ENV"
LIBTPU_IMAGE_PATH = "/lib/libtpu.so"  # where the tpu-vm-tf-* TPU VM images install it
TPU_ENV_NAMES = ("PJRT_DEVICE", "NEXT_PLUGGABLE_DEVICE_USE_C_API", "TF_PLUGGABLE_DEVICE_LIBRARY_PATH")


def tpu_device_files(root=None):
    """The TPU device files of this machine (under `root`, default $KERASNTK_DEVICE_ROOT or "/")."""
    root = root if root is not None else os.environ.get(DEVICE_ROOT_VAR, "/")
    return sorted(f for pattern in TPU_DEVICE_PATTERNS for f in glob.glob(os.path.join(root, pattern)))


def libtpu_path():
    """libtpu's shared library: the installed `libtpu` package's (found without importing it), else the TPU
    VM image's /lib/libtpu.so, else None."""
    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.submodule_search_locations:
        for directory in spec.submodule_search_locations:
            if os.path.isfile(os.path.join(directory, "libtpu.so")):
                return os.path.join(directory, "libtpu.so")
    return LIBTPU_IMAGE_PATH if os.path.isfile(LIBTPU_IMAGE_PATH) else None


def tpu_environment(root=None, environ=os.environ):
    """The variables TensorFlow's PJRT TPU path needs on this machine: {} off a TPU VM, without a libtpu,
    or with KERASNTK_TPU_ENV=0."""
    if environ.get(TPU_ENV_VAR, "1") == "0" or not tpu_device_files(root):
        return {}
    library = environ.get("TF_PLUGGABLE_DEVICE_LIBRARY_PATH") or libtpu_path()
    if library is None:
        return {}
    return dict(zip(TPU_ENV_NAMES, ("TPU", "true", library)))


def set_tpu_environment(root=None, environ=os.environ):
    """On a TPU VM, set TensorFlow's PJRT TPU variables that the user has not set; returns those set.
    Takes effect only before TensorFlow is imported."""
    added = {k: v for k, v in tpu_environment(root, environ).items() if k not in environ}
    environ.update(added)
    if added and "tensorflow" in sys.modules:
        log.warning("TensorFlow was imported before kerasntk, too early for %s: import kerasntk first",
                    ", ".join(sorted(added)))
    return added


def tpu_target(tpu=None, root=None):
    """The TPU `get_strategy` tries: `tpu` when given, else $TPU_NAME, else '' when $COLAB_TPU_ADDR is set
    (Colab's TPU Node runtime), else 'local' on a TPU VM, else None."""
    if tpu is not None:
        return tpu
    if os.environ.get("TPU_NAME"):
        return os.environ["TPU_NAME"]
    if os.environ.get("COLAB_TPU_ADDR"):
        return ""
    return "local" if tpu_device_files(root) else None


def split_cpu(n):
    """Split the host CPU into `n` logical devices (for testing distribution); must precede TF init."""
    import tensorflow as tf

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
    """TPUStrategy for `tpu` ('' on Colab, 'local' on a TPU VM, a name or grpc address), or None (with a
    warning) when a probe (not `explicit`) finds none."""
    import tensorflow as tf

    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    # OSError: a TPU name is looked up through the GCE metadata server, unreachable off Google Cloud;
    # OpError: any TensorFlow error while the TPU system initializes
    except (ValueError, RuntimeError, OSError, tf.errors.OpError) as err:
        if explicit:  # asked for: failing to reach it is an error
            raise RuntimeError(f"cannot reach TPU {tpu!r}: {err}") from err
        log.warning("TPU %r not reachable, using GPUs or the CPU (`kerasntk doctor` says why): %s",
                    tpu, str(err).splitlines()[0])
        return None
    return tf.distribute.TPUStrategy(resolver)


def get_strategy(tpu=None, logical_cpus=0):
    """The best available strategy.

    tpu: None probes quietly for the TPU that `tpu_target` names (TPU_NAME, Colab, this TPU VM's);
    a string names one and fails loudly.
    logical_cpus: if > 1, MirroredStrategy over that many logical CPUs (testing on one host).
    """
    import tensorflow as tf

    target = tpu_target(tpu)
    if target is not None:
        strategy = _connect_tpu(target, explicit=tpu is not None)
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
