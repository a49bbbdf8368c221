"""What went wrong, in one line: faults of the environment (a full disk, a read-only or unwritable place, a
directory that vanished) said the same way whether Python or TensorFlow's checkpoint writer met them, each
with what to do. The CLI prints these lines; `JobFailed` carries them."""

import errno
import os
import re

_RERUN = "then run the same command again: it continues where it stopped"
_REMEDIES = {
    errno.ENOSPC: f"free space there or choose another run directory (--out), {_RERUN}",
    errno.EDQUOT: f"free space within the quota or choose another run directory (--out), {_RERUN}",
    errno.EROFS: f"the file system is read-only: choose a writable run directory (--out), {_RERUN}",
    errno.EACCES: f"make it writable for this user or choose another run directory (--out), {_RERUN}",
    errno.EPERM: f"make it writable for this user or choose another run directory (--out), {_RERUN}",
    errno.ENOENT: f"it vanished while kerasntk ran (a removed or unmounted directory?): restore it, {_RERUN}",
}
# TensorFlow's file errors (tf.errors.OpError) carry no errno: their message ends "PATH; <strerror>"
_TF_REASONS = {os.strerror(code): code for code in _REMEDIES}


def os_error(err):
    """`err` as an OSError with an errno kerasntk knows a remedy for (from an OSError or from TensorFlow's
    message), or None."""
    if isinstance(err, OSError) and err.errno in _REMEDIES:
        return err
    text = str(err)
    for reason, code in _TF_REASONS.items():
        found = re.search(r"(\S+); " + re.escape(reason), text)
        if found:
            return OSError(code, reason, found.group(1))
    return None


def one_line(err):
    """`err` described in one line: an environment fault as what, where and what to do; anything else as its
    message with line breaks folded."""
    fault = os_error(err)
    if fault is not None:
        where = f" ({_written_place(fault.filename)})" if fault.filename else ""
        return f"{fault.strerror[0].lower()}{fault.strerror[1:]}{where}: {_REMEDIES[fault.errno]}"
    return " ".join(str(err).split())


def _written_place(path):
    """The directory a failed write was for: the part of `path` before kerasntk's hidden temporary names."""
    path = os.fspath(path)
    hidden = re.search(r"/\.[^/]*\.tmp", path)
    return path[:hidden.start()] if hidden else path
