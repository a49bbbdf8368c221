"""Experiment configuration: dataclasses, JSON/YAML loading, `section.field=value` overrides, validation.

Every error is a `ConfigError` naming the field, the bad value and what is allowed.
"""

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A configuration value that is malformed or not allowed."""


SCHEDULES = ("constant", "cosine", "step")

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ep|it)\s*$")


@dataclass(frozen=True)
class Duration:
    """A training time given in epochs (`"30ep"`, `0.25`) or optimizer steps (`"500it"`)."""

    value: float
    unit: str  # "ep" or "it"

    def steps(self, steps_per_epoch):
        """The time in optimizer steps (epochs are rounded to the nearest step)."""
        if self.unit == "it":
            return int(self.value)
        return int(round(self.value * steps_per_epoch))

    def __str__(self):
        return f"{self.value:g}{self.unit}"


def parse_duration(value, name="duration"):
    """Parse `"30ep"`, `"500it"` or a number of epochs into a `Duration`; `name` labels errors."""
    if isinstance(value, Duration):
        return value
    if isinstance(value, bool):
        value = None  # bool is an int subclass, never a duration
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"{name}: {value!r} must be a finite number of epochs >= 0")
        return Duration(float(value), "ep")
    if isinstance(value, str) and _is_float(value):
        return parse_duration(float(value), name)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if not match:
        raise ConfigError(
            f"{name}: {value!r} is not a duration; allowed: a number of epochs (0.25), "
            f"'<number>ep' for epochs ('30ep') or '<integer>it' for steps ('500it')"
        )
    number, unit = float(match.group(1)), match.group(2)
    if unit == "it" and number != int(number):
        raise ConfigError(f"{name}: {value!r} must be a whole number of steps")
    return Duration(number, unit)


@dataclass
class DataConfig:
    name: str = "mnist1d"
    data_dir: str | None = None  # prepared tensorflow-datasets directory (local or gs://)
    path: str | None = None  # the user's .npz when name == "npz"
    seed: int = 42  # generation seed of mnist1d (42: the published dataset)
    augment: bool | None = None  # None: the dataset's standard augmentation (pad-crop-flip on CIFAR/SVHN)


@dataclass
class ModelConfig:
    name: str = "cnn1d"
    options: dict = field(default_factory=dict)  # keyword arguments of the model builder (width, batchnorm, ...)
    # BatchNorm statistics over the global batch, synchronized across replicas: true, false (each replica
    # its own slice), or "auto": synchronized whenever more than one replica trains
    sync_bn: bool | str = "auto"


@dataclass
class TrainConfig:
    length: str | float = "30ep"
    batch_size: int = 64  # global batch, split over replicas
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4  # coupled L2 on all trainable weights
    schedule: str = "cosine"
    warmup: str | float = 0
    milestones: list = field(default_factory=list)  # times of the step schedule
    gamma: float = 0.1  # step schedule factor
    seed: int = 0  # weight initialization
    data_seed: int = 0  # data order
    augment_seed: int = 0  # augmentation randomness
    steps_per_execution: int = 32  # steps run in one tf.function call (fewer host round trips)
    jit_compile: bool | str = "auto"  # XLA train steps: true, false, or "auto" (on GPU/TPU only)
    deterministic: bool = True  # tf.config.experimental.enable_op_determinism
    eval_batch_size: int = 1000


@dataclass
class CheckpointConfig:
    """The checkpoint grid: explicit times, log-spaced early times, and every k epochs; 0 and the end always."""

    times: list = field(default_factory=list)
    log_start: str | float | None = None  # first log-spaced time (> 0)
    log_stop: str | float | None = None
    log_num: int = 0
    every: str | float | None = None


@dataclass
class SpawnConfig:
    times: list = field(default_factory=list)  # spawn times; must be on the checkpoint grid (added to it)
    children: int = 3
    reset_momentum: bool = False  # ours: children start with zero momentum instead of the parent's
    diverged: str = "fail"  # a child whose loss diverges: "fail" stops the run, "record" keeps it as a result (NaN metrics)


@dataclass
class NTKConfig:
    probe_size: int = 128
    probe_seed: int = 0
    implementation: str = "auto"
    batch_size: int = 64
    enabled: bool = True
    # kernel velocity S(K_t, K_t+dt) / dt: the grid gets a checkpoint at t + dt for every time t on it
    # (docs/methods.md §5; the paper's dt is 0.4 epoch); null: to the next checkpoint, whatever its distance
    velocity_dt: str | float | None = "0.4ep"
    # the kernel decomposed over layers with trainable variables too (per-layer distance, velocity, alignment)
    per_layer: bool = True


@dataclass
class HessianConfig:
    """Curvature of the training loss (kerasntk.hessian) at every parent checkpoint and each child's end point:
    top eigenvalue by Lanczos, trace by Hutchinson, on a class-balanced subset of the training set."""

    enabled: bool = True
    subset_size: int = 512  # training examples the loss is measured on, at most (data.probe_subset with `seed`)
    batch_size: int = 512  # examples per block of the Hessian-vector product
    lanczos_steps: int = 20  # Lanczos steps (Hessian-vector products) for the top eigenvalue
    probes: int = 10  # Hutchinson probes (Hessian-vector products) for the trace
    seed: int = 0  # of the subset, the Lanczos start and the probes


@dataclass
class LandscapeConfig:
    alphas: int = 11
    bn: str = "reestimate"
    bn_examples: int = 2048  # training examples used to re-estimate BatchNorm statistics
    train_examples: int = 2048  # training subset on which train barriers are measured
    batch_size: int = 512


@dataclass
class LinearizeConfig:
    """Kernel learning: the parent's linearization at each of `times`, trained with SGD on the training set."""

    times: list = field(default_factory=list)  # parent times (added to the checkpoint grid)
    length: str | float = "10ep"
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 64
    validation_examples: int = 500  # held out of the training set to select the epoch (ours)


