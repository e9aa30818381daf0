"""The optimizer and learning-rate schedule registries, keyed by the names the study samples.

Weight decay is Keras 3's decoupled decay (`var -= learning_rate * weight_decay * var`, as
in AdamW), for every optimizer, and skips biases and batch-norm parameters. Keras is
imported inside the builders, so the config can check names without loading TensorFlow.
"""


def _constant(config, steps_per_epoch, epochs):
    return config.learning_rate


def _inverse_time(config, steps_per_epoch, epochs):
    from keras.optimizers import schedules

    # The old Keras `decay=` argument: lr / (1 + decay * iterations), updated every step.
    return schedules.InverseTimeDecay(config.learning_rate, decay_steps=1, decay_rate=config.decay)


def _cosine(config, steps_per_epoch, epochs):
    from keras.optimizers import schedules

    total_steps = steps_per_epoch * epochs
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    if warmup_steps == 0:
        return schedules.CosineDecay(config.learning_rate, decay_steps=total_steps)
    # Linear warm-up from zero to the learning rate, then cosine decay to zero.
    return schedules.CosineDecay(
        0.0,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=config.learning_rate,
        warmup_steps=warmup_steps,
    )


SCHEDULES = {"constant": _constant, "inverse_time": _inverse_time, "cosine": _cosine}


def _rmsprop(config, learning_rate):
    from keras import optimizers

    # rho=0.9 and epsilon=1e-7 are the defaults the 2020 notebook trained with.
    return optimizers.RMSprop(learning_rate, weight_decay=config.weight_decay or None)


def _adam(config, learning_rate):
    from keras import optimizers

    return optimizers.Adam(learning_rate, weight_decay=config.weight_decay or None)


def _adamw(config, learning_rate):
    from keras import optimizers

    return optimizers.AdamW(learning_rate, weight_decay=config.weight_decay)


def _sgd(config, learning_rate):
    from keras import optimizers

    return optimizers.SGD(
        learning_rate,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay or None,
    )


OPTIMIZERS = {"rmsprop": _rmsprop, "adam": _adam, "adamw": _adamw, "sgd": _sgd}

# Biases and batch-norm scales and offsets are not decayed (Loshchilov & Hutter; timm).
NO_DECAY_NAMES = ["bias", "gamma", "beta"]


def build_optimizer(config, steps_per_epoch: int, epochs: int):
    """The configured optimizer with its learning-rate schedule."""
    learning_rate = SCHEDULES[config.schedule](config, steps_per_epoch, epochs)
    optimizer = OPTIMIZERS[config.name](config, learning_rate)
    if config.weight_decay:
        optimizer.exclude_from_weight_decay(var_names=NO_DECAY_NAMES)
    return optimizer
