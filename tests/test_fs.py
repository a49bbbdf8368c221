"""The file layer on a local directory and on gs:// (a real GCS emulator server): atomic files and
directories, listings that see other processes' writes, no temporary file left behind."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kerasntk import fs
from gcs import gcs_bucket, gcs_dir  # noqa: F401  (fixtures)


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
    """A fresh directory: local, or a prefix in the emulator's bucket."""
    return str(tmp_path / "root") if request.param == "local" else request.getfixturevalue("gcs_dir")


def in_subprocess(code):
    """stdout of `code` run by a new Python process (which inherits the environment, emulator included)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=120, check=True)
    return out.stdout.strip()


def test_atomic_file_json_npy_and_listing(root):
    fs.makedirs(root)
    fs.write_json(fs.join(root, "a", "x.json"), {"k": [1, 2]})
    fs.save_npy(fs.join(root, "a", "k.npy"), np.arange(6.0).reshape(2, 3))
    assert fs.read_json(fs.join(root, "a", "x.json")) == {"k": [1, 2]}
    np.testing.assert_array_equal(fs.load_npy(fs.join(root, "a", "k.npy")), np.arange(6.0).reshape(2, 3))
    assert fs.listdir(fs.join(root, "a")) == ["k.npy", "k.npy.sha256", "x.json"] and fs.listdir(fs.join(root, "none")) == []
    assert fs.isdir(fs.join(root, "a")) and not fs.exists(fs.join(root, "a", "y.json"))
    with fs.local_path(fs.join(root, "a", "x.json")) as local:
        assert open(local).read().startswith("{")
    fs.remove(fs.join(root, "a"))
    assert not fs.exists(fs.join(root, "a", "x.json"))


def test_a_failed_write_leaves_the_old_file_and_no_temporary(root):
    path = fs.join(root, "r.json")
    fs.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError, match="disk full"):
        with fs.atomic_file(path) as tmp:
            open(tmp, "w").write('{"v": 2, "trunc')
            raise RuntimeError("disk full")
    assert fs.read_json(path) == {"v": 1} and fs.listdir(root) == ["r.json"]


def test_atomic_dir_appears_with_its_marker_and_is_read_back(root, tmp_path):
    target = fs.join(root, "checkpoints", "step_00000003")
    with fs.atomic_dir(target, "meta.json") as tmp:
        open(f"{tmp}/data.bin", "wb").write(b"d" * 100_000)
        fs.write_json(f"{tmp}/meta.json", {"step": 3})
    assert fs.listdir(target) == ["data.bin", "meta.json"]
    with fs.local_dir(target) as local:
        assert open(f"{local}/data.bin", "rb").read() == b"d" * 100_000
    with pytest.raises(RuntimeError, match="marker 'meta.json' was not written"):
        with fs.atomic_dir(fs.join(root, "checkpoints", "step_00000004"), "meta.json") as tmp:
            open(f"{tmp}/data.bin", "wb").write(b"half")
    assert fs.listdir(fs.join(root, "checkpoints")) == ["step_00000003"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_sealed_files_and_checkpoints_verify_and_name_what_is_damaged(root):
    """A seal (and a checkpoint's recorded sizes and checksums) tells an intact copy from a truncated or
    bit-flipped one, locally and on the object store."""
    import tensorflow as tf

    from kerasntk import rundir

    path = fs.join(root, "k.npy")
    fs.save_npy(path, np.arange(1000.0))
    assert fs.is_sealed(path) and fs.seal_problem(path) is None
    with fs.local_path(path) as local:
        good = open(local, "rb").read()
    for damaged, problem in ((good[:100], "SHA-256 differs"), (good[:-1] + bytes([good[-1] ^ 1]), "SHA-256 differs")):
        with fs.atomic_file(path) as tmp:  # an unsealed rewrite: the old seal stays and no longer matches
            open(tmp, "wb").write(damaged)
        assert problem in fs.seal_problem(path)
        with pytest.raises(fs.Damaged, match=f"{path} is damaged .*{problem}"):
            fs.load_npy(path)

    job = rundir.JobDir(fs.join(root, "job"))
    job.save_checkpoint(tf.train.Checkpoint(v=tf.Variable(np.arange(100.0))), 7, {})
    assert job.damaged() == []
    data = fs.join(job.checkpoint_path(7), "ckpt.data-00000-of-00001")
    with fs.local_path(data) as local:
        truncated = open(local, "rb").read()[:10]
    with fs.atomic_file(data) as tmp:
        open(tmp, "wb").write(truncated)
    [(where, why)] = job.damaged()
    assert where == job.checkpoint_path(7) and why.startswith("ckpt.data-00000-of-00001 has 10 bytes where")
    with pytest.raises(fs.Damaged, match="has 10 bytes where"):
        job.read_checkpoint(tf.train.Checkpoint(v=tf.Variable(np.zeros(100))), 7)


def test_the_latest_checkpoint_is_where_a_job_resumes(tmp_path):
    """Grid and resume checkpoints by step, the resume one on a tie, none after `before`, only complete ones."""
    import tensorflow as tf

    from kerasntk import rundir

    job, state = rundir.JobDir(str(tmp_path / "job")), tf.train.Checkpoint(v=tf.Variable(1.0))
    assert job.latest_checkpoint() is None
    for step, kind in ((4, "checkpoints"), (4, "resume"), (8, "checkpoints")):
        job.save_checkpoint(state, step, {}, kind=kind)
    fs.makedirs(fs.join(job.path, "resume", "step_00000009"))  # no meta.json: incomplete
    assert job.latest_checkpoint() == (8, "checkpoints")
    assert job.latest_checkpoint(before=7) == (4, "resume")
    assert job.latest_checkpoint(before=7, kinds=("checkpoints",)) == (4, "checkpoints")
    assert job.latest_checkpoint(before=3) is None


def test_listings_see_what_another_process_writes_overwrites_and_removes(root):
    fs.write_json(fs.join(root, "one.json"), [1])
    assert fs.listdir(root) == ["one.json"]  # a listing that a cache would keep
    in_subprocess(f"""
        from kerasntk import fs
        fs.write_json(fs.join({root!r}, "one.json"), [1, 1, 1, 1, 1, 1, 1])
        fs.write_json(fs.join({root!r}, "two.json"), [2])
    """)
    assert fs.listdir(root) == ["one.json", "two.json"] and fs.exists(fs.join(root, "two.json"))
    assert fs.read_json(fs.join(root, "one.json")) == [1] * 7  # not cut at the old size
    in_subprocess(f"from kerasntk import fs; fs.remove(fs.join({root!r}, 'two.json'))")
    assert fs.listdir(root) == ["one.json"]


def test_every_byte_of_a_file_and_a_directory_arrives(root):
    """Files ending in each line-break byte, and 64 random ones, are read back exactly (an upload parser
    that takes a final "\\r" for part of a line break would shorten them by one byte)."""
    rng = np.random.default_rng(0)
    contents = [b"end\r", b"end\n", b"end\r\n", b"\r"] + [rng.bytes(int(n)) for n in rng.integers(1, 500, 64)]
    for i, content in enumerate(contents):
        with fs.atomic_file(fs.join(root, f"f{i}")) as tmp:
            open(tmp, "wb").write(content)
    with fs.atomic_dir(fs.join(root, "d"), "marker") as tmp:
        for i, content in enumerate(contents):
            open(f"{tmp}/f{i}", "wb").write(content)
        open(f"{tmp}/marker", "wb").write(b"\r")
    for folder in (root, fs.join(root, "d")):
        for i, content in enumerate(contents):
            with fs.open_file(fs.join(folder, f"f{i}"), "rb") as f:
                assert f.read() == content, (folder, i)


def test_an_upload_the_store_keeps_short_is_refused(gcs_dir, monkeypatch, tmp_path):
    """A store that keeps fewer bytes than were sent (a stand-in for a mangling proxy or server, wrapped
    around the real emulator): tried twice, then the short object is removed and the write fails, naming
    the file."""
    store_of, uploads = fs._fs, []

    class Shortening:
        def __init__(self, store):
            self.store = store

        def put_file(self, local, path):
            uploads.append(path)
            short = tmp_path / "short"
            short.write_bytes(open(local, "rb").read()[:-1])
            self.store.put_file(str(short), path)

        def __getattr__(self, name):
            return getattr(self.store, name)

    def shortening_fs(path):
        store, p = store_of(path)
        return Shortening(store), p

    monkeypatch.setattr(fs, "_fs", shortening_fs)
    path = fs.join(gcs_dir, "x.json")
    with pytest.raises(fs.Damaged, match=rf"{path} is damaged \(the store kept 9 of the 10 bytes uploaded\); run the command again"):
        fs.write_json(path, [1, 2])
    assert len(uploads) == 2 and not fs.exists(path)
