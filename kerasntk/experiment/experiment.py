"""The spawning experiment's jobs (README "What a run measures"): what each job of the job graph computes.

`Experiment` loads the data, the grid and the probe set once and runs one job by id (`run_job`); which jobs
run where and when is the executors' business (`experiment.executors`). Measurements use a scratch model of
their own; each training job builds its own model and optimizer.
"""

import contextlib
import functools

import numpy as np
import tensorflow as tf

from kerasntk import config as cfg
from kerasntk import data, faults, fs, hessian, kernel_learning, landscape, models, ntk, plots, results, rundir, summaries, training
from kerasntk.evaluation import Evaluator
from kerasntk.experiment import jobs as graph
from kerasntk.experiment.grid import Grid
from kerasntk.rundir import RunDir


def child_seeds(config, step, child):
    """Independent data-order and augmentation seeds of child `child` spawned at `step` (a pure function)."""
    t = config.train
    data_seed, augment_seed = np.random.SeedSequence([t.data_seed, t.augment_seed, step, child + 1]).generate_state(2)
    return int(data_seed), int(augment_seed)


class Experiment:
    """The jobs of one run directory, sharing the loaded data, grid, strategy and probe set. arrays: the
    config's dataset if already loaded (replicates share theirs)."""

    def __init__(self, config, run_dir, strategy=None, verbose=1, arrays=None):
        self.config, self.run, self.verbose = config, RunDir(run_dir), verbose
        self.strategy = strategy or tf.distribute.get_strategy()
        self.arrays = training.load_data(config) if arrays is None else arrays
        steps_per_epoch = data.steps_per_epoch(self.arrays, config.train.batch_size)
        cfg.validate_against(config, steps_per_epoch, self.strategy.num_replicas_in_sync)
        self.grid = Grid.from_config(config, steps_per_epoch)
        self.jobs = graph.job_graph(config, self.grid)
        n, la = config.ntk, config.landscape
        self.x_probe, self.y_probe = data.probe_subset(self.arrays.x_train, self.arrays.y_train, n.probe_size, n.probe_seed)
        rng = np.random.default_rng(config.train.data_seed)
        self.train_subset = rng.permutation(len(self.arrays.x_train))[:la.train_examples]
        self.bn_subset = rng.permutation(len(self.arrays.x_train))[:la.bn_examples]
        self._model = self._ntk_fn = self._layer_ntk_fn = self._hvp = None

    @property
    def model(self):
        """The scratch model measurements load weights into (built on first use)."""
        if self._model is None:
            with self.strategy.scope():
                a = self.arrays
                self._model = models.get(self.config.model.name, a.input_shape, a.num_classes,
                                         **self.config.model.options)
        return self._model

    @functools.cached_property
    def evaluator(self):
        """Errors and losses of the scratch model, computed as the trainer computes its history's (the same batch
        size, strategy and compilation), so a checkpoint's numbers agree across files."""
        t = self.config.train
        return Evaluator(self.model, t.eval_batch_size, strategy=self.strategy,
                         jit_compile=training.use_xla(t.jit_compile, self.strategy))

    def plan(self):
        """What the run will do, without training: data, model, grids and job counts (for --dry-run)."""
        a, c, g = self.arrays, self.config, self.grid
        counts = {}
        for job in self.jobs:
            counts[job.kind] = counts.get(job.kind, 0) + 1
        return dict(
            dataset=f"{a.name}: {len(a.x_train)} train / {len(a.x_test)} test, input {a.input_shape}, {a.num_classes} classes",
            model=f"{c.model.name}: {self.model.count_params()} parameters",
            strategy=f"{type(self.strategy).__name__} with {self.strategy.num_replicas_in_sync} replica(s)",
            steps=f"{g.total} steps ({g.steps_per_epoch} per epoch)",
            checkpoints=[round(g.epochs(s), 4) for s in g.checkpoints],
            spawn_times=[round(g.epochs(s), 4) for s in g.spawn],
            child_jobs=len(g.spawn) * c.spawn.children,
            linearized_jobs=[round(g.epochs(s), 4) for s in g.linearize],
            probe=f"{len(self.x_probe)} examples",
            batchnorm=self.batchnorm_statistics() or "no BatchNormalization",
            jobs=", ".join(f"{n} {k}" for k, n in counts.items()),
        )

    def run_job(self, job):
        """Run `job` (a `Job` or its id) unless it is done; returns True when it ran. A job that raises is recorded
        in RUN/failed/ until it succeeds (`kerasntk check` lists it)."""
        job = graph.by_id(self.jobs, job) if isinstance(job, str) else job
        if graph.is_done(job, self.run, self.grid):
            return False
        body = dict(parent=self.train_parent, measure_parent=self.measure_parent, linearized=self.run_linearized,
                    child=self.run_child, pairs=self.measure_pairs, merge=self.merge, report=self.report)[job.kind]
        args = [a for a in (job.step, job.child) if a is not None]
        try:
            with training.deterministic_ops(self.config.train.deterministic):  # on for our jobs only
                body(*args)
            summaries.write_job_results(self.run, job)
        except training.Preempted:
            raise
        except Exception as err:
            explained = fs.Damaged(err.path, err.problem, self._remedy(err.path)) if isinstance(err, fs.Damaged) else err
            with contextlib.suppress(OSError):  # the failure may be the run directory itself (full, read-only)
                self.run.mark_failed(job.id, explained)
            if explained is not err:
                raise explained from None
            raise
        if not job.always:
            self.run.clear_failed(job.id)
        return True

    def repair(self):
        """Remove every damaged checkpoint and result of this run directory (failing the size or checksum recorded
        when it was written), so the job that wrote it runs again; one line per file says which. Training
        checkpoints are recomputed bitwise only under train.deterministic; otherwise a damaged one is an error."""
        lines = []
        for job in self.jobs:
            for path, problem in graph.damaged(job, self.run, self.grid):
                if not self.config.train.deterministic and rundir.is_checkpoint_dir(path):
                    raise fs.Damaged(path, problem, "train.deterministic is false, so it cannot be recomputed as it "
                                     "was; start a new run directory (--out)")
                fs.remove(path)
                fs.remove(path + fs.SEAL)
                lines.append(f"{path} was damaged ({problem}): removed, job {job.id} recomputes it")
        return lines

    def status(self):
        """(job id, state, detail) for every job that leaves files: "damaged" (its damaged files and their
        problems), "failed" (the stored error), "done" or "to do"; then the merged results file's seal."""
        failures = self.run.failures()
        rows = []
        for job in self.jobs:
            if job.always:
                continue
            damage = graph.damaged(job, self.run, self.grid)
            if damage:
                rows.append((job.id, "damaged", "; ".join(f"{self._relative(p)}: {why}" for p, why in damage)))
            elif job.id in failures:
                rows.append((job.id, "failed", f"{failures[job.id]['error']}: {failures[job.id]['message']}"))
            else:
                rows.append((job.id, "done" if graph.is_done(job, self.run, self.grid) else "to do", ""))
        if fs.is_sealed(self.run.merged):
            problem = fs.seal_problem(self.run.merged)
            rows.append(("merge", "damaged" if problem else "done", problem or ""))
        return rows

    def _relative(self, path):
        return path[len(self.run.root):].lstrip("/") if path.startswith(self.run.root) else path

    def _remedy(self, path):
        """Which job wrote `path` and the command that recomputes it."""
        for job in self.jobs:
            checkpoints, files = graph.outputs(job, self.run, self.grid)
            job_dir = graph.job_dir(job, self.run)
            if path in checkpoints + files or (job_dir and path.startswith(job_dir.path + "/")):
                return (f"it was written by job {job.id}; `kerasntk run {self.run.config_path} --out {self.run.root}` "
                        "removes it and recomputes it")
        return f"`kerasntk check {self.run.root}` lists what is damaged"

    # parent -----------------------------------------------------------------------------------------------

    def train_parent(self):
        """Train (or resume) the parent, saving every grid checkpoint."""
        parent = training.build_trainer(self.config, self.arrays, self.grid, self.run.parent, self.strategy,
                                        name="parent", summary_dir=self.run.tensorboard("parent"))
        missing = [s for s in self.grid.checkpoints if not self.run.parent.has_checkpoint(s)]
        parent.restore(before=missing[0])  # a grid checkpoint removed as damaged is re-created from the one before
        self._say(f"parent: training to step {missing[-1]} of {self.grid.total}, "
                  f"{len(missing)} of {len(self.grid.checkpoints)} checkpoints to write")
        parent.train(until=missing[-1], save_steps=self.grid.checkpoints, verbose=self.verbose)

    def weights_at(self, job_dir, step):
        """Model weights (model.weights order) of the grid checkpoint of `job_dir` (a JobDir) at `step`."""
        job_dir.read_checkpoint(tf.train.Checkpoint(model=self.model), step, partial=True)
        return self.model.get_weights()

    def kernel(self, weights, cache_path=None):
        """The probe-set trace NTK (N, N) of `weights`, cached as .npy when `cache_path` is given."""
        if self._ntk_fn is None:  # one function for every checkpoint: traced once, blocks spread over replicas
            self._ntk_fn = self._make_ntk_fn(per_layer=False)
        return self._cached(cache_path, lambda: self._ntk_fn(self.x_probe), weights)

    def layer_kernel(self, weights, cache_path=None):
        """The probe-set trace NTK's per-layer terms (L, N, N) of `weights` (Θ = Σ_l Θ_l), cached like `kernel`."""
        if self._layer_ntk_fn is None:
            self._layer_ntk_fn = self._make_ntk_fn(per_layer=True)
        return self._cached(cache_path, lambda: self._layer_ntk_fn(self.x_probe), weights)

    @property
    def layer_names(self):
        """The layers with trainable variables, in the order of `layer_kernel`'s first axis."""
        if self._layer_ntk_fn is None:
            self._layer_ntk_fn = self._make_ntk_fn(per_layer=True)
        return self._layer_ntk_fn.layer_names

    def _make_ntk_fn(self, per_layer):
        n = self.config.ntk
        return ntk.empirical_ntk_fn(self.model, trace_axes=(-1,), implementation=n.implementation,
                                    batch_size=n.batch_size, strategy=self.strategy, per_layer=per_layer)

    def _cached(self, cache_path, compute, weights):
        """The array at the sealed `cache_path` if intact, else `compute()` on `weights` (float64), saved there."""
        if cache_path and fs.is_sealed(cache_path) and not fs.seal_problem(cache_path):
            return fs.load_npy(cache_path)
        self.model.set_weights(weights)
        array = np.asarray(compute(), np.float64)
        if cache_path:
            fs.save_npy(cache_path, array)
        return array

    def curvature(self, weights, trace=True):
        """The training loss's sharpness (and with `trace`, Hutchinson's trace and its standard error) at
        `weights`, on the config's Hessian subset (`kerasntk.hessian`; one HVP function for every call)."""
        h = self.config.hessian
        if self._hvp is None:
            x, y = self.arrays.x_train, self.arrays.y_train  # the subset is "at most" the training set
            if h.subset_size < len(x):
                x, y = data.probe_subset(x, y, h.subset_size, h.seed)
            self._hvp = hessian.hvp_fn(self.model, x, y, weight_decay=self.config.train.weight_decay,
                                       batch_size=h.batch_size, strategy=self.strategy)
        self.model.set_weights(weights)
        out = dict(hessian_top_eigenvalue=float(hessian.top_eigenvalues(self._hvp, 1, h.lanczos_steps, h.seed)[0]))
        if trace:
            out["hessian_trace"], out["hessian_trace_stderr"] = hessian.trace(self._hvp, h.probes, h.seed)
        return out

    def measure_parent(self):
        """parent(time, metric), kernel_distance(time, time_b) and parent_layer(time, layer, metric) over the grid:
        errors, curvature, kernels and their per-layer terms, distances."""
        x_train, y_train = self.arrays.x_train[self.train_subset], self.arrays.y_train[self.train_subset]
        job, g, n = self.run.parent, self.grid, self.config.ntk
        times = g.epochs(np.array(g.checkpoints))
        dt = None if g.velocity_dt is None else g.epochs(g.velocity_dt)
        trajectory, layer_kernels = ntk.KernelTrajectory(self.y_probe, dt), []
        w0 = self.weights_at(job, 0)
        mask = landscape.trainable_mask(self.model)
        rows = []
        for i, (step, t) in enumerate(zip(g.checkpoints, times)):
            self._say(f"parent measurements: checkpoint {i + 1}/{len(g.checkpoints)} (step {step})")
            w = self.weights_at(job, step)
            test = self.evaluator(self.arrays.x_test, self.arrays.y_test, weights=w)
            train = self.evaluator(x_train, y_train, weights=w)
            dist = landscape.weight_distances(w0, w, mask)
            lr = job.meta(step)["learning_rate"]
            rows.append(dict(test_error=test["error"], test_loss=test["loss"], train_error=train["error"],
                             train_loss=train["loss"], weight_distance_from_init=dist["weight_distance"],
                             learning_rate=lr))
            if self.config.hessian.enabled:
                rows[-1].update(self.curvature(w))
            if n.enabled:
                trajectory.add(t, self.kernel(w, job.kernel_path(step)), lr)
            if n.enabled and n.per_layer:
                layer_kernels.append(self.layer_kernel(w, job.layer_kernel_path(step)))
            faults.at(graph.job_id("measure_parent"), "kernels", i + 1)
        metrics = {k: np.array([r[k] for r in rows]) for k in rows[0]}
        travel = metrics["weight_distance_from_init"]
        metrics["relative_weight_distance_from_init"] = travel / travel[-1] if travel[-1] > 0 else travel * np.nan
        metrics.update(trajectory.metrics() if trajectory else {})
        layer_metrics = ntk.layer_trajectory_metrics(layer_kernels, times, self.y_probe, dt) if layer_kernels else None
        results.write_atomic(results.parent_dataset(
            g.checkpoints, times, metrics, kernel_distance=trajectory.distance_matrix() if trajectory else None,
            requested_times=g.requested, attrs=self._attrs(), layer_metrics=layer_metrics,
            layers=self.layer_names if layer_kernels else None), self.run.result("parent"))

    # kernel learning --------------------------------------------------------------------------------------

    def run_linearized(self, step):
        """Train the parent's linearization at `step` on the training set; one row of parent(time, metric)."""
        self._require_parent_checkpoint(step)
        self._say(f"linearized network from the parent at epoch {self.grid.epochs(step):g}")
        weights = self.weights_at(self.run.parent, step)
        job_id = graph.job_id("linearized", step)
        metrics = kernel_learning.fit_linearized(self.model, weights, self.arrays, self.config,
                                                 self.run.linearized(step), self.strategy, verbose=self.verbose,
                                                 summary_dir=self.run.tensorboard(job_id), name=job_id)
        results.write_atomic(results.parent_dataset([step], [self.grid.epochs(step)],
                                                    {k: np.array([v]) for k, v in metrics.items()},
                                                    requested_times=[self.grid.requested_time(step)],
                                                    attrs=self._attrs()), self.run.result("linearized", step))

    def _require_parent_checkpoint(self, step):
        if not self.run.parent.has_checkpoint(step):
            raise cfg.ConfigError(f"no parent checkpoint at step {step} in {self.run.root!r}; the checkpoint steps "
                                  f"are {list(self.grid.checkpoints)} (train the parent first: kerasntk train)")

    # children ---------------------------------------------------------------------------------------------

    def run_child(self, step, child):
        """Train child `child` spawned at parent `step` to the end and write its outcomes."""
        self._require_parent_checkpoint(step)
        job = self.run.child(step, child)
        data_seed, augment_seed = child_seeds(self.config, step, child)
        job_id = graph.job_id("child", step, child)
        trainer = training.build_trainer(self.config, self.arrays, self.grid, job, self.strategy, data_seed=data_seed,
                                         augment_seed=augment_seed, name=job_id,
                                         summary_dir=self.run.tensorboard(job_id))
        trainer.restore(start_from=(self.run.parent, step), reset_momentum=self.config.spawn.reset_momentum)
        self._say(f"child {child} spawned at epoch {self.grid.epochs(step):g}: training to the end")
        try:
            trainer.train(save_steps=[trainer.total_steps], verbose=self.verbose)
        except training.Diverged as err:
            if self.config.spawn.diverged != "record":
                raise
            self._record_diverged_child(step, child, err, trainer.epoch())
            return
        w = trainer.model.get_weights()
        final = self.grid.total
        parent_final = self.weights_at(self.run.parent, final)
        scalars, _ = self._compare(w, parent_final)
        test = self.evaluator(self.arrays.x_test, self.arrays.y_test, weights=w)
        metrics = dict(test_error=test["error"], test_loss=test["loss"])
        metrics.update({f"{k}_to_parent": v for k, v in scalars.items()})
        if self.config.hessian.enabled:
            metrics["hessian_top_eigenvalue_end"] = self.curvature(w, trace=False)["hessian_top_eigenvalue"]
        if self.config.ntk.enabled:
            parent_kernel = self.kernel(parent_final, self.run.parent.kernel_path(final))
            metrics["kernel_distance_to_parent"] = ntk.kernel_distance(self.kernel(w, job.kernel_path(final)),
                                                                       parent_kernel)
        if self.config.spawn.diverged == "record":
            metrics["diverged"] = 0.0
        self._write_child(step, child, metrics)

    def _record_diverged_child(self, step, child, error, epoch):
        """A diverged child as a result (spawn.diverged=record): the reason in its job directory, `diverged` = 1
        and its epoch in `child`; every other metric of it is NaN after the merge, and so are its pairs."""
        self._say(f"{error}; recorded as a result (spawn.diverged=record)")
        self.run.child(step, child).write_divergence(dict(reason=str(error), epoch=epoch))
        self._write_child(step, child, dict(diverged=1.0, diverged_at_epoch=epoch))

    def _write_child(self, step, child, metrics):
        results.write_atomic(results.child_dataset(step, self.grid.epochs(step), child, metrics, attrs=self._attrs(),
                                                   requested_time=self.grid.requested_time(step)),
                             self.run.result("child", step, child))

    def measure_pairs(self, step):
        """pair(time, pair, metric) and path(time, pair, alpha, metric) between the children of one spawn."""
        children, final = self.config.spawn.children, self.grid.total
        missing = [c for c in range(children) if not fs.is_sealed(self.run.result("child", step, c))]
        if missing:
            raise cfg.ConfigError(f"pairs of spawn step {step}: children {missing} have not finished; run them first "
                                  f"(kerasntk spawn {self.run.root} --time {step}it --child C)")
        diverged = {c for c in range(children) if self.run.child(step, c).divergence()}
        weights = {c: self.weights_at(self.run.child(step, c), final) for c in range(children) if c not in diverged}
        pairs = [(a, b) for a in range(children) for b in range(a + 1, children)]
        rows, curves = [], []
        for a, b in pairs:
            if {a, b} & diverged:  # filled with NaN below
                rows.append(None)
                curves.append(None)
                continue
            self._say(f"spawn epoch {self.grid.epochs(step):g}: comparing children {a} and {b}")
            scalars, curve = self._compare(weights[a], weights[b])
            if self.config.ntk.enabled:
                ka, kb = (fs.load_npy(self.run.child(step, c).kernel_path(final)) for c in (a, b))
                scalars["kernel_distance"] = ntk.kernel_distance(ka, kb)
            rows.append(scalars)
            curves.append(curve)
            faults.at(graph.job_id("pairs", step), "pair", len(rows))
        names = next((r for r in rows if r), {"error_barrier": None})  # a merge fills the other metrics with NaN
        curve_names = next((c for c in curves if c), {"test_error": None})
        nan_curve = np.full(len(self._alphas()), np.nan)
        metrics = {k: np.array([r[k] if r else np.nan for r in rows]) for k in names}
        curve_arrays = {k: np.stack([c[k] if c else nan_curve for c in curves]) for k in curve_names}
        results.write_atomic(results.pair_dataset(step, self.grid.epochs(step), pairs, metrics, self._alphas(),
                                                  curve_arrays, requested_time=self.grid.requested_time(step),
                                                  attrs=self._attrs()), self.run.result("pair", step))

    def _compare(self, w_a, w_b):
        la = self.config.landscape
        return landscape.compare(
            self.model, w_a, w_b, x_test=self.arrays.x_test, y_test=self.arrays.y_test,
            x_train=self.arrays.x_train[self.train_subset], y_train=self.arrays.y_train[self.train_subset],
            alphas=self._alphas(), bn=la.bn, bn_x=self.arrays.x_train[self.bn_subset],
            reference_norm=self.parent_travel, batch_size=la.batch_size)

    @functools.cached_property
    def parent_travel(self):
        """‖w_T − w_0‖ of the parent (trainable weights): the scale of relative weight distances (read once)."""
        job = self.run.parent
        mask = landscape.trainable_mask(self.model)
        w0, w_final = self.weights_at(job, 0), self.weights_at(job, self.grid.total)
        return landscape.weight_distances(w0, w_final, mask)["weight_distance"]

    def _alphas(self):
        return np.linspace(0.0, 1.0, self.config.landscape.alphas)

    # merged results -----------------------------------------------------------------------------------------

    def merge(self):
        """RUN/results.nc from every job file (each verified against its seal); returns the merged Dataset."""
        merged = results.merge(self.run.root)
        results.write_atomic(merged, self.run.merged)
        return merged

    def report(self):
        """The figures of the merged results, in RUN/figures."""
        return plots.report(results.load(self.run.merged), self.run.figures)

    def batchnorm_statistics(self):
        """What BatchNorm normalizes over in training on this strategy (None without BatchNorm)."""
        if not models.has_batchnorm(self.model):
            return None
        return training.batchnorm_statistics(self.config.model.sync_bn, self.strategy, self.config.train.batch_size)

    def _attrs(self):
        t = self.config.train
        extra = {"batchnorm_statistics": self.batchnorm_statistics()} if models.has_batchnorm(self.model) else {}
        return results.global_attrs(self.config.to_dict(), dict(seed=t.seed, data_seed=t.data_seed,
                                                               augment_seed=t.augment_seed), **extra)

    def _say(self, message):
        if self.verbose:
            print(f"[kerasntk] {message}", flush=True)
