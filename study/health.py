"""Whether a trial is learning: the rule that names a dead network and stops it.

A network can die without a non-finite loss. Too large a step in its first epoch drives
its outputs into saturation: it then predicts one class for every image, its accuracy
sits at chance, and nothing moves it again (Adam at 1e-3 on the notebook's network at full
width, batch norm off). Its loss says little, for its scale depends on the loss and the
backend (14.49 for cross-entropy on JAX, where Keras clips the probabilities; 162,468 on
TensorFlow for Adam at 1e-2). So the rule reads accuracy alone, which every loss and
backend report alike:

    A trial is dead at the end of an epoch when it has taken at least `MIN_STEPS`
    optimizer steps and, in each of its last `patience` epochs, both its training
    accuracy and its validation accuracy lay inside the chance band.

The chance band of n images is 1/C plus three standard errors of a classifier that
guesses (C classes): 1/C + 3 * sqrt((1/C) * (1 - 1/C) / n). A network that learns
anything, batch norm's included (whose validation accuracy can lag its training accuracy
while the moving averages settle), leaves it in its training accuracy; a dead one never
does. `MIN_STEPS` keeps a slow starter alive: the rule waits for enough steps that a
network able to learn has shown it (tiny runs of a few steps an epoch are never judged).
"""

import math
from collections.abc import Sequence

from study.statuses import DEAD  # noqa: F401  The status it gives, named with it.

# The steps a trial has taken before it can be judged dead.
MIN_STEPS = 200
# Standard errors above chance that still count as guessing.
BAND_ERRORS = 3.0


def chance_band(num_classes: int, images: int) -> float:
    """The highest accuracy on `images` images that is still chance for `num_classes`."""
    chance = 1.0 / num_classes
    return chance + BAND_ERRORS * math.sqrt(chance * (1.0 - chance) / max(images, 1))


def dead_message(
    history: Sequence[dict],
    num_classes: int,
    train_images: int,
    validation_images: int,
    steps: int,
    patience: int,
) -> str | None:
    """Why the trial whose epochs are `history` (each with `accuracy` and `val_accuracy`)
    is dead after `steps` optimizer steps, in one line; None while it may be learning.
    `patience` 0 never judges."""
    if patience < 1 or steps < MIN_STEPS or len(history) < patience:
        return None
    train_band = chance_band(num_classes, train_images)
    validation_band = chance_band(num_classes, validation_images)
    recent = history[-patience:]
    if any(row["accuracy"] > train_band or row["val_accuracy"] > validation_band for row in recent):
        return None
    first, last = recent[0]["epoch"], recent[-1]["epoch"]
    epochs = f"epoch {last}" if first == last else f"epochs {first}-{last}"
    return (
        f"learned nothing: training accuracy {recent[-1]['accuracy']:.4f} and validation "
        f"accuracy {recent[-1]['val_accuracy']:.4f} at chance (1/{num_classes}; band "
        f"{train_band:.4f} and {validation_band:.4f}) in {epochs}, after {steps} steps"
    )
