"""Tests of kerasntk.data: offline loading, normalization, pure per-epoch order and augmentation, probes."""

import os
import random

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from kerasntk import data
from helpers import write_tfds_metadata

# float32 standardization vs a float64 reference: inputs are O(1..255) / std, so the float32 result is
# within a few ulps of values of size <= ~6; 1e-5 absolute leaves a margin of ~10x over float32 rounding.
F32_ATOL = 1e-5


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private mnist1d cache directory for this module (the user's ~/.cache is never touched)."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERASNTK_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def mnist1d(cache):
    return data.load_arrays("mnist1d", seed=3)


def images(n=100, shape=(8, 8, 3), augment="pad_crop_flip", seed=0):
    """Small synthetic image `Arrays` whose labels are the example indices mod 10."""
    x = np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)
    y = (np.arange(n) % 10).astype(np.int32)
    return data.Arrays(x, y, x[:10], y[:10], "synthetic", 10, augment)


def collect(ds):
    """All batches of a dataset as two lists of numpy arrays."""
    xs, ys = [], []
    for x, y in ds:
        xs.append(x.numpy())
        ys.append(y.numpy())
    return xs, ys


def reference_standardize(x_train, x):
    """Naive float64 per-channel (last axis) standardization with train statistics."""
    axes = tuple(range(x_train.ndim - 1))
    mean = x_train.astype(np.float64).mean(axis=axes)
    std = x_train.astype(np.float64).std(axis=axes)
    return (x.astype(np.float64) - mean) / std


# ------------------------------------------------------------------------------------------------ mnist1d


def test_mnist1d_matches_the_package_generator_and_is_normalized(mnist1d):
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = 3
    raw = make_dataset(args)
    assert mnist1d.x_train.shape == (4000, 40, 1) and mnist1d.x_test.shape == (1000, 40, 1)
    assert mnist1d.x_train.dtype == np.float32 and mnist1d.y_train.dtype == np.int32
    assert (mnist1d.num_classes, mnist1d.augment, mnist1d.input_shape) == (10, None, (40, 1))
    np.testing.assert_array_equal(mnist1d.y_train, raw["y"])
    np.testing.assert_array_equal(mnist1d.y_test, raw["y_test"])
    ref = reference_standardize(raw["x"][..., None], raw["x_test"][..., None])
    np.testing.assert_allclose(mnist1d.x_test, ref, rtol=0, atol=F32_ATOL)
    assert abs(mnist1d.x_train.mean()) < 1e-5 and abs(mnist1d.x_train.std() - 1) < 1e-5


def test_mnist1d_is_deterministic_cached_and_leaves_global_rng_alone(mnist1d, cache, tmp_path, monkeypatch):
    np.random.seed(123)
    random.seed(123)
    before = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    monkeypatch.setenv("KERASNTK_CACHE_DIR", str(tmp_path))
    fresh = data.load_arrays("mnist1d", seed=3)  # generated again in an empty cache
    assert (np.random.random(), random.random()) == before
    (cached,) = os.listdir(tmp_path)
    assert cached.startswith("mnist1d_3_") and cached.endswith(".npz")
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(fresh, key), getattr(mnist1d, key))
    (tmp_path / cached).write_bytes(b"truncated")  # a corrupt cache is regenerated
    np.testing.assert_array_equal(data.load_arrays("mnist1d", seed=3).x_train, mnist1d.x_train)
    monkeypatch.setenv("KERASNTK_CACHE_DIR", str(cache))
    assert not np.array_equal(data.load_arrays("mnist1d", seed=4).x_train, mnist1d.x_train)


def test_load_gives_an_unbatched_split_and_info(mnist1d):
    ds, info = data.load("mnist1d", split="test", seed=3)
    assert info == data.DatasetInfo("mnist1d", "test", 1000, 10, (40, 1), None)
    assert ds.element_spec[0].shape == (40, 1)
    x, y = next(iter(ds.batch(1000)))
    np.testing.assert_array_equal(x.numpy(), mnist1d.x_test)
    np.testing.assert_array_equal(y.numpy(), mnist1d.y_test)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        data.load("mnist1d", split="validation")


