"""Every registered loss against a NumPy reference formula, with its head and targets, on
each Keras backend (the other backend's values come from a process of its own)."""

import numpy as np
import pytest

from study.config import LossConfig
from study.losses import LOSSES, build_loss, head_for, target_table

from .conftest import BACKENDS, on_backends

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
    # Hui & Belkin's rescaled square loss at this module's defaults (k 1, M 15), summed.
    "rescaled_square": lambda y, out: ((out - 15.0 * y) ** 2).sum(axis=1).mean(),
}

# Each case: the loss config, and the labels and class scores the network outputs (the
# model outputs scores for every loss; a loss of the softmax head makes probabilities of
# them). The value that the reference formula gives follows: on the softmax of the
# scores (PROBS) for a softmax head, on the scores themselves for a linear one.
NEGATIVE_SCORES = np.array([[0.5, -2.0, -3.0]])  # Keras's CategoricalHinge would use 0 here.
CASES = {
    **{name: (LossConfig(name=name), LABELS, SCORES) for name in LOSSES},
    # The notebook's mode: a softmax head for every loss.
    **{
        f"{name} on softmax": (LossConfig(name=name, head="softmax"), LABELS, SCORES)
        for name in LOSSES
    },
    "categorical_crossentropy, smoothing 0.1": (
        LossConfig(name="categorical_crossentropy", label_smoothing=0.1),
        LABELS,
        SCORES,
    ),
    "focal, gamma 0.5, smoothing 0.2": (
        LossConfig(name="focal", focal_gamma=0.5, label_smoothing=0.2),
        LABELS,
        SCORES,
    ),
    "focal, gamma 0": (LossConfig(name="focal", focal_gamma=0.0), LABELS, SCORES),
    "rescaled_square, k 4, M 2": (
        LossConfig(name="rescaled_square", square_k=4.0, square_m=2.0),
        LABELS,
        SCORES,
    ),
    "categorical_hinge, all wrong scores negative": (
        LossConfig(name="categorical_hinge"),
        np.array([0]),
        NEGATIVE_SCORES,
    ),
}


def _head_outputs(name: str):
    return PROBS if head_for(LossConfig(name=name)) == "softmax" else SCORES


EXPECTED = {
    **{name: REFERENCES[name](ONE_HOT, _head_outputs(name)) for name in LOSSES},
    **{f"{name} on softmax": REFERENCES[name](ONE_HOT, PROBS) for name in LOSSES},
    "categorical_crossentropy, smoothing 0.1": _cce(ONE_HOT, PROBS, 0.1),
    "focal, gamma 0.5, smoothing 0.2": _focal(ONE_HOT, PROBS, gamma=0.5, smoothing=0.2),
    "focal, gamma 0": _cce(ONE_HOT, PROBS),  # gamma = 0 makes the focal loss cross-entropy.
    # By hand: k (f_true - M)^2 plus the other classes' f^2, per image, then the mean.
    "rescaled_square, k 4, M 2": np.mean(
        [
            4.0 * (SCORES[i, LABELS[i]] - 2.0) ** 2
            + sum(SCORES[i, j] ** 2 for j in range(K) if j != LABELS[i])
            for i in range(len(LABELS))
        ]
    ),
    "categorical_hinge, all wrong scores negative": max(0.0, 1 - 2.0 - 0.5),
}


def loss_values() -> dict[str, float]:
    """Every case's loss as Keras computes it on this process's backend."""
    import keras

    values = {}
    for case, (config, labels, outputs) in CASES.items():
        targets = target_table(config, outputs.shape[1])[labels]
        value = build_loss(config)(targets, outputs.astype("float32"))
        values[case] = float(keras.ops.convert_to_numpy(value))
    return values


@pytest.fixture(scope="module")
def backend_values():
    return on_backends(__name__, "loss_values")


def test_every_loss_has_a_reference():
    assert set(REFERENCES) == set(LOSSES)
    assert set(EXPECTED) == set(CASES)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_matches_reference(backend_values, backend, case):
    assert backend_values[backend][case] == pytest.approx(EXPECTED[case], rel=1e-4)