@dataclass
class DistributeConfig:
    tpu: str | None = None  # None: probe quietly; "" Colab; "local" TPU VM; else a name/address
    logical_cpus: int = 0  # > 1: MirroredStrategy over that many logical CPUs (testing)
    # what one job of the job graph asks of a Ray cluster, e.g. {"TPU": 4}, {"GPU": 1}, {"CPU": 1}
    job_resources: dict = field(default_factory=lambda: {"CPU": 1})
    intra_op_threads: int = 0  # TensorFlow threads per job (0: TensorFlow's default); 1 packs CPU jobs densely
    max_retries: int = 3  # times a Ray job is retried when its worker dies (preemption); errors are not retried


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    spawn: SpawnConfig = field(default_factory=SpawnConfig)
    ntk: NTKConfig = field(default_factory=NTKConfig)
    hessian: HessianConfig = field(default_factory=HessianConfig)
    landscape: LandscapeConfig = field(default_factory=LandscapeConfig)
    linearize: LinearizeConfig = field(default_factory=LinearizeConfig)
    distribute: DistributeConfig = field(default_factory=DistributeConfig)

    def to_dict(self):
        return dataclasses.asdict(self)

    def to_json(self):
        return json.dumps(self.to_dict(), sort_keys=True)

    def identity(self):
        """The config without MACHINE_FIELDS: what a run computes, not where it runs."""
        raw = self.to_dict()
        for key in MACHINE_FIELDS:
            section, name = key.split(".")
            raw[section].pop(name)
        return raw

    def digest(self):
        """A short hash of the identity: names run directories, so equal configs share one (idempotent re-runs)."""
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]

    def run_name(self):
        return f"{self.data.name}_{self.model.name}_{self.digest()}"