def test_channel_stats_match_a_naive_reference():
    x = np.random.default_rng(1).normal(100.0, 3.0, size=(37, 5, 4, 3))
    x[..., 2] = 7.0  # a constant channel is centred, not divided by zero
    mean, std = data._channel_stats(x, chunk=8)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 1, 2)), rtol=1e-12)
    np.testing.assert_allclose(std[:2], x.std(axis=(0, 1, 2))[:2], rtol=1e-10)
    assert std[2] == 1.0


# ------------------------------------------------------------------------------------------- tfds (mocked)


@pytest.mark.parametrize(
    "name, shape, augment", [("cifar10", (32, 32, 3), "pad_crop_flip"), ("mnist", (28, 28, 1), None)]
)
def test_tfds_path_with_mock_data(tmp_path, name, shape, augment):
    write_tfds_metadata(tmp_path, name)
    with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)):
        arrays = data.load_arrays(name, data_dir=str(tmp_path))
        (x_raw, y_raw), _ = tfds.as_numpy(
            tfds.load(name, split=["train", "test"], data_dir=str(tmp_path), batch_size=-1, as_supervised=True)
        )
    assert arrays.x_train.shape == (20, *shape) and arrays.x_train.dtype == np.float32
    assert (arrays.num_classes, arrays.augment, arrays.y_train.dtype) == (10, augment, np.int32)
    np.testing.assert_array_equal(arrays.y_train, y_raw)
    np.testing.assert_allclose(arrays.x_train, reference_standardize(x_raw, x_raw), rtol=0, atol=F32_ATOL)


def test_unprepared_tfds_dataset_says_how_to_prepare_it(tmp_path):
    with pytest.raises(data.DatasetNotAvailable) as err:
        data.load_arrays("cifar100", data_dir=str(tmp_path))
    message = str(err.value)
    assert isinstance(err.value, ValueError)
    for part in ("pip install tensorflow-datasets", f"tfds build cifar100 --data_dir {tmp_path}",
                 "download_and_prepare()", f"data.data_dir={tmp_path}", "gs://"):
        assert part in message


# -------------------------------------------------------------------------------------------------- npz


def test_npz_adds_a_channel_axis_and_normalizes_from_train(tmp_path):
    rng = np.random.default_rng(2)
    x_train = rng.integers(0, 256, (30, 6, 6)).astype(np.uint8)
    x_test = rng.integers(0, 256, (8, 6, 6)).astype(np.uint8)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(30) % 4, x_test=x_test, y_test=np.arange(8) % 5)
    arrays = data.load_arrays("npz", path=str(path))
    assert arrays.input_shape == (6, 6, 1) and arrays.num_classes == 5 and arrays.augment is None
    ref = reference_standardize(x_train[..., None], x_test[..., None])
    np.testing.assert_allclose(arrays.x_test, ref, rtol=0, atol=F32_ATOL)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"y_test": None}, r"missing arrays \['y_test'\]"),
        ({"y_train": np.eye(4)[np.arange(10) % 4]}, r"y_train must be class indices of shape \(10,\).*one-hot"),
        ({"y_train": np.arange(10) - 1}, "y_train must hold integer class indices >= 0"),
        ({"y_test": np.full(5, 0.5)}, "y_test must hold integer class indices >= 0"),
        ({"x_test": np.zeros((5, 3, 2))}, r"x_train examples have shape \(4, 2\) but x_test \(3, 2\)"),
        ({"x_train": np.full((10, 4, 2), np.nan)}, "x_train contains NaN"),
    ],
)
def test_npz_validation_names_the_problem(tmp_path, change, message):
    arrays = {"x_train": np.zeros((10, 4, 2)), "y_train": np.arange(10) % 4, "x_test": np.zeros((5, 4, 2)),
              "y_test": np.arange(5) % 4}
    arrays.update(change)
    path = tmp_path / "bad.npz"
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    with pytest.raises(ValueError, match=message):
        data.load_arrays("npz", path=str(path))


