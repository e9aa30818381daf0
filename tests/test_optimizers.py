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


# One step from var = 1 with gradient g = 0.5 and no weight decay, by each update rule:
# Adam (bias-corrected) moves by lr * g / |g|; RMSprop (rho 0.9, first step) by
# lr * g / sqrt(0.1 g^2); Nesterov SGD (momentum m) by lr * (1 + m) * g.
LR, G, M = 0.02, 0.5, 0.8
FIRST_STEP = {
    "adam": LR,
    "adamw": LR,
    "rmsprop": LR * G / math.sqrt(0.1 * G**2),
    "sgd": LR * (1 + M) * G,
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_each_optimizer_takes_its_first_step_by_its_formula(name):
    import keras

    config = OptimizerConfig(name=name, learning_rate=LR, momentum=M, schedule="constant")
    optimizer = build_optimizer(config, 10, 5)
    assert optimizer.__class__.__name__.lower() == name
    var = keras.Variable(np.ones(3, "float32"))
    optimizer.apply_gradients([(np.full(3, G, "float32"), var)])
    np.testing.assert_allclose(var.numpy(), 1 - FIRST_STEP[name], rtol=1e-4)


def test_weight_decay_is_decoupled_and_skips_biases_and_batch_norm():
    """Adam with a zero gradient: decoupled decay (var -= lr * wd * var) moves a kernel by
    exactly lr * wd; coupled L2 (grad += wd * var) would move it by about lr, since Adam
    normalises the gradient. Biases and batch norm's scale and offset are not decayed."""
    import keras

    inputs = keras.Input((3,))
    dense = keras.layers.Dense(2, kernel_initializer="ones", bias_initializer="ones")
    norm = keras.layers.BatchNormalization(gamma_initializer="ones", beta_initializer="ones")
    keras.Model(inputs, norm(dense(inputs)))
    config = OptimizerConfig(name="adam", learning_rate=0.1, weight_decay=0.5, schedule="constant")
    optimizer = build_optimizer(config, 1, 1)
    variables = [*dense.trainable_variables, *norm.trainable_variables]
    zeros = [np.zeros(v.shape, "float32") for v in variables]
    optimizer.apply_gradients(zip(zeros, variables, strict=True))
    kernel, bias, gamma, beta = (v.numpy() for v in variables)
    np.testing.assert_allclose(kernel, 1 - 0.1 * 0.5, rtol=1e-6)
    for untouched in (bias, gamma, beta):
        np.testing.assert_allclose(untouched, 1.0)
