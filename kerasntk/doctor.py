"""`kerasntk doctor`: one screen saying what will run where on this machine, and each known failure mode
as one line with its fix. Its exit status is non-zero when something asked for (a TPU, a data directory,
a run directory) cannot be used.

A TPU counts as asked for when named (`--tpu`, $TPU_NAME, $COLAB_TPU_ADDR) or when this machine has TPU
device files: `distribute.tpu_target` decides, as it does for `get_strategy`.
"""

import base64
import dataclasses
import hashlib
import importlib.metadata
import os
import platform
import re
import sys

from kerasntk import __version__, distribute, fs, rundir

# The `tpu` extra of pyproject.toml: the TPU build of TensorFlow 2.20.0 and the libtpu its release names
# (ARCHITECTURE.md, "TPU install"); a test checks that the two lists agree.
TPU_STACK = {"tensorflow": "2.20.0", "tensorflow-tpu": "2.20.0", "libtpu": "0.0.14"}
TPU_PYTHONS = ((3, 10), (3, 13))  # the Pythons all three have wheels for (and kerasntk supports)
INSTALL_TPU = (f"pip install 'kerasntk[tpu]' && pip install --no-deps --force-reinstall "
               f"tensorflow-tpu=={TPU_STACK['tensorflow-tpu']}")
REINSTALL_TPU_BUILD = f"pip install --no-deps --force-reinstall tensorflow-tpu=={TPU_STACK['tensorflow-tpu']}"
TFDS_DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn_cropped")  # what kerasntk.data reads
_DECIDED_FILES = 20  # files looked at to tell which TensorFlow distribution's copy is on disk
_HASHED_BYTES = 1 << 20  # larger files are told apart by size only


@dataclasses.dataclass
class Finding:
    """A known failure mode met: what is wrong, how to fix it, and whether it blocks something asked for."""

    problem: str
    fix: str
    fatal: bool

    def line(self):
        return f"{'error' if self.fatal else 'warning'}: {self.problem}; fix: {self.fix}"


def run(tpu=None, data_dir=None, out=None, echo=print, warn=None):
    """Print the report with `echo`, each finding with `warn` (default: to stderr); returns the exit status."""
    warn = warn or (lambda line: print(f"kerasntk doctor: {line}", file=sys.stderr))
    findings = []
    dists = distributions()
    target = distribute.tpu_target(tpu)
    echo(f"{'python':16s}{platform.python_version()} ({sys.executable})")
    echo(f"{'kerasntk':16s}{__version__}")
    for name in ("tensorflow", "tensorflow-tpu", "libtpu", "keras", "jax", "tensorboard", "ray", "gcsfs"):
        echo(f"{name:16s}{dists[name].version if name in dists else 'not installed'}")
    owner = tensorflow_files(dists)
    if owner is not None:
        echo(f"{'tensorflow files':16s}{owner} (both tensorflow and tensorflow-tpu are installed)")
    echo(f"{'TPU devices':16s}{' '.join(distribute.tpu_device_files()) or 'none (not a TPU VM)'}")
    pjrt = [f"{k}={os.environ[k]}" for k in distribute.TPU_ENV_NAMES if k in os.environ]
    echo(f"{'TPU environment':16s}{' '.join(pjrt) or 'none set'}")
    echo(f"{'TPU target':16s}{'none (GPUs or the CPU)' if target is None else repr(target)}")
    if target is not None:
        findings += tpu_stack_findings(dists, target, owner)
    tf = _import_tensorflow(findings)
    if tf is not None:
        findings += _strategy(tf, target, echo, explained=any(f.fatal for f in findings))
    if data_dir is not None:
        findings += _data_dir(data_dir, echo)
    if out is not None:
        findings += _run_dir(out, echo)
    for finding in findings:
        warn(finding.line())
    fatal = [f for f in findings if f.fatal]
    echo(f"{len(fatal)} error(s), {len(findings) - len(fatal)} warning(s)" if findings else "no problems found")
    return 1 if fatal else 0


def distributions(path=None):
    """Installed distributions by normalized name (the first on `path`, default sys.path, as import sees)."""
    found = {}
    for dist in importlib.metadata.distributions(**({} if path is None else {"path": path})):
        found.setdefault(re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower(), dist)
    return found


def tensorflow_files(dists):
    """Whose `tensorflow` package is on disk when both `tensorflow` and `tensorflow-tpu` are installed (they
    ship the same files): "tensorflow-tpu", "tensorflow", "mixed", "missing", or None when not both.

    Files that differ between the two wheels' records are compared by size, small ones also by hash; files
    that cannot be told apart cheaply (large, same size) count as the TPU build's.
    """
    if "tensorflow" not in dists or "tensorflow-tpu" not in dists:
        return None
    plain, tpu = (_records(dists[n]) for n in ("tensorflow", "tensorflow-tpu"))
    decided = []
    for path in sorted(p for p in plain.keys() & tpu.keys() if plain[p] != tpu[p]):
        on_disk = dists["tensorflow-tpu"].locate_file(path)
        if not os.path.isfile(on_disk):
            return "missing"
        whose = _whose(on_disk, plain[path], tpu[path])
        decided += [whose] if whose else []
        if len(decided) == _DECIDED_FILES:
            break
    owners = set(decided) or {"tensorflow-tpu"}
    return owners.pop() if len(owners) == 1 and owners != {"neither"} else "mixed"


