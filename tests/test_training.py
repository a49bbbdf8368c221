"""The trainer: schedules, the checkpoint grid, determinism, resume after SIGKILL, distribution, XLA."""

import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasntk import config as cfg
from kerasntk import data, models, training
from kerasntk.experiment import Grid
from kerasntk.rundir import JobDir
from helpers import ZOO, synthetic_arrays


def tiny_config(*overrides):
    base = ["train.length=3ep", "train.batch_size=32", "train.steps_per_execution=5", "train.eval_batch_size=64",
            "checkpoints.log_num=0", "checkpoints.every=null", "spawn.times=[0, 0.5]", "linearize.times=[]",
            "ntk.probe_size=20"]
    return cfg.load(None, base + list(overrides))


def make_trainer(config, job_dir, arrays, strategy=None, data_seed=None):
    """A Trainer as the experiment builds one: config checked against the data, grid, seeded model."""
    strategy = strategy or tf.distribute.get_strategy()
    steps_per_epoch = data.steps_per_epoch(arrays, config.train.batch_size)
    cfg.validate_against(config, steps_per_epoch, strategy.num_replicas_in_sync)
    return training.build_trainer(config, arrays, Grid.from_config(config, steps_per_epoch), JobDir(job_dir), strategy,
                                  data_seed=data_seed)


def final_weights(trainer):
    return [w.copy() for w in trainer.model.get_weights()]


# -- schedules and grid -------------------------------------------------------------------------------------

def test_cosine_schedule_with_warmup():
    s = training.Schedule(0.1, 100, "cosine", warmup_steps=10)
    lrs = np.array([float(s(i)) for i in range(101)])
    np.testing.assert_allclose(lrs[:10], 0.1 * np.arange(1, 11) / 10, rtol=1e-6)  # linear warmup
    np.testing.assert_allclose(lrs[10:], 0.05 * (1 + np.cos(np.pi * np.arange(91) / 90)), rtol=1e-5, atol=1e-8)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-8)


def test_step_and_constant_schedules():
    s = training.Schedule(0.1, 100, "step", milestones=(50, 75), gamma=0.1)
    np.testing.assert_allclose([float(s(i)) for i in (0, 49, 50, 74, 75, 99)], [0.1, 0.1, 0.01, 0.01, 0.001, 0.001],
                               rtol=1e-6)
    assert float(training.Schedule(0.3, 100, "constant")(57)) == pytest.approx(0.3)


def test_checkpoint_grid_has_ends_explicit_log_periodic_spawn_and_linearize_times():
    c = cfg.load(None, ["train.length=10ep", "checkpoints.times=[0.3]", "checkpoints.log_start=0.1",
                        "checkpoints.log_stop=1", "checkpoints.log_num=3", "checkpoints.every=5ep",
                        "spawn.times=[2it]", "linearize.times=[4]", "ntk.velocity_dt=null"])
    assert Grid.from_config(c, steps_per_epoch=100).checkpoints == (0, 2, 10, 30, 32, 100, 400, 500, 1000)
    with_partners = Grid.from_config(cfg.load(None, ["train.length=10ep", "checkpoints.log_num=0",
        "checkpoints.every=5ep", "spawn.times=[2it]", "linearize.times=[]", "ntk.velocity_dt=0.4ep"]), 100).checkpoints
    assert with_partners == (0, 2, 40, 42, 500, 540, 1000)  # t + 0.4 epoch for the kernel velocity


def test_grid_keeps_the_times_asked_for_beside_their_steps():
    c = cfg.load(None, ["train.length=2ep", "spawn.times=[0.25, 5it]", "checkpoints.times=[0.26]",
                        "checkpoints.log_start=0.01", "checkpoints.log_stop=0.1", "checkpoints.log_num=3",
                        "checkpoints.every=1ep", "linearize.times=[]", "ntk.velocity_dt=0.4ep"])
    g = Grid.from_config(c, steps_per_epoch=62)
    asked = dict(zip(g.checkpoints, g.requested))
    assert g.requested_time(16) == asked[16] == 0.25  # spawn 0.25 -> step 16 (0.258); checkpoint 0.26 too
    assert asked[5] == 5 / 62 and asked[2] == pytest.approx(0.1 ** 1.5) and asked[6] == 0.1
    assert asked[41] == 41 / 62 and asked[62] == 1.0 and asked[124] == 2.0  # velocity partner, periodic: exact
    assert len(set(g.requested)) == len(g.requested)  # distinct, so they can index the time axis
    np.testing.assert_array_equal(g.requested_time(np.array([0, 16])), [0.0, 0.25])


