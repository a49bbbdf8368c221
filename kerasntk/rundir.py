"""The run directory: the only code that knows its layout and the checkpoint format.

    RUN/config.json                                   the config (a different config in the same place is refused)
    RUN/version.json                                  the kerasntk version that made the run (another one warns)
    RUN/parent/                                       the parent's training job            (a JobDir)
    RUN/children/sXXXXXXXX_cC/                        child C spawned at parent step X     (a JobDir)
    RUN/linearized/sXXXXXXXX/                         the parent's linearization at step X (a JobDir)
    RUN/results/{parent,linearized_s*,child_s*_c*,pair_s*}.nc   one NetCDF file per measurement job
    RUN/results.nc, RUN/figures/*.png|pdf             merged results and figures
    RUN/failed/<job>.json                             why a job failed (removed when it succeeds)
    RUN/tensorboard/<job id>/events.out.tfevents.*    TensorBoard event files, one run per job (`summaries`)

    JOB/checkpoints/step_XXXXXXXX/{ckpt.*,meta.json}  permanent checkpoints (model, optimizer, step) on the grid;
                                                      meta.json also records every file's size and SHA-256
    JOB/resume/step_XXXXXXXX/{ckpt.*,meta.json}       the latest in-run checkpoint (older ones are removed)
    JOB/history.json                                  per-epoch losses and errors
    JOB/kernels/step_XXXXXXXX.npy                     the probe-set NTK at a checkpoint (a cache)
    JOB/kernels/step_XXXXXXXX_layers.npy              its per-layer terms (L, N, N), Θ = Σ_l Θ_l (a cache)

A checkpoint directory is complete once its `meta.json` exists: it is written with `fs.atomic_dir`, whose
marker is that file. `RUN` may be a local path or a `gs://` URL.
"""

import contextlib
import logging
import os

from kerasntk import config as cfg
from kerasntk import fs

log = logging.getLogger(__name__)
META = "meta.json"
_OWN_FILES = ("data.npz", "model.keras")  # a SpawnCheckpoint run's data and model, named relative to the run
_PREFIX = "ckpt"


class JobDir:
    """One training job's directory: its checkpoints, resume state, history and kernels."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __repr__(self):
        return f"JobDir({self.path!r})"

    def checkpoint_steps(self, kind="checkpoints"):
        """Steps of the complete checkpoints of `kind` ("checkpoints": the grid, or "resume"), sorted."""
        root = fs.join(self.path, kind)
        steps = []
        for name in fs.listdir(root):
            if name.startswith("step_") and name[5:].isdigit() and fs.exists(fs.join(root, name, META)):
                steps.append(int(name[5:]))
        return sorted(steps)

    def has_checkpoint(self, step):
        return fs.exists(fs.join(self._checkpoint(step), META))

    def save_checkpoint(self, checkpoint, step, meta, kind="checkpoints"):
        """Write `checkpoint` (a tf.train.Checkpoint) and `meta` as the checkpoint of `step`; an existing
        complete one is kept (its contents are a function of the step). Resume checkpoints replace older ones."""
        target = self._checkpoint(step, kind)
        if not fs.exists(fs.join(target, META)):
            with fs.atomic_dir(target, META) as tmp:
                checkpoint.write(os.path.join(tmp, _PREFIX))
                files = {name: dict(bytes=fs.size(os.path.join(tmp, name)), sha256=fs.sha256(os.path.join(tmp, name)))
                         for name in sorted(os.listdir(tmp))}
                fs.write_json(os.path.join(tmp, META), dict(meta, step=int(step), files=files))
        if kind == "resume":
            for old in self.checkpoint_steps("resume"):
                if old < step:
                    fs.remove(self._checkpoint(old, "resume"))
        return target

    def read_checkpoint(self, checkpoint, step, kind="checkpoints", partial=False):
        """Restore `checkpoint` from the checkpoint of `step`; `partial` allows objects the file lacks or
        `checkpoint` does not track (e.g. reading only the model of a model+optimizer checkpoint)."""
        read_checkpoint_dir(checkpoint, self._checkpoint(step, kind), partial)
        return self.meta(step, kind)

    def meta(self, step, kind="checkpoints"):
        return fs.read_json(fs.join(self._checkpoint(step, kind), META))

    def damaged(self):
        """(path, problem) of every checkpoint of this job (grid and resume) that fails its recorded sizes and
        checksums."""
        found = []
        for kind in ("checkpoints", "resume"):
            for step in self.checkpoint_steps(kind):
                problem = checkpoint_problem(self._checkpoint(step, kind))
                if problem:
                    found.append((self._checkpoint(step, kind), problem))
        return found

    def remove_checkpoint(self, step, kind="checkpoints"):
        fs.remove(self._checkpoint(step, kind))

    def latest_checkpoint(self, before=None, kinds=("checkpoints", "resume")):
        """(step, kind) of the latest complete checkpoint of `kinds` (a tuple) at or before step `before`
        (default: any), the later kind on a tie; None if there is none. What a resumed job starts from."""
        found = [(step, kind) for kind in kinds for step in self.checkpoint_steps(kind)
                 if before is None or step <= before]
        return max(found, key=lambda sk: (sk[0], kinds.index(sk[1]))) if found else None

    def checkpoint_path(self, step):
        """The directory of grid checkpoint `step` (for `read_checkpoint_dir`, `tf.train.load_checkpoint`)."""
        return self._checkpoint(step)

    def read_history(self):
        path = fs.join(self.path, "history.json")
        return fs.read_json(path) if fs.exists(path) else []

    def write_history(self, history):
        fs.write_json(fs.join(self.path, "history.json"), history)

    def write_divergence(self, record):
        """Record that this job's training diverged (kept as a result, spawn.diverged=record)."""
        fs.write_json(fs.join(self.path, "diverged.json"), record)

    def divergence(self):
        """The divergence record of this job, or None."""
        path = fs.join(self.path, "diverged.json")
        return fs.read_json(path) if fs.exists(path) else None

    def kernel_path(self, step):
        return fs.join(self.path, "kernels", f"step_{int(step):08d}.npy")

    def layer_kernel_path(self, step):
        """The per-layer kernel (L, N, N) at `step`; its layer names are the model's (ntk fn.layer_names)."""
        return fs.join(self.path, "kernels", f"step_{int(step):08d}_layers.npy")

    def _checkpoint(self, step, kind="checkpoints"):
        return fs.join(self.path, kind, f"step_{int(step):08d}")


