"""The model zoo: Keras functional models that output logits, looked up by name with `get`."""

import inspect
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402

_REGISTRY = {}


def register(name):
    """Decorator adding a builder `fn(input_shape, num_classes, **kw) -> keras.Model` to the zoo."""

    def add(builder):
        _REGISTRY[name] = builder
        return builder

    return add


def names():
    """Names accepted by `get`, sorted."""
    return sorted(_REGISTRY)


def get(name, input_shape, num_classes, *, sync_bn=False, **kw):
    """Build zoo model `name` for inputs of `input_shape` (no batch axis) and `num_classes` logits;
    `sync_bn`: BatchNormalization statistics over the global batch across replicas (`synchronize_batchnorm`)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(names())}")
    builder = _REGISTRY[name]
    try:
        inspect.signature(builder).bind(tuple(input_shape), int(num_classes), **kw)
    except TypeError as err:
        allowed = [p for p in inspect.signature(builder).parameters if p not in ("input_shape", "num_classes")]
        raise ValueError(f"bad options for model {name!r}: {err}; allowed options: {', '.join(allowed)}") from None
    model = builder(tuple(input_shape), int(num_classes), **kw)
    return synchronize_batchnorm(model) if sync_bn else model


def has_batchnorm(model):
    """True when `model` contains a BatchNormalization layer (at any nesting depth)."""
    return any(isinstance(layer, layers.BatchNormalization) for layer in model._flatten_layers())


@keras.saving.register_keras_serializable("kerasntk")
class SyncBatchNormalization(layers.BatchNormalization):
    """BatchNormalization whose training statistics are the global batch's, all-reduced across the replicas
    of a tf.distribute strategy, with the two-pass variance tf.nn.moments computes on one device (the mean
    first, then the mean squared deviation). Keras's own `synchronized=True` computes E[x^2] - E[x]^2, whose
    float32 cancellation made a 3-step ResNet-20 run differ from one device by 3e-2 where this one agrees
    to rounding (tests/test_training.py). Two all-reduces per layer and step."""

    def _moments(self, inputs, mask):
        context = tf.distribute.get_replica_context()
        if mask is not None or context is None:  # masked inputs, or outside a replica: Keras's own path
            return super()._moments(inputs, mask)
        x = tf.cast(inputs, tf.float32)
        axes = self._reduction_axes
        count = tf.cast(tf.size(x) // tf.shape(x)[self.axis] * context.num_replicas_in_sync, tf.float32)
        mean = context.all_reduce("SUM", tf.reduce_sum(x, axes, keepdims=True)) / count
        deviations = tf.reduce_sum(tf.math.squared_difference(x, tf.stop_gradient(mean)), axes, keepdims=True)
        variance = context.all_reduce("SUM", deviations) / count
        return (tf.cast(tf.squeeze(mean, axes), inputs.dtype), tf.cast(tf.squeeze(variance, axes), inputs.dtype))


def synchronize_batchnorm(model):
    """`model` with every BatchNormalization a `SyncBatchNormalization`: training-mode statistics over the
    global batch across replicas, so a BatchNorm model trains alike on 1, 2 or 8 replicas. Inference (moving
    statistics) is unchanged. The weights are copied, so both versions start from the same initialization.
    Without BatchNorm: `model` itself."""
    if not has_batchnorm(model):
        return model

    def clone(layer):
        if isinstance(layer, layers.BatchNormalization):
            return SyncBatchNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    synced = keras.models.clone_model(model, clone_function=clone)
    synced.set_weights(model.get_weights())
    return synced


def _norm(x, batchnorm, name):
    return layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=name)(x) if batchnorm else x


@register("cnn1d")
def cnn1d(input_shape, num_classes, channels=32, batchnorm=False):
    """The mnist1d CNN (Greydanus 2020): three stride-2 Conv1D + ReLU layers, then a dense logit layer."""
    x = inputs = keras.Input(input_shape)
    if len(input_shape) == 1:
        x = layers.Reshape((input_shape[0], 1))(x)
    for i, kernel in enumerate((5, 3, 3)):
        x = layers.Conv1D(channels, kernel, strides=2, padding="same", name=f"conv{i}")(x)
        x = _norm(x, batchnorm, f"bn{i}")
        x = layers.ReLU()(x)
    x = layers.Flatten()(x)
    return keras.Model(inputs, layers.Dense(num_classes, name="logits")(x), name="cnn1d")


@register("cnn")
def cnn(input_shape, num_classes, channels=32, conv_layers=2, pool=2, batchnorm=False):
    """A plain 2-D CNN: `conv_layers` 3x3 same-padded convs with ReLU, average pooling, dense logits.

    The defaults on 32x32x3 inputs are the 92k-parameter CNN used to benchmark the NTK engine.
    """
    x = inputs = keras.Input(input_shape)
    for i in range(conv_layers):
        x = layers.Conv2D(channels, 3, padding="same", name=f"conv{i}")(x)
        x = _norm(x, batchnorm, f"bn{i}")
        x = layers.ReLU()(x)
    if pool and pool > 1:
        x = layers.AveragePooling2D(pool)(x)
    x = layers.Flatten()(x)
    return keras.Model(inputs, layers.Dense(num_classes, name="logits")(x), name="cnn")


@register("mlp")
def mlp(input_shape, num_classes, hidden=(512, 512, 512), batchnorm=False):
    """A fully connected ReLU network on flattened inputs."""
    x = inputs = keras.Input(input_shape)
    x = layers.Flatten()(x)
    for i, width in enumerate(hidden):
        x = layers.Dense(width, name=f"dense{i}")(x)
        x = _norm(x, batchnorm, f"bn{i}")
        x = layers.ReLU()(x)
    return keras.Model(inputs, layers.Dense(num_classes, name="logits")(x), name="mlp")


def _basic_block(x, filters, stride, batchnorm, name):
    """Post-activation ResNet basic block (He et al. 2016) with a 1x1 projection when shapes change."""
    shortcut = x
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=not batchnorm, name=f"{name}_conv1")(x)
    y = layers.ReLU()(_norm(y, batchnorm, f"{name}_bn1"))
    y = layers.Conv2D(filters, 3, padding="same", use_bias=not batchnorm, name=f"{name}_conv2")(y)
    y = _norm(y, batchnorm, f"{name}_bn2")
    if stride != 1 or shortcut.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=not batchnorm, name=f"{name}_proj")(x)
        shortcut = _norm(shortcut, batchnorm, f"{name}_proj_bn")
    return layers.ReLU()(layers.Add()([y, shortcut]))


@register("resnet20")
def resnet20(input_shape, num_classes, width=1, batchnorm=True, depth=20):
    """CIFAR ResNet-(6n+2) (He et al. 2016), n = 3 for ResNet-20; `width` multiplies 16/32/64 channels."""
    if (depth - 2) % 6:
        raise ValueError(f"resnet depth must be 6n+2, got {depth}")
    blocks = (depth - 2) // 6
    x = inputs = keras.Input(input_shape)
    x = layers.Conv2D(16 * width, 3, padding="same", use_bias=not batchnorm, name="stem_conv")(x)
    x = layers.ReLU()(_norm(x, batchnorm, "stem_bn"))
    for stage, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, filters, stride, batchnorm, f"s{stage}b{block}")
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(num_classes, name="logits")(x), name=f"resnet{depth}")


def _wide_block(x, filters, stride, batchnorm, name):
    """Pre-activation wide-ResNet block (Zagoruyko & Komodakis 2016)."""
    y = layers.ReLU()(_norm(x, batchnorm, f"{name}_bn1"))
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(y)
    y = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"{name}_conv1")(y)
    y = layers.ReLU()(_norm(y, batchnorm, f"{name}_bn2"))
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    return layers.Add()([y, shortcut])


@register("wide_resnet")
def wide_resnet(input_shape, num_classes, depth=16, width=4, batchnorm=True):
    """WRN-depth-width: pre-activation ResNet with (depth-4)/6 blocks per stage of 16k/32k/64k channels."""
    if (depth - 4) % 6:
        raise ValueError(f"wide_resnet depth must be 6n+4, got {depth}")
    blocks = (depth - 4) // 6
    x = inputs = keras.Input(input_shape)
    x = layers.Conv2D(16, 3, padding="same", use_bias=False, name="stem_conv")(x)
    for stage, filters in enumerate((16 * width, 32 * width, 64 * width)):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _wide_block(x, filters, stride, batchnorm, f"s{stage}b{block}")
    x = layers.ReLU()(_norm(x, batchnorm, "final_bn"))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(num_classes, name="logits")(x), name=f"wrn{depth}_{width}")


@register("keras_file")
def keras_file(input_shape, num_classes, path):
    """A user's own architecture saved with `model.save(path)` (.keras); its weights are re-initialized
    by cloning, so a run starts from the checkpoint it restores, never from the file's weights."""
    model = keras.saving.load_model(path, compile=False)
    if tuple(model.input_shape[1:]) != tuple(input_shape) or model.output_shape[-1] != num_classes:
        raise ValueError(f"model file {path!r} maps {model.input_shape[1:]} -> {model.output_shape[-1]} logits; "
                         f"the data needs {tuple(input_shape)} -> {num_classes}")
    return keras.models.clone_model(model)