def tpu_stack_findings(dists, target, owner):
    """What in the installed TPU stack keeps TensorFlow from the TPU `target` (checked before connecting);
    `owner`: `tensorflow_files(dists)`."""
    findings = []
    here = distribute.tpu_device_files()
    if target == "local" and not here:
        return [Finding("TPU 'local' asked for, but this machine has no TPU device files (/dev/accel*, /dev/vfio/N)",
                        "run on a Cloud TPU VM, or leave --tpu / distribute.tpu unset to use GPUs or the CPU", True)]
    if not here:  # a remote TPU (a name or grpc:// address): the local stack is the plain TensorFlow's concern
        return findings
    low, high = TPU_PYTHONS
    if not low <= sys.version_info[:2] <= high:
        findings.append(Finding(f"Python {platform.python_version()} has no tensorflow-tpu/libtpu wheels",
                                f"use Python {low[0]}.{low[1]}-{high[0]}.{high[1]}", True))
    if "tensorflow-tpu" not in dists:
        findings.append(Finding("TPU VM with the plain `tensorflow` build, which cannot drive a TPU (no tensorflow-tpu)",
                                INSTALL_TPU, True))
    if owner not in (None, "tensorflow-tpu"):
        findings.append(Finding(f"`tensorflow` and `tensorflow-tpu` are both installed and the tensorflow package's "
                                f"files on disk are {owner!r}, not the TPU build's", REINSTALL_TPU_BUILD, True))
    for name in ("tensorflow", "tensorflow-tpu"):
        if name in dists and dists[name].version != TPU_STACK[name]:
            findings.append(Finding(f"{name} {dists[name].version} is not the pinned {TPU_STACK[name]}", INSTALL_TPU, False))
    if distribute.libtpu_path() is None:
        findings.append(Finding("no libtpu (neither the libtpu package nor /lib/libtpu.so)",
                                f"pip install libtpu=={TPU_STACK['libtpu']}", True))
    elif "libtpu" in dists and dists["libtpu"].version != TPU_STACK["libtpu"]:
        findings.append(Finding(f"libtpu {dists['libtpu'].version} is not {TPU_STACK['libtpu']}, the build paired with "
                                f"tensorflow-tpu {TPU_STACK['tensorflow-tpu']}; newer ones were reported to make "
                                f"TensorFlow find no TPU", f"pip install libtpu=={TPU_STACK['libtpu']}", False))
    if "jax" in dists:
        findings.append(Finding("jax is installed beside TensorFlow: jax[tpu] competes for the TPU (one process "
                                "holds it) and brings its own libtpu", "use a separate environment for jax", False))
    return findings


def _import_tensorflow(findings):
    """TensorFlow, or None with a finding saying why it does not import."""
    try:
        import tensorflow as tf
    except Exception as err:  # any import failure is the diagnosis; a crash inside it cannot be caught here
        plugin = os.environ.get("TF_PLUGGABLE_DEVICE_LIBRARY_PATH")
        fix = (f"the TPU plugin {plugin} did not load: install the pinned stack ({INSTALL_TPU}), or set "
               f"{distribute.TPU_ENV_VAR}=0 to import TensorFlow without it" if plugin
               else "pip install --force-reinstall 'tensorflow>=2.19,<2.22' (on a TPU VM: the tpu extra)")
        findings.append(Finding(f"TensorFlow does not import: {_first_line(err)}", fix, True))
        return None
    return tf


def _strategy(tf, target, echo, explained):
    """Report the strategy get_strategy chooses (with the TPU `target` asked for) and the devices TensorFlow
    sees; a TPU is not tried when a finding already `explained` why it cannot be used."""
    echo(f"{'imported':16s}tensorflow {tf.__version__} from {os.path.dirname(tf.__file__)}")
    if explained:
        echo(f"{'strategy':16s}none: TPU {target!r} not tried (see the errors)")
        return []
    try:
        strategy = distribute.get_strategy(target)
    except RuntimeError as err:
        echo(f"{'strategy':16s}none: TPU {target!r} cannot be reached")
        return [_tpu_failure(target, err)]
    echo(f"{'strategy':16s}{type(strategy).__name__} with {strategy.num_replicas_in_sync} replica(s)")
    devices = {}
    for device in tf.config.list_logical_devices():
        devices[device.device_type] = devices.get(device.device_type, 0) + 1
    echo(f"{'devices':16s}{', '.join(f'{k} x{v}' for k, v in sorted(devices.items()))}")
    return []