# -- training -----------------------------------------------------------------------------------------------

def test_training_learns_and_logs_every_epoch(tmp_path):
    trainer = make_trainer(tiny_config(), str(tmp_path), synthetic_arrays())
    trainer.restore()
    history = trainer.train(save_steps=[0, 4, trainer.total_steps], verbose=0)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[0]["train_error"] > history[-1]["train_error"]  # learning
    assert history[-1]["test_error"] < 0.5  # far better than chance (0.9)
    assert JobDir(tmp_path).checkpoint_steps() == [0, 4, trainer.total_steps]


def test_each_trainer_traces_its_train_chunk_once_however_many_trainers_and_chunk_lengths(tmp_path):
    # A slower fifth Trainer in one process would come from retracing or from traced work piling up across
    # instances: each Trainer's chunk function must trace once, for every chunk length and epoch, the fifth
    # as the first (wall-clock comparisons of the same: benchmarks/train_step.py).
    arrays = synthetic_arrays()
    counts = []
    for i in range(5):
        trainer = make_trainer(tiny_config("train.length=2ep"), str(tmp_path / str(i)), arrays)
        trainer.restore()
        trainer.train(save_steps=[3], verbose=0)  # chunks of 3, 5, 5 and 3 steps (5 per execution, 8 per epoch)
        assert trainer.step == 16
        counts.append(trainer._run_chunk.experimental_get_tracing_count())
    assert counts == [1] * 5


def test_same_seed_gives_bitwise_identical_weights(tmp_path):
    runs = []
    for name in ("a", "b"):
        trainer = make_trainer(tiny_config(), str(tmp_path / name), synthetic_arrays())
        trainer.restore()
        trainer.train(verbose=0)
        runs.append(final_weights(trainer))
    assert all(np.array_equal(a, b) for a, b in zip(*runs))
    other = make_trainer(tiny_config("train.data_seed=1"), str(tmp_path / "c"), synthetic_arrays())
    other.restore()
    other.train(verbose=0)
    assert not all(np.array_equal(a, b) for a, b in zip(runs[0], final_weights(other)))


def test_child_inherits_weights_optimizer_slots_and_step(tmp_path):
    parent = make_trainer(tiny_config(), str(tmp_path / "p"), synthetic_arrays())
    parent.restore()
    parent.train(until=12, save_steps=[12], verbose=0)
    child = make_trainer(tiny_config(), str(tmp_path / "c"), synthetic_arrays(), data_seed=7)
    child.restore(start_from=(JobDir(tmp_path / "p"), 12))
    assert child.step == 12
    assert all(np.array_equal(a, b) for a, b in zip(parent.model.get_weights(), child.model.get_weights()))
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(parent.optimizer.variables, child.optimizer.variables))
    assert any(np.abs(m.numpy()).max() > 0 for m in child.optimizer.momentums)
    reset = make_trainer(tiny_config(), str(tmp_path / "r"), synthetic_arrays())
    reset.restore(start_from=(JobDir(tmp_path / "p"), 12), reset_momentum=True)
    assert all(np.abs(m.numpy()).max() == 0 for m in reset.optimizer.momentums)