class RunDir:
    """Every path of a run directory; job directories as `JobDir`s."""

    def __init__(self, root):
        self.root = os.fspath(root)

    def __repr__(self):
        return f"RunDir({self.root!r})"

    # -- config ------------------------------------------------------------------------------------------

    @property
    def config_path(self):
        return fs.join(self.root, "config.json")

    def prepare(self, config):
        """Create the run directory holding `config.json`; refuse one made with a different config (machine
        fields, `cfg.MACHINE_FIELDS`, may differ)."""
        if fs.exists(self.config_path):
            stored = cfg.from_dict(fs.read_json(self.config_path))
            if stored.identity() != config.identity():
                raise cfg.ConfigError(
                    f"run directory {self.root!r} was made with a different config; pass another --out, "
                    f"or re-run with the stored one: kerasntk run {self.config_path}")
            self._check_version()
        else:
            fs.makedirs(self.root)
            self._record_version()
            fs.write_json(self.config_path, config.to_dict())
        return self

    def write_config(self, config):
        """Store `config`, replacing the stored one (for writers that refine it, such as SpawnCheckpoint)."""
        if not fs.exists(self.version_path):
            self._record_version()
        fs.write_json(self.config_path, config.to_dict())

    @property
    def write_probe(self):
        """A scratch file `kerasntk doctor` writes and removes to check that the directory is writable."""
        return fs.join(self.root, ".kerasntk-doctor-probe.json")

    def load_config(self, overrides=()):
        """The stored config, validated; `overrides` may set this machine's fields only."""
        if not fs.exists(self.config_path):
            raise cfg.ConfigError(f"{self.root!r} is not a kerasntk run directory (no config.json); "
                                  "make one with `kerasntk train` or `kerasntk run`")
        for item in overrides:
            if item.partition("=")[0].strip() not in cfg.MACHINE_FIELDS:
                raise cfg.ConfigError(f"--set {item!r}: a run directory's config is fixed; only this machine's "
                                      f"fields may be set: {', '.join(cfg.MACHINE_FIELDS)}")
        with fs.local_path(self.config_path) as local:
            config = cfg.load(local, overrides)
        if config.data.path in _OWN_FILES:  # a SpawnCheckpoint run's own data and model travel with it
            config.data.path = fs.join(self.root, config.data.path)
        if config.model.options.get("path") in _OWN_FILES:
            config.model.options = dict(config.model.options, path=fs.join(self.root, config.model.options["path"]))
        self._check_version()
        return config

    def own_file(self, path):
        """`path` as a config stores it: a file of this run directory by its name (so the directory can move),
        any other path as given."""
        name = os.path.basename(path)
        return name if name in _OWN_FILES and path == fs.join(self.root, name) else path

    # -- the kerasntk version that made the run ------------------------------------------------------------

    @property
    def version_path(self):
        return fs.join(self.root, "version.json")

    def _record_version(self):
        from kerasntk import __version__

        fs.write_json(self.version_path, dict(kerasntk=__version__))

    def _check_version(self):
        """A warning line when this kerasntk is not the version that made the run: its results may mix versions."""
        from kerasntk import __version__

        made_by = fs.read_json(self.version_path).get("kerasntk") if fs.exists(self.version_path) else None
        if made_by != __version__:
            log.warning("run directory %s was made by kerasntk %s; this is kerasntk %s, whose results may differ "
                        "from the ones already there", self.root, made_by or "older than 0.1.0", __version__)

    # -- jobs --------------------------------------------------------------------------------------------

    @property
    def parent(self):
        return JobDir(fs.join(self.root, "parent"))

    def child(self, step, child):
        return JobDir(fs.join(self.root, "children", f"s{int(step):08d}_c{int(child)}"))

    def linearized(self, step):
        return JobDir(fs.join(self.root, "linearized", f"s{int(step):08d}"))

    # -- results -----------------------------------------------------------------------------------------

    def result(self, kind, step=None, child=None):
        """Path of a measurement job's file: results/parent.nc, linearized_s{step}.nc, child_s{step}_c{child}.nc,
        pair_s{step}.nc."""
        names = dict(parent=lambda: "parent.nc", linearized=lambda: f"linearized_s{int(step):08d}.nc",
                     child=lambda: f"child_s{int(step):08d}_c{int(child)}.nc", pair=lambda: f"pair_s{int(step):08d}.nc")
        if kind not in names:
            raise ValueError(f"job kind must be one of {sorted(names)}; got {kind!r}")
        return fs.join(self.root, "results", names[kind]())

    def result_paths(self):
        """Every measurement job's file, parent.nc first (its attributes become the run's)."""
        folder = fs.join(self.root, "results")
        names = [n for n in fs.listdir(folder) if n.endswith(".nc") and not n.startswith(".")]
        return [fs.join(folder, n) for n in sorted(names, key=lambda n: (n != "parent.nc", n))]

    # -- a SpawnCheckpoint run: the user's model and data -------------------------------------------------

    @property
    def model_file(self):
        return fs.join(self.root, "model.keras")

    @property
    def data_file(self):
        return fs.join(self.root, "data.npz")

    # -- failed jobs -----------------------------------------------------------------------------------------

    def failure_path(self, job_id):
        """RUN/failed/<job id>.json: why a job failed (kept until it succeeds), for `kerasntk run` and `check`."""
        return fs.join(self.root, "failed", job_id.replace("/", "_") + ".json")

    def mark_failed(self, job_id, error):
        fs.write_json(self.failure_path(job_id), dict(job=job_id, error=type(error).__name__, message=str(error)))

    def clear_failed(self, job_id):
        fs.remove(self.failure_path(job_id))

    def failures(self):
        """{job id: the stored failure} of the jobs that failed and have not succeeded since."""
        folder = fs.join(self.root, "failed")
        stored = [fs.read_json(fs.join(folder, n)) for n in fs.listdir(folder) if n.endswith(".json") and not n.startswith(".")]
        return {f["job"]: f for f in stored}

    def tensorboard(self, job_id=None):
        """RUN/tensorboard (`tensorboard --logdir` it), or the event-file directory of job `job_id` in it."""
        return fs.join(self.root, "tensorboard", *([job_id] if job_id else []))

    @property
    def merged(self):
        return fs.join(self.root, "results.nc")

    @property
    def figures(self):
        return fs.join(self.root, "figures")


