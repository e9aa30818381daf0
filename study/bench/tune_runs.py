"""Ray Tune runs of identical trials, timed at the driver as their reports arrive."""

import math
import os
import time
from pathlib import Path

# Tune's newer console output prints tables even at verbose=0; the classic one is quiet.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


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
