"""One file layer for local paths and object stores (`gs://` through fsspec/gcsfs).

Every file kerasntk writes goes through `atomic_file` or `atomic_dir`, so a reader never sees half of one:

- on a POSIX file system: a temporary name in the target's directory, fsync, one rename (then the
  directory is fsync'ed, so the rename survives a crash);
- on an object store: the file (or the directory's files) is written locally, then uploaded; a single
  object upload appears whole or not at all, and a directory counts as complete once its marker file
  (uploaded last) exists.

TensorFlow's own `gs://` support is not relied on (with TensorFlow 2.21 it needs a plugin that lags behind):
TensorFlow checkpoints and NetCDF files are written to local temporary paths and uploaded by this module.
"""

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile

import numpy as np


def is_remote(path):
    """True for URLs with a protocol other than the local file system (gs://, s3://, memory://, ...)."""
    protocol = _protocol(path)
    return protocol not in ("", "file", "local")


def absolute(path):
    """`path` made absolute when local (URLs are absolute already)."""
    return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def join(base, *parts):
    """`base` joined with `parts`, with "/" for URLs and the OS separator for local paths."""
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def exists(path):
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def isdir(path):
    if not is_remote(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


def listdir(path):
    """Names of the entries of directory `path` (files and subdirectories); [] when it does not exist."""
    if not is_remote(path):
        return sorted(os.listdir(path)) if os.path.isdir(path) else []
    fs, p = _fs(path)
    if not fs.exists(p):
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False) if e.rstrip("/") != p.rstrip("/"))


def makedirs(path):
    """Create directory `path` and its parents (a no-op on object stores, which have no directories)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def remove(path):
    """Remove file or directory tree `path` if it exists."""
    if not is_remote(path):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        return
    fs, p = _fs(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def open_file(path, mode="rb"):
    """An open file object (read modes only: writes go through `atomic_file`)."""
    if "r" not in mode:
        raise ValueError(f"open_file is for reading; write {path!r} with atomic_file")
    if not is_remote(path):
        return open(path, mode)
    fs, p = _fs(path)
    return fs.open(p, mode)


@contextlib.contextmanager
def local_path(path):
    """A local file path holding the contents of `path` (the path itself when local; a downloaded temporary
    copy of a remote file, removed on exit). For readers that need a real file, such as netCDF4."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    fs, p = _fs(path)
    with tempfile.TemporaryDirectory(prefix="kerasntk-") as tmp:
        local = os.path.join(tmp, posixpath.basename(p))
        fs.get(p, local)
        yield local


@contextlib.contextmanager
def local_dir(path):
    """A local directory holding the files of directory `path` (itself when local; a downloaded copy)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    fs, p = _fs(path)
    with tempfile.TemporaryDirectory(prefix="kerasntk-") as tmp:
        local = os.path.join(tmp, posixpath.basename(p.rstrip("/")))
        fs.get(p.rstrip("/") + "/", local, recursive=True)
        yield local


class Damaged(OSError):
    """A file or checkpoint that does not match the size or checksum recorded when it was written."""

    def __init__(self, path, problem, remedy=""):
        self.path, self.problem, self.remedy = os.fspath(path), problem, remedy
        super().__init__(f"{self.path} is damaged ({problem})" + (f"; {remedy}" if remedy else ""))


@contextlib.contextmanager
def atomic_file(path, sealed=False):
    """Yield a local temporary file path to write; on success it becomes `path` whole, on failure it is removed.

    POSIX: the temporary file sits beside `path` and is renamed over it. Object store: it is uploaded once.
    sealed: also record the file's SHA-256 in `path.sha256` (the format `sha256sum -c` reads), written after
    the file, so the seal marks it complete and `verify` can tell a damaged copy.
    """
    path = os.fspath(path)
    remote = is_remote(path)
    directory = tempfile.gettempdir() if remote else (os.path.dirname(os.path.abspath(path)))
    os.makedirs(directory, exist_ok=True)
    # the temporary name keeps the extension: some writers choose the format by it (Keras, matplotlib)
    extension = ".weights.h5" if path.endswith(".weights.h5") else os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{_basename(path)}.", suffix=".tmp" + extension, dir=directory)
    os.close(fd)
    try:
        try:
            yield tmp
        except OSError as err:  # a write to the temporary file failed (a full disk): name the file it was for
            if err.errno and (err.filename in (None, tmp) or err.filename2 == tmp):  # shutil names source, target
                raise OSError(err.errno, err.strerror, path) from err
            raise
        if sealed:
            remove(path + SEAL)  # a stale seal must not vouch for the new file while it is being renamed in
        if remote:
            _put(tmp, path)
        else:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            _fsync_dir(directory)
        if sealed:
            with atomic_file(path + SEAL) as seal, open(seal, "w") as f:
                f.write(f"{sha256(tmp if remote else path)}  {_basename(path)}\n")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


SEAL = ".sha256"


def is_sealed(path):
    """Whether `path` was written whole with `atomic_file(path, sealed=True)` (its seal exists)."""
    return exists(os.fspath(path) + SEAL)


def seal_problem(path, copy=None):
    """What is wrong with sealed file `path` (missing, no seal, a checksum that differs), or None when intact.
    `copy`: a local copy of it already at hand (a download), hashed instead of reading `path` again."""
    path = os.fspath(path)
    if not exists(path):
        return "the file is missing"
    if not exists(path + SEAL):
        return f"its checksum record {_basename(path)}{SEAL} is missing"
    with open_file(path + SEAL, "r") as f:
        recorded = f.read().split()[:1]
    if recorded != [sha256(copy or path)]:
        return "its SHA-256 differs from the one recorded when it was written"
    return None


def verify(path, copy=None):
    """Raise `Damaged` if file `path` (or `copy`, its local copy) has a seal it does not match (unsealed files
    pass: a user's own)."""
    if exists(os.fspath(path) + SEAL):
        problem = seal_problem(path, copy)
        if problem:
            raise Damaged(path, problem)


@contextlib.contextmanager
def atomic_dir(path, marker):
    """Yield a local temporary directory to fill; on success it becomes directory `path`, complete once the
    file named `marker` (which the caller must write into it) exists there.

    POSIX: the directory is renamed into place (a stale `path` without its marker is replaced). Object
    store: every file is uploaded, the marker last, so a reader that checks the marker never sees a part.
    """
    path = os.fspath(path)
    remote = is_remote(path)
    parent = tempfile.gettempdir() if remote else os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{_basename(path)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        if not os.path.exists(os.path.join(tmp, marker)):
            raise RuntimeError(f"atomic_dir: the marker {marker!r} was not written into {path!r}")
        if remote:
            _upload_dir(tmp, path, marker)
        else:
            if os.path.exists(path):  # a stale, incomplete copy (complete ones are never rewritten)
                shutil.rmtree(path)
            os.chmod(tmp, 0o755)
            os.replace(tmp, path)
            _fsync_dir(parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, obj):
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True))