def test_mirrored_strategy_matches_one_device(tmp_path, mirrored):
    """2 logical CPUs vs 1 device after 10 steps (no BatchNorm: per-replica batch statistics would differ).

    Tolerance: the two runs differ only in the order of float32 sums (per-replica gradient sums are
    all-reduced); after 10 steps that is a few ulps of weights of size ~0.1-1, so atol 1e-5 is ample.
    """
    arrays = synthetic_arrays()
    config = tiny_config("train.length=10it", "spawn.times=[]")
    single = make_trainer(config, str(tmp_path / "one"), arrays)
    single.restore()
    single.train(verbose=0)
    multi = make_trainer(config, str(tmp_path / "two"), arrays, strategy=mirrored)
    multi.restore()
    multi.train(verbose=0)
    assert multi.step == single.step == 10
    for a, b in zip(final_weights(single), final_weights(multi)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert single.history[-1]["test_error"] == pytest.approx(multi.history[-1]["test_error"], abs=1e-6)


def test_batch_size_the_replicas_cannot_split(tmp_path, mirrored):
    with pytest.raises(cfg.ConfigError, match="multiple of the 2 replicas"):
        make_trainer(tiny_config("train.batch_size=33"), str(tmp_path), synthetic_arrays(), strategy=mirrored)


@pytest.mark.parametrize("name, shape, options", ZOO, ids=[f"{z[0]}-{i}" for i, z in enumerate(ZOO)])
def test_train_step_compiles_with_xla_for_every_zoo_model(tmp_path, name, shape, options):
    """jit_compile=True is our proxy for TPU readiness: static shapes, no Python side effects in the step."""
    config = tiny_config(f"model.name={name}", "train.length=2it", "train.batch_size=8", "spawn.times=[]",
                         "train.jit_compile=true",
                         f"model.options={options!r}".replace("'", '"'))
    trainer = make_trainer(config, str(tmp_path), synthetic_arrays(32, 16, shape, 4))
    trainer.restore()
    before = final_weights(trainer)
    trainer.train(verbose=0)
    assert trainer.step == 2 and not all(np.array_equal(a, b) for a, b in zip(before, final_weights(trainer)))
    x, y = next(iter(data.train_batches(trainer.arrays, batch_size=8, epoch=0, order_seed=0, augment_seed=0)))
    assert "HloModule" in trainer.replica_step.experimental_get_compiler_ir(x, y)(stage="hlo")
    assert trainer._run_chunk.experimental_get_tracing_count() == 1  # one trace serves every chunk and epoch


# -- the train step against a hand-computed reference ---------------------------------------------------------

def _mlp_reference(weights, batches, lrs, momentum, weight_decay):
    """Weights after each SGD-momentum step of a one-hidden-layer ReLU MLP, by hand in float64: loss = mean
    softmax cross-entropy + ½·wd·‖w‖² (coupled L2, every trainable variable); Keras's SGD: m ← μm − η∇, w ← w + m."""
    w = [np.asarray(v, np.float64) for v in weights]
    m = [np.zeros_like(v) for v in w]
    after = []
    for (x, y), lr in zip(batches, lrs):
        x, y = np.asarray(x, np.float64).reshape(len(x), -1), np.asarray(y)
        w1, b1, w2, b2 = w
        pre = x @ w1 + b1
        h = np.maximum(pre, 0)
        z = h @ w2 + b2
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        dz = (p - np.eye(z.shape[1])[y]) / len(x)
        dpre = (dz @ w2.T) * (pre > 0)
        grads = [x.T @ dpre, dpre.sum(0), h.T @ dz, dz.sum(0)]
        m = [momentum * mi - lr * (g + weight_decay * wi) for mi, g, wi in zip(m, grads, w)]
        w = [wi + mi for wi, mi in zip(w, m)]
        after.append(w)
    return after


@pytest.mark.parametrize("strategy", ["one device", "mirrored"])
def test_two_train_steps_equal_hand_computed_sgd_momentum_with_coupled_l2(tmp_path, strategy, request):
    """Steps 1 and 2 of the trainer (cosine schedule with 4 warmup steps: lr 0.025 then 0.05; momentum 0.9;
    weight decay 0.01) against `_mlp_reference` on the trainer's own first two batches. Tolerance: float32
    arithmetic against float64 over two steps of weights ~0.3: rtol 1e-5 and atol 1e-6 (a few hundred ulps);
    a wrong lr, a missing or doubled L2 term or a wrong momentum moves the weights by more than 1e-4."""
    config = tiny_config("model.name=mlp", 'model.options={"hidden": [8]}', "train.length=2ep",
                         "train.batch_size=16", "train.lr=0.1", "train.schedule=cosine", "train.warmup=4it",
                         "train.weight_decay=0.01", "train.momentum=0.9", "train.steps_per_execution=2",
                         "spawn.times=[]")
    arrays = synthetic_arrays(64, 16, (6,), 4)
    trainer = make_trainer(config, str(tmp_path), arrays,
                           strategy=request.getfixturevalue("mirrored") if strategy == "mirrored" else None)
    trainer.restore()
    start = final_weights(trainer)
    batches = list(data.train_batches(arrays, batch_size=16, epoch=0, order_seed=0, augment_seed=0))[:2]
    lrs = [0.1 * 1 / 4, 0.1 * 2 / 4]  # warmup: base lr · (step + 1) / 4; the cosine factor is 1 before step 4
    want = _mlp_reference(start, batches, lrs, 0.9, 0.01)
    for step in (1, 2):
        trainer.train(until=step, verbose=0)
        assert trainer.step == step
        for got, ref in zip(final_weights(trainer), want[step - 1]):
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(start, want[1])) > 1e-3  # the steps move the weights


