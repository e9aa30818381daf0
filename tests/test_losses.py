"""Every registered loss against a NumPy reference formula, with its head and targets."""

import numpy as np
import pytest

from study.config import LossConfig
from study.losses import LOSSES, build_loss, head_for, target_encoder

K = 5
RNG = np.random.default_rng(0)
LABELS = RNG.integers(0, K, size=8)
ONE_HOT = np.eye(K)[LABELS]
SCORES = RNG.normal(0, 2, size=(8, K))
PROBS = np.exp(SCORES) / np.exp(SCORES).sum(axis=1, keepdims=True)
EPS = 1e-7


def _cce(y, p, smoothing=0.0):
    y = y * (1 - smoothing) + smoothing / K
    return -(y * np.log(np.clip(p, EPS, 1 - EPS))).sum(axis=1).mean()


def _focal(y, p, gamma, smoothing=0.0):
    y = y * (1 - smoothing) + smoothing / K
    p = np.clip(p, EPS, 1 - EPS)
    return -(y * (1 - p) ** gamma * np.log(p)).sum(axis=1).mean()


def _signed(y):
    return 2 * y - 1


def _crammer_singer(y, s):
    true_score = (y * s).sum(axis=1)
    best_wrong = np.where(y > 0, -np.inf, s).max(axis=1)
    return np.maximum(0, 1 + best_wrong - true_score).mean()


REFERENCES = {
    "categorical_crossentropy": lambda y, out: _cce(y, out),
    "focal": lambda y, out: _focal(y, out, gamma=2.0),
    "mean_squared_error": lambda y, out: ((y - out) ** 2).mean(),
    "mean_squared_logarithmic_error": lambda y, out: ((np.log1p(out) - np.log1p(y)) ** 2).mean(),
    "hinge": lambda y, out: np.maximum(0, 1 - _signed(y) * out).mean(),
    "squared_hinge": lambda y, out: (np.maximum(0, 1 - _signed(y) * out) ** 2).mean(),
    "categorical_hinge": _crammer_singer,
}


def _keras_value(config, outputs):
    import tensorflow as tf

    targets = target_encoder(config, K)(tf.constant(LABELS))
    return float(build_loss(config)(targets, tf.constant(outputs, tf.float32)))


def test_every_loss_has_a_reference():
    assert set(REFERENCES) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_loss_matches_reference(name):
    config = LossConfig(name=name)
    outputs = PROBS if head_for(config) == "softmax" else SCORES
    expected = REFERENCES[name](ONE_HOT, outputs)
    assert _keras_value(config, outputs) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_notebook_mode_uses_softmax_for_every_loss(name):
    config = LossConfig(name=name, head="softmax")
    assert head_for(config) == "softmax"
    expected = REFERENCES[name](ONE_HOT, PROBS)
    assert _keras_value(config, PROBS) == pytest.approx(expected, rel=1e-4)


def test_heads_and_targets_as_documented():
    heads = {name: spec.head for name, spec in LOSSES.items()}
    assert heads["categorical_crossentropy"] == heads["focal"] == "softmax"
    assert heads["mean_squared_logarithmic_error"] == "softmax"
    assert heads["hinge"] == heads["squared_hinge"] == heads["categorical_hinge"] == "linear"
    assert heads["mean_squared_error"] == "linear"
    assert LOSSES["hinge"].targets == "signed" and LOSSES["categorical_hinge"].targets == "one_hot"


def test_label_smoothing_and_focal_gamma():
    config = LossConfig(name="categorical_crossentropy", label_smoothing=0.1)
    assert _keras_value(config, PROBS) == pytest.approx(_cce(ONE_HOT, PROBS, 0.1), rel=1e-4)
    config = LossConfig(name="focal", focal_gamma=0.5, label_smoothing=0.2)
    expected = _focal(ONE_HOT, PROBS, gamma=0.5, smoothing=0.2)
    assert _keras_value(config, PROBS) == pytest.approx(expected, rel=1e-4)
    # gamma = 0 makes the focal loss cross-entropy.
    config = LossConfig(name="focal", focal_gamma=0.0)
    assert _keras_value(config, PROBS) == pytest.approx(_cce(ONE_HOT, PROBS), rel=1e-4)


def test_categorical_hinge_when_all_wrong_scores_are_negative():
    # Where Keras' CategoricalHinge would use 0 instead of the best wrong score.
    import tensorflow as tf

    scores = np.array([[0.5, -2.0, -3.0]])
    loss = build_loss(LossConfig(name="categorical_hinge"))
    value = float(loss(tf.constant([[1.0, 0, 0]]), tf.constant(scores, tf.float32)))
    assert value == pytest.approx(max(0.0, 1 - 2.0 - 0.5))


def test_hinge_on_softmax_outputs_is_linear_in_the_true_class_probability():
    """Why the notebook's hinge (on softmax outputs) scored 8.97%: probabilities lie in
    (0, 1), so every one-vs-all margin is violated, always. The loss is then exactly
    (K + 1 - 2 p_true) / K: it only pushes up p_true, with a gradient through the softmax
    of p_true (1 - p_true) * 2/K, which vanishes for the images the model gets wrong
    (p_true near 0). On raw class scores (its own, linear head) the margins can be met."""
    config = LossConfig(name="hinge", head="softmax")
    p_true = PROBS[np.arange(len(LABELS)), LABELS]
    expected = ((K + 1 - 2 * p_true) / K).mean()
    assert _keras_value(config, PROBS) == pytest.approx(expected, rel=1e-5)
    # On linear scores, where margins can be met, the same loss is not that line.
    config = LossConfig(name="hinge")
    on_scores = _keras_value(config, SCORES)
    assert on_scores != pytest.approx(((K + 1 - 2 * SCORES[np.arange(8), LABELS]) / K).mean())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_targets_are_encoded_as_each_loss_declares(name):
    """-1/+1 for the one-vs-all hinges, one-hot for the rest. (Keras' Hinge would turn 0/1
    targets into -1/+1 by itself, so the loss values alone could not tell.)"""
    targets = np.asarray(target_encoder(LossConfig(name=name), K)(LABELS))
    expected = _signed(ONE_HOT) if LOSSES[name].targets == "signed" else ONE_HOT
    np.testing.assert_array_equal(targets, expected)
    assert LOSSES[name].targets == ("signed" if name in ("hinge", "squared_hinge") else "one_hot")