def from_dict(raw, cls=Config, where=""):
    """Build dataclass `cls` from nested dicts, rejecting unknown keys by name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown config field {path!r}; allowed: {', '.join(fields)}")
        sub = fields[key].type
        kwargs[key] = from_dict(value, sub, path) if dataclasses.is_dataclass(sub) else value
    return cls(**kwargs)


# Where a run executes, not what it computes: they may differ between the machines sharing a run directory.
MACHINE_FIELDS = ("data.data_dir", "distribute.tpu", "distribute.logical_cpus", "distribute.job_resources",
                  "distribute.intra_op_threads", "distribute.max_retries")


def load(path=None, overrides=()):
    """Load a config from JSON/YAML (`None`: the embedded default), apply `a.b=c` overrides, validate."""
    raw = default_dict() if path is None else _read(path)
    for item in overrides:
        _apply_override(raw, item)
    config = from_dict(raw)
    validate(config)
    return config


class _Loader(yaml.SafeLoader):
    """YAML with the numbers of YAML 1.2 and JSON: `1e-3`, `5E-4`, `1.0e+2` are floats (PyYAML follows
    YAML 1.1, which needs a dot and a signed exponent, and would read `1e-3` as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)[eE][-+]?[0-9]+
                  |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml(text):
    return yaml.load(text, Loader=_Loader)


def default_dict():
    """The embedded default experiment (mnist1d, cnn1d) as a nested dict."""
    return _yaml((Path(__file__).parent / "configs" / "default.yaml").read_text())


def _read(path):
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        raw = json.loads(text) if path.suffix == ".json" else _yaml(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"config file {str(path)!r} is not valid {path.suffix[1:] or 'YAML'}: {err}") from None
    return raw or {}


def _apply_override(raw, item):
    """Set `section.field=value` in the nested dict `raw`; the value is parsed as YAML (numbers, lists, null)."""
    key, sep, value = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {item!r} must look like section.field=value (e.g. train.lr=0.05)")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = _yaml(value)
    except yaml.YAMLError:
        node[parts[-1]] = value


def _check(ok, field_name, value, allowed):
    if not ok:
        raise ConfigError(f"{field_name}: {value!r} is not allowed; allowed: {allowed}")


def _field(config, dotted):
    """The value of field "section.name" of `config`."""
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


