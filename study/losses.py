"""The loss registry: each loss the study samples, with the head and targets it trains with.

Each entry declares
- `head`: "softmax" (the model outputs probabilities) or "linear" (raw class scores);
- `targets`: "one_hot" (0/1) or "signed" (+1 for the true class, -1 elsewhere, the
  one-vs-all targets of the hinge losses);
- `label_smoothing`: whether `loss.label_smoothing` is defined for it.

The model outputs raw class scores for every loss (study/model.py); the head is part of the
loss: a loss of the softmax head works on the scores' softmax (cross-entropy and focal on
their log-softmax, whose gradient never vanishes). `loss.head: softmax` gives every loss a
softmax head, as the 2020 notebook did (its hinge on softmax outputs scored 8.97%). Keras
is imported inside the builders, so the config can check names without loading TensorFlow.
"""

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class LossSpec:
    head: str
    targets: str
    label_smoothing: bool
    build: Callable  # (LossConfig) -> keras.losses.Loss on the head's outputs


def _categorical_crossentropy(config):
    from keras import losses

    # On the scores: Keras takes their log-softmax, never a clipped probability's log.
    return losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing)


def _focal(config):
    from study.keras_objects import FocalCrossentropy

    # alpha=1: a class-independent alpha only rescales the loss (and so the learning rate).
    return FocalCrossentropy(gamma=config.focal_gamma, label_smoothing=config.label_smoothing)


def _crammer_singer(config):
    from study.keras_objects import CrammerSingerHinge

    return CrammerSingerHinge(name="categorical_hinge")


def _rescaled_square(config):
    from study.keras_objects import RescaledSquare

    return RescaledSquare(k=config.square_k, m=config.square_m, name="rescaled_square")


def _keras_loss(class_name):
    def build(config):
        from keras import losses

        return getattr(losses, class_name)()

    return build


LOSSES: dict[str, LossSpec] = {
    # Both take the scores themselves, their softmax head inside the loss (from logits).
    "categorical_crossentropy": LossSpec("softmax", "one_hot", True, _categorical_crossentropy),
    "focal": LossSpec("softmax", "one_hot", True, _focal),
    # The square loss on linear scores against one-hot targets (Hui & Belkin, 2021), which
    # trains about as well as cross-entropy; with `loss.head: softmax` it is the Brier score.
    "mean_squared_error": LossSpec("linear", "one_hot", False, _keras_loss("MeanSquaredError")),
    # The same square loss as its authors train it for many classes: summed over the
    # classes, with weight k and target M on the true class (loss.square_k, square_m).
    "rescaled_square": LossSpec("linear", "one_hot", False, _rescaled_square),
    # log(1 + p) needs p > -1: it is defined on probabilities, so it keeps the softmax.
    "mean_squared_logarithmic_error": LossSpec(
        "softmax", "one_hot", False, _keras_loss("MeanSquaredLogarithmicError")
    ),
    # One-vs-all hinge losses: a margin on every class score, targets in {-1, +1}.
    "hinge": LossSpec("linear", "signed", False, _keras_loss("Hinge")),
    "squared_hinge": LossSpec("linear", "signed", False, _keras_loss("SquaredHinge")),
    # Multi-class (Crammer-Singer) hinge: true-class score against the best other score.
    "categorical_hinge": LossSpec("linear", "one_hot", False, _crammer_singer),
}
# The losses that take the scores and make their softmax themselves, from logits.
FROM_LOGITS = ("categorical_crossentropy", "focal")


def head_for(config) -> str:
    """The head a loss config trains with: its own, or softmax for all (notebook mode)."""
    return "softmax" if config.head == "softmax" else LOSSES[config.name].head


def build_loss(config):
    """The loss on the model's class scores: its own head applied inside it (a softmax
    for cross-entropy, focal and MSLE, and for every loss in the notebook's mode)."""
    loss = LOSSES[config.name].build(config)
    if head_for(config) == "softmax" and config.name not in FROM_LOGITS:
        from study.keras_objects import OnSoftmax

        return OnSoftmax(loss, name=config.name)
    return loss


def target_table(config, num_classes: int):
    """The loss's target for each label, as rows of a float32 array: row k is the target
    of class k (one-hot, or +1 for k and -1 elsewhere). The input pipeline gathers rows."""
    import numpy as np

    one_hot = np.eye(num_classes, dtype="float32")
    return 2.0 * one_hot - 1.0 if LOSSES[config.name].targets == "signed" else one_hot