def test_bad_names_and_arguments():
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'; allowed: mnist1d, cifar10, .*svhn_cropped, npz"):
        data.load_arrays("cifar11")
    with pytest.raises(ValueError, match="only used with dataset 'npz'"):
        data.load_arrays("mnist1d", path="x.npz")
    with pytest.raises(ValueError, match="needs path="):
        data.load_arrays("npz")
    with pytest.raises(ValueError, match="cannot read npz dataset"):
        data.load_arrays("npz", path="/nonexistent/file.npz")
    with pytest.raises(ValueError, match="mnist1d seed must be a non-negative integer"):
        data.load_arrays("mnist1d", seed=-1)


# ---------------------------------------------------------------------------------------------- batching


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    a = data.epoch_order(1000, 7, 3)
    np.testing.assert_array_equal(a, data.epoch_order(1000, 7, 3))
    np.testing.assert_array_equal(np.sort(a), np.arange(1000))
    assert not np.array_equal(a, data.epoch_order(1000, 7, 4))
    assert not np.array_equal(a, data.epoch_order(1000, 8, 3))
    with pytest.raises(ValueError, match="order_seed must be a non-negative integer"):
        data.epoch_order(10, -1, 0)


def test_train_batches_follow_epoch_order_with_static_shapes_and_drop_remainder():
    arrays = images(n=100)
    ds = data.train_batches(arrays, batch_size=32, epoch=2, order_seed=5, augment_seed=0, augment=False)
    assert data.steps_per_epoch(arrays, 32) == data.steps_per_epoch(100, 32) == 3
    assert [s.shape.as_list() for s in ds.element_spec] == [[32, 8, 8, 3], [32]]
    xs, ys = collect(ds)
    order = data.epoch_order(100, 5, 2)[:96]
    np.testing.assert_array_equal(np.concatenate(xs), arrays.x_train[order])
    np.testing.assert_array_equal(np.concatenate(ys), arrays.y_train[order])


def test_train_batches_run_without_the_autotuning_model_thread():
    # its teardown waits until the thread's next wake-up (seconds, at random): the trainer makes an iterator per epoch
    ds = data.train_batches(images(n=40), batch_size=8, epoch=0, order_seed=0, augment_seed=0)
    assert ds.options().autotune.enabled is False


def test_train_batches_are_pure_and_resume_mid_epoch_bitwise():
    arrays = images(n=100)
    kw = dict(batch_size=16, order_seed=1, augment_seed=2)
    xs, ys = collect(data.train_batches(arrays, epoch=4, **kw))
    again_x, again_y = collect(data.train_batches(arrays, epoch=4, **kw))
    tail_x, tail_y = collect(data.train_batches(arrays, epoch=4, start_batch=4, **kw))
    np.testing.assert_array_equal(np.stack(again_x), np.stack(xs))
    np.testing.assert_array_equal(np.stack(tail_x), np.stack(xs[4:]))
    np.testing.assert_array_equal(np.stack(tail_y), np.stack(ys[4:]))
    assert len(xs) == 6 and not np.array_equal(xs[0], arrays.x_train[data.epoch_order(100, 1, 4)[:16]])
    other_epoch, _ = collect(data.train_batches(arrays, epoch=5, **kw))
    assert not np.array_equal(np.stack(other_epoch), np.stack(xs))
    other_aug, other_aug_y = collect(data.train_batches(arrays, epoch=4, **{**kw, "augment_seed": 3}))
    np.testing.assert_array_equal(np.stack(other_aug_y), np.stack(ys))  # order depends on order_seed only
    assert not np.array_equal(np.stack(other_aug), np.stack(xs))
    assert list(data.train_batches(arrays, epoch=4, start_batch=6, **kw)) == []  # resume at epoch end
    plain = images(n=100, augment=None)  # True forces the augmentation on a dataset without a default
    forced_x, _ = collect(data.train_batches(plain, epoch=4, augment=True, **kw))
    np.testing.assert_array_equal(np.stack(forced_x), np.stack(xs))


