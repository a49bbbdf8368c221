"""A local Google Cloud Storage for tests: `gs://` URLs served by `gcp-storage-emulator`, offline and fast.

Use the fixtures by importing them into a test module or conftest (`from gcs import gcs_bucket, gcs_dir`).
Code under test just calls fsspec with a `gs://` URL: the emulator and the gcsfs options travel in
environment variables (`EMULATOR_ENV`), so subprocesses started during the session (the CLI, Ray workers)
reach the same emulator with the same options.
"""

import copy
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

BUCKET = "kerasntk-test"

# What each variable buys (with all of them every operation takes ~1-50 ms):
EMULATOR_ENV = {
    # gcsfs sends every JSON API request here (read per request) instead of to storage.googleapis.com.
    "STORAGE_EMULATOR_HOST": "http://localhost:{port}",
    # Recent gcsfs (2026.10 here) makes `gcsfs.GCSFileSystem` its ExtendedGcsFileSystem, which asks the
    # Storage Control gRPC API for each bucket's layout; the emulator speaks HTTP only, the lookup retries for
    # 60 s and, as an UNKNOWN layout is never cached, again on every open/pipe/ls. "false" keeps the plain
    # HTTP class. Read when gcsfs is imported.
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    # fsspec default kwarg token="anon" (fsspec reads FSSPEC_<protocol>_<kwarg> at import): no credential
    # discovery (ADC, GCE metadata server) and no token refresh over the network.
    "FSSPEC_GCS_TOKEN": "anon",
    # For any code that still does credential discovery: skip the GCE metadata probe, have a project.
    "NO_GCE_CHECK": "true",
    "GOOGLE_CLOUD_PROJECT": "dummy-project",
}


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start_emulator(log_path, timeout=30.0):
    """An emulator subprocess (`gcs_emulator.py`: its uploads byte-exact) with an in-memory store and bucket
    BUCKET, once it answers; and its port."""
    for _ in range(3):  # the free port can be taken before the emulator binds it: retry on another
        port = _free_port()
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, str(pathlib.Path(__file__).with_name("gcs_emulator.py")), "start", "--host", "localhost",
                 "--port", str(port), "--in-memory", "--default-bucket", BUCKET, "-q"],
                stdout=log, stderr=subprocess.STDOUT)
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # as gcsfs's aiohttp
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with no_proxy.open(f"http://localhost:{port}/storage/v1/b/{BUCKET}", timeout=1):
                    return proc, port
            except OSError:
                time.sleep(0.05)
        proc.kill()
        proc.wait()
    raise RuntimeError(f"gcp-storage-emulator did not start; its log: {log_path}")


@pytest.fixture(scope="session")
def gcs_bucket(tmp_path_factory):
    """`gs://<bucket>` on a local emulator for the whole session, with the environment pointing gcsfs at it.

    The variables are set in os.environ (inherited by subprocesses) and, as fsspec and gcsfs read some of
    them at import, applied to this process's fsspec config and registry as well; all is restored at the end.
    """
    import fsspec
    import fsspec.config
    from fsspec.registry import _registry  # (`fsspec.registry` itself is a read-only view)

    saved_env = {k: os.environ.get(k) for k in EMULATOR_ENV}
    saved_conf = copy.deepcopy(fsspec.config.conf)
    saved_registry = {p: _registry.get(p) for p in ("gs", "gcs")}
    proc, port = _start_emulator(tmp_path_factory.mktemp("gcs") / "emulator.log")
    try:
        env = {k: v.format(port=port) for k, v in EMULATOR_ENV.items()}
        os.environ.update(env)
        import gcsfs.core  # the plain class, even if gcsfs was imported earlier with the extended default

        fsspec.config.set_conf_env(fsspec.config.conf, env)  # FSSPEC_GCS_* as fsspec reads them at import
        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
        gcsfs.core.GCSFileSystem.clear_instance_cache()
        yield f"gs://{BUCKET}"
    finally:
        proc.terminate()
        proc.wait(10)
        if "gcsfs.core" in sys.modules:  # drop instances (and their sessions) made for the emulator
            sys.modules["gcsfs.core"].GCSFileSystem.clear_instance_cache()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.config.conf.clear()
        fsspec.config.conf.update(saved_conf)
        for protocol, cls in saved_registry.items():
            if cls is None:
                _registry.pop(protocol, None)
            else:
                fsspec.register_implementation(protocol, cls, clobber=True)


@pytest.fixture
def gcs_dir(gcs_bucket):
    """A fresh `gs://<bucket>/<uuid>` prefix for one test (nothing exists under it); removed afterwards."""
    url = f"{gcs_bucket}/{uuid.uuid4().hex}"
    yield url
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