def test_the_chunk_function_traces_once_over_several_epochs_and_chunk_lengths(tmp_path):
    """3 epochs of 4 steps with steps_per_execution=3 and a grid checkpoint at step 2: chunks of 2, 2, 3, 1, 3, 1
    steps, each epoch on a new iterator; one trace serves them all (n is a tensor, the iterator's spec
    is the same), and evaluation traces once too."""
    config = tiny_config("train.batch_size=16", "train.steps_per_execution=3", "spawn.times=[]")
    trainer = make_trainer(config, str(tmp_path), synthetic_arrays(64, 16, (16, 1), 4))
    trainer.restore()
    calls = []
    chunk = trainer._run_chunk
    trainer._run_chunk = lambda iterator, n: calls.append(int(n)) or chunk(iterator, n)
    trainer.train(save_steps=[2], verbose=0)
    assert trainer.step == 12 and calls == [2, 2, 3, 1, 3, 1]
    assert chunk.experimental_get_tracing_count() == 1
    assert [f.experimental_get_tracing_count() for f in trainer.evaluator._functions.values()] == [1]


# -- process-wide switches are kerasntk's only while it works ---------------------------------------------------

def test_op_determinism_is_on_in_kerasntk_jobs_and_off_after_so_a_users_fit_keeps_xla(tmp_path, npz, monkeypatch):
    """Op determinism is process-wide and Keras silently drops compile(jit_compile=True) while it is on.
    (On this CPU every op kerasntk runs is deterministic with or without it, so no result tells the
    difference; what it does on a GPU cannot be tested here.)"""
    from tensorflow.python.framework import config as tf_config

    from kerasntk import experiment
    from helpers import tiny

    tf_config.disable_op_determinism()
    seen = []
    end_epoch = training.Trainer._end_epoch
    monkeypatch.setattr(training.Trainer, "_end_epoch",
                        lambda self, verbose: seen.append(tf_config.is_op_determinism_enabled()) or end_epoch(self, verbose))
    for deterministic in (True, False):
        config = cfg.load(None, tiny(npz, "train.length=1ep", "spawn.times=[0]", "linearize.times=[]",
                                     f"train.deterministic={str(deterministic).lower()}"))
        ex = experiment.Experiment(config, str(tmp_path / str(deterministic)), verbose=0)
        assert ex.run_job("parent")
        assert seen[-1] is deterministic and not tf_config.is_op_determinism_enabled()
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse", jit_compile=True)
    assert model.jit_compile is True


def test_building_a_seeded_model_leaves_the_global_random_state_as_it_was(tmp_path):
    import random

    def draws():
        return (random.random(), float(np.random.rand()), float(tf.random.uniform([])),
                float(keras.random.uniform(())))

    keras.utils.set_random_seed(123)
    want = draws()
    keras.utils.set_random_seed(123)
    trainer = make_trainer(tiny_config("train.seed=5"), str(tmp_path), synthetic_arrays(64, 16, (40, 1), 10))
    assert draws() == want
    again = make_trainer(tiny_config("train.seed=5"), str(tmp_path / "b"), synthetic_arrays(64, 16, (40, 1), 10))
    assert all(np.array_equal(a, b) for a, b in zip(final_weights(trainer), final_weights(again)))  # still seeded


def test_a_multi_worker_tf_config_is_an_error_not_every_worker_writing(monkeypatch):
    from kerasntk import distribute

    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["localhost:1", "localhost:2"]}, '
                                    '"task": {"type": "worker", "index": 1}}')
    with pytest.raises(ValueError, match="multi-worker cluster, which kerasntk does not support"):
        distribute.get_strategy()


