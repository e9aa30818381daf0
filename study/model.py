"""The CIFAR CNN of the 2020 notebook, with a width multiplier and optional modern parts.

At width 1 with the default options it is the notebook's network layer for layer:
conv 128-128, pool, conv 256-256, pool, dropout, conv 512-512, pool, dropout, dense 1024,
dropout, dense to the classes (6,777,060 parameters for 100 classes). The second conv of
each pair is unpadded ("valid"), as in the notebook. It takes uint8 images and scales
them to [0, 1] itself: the input pipeline moves a quarter of the bytes, and the scaling
runs on the device with the rest of the model.
"""

import keras
from keras import layers

from study.losses import head_for

BLOCK_FILTERS = (128, 256, 512)
DENSE_UNITS = 1024


def _scaled(units: int, width: float) -> int:
    return max(1, round(units * width))


def _conv(x, filters, padding, config, name):
    # With batch norm the conv's bias is redundant: the norm's offset replaces it.
    x = layers.Conv2D(filters, 3, padding=padding, use_bias=not config.batch_norm, name=name)(x)
    if config.batch_norm:
        x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.Activation(config.activation, name=f"{name}_{config.activation}")(x)


def _augment(x):
    # Training-only layers (identity at inference), on the same device as the model.
    x = layers.RandomFlip("horizontal", name="random_flip")(x)
    return layers.RandomTranslation(0.125, 0.125, fill_mode="reflect", name="random_shift")(x)


def build_model(config) -> keras.Model:
    """Builds the uncompiled model for a `TrialConfig`; pure: no I/O, no global state."""
    model_config = config.model
    inputs = keras.Input(shape=(32, 32, 3), dtype="uint8", name="image")
    x = layers.Rescaling(1 / 255, name="rescale")(inputs)
    x = _augment(x) if model_config.augment else x
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
    scores = layers.Dense(config.data.num_classes, name="scores")(x)
    # The head computes in float32 even under mixed precision, for a stable loss.
    head = head_for(config.loss)
    outputs = layers.Activation(head, dtype="float32", name=head)(scores)
    return keras.Model(inputs, outputs, name="cifar_cnn")
