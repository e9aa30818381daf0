"""python -m study.bench: where a trial's time goes on this machine, as a table and JSON.

Everything runs on synthetic CIFAR data of the real shape and format (study/synthetic.py),
so the benchmark needs no download. It runs on the Keras backend of the process
(KERAS_BACKEND), as the trial does. Five sections:

1. model     training images/s of the configured network by precision, compilation (XLA
             or jit), batch size, steps per execution and augmentation: after a warm-up,
             the median of runs.
2. pipeline  images/s of the trial's input alone and inside Keras's training loop, its
             ratio to the model's rate, and augmentation in the model against in the input.
3. overhead  the same training three ways: a bare `model.fit`, the local mode, one Ray Tune
             trial, in rounds that rotate their order. Steady-state images/s over whole
             epoch cycles (training, validation, checkpoint, report), the first epoch
             (tracing) and the last left out; and the share of each cycle that the
             trial's own checkpoint and report took, as an accounted ratio.
4. startup   loading the official-format tarball at two data sizes, and a Tune trial's
             launch to its first training step with data of each size.
5. packing   GPU only: aggregate images/s with 1, 2 and 4 trials per GPU.
"""

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

# Tune's newer console output prints tables even at verbose=0; the classic one is quiet.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

from study import backend, synthetic
from study import data as data_lib
from study.config import (
    GPU_STEPS_PER_EXECUTION,
    ConfigError,
    TrialConfig,
    load_config_dict,
)
from study.search_config import load_study

# Keras (and its backend) is imported where it is used, not with this module: a Tune worker
# that unpickles a trial function from here then imports it inside the trial, as in a study.

# The targets: ratios to a bare model.fit, and GPU images/s on one H200.
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
    return load_config_dict(config.to_dict(), values=values)


# --- 1. Model throughput ---------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    mixed_precision: bool
    jit_compile: bool
    batch_size: int
    steps_per_execution: int = 1
    augment: bool = False