# -- resume after SIGKILL -----------------------------------------------------------------------------------

def _train_cli(out, npz, *extra):
    return [sys.executable, "-m", "kerasntk.cli", "-q", "train", "--out", str(out), "--set", "data.name=npz",
            "--set", f"data.path={npz}", "--set", "train.length=4ep", "--set", "train.batch_size=16",
            "--set", "train.steps_per_execution=1", "--set", "checkpoints.log_num=0",
            "--set", "checkpoints.every=null", "--set", "checkpoints.times=[1.5, 2.5, 3.5]",
            "--set", "spawn.times=[]", "--set", "linearize.times=[]", *extra]


def _checkpoint_weights(job_dir, step):
    reader = tf.train.load_checkpoint(os.path.join(JobDir(job_dir).checkpoint_path(step), "ckpt"))
    names = sorted(n for n in reader.get_variable_to_shape_map() if n.endswith("VARIABLE_VALUE"))
    return {n: reader.get_tensor(n) for n in names}


@pytest.mark.slow  # test_experiment kills a job mid-epoch at a named point in the default suite
def test_sigkill_mid_epoch_then_restart_is_bitwise_identical(tmp_path):
    arrays = synthetic_arrays(n_train=800)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=arrays.x_train, y_train=arrays.y_train, x_test=arrays.x_test, y_test=arrays.y_test)
    steps_per_epoch = 50
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_train_cli(clean, npz), check=True, timeout=600)
    proc = subprocess.Popen(_train_cli(killed, npz))
    mid_epoch = JobDir(killed / "parent").checkpoint_path(int(1.5 * steps_per_epoch))
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(mid_epoch, "meta.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    final = JobDir(killed / "parent").checkpoint_path(4 * steps_per_epoch)
    assert not os.path.exists(final), "the run finished before it could be killed; the test proves nothing"
    subprocess.run(_train_cli(killed, npz), check=True, timeout=600)
    a = _checkpoint_weights(str(clean / "parent"), 4 * steps_per_epoch)
    b = _checkpoint_weights(str(killed / "parent"), 4 * steps_per_epoch)
    assert a.keys() == b.keys() and len(a) > 10  # weights, momentum slots, step
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_cli_reports_config_errors_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kerasntk.cli", "train", "--out", str(tmp_path),
                             "--set", "train.batch_size=0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "train.batch_size" in result.stderr and "Traceback" not in result.stderr


def test_sigterm_saves_a_resume_checkpoint_within_one_chunk_and_the_rerun_is_bitwise_identical(tmp_path):
    """SIGTERM (a preemption; sent by the fault hook at step 63, mid-epoch) stops `kerasntk train` at the end
    of the running chunk of steps_per_execution=4 steps (epoch 1 runs 50-54-58-62-66) with exit status 143,
    a resume checkpoint there and the epoch's partial sums; the rerun continues and ends bitwise equal to
    an uninterrupted run."""
    arrays = synthetic_arrays(n_train=800)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=arrays.x_train, y_train=arrays.y_train, x_test=arrays.x_test, y_test=arrays.y_test)
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    chunked = ["--set", "train.steps_per_execution=4", "--set", "data.augment=false"]
    subprocess.run(_train_cli(clean, npz, *chunked), check=True, timeout=600)
    env = dict(os.environ, KERASNTK_FAULT_POINT="parent:step:63")
    proc = subprocess.run(_train_cli(stopped, npz, *chunked), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "stopped by SIGTERM at step 66" in proc.stderr and "Traceback" not in proc.stderr
    job = JobDir(stopped / "parent")
    assert job.latest_checkpoint(kinds=("resume",)) == (66, "resume")  # the chunk 62-66 was running when the signal came: no later step
    assert job.meta(66, "resume")["epoch_totals"][2] == 16 * 16  # examples seen in epoch 1 so far
    assert not job.has_checkpoint(200)
    subprocess.run(_train_cli(stopped, npz, *chunked), check=True, timeout=600)
    a = _checkpoint_weights(str(clean / "parent"), 200)
    b = _checkpoint_weights(str(stopped / "parent"), 200)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    history = [{k: v for k, v in h.items() if k != "wall_time"} for h in JobDir(clean / "parent").read_history()]
    assert history == [{k: v for k, v in h.items() if k != "wall_time"} for h in job.read_history()]


# -- BatchNorm across replicas ------------------------------------------------------------------------------

BN_CASE = ["model.name=resnet20", 'model.options={"width": 1}', "train.length=3it", "train.batch_size=16",
           "train.steps_per_execution=1", "spawn.times=[]"]


def _bn_trainer(tmp_path, name, sync, strategy=None):
    config = tiny_config(*BN_CASE, f"model.sync_bn={sync}")
    trainer = make_trainer(config, str(tmp_path / name), synthetic_arrays(64, 16, (8, 8, 3), 4, seed=1), strategy)
    trainer.restore()
    trainer.train(verbose=0)
    return final_weights(trainer)


def test_synchronized_batchnorm_on_two_replicas_matches_one_device_and_per_replica_does_not(tmp_path, mirrored):
    """ResNet-20 with BatchNorm, global batch 16, 3 steps (lr 0.1, momentum): on 2 logical CPUs with
    synchronized statistics the weights equal one device's to float32 rounding; with each replica
    normalizing its own 8 examples they differ by 0.6.

    Tolerance 1e-5 (measured 1.1e-6): both compute two-pass moments, the replicas' sums and gradients are
    added in another order, so they differ by float32 rounding (~1e-7 relative) amplified over 3 steps
    through 20 layers. Keras's own synchronized=True (E[x^2] - E[x]^2) missed this by 3e-2."""
    one = _bn_trainer(tmp_path, "one", "auto")  # one replica: "auto" means unsynchronized, the same thing
    synced = _bn_trainer(tmp_path, "synced", "auto", mirrored)  # two replicas: "auto" synchronizes
    local = _bn_trainer(tmp_path, "local", "false", mirrored)
    synced_gap = max(np.abs(a - b).max() for a, b in zip(one, synced))
    local_gap = max(np.abs(a - b).max() for a, b in zip(one, local))
    assert synced_gap < 1e-5
    assert local_gap > 1e-2


BN_ZOO = [(name, shape, dict(options, batchnorm=True)) for name, shape, options in ZOO
          if options.get("batchnorm", True)]  # every zoo model, with BatchNorm on


@pytest.mark.parametrize("name, shape, options", BN_ZOO, ids=[z[0] for z in BN_ZOO])
def test_synchronized_batchnorm_step_compiles_with_xla(tmp_path, name, shape, options):
    """The TPU path of synchronized BatchNorm: the step with its all-reduces compiles with XLA (on the default
    strategy, where the all-reduce is over one replica) for every zoo model with BatchNorm."""
    config = tiny_config(f"model.name={name}", "train.length=2it", "train.batch_size=8", "spawn.times=[]",
                         "train.jit_compile=true", "model.sync_bn=true",
                         f"model.options={options!r}".replace("'", '"'))
    trainer = make_trainer(config, str(tmp_path), synthetic_arrays(32, 16, shape, 4))
    bn = [layer for layer in trainer.model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn and all(isinstance(layer, models.SyncBatchNormalization) for layer in bn)
    trainer.restore()
    trainer.train(verbose=0)
    x, y = next(iter(data.train_batches(trainer.arrays, batch_size=8, epoch=0, order_seed=0, augment_seed=0)))
    assert "HloModule" in trainer.replica_step.experimental_get_compiler_ir(x, y)(stage="hlo")


def test_dry_run_and_results_say_what_batchnorm_normalizes_over(tmp_path, mirrored, npz):
    from kerasntk import experiment

    config = cfg.load(None, ["data.name=npz", f"data.path={npz}", "model.name=cnn1d",
                             'model.options={"batchnorm": true}', "train.batch_size=32"])
    ex = experiment.Experiment(config, str(tmp_path), strategy=mirrored, verbose=0)
    assert ex.plan()["batchnorm"] == "the global batch of 32, synchronized across 2 replicas"
    assert ex._attrs()["batchnorm_statistics"] == ex.plan()["batchnorm"]  # the attribute every result file gets
    config.model.sync_bn = False
    plan = experiment.Experiment(config, str(tmp_path), strategy=mirrored, verbose=0).plan()
    assert plan["batchnorm"] == "each replica's 16 of the global batch of 32 (2 replicas)"