def _tpu_failure(target, err):
    """The finding for a TPU connection that failed although the installed stack looked right."""
    text = str(err)
    if isinstance(err.__cause__, OSError):
        return Finding(f"TPU name {target!r} cannot be resolved: names are looked up through the Google Cloud "
                       f"metadata server ({_first_line(err.__cause__)})",
                       "run on a Google Cloud VM in the TPU's project and zone, give grpc://IP:8470, or use "
                       "--tpu local on the TPU VM itself", True)
    if "No TPU platform found" in text:
        return Finding("TensorFlow found no TPU platform (a libtpu that does not match tensorflow-tpu)",
                       f"pip install libtpu=={TPU_STACK['libtpu']}", True)
    if re.search(r"already in use|in use by|busy", text, re.IGNORECASE):
        return Finding(f"TPU {target!r} is held by another process (a notebook kernel, a jax program)",
                       "stop that process (`sudo lsof -w /dev/accel* /dev/vfio/*` names it) and retry", True)
    return Finding(f"TPU {target!r} cannot be reached: {_first_line(err.__cause__ or err)}",
                   "check the TPU is READY (`gcloud compute tpus tpu-vm describe`) and the pinned stack is "
                   f"installed ({INSTALL_TPU}); the whole message: python -c \"import kerasntk; "
                   f"kerasntk.distribute.get_strategy({target!r})\"", True)


def _data_dir(data_dir, echo):
    """Which datasets kerasntk.data can read from the tensorflow-datasets directory `data_dir`."""
    import tensorflow_datasets as tfds

    try:
        exists = fs.isdir(data_dir)
        prepared = [n for n in TFDS_DATASETS if exists and tfds.builder(n, data_dir=data_dir).is_prepared()]
    except Exception as err:  # whatever keeps tfds from reading it (gs:// access, a file system plugin) is the finding
        echo(f"{'data dir':16s}{data_dir}: not readable")
        return [Finding(f"data directory {data_dir} cannot be read: {_first_line(err)}",
                        "check the path and its permissions (gs://: `pip install 'kerasntk[gcs]'` and read access)", True)]
    if not exists:
        echo(f"{'data dir':16s}{data_dir}: does not exist")
        return [Finding(f"data directory {data_dir} does not exist",
                        f"tfds build cifar10 --data_dir {data_dir} on a machine with internet", True)]
    echo(f"{'data dir':16s}{data_dir}: prepared {', '.join(prepared) or 'none'} (mnist1d needs none)")
    if prepared:
        return []
    return [Finding(f"data directory {data_dir} holds none of {', '.join(TFDS_DATASETS)} prepared",
                    f"tfds build cifar10 --data_dir {data_dir} on a machine with internet", True)]


def _run_dir(out, echo):
    """Whether a run directory can be written at `out` (local or an object store URL): a probe file is
    written, read back and removed; a directory made for it is removed too."""
    made = not fs.exists(out)
    probe = rundir.RunDir(out).write_probe
    try:
        fs.makedirs(out)
        fs.write_json(probe, {"written_by": "kerasntk doctor"})
        fs.read_json(probe)
        fs.remove(probe)
        if made:
            fs.remove(out)
    except Exception as err:  # whatever keeps the probe from being written and read back is the finding
        echo(f"{'run dir':16s}{out}: not writable")
        fix = ("pip install 'kerasntk[gcs]'" if isinstance(err, ImportError) else
               "check the path and its permissions (gs://: the account needs write access to the bucket; "
               "`gcloud auth application-default login`)")
        return [Finding(f"run directory {out} is not writable: {_first_line(err)}", fix, True)]
    echo(f"{'run dir':16s}{out}: writable")
    return []


def _records(dist):
    """{path: (hash, size)} of the files of a distribution's `tensorflow` package, from its RECORD."""
    return {str(f): (f.hash and (f.hash.mode, f.hash.value), f.size) for f in dist.files or ()
            if str(f).startswith("tensorflow/")}


def _whose(path, plain, tpu):
    """Which wheel's record the file at `path` matches ("tensorflow", "tensorflow-tpu", "neither"), or None
    when that takes hashing a large file."""
    size = os.path.getsize(path)
    if plain[1] != tpu[1]:
        return "tensorflow-tpu" if size == tpu[1] else "tensorflow" if size == plain[1] else "neither"
    if size > _HASHED_BYTES or not tpu[0]:
        return None
    with open(path, "rb") as f:
        digest = base64.urlsafe_b64encode(hashlib.new(tpu[0][0], f.read()).digest()).rstrip(b"=").decode()
    return "tensorflow-tpu" if digest == tpu[0][1] else "tensorflow" if plain[0] and digest == plain[0][1] else "neither"


def _first_line(err):
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
