"""The spawning experiment (METHODS.md §1-4): parent, children, and their measurements, one job at a time.

Run directory layout (every job is skipped when its result exists, and resumes when interrupted):

    RUN_DIR/config.json                      the config the run was made with
    RUN_DIR/parent/                          the parent's training job (checkpoints on the grid)
    RUN_DIR/parent/kernels/step_XXXXXXXX.npy the parent's probe-set NTK at each grid checkpoint
    RUN_DIR/children/sXXXXXXXX_cC/           child C spawned at parent step XXXXXXXX
    RUN_DIR/results/*.nc                     one NetCDF file per measurement job; `results.merge` joins them
    RUN_DIR/results.nc, RUN_DIR/*.png|pdf    the merged results and the figures
"""

import json
import os

import numpy as np
import tensorflow as tf

from kerasntk import config as cfg
from kerasntk import data, kernel_learning, landscape, ntk, results, training


# -- run directory -------------------------------------------------------------------------------------------

def prepare_run_dir(config, run_dir):
    """Create `run_dir` holding `config.json`; refuse a directory made with a different config (machine
    fields, `cfg.MACHINE_FIELDS`, may differ)."""
    path = os.path.join(run_dir, "config.json")
    if tf.io.gfile.exists(path):
        with tf.io.gfile.GFile(path) as f:
            stored = cfg.from_dict(json.load(f))
        if stored.identity() != config.identity():
            raise cfg.ConfigError(
                f"run directory {run_dir!r} was made with a different config; pass another --out, "
                f"or re-run with the stored one: kerasntk run {path}")
    else:
        tf.io.gfile.makedirs(run_dir)
        training.write_json_atomic(path, config.to_dict())
    return run_dir


def load_run_config(run_dir, overrides=()):
    """The config stored in a run directory, validated; `overrides` may set this machine's fields only."""
    path = os.path.join(run_dir, "config.json")
    if not tf.io.gfile.exists(path):
        raise cfg.ConfigError(f"{run_dir!r} is not a kerasntk run directory (no config.json); "
                              "make one with `kerasntk train` or `kerasntk run`")
    for item in overrides:
        if item.partition("=")[0].strip() not in cfg.MACHINE_FIELDS:
            raise cfg.ConfigError(f"--set {item!r}: a run directory's config is fixed; only this machine's fields "
                                  f"may be set: {', '.join(cfg.MACHINE_FIELDS)}")
    return cfg.load(path, overrides)


def parent_dir(run_dir):
    return os.path.join(run_dir, "parent")


def child_dir(run_dir, step, child):
    return os.path.join(run_dir, "children", f"s{step:08d}_c{child}")


def child_seeds(config, step, child):
    """Independent data-order and augmentation seeds of child `child` spawned at `step` (a pure function)."""
    t = config.train
    data_seed, augment_seed = np.random.SeedSequence([t.data_seed, t.augment_seed, step, child + 1]).generate_state(2)
    return int(data_seed), int(augment_seed)


# -- jobs ----------------------------------------------------------------------------------------------------

