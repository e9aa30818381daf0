"""The trial's input: uint8 batches gathered from the arrays in memory, targets per loss.

A `keras.utils.PyDataset`, so the same input feeds every Keras backend (no `tf.data`).
Each batch is one NumPy gather of image rows and one of target rows; the model scales
and augments the images on the device. The training order is a permutation drawn from
the trial's seed and the epoch alone: the same on every backend, after a resume, and
whatever ran in the process before.
"""

import math

import keras
import numpy as np


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the training images in `epoch` (0-based) of a trial seeded `seed`."""
    return np.random.default_rng([seed, epoch]).permutation(count)


class Batches(keras.utils.PyDataset):
    """Batches of (uint8 images, float32 targets); shuffled anew each epoch if `seed` is
    given (training), else in order (validation and test).

    Every batch has the same shape, so that each program compiles once (a partial batch is
    a new shape: another compilation, seconds on a GPU, in every trial):
    - training keeps whole batches and leaves out the rest of the epoch's order, fewer than
      a batch of images; the order is new each epoch, so no image is left out for good,
      and no image is seen twice in an epoch (as padding would have some);
    - evaluation pads its last batch with images from the start, weighted 0, and gives the
      real images the weight `padded / real` (their share of the padded pass): Keras's
      weighted accuracy then counts each image exactly once, and its loss (a batch's
      weighted sum over its size, averaged over batches by their sizes) is the mean over
      the real images.

    `targets` maps a label to its target row (a loss's one-hot or signed encoding).
    """

    def __init__(self, images, labels, batch_size: int, targets: np.ndarray, seed=None):
        super().__init__()
        if len(images) != len(labels) or not len(labels):
            raise ValueError(f"{len(images)} images and {len(labels)} labels: need as many, > 0")
        if seed is not None and len(labels) < batch_size:
            raise ValueError(
                f"training.batch_size: {batch_size} is more than the {len(labels)} training "
                "images; a trial trains on whole batches"
            )
        self.images, self.labels = images, np.asarray(labels)
        self.batch_size = batch_size
        self.targets = np.asarray(targets, dtype="float32")
        self.seed = seed
        self.epoch = 0
        self._order = (None, None)  # (epoch, its permutation), replaced as one.

    @property
    def training(self) -> bool:
        return self.seed is not None

    def __len__(self) -> int:
        if self.training:
            return len(self.labels) // self.batch_size
        return math.ceil(len(self.labels) / self.batch_size)

    @property
    def images_per_pass(self) -> int:
        """The images one pass trains on (whole batches) or evaluates (each once)."""
        return len(self) * self.batch_size if self.training else len(self.labels)

    @property
    def weight(self) -> float:
        """An evaluated image's weight: the padded pass's size over the real images'."""
        return len(self) * self.batch_size / len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self):
        # Keras calls this after each pass; `FollowEpochs` then pins the exact epoch.
        self.set_epoch(self.epoch + 1)

    def rows(self, index: int):
        """Which images batch `index` of the current epoch holds: a slice in order (a view,
        no copy), the last one padded from the start; or rows of the epoch's permutation.
        Safe from several threads (tf.data calls it so): the permutation is cached with
        the epoch it belongs to."""
        start = index * self.batch_size
        if not self.training:
            end = start + self.batch_size
            if end <= len(self.labels):
                return slice(start, end)
            return np.arange(start, end) % len(self.labels)
        epoch = self.epoch
        cached, order = self._order
        if cached != epoch:
            order = epoch_order(len(self.labels), self.seed, epoch)
            self._order = (epoch, order)
        return order[start : start + self.batch_size]

    def sample_weights(self, index: int) -> np.ndarray:
        """Evaluation batch `index`'s weights: `weight` for real images, 0 for padding."""
        real = min(self.batch_size, len(self.labels) - index * self.batch_size)
        weights = np.zeros(self.batch_size, dtype="float32")
        weights[:real] = self.weight
        return weights

    def __getitem__(self, index: int):
        rows = self.rows(index)
        batch = self.images[rows], self.targets[self.labels[rows]]
        return batch if self.training else (*batch, self.sample_weights(index))


class FollowEpochs(keras.callbacks.Callback):
    """Tells training batches which epoch begins, so that a fit that starts at a later
    epoch (a resume) sees that epoch's order."""

    def __init__(self, batches: Batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)