def validate(config):
    """Check every field that can be checked without data; raise ConfigError on the first bad one."""
    # The engines own their allowed values (datasets, models, NTK implementations, BN modes); importing them
    # here, not at the top, keeps `import kerasntk.config` (and `kerasntk --help`) free of TensorFlow.
    from kerasntk import data, landscape, models, ntk

    d, t, c, s = config.data, config.train, config.checkpoints, config.spawn
    _check(d.name in data.NAMES, "data.name", d.name, ", ".join(data.NAMES))
    _check(d.name != "npz" or bool(d.path), "data.path", d.path, "a path to an .npz file when data.name is 'npz'")
    _check(d.augment in (None, True, False, "pad_crop_flip"), "data.augment", d.augment,
           "null (the dataset's standard), true, false or 'pad_crop_flip'")
    _check(config.model.name in models.names(), "model.name", config.model.name, ", ".join(models.names()))
    _check(isinstance(config.model.options, dict), "model.options", config.model.options, "a mapping")
    kinds = {  # field -> (is the value allowed, what is allowed)
        **dict.fromkeys(("train.milestones", "checkpoints.times", "spawn.times", "linearize.times"),
                        (lambda v: isinstance(v, (list, tuple)), "a list of times, e.g. [0, 0.5, 2]")),
        **dict.fromkeys(("data.seed", "train.seed", "train.data_seed", "train.augment_seed", "ntk.probe_seed",
                         "hessian.seed"), (lambda v: _is_int(v) and v >= 0, "an integer >= 0")),
        **dict.fromkeys(("train.deterministic", "ntk.enabled", "ntk.per_layer", "spawn.reset_momentum",
                         "hessian.enabled"), (lambda v: isinstance(v, bool), "true or false")),
        **dict.fromkeys(("hessian.subset_size", "hessian.batch_size", "hessian.lanczos_steps", "hessian.probes"),
                        (lambda v: _is_int(v) and v > 0, "an integer > 0")),
    }
    for name, (ok, allowed) in kinds.items():
        _check(ok(_field(config, name)), name, _field(config, name), allowed)
    length = parse_duration(t.length, "train.length")
    _check(length.value > 0, "train.length", t.length, "a duration > 0")
    for name in ("batch_size", "steps_per_execution", "eval_batch_size"):
        value = getattr(t, name)
        _check(_is_int(value) and value > 0, f"train.{name}", value, "an integer > 0")
    _check(_is_number(t.lr) and t.lr > 0, "train.lr", t.lr, "a number > 0")
    _check(_is_number(t.momentum) and 0 <= t.momentum < 1, "train.momentum", t.momentum, "a number in [0, 1)")
    _check(_is_number(t.weight_decay) and t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "a number >= 0")
    _check(t.schedule in SCHEDULES, "train.schedule", t.schedule, ", ".join(SCHEDULES))
    _check(_is_number(t.gamma) and t.gamma > 0, "train.gamma", t.gamma, "a number > 0")
    parse_duration(t.warmup, "train.warmup")
    for i, m in enumerate(t.milestones):
        parse_duration(m, f"train.milestones[{i}]")
    for i, time in enumerate(c.times):
        parse_duration(time, f"checkpoints.times[{i}]")
    if c.log_num:
        _check(_is_int(c.log_num) and c.log_num > 1, "checkpoints.log_num", c.log_num, "0 or an integer > 1")
        start = parse_duration(c.log_start, "checkpoints.log_start")
        stop = parse_duration(c.log_stop, "checkpoints.log_stop")
        _check(start.value > 0, "checkpoints.log_start", c.log_start, "a duration > 0")
        _check(start.unit == stop.unit, "checkpoints.log_stop", c.log_stop, f"a duration in the unit of log_start ({start.unit})")
    if c.every is not None:
        _check(parse_duration(c.every, "checkpoints.every").value > 0, "checkpoints.every", c.every, "a duration > 0")
    for i, time in enumerate(s.times):
        parse_duration(time, f"spawn.times[{i}]")
    _check(_is_int(s.children) and s.children >= 1, "spawn.children", s.children, "an integer >= 1 (>= 2 for pairs)")
    _check(s.diverged in ("fail", "record"), "spawn.diverged", s.diverged, "fail, record")
    n = config.ntk
    _check(n.implementation in ntk.IMPLEMENTATIONS, "ntk.implementation", n.implementation, ", ".join(ntk.IMPLEMENTATIONS))
    _check(_is_int(n.probe_size) and n.probe_size > 1, "ntk.probe_size", n.probe_size, "an integer > 1")
    _check(_is_int(n.batch_size) and n.batch_size > 0, "ntk.batch_size", n.batch_size, "an integer > 0")
    _check(not (n.enabled and n.per_layer and n.implementation == "ntk_vp"), "ntk.per_layer", n.per_layer,
           "false when ntk.implementation is 'ntk_vp' (it forms no per-layer terms)")
    if n.velocity_dt is not None:
        _check(parse_duration(n.velocity_dt, "ntk.velocity_dt").value > 0, "ntk.velocity_dt", n.velocity_dt,
               "a duration > 0 or null")
    la = config.landscape
    _check(_is_int(la.alphas) and la.alphas >= 2, "landscape.alphas", la.alphas, "an integer >= 2")
    _check(la.bn in landscape.BN_MODES, "landscape.bn", la.bn, ", ".join(landscape.BN_MODES))
    for name in ("bn_examples", "train_examples", "batch_size"):
        value = getattr(la, name)
        _check(_is_int(value) and value > 0, f"landscape.{name}", value, "an integer > 0")
    _check(t.jit_compile in (True, False, "auto"), "train.jit_compile", t.jit_compile, "true, false or 'auto'")
    sync = config.model.sync_bn
    _check(sync in (True, False, "auto"), "model.sync_bn", sync, "true, false or 'auto'")
    li = config.linearize
    for i, time in enumerate(li.times):
        parse_duration(time, f"linearize.times[{i}]")
    _check(parse_duration(li.length, "linearize.length").value > 0, "linearize.length", li.length, "a duration > 0")
    _check(_is_number(li.lr) and li.lr > 0, "linearize.lr", li.lr, "a number > 0")
    _check(_is_number(li.momentum) and 0 <= li.momentum < 1, "linearize.momentum", li.momentum, "a number in [0, 1)")
    for name in ("batch_size", "validation_examples"):
        value = getattr(li, name)
        _check(_is_int(value) and value > 0, f"linearize.{name}", value, "an integer > 0")
    lc = config.distribute.logical_cpus
    _check(_is_int(lc) and lc >= 0, "distribute.logical_cpus", lc, "an integer >= 0")
    jr = config.distribute.job_resources
    _check(isinstance(jr, dict) and all(isinstance(k, str) and _is_number(v) and v >= 0 for k, v in jr.items()),
           "distribute.job_resources", jr, 'a mapping of Ray resource names to amounts >= 0, e.g. {"TPU": 4}')
    for name in ("intra_op_threads", "max_retries"):
        value = getattr(config.distribute, name)
        _check(_is_int(value) and value >= 0, f"distribute.{name}", value, "an integer >= 0")


