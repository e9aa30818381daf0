"""The rule that names a dead trial (study/health.py), on hand-made epoch histories."""

import math

import pytest

from study.health import MIN_STEPS, chance_band, dead_message


def _epochs(*accuracies):
    """Epoch rows from (training accuracy, validation accuracy) pairs."""
    return [
        {"epoch": number, "accuracy": train, "val_accuracy": validation}
        for number, (train, validation) in enumerate(accuracies, start=1)
    ]


def test_the_chance_band_is_chance_plus_three_standard_errors():
    # 10 classes, 500 images: 0.1 + 3 * sqrt(0.1 * 0.9 / 500) = 0.1 + 3 * 0.013416...
    assert chance_band(10, 500) == pytest.approx(0.1 + 3 * 0.0134164, abs=1e-6)
    # 100 classes, 5,000 images: 0.01 + 3 * sqrt(0.01 * 0.99 / 5000).
    assert chance_band(100, 5000) == pytest.approx(0.01 + 3 * math.sqrt(0.0099 / 5000))


def test_a_network_at_chance_for_two_epochs_is_dead():
    # What a blown-up network reports on CIFAR-10 (one class for every image).
    history = _epochs((0.101, 0.100), (0.099, 0.100))
    message = dead_message(history, 10, 3500, 500, steps=2 * 109, patience=2)
    assert message is not None and "learned nothing" in message
    assert "epochs 1-2" in message and "after 218 steps" in message
    # One epoch of patience judges the last epoch alone.
    assert "epoch 2," in dead_message(history, 10, 3500, 500, steps=218, patience=1)


def test_a_network_that_learned_and_then_blew_up_is_dead_once_it_sits_at_chance():
    history = _epochs((0.30, 0.32), (0.10, 0.10), (0.10, 0.10))
    assert dead_message(history[:2], 10, 3500, 500, steps=300, patience=2) is None
    assert dead_message(history, 10, 3500, 500, steps=450, patience=2) is not None


def test_a_slow_starter_that_leaves_chance_in_training_is_alive():
    # Epoch 1 at chance, epoch 2 above the training band (0.115 for 3,500 images) while
    # validation still sits at chance: it is learning.
    history = _epochs((0.10, 0.10), (0.13, 0.11))
    assert dead_message(history, 10, 3500, 500, steps=218, patience=2) is None


def test_batch_norm_whose_validation_lags_its_training_is_alive():
    # Batch norm's moving averages take hundreds of steps: validation at chance while
    # training accuracy has left it.
    history = _epochs((0.25, 0.10), (0.40, 0.09))
    assert dead_message(history, 10, 3500, 500, steps=218, patience=2) is None


def test_no_verdict_before_enough_steps_or_epochs_or_with_patience_zero():
    history = _epochs((0.10, 0.10), (0.10, 0.10))
    assert dead_message(history, 10, 150, 50, steps=MIN_STEPS - 1, patience=2) is None
    assert dead_message(history[:1], 10, 3500, 500, steps=MIN_STEPS, patience=2) is None
    assert dead_message(history, 10, 3500, 500, steps=10 * MIN_STEPS, patience=0) is None
