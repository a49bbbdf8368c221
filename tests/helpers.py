"""Helpers shared by the test modules: synthetic data, the tiny experiment's config, what a run left."""

import pathlib

import keras
import numpy as np
import pytest

from kerasntk import data

TINY = ["data.name=npz", "train.length=2ep", "train.batch_size=32", "train.steps_per_execution=4",
        "checkpoints.log_num=0", "checkpoints.every=1ep", "spawn.times=[0, 0.5, 1]", "spawn.children=2",
        "ntk.probe_size=20", "landscape.alphas=5", "landscape.train_examples=64", "landscape.bn_examples=64",
        "linearize.times=[0, 1]", "linearize.length=1ep", "linearize.validation_examples=32",
        "hessian.subset_size=64", "hessian.batch_size=64", "hessian.lanczos_steps=8", "hessian.probes=4"]

# Zoo models at small shapes: (name, input shape, options)
ZOO = [("cnn1d", (16, 1), {}), ("cnn", (8, 8, 3), {"channels": 4}), ("mlp", (12,), {"hidden": [16, 16]}),
       ("resnet20", (8, 8, 3), {"width": 1}), ("resnet20", (8, 8, 3), {"batchnorm": False}),
       ("wide_resnet", (8, 8, 3), {"depth": 10, "width": 1})]


def synthetic_arrays(n_train=256, n_test=100, shape=(40, 1), classes=10, seed=0):
    """A small learnable problem: class-dependent means plus noise."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes,) + shape).astype(np.float32)

    def split(n):
        y = rng.integers(0, classes, n).astype(np.int32)
        return centers[y] + 0.5 * rng.normal(size=(n,) + shape).astype(np.float32), y

    (x_train, y_train), (x_test, y_test) = split(n_train), split(n_test)
    return data.Arrays(x_train, y_train, x_test, y_test, name="synthetic", num_classes=classes, augment=None)


def write_npz(path, arrays):
    np.savez(path, x_train=arrays.x_train, y_train=arrays.y_train, x_test=arrays.x_test, y_test=arrays.y_test)
    return path


def tiny(npz, *extra):
    """The tiny experiment's overrides on the .npz at `npz` (256 train / 64 test examples of shape (16, 1))."""
    return TINY + [f"data.path={npz}", *extra]


def result_arrays(path):
    """The merged results file's data variables as numpy arrays, for exact comparisons between runs."""
    from kerasntk import results

    ds = results.load(path)
    return {name: ds[name].values for name in ("parent", "child", "pair", "path", "kernel_distance")}


def temporary_files(root):
    """kerasntk's temporary files (`fs.atomic_file`/`atomic_dir` names) left anywhere under `root`."""
    return [str(p) for p in pathlib.Path(root).rglob("*") if ".tmp" in p.name]


def checkpoint_values(run_dir):
    """{checkpoint file prefix: its tensors and its meta.json without the file checksums} of every grid checkpoint
    under `run_dir`: what must be equal between two runs (the files' bytes also hold TensorFlow's object graph,
    whose layer names depend on how many models a process built before)."""
    import json

    import tensorflow as tf

    values = {}
    for meta in sorted(pathlib.Path(run_dir).rglob("checkpoints/*/meta.json")):
        reader = tf.train.load_checkpoint(str(meta.parent / "ckpt"))
        names = sorted(n for n in reader.get_variable_to_shape_map() if n != "_CHECKPOINTABLE_OBJECT_GRAPH")
        stored = {k: v for k, v in json.loads(meta.read_text()).items() if k != "files"}
        values[str(meta.parent.relative_to(run_dir))] = ({n: reader.get_tensor(n).tolist() for n in names}, stored)
    return values


def set_float(dtype):
    """Keras caches the global dtype policy on first use, so set it along with floatx."""
    keras.config.set_floatx(dtype)
    keras.config.set_dtype_policy(dtype)


@pytest.fixture
def float64():
    """Build models in float64 so that references are exact to rounding (import it into a test module and
    request it, e.g. with `pytest.mark.usefixtures`); floatx and the dtype policy are restored after the test."""
    floatx, policy = keras.config.floatx(), keras.config.dtype_policy().name
    set_float("float64")
    yield
    keras.config.set_floatx(floatx)
    keras.config.set_dtype_policy(policy)


def randomize(model, seed=0):
    """Random weights and BatchNorm moving statistics, so inference-mode BatchNorm is not the identity."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        scale = 1 / np.sqrt(np.prod(w.shape[:-1]) or 1)
        value = rng.uniform(0.5, 1.5, w.shape) if "variance" in w.path else rng.normal(scale=scale, size=w.shape)
        w.assign(value)
    return model


def tensorboard_scalars(directory):
    """{tag: {step: value}} of every scalar in the TensorBoard event files of `directory` (one run), read with
    TensorFlow's own event reader."""
    import tensorflow as tf

    scalars = {}
    for path in sorted(pathlib.Path(directory).glob("*tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                number = tf.make_ndarray(value.tensor) if value.HasField("tensor") else np.float32(value.simple_value)
                if number.ndim == 0 and number.dtype.kind == "f":  # not Keras's model graph, a string
                    scalars.setdefault(value.tag, {})[event.step] = float(number)
    return scalars


def tensorboard_runs(root):
    """{run name (its directory under `root`): tensorboard_scalars} of every TensorBoard run under `root`."""
    root = pathlib.Path(root)
    folders = sorted({path.parent for path in root.rglob("*tfevents*")})
    return {str(folder.relative_to(root)): tensorboard_scalars(folder) for folder in folders}


def write_tfds_metadata(root, name, n_train=20, n_test=7):
    """Metadata (dataset_info.json with split sizes) so `mock_data` works offline with batch_size=-1.

    Under MockPolicy.USE_CODE the split sizes are unknown, batch_size=-1 becomes sys.maxsize and TF aborts
    allocating it; USE_FILES with these generated files avoids that and needs no network.
    """
    import os

    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=str(root))
    sizes = {"train": n_train, "test": n_test}
    splits = [tfds.core.SplitInfo(name=s, shard_lengths=[k], num_bytes=0) for s, k in sizes.items()]
    builder.info.set_splits(tfds.core.SplitDict(splits))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


# A user's own model under model.fit (the callbacks and models-from-runs tests)
N_TRAIN, BATCH = 256, 64  # 4 steps per epoch, for Keras and for kerasntk (N divisible by the batch)


def tiny_model(seed=0, optimizer=None, loss=None):
    """A user's own functional model: conv, pooling, dense logits, compiled with SGD momentum."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((40, 1))
    h = keras.layers.Conv1D(4, 5, activation="relu")(inputs)
    h = keras.layers.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, keras.layers.Dense(10)(h))
    model.compile(optimizer or keras.optimizers.SGD(0.1, momentum=0.9),
                  loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class Recorder(keras.callbacks.Callback):
    """Weights, step and SGD momentum slots at train begin and every epoch end (independent of the callbacks)."""

    def __init__(self):
        super().__init__()
        self.weights, self.steps, self.momenta = [], [], []

    def _record(self):
        self.weights.append(self.model.get_weights())
        self.steps.append(int(self.model.optimizer.iterations.numpy()))
        self.momenta.append([m.numpy() for m in getattr(self.model.optimizer, "momentums", [])])

    def on_train_begin(self, logs=None):
        self._record()

    def on_epoch_end(self, epoch, logs=None):
        self._record()
