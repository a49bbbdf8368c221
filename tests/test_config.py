"""Config loading, overrides, durations and validation messages."""

import json

import pytest

from kerasntk import config as cfg


def test_default_is_the_embedded_mnist1d_experiment():
    c = cfg.load()
    assert (c.data.name, c.model.name, c.train.length, c.train.batch_size) == ("mnist1d", "cnn1d", "30ep", 64)
    assert c.spawn.children == 3 and c.spawn.times[0] == 0


def test_overrides_are_typed_and_nested(tmp_path):
    c = cfg.load(None, ["train.lr=0.05", "spawn.times=[0, 1]", "model.options.width=2", "data.data_dir=null"])
    assert c.train.lr == 0.05 and c.spawn.times == [0, 1] and c.model.options == {"width": 2}
    assert c.data.data_dir is None


def test_json_and_yaml_files_load_the_same(tmp_path):
    raw = {"train": {"length": "2ep", "lr": 0.2}, "model": {"name": "mlp"}}
    (tmp_path / "c.json").write_text(json.dumps(raw))
    (tmp_path / "c.yaml").write_text("train: {length: 2ep, lr: 0.2}\nmodel: {name: mlp}\n")
    assert cfg.load(tmp_path / "c.json") == cfg.load(tmp_path / "c.yaml")


def test_the_paper_config_validates():
    c = cfg.load("configs/cifar10_resnet20.yaml")
    assert (c.data.name, c.model.name, c.model.options["batchnorm"]) == ("cifar10", "resnet20", True)


def test_digest_names_equal_configs_alike():
    assert cfg.load().run_name() == cfg.load().run_name()
    assert cfg.load().run_name() != cfg.load(None, ["train.seed=1"]).run_name()


@pytest.mark.parametrize("text, expected", [
    ("30ep", cfg.Duration(30.0, "ep")), ("500it", cfg.Duration(500.0, "it")), (0.25, cfg.Duration(0.25, "ep")),
    ("1.5e1ep", cfg.Duration(15.0, "ep")), (3, cfg.Duration(3.0, "ep")), ("0.3", cfg.Duration(0.3, "ep")),
])
def test_durations_parse(text, expected):
    assert cfg.parse_duration(text) == expected


def test_duration_steps():
    assert cfg.parse_duration("0.5ep").steps(62) == 31
    assert cfg.parse_duration("7it").steps(62) == 7


@pytest.mark.parametrize("overrides, field, allowed", [
    (["data.name=imagenet"], "data.name", "mnist1d, cifar10"),
    (["model.name=vgg"], "model.name", "cnn, cnn1d, keras_file, mlp"),
    (["train.length=0"], "train.length", "a duration > 0"),
    (["train.length=-3"], "train.length", ">= 0"),
    (["train.length=30 epochs"], "train.length", "'30ep'"),
    (["train.length=2.5it"], "train.length", "whole number of steps"),
    (["train.batch_size=0"], "train.batch_size", "an integer > 0"),
    (["train.batch_size=-64"], "train.batch_size", "an integer > 0"),
    (["train.lr=0"], "train.lr", "a number > 0"),
    (["train.momentum=1.5"], "train.momentum", "[0, 1)"),
    (["train.schedule=linear"], "train.schedule", "constant, cosine, step"),
    (["spawn.times=[0, soon]"], "spawn.times[1]", "a number of epochs"),
    (["spawn.children=0"], "spawn.children", "an integer >= 1"),
    (["landscape.bn=ignore"], "landscape.bn", "reestimate, interpolate"),
    (["data.name=npz"], "data.path", "a path to an .npz file"),
    (["train.colour=red"], "train.colour", "allowed: length, batch_size"),
    (["spawn.times=2"], "spawn.times", "a list of times"),
    (["train.milestones=100"], "train.milestones", "a list of times"),
    (["train.seed=-1"], "train.seed", "an integer >= 0"),
    (["ntk.enabled=maybe"], "ntk.enabled", "true or false"),
    (["data.augment=flip"], "data.augment", "'pad_crop_flip'"),
    (["ntk.velocity_dt=0"], "ntk.velocity_dt", "a duration > 0 or null"),
    (["ntk.per_layer=sometimes"], "ntk.per_layer", "true or false"),
    (["ntk.implementation=ntk_vp"], "ntk.per_layer", "false when ntk.implementation is 'ntk_vp'"),
    (["hessian.enabled=1"], "hessian.enabled", "true or false"),
    (["hessian.subset_size=0"], "hessian.subset_size", "an integer > 0"),
    (["hessian.lanczos_steps=2.5"], "hessian.lanczos_steps", "an integer > 0"),
    (["hessian.probes=-1"], "hessian.probes", "an integer > 0"),
    (["hessian.seed=-2"], "hessian.seed", "an integer >= 0"),
    (["hessian.size=3"], "hessian.size", "allowed: enabled, subset_size"),
])
def test_errors_name_field_value_and_what_is_allowed(overrides, field, allowed):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(None, overrides)
    assert field in str(err.value) and allowed in str(err.value)


def test_errors_that_need_the_data_and_the_strategy():
    c = cfg.load(None, ["checkpoints.times=[40]"])
    with pytest.raises(cfg.ConfigError, match=r"checkpoints.times\[0\].*within training"):
        cfg.validate_against(c, steps_per_epoch=62, num_replicas=1)
    c = cfg.load(None, ["train.batch_size=63"])
    with pytest.raises(cfg.ConfigError, match="train.batch_size.*multiple of the 2 replicas"):
        cfg.validate_against(c, steps_per_epoch=62, num_replicas=2)
    assert cfg.validate_against(cfg.load(), steps_per_epoch=62, num_replicas=2) == 30 * 62


def test_replicates_differ_in_the_parent_seeds_only():
    base = cfg.load()
    seeded = cfg.with_parent_seed(base, 3)
    assert (seeded.train.seed, seeded.train.data_seed, seeded.train.augment_seed) == (3, 3, 3)
    assert seeded.ntk == base.ntk and seeded.hessian == base.hessian and seeded.data == base.data
    assert seeded.run_name() != base.run_name() and cfg.with_parent_seed(base, 0).run_name() == base.run_name()
    assert cfg.parse_seeds("0, 1,2") == [0, 1, 2]
    for bad in ("0,0", "1,-1", "a", ""):
        with pytest.raises(cfg.ConfigError, match="--seeds: .* distinct integers >= 0"):
            cfg.parse_seeds(bad)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(cfg.ConfigError, match="section.field=value"):
        cfg.load(None, ["train.lr"])
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(cfg.ConfigError, match="not valid"):
        cfg.load(tmp_path / "bad.yaml")


@pytest.mark.parametrize("spelling, value", [("1e-3", 0.001), ("5.0e-4", 0.0005), ("1E-3", 0.001), ("2e+1", 20.0)])
def test_numbers_in_any_yaml_or_json_spelling_are_numbers(tmp_path, spelling, value):
    """YAML 1.1 (PyYAML's default) reads `1e-3` as a string; configs read numbers as YAML 1.2 and JSON do."""
    assert cfg.load(None, [f"train.lr={spelling}"]).train.lr == value
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  lr: {spelling}\nlinearize:\n  times: [0, {spelling}]\n")
    loaded = cfg.load(path)
    assert loaded.train.lr == value and loaded.linearize.times == [0, value]
