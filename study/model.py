"""The CIFAR CNN of the 2020 notebook, with a width multiplier and optional modern parts.

At width 1 with the default options it is the notebook's network layer for layer:
conv 128-128, pool, conv 256-256, pool, dropout, conv 512-512, pool, dropout, dense 1024,
dropout, dense to the classes (6,777,060 parameters for 100 classes). The second conv of
each pair is unpadded ("valid"), as in the notebook. It outputs raw class scores whatever
the loss; the notebook's softmax is the loss's head (study/losses.py). It takes uint8
images and scales them to [0, 1] itself: the input pipeline moves a quarter of the bytes,
and the scaling runs on the device with the rest of the model. Augmentation, too, is a
layer of batched `keras.ops`, so that every trial compiles (XLA on TensorFlow, `jit` on
JAX).
"""

import keras
from keras import layers, ops

BLOCK_FILTERS = (128, 256, 512)
SCORES = "scores"  # The output layer: raw class scores, whatever the loss.
DENSE_UNITS = 1024


def _scaled(units: int, width: float) -> int:
    return max(1, round(units * width))


def _conv(x, filters, padding, config, name):
    # With batch norm the conv's bias is redundant: the norm's offset replaces it.
    x = layers.Conv2D(filters, 3, padding=padding, use_bias=not config.batch_norm, name=name)(x)
    if config.batch_norm:
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation(config.activation, name=f"{name}_{config.activation}")(x)


@keras.saving.register_keras_serializable(package="study")
class FlipShift(layers.Layer):
    """Random horizontal flips and whole-pixel shifts of up to `pad` pixels, drawn per
    image, in training only (identity at inference); edges are reflected.

    One gather from the reflect-padded batch does both: each output pixel's source row
    and column. Keras's RandomTranslation cannot be compiled (`supports_jit = False`), so
    a model with it silently ran without XLA or `jit`; these ops compile on every backend.
    """

    def __init__(self, pad: int = 4, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.pad, self.seed = pad, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        if not training:
            return images
        batch = ops.shape(images)[0]
        height, width, channels = images.shape[1:]
        pad = self.pad
        padded = ops.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="reflect")
        offsets = keras.random.randint((batch, 2), 0, 2 * pad + 1, seed=self.seed_generator)
        flip = keras.random.randint((batch, 1), 0, 2, seed=self.seed_generator) > 0
        columns = ops.arange(width)
        columns = ops.where(flip, width - 1 - columns, columns) + offsets[:, 1:]  # (batch, w)
        rows = ops.arange(height)[None, :] + offsets[:, :1]  # (batch, h)
        padded_width = width + 2 * pad
        first = ops.arange(batch) * (height + 2 * pad) * padded_width  # Each image's start.
        index = first[:, None, None] + rows[:, :, None] * padded_width + columns[:, None, :]
        return ops.take(ops.reshape(padded, (-1, channels)), index, axis=0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "pad": self.pad, "seed": self.seed}


def build_model(config) -> keras.Model:
    """Builds the uncompiled model for a `TrialConfig`; pure: no I/O, no global state."""
    model_config = config.model
    inputs = keras.Input(shape=(32, 32, 3), dtype="uint8", name="image")
    # Augmenting uint8 (before scaling) gathers a quarter of the bytes; the result is the same.
    x = FlipShift(name="flip_shift")(inputs) if model_config.augment else inputs
    x = layers.Rescaling(1 / 255, name="rescale")(x)
    for block, filters in enumerate(BLOCK_FILTERS, start=1):
        filters = _scaled(filters, model_config.width)
        x = _conv(x, filters, "same", model_config, f"block{block}_conv1")
        x = _conv(x, filters, "valid", model_config, f"block{block}_conv2")
        x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
        # The notebook drops out after the second and third blocks only.
        if block > 1 and model_config.conv_dropout > 0:
            x = layers.Dropout(model_config.conv_dropout, name=f"block{block}_dropout")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(_scaled(DENSE_UNITS, model_config.width), name="dense")(x)
    x = layers.Activation(model_config.activation, name=f"dense_{model_config.activation}")(x)
    if model_config.dense_dropout > 0:
        x = layers.Dropout(model_config.dense_dropout, name="dense_dropout")(x)
    x = layers.Dense(config.data.num_classes, name="class_scores")(x)
    # Raw class scores, in float32 even under mixed precision, for a stable loss. The
    # loss applies its own head (study/losses.py): a softmax for cross-entropy, none for
    # the hinge and square losses. Probabilities are the scores' softmax.
    scores = layers.Activation("linear", dtype="float32", name=SCORES)(x)
    return keras.Model(inputs, scores, name="cifar_cnn")