def model_variants(
    config: TrialConfig, gpu: bool, factors=FACTORS, backend_name="tensorflow"
) -> list[Variant]:
    """The trial's own settings first, then one factor at a time: precision x compilation,
    batch size, steps per execution, augmentation."""
    chosen = config.training.resolve(gpu, backend_name)
    batch = config.training.batch_size
    base = Variant(
        chosen["mixed_precision"],
        chosen["jit_compile"],
        batch,
        chosen["steps_per_execution"],
        config.model.augment,
    )
    variants = [base]
    if "precision" in factors:
        flags = ((m, j) for m in (False, True) for j in (False, True))
        variants += [replace(base, mixed_precision=m, jit_compile=j) for m, j in flags]
    if "batch" in factors:
        variants += [replace(base, batch_size=b) for b in (batch // 2, batch * 2, batch * 4) if b]
    if "steps" in factors:
        other = 1 if base.steps_per_execution > 1 else GPU_STEPS_PER_EXECUTION
        variants.append(replace(base, steps_per_execution=other))
    if "augment" in factors:
        variants.append(replace(base, augment=not base.augment))
    return [v for i, v in enumerate(variants) if v not in variants[:i]]


@functools.cache
def _repeated_batch_class():
    import keras

    class RepeatedBatch(keras.utils.PyDataset):
        """One fixed batch, over and over: the model's rate without the input's cost."""

        def __init__(self, batch):
            super().__init__()
            self.batch = batch

        @property
        def num_batches(self):
            return None  # Endless; fit takes steps_per_epoch of it.

        def __getitem__(self, index):
            return self.batch

    return RepeatedBatch


def _one_batch(config: TrialConfig, data: data_lib.CifarData, batch_size: int):
    from study.losses import target_table

    targets = target_table(config.loss, config.data.num_classes)
    index = np.arange(batch_size) % len(data.y_train)
    images = data.x_train[index]  # uint8, as the trial's pipeline hands them to the model
    return images, targets[data.y_train[index]]


@dataclass
class Prepared:
    """A variant's compiled, warmed-up model, and the steps that make one timed run."""

    variant: Variant
    model: object  # keras.Model
    dataset: object
    steps: int


def prepare_model(
    config: TrialConfig, data, variant: Variant, sizes: Sizes, policy: str, steps_per_epoch=100
):
    """Builds and compiles one variant on a fixed batch (the model alone, no input cost),
    warms it up, and picks the steps for about `run_seconds` a run. `steps_per_epoch` sets
    the learning-rate schedule's length, as in a trial of that many steps an epoch."""
    import keras

    from study import trainable

    keras.utils.set_random_seed(config.seed)
    # Layers take the precision policy in force when they are built.
    keras.mixed_precision.set_global_policy(policy if variant.mixed_precision else "float32")
    trial = with_values(config, model__augment=variant.augment)
    try:
        spe = variant.steps_per_execution
        model = trainable.compile_model(trial, steps_per_epoch, variant.jit_compile, spe)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    dataset = _repeated_batch_class()(_one_batch(trial, data, variant.batch_size))
    # The first epoch traces (and with XLA compiles); the second estimates the rate.
    clock = epoch_clock()
    model.fit(
        dataset, epochs=2, steps_per_epoch=2 * spe, callbacks=[clock], shuffle=False, verbose=0
    )
    estimate = 2 * spe * variant.batch_size / clock.durations[-1]
    steps = max(1, round(sizes.run_seconds * estimate / variant.batch_size / spe)) * spe
    return Prepared(variant, model, dataset, steps)


def time_run(prepared: Prepared) -> float:
    """Training images/s of one timed run."""
    clock = epoch_clock()
    prepared.model.fit(
        prepared.dataset,
        epochs=1,
        steps_per_epoch=prepared.steps,
        callbacks=[clock],
        shuffle=False,
        verbose=0,
    )
    return prepared.steps * prepared.variant.batch_size / clock.durations[0]


def section_model(config, data, sizes, devices: backend.Devices) -> dict:
    import keras

    keras.backend.clear_session()
    gpu, policy = devices.gpus > 0, backend.mixed_policy(devices.capability)
    variants = model_variants(config, gpu, sizes.model_factors, devices.backend)
    prepared, failed = [], {}
    for variant in variants:
        try:
            prepared.append(prepare_model(config, data, variant, sizes, policy))
        except Exception as error:  # One variant that cannot run (no XLA kernel) is a row.
            failed[variant] = f"{type(error).__name__}: {error}"[:200]
    # The timed runs take turns: a burst of load from other processes then slows every
    # variant a little rather than one of them a lot.
    runs = {item.variant: [] for item in prepared}
    for _ in range(sizes.runs):
        for item in prepared:
            runs[item.variant].append(time_run(item))
    rows = []
    for variant in variants:
        row = asdict(variant)
        if variant in failed:
            row["error"] = failed[variant]
        else:
            row |= {"images_per_second": statistics.median(runs[variant]), "runs": runs[variant]}
        rows.append(row)
    baseline = rows[0].get("images_per_second")
    for row in rows:
        row["vs_trial_default"] = ratio(row.get("images_per_second"), baseline)
    result = {"policy_mixed": policy, "rows": rows}
    if not gpu and not cpu_bf16():
        result["note"] = "this CPU has no native bfloat16 (avx512_bf16/amx): it is emulated"
    return result


# --- 2. Input pipeline -----------------------------------------------------------------


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


# --- 3. Machinery overhead -------------------------------------------------------------


def overhead_config(config: TrialConfig, images: int | None, epochs: int) -> TrialConfig:
    """The config's own checkpoint cadence: `--set training.checkpoint_every=1` shows the
    cost of a checkpoint every epoch against the default, by time."""
    values = {"training.epochs": epochs}
    if images is not None:  # A stratified subset: `images` to train on, a tenth to validate.
        values |= {
            "data.train_subset": images + max(1, images // 10),
            "data.validation_size": max(1, images // 10),
            "data.test_subset": max(1, images // 10),
        }
    return load_config_from(config, values)


def run_bare(config: TrialConfig, data) -> dict[str, list[float]]:
    """Plain model.fit on the trial's data, model and validation: no reports, no checkpoints."""
    from study.trainable import prepare_trial

    setup = prepare_trial(config, data)
    model = setup.compile()
    clock = epoch_clock()
    train_input, callbacks = backend.fit_input(setup.train)
    model.fit(
        train_input,
        validation_data=backend.fit_input(setup.validation)[0],
        epochs=config.training.epochs,
        callbacks=[*callbacks, clock],
        shuffle=False,
        verbose=0,
    )
    return {"wall": clock.ends, "cpu": clock.cpu_ends}


MACHINERY_KEY = "bench_epoch_end_seconds"


def timed_reporter(created: list | None = None):
    """A subclass of the trial's EpochReporter that times its own epoch-end work (the
    checkpoint and the report) and sends the times so far with each report; each one
    made is appended to `created`."""
    from study.trainable import EpochReporter

    class TimedReporter(EpochReporter):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.epoch_end_seconds: list[float] = []
            if created is not None:
                created.append(self)
            inner, seconds = self.sink, self.epoch_end_seconds

            class TimingSink:
                def report(self, metrics, checkpoint):
                    inner.report({**metrics, MACHINERY_KEY: list(seconds)}, checkpoint)

            self.sink = TimingSink()

        def on_epoch_end(self, epoch, logs=None):
            started = time.perf_counter()
            super().on_epoch_end(epoch, logs)
            self.epoch_end_seconds.append(time.perf_counter() - started)
            if self.final is not None:  # The last report goes out after fit, with all times.
                self.final[0][MACHINERY_KEY] = list(self.epoch_end_seconds)

    return TimedReporter


def run_local_mode(config: TrialConfig, data, workdir: Path) -> dict[str, list[float]]:
    """The local single-trial mode, timed at each epoch's progress line (after its report)."""
    from study.local import run_local

    times = {"wall": [], "cpu": []}

    def clock(line):
        times["wall"].append(time.perf_counter())
        times["cpu"].append(time.process_time())

    reporters = []
    run_local(config, data, workdir / "local", echo=clock, reporter_class=timed_reporter(reporters))
    times["machinery"] = reporters[-1].epoch_end_seconds
    return times


def summarise_overhead(
    rounds: list[dict[str, dict[str, list[float]]]], images: int, daemon_share: float = 0.0
) -> dict:
    """Steady-state images/s of each way over all rounds, by the wall clock and per
    CPU-second of the training process, and each way's ratio to the bare fit. The wall
    clock is what the targets judge; the CPU figure counts the work a way adds. Per-round
    ratios show the spread.

    Where a way timed its own epoch-end work ("machinery": checkpoint and report, one
    entry per epoch), its share of the steady cycles' time gives an accounted ratio,
    1 - share, which a slow spell of the machine barely moves; for Tune it also takes off
    `daemon_share`, the part of the machine that Ray's own processes use."""
    ways = [way for way in ("bare", "local", "tune") if way in rounds[0]]
    wall = {way: [steady_rates(r[way]["wall"], images) for r in rounds] for way in ways}
    cpu = {way: [steady_rates(r[way].get("cpu", []), images) for r in rounds] for way in ways}
    result = {"images_per_epoch": images, "rounds": len(rounds)}
    for way in ways:
        cycles = [rate for per_round in wall[way] for rate in per_round]
        result[way] = {
            "images_per_second": median_or_none(cycles),
            "cycles": cycles,
            "images_per_cpu_second": median_or_none(
                rate for per_round in cpu[way] for rate in per_round
            ),
        }
    bare = result["bare"]
    for way, key in (("local", "local/bare"), ("tune", "tune/bare")):
        if way not in result:
            continue
        value = ratio(result[way]["images_per_second"], bare["images_per_second"])
        result[key] = value
        result[f"{key} target"] = TARGETS[key]
        result[f"{key} met"] = bool(value and value >= TARGETS[key])
        result[f"{key} cpu"] = ratio(
            result[way]["images_per_cpu_second"], bare["images_per_cpu_second"]
        )
        result[f"{key} rounds"] = [
            ratio(median_or_none(mine), median_or_none(theirs))
            for mine, theirs in zip(wall[way], wall["bare"], strict=True)
        ]
        if all("machinery" in r[way] for r in rounds):
            share = _machinery_share([r[way] for r in rounds], images)
            result[way]["machinery_share"] = share
            result[f"{key} accounted"] = 1 - share - (daemon_share if way == "tune" else 0.0)
    return result


def _machinery_share(runs: list[dict[str, list[float]]], images: int) -> float:
    """The epoch-end work's share of the steady cycles' time, over all runs. Cycle k runs
    from epoch k's report to epoch k+1's, so it holds epoch k+1's epoch-end work."""
    work = cycles = 0.0
    for run in runs:
        rates = steady_rates(run["wall"], images)
        work += sum(run["machinery"][1 : 1 + len(rates)])
        cycles += sum(images / rate for rate in rates)
    return work / cycles if cycles else math.nan


def _children_cpu() -> dict[int, float]:
    """CPU seconds of each of this process's children: Ray's daemons, workers, agents."""
    import psutil  # Ray's own dependency.

    seconds = {}
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:
            continue
        seconds[child.pid] = times.user + times.system
    return seconds


def _cpu_since(before: dict[int, float]) -> float:
    """Children's CPU seconds since `before` (a process started since counts from 0)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in _children_cpu().items())


def measure_overhead(config: TrialConfig, data, sizes: Sizes, temp: Path, gpu: bool, echo):
    """Rounds of a bare fit, the local mode and one Tune trial, with Ray up throughout; each
    round starts with the next way (bare-local-Tune, local-Tune-bare, Tune-bare-local), so
    that a slow spell of the machine, or the wake of the way before, hits every way alike.
    What Ray's own processes take while the bare and local runs go is reported too."""
    run_config = overhead_config(config, sizes.overhead_images, sizes.overhead_epochs)
    images = len(data_lib.split(data, run_config.data, seed=0).y_train)
    ray_time = {"cpu": 0.0, "wall": 0.0}

    def in_process(run):
        started, before = time.perf_counter(), _children_cpu()
        times = run()
        ray_time["cpu"] += _cpu_since(before)
        ray_time["wall"] += time.perf_counter() - started
        return times

    def tune_trial(number):
        gpus = 1.0 if gpu else 0.0
        run = run_tune(timed_trial, run_config, data, temp / "ray", f"overhead{number}", 1, gpus)
        machinery = run["results"][0][-1][MACHINERY_KEY]
        return {"wall": run["arrivals"][0], "cpu": run["cpu"][0], "machinery": machinery}

    ways = {
        "bare": lambda number: in_process(lambda: run_bare(run_config, data)),
        "local": lambda number: in_process(
            lambda: run_local_mode(run_config, data, temp / f"round{number}")
        ),
        "tune": tune_trial,
    }
    names, rounds = list(ways), []
    for number in range(1, sizes.overhead_rounds + 1):
        shift = (number - 1) % len(names)
        order = names[shift:] + names[:shift]
        echo(f"3. overhead, round {number} of {sizes.overhead_rounds}: {', '.join(order)} ...")
        rounds.append({name: ways[name](number) for name in order})
    idle = ray_time["cpu"] / ray_time["wall"]  # Of one CPU.
    result = summarise_overhead(rounds, images, daemon_share=idle / (os.cpu_count() or 1))
    result["ray_idle_cpu_share"] = idle
    result["checkpoint_every"] = run_config.training.checkpoint_every
    result["checkpoint_seconds"] = run_config.training.checkpoint_seconds
    return result


# --- 4. Start-up -----------------------------------------------------------------------


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


def timed_trial(params: dict, data) -> None:
    """A study's trial whose reporter also times its own epoch-end work."""
    from study.trainable import tune_trainable

    tune_trainable(params, data, reporter_class=timed_reporter())


def study_trial(params: dict, data) -> None:
    """What a study's trial runs (as study.tuning.trial_function does)."""
    from study.trainable import tune_trainable

    tune_trainable(params, data)


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


# --- Ray Tune runs ---------------------------------------------------------------------


def _process_cpu(pid) -> float:
    """User and system CPU seconds of a local process (a trial's worker); NaN if gone."""
    import psutil  # Ray's own dependency.

    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.Error, TypeError, ValueError):
        return math.nan
    return times.user + times.system


def _arrival_clock():
    from ray import tune

    class ArrivalClock(tune.Callback):
        """Notes when each trial's reports reach the driver, and what they hold."""

        def __init__(self):
            self.arrivals: dict[str, list[float]] = {}
            self.cpu: dict[str, list[float]] = {}  # The trial process's CPU seconds.
            self.results: dict[str, list[dict]] = {}

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.arrivals.setdefault(trial.trial_id, []).append(time.perf_counter())
            self.cpu.setdefault(trial.trial_id, []).append(_process_cpu(result.get("pid")))
            self.results.setdefault(trial.trial_id, []).append(result)

    return ArrivalClock()


def run_tune(function, config, data, storage: Path, name: str, count=1, gpu=0.0) -> dict:
    """Runs `count` identical trials of `function` at once; returns their report times."""
    from ray import tune

    started = time.perf_counter()
    # with_parameters puts the data into the object store once, for every trial.
    with_data = tune.with_parameters(function, data=data)
    put_seconds = time.perf_counter() - started
    cpus = max(1, (os.cpu_count() or 1) // count)
    clock = _arrival_clock()
    tuner = tune.Tuner(
        tune.with_resources(with_data, {"cpu": cpus, "gpu": gpu}),
        param_space=config.to_dict(),
        tune_config=tune.TuneConfig(num_samples=count, max_concurrent_trials=count),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage), callbacks=[clock], verbose=0
        ),
    )
    launched, launched_wall = time.perf_counter(), time.time()
    grid = tuner.fit()
    errors = [str(result.error).splitlines()[0] for result in grid if result.error]
    if errors:
        raise RuntimeError(f"Tune trial failed: {errors[0][:300]}")
    return {
        "put_seconds": put_seconds,
        "launched": launched,
        "launched_wall": launched_wall,
        "arrivals": list(clock.arrivals.values()),
        "cpu": list(clock.cpu.values()),
        "results": list(clock.results.values()),
    }


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


def measure_packing(config, data, storage: Path, counts, images: int) -> list[dict]:
    rows = []
    for count in counts:
        run = run_tune(study_trial, config, data, storage, f"pack{count}", count, 1 / count)
        per_trial = [median_or_none(steady_rates(times, images)) for times in run["arrivals"]]
        rows.append(
            {
                "trials_per_gpu": count,
                "per_trial_images_per_second": per_trial,
                "images_per_second": sum(rate or 0 for rate in per_trial),
            }
        )
    return rows


# --- The whole benchmark ---------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    config: TrialConfig
    sizes: Sizes
    width_note: str
    out: Path | None = None
    sections: tuple[str, ...] = ("model", "pipeline", "overhead", "startup", "packing")
    gpu_targets: bool = False


def run_bench(options: Options, echo=print) -> dict:
    """Runs the chosen sections and returns the results (what --out writes as JSON)."""
    began = time.perf_counter()
    say = echo

    loads = []

    def echo(message):  # Progress lines carry the time since the start and the load.
        loads.append(os.getloadavg()[0])
        say(f"[{time.perf_counter() - began:5.0f} s] {message} (load {loads[-1]:.1f})")

    # Before this process first touches a GPU: memory as needed, not all of it, or the
    # Tune trials that the benchmark starts later find none left.
    devices = backend.configure()
    machine = describe_machine(devices)
    gpu = devices.gpus > 0
    config, sizes, sections = options.config, options.sizes, options.sections
    results = {"machine": machine, "config": config.to_dict(), "width_note": options.width_note}
    results["sizes"] = asdict(sizes)
    with tempfile.TemporaryDirectory(prefix="bench") as temp:
        temp = Path(temp)
        echo(f"writing official-format tarballs of {sizes.tarball_images} images ...")
        paths = write_data_sets(config, sizes, temp / "data")
        measured = {name: measure_load(config, path) for name, path in paths.items()}
        data = {name: loaded for name, (loaded, _) in measured.items()}
        startup = {"load": {name: stats for name, (_, stats) in measured.items()}}
        full = data["full"]
        if "model" in sections:
            echo("1. model throughput ...")
            results["model"] = section_model(config, full, sizes, devices)
        if "pipeline" in sections:
            echo("2. input pipeline ...")
            splits = data_lib.split(full, config.data, seed=config.data.split_seed)
            model = results.get("model")
            results["pipeline"] = section_pipeline(config, splits, sizes, model, devices)
        ray_sections = {"overhead", "startup", "packing"} & set(sections)
        if ray_sections:
            results |= _ray_sections(options, data, temp, gpu, ray_sections, echo)
        if "startup" in sections:
            results["startup"] = {**startup, **results.get("startup", {})}
            results["startup"]["scaling"] = _scaling(results["startup"])
    if options.gpu_targets:
        results["gpu_targets"] = gpu_target_check(results, gpu)
    loads.append(os.getloadavg()[0])
    results["load_average"] = {"min": min(loads), "max": max(loads), "cpus": os.cpu_count()}
    results["seconds"] = time.perf_counter() - began
    if options.out:
        options.out.parent.mkdir(parents=True, exist_ok=True)
        options.out.write_text(json.dumps(results, indent=2, default=float))
    return results


def _ray_sections(options, data, temp: Path, gpu: bool, sections, echo) -> dict:
    import ray

    config, sizes = options.config, options.sizes
    results = {}
    ray.init(
        address="local",
        include_dashboard=False,
        log_to_driver=False,
        num_cpus=os.cpu_count(),
        runtime_env={"env_vars": backend.worker_env()},  # Trials on this process's backend.
    )
    try:
        if "overhead" in sections:
            results["overhead"] = measure_overhead(config, data["full"], sizes, temp, gpu, echo)
        if "startup" in sections:
            echo("4. start-up: a Tune trial's launch to its first step, small and full data ...")
            trial = load_config_from(config, {"training.epochs": 1})
            results["startup"] = {
                "trial": {
                    name: measure_startup(trial, loaded, temp / "ray", f"startup-{name}")
                    for name, loaded in data.items()
                }
            }
        if "packing" in sections:
            if not gpu:
                results["packing"] = {"skipped": "no GPU on this machine"}
            else:
                echo("5. packing: 1, 2 and 4 trials per GPU ...")
                run_config = overhead_config(config, sizes.overhead_images, sizes.overhead_epochs)
                images = len(data_lib.split(data["full"], run_config.data, seed=0).y_train)
                results["packing"] = {
                    "rows": measure_packing(
                        run_config, data["full"], temp / "ray", sizes.packing, images
                    )
                }
    finally:
        ray.shutdown()
    return results


def _scaling(startup: dict) -> dict:
    """How load and trial start-up costs grow from the small data set to the full one."""
    load, trial = startup.get("load", {}), startup.get("trial", {})
    scaling = {}
    if "small" in load and "full" in load:
        scaling["data_size_ratio"] = load["full"]["images"] / load["small"]["images"]
        scaling["load_time_ratio"] = load["full"]["seconds"] / load["small"]["seconds"]
    if "small" in trial and "full" in trial:
        key = "launch_to_first_step_seconds"
        scaling["trial_start_ratio"] = trial["full"][key] / trial["small"][key]
    return scaling


def gpu_target_check(results: dict, gpu: bool) -> dict:
    if not gpu:
        return {"skipped": "no GPU on this machine: the GPU targets were not checked"}
    rows = results.get("model", {}).get("rows", [])
    one = [
        row.get("images_per_second") or 0
        for row in rows
        if row["batch_size"] == GPU_TARGET_BATCH and row["mixed_precision"] and row["jit_compile"]
    ]
    packed = [row["images_per_second"] for row in results.get("packing", {}).get("rows", [])]
    best_one, best_packed = max(one, default=None), max(packed, default=None)
    return {
        "one_trial_images_per_second": best_one,
        "one_trial_target": TARGETS["gpu_one_trial"],
        "one_trial_met": bool(best_one and best_one >= TARGETS["gpu_one_trial"]),
        "packed_images_per_second": best_packed,
        "packed_target": TARGETS["gpu_packed"],
        "packed_met": bool(best_packed and best_packed >= TARGETS["gpu_packed"]),
    }


# --- The table -------------------------------------------------------------------------


def _number(value, digits=0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _model_lines(section: dict) -> list[str]:
    lines = [
        "1. Model throughput (training images/s on a fixed batch, median of runs after a warm-up)",
        f"   {'precision':<15} {'jit':<4} {'batch':>6} {'steps/exec':>10} {'augment':>8} "
        f"{'images/s':>10} {'vs trial':>9}",
    ]
    for index, row in enumerate(section["rows"]):
        precision = section["policy_mixed"] if row["mixed_precision"] else "float32"
        rate = row.get("images_per_second")
        cells = (
            f"   {precision:<15} {'on' if row['jit_compile'] else 'off':<4} "
            f"{row['batch_size']:>6} {row['steps_per_execution']:>10} "
            f"{'on' if row['augment'] else 'off':>8} {_number(rate):>10} "
            f"{_number(row.get('vs_trial_default'), 2):>9}"
        )
        if index == 0:
            cells += "  <- the trial's settings"
        if "error" in row:
            cells += f"  failed: {row['error'][:60]}"
        lines.append(cells)
    if "note" in section:
        lines.append(f"   note: {section['note']}")
    return lines


def _pipeline_lines(section: dict) -> list[str]:
    verdict = "the bottleneck" if section["bottleneck"] else "not the bottleneck"
    if section["ratio_to_model"] is None:
        compared = "   (the model section, not run, would give the model's rate to compare)"
    else:
        compared = (
            f"   the model trains {_number(section['model_images_per_second'])}: ratio "
            f"{_number(section['ratio_to_model'], 1)} (the slower of the two), {verdict}"
        )
    lines = [
        "2. Input pipeline (the trial's training batches: NumPy gathers from memory)",
        f"   alone {_number(section['images_per_second'])} images/s over "
        f"{section['images']:,} images; through Keras's training loop (a trivial model) "
        f"{_number(section['keras_loop_images_per_second'])}",
        compared,
        f"   each epoch's first batch after {1000 * section['first_batch_seconds']:.1f} ms "
        "(the epoch's order drawn)",
    ]
    choice = section.get("augmentation")
    if choice:
        where = "overlapping the device" if choice["in_input_overlapped"] else "then the model"
        lines += [
            f"   augmentation in the model (FlipShift, compiled): "
            f"{_number(choice['in_model_images_per_second'])} images/s; in the input (NumPy "
            f"{_number(section['numpy_augment_images_per_second'])} images/s, {where}): "
            f"{_number(choice['in_input_images_per_second'])}; faster: {choice['faster']}",
        ]
    return lines


def _overhead_lines(section: dict) -> list[str]:
    every = section.get("checkpoint_every")
    cadence = (
        f"checkpoints by time (at most one per {section['checkpoint_seconds']:g} s)"
        if every == "auto"
        else f"a checkpoint every {every} epoch{'s' if every != 1 else ''}"
    )
    lines = [
        "3. Machinery overhead (steady-state training images/s per whole epoch cycle, "
        f"{section['images_per_epoch']:,} images an epoch, epoch 1 and the last left out; "
        f"{section['rounds']} rounds of the three ways in turn, Ray up throughout; {cadence})",
    ]
    names = {"bare": "bare model.fit", "local": "local mode", "tune": "one Tune trial"}
    for way, name in names.items():
        if way not in section:
            continue
        rate = section[way]["images_per_second"]
        cpu_rate = section[way].get("images_per_cpu_second")
        line = f"   {name:<16} {_number(rate):>6} images/s {_number(cpu_rate):>6} per CPU-s"
        key = f"{way}/bare"
        if key in section:
            met = "met" if section[f"{key} met"] else "NOT met"
            line += (
                f"   {key} {_number(section[key], 3)} (target >= {TARGETS[key]}: {met}); "
                f"per CPU-s {_number(section.get(f'{key} cpu'), 3)}; by round "
                + ", ".join(_number(value, 2) for value in section[f"{key} rounds"])
            )
        lines.append(line)
        if f"{key} accounted" in section:
            share = section[way]["machinery_share"]
            daemons = " and Ray's daemons" if way == "tune" else ""
            lines.append(
                f"   {'':<16} checkpoint and report took {100 * share:.1f}% of each cycle: "
                f"{key} {_number(section[f'{key} accounted'], 3)} by accounting "
                f"(its own time{daemons} taken off)"
            )
    if "ray_idle_cpu_share" in section:
        lines.append(
            f"   Ray's own processes took {100 * section['ray_idle_cpu_share']:.1f}% of one CPU "
            "beside the bare and local runs"
        )
    return lines


def _startup_lines(section: dict) -> list[str]:
    lines = ["4. Start-up"]
    for name, load in section.get("load", {}).items():
        lines.append(
            f"   load {name:<5} tarball: {load['images']:>7,} images, "
            f"{load['megabytes']:6.1f} MB, {load['seconds']:6.2f} s "
            f"({load['microseconds_per_image']:.1f} us/image)"
        )
    for name, trial in section.get("trial", {}).items():
        lines.append(
            f"   trial {name:<5} data ({trial['train_images']:,} training images): launch to "
            f"first step {trial['launch_to_first_step_seconds']:.1f} s = launch to trial "
            f"{trial['launch_to_trial_seconds']:.1f} s + trial to first step "
            f"{trial['trial_to_first_step_seconds']:.1f} s; first step "
            f"{trial['first_step_seconds']:.1f} s; object-store put {trial['put_seconds']:.2f} s"
        )
    scaling = section.get("scaling", {})
    if "load_time_ratio" in scaling:
        lines.append(
            f"   full / small: data x{scaling['data_size_ratio']:.1f}, load time "
            f"x{scaling['load_time_ratio']:.1f}"
            + (
                f", trial start x{scaling['trial_start_ratio']:.2f}"
                if "trial_start_ratio" in scaling
                else ""
            )
        )
    return lines


def _packing_lines(section: dict) -> list[str]:
    if "skipped" in section:
        return [f"5. GPU packing: skipped ({section['skipped']})"]
    lines = ["5. GPU packing (aggregate training images/s of trials sharing one GPU)"]
    for row in section["rows"]:
        per_trial = ", ".join(_number(rate) for rate in row["per_trial_images_per_second"])
        lines.append(
            f"   {row['trials_per_gpu']} per GPU: {_number(row['images_per_second'])} images/s "
            f"({per_trial})"
        )
    return lines


def format_table(results: dict) -> str:
    machine = results["machine"]
    gpus = ", ".join(machine["gpu_names"]) if machine["gpus"] else "no GPU"
    model = results["config"]["model"]
    name = machine["backend"]
    threads = (
        f"; TensorFlow threads {machine['intra_op_threads'] or 'default'} intra-op, "
        f"{machine['inter_op_threads'] or 'default'} inter-op"
        if "intra_op_threads" in machine
        else ""
    )
    lines = [
        f"study.bench on {machine['cpus']} CPUs, {gpus} (Keras {machine['keras']} on "
        f"{name} {machine[name]})",
        f"model width {model['width']:g} ({results['width_note']}), "
        f"batch {results['config']['training']['batch_size']}{threads}",
    ]
    load = results.get("load_average")
    if load:
        lines.append(
            f"load average {load['min']:.1f} to {load['max']:.1f} over the run"
            + (
                f": above the {load['cpus']} CPUs, other processes ran beside it; noisy figures"
                if load["max"] > load["cpus"]
                else ""
            )
        )
    printers = {
        "model": _model_lines,
        "pipeline": _pipeline_lines,
        "overhead": _overhead_lines,
        "startup": _startup_lines,
        "packing": _packing_lines,
    }
    for name, printer in printers.items():
        if name in results:
            lines += ["", *printer(results[name])]
    if "gpu_targets" in results:
        targets = results["gpu_targets"]
        lines.append("")
        if "skipped" in targets:
            lines.append(f"GPU targets: {targets['skipped']}")
        else:
            lines.append(
                f"GPU targets: one trial {_number(targets['one_trial_images_per_second'])} "
                f"(>= {targets['one_trial_target']:,}: {targets['one_trial_met']}), packed "
                f"{_number(targets['packed_images_per_second'])} "
                f"(>= {targets['packed_target']:,}: {targets['packed_met']})"
            )
    return "\n".join(lines)


# --- The command line ------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m study.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--config", help="a config in configs/: its trial sections (default: the code defaults)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--width",
        type=float,
        help=f"model width (default: the config's with a GPU, {CPU_WIDTH} on CPU)",
    )
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--threads",
        metavar="INTRA,INTER",
        help="TensorFlow's intra- and inter-op threads in this process (default: its own; "
        "TensorFlow only)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks that it runs, in a minute"
    )
    parser.add_argument(
        "--images",
        type=int,
        help="training images an epoch in the overhead section (default: 5,000 on CPU, the "
        "whole split with a GPU); a few hundred show a full-width checkpoint's share on CPU",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds of the overhead section (default: 3; more rounds, less noise)",
    )
    parser.add_argument(
        "--sections",
        default="model,pipeline,overhead,startup,packing",
        help="comma-separated sections to run (default: all)",
    )
    parser.add_argument(
        "--gpu-targets",
        action="store_true",
        help=f"the issue's GPU targets: full width, batch {GPU_TARGET_BATCH}, mixed and XLA",
    )
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace, gpu: bool) -> Options:
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = set(sections) - set(Options.__dataclass_fields__["sections"].default)
    if unknown:
        raise ConfigError(f"--sections: unknown {', '.join(sorted(unknown))}")
    overrides = list(args.set)
    if args.gpu_targets:
        overrides += ["model.width=1.0", f"training.batch_size={GPU_TARGET_BATCH}"]
    # A study config's trial sections, as --local takes them.
    config = load_study(args.config, overrides, check_space=False).trial
    if args.width is not None:
        config, note = with_values(config, model__width=args.width), "--width"
    elif gpu or args.gpu_targets:
        note = "the config's"
    else:
        config, note = with_values(config, model__width=CPU_WIDTH), "CPU default; --width sets it"
    sizes = SIZES["quick" if args.quick else "gpu" if gpu else "cpu"]
    if args.rounds is not None:
        if args.rounds < 1:
            raise ConfigError(f"--rounds: {args.rounds}; it must be at least 1")
        sizes = replace(sizes, overhead_rounds=args.rounds)
    if args.images is not None:
        if args.images < 10:
            raise ConfigError(f"--images: {args.images}; it must be at least 10")
        sizes = replace(sizes, overhead_images=args.images)
    return Options(config, sizes, note, args.out, sections, args.gpu_targets)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        backend.configured_name()
        if args.threads:  # Only before the backend runs anything.
            backend.set_threads(*(int(n) for n in args.threads.split(",")))
        options = options_from(args, gpu=backend.configure().gpus > 0)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = run_bench(options, echo=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(results))
    if options.out:
        print(f"\nwrote {options.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
