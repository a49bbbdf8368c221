"""The TPU environment set at `import kerasntk` (before TensorFlow), TPU discovery, and `kerasntk doctor`:
what it reports on this CPU machine and the one-line diagnosis of each TPU failure it can meet here."""

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kerasntk import distribute, doctor
from helpers import write_tfds_metadata

REPO = Path(__file__).resolve().parents[1]
TPU_ENV = distribute.TPU_ENV_NAMES
CLEAN = (*TPU_ENV, "TPU_NAME", "COLAB_TPU_ADDR", distribute.DEVICE_ROOT_VAR, distribute.TPU_ENV_VAR, "TF_CONFIG")


def tpu_vm(root, devices=("dev/accel0",), libtpu=True):
    """A fake TPU VM under `root`: device files, and a `libtpu` package (not importable as one: an empty .so)
    on a site directory; returns (device root, site directory)."""
    for device in devices:
        (root / device).parent.mkdir(parents=True, exist_ok=True)
        (root / device).touch()
    site = root / "site"
    if libtpu:
        (site / "libtpu").mkdir(parents=True)
        (site / "libtpu" / "__init__.py").write_text("")
        (site / "libtpu" / "libtpu.so").write_bytes(b"")
    return root, site


def python(code, env=(), site=None, args=()):
    """Run `code` in a fresh interpreter importing this checkout, with no TPU variables but `env`."""
    base = {k: v for k, v in os.environ.items() if k not in CLEAN}
    path = os.pathsep.join(str(p) for p in (REPO, site) if p)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          env={**base, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "3", **dict(env)})


ENV_AT_IMPORT = """
import json, os, sys
{imports}
print(json.dumps({{"env": {{k: os.environ.get(k) for k in {names!r}}}, "tensorflow": "tensorflow" in sys.modules}}))
"""


@pytest.mark.parametrize("imports", ["import kerasntk", "from kerasntk import cli"])
def test_tpu_vm_environment_is_set_before_tensorflow_is_imported(tmp_path, imports):
    root, site = tpu_vm(tmp_path)
    done = python(ENV_AT_IMPORT.format(imports=imports, names=TPU_ENV), {distribute.DEVICE_ROOT_VAR: str(root)}, site)
    seen = json.loads(done.stdout)
    assert seen["tensorflow"] is False  # set at import, TensorFlow not loaded yet: it will read them
    assert seen["env"] == {"PJRT_DEVICE": "TPU", "NEXT_PLUGGABLE_DEVICE_USE_C_API": "true",
                           "TF_PLUGGABLE_DEVICE_LIBRARY_PATH": str(site / "libtpu" / "libtpu.so")}


@pytest.mark.parametrize("devices, libtpu, env, expected", [
    # v5e and later: /dev/vfio/N; the user's own values win
    (("dev/vfio/0",), True, {"PJRT_DEVICE": "CPU", "TF_PLUGGABLE_DEVICE_LIBRARY_PATH": "/opt/my/libtpu.so"},
     {"PJRT_DEVICE": "CPU", "NEXT_PLUGGABLE_DEVICE_USE_C_API": "true", "TF_PLUGGABLE_DEVICE_LIBRARY_PATH": "/opt/my/libtpu.so"}),
    (("dev/vfio/vfio",), True, {}, {}),                              # the VFIO control file alone is no TPU
    (("dev/accel0",), False, {}, {}),                                # a TPU VM without libtpu: nothing to point at
    (("dev/accel0",), True, {distribute.TPU_ENV_VAR: "0"}, {}),      # opted out
])
def test_tpu_environment_keeps_user_values_and_needs_tpu_and_libtpu(tmp_path, devices, libtpu, env, expected):
    root, site = tpu_vm(tmp_path, devices, libtpu)
    done = python(ENV_AT_IMPORT.format(imports="import kerasntk", names=TPU_ENV),
                  {distribute.DEVICE_ROOT_VAR: str(root), **env}, site)
    assert json.loads(done.stdout)["env"] == {k: expected.get(k) for k in TPU_ENV}