def is_checkpoint_dir(path):
    """Whether `path` is a complete kerasntk checkpoint directory."""
    return fs.exists(fs.join(path, META))


def read_checkpoint_dir(checkpoint, path, partial=False):
    """Restore `checkpoint` (a tf.train.Checkpoint) from checkpoint directory `path` (local or gs://), verified
    first (`fs.Damaged` when a file fails its recorded size or checksum); `partial` allows objects the file
    lacks or `checkpoint` does not track."""
    with fs.local_dir(path) as local:
        problem = _checkpoint_problem(local)
        if problem:
            raise fs.Damaged(path, problem)
        status = checkpoint.read(os.path.join(local, _PREFIX))
        if partial:
            status.expect_partial()
        else:
            status.assert_existing_objects_matched()


def checkpoint_problem(path):
    """What is wrong with checkpoint directory `path` against the sizes and SHA-256 sums its meta.json records,
    or None when it is intact (checkpoints written before kerasntk recorded them pass)."""
    with fs.local_dir(path) as local:
        return _checkpoint_problem(local)


def _checkpoint_problem(local):
    try:
        recorded = fs.read_json(os.path.join(local, META)).get("files", {})
    except (OSError, ValueError) as err:
        return f"{META} cannot be read: {err}"
    for name, want in recorded.items():
        path = os.path.join(local, name)
        if not os.path.exists(path):
            return f"{name} is missing"
        if os.path.getsize(path) != want["bytes"]:
            return f"{name} has {os.path.getsize(path)} bytes where {want['bytes']} were written"
        if fs.sha256(path) != want["sha256"]:
            return f"{name} differs from its SHA-256 recorded when it was written"
    return None


def is_run_dir(path):
    with contextlib.suppress(OSError, ValueError):
        return fs.exists(RunDir(path).config_path)
    return False

