"""The project's own Keras objects, registered for `keras.models.load_model` on import.

`import study.keras_objects` before loading a saved `model.keras` of any loss: Keras finds
the classes below by their registered names. It imports Keras, so the driver's config
checking (study/config.py, study/losses.py) never imports this module.
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
