"""Section 4, start-up: loading the official-format tarball at two sizes, and a Tune
trial's launch to its first training step."""

import time
from pathlib import Path

from study import data as data_lib
from study import synthetic
from study.bench.common import Sizes
from study.bench.tune_runs import run_tune
from study.config import TrialConfig


def write_data_sets(config: TrialConfig, sizes: Sizes, folder: Path) -> dict[str, Path]:
    """Official-format tarballs: full size, and 1/small_fraction of it."""
    dataset = config.data.dataset
    classes = data_lib.DATASETS[dataset].num_classes["fine"]
    train, test = sizes.tarball_images
    paths = {}
    for name, fraction in (("small", sizes.small_fraction), ("full", 1)):
        per_class = (max(1, train // classes // fraction), max(1, test // classes // fraction))
        path = folder / name / data_lib.DATASETS[dataset].filename
        paths[name] = synthetic.write_cifar(path, dataset, *per_class, seed=fraction)
    return paths


def measure_load(config: TrialConfig, path: Path) -> tuple[data_lib.CifarData, dict]:
    started = time.perf_counter()
    data = data_lib.load_cifar(config.data.dataset, path, config.data.label_mode)
    seconds = time.perf_counter() - started
    images = len(data.y_train) + len(data.y_test)
    return data, {
        "images": images,
        "megabytes": path.stat().st_size / 1e6,
        "seconds": seconds,
        "microseconds_per_image": 1e6 * seconds / images,
    }


class FirstStepTaken(Exception):
    """Ends a start-up trial once its first training step is done."""


def first_step_reporter():
    """A subclass of the trial's EpochReporter that notes the first step and stops there."""
    from study.trainable import EpochReporter

    class FirstStepReporter(EpochReporter):
        def on_train_batch_begin(self, batch, logs=None):
            self.first_step_begin = getattr(self, "first_step_begin", None) or time.time()

        def on_train_batch_end(self, batch, logs=None):
            super().on_train_batch_end(batch, logs)
            raise FirstStepTaken(self.first_step_begin, time.time())

    return FirstStepReporter


def startup_trial(params: dict, data) -> None:
    """A Tune trial that runs the real trainable up to its first training step (its
    reporter stops there), then reports when it got there."""
    entered = time.time()  # The data has come through the object store by now.
    from ray import tune

    from study import trainable  # Imports TensorFlow, as a study's trial does here.

    try:
        trainable.tune_trainable(params, data, reporter_class=first_step_reporter())
    except FirstStepTaken as taken:
        begin, end = taken.args
        tune.report({"entered": entered, "first_step_begin": begin, "first_step_end": end})


def measure_startup(config, data, storage: Path, name: str) -> dict:
    run = run_tune(startup_trial, config, data, storage, name)
    report = run["results"][0][0]
    return {
        "train_images": len(data.y_train),
        "put_seconds": run["put_seconds"],
        "launch_to_trial_seconds": report["entered"] - run["launched_wall"],
        "trial_to_first_step_seconds": report["first_step_begin"] - report["entered"],
        "first_step_seconds": report["first_step_end"] - report["first_step_begin"],
        "launch_to_first_step_seconds": report["first_step_begin"] - run["launched_wall"],
    }