def read_json(path):
    with open_file(path, "r") as f:
        return json.load(f)


def save_npy(path, array):
    """Write `array` to `path` as .npy, sealed (see `atomic_file`)."""
    with atomic_file(path, sealed=True) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(array))


def load_npy(path):
    """The array at `path`, verified against its seal (`Damaged` otherwise)."""
    verify(path)
    with open_file(path, "rb") as f:
        return np.load(f)


def sha256(path):
    """Hex SHA-256 of the file at `path`, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open_file(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def size(path):
    """Size in bytes of the file at `path`."""
    if not is_remote(path):
        return os.path.getsize(path)
    fs, p = _fs(path)
    return fs.size(p)


# -- internals ---------------------------------------------------------------------------------------------


def _protocol(path):
    path = os.fspath(path)
    return path.split("://", 1)[0] if "://" in path else ""


def _fs(path):
    """(file system, path) of a URL. Listings are not cached: other processes (Ray workers, a second
    runner) write into the same run directory, and a cached listing would hide their files."""
    import fsspec  # imported on first use of a URL: local runs do not need it loaded

    return fsspec.core.url_to_fs(os.fspath(path), use_listings_cache=False)


def _basename(path):
    return posixpath.basename(os.fspath(path).rstrip("/")) or "file"


def _upload_dir(local, path, marker):
    fs, p = _fs(path)
    p = p.rstrip("/")
    if fs.exists(p):
        fs.rm(p, recursive=True)
    for root, _, names in os.walk(local):
        for name in sorted(names):
            if root == local and name == marker:
                continue
            rel = os.path.relpath(os.path.join(root, name), local).replace(os.sep, "/")
            _put(os.path.join(root, name), f"{path.rstrip('/')}/{rel}")
    _put(os.path.join(local, marker), f"{path.rstrip('/')}/{marker}")
    fs.invalidate_cache(p)


def _put(local, path):
    """Upload file `local` to object `path` and check the stored size: an upload the store keeps shorter or
    longer than sent (a proxy or server that mangles the request body) is tried once more, then removed (a
    wrong object must not pass for the file; what it replaced is gone already) and fails here, not at a
    later read."""
    fs, p = _fs(path)
    sent = os.path.getsize(local)
    for _ in range(2):
        fs.put_file(local, p)
        stored = fs.size(p)
        if stored == sent:
            return
    with contextlib.suppress(FileNotFoundError):
        fs.rm(p)
    raise Damaged(path, f"the store kept {stored} of the {sent} bytes uploaded", "run the command again")


def _fsync_dir(directory):
    """Persist a rename (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
