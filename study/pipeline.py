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
    given, else in order (validation and test).

    `targets` maps a label to its target row (a loss's one-hot or signed encoding).
    """

    def __init__(self, images, labels, batch_size: int, targets: np.ndarray, seed=None):
        super().__init__()
        if len(images) != len(labels) or not len(labels):
            raise ValueError(f"{len(images)} images and {len(labels)} labels: need as many, > 0")
        self.images, self.labels = images, np.asarray(labels)
        self.batch_size = batch_size
        self.targets = np.asarray(targets, dtype="float32")
        self.seed = seed
        self.epoch = 0
        self._order = (None, None)  # (epoch, its permutation), replaced as one.

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self):
        # Keras calls this after each pass; `FollowEpochs` then pins the exact epoch.
        self.set_epoch(self.epoch + 1)

    def rows(self, index: int):
        """Which images batch `index` of the current epoch holds: a slice in order (a view,
        no copy), or rows of the epoch's permutation. Safe from several threads (tf.data
        calls it so): the permutation is cached with the epoch it belongs to."""
        start = index * self.batch_size
        if self.seed is None:
            return slice(start, start + self.batch_size)
        epoch = self.epoch
        cached, order = self._order
        if cached != epoch:
            order = epoch_order(len(self.labels), self.seed, epoch)
            self._order = (epoch, order)
        return order[start : start + self.batch_size]

    def __getitem__(self, index: int):
        rows = self.rows(index)
        return self.images[rows], self.targets[self.labels[rows]]


class FollowEpochs(keras.callbacks.Callback):
    """Tells training batches which epoch begins, so that a fit that starts at a later
    epoch (a resume) sees that epoch's order."""

    def __init__(self, batches: Batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.set_epoch(epoch)
