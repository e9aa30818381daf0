"""Section 3, machinery overhead: a bare `model.fit`, the local mode and one Tune trial,
in rounds, and the share of each epoch cycle that the trial's checkpoint and report take."""

import math
import os
import time
from pathlib import Path

from study import backend
from study import data as data_lib
from study.bench.common import (
    TARGETS,
    Sizes,
    epoch_clock,
    load_config_from,
    median_or_none,
    ratio,
    steady_rates,
)
from study.bench.tune_runs import run_tune
from study.config import TrialConfig


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


def timed_trial(params: dict, data) -> None:
    """A study's trial whose reporter also times its own epoch-end work."""
    from study.trainable import tune_trainable

    tune_trainable(params, data, reporter_class=timed_reporter())


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
