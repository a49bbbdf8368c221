"""kerasntk's callbacks in a plain `model.fit`: your own functional Keras model on mnist1d.

Trains a sibling network, then the network of interest with three callbacks:
NTKMonitor (empirical NTK metrics each epoch -> History and OUT/ntk.nc), SpawnCheckpoint (checkpoints
at 0.5, 1 and 2 epochs in OUT/run, from which `kerasntk spawn` starts children) and LandscapeProbe
(error barrier and disagreement with the sibling at the end -> History and OUT/landscape.nc).

    python examples/fit_with_callbacks.py --out /tmp/fit_example      # ~30 s on a 2-core CPU
    kerasntk spawn /tmp/fit_example/run --time 1 --child 0            # a child from the epoch-1 checkpoint
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402

import kerasntk  # noqa: E402
from kerasntk.callbacks import LandscapeProbe, NTKMonitor, SpawnCheckpoint  # noqa: E402


def my_model(seed):
    """Any functional Keras model that outputs logits; compiled with SGD + momentum as children train."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((40, 1))
    h = keras.layers.Conv1D(32, 5, padding="same", activation="relu")(inputs)
    h = keras.layers.MaxPooling1D(2)(h)
    h = keras.layers.Conv1D(32, 5, padding="same", activation="relu")(h)
    h = keras.layers.GlobalAveragePooling1D()(h)
    outputs = keras.layers.Dense(10)(keras.layers.Dense(64, activation="relu")(h))
    model = keras.Model(inputs, outputs, name="my_cnn")
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def load(train_examples):
    """mnist1d, the training inputs standardized per channel with their own mean and std (as kerasntk's
    loader does for children)."""
    a = kerasntk.data.load_arrays("mnist1d")
    x, y = a.x_train[:train_examples], a.y_train[:train_examples]
    mean, std = x.mean(axis=(0, 1)), x.std(axis=(0, 1))
    return (x - mean) / std, y, (a.x_test - mean) / std, a.y_test


def main(epochs=10, train_examples=4000, batch_size=50, out="fit_example"):
    x, y, x_test, y_test = load(train_examples)
    os.makedirs(out, exist_ok=True)

    sibling = my_model(seed=1)
    sibling.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0)
    sibling.save_weights(os.path.join(out, "sibling.weights.h5"))

    x_probe, y_probe = kerasntk.data.probe_subset(x, y, 100, seed=0)
    model = my_model(seed=0)
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, validation_data=(x_test, y_test), verbose=2,
                        callbacks=[
                            NTKMonitor(x_probe, y_probe, every="epoch", path=os.path.join(out, "ntk.nc")),
                            SpawnCheckpoint([0.5, 1, 2], os.path.join(out, "run"), data=(x, y, x_test, y_test),
                                            batch_size=batch_size, children=2),
                            LandscapeProbe(os.path.join(out, "sibling.weights.h5"), (x_test, y_test), (x, y),
                                           path=os.path.join(out, "landscape.nc")),
                        ])

    ntk = xr.load_dataset(os.path.join(out, "ntk.nc"))
    print("NTK distance from init by epoch:",
          np.round(ntk["parent"].sel(metric="kernel_distance_from_init").values, 4))
    print(f"error barrier to the sibling: {history.history['error_barrier'][-1]:.4f}, "
          f"disagreement: {history.history['disagreement'][-1]:.4f}")
    print(f"children: kerasntk spawn {os.path.join(out, 'run')} --time 1 --child 0")
    return history


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=50, help="dividing the training set size keeps "
                        "Keras's and kerasntk's epochs equal (kerasntk drops the last partial batch)")
    parser.add_argument("--out", default="fit_example")
    args = parser.parse_args()
    main(args.epochs, args.train_examples, args.batch_size, args.out)
