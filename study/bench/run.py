"""The whole benchmark: the chosen sections in turn, their results as one dict."""

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from study import backend
from study import data as data_lib
from study.bench.common import Sizes, describe_machine, load_config_from
from study.bench.model import section_model
from study.bench.overhead import measure_overhead, overhead_config
from study.bench.packing import gpu_target_check, measure_packing
from study.bench.pipeline import section_pipeline
from study.bench.startup import measure_load, measure_startup, write_data_sets
from study.config import TrialConfig


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