def test_heads_and_targets_as_documented():
    heads = {name: spec.head for name, spec in LOSSES.items()}
    assert heads["categorical_crossentropy"] == heads["focal"] == "softmax"
    assert heads["mean_squared_logarithmic_error"] == "softmax"
    assert heads["hinge"] == heads["squared_hinge"] == heads["categorical_hinge"] == "linear"
    assert heads["mean_squared_error"] == heads["rescaled_square"] == "linear"
    assert LOSSES["hinge"].targets == "signed" and LOSSES["categorical_hinge"].targets == "one_hot"
    for name in LOSSES:
        assert head_for(LossConfig(name=name, head="softmax")) == "softmax"


def _value(config: LossConfig, outputs) -> float:
    import keras

    targets = target_table(config, K)[LABELS]
    return float(keras.ops.convert_to_numpy(build_loss(config)(targets, outputs.astype("float32"))))


def test_hinge_on_softmax_outputs_is_linear_in_the_true_class_probability():
    """Why the notebook's hinge (on softmax outputs) scored 8.97%: probabilities lie in
    (0, 1), so every one-vs-all margin is violated, always. The loss is then exactly
    (K + 1 - 2 p_true) / K: it only pushes up p_true, with a gradient through the softmax
    of p_true (1 - p_true) * 2/K, which vanishes for the images the model gets wrong
    (p_true near 0). On raw class scores (its own, linear head) the margins can be met."""
    p_true = PROBS[np.arange(len(LABELS)), LABELS]
    expected = ((K + 1 - 2 * p_true) / K).mean()
    assert _value(LossConfig(name="hinge", head="softmax"), SCORES) == pytest.approx(
        expected, rel=1e-5
    )
    # On linear scores, where margins can be met, the same loss is not that line.
    on_scores = _value(LossConfig(name="hinge"), SCORES)
    assert on_scores != pytest.approx(((K + 1 - 2 * SCORES[np.arange(8), LABELS]) / K).mean())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_targets_are_encoded_as_each_loss_declares(name):
    """-1/+1 for the one-vs-all hinges, one-hot for the rest, as float32. (Keras' Hinge
    turns 0/1 targets into -1/+1 by itself, so the loss values alone could not tell.)"""
    targets = target_table(LossConfig(name=name), K)[LABELS]
    expected = _signed(ONE_HOT) if LOSSES[name].targets == "signed" else ONE_HOT
    np.testing.assert_array_equal(targets, expected)
    assert targets.dtype == np.float32
    assert LOSSES[name].targets == ("signed" if name in ("hinge", "squared_hinge") else "one_hot")


def saturated_step() -> dict[str, float]:
    """Per loss of the softmax head: how far one SGD step moves the true class's bias of a
    network that is certain of a wrong class (every image scored 100 on class 9, labels
    0). Through a softmax output and Keras's clipped probabilities this is 0 on JAX: such a
    network, once saturated, never learns again (what killed the default trial on a GPU)."""
    import keras
    import numpy as np

    from study.config import load_config
    from study.trainable import compile_model

    moved = {}
    for name in ("categorical_crossentropy", "focal"):
        config = load_config(
            None, ["data.dataset=cifar10", "model.width=0.0625", f"loss.name={name}",
                   "optimizer.name=sgd", "optimizer.learning_rate=0.1",
                   "optimizer.momentum=0", "optimizer.schedule=constant",
                   "model.dense_dropout=0"],
        )  # fmt: skip
        model = compile_model(config, steps_per_epoch=1, jit_compile=False)
        dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)][-1]
        kernel, bias = dense.get_weights()
        bias = np.zeros_like(bias)
        bias[9] = 100.0
        dense.set_weights([np.zeros_like(kernel), bias])
        images = np.zeros((8, 32, 32, 3), dtype="uint8")
        targets = target_table(config.loss, 10)[np.zeros(8, int)]
        model.train_on_batch(images, targets)
        moved[name] = float(dense.get_weights()[1][0])
    return moved


def test_a_network_certain_of_the_wrong_class_still_learns_on_every_backend():
    moved = on_backends(__name__, "saturated_step")
    for backend, values in moved.items():
        for name, bias in values.items():
            # Cross-entropy's gradient for the true class's bias is p_true - 1 = -1 per
            # image: SGD at 0.1 moves it by 0.1 (focal alike, as (1 - p_true)^gamma is 1).
            assert bias == pytest.approx(0.1, rel=0.05), (backend, name)
