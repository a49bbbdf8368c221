"""Check with pip's resolver that the `tpu` extra installs exactly the pinned Cloud TPU stack.

    python scripts/check_tpu_pins.py            # needs the package registry; about a minute per resolution

1. `pip install --dry-run --ignore-installed --report` of this checkout with the `tpu` extra, for this
   interpreter (what `pip install ".[tpu]"` would install): tensorflow, tensorflow-tpu and libtpu must
   resolve to the pins of pyproject.toml, which must equal `kerasntk.doctor.TPU_STACK`.
2. For every Python of `doctor.TPU_PYTHONS`, the extra's own requirements as binary wheels for Linux x86-64
   (`--python-version`, `--only-binary=:all:`): they must resolve to the same pins; one Python past the
   range must not (no wheels), so the range is the wheels' and not a guess.

Prints one line per resolution and tensorflow-tpu's own libtpu requirement; exits 1 on any mismatch. Not a
test of the suite: it needs the network.
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from kerasntk import doctor  # noqa: E402  (imports no TensorFlow)

# A TPU VM's wheel tags (Ubuntu 22.04: glibc 2.35), listed out: this pip does not expand manylinux tags itself.
PLATFORMS = (*(f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)), "manylinux2014_x86_64")
SHOWN = ("tensorflow", "tensorflow-tpu", "libtpu", "keras", "numpy", "protobuf")


def extra_requirements():
    """The `tpu` extra of pyproject.toml as {name: version} (every entry must be an exact pin)."""
    import tomllib  # Python 3.11+: the script runs on the maintainer's machine, not on users'

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["tpu"]
    pins = {}
    for line in extra:
        name, _, version = line.partition("==")
        if not version:
            raise SystemExit(f"pyproject.toml: the tpu extra's {line!r} is not an exact pin (name==version)")
        pins[name.lower()] = version
    return pins


def resolve(requirements, python=None):
    """{name: version} pip would install for `requirements` (for `python`, binary wheels only), or the error."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--report", report]
        if python:
            command += ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
                        "--target", os.path.join(tmp, "target")]
            command += [arg for p in PLATFORMS for arg in ("--platform", p)]
        done = subprocess.run(command + list(requirements), capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
            return None, (errors or ["pip failed"])[0]
        with open(report) as f:
            installed = json.load(f)["install"]
    versions = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"]["version"] for i in installed}
    libtpu_req = next((r for i in installed if i["metadata"]["name"].lower().replace("_", "-") == "tensorflow-tpu"
                       for r in i["metadata"].get("requires_dist", []) if r.startswith("libtpu")), None)
    return (versions, libtpu_req), None


def check(label, requirements, pins, python=None, expect_wheels=True):
    """Resolve, print one line, and return whether the outcome is the expected one."""
    resolved, error = resolve(requirements, python)
    if resolved is None:
        print(f"{label:28s} no resolution: {error}")
        return not expect_wheels
    versions, libtpu_req = resolved
    wrong = {n: versions.get(n) for n, v in pins.items() if versions.get(n) != v}
    shown = " ".join(f"{n}=={versions[n]}" for n in SHOWN if n in versions)
    print(f"{label:28s} {'OK' if not wrong else f'MISMATCH {wrong}'}: {shown} ({len(versions)} packages; "
          f"tensorflow-tpu requires {libtpu_req!r})")
    return expect_wheels and not wrong


def main():
    pins = extra_requirements()
    ok = pins == doctor.TPU_STACK
    print(f"pyproject.toml tpu extra: {pins}" + ("" if ok else f"; differs from kerasntk.doctor.TPU_STACK {doctor.TPU_STACK}"))
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    ok &= check(f".[tpu] on this Python {here}", [".[tpu]"], pins)
    (lo_major, lo_minor), (hi_major, hi_minor) = doctor.TPU_PYTHONS
    extra = [f"{n}=={v}" for n, v in pins.items()]
    for minor in range(lo_minor, hi_minor + 1):
        ok &= check(f"tpu extra, wheels for {lo_major}.{minor}", extra, pins, python=f"{lo_major}.{minor}")
    ok &= check(f"tpu extra, wheels for {hi_major}.{hi_minor + 1}", extra, pins, python=f"{hi_major}.{hi_minor + 1}",
                expect_wheels=False)
    print("all resolutions as pinned" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