def with_parent_seed(config, seed):
    """`config` with the parent's seeds (weight initialization, data order, augmentation) all set to `seed`:
    one replicate of the experiment; the probe set and the Hessian subset stay as they are."""
    _check(_is_int(seed) and seed >= 0, "seed", seed, "an integer >= 0")
    train = dataclasses.replace(config.train, seed=seed, data_seed=seed, augment_seed=seed)
    return dataclasses.replace(config, train=train)


def parse_seeds(text):
    """"0,1,2" -> [0, 1, 2] (distinct integers >= 0), for `kerasntk run --seeds`."""
    items = [item.strip() for item in str(text).split(",")]
    if not all(item.isdigit() for item in items) or len(set(map(int, items))) != len(items):
        raise ConfigError(f"--seeds: {text!r} is not allowed; allowed: distinct integers >= 0 separated by commas, "
                          "e.g. 0,1,2")
    return [int(item) for item in items]


def validate_against(config, steps_per_epoch, num_replicas):
    """Checks that need the data and the strategy: times within training, batch divisible by replicas."""
    t = config.train
    _check(
        t.batch_size % num_replicas == 0,
        "train.batch_size",
        t.batch_size,
        f"a multiple of the {num_replicas} replicas of the distribution strategy",
    )
    _check(steps_per_epoch > 0, "train.batch_size", t.batch_size, f"at most the training set size")
    total = parse_duration(t.length).steps(steps_per_epoch)
    named = [(f"checkpoints.times[{i}]", v) for i, v in enumerate(config.checkpoints.times)]
    named += [(f"spawn.times[{i}]", v) for i, v in enumerate(config.spawn.times)]
    named += [(f"linearize.times[{i}]", v) for i, v in enumerate(config.linearize.times)]
    named += [(f"train.milestones[{i}]", v) for i, v in enumerate(t.milestones)]
    named += [("train.warmup", t.warmup)]
    if config.checkpoints.log_num:
        named += [("checkpoints.log_stop", config.checkpoints.log_stop)]
    for name, value in named:
        steps = parse_duration(value).steps(steps_per_epoch)
        _check(steps <= total, name, value, f"a time within training (<= {t.length} = {total} steps)")
    return total


def _is_float(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
