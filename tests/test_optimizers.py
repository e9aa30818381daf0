"""Optimizers and learning-rate schedules against their formulas."""

import math

import numpy as np
import pytest

from study.config import OptimizerConfig
from study.optimizers import OPTIMIZERS, build_optimizer


def _rate(optimizer, step):
    schedule = optimizer._learning_rate
    return float(schedule(step)) if callable(schedule) else float(schedule)


def test_inverse_time_is_the_old_keras_decay():
    config = OptimizerConfig(
        name="rmsprop", learning_rate=1e-4, schedule="inverse_time", decay=1e-6
    )
    optimizer = build_optimizer(config, steps_per_epoch=782, epochs=50)
    for step in (0, 1, 782, 39_100):
        assert _rate(optimizer, step) == pytest.approx(1e-4 / (1 + 1e-6 * step), rel=1e-5)


def test_cosine_with_and_without_warmup():
    config = OptimizerConfig(learning_rate=0.1, schedule="cosine")
    optimizer = build_optimizer(config, steps_per_epoch=10, epochs=10)
    for step in (0, 25, 50, 99):
        expected = 0.1 * 0.5 * (1 + math.cos(math.pi * step / 100))
        assert _rate(optimizer, step) == pytest.approx(expected, rel=1e-4, abs=1e-7)
    config = OptimizerConfig(learning_rate=0.1, schedule="cosine", warmup_epochs=2)
    optimizer = build_optimizer(config, steps_per_epoch=10, epochs=10)
    assert _rate(optimizer, 0) == pytest.approx(0.0, abs=1e-7)
    assert _rate(optimizer, 10) == pytest.approx(0.05, rel=1e-4)
    assert _rate(optimizer, 20) == pytest.approx(0.1, rel=1e-4)
    assert _rate(optimizer, 60) == pytest.approx(0.05, rel=1e-3)


def test_constant():
    optimizer = build_optimizer(OptimizerConfig(learning_rate=0.3, schedule="constant"), 5, 5)
    assert _rate(optimizer, 0) == _rate(optimizer, 1000) == pytest.approx(0.3)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_builds_with_its_settings(name):
    config = OptimizerConfig(name=name, learning_rate=0.02, weight_decay=1e-3, momentum=0.8)
    optimizer = build_optimizer(config, 10, 5)
    assert optimizer.__class__.__name__.lower() == name
    assert optimizer.weight_decay == pytest.approx(1e-3)
    if name == "sgd":
        assert optimizer.momentum == pytest.approx(0.8) and optimizer.nesterov


def test_weight_decay_is_decoupled_and_skips_biases():
    import keras

    layer = keras.layers.Dense(2, kernel_initializer="ones", bias_initializer="ones")
    layer.build((None, 3))
    config = OptimizerConfig(
        name="sgd", learning_rate=0.1, weight_decay=0.5, momentum=0.0, schedule="constant"
    )
    optimizer = build_optimizer(config, 1, 1)
    zeros = [np.zeros(v.shape, "float32") for v in layer.trainable_variables]
    optimizer.apply_gradients(zip(zeros, layer.trainable_variables, strict=True))
    kernel, bias = (v.numpy() for v in layer.trainable_variables)
    np.testing.assert_allclose(kernel, 1 - 0.1 * 0.5)  # var -= lr * wd * var
    np.testing.assert_allclose(bias, 1.0)