def test_tpu_target_order(tmp_path, monkeypatch):
    for var in ("TPU_NAME", "COLAB_TPU_ADDR"):
        monkeypatch.delenv(var, raising=False)
    root, _ = tpu_vm(tmp_path, libtpu=False)
    assert distribute.tpu_target(root=str(tmp_path / "nothing")) is None
    assert distribute.tpu_target(root=str(root)) == "local"  # a TPU VM is probed without being named
    monkeypatch.setenv("COLAB_TPU_ADDR", "10.0.0.2:8470")
    assert distribute.tpu_target(root=str(root)) == ""
    monkeypatch.setenv("TPU_NAME", "my-tpu")
    assert distribute.tpu_target(root=str(root)) == "my-tpu"
    assert distribute.tpu_target("grpc://10.0.0.3:8470", root=str(root)) == "grpc://10.0.0.3:8470"


def doctor_cli(capsys, *argv):
    """(exit status, stdout, the error lines on stderr) of `kerasntk doctor ARGV` run in this process. Safe
    here: none of these cases reaches TensorFlow's TPU initialization, which would change its context."""
    from kerasntk import cli

    code = cli.main(["doctor", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, [line for line in err.splitlines() if line.startswith("kerasntk doctor: error:")]


@pytest.fixture
def no_tpu(monkeypatch, tmp_path):
    for var in CLEAN:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(distribute.DEVICE_ROOT_VAR, str(tmp_path / "no-devices"))


def test_doctor_on_this_cpu_machine_exits_0_and_names_the_default_strategy(capsys, no_tpu):
    code, out, errors = doctor_cli(capsys)
    assert code == 0 and errors == [], out
    assert "strategy        _DefaultDistributionStrategy with 1 replica(s)" in out
    assert "TPU target      none (GPUs or the CPU)" in out and "no problems found" in out
    assert f"tensorflow      {importlib.metadata.version('tensorflow')}" in out


def test_doctor_checks_a_data_dir_and_a_run_dir(capsys, no_tpu, tmp_path):
    write_tfds_metadata(tmp_path / "tfds", "cifar10")
    code, out, errors = doctor_cli(capsys, "--data-dir", str(tmp_path / "tfds"), "--out", str(tmp_path / "run"))
    assert code == 0 and errors == [], out
    assert f"{tmp_path / 'tfds'}: prepared cifar10 " in out
    assert f"{tmp_path / 'run'}: writable" in out and not (tmp_path / "run").exists()  # the probe cleaned up
    (tmp_path / "empty").mkdir()
    code, out, errors = doctor_cli(capsys, "--data-dir", str(tmp_path / "empty"))
    assert code == 1 and errors == [
        f"kerasntk doctor: error: data directory {tmp_path / 'empty'} holds none of "
        f"{', '.join(doctor.TFDS_DATASETS)} prepared; fix: tfds build cifar10 --data_dir {tmp_path / 'empty'} "
        f"on a machine with internet"]
    (tmp_path / "file").write_text("")
    code, out, errors = doctor_cli(capsys, "--out", str(tmp_path / "file" / "run"))
    assert code == 1 and len(errors) == 1 and errors[0].startswith(
        f"kerasntk doctor: error: run directory {tmp_path / 'file' / 'run'} is not writable: "), errors


@pytest.mark.parametrize("argv, env, problem", [
    (["--tpu", "local"], {}, "TPU 'local' asked for, but this machine has no TPU device files"),
    ([], {"TPU_NAME": "no-such-tpu"}, "TPU name 'no-such-tpu' cannot be resolved"),
])
def test_doctor_asked_for_an_absent_tpu_exits_1_with_one_line(capsys, no_tpu, monkeypatch, argv, env, problem):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, errors = doctor_cli(capsys, *argv)
    assert code == 1, out
    (line,) = errors  # one line: the problem and its fix, no traceback
    assert line.startswith(f"kerasntk doctor: error: {problem}") and "; fix: " in line, line
    assert "strategy        none: TPU" in out


def test_on_a_tpu_vm_with_the_plain_tensorflow_doctor_names_the_install(capsys, no_tpu, monkeypatch, tmp_path):
    root, _ = tpu_vm(tmp_path, libtpu=False)
    monkeypatch.setenv(distribute.DEVICE_ROOT_VAR, str(root))
    code, out, errors = doctor_cli(capsys)
    assert code == 1 and "TPU target      'local'" in out, out
    assert errors == [
        f"kerasntk doctor: error: TPU VM with the plain `tensorflow` build, which cannot drive a TPU (no "
        f"tensorflow-tpu); fix: {doctor.INSTALL_TPU}",
        f"kerasntk doctor: error: no libtpu (neither the libtpu package nor /lib/libtpu.so); fix: pip install "
        f"libtpu=={doctor.TPU_STACK['libtpu']}"]


@pytest.mark.slow  # a second TensorFlow import: 6-15 s here
def test_a_tpu_plugin_that_does_not_load_is_diagnosed_not_a_traceback(tmp_path):
    """On a TPU VM the variables point TensorFlow at libtpu; a broken one fails TensorFlow's import."""
    root, site = tpu_vm(tmp_path)  # its libtpu.so is empty
    done = python("from kerasntk import cli; raise SystemExit(cli.main(['doctor']))",
                  {distribute.DEVICE_ROOT_VAR: str(root)}, site)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    plugin = str(site / "libtpu" / "libtpu.so")
    assert (f"kerasntk doctor: error: TensorFlow does not import: {plugin}: file too short; fix: the TPU plugin "
            f"{plugin} did not load") in done.stderr, done.stderr[-2000:]


def _dist(site, name, version, files):
    """A fake installed distribution `name` with a RECORD for `files` ({path: bytes})."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    rows = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(b).digest()).rstrip(b'=').decode()},{len(b)}"
            for p, b in files.items()]
    (info / "RECORD").write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("on_disk, expected", [
    ({"a.py": b"tpu-a", "b.py": b"tpu-bb", "c.so": b"tpu-c"}, "tensorflow-tpu"),
    ({"a.py": b"cpu-a", "b.py": b"cpu-b", "c.so": b"cpu-cc"}, "tensorflow"),
    ({"a.py": b"tpu-a", "b.py": b"cpu-b", "c.so": b"tpu-c"}, "mixed"),    # one file from each
    ({"a.py": b"xyz-a", "b.py": b"tpu-bb", "c.so": b"tpu-c"}, "mixed"),   # a third writer
    ({"a.py": b"tpu-a", "b.py": b"tpu-bb"}, "missing"),                   # e.g. `pip uninstall tensorflow` after both
])
def test_which_tensorflow_build_owns_the_files(tmp_path, on_disk, expected):
    """b.py and c.so differ in size between the two wheels (told apart by size), a.py only by content (hash)."""
    plain = {"a.py": b"cpu-a", "b.py": b"cpu-b", "c.so": b"cpu-cc", "same.py": b"same"}
    tpu = {"a.py": b"tpu-a", "b.py": b"tpu-bb", "c.so": b"tpu-c", "same.py": b"same"}
    _dist(tmp_path, "tensorflow", "2.20.0", {f"tensorflow/{p}": b for p, b in plain.items()})
    _dist(tmp_path, "tensorflow-tpu", "2.20.0", {f"tensorflow/{p}": b for p, b in tpu.items()})
    (tmp_path / "tensorflow").mkdir()
    for path, content in {**on_disk, "same.py": b"same"}.items():
        (tmp_path / "tensorflow" / path).write_bytes(content)
    dists = doctor.distributions([str(tmp_path)])
    assert set(dists) == {"tensorflow", "tensorflow-tpu"}
    assert doctor.tensorflow_files(dists) == expected


def test_the_tpu_extra_is_the_stack_doctor_checks():
    spec = importlib.util.spec_from_file_location("check_tpu_pins", REPO / "scripts" / "check_tpu_pins.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.extra_requirements() == doctor.TPU_STACK


@pytest.mark.parametrize("message, problem", [
    ("No TPU platform found. Platform manager status: OK", "TensorFlow found no TPU platform"),
    ("The TPU is already in use by process with pid 4242.", "TPU 'local' is held by another process"),
    ("Deadline exceeded", "TPU 'local' cannot be reached: Deadline exceeded"),
])
def test_tpu_connection_errors_are_told_apart(message, problem):
    """Messages as reported from TPU VMs (no TPU here to produce them): each gets its own fix."""
    try:
        raise RuntimeError("cannot reach TPU 'local': " + message) from ValueError(message)
    except RuntimeError as err:
        finding = doctor._tpu_failure("local", err)
    assert finding.fatal and finding.problem.startswith(problem), finding
