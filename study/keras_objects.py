"""The project's own Keras objects, registered for `keras.models.load_model` on import.

`import study.keras_objects` before loading a saved `model.keras` of any loss: Keras finds
the classes below by their registered names. It imports Keras, so the driver's config
checking (study/config.py, study/losses.py) never imports this module.

The model outputs raw class scores for every loss (study/model.py); a loss of the softmax
head makes its probabilities itself. Cross-entropy and focal loss work on the scores'
log-softmax, whose gradient never vanishes: through a softmax output and Keras's clipped
probabilities, a network certain of a wrong class gets no gradient at all on JAX (and for
the focal loss on TensorFlow too), and never learns again.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="study")
class CrammerSingerHinge(keras.losses.Loss):
    """The textbook multi-class hinge: max(0, 1 + best wrong score - true score).

    Keras' CategoricalHinge takes max((1 - y) * s), which is 0 rather than the best wrong
    score whenever every wrong score is negative.
    """

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        true_score = ops.sum(y_true * y_pred, axis=-1)
        best_wrong = ops.max(ops.where(y_true > 0, float("-inf"), y_pred), axis=-1)
        return ops.relu(1.0 + best_wrong - true_score)


def _smoothed(y_true, label_smoothing: float, dtype):
    """Targets with label smoothing, as Keras's cross-entropy applies it."""
    y_true = ops.cast(y_true, dtype)
    classes = ops.cast(ops.shape(y_true)[-1], dtype)
    return y_true * (1.0 - label_smoothing) + label_smoothing / classes


@keras.saving.register_keras_serializable(package="study")
class FocalCrossentropy(keras.losses.Loss):
    """Lin et al.'s focal loss on class scores: -sum(y * (1 - p)^gamma * log p), with
    log p the scores' log-softmax (no clipping: its gradient never vanishes) and p its
    exponential; alpha 1, label smoothing as in Keras."""

    def __init__(self, gamma: float = 2.0, label_smoothing: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.gamma, self.label_smoothing = gamma, label_smoothing

    def call(self, y_true, y_pred):
        log_p = ops.log_softmax(y_pred, axis=-1)
        weight = ops.power(1.0 - ops.exp(log_p), self.gamma)
        y_true = _smoothed(y_true, self.label_smoothing, y_pred.dtype)
        return -ops.sum(y_true * weight * log_p, axis=-1)

    def get_config(self):
        return {
            **super().get_config(),
            "gamma": self.gamma,
            "label_smoothing": self.label_smoothing,
        }


@keras.saving.register_keras_serializable(package="study")
class OnSoftmax(keras.losses.Loss):
    """A loss applied to the softmax of the class scores (its head): the mean squared
    logarithmic error, which needs probabilities, and every loss in the notebook's mode
    (`loss.head: softmax`)."""

    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.losses.get(inner) if isinstance(inner, dict) else inner

    def call(self, y_true, y_pred):
        return self.inner.call(y_true, ops.softmax(y_pred, axis=-1))

    def get_config(self):
        return {**super().get_config(), "inner": keras.losses.serialize(self.inner)}


@keras.saving.register_keras_serializable(package="study")
class RescaledSquare(keras.losses.Loss):
    """Hui & Belkin's square loss for many classes (ICLR 2021), on raw class scores f with
    one-hot targets y: per image, k * (f_true - M)^2 plus the sum over the other classes
    of f^2, summed over the classes (Keras's MeanSquaredError averages over them, which
    divides the gradient by the number of classes). k = M = 1 is the plain summed square
    loss."""

    def __init__(self, k: float = 1.0, m: float = 15.0, **kwargs):
        super().__init__(**kwargs)
        self.k, self.m = k, m

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        weight = 1.0 + (self.k - 1.0) * y_true  # k on the true class, 1 elsewhere.
        return ops.sum(weight * ops.square(y_pred - self.m * y_true), axis=-1)

    def get_config(self):
        return {**super().get_config(), "k": self.k, "m": self.m}
