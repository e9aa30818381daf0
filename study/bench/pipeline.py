"""Section 2, the input pipeline: the trial's batches alone, through Keras's loop, and
augmentation in the model against in the input."""

import statistics
import time

import numpy as np

from study import backend
from study import data as data_lib
from study.bench.common import Sizes, epoch_clock, ratio
from study.config import TrialConfig


def numpy_flip_shift(images: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """The model's FlipShift done in the input instead, with NumPy on the host: the other
    place augmentation could run, timed to compare."""
    count, height, width, _ = images.shape
    padded = np.pad(images, [(0, 0), (pad, pad), (pad, pad), (0, 0)], mode="reflect")
    offsets = rng.integers(0, 2 * pad + 1, (count, 2))
    flip = rng.integers(0, 2, (count, 1)).astype(bool)
    columns = np.where(flip, width - 1 - np.arange(width), np.arange(width)) + offsets[:, 1:]
    rows = np.arange(height) + offsets[:, :1]
    return padded[np.arange(count)[:, None, None], rows[:, :, None], columns[:, None, :]]


def _pass(train, epoch: int, augment=None) -> tuple[float, float]:
    """Images/s of one pass over the training batches, and the wait for the first batch."""
    train.set_epoch(epoch)
    started, count, first = time.perf_counter(), 0, 0.0
    for index in range(len(train)):
        images, _ = train[index]
        if augment is not None:
            images = augment(images)
        first = first or time.perf_counter() - started
        count += len(images)
    return count / (time.perf_counter() - started), first


def measure_pipeline(config: TrialConfig, splits: data_lib.Splits, sizes: Sizes) -> dict:
    """Images/s of the trial's training input alone (an epoch's order, gathers, targets),
    plain and with NumPy augmentation, and how long an epoch waits for its first batch."""
    from study.trainable import trial_batches

    train, _, _ = trial_batches(config, splits)
    rng = np.random.default_rng(0)
    plain, augmented, first = [], [], []
    for epoch in range(sizes.runs + 1):  # The first pass warms caches up; it is not counted.
        rate, wait = _pass(train, epoch)
        plain.append(rate)
        first.append(wait)
        augmented.append(_pass(train, epoch, lambda x: numpy_flip_shift(x, rng))[0])
    return {
        "images": len(splits.y_train),
        "images_per_second": statistics.median(plain[1:]),
        "first_batch_seconds": statistics.median(first[1:]),
        "numpy_augment_images_per_second": statistics.median(augmented[1:]),
    }


def measure_keras_loop(config: TrialConfig, splits, devices: backend.Devices) -> float:
    """Images/s of the trial's training input as fit reads it on this backend (tf.data on
    TensorFlow), through Keras's own training loop into a trivial model (pooling and one
    dense layer): the input and the loop, not the network."""
    import keras

    from study.trainable import trial_batches

    keras.backend.clear_session()
    train, _, _ = trial_batches(config, splits)
    chosen = config.training.resolve(devices.gpus > 0, devices.backend)
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    model = keras.Model(inputs, keras.layers.Dense(config.data.num_classes)(pooled))
    model.compile(
        optimizer="sgd",
        loss="mean_squared_error",
        jit_compile=chosen["jit_compile"],
        steps_per_execution=chosen["steps_per_execution"],
    )
    clock = epoch_clock()
    train_input, callbacks = backend.fit_input(train)
    model.fit(train_input, epochs=2, callbacks=[*callbacks, clock], shuffle=False, verbose=0)
    return len(splits.y_train) / clock.durations[-1]  # Epoch 1 traces; epoch 2 is timed.


def _augmentation_choice(rows: list[dict], numpy_rate: float, gpu: bool) -> dict | None:
    """Augmentation in the model (FlipShift on the device) against in the input (NumPy on
    the host, then the model without it). Off a GPU the host does both in turn; with a
    GPU the input would overlap the device's work, so the slower of the two decides."""
    keys = ("mixed_precision", "jit_compile", "batch_size", "steps_per_execution")
    rate = {}
    for row in rows:  # The trial's settings with augmentation on and off.
        if all(row[key] == rows[0][key] for key in keys) and "images_per_second" in row:
            rate.setdefault(row["augment"], row["images_per_second"])
    if True not in rate or False not in rate:
        return None
    serial = 1 / (1 / rate[False] + 1 / numpy_rate)
    in_input = min(rate[False], numpy_rate) if gpu else serial
    return {
        "in_model_images_per_second": rate[True],
        "model_without_images_per_second": rate[False],
        "in_input_images_per_second": in_input,
        "in_input_overlapped": gpu,
        "faster": "model" if rate[True] >= in_input else "input",
    }


def section_pipeline(config, splits, sizes, model_section: dict | None, devices) -> dict:
    rows = (model_section or {}).get("rows", [])
    model_rate = rows[0].get("images_per_second") if rows else None
    result = measure_pipeline(config, splits, sizes)
    result["keras_loop_images_per_second"] = measure_keras_loop(config, splits, devices)
    result["model_images_per_second"] = model_rate
    slower = min(result["images_per_second"], result["keras_loop_images_per_second"])
    result["ratio_to_model"] = ratio(slower, model_rate)
    result["bottleneck"] = bool(result["ratio_to_model"] and result["ratio_to_model"] < 1)
    numpy_rate = result["numpy_augment_images_per_second"]
    result["augmentation"] = _augmentation_choice(rows, numpy_rate, devices.gpus > 0)
    return result