def test_pad_crop_flip_is_a_valid_crop_and_flip_against_a_numpy_reference():
    b, h, w, p = 512, 6, 5, data.CROP_PADDING
    rows, cols = np.meshgrid(np.arange(1, h + 1), np.arange(1, w + 1), indexing="ij")
    x = np.stack([np.broadcast_to(rows, (b, h, w)), np.broadcast_to(cols, (b, h, w)),
                  np.broadcast_to(np.arange(b)[:, None, None], (b, h, w))], axis=-1).astype(np.float32)
    out = data.pad_crop_flip(tf.constant(x), tf.constant([[1, 2], [3, 4]], tf.int64)).numpy()
    padded = np.pad(x, [(0, 0), (p, p), (p, p), (0, 0)])
    found = []
    for i in range(b):  # exactly one of the (2p+1)^2 crops x 2 flips reproduces each output (coordinates encoded)
        matches = [(dy, dx, f) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for f in (0, 1)
                   if np.array_equal(out[i], (lambda c: c[:, ::-1] if f else c)(padded[i, dy : dy + h, dx : dx + w]))]
        assert len(matches) == 1, (i, matches)
        found.append(matches[0])
    dy, dx, flip = np.array(found).T
    assert set(dy) == set(dx) == set(range(2 * p + 1))  # every offset occurs (P(miss) ~ 9 (8/9)^512 ~ 1e-25)
    assert 0.4 < flip.mean() < 0.6  # Binomial(512, 1/2): sd 0.022, so this is a 4.5 sd band


def test_train_batches_split_across_two_replicas(mirrored):
    arrays = images(n=64, augment=None)
    ds = data.train_batches(arrays, batch_size=16, epoch=0, order_seed=0, augment_seed=0)
    strategy = mirrored
    first_x, _ = next(iter(strategy.experimental_distribute_dataset(ds)))
    parts = strategy.experimental_local_results(first_x)
    assert [p.shape.as_list() for p in parts] == [[8, 8, 8, 3]] * 2
    np.testing.assert_array_equal(np.concatenate(parts), collect(ds)[0][0])


def test_train_batches_reject_bad_arguments():
    arrays = images(n=20)
    kw = dict(epoch=0, order_seed=0, augment_seed=0)
    with pytest.raises(ValueError, match="batch_size=32 exceeds the 20 training examples"):
        data.train_batches(arrays, batch_size=32, **kw)
    with pytest.raises(ValueError, match=r"start_batch must be an integer in \[0, 2\]"):
        data.train_batches(arrays, batch_size=8, start_batch=3, **kw)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        data.train_batches(arrays, batch_size=0, **kw)
    with pytest.raises(ValueError, match="augment must be None, False, True or one of"):
        data.train_batches(arrays, batch_size=8, augment="mixup", **kw)
    vectors = data.Arrays(np.zeros((20, 40, 1), np.float32), np.zeros(20, np.int32), None, None, "v", 10, None)
    with pytest.raises(ValueError, match=r"needs \(H, W, C\) images"):
        data.train_batches(vectors, batch_size=8, augment=True, **kw)


def test_eval_batches_keep_order_and_remainder():
    arrays = images(n=100)
    xs, ys = collect(data.eval_batches(arrays.x_train, arrays.y_train, 32))
    assert [len(y) for y in ys] == [32, 32, 32, 4]
    np.testing.assert_array_equal(np.concatenate(xs), arrays.x_train)


# ------------------------------------------------------------------------------------------------ probes


def test_probe_subset_is_class_balanced_seed_fixed_and_sorted():
    y = np.repeat(np.arange(10), 30)[np.random.default_rng(0).permutation(300)]
    x = np.arange(300)  # x holds each example's index
    xp, yp = data.probe_subset(x, y, 25, seed=1)
    np.testing.assert_array_equal(np.bincount(yp, minlength=10), [3] * 5 + [2] * 5)
    assert np.all(np.diff(xp) > 0) and np.array_equal(y[xp], yp)
    np.testing.assert_array_equal(data.probe_subset(x, y, 25, seed=1)[0], xp)
    assert not np.array_equal(data.probe_subset(x, y, 25, seed=2)[0], xp)
    with pytest.raises(ValueError, match="probe size n=301 exceeds the 300 available examples"):
        data.probe_subset(x, y, 301, seed=0)
    y_small = np.concatenate([np.zeros(290, int), np.ones(10, int)])
    with pytest.raises(ValueError, match="needs 20 examples of class 1, which has only 10"):
        data.probe_subset(x, y_small, 40, seed=0)
