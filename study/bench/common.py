"""The benchmark's sizes and targets, its timing helpers, the machine and the configs."""

import functools
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from study import backend
from study.config import TrialConfig, from_params

# The project's speed goals: the share of a bare model.fit's rate that the local mode
# and a Tune trial keep, and GPU images/s on one H200 (one trial; trials packed on it).
TARGETS = {"local/bare": 0.97, "tune/bare": 0.92, "gpu_one_trial": 30_000, "gpu_packed": 50_000}
# On CPU the notebook's full-width network trains at a few dozen images/s: too slow to
# benchmark in minutes. The width multiplier keeps its shape and scales every layer.
CPU_WIDTH = 0.125
GPU_TARGET_BATCH = 512


@dataclass(frozen=True)
class Sizes:
    """How much work each section does; the presets below suit a CPU, a GPU, and tests."""

    run_seconds: float  # aimed-for length of one timed model run
    runs: int  # timed runs per measurement; the median is reported
    model_factors: tuple[str, ...]  # what the model section varies, one factor at a time
    overhead_images: int | None  # training images per epoch (None: the whole split)
    overhead_epochs: int  # epoch 1 and the last are not counted
    overhead_rounds: int  # rounds of bare, local and Tune in turn
    tarball_images: tuple[int, int]  # the full-size data set: training, test images
    small_fraction: int  # the small data set of the start-up section is 1/this of it
    packing: tuple[int, ...]  # trials per GPU


FACTORS = ("precision", "batch", "steps", "augment")
SIZES = {
    # Overhead: 3 rounds of 5 epochs of 5,000 images, 9 steady cycles a way. Single cycles
    # swing by a third on this 2-core machine; taking turns spreads that over the ways.
    "cpu": Sizes(2.0, 3, FACTORS, 5_000, 5, 3, (50_000, 10_000), 10, ()),
    "gpu": Sizes(2.0, 3, FACTORS, None, 5, 3, (50_000, 10_000), 10, (1, 2, 4)),
    # Checks that everything runs and is well formed; its figures mean nothing.
    "quick": Sizes(0.2, 2, ("steps", "augment"), 200, 3, 2, (1_000, 200), 2, (1, 2)),
}


# --- Timing helpers --------------------------------------------------------------------


@functools.cache
def _epoch_clock_class():
    import keras

    class EpochClock(keras.callbacks.Callback):
        """Records when each epoch begins and ends (training and validation both)."""

        def __init__(self):
            super().__init__()
            self.begins: list[float] = []
            self.ends: list[float] = []
            self.cpu_ends: list[float] = []  # This process's CPU seconds, all threads.

        def on_epoch_begin(self, epoch, logs=None):
            self.begins.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

        @property
        def durations(self) -> list[float]:
            return [end - begin for begin, end in zip(self.begins, self.ends, strict=True)]

    return EpochClock


def epoch_clock():
    """A Keras callback that notes when each epoch begins and ends."""
    return _epoch_clock_class()()


def steady_rates(report_times: list[float], images_per_epoch: int) -> list[float]:
    """Images/s of each whole epoch cycle between consecutive reports, leaving out the
    first epoch (it traces the training function) and the last (it may add the test)."""
    kept = report_times[:-1]
    return [images_per_epoch / (b - a) for a, b in zip(kept, kept[1:], strict=False) if b > a]


def median_or_none(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def ratio(numerator, denominator) -> float | None:
    return numerator / denominator if numerator and denominator else None


# --- The machine and the configs -------------------------------------------------------


def cpu_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX); else it emulates."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def describe_machine(devices: backend.Devices) -> dict:
    return {
        "cpus": os.cpu_count(),
        "gpus": devices.gpus,
        "gpu_names": list(devices.gpu_names),
        "compute_capability": devices.capability,
        "mixed_policy": backend.mixed_policy(devices.capability),
        "cpu_bf16": cpu_bf16(),
        **backend.threads(),
        **backend.versions(),
    }


def with_values(config: TrialConfig, **dotted) -> TrialConfig:
    """The config with dotted keys replaced (`model__width=0.5` sets model.width)."""
    values = {key.replace("__", "."): value for key, value in dotted.items()}
    return load_config_from(config, values)


def load_config_from(config: TrialConfig, values: dict) -> TrialConfig:
    """The config with dotted `values` laid over it, as a trial gets its values."""
    return from_params(values, config.to_dict())