class Experiment:
    """The jobs of one run directory, sharing the loaded data, strategy and probe set."""

    def __init__(self, config, run_dir, strategy=None, verbose=1):
        self.config, self.run_dir, self.verbose = config, run_dir, verbose
        self.strategy = strategy or tf.distribute.get_strategy()
        self.arrays = training.load_data(config)
        self.parent = training.Trainer(config, parent_dir(run_dir), strategy=self.strategy, arrays=self.arrays)
        self.steps_per_epoch = self.parent.steps_per_epoch
        self.grid = training.checkpoint_steps(config, self.steps_per_epoch)
        self.spawn_steps = self._steps(config.spawn.times)
        self.linearize_steps = self._steps(config.linearize.times)
        n = config.ntk
        self.x_probe, self.y_probe = data.probe_subset(self.arrays.x_train, self.arrays.y_train, n.probe_size, n.probe_seed)
        rng = np.random.default_rng(config.train.data_seed)
        la = config.landscape
        self.train_subset = rng.permutation(len(self.arrays.x_train))[:la.train_examples]
        self.bn_subset = rng.permutation(len(self.arrays.x_train))[:la.bn_examples]
        self._ntk_fn = None
        dt = training.velocity_dt_steps(config, self.steps_per_epoch)  # in epochs, like the times
        self.velocity_dt = None if dt is None else dt / self.steps_per_epoch

    def _steps(self, times):
        return sorted({cfg.parse_duration(t).steps(self.steps_per_epoch) for t in times})

    def plan(self):
        """What the run will do, without training: data, model, grids and job counts (for --dry-run)."""
        a, c = self.arrays, self.config
        return dict(
            dataset=f"{a.name}: {len(a.x_train)} train / {len(a.x_test)} test, input {a.input_shape}, {a.num_classes} classes",
            model=f"{c.model.name}: {self.parent.model.count_params()} parameters",
            strategy=f"{type(self.strategy).__name__} with {self.strategy.num_replicas_in_sync} replica(s)",
            steps=f"{self.parent.total_steps} steps ({self.steps_per_epoch} per epoch)",
            checkpoints=[round(s / self.steps_per_epoch, 4) for s in self.grid],
            spawn_times=[round(s / self.steps_per_epoch, 4) for s in self.spawn_steps],
            child_jobs=len(self.spawn_steps) * c.spawn.children,
            linearized_jobs=[round(s / self.steps_per_epoch, 4) for s in self.linearize_steps],
            probe=f"{len(self.x_probe)} examples",
        )

    # parent -----------------------------------------------------------------------------------------------

    def train_parent(self):
        """Train (or resume, or skip) the parent, saving every grid checkpoint."""
        self.parent.restore()
        if self.parent.step < self.parent.total_steps or self.grid[-1] not in training.saved_checkpoints(parent_dir(self.run_dir)):
            self._say(f"parent: training to {self.parent.total_steps} steps, {len(self.grid)} checkpoints")
            self.parent.train(save_steps=self.grid, verbose=self.verbose)
            self.parent.save_grid_checkpoint()
        return self.parent

    def weights_at(self, job_dir, step):
        """Model weights (model.weights order) of the grid checkpoint of `job_dir` at `step`."""
        self.parent.checkpoint.read(os.path.join(training.checkpoint_dir(job_dir, step), "ckpt")).expect_partial()
        return self.parent.model.get_weights()

    def kernel(self, weights, cache_path=None):
        """The probe-set trace NTK (N, N) of `weights`, cached as .npy when `cache_path` is given."""
        if cache_path and tf.io.gfile.exists(cache_path):
            return np.load(cache_path)
        self.parent.model.set_weights(weights)
        if self._ntk_fn is None:  # one function for every checkpoint: traced once, blocks spread over replicas
            n = self.config.ntk
            self._ntk_fn = ntk.empirical_ntk_fn(self.parent.model, trace_axes=(-1,), implementation=n.implementation,
                                                batch_size=n.batch_size, strategy=self.strategy)
        kernel = np.asarray(self._ntk_fn(self.x_probe), np.float64)
        if cache_path:
            _save_npy_atomic(cache_path, kernel)
        return kernel

    def measure_parent(self):
        """parent(time, metric) and kernel_distance(time, time_b) over the grid: errors, kernels, distances."""
        path = results.job_path(self.run_dir, "parent")
        if tf.io.gfile.exists(path):
            return
        x_train, y_train = self.arrays.x_train[self.train_subset], self.arrays.y_train[self.train_subset]
        job = parent_dir(self.run_dir)
        w0 = self.weights_at(job, 0)
        mask = landscape.trainable_mask(self.parent.model)
        rows, kernels, lrs = [], [], []
        for i, step in enumerate(self.grid):
            self._say(f"parent measurements: checkpoint {i + 1}/{len(self.grid)} (step {step})")
            w = self.weights_at(job, step)
            test = landscape.evaluate(self.parent.model, w, self.arrays.x_test, self.arrays.y_test)
            train = landscape.evaluate(self.parent.model, w, x_train, y_train)
            dist = landscape.weight_distances(w0, w, mask)
            rows.append(dict(test_error=test["error"], test_loss=test["loss"], train_error=train["error"],
                             train_loss=train["loss"], weight_distance_from_init=dist["weight_distance"]))
            lrs.append(float(self.parent.optimizer.learning_rate.numpy()))
            if self.config.ntk.enabled:
                kernels.append(self.kernel(w, os.path.join(job, "kernels", f"step_{step:08d}.npy")))
        times = np.array(self.grid) / self.steps_per_epoch
        metrics = {k: np.array([r[k] for r in rows]) for k in rows[0]}
        travel = metrics["weight_distance_from_init"]
        metrics["relative_weight_distance_from_init"] = travel / travel[-1] if travel[-1] > 0 else travel * np.nan
        metrics["learning_rate"] = np.array(lrs)
        kernel_distance = None
        if kernels:
            kernel_metrics, kernel_distance = ntk.trajectory_metrics(
                kernels, times, self.y_probe, learning_rates=lrs, dt=self.velocity_dt)
            metrics.update(kernel_metrics)
            metrics["kernel_top_eigenvalue"] = np.array([ntk.eigenvalues(k, 1)[0] for k in kernels])
        results.write_atomic(results.parent_dataset(self.grid, times, metrics, kernel_distance=kernel_distance,
                                                    attrs=self._attrs()), path)

    # kernel learning --------------------------------------------------------------------------------------

    def run_linearized(self, step):
        """Train the parent's linearization at `step` on the training set; one row of parent(time, metric)."""
        path = results.job_path(self.run_dir, "linearized", step)
        if tf.io.gfile.exists(path):
            return
        self._require_parent_checkpoint(step)
        self._say(f"linearized network from the parent at epoch {step / self.steps_per_epoch:g}")
        weights = self.weights_at(parent_dir(self.run_dir), step)
        metrics = kernel_learning.fit_linearized(
            self.parent.model, weights, self.arrays, self.config, os.path.join(self.run_dir, "linearized", f"s{step:08d}"),
            self.strategy, verbose=self.verbose)
        results.write_atomic(results.parent_dataset([step], [step / self.steps_per_epoch],
                                                    {k: np.array([v]) for k, v in metrics.items()},
                                                    attrs=self._attrs()), path)

    def _require_parent_checkpoint(self, step):
        if step not in training.saved_checkpoints(parent_dir(self.run_dir)):
            raise cfg.ConfigError(f"no parent checkpoint at step {step} in {self.run_dir!r}; the checkpoint steps "
                                  f"are {self.grid} (train the parent first: kerasntk train)")

    # children ---------------------------------------------------------------------------------------------

    def run_child(self, step, child):
        """Train child `child` spawned at parent `step` to the end and write its outcomes (skipped if done)."""
        path = results.job_path(self.run_dir, "child", step, child)
        if tf.io.gfile.exists(path):
            return
        self._require_parent_checkpoint(step)
        job = child_dir(self.run_dir, step, child)
        data_seed, augment_seed = child_seeds(self.config, step, child)
        trainer = training.Trainer(self.config, job, strategy=self.strategy, arrays=self.arrays,
                                   data_seed=data_seed, augment_seed=augment_seed)
        trainer.restore(start_from=training.checkpoint_dir(parent_dir(self.run_dir), step),
                        reset_momentum=self.config.spawn.reset_momentum)
        self._say(f"child {child} spawned at epoch {step / self.steps_per_epoch:g}: training to the end")
        trainer.train(save_steps=[trainer.total_steps], verbose=self.verbose)
        trainer.save_grid_checkpoint()
        w = trainer.model.get_weights()
        parent_final = self.weights_at(parent_dir(self.run_dir), self.grid[-1])
        scalars, _ = self._compare(w, parent_final)
        test = landscape.evaluate(self.parent.model, w, self.arrays.x_test, self.arrays.y_test)
        metrics = dict(test_error=test["error"], test_loss=test["loss"])
        metrics.update({f"{k}_to_parent": v for k, v in scalars.items()})
        if self.config.ntk.enabled:
            final = self.grid[-1]
            parent_kernel = self.kernel(parent_final, os.path.join(parent_dir(self.run_dir), "kernels", f"step_{final:08d}.npy"))
            metrics["kernel_distance_to_parent"] = ntk.kernel_distance(self.kernel(w, os.path.join(job, "kernel.npy")), parent_kernel)
        results.write_atomic(results.child_dataset(step, step / self.steps_per_epoch, child, metrics,
                                                   attrs=self._attrs()), path)

    def measure_pairs(self, step):
        """pair(time, pair, metric) and path(time, pair, alpha, metric) between the children of one spawn.

        Returns True when written; False when already done or when some child has not finished yet.
        """
        path = results.job_path(self.run_dir, "pair", step)
        children = self.config.spawn.children
        done = all(tf.io.gfile.exists(results.job_path(self.run_dir, "child", step, c)) for c in range(children))
        if tf.io.gfile.exists(path) or children < 2 or not done:
            return False
        weights = [self.weights_at(child_dir(self.run_dir, step, c), self.parent.total_steps) for c in range(children)]
        pairs = [(a, b) for a in range(children) for b in range(a + 1, children)]
        rows, curves = [], []
        for a, b in pairs:
            self._say(f"spawn epoch {step / self.steps_per_epoch:g}: comparing children {a} and {b}")
            scalars, curve = self._compare(weights[a], weights[b])
            if self.config.ntk.enabled:
                ka, kb = (np.load(os.path.join(child_dir(self.run_dir, step, c), "kernel.npy")) for c in (a, b))
                scalars["kernel_distance"] = ntk.kernel_distance(ka, kb)
            rows.append(scalars)
            curves.append(curve)
        metrics = {k: np.array([r[k] for r in rows]) for k in rows[0]}
        curve_arrays = {k: np.stack([c[k] for c in curves]) for k in curves[0]}
        results.write_atomic(results.pair_dataset(step, step / self.steps_per_epoch, pairs, metrics,
                                                  self._alphas(), curve_arrays, attrs=self._attrs()), path)
        return True

    def _compare(self, w_a, w_b):
        la = self.config.landscape
        ref = self._parent_travel()
        return landscape.compare(
            self.parent.model, w_a, w_b, x_test=self.arrays.x_test, y_test=self.arrays.y_test,
            x_train=self.arrays.x_train[self.train_subset], y_train=self.arrays.y_train[self.train_subset],
            alphas=self._alphas(), bn=la.bn, bn_x=self.arrays.x_train[self.bn_subset], reference_norm=ref,
            batch_size=la.batch_size)

    def _parent_travel(self):
        """‖w_T − w_0‖ of the parent (trainable weights): the scale of relative weight distances."""
        job = parent_dir(self.run_dir)
        mask = landscape.trainable_mask(self.parent.model)
        return landscape.weight_distances(self.weights_at(job, 0), self.weights_at(job, self.grid[-1]), mask)["weight_distance"]

    def _alphas(self):
        return np.linspace(0.0, 1.0, self.config.landscape.alphas)

    def _attrs(self):
        t = self.config.train
        return results.global_attrs(self.config.to_dict(), dict(seed=t.seed, data_seed=t.data_seed,
                                                               augment_seed=t.augment_seed))

    def _say(self, message):
        if self.verbose:
            print(f"[kerasntk] {message}", flush=True)

    # the whole run -----------------------------------------------------------------------------------------

    def run(self):
        """Every job in order, skipping finished ones; returns the merged Dataset (also written to results.nc)."""
        self.train_parent()
        self.measure_parent()
        for step in self.linearize_steps:
            self.run_linearized(step)
        for step in self.spawn_steps:
            for child in range(self.config.spawn.children):
                self.run_child(step, child)
            self.measure_pairs(step)
        merged = results.open_run(self.run_dir)
        results.write_atomic(merged, os.path.join(self.run_dir, "results.nc"))
        return merged


def run(config, run_dir=None, strategy=None, verbose=1):
    """Run the whole spawning experiment of `config` in `run_dir` (default runs/<name>) -> xarray.Dataset."""
    run_dir = run_dir or os.path.join("runs", config.run_name())
    prepare_run_dir(config, run_dir)
    return Experiment(config, run_dir, strategy=strategy, verbose=verbose).run()


def _save_npy_atomic(path, array):
    tf.io.gfile.makedirs(os.path.dirname(path))
    tmp = f"{path}.tmp{os.getpid()}.npy"
    with tf.io.gfile.GFile(tmp, "wb") as f:
        np.save(f, array)
    tf.io.gfile.rename(tmp, path, overwrite=True)
