"""The TPU promise in the default run: the ResNet NTK blocks and the n-step train loop compile with XLA (asserted
by XLA's own HLO, which `experimental_get_compiler_ir` produces only for functions XLA compiles) and give the
graph's numbers. Small shapes: ResNet-8 and WRN-10-1 on 4x4 inputs. The n-step loop of ResNet-8 (~9 s of tracing
and XLA compilation on 2 cores) is in the default run, WRN-10-1's (~6 s more, the same kinds of layers in
pre-activation order) in -m slow; every zoo model's per-replica step compiles in test_training.py."""

import numpy as np
import pytest
import tensorflow as tf

from kerasntk import config as cfg
from kerasntk import data, models, ntk, training
from kerasntk.experiment import Grid
from kerasntk.rundir import JobDir
from helpers import randomize, synthetic_arrays

SHAPE = (4, 4, 3)
RESNETS = {"resnet20": dict(depth=8, width=1), "wide_resnet": dict(depth=10, width=1)}


def _xla(concrete):
    """`concrete` (a traced graph) compiled as one XLA computation: jit_compile=True never falls back to the
    graph, it compiles or raises."""
    return tf.function(lambda *args: concrete(*args), jit_compile=True, autograph=False)


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_resnet_ntk_block_pair_compiles_with_xla_and_equals_the_graph(name):
    """`_Engine._pair`, what each replica runs under a strategy (structured derivatives, as "auto" picks).
    Tolerance: XLA fuses and reorders float32 sums over ~1e4 parameters; 1e-5 of the kernel's scale is
    ~100 float32 ulps of the largest entry and far below a missing term (entries of the kernel's size)."""
    model = randomize(models.get(name, SHAPE, 3, **RESNETS[name]), seed=1)
    x = np.random.default_rng(10).normal(size=(3, *SHAPE)).astype("float32")
    blocks = ntk._blocks(tf.constant(x), 2)  # blocks of 2 examples, the last one zero-padded
    engine = ntk._Engine(model, ntk._check_implementation(model, "auto"), True, tf.float32)  # trace kernel
    engine._setup(blocks[0][2])
    xa, xb = blocks[0][2], blocks[1][2]
    graph_fn = tf.function(engine._pair).get_concrete_function(xa, xb)  # traced once (the slow part), for both
    compiled = _xla(graph_fn)
    assert "HloModule" in compiled.experimental_get_compiler_ir(xa, xb)(stage="hlo")
    graph = graph_fn(xa, xb).numpy()
    assert graph.shape == (2, 2) and np.abs(graph).max() > 1e-3
    np.testing.assert_allclose(compiled(xa, xb).numpy(), graph, rtol=0, atol=1e-5 * np.abs(graph).max())


LOOPS = [pytest.param(name, SHAPE, options, id=name, marks=[pytest.mark.slow] if name == "wide_resnet" else [])
         for name, options in RESNETS.items()]


def _trainer(tmp_path, name, shape, options):
    config = cfg.load(None, [f"model.name={name}", f"model.options={options}".replace("'", '"'),
                             "train.length=1ep", "train.batch_size=8", "train.steps_per_execution=3",
                             "train.jit_compile=false", "checkpoints.log_num=0", "checkpoints.every=null",
                             "spawn.times=[]", "linearize.times=[]"])
    arrays = synthetic_arrays(24, 8, shape, 4)
    grid = Grid.from_config(config, data.steps_per_epoch(arrays, 8))
    trainer = training.build_trainer(config, arrays, grid, JobDir(tmp_path), tf.distribute.get_strategy())
    return trainer, arrays


@pytest.mark.parametrize("name, shape, options", LOOPS)
def test_n_step_train_loop_compiles_with_xla_and_equals_the_graph_chunk(tmp_path, name, shape, options):
    """The trainer's 3-step chunk as one XLA computation (a tf.range loop of the replica step: BatchNorm
    updates, optimizer slots and the step counter inside the loop, as a TPU runs steps_per_execution steps)
    against the trainer's own graph chunk on the same batches from the same weights. Tolerance: XLA reorders
    float32 sums; after 3 steps at lr 0.1 through up to 10 BatchNorm layers the weights agree to ~1e-6, so atol
    1e-4 separates rounding from a skipped or repeated step (which moves weights by ~1e-2)."""
    trainer, arrays = _trainer(tmp_path, name, shape, options)
    batches = list(data.train_batches(arrays, batch_size=8, epoch=0, order_seed=0, augment_seed=0))
    xs, ys = tf.stack([b[0] for b in batches]), tf.stack([b[1] for b in batches])
    start = [v.numpy() for v in trainer.model.variables + trainer.optimizer.variables]

    @tf.function(jit_compile=True)
    def n_steps(xs, ys):
        totals = tf.zeros(3)
        for i in tf.range(tf.shape(xs)[0]):
            totals += trainer.replica_step(xs[i], ys[i])
        return totals

    assert "HloModule" in n_steps.experimental_get_compiler_ir(xs, ys)(stage="hlo")
    xla_totals = n_steps(xs, ys).numpy()
    xla = [v.numpy() for v in trainer.model.variables + trainer.optimizer.variables]
    for v, value in zip(trainer.model.variables + trainer.optimizer.variables, start):
        v.assign(value)
    graph_totals = trainer._run_chunk(iter(tf.data.Dataset.from_tensor_slices((xs, ys))), tf.constant(3)).numpy()
    graph = [v.numpy() for v in trainer.model.variables + trainer.optimizer.variables]
    assert trainer.step == 3 and max(np.abs(a - b).max() for a, b in zip(start, graph)) > 1e-3
    np.testing.assert_allclose(xla_totals, graph_totals, rtol=1e-5)
    for a, b in zip(xla, graph):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
