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
from test_data import write_tfds_metadata

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


# Several doctor runs (and one strategy probe) in one interpreter: TensorFlow is imported once. Each scenario
# sets its environment variables (None: unset) and records exit status, stdout, stderr and warnings logged.
DOCTOR = """
import contextlib, io, json, logging, os, sys
from kerasntk import cli, distribute

logged = []
handler = logging.Handler()
handler.emit = lambda record: logged.append(record.getMessage())
logging.getLogger("kerasntk").addHandler(handler)
results = []
for argv, env in json.loads(sys.argv[1]):
    for name, value in env.items():
        os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)
    out, err = io.StringIO(), io.StringIO()
    logged.clear()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = type(distribute.get_strategy()).__name__ if argv == ["probe"] else cli.main(argv)
        except BaseException as exc:  # a traceback would be a failure of the one-line contract
            code = f"raised {type(exc).__name__}: {exc}"
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue(), "logged": list(logged)})
print("RESULTS " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def doctor_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("doctor")
    prepared, empty, root = tmp / "tfds", tmp / "empty", tmp / "tpuvm"
    write_tfds_metadata(prepared, "cifar10")
    empty.mkdir()
    tpu_vm(root, libtpu=False)
    no_tpu = {distribute.DEVICE_ROOT_VAR: None, "TPU_NAME": None}
    scenarios = {
        "default": (["doctor"], no_tpu),
        "data": (["doctor", "--data-dir", str(prepared), "--out", str(tmp / "run")], no_tpu),
        "local": (["doctor", "--tpu", "local"], no_tpu),
        "tpu_name": (["doctor"], {**no_tpu, "TPU_NAME": "no-such-tpu"}),
        "probe_name": (["probe"], {**no_tpu, "TPU_NAME": "no-such-tpu"}),
        "no_data": (["doctor", "--data-dir", str(empty)], no_tpu),
        "tpu_vm": (["doctor"], {**no_tpu, distribute.DEVICE_ROOT_VAR: str(root)}),
        "probe_vm": (["probe"], {**no_tpu, distribute.DEVICE_ROOT_VAR: str(root)}),
    }
    done = python(DOCTOR, args=[json.dumps(list(scenarios.values()))])
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert lines, done.stderr[-3000:]
    return dict(zip(scenarios, json.loads(lines[0][len("RESULTS "):]))), tmp


def errors(run):
    return [line for line in run["err"].splitlines() if line.startswith("kerasntk doctor: error:")]


def test_doctor_on_this_cpu_machine_exits_0_and_names_the_default_strategy(doctor_runs):
    run = doctor_runs[0]["default"]
    assert run["code"] == 0 and errors(run) == [], run
    assert "strategy        _DefaultDistributionStrategy with 1 replica(s)" in run["out"]
    assert "TPU target      none (GPUs or the CPU)" in run["out"] and "no problems found" in run["out"]
    assert f"tensorflow      {importlib.metadata.version('tensorflow')}" in run["out"]


def test_doctor_checks_a_data_dir_and_a_run_dir(doctor_runs):
    runs, tmp = doctor_runs
    assert runs["data"]["code"] == 0, runs["data"]
    assert f"{tmp / 'tfds'}: prepared cifar10 " in runs["data"]["out"]
    assert f"{tmp / 'run'}: writable" in runs["data"]["out"] and not (tmp / "run").exists()  # probe cleaned up
    assert runs["no_data"]["code"] == 1
    assert errors(runs["no_data"]) == [f"kerasntk doctor: error: data directory {tmp / 'empty'} holds none of "
                                       f"{', '.join(doctor.TFDS_DATASETS)} prepared; fix: tfds build cifar10 "
                                       f"--data_dir {tmp / 'empty'} on a machine with internet"]


@pytest.mark.parametrize("scenario, problem", [
    ("local", "TPU 'local' asked for, but this machine has no TPU device files"),
    ("tpu_name", "TPU name 'no-such-tpu' cannot be resolved"),
])
def test_doctor_asked_for_an_absent_tpu_exits_1_with_one_line(doctor_runs, scenario, problem):
    run = doctor_runs[0][scenario]
    assert run["code"] == 1, run
    (line,) = errors(run)  # one line: the problem and its fix, no traceback
    assert line.startswith(f"kerasntk doctor: error: {problem}") and "; fix: " in line, line
    assert "Traceback" not in run["err"] and "strategy        none:" in run["out"]


def test_on_a_tpu_vm_with_the_plain_tensorflow_doctor_names_the_install(doctor_runs):
    runs, tmp = doctor_runs
    run = runs["tpu_vm"]
    assert run["code"] == 1 and "TPU target      'local'" in run["out"], run
    assert errors(run) == [
        f"kerasntk doctor: error: TPU VM with the plain `tensorflow` build, which cannot drive a TPU (no "
        f"tensorflow-tpu); fix: {doctor.INSTALL_TPU}",
        f"kerasntk doctor: error: no libtpu (neither the libtpu package nor /lib/libtpu.so); fix: pip install "
        f"libtpu=={doctor.TPU_STACK['libtpu']}"]


@pytest.mark.parametrize("scenario, target", [("probe_vm", "local"), ("probe_name", "no-such-tpu")])
def test_unset_tpu_probes_this_vms_or_the_named_tpu_and_falls_back_with_a_warning(doctor_runs, scenario, target):
    run = doctor_runs[0][scenario]
    assert run["code"] == "_DefaultDistributionStrategy", run
    assert any(m.startswith(f"TPU {target!r} not reachable, using GPUs or the CPU") for m in run["logged"]), run


@pytest.mark.slow  # a second TensorFlow import (~15 s here)
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


def test_setup_cfg_tpu_extra_is_the_stack_doctor_checks():
    spec = importlib.util.spec_from_file_location("check_tpu_pins", REPO / "scripts" / "check_tpu_pins.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.extra_requirements() == doctor.TPU_STACK
