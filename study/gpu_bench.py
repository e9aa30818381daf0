"""python -m study.gpu_bench: the trial's speed on a GPU machine with JAX, no TensorFlow, no Ray.

Keras runs on JAX (this module sets KERAS_BACKEND=jax) and nothing it runs may import
TensorFlow or Ray: an import of either fails here as it would on such a machine. On
synthetic data of full size in the official format (50,000 + 10,000 images), sections
in turn, the JSON rewritten after each one, so that a run cut off still reports:

1. model    training images/s of the network alone at full width, batch 512, mixed
            precision, 16 steps per execution, with and without augmentation; and the
            2020 notebook's recipe (batch 64, float32, RMSprop);
2. trial    a 3-epoch local trial (what `python -m study.run --local` runs): images/s;
3. packing  4 local trials at once on the one GPU, started together once each has
            its data (the trial of section 2 is the row of 1): the images all of them
            trained over the wall time from their common start to the last one's end, the
            steady rate while all of them ran, and each process's peak GPU memory;
4. study    N trials of configs/default.yaml's base configuration started together as
            new processes, start-up and compilation counted (no compilation cache: a
            study's trials differ in what they compile), as a study's trials start:
            images trained over the wall time from their launch to the last one's end,
            with each trial's start-up and compilation seconds.

Each measurement runs in a process of its own with its share of the GPU's memory; the
first compilation of each program is cached on disk for the others. `--budget` seconds
(default 270) skips what would not finish in time. `--quick` shrinks everything to check
on a CPU that it runs (CI does); its figures mean nothing. Every run also checks that
nothing it imported is missing on the GPU machine (.ci/gpu-machine-packages.txt) and not
brought by .ci/fetch-gpu-wheels (.ci/gpu-wheels.txt); it exits 1 if something is.
"""

import argparse
import importlib.abc
import importlib.metadata
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from study.backend import CACHE_VARIABLE

FORBIDDEN = ("tensorflow", "ray")
TARGETS = {"one_trial": 30_000, "packed": 50_000}
CI = Path(__file__).resolve().parents[1] / ".ci"
# What the GPU machine has, and what .ci/fetch-gpu-wheels brings to it.
MACHINE_PACKAGES = CI / "gpu-machine-packages.txt"
WHEELS = CI / "gpu-wheels.txt"
OWN_PACKAGES = ("study", "analysis", "tests")


class _Absent(importlib.abc.MetaPathFinder):
    """Makes absent what the GPU machine lacks: TensorFlow and Ray, and every package that
    only distributions outside its list and the carried wheels provide. An optional import
    then fails here as it does there (and the code takes its other path); a needed one
    fails the run."""

    def __init__(self, lacking: set[str]):
        self.lacking = lacking

    def find_spec(self, name, path, target=None):
        top = name.partition(".")[0]
        if top in FORBIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (study.gpu_bench runs without it)")
        if top in self.lacking:
            raise ModuleNotFoundError(f"No module named {name!r} (the GPU machine lacks it)")
        return None


def forbid_imports() -> None:
    """Before Keras is imported: JAX for Keras, neither TensorFlow nor Ray, nor anything
    else that the GPU machine lacks."""
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if not any(isinstance(finder, _Absent) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Absent(lacking_packages()))


def lacking_packages() -> set[str]:
    """Importable top-level packages here that no distribution of the GPU machine's list
    or of the carried wheels provides."""
    available = _names(MACHINE_PACKAGES) | _names(WHEELS)
    return {
        package
        for package, distributions in importlib.metadata.packages_distributions().items()
        if package not in OWN_PACKAGES and not {_normal(name) for name in distributions} & available
    }


# --- What the GPU machine lacks ----------------------------------------------------------


def _names(path: Path) -> set[str]:
    """Distribution names listed in a file, one a line (comments after #), normalised."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {_normal(line) for line in lines if line}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_packages() -> list[str]:
    """The top-level packages this process has imported, the standard library's and the
    project's own left out."""
    tops = {name.partition(".")[0] for name in list(sys.modules) if sys.modules.get(name)}
    return sorted(
        top
        for top in tops
        if top not in sys.stdlib_module_names and top not in OWN_PACKAGES
        and not top.startswith("_")
    )  # fmt: skip


def missing_on_machine(packages) -> list[str]:
    """Of the imported top-level `packages`, those that no distribution of the GPU
    machine's list or of the carried wheels provides: `name (distribution)`."""
    available = _names(MACHINE_PACKAGES) | _names(WHEELS)
    providers = importlib.metadata.packages_distributions()
    missing = []
    for package in packages:
        # No distribution: a module that an extension made (Cython's cython_runtime).
        distributions = {_normal(name) for name in providers.get(package, [])}
        if distributions and not distributions & available:
            missing.append(f"{package} ({', '.join(sorted(distributions))})")
    return missing


@dataclass(frozen=True)
class Plan:
    """How big each section is: the full run for a GPU, and a quick one for CI."""

    dataset: str
    per_class: tuple[int, int]  # training and test images per class
    overrides: tuple[str, ...]  # the trial's config
    batch_size: int
    epochs: int
    run_seconds: float  # one timed run of the model section
    runs: int
    packing: tuple[int, ...]
    study: tuple[int, ...]  # trials started together in the study section
    study_overrides: tuple[str, ...]  # over configs/default.yaml's base configuration
    study_epochs: int
    steps_per_execution: int = 16  # a GPU trial's; the quick run's fewer warm up sooner


# Validation 5,456 leaves 44,544 = 87 x 512 training images, and 5,456 = 4 x 1,364: whole
# batches only, as every trial has them now (study/pipeline.py), and no padding. The test
# subset, 9,548 = 7 x 1,364, likewise.
FULL = Plan(
    dataset="cifar100",
    per_class=(500, 100),
    overrides=(
        "model.width=1.0", "training.batch_size=512", "training.eval_batch_size=1364",
        "data.validation_size=5456", "data.test_subset=9548",
    ),
    batch_size=512, epochs=3, run_seconds=2.0, runs=3, packing=(4,),
    study=(1, 4, 8), study_overrides=(), study_epochs=5,
)  # fmt: skip
QUICK = Plan(
    dataset="cifar100",
    per_class=(6, 2),
    overrides=(
        "model.width=0.0625", "training.batch_size=50", "training.eval_batch_size=100",
        "data.validation_size=100", "data.test_subset=100",
    ),
    batch_size=50, epochs=2, run_seconds=0.2, runs=2, packing=(2,),
    study=(1, 2),
    study_overrides=(
        "model.width=0.0625", "training.batch_size=50", "training.eval_batch_size=100",
        "data.validation_size=100", "data.test_subset=100",
    ),
    study_epochs=2, steps_per_execution=2,
)  # fmt: skip
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0"
# Mixed precision, compilation and several steps per execution (the plan's), as a trial on
# a GPU has them; forced, so that the quick run on a CPU takes the same path.
GPU_SETTINGS = ("training.mixed_precision=true", "training.jit_compile=true")
# The 2020 notebook's recipe, as configs/seed.yaml has it: batch 64, float32, RMSprop.
NOTEBOOK = {"batch_size": 64, "optimizer": "rmsprop"}


# --- Workers: one measurement each, in a process of its own ------------------------------


def _load(spec: dict):
    from study import data as data_lib
    from study.search_config import load_study

    study = load_study(spec.get("config"), spec["overrides"], check_space=False)
    config = study.trial
    data = data_lib.load_cifar(config.data.dataset, spec["data"], config.data.label_mode)
    return config, data


def work_model(spec: dict) -> dict:
    """The network alone on a fixed batch, with augmentation off and on; and the
    notebook's recipe."""
    import keras

    from study import backend, bench
    from study import data as data_lib
    from study.bench.common import with_values
    from study.trainable import configure_devices

    config, data = _load(spec)
    devices = configure_devices(config)  # As the trial would: memory, precision.
    keras.mixed_precision.set_global_policy("float32")
    images = len(data_lib.split(data, config.data, seed=config.data.split_seed).y_train)
    sizes = replace(bench.SIZES["gpu"], **spec["sizes"])
    training = config.training
    notebook = with_values(config, optimizer__name=NOTEBOOK["optimizer"])
    spe = training.steps_per_execution
    cases = [
        (config, bench.Variant(True, True, training.batch_size, spe)),
        (config, bench.Variant(True, True, training.batch_size, spe, augment=True)),
        (notebook, bench.Variant(False, True, NOTEBOOK["batch_size"], spe)),
    ]
    rows = []
    for case_config, variant in cases:
        steps_per_epoch = images // variant.batch_size  # The trial's schedule.
        prepared = bench.prepare_model(
            case_config, data, variant, sizes, devices["policy"], steps_per_epoch
        )
        runs = [bench.time_run(prepared) for _ in range(sizes.runs)]
        rows.append(
            {
                **asdict(variant),
                "optimizer": case_config.optimizer.name,
                "notebook": case_config is notebook,
                "images_per_second": statistics.median(runs),
                "runs": runs,
            }
        )
        keras.backend.clear_session()
    return {
        "policy": devices["policy"],
        "rows": rows,
        "peak_bytes": backend.peak_memory_bytes(),
        "numpy_augment_images_per_second": _numpy_augment_rate(data, config.training.batch_size),
    }


def _numpy_augment_rate(data, batch_size: int, batches: int = 20) -> float:
    """Images/s of the same augmentation done on the host with NumPy (one thread): the
    other place it could run, which a GPU trial would have to keep up with."""
    import numpy as np

    from study.bench import numpy_flip_shift

    rng = np.random.default_rng(0)
    images = data.x_train[:batch_size]
    started = time.perf_counter()
    for _ in range(batches):
        numpy_flip_shift(images, rng)
    return batches * len(images) / (time.perf_counter() - started)


def work_trial(spec: dict) -> dict:
    """A local trial, as `--local` runs it; under `barrier`, it starts with the others.
    Wall-clock times (time.time) of its start and of each epoch's report, for the
    aggregate of trials that run at once."""
    from study import backend
    from study import data as data_lib
    from study.local import run_local

    config, data = _load(spec)
    trained = len(data_lib.split(data, config.data, seed=config.data.split_seed).y_train)
    trained -= trained % config.training.batch_size  # Whole batches.
    if spec.get("barrier"):
        _wait_for_all(Path(spec["barrier"]), spec["index"], spec["count"])
    started, wall = time.perf_counter(), time.time()
    reports = []
    summary = run_local(
        config, data, Path(spec["run_dir"]), echo=lambda line: reports.append(time.time())
    )
    seconds = time.perf_counter() - started
    epochs = _epochs(Path(spec["run_dir"]))
    rates = [row["images_per_second"] for row in epochs]
    return {
        "status": summary["status"],
        "seconds": seconds,
        "started_at": wall,
        "ended_at": time.time(),
        "epoch_ends": reports,
        "images_per_epoch": trained,
        "images_per_second_by_epoch": rates,
        # Epoch 1 compiles (or reads the compilation cache); the later ones are steady.
        "images_per_second": statistics.median(rates[1:] or rates),
        "epoch_seconds": [row["epoch_seconds"] for row in epochs],
        "val_accuracy": epochs[-1]["val_accuracy"] if epochs else None,
        "startup_seconds": summary.get("startup_seconds"),
        "compile_seconds": summary.get("compile_seconds"),
        "peak_bytes": backend.peak_memory_bytes(),
    }


def _epochs(run_dir: Path) -> list[dict]:
    import csv

    keys = ("images_per_second", "epoch_seconds", "val_accuracy")
    with open(run_dir / "epochs.csv") as file:
        return [{key: float(row[key]) for key in keys} for row in csv.DictReader(file)]


def _wait_for_all(folder: Path, index: int, count: int, timeout=600.0) -> None:
    """A barrier between processes: each has loaded its data; all start training together."""
    (folder / f"ready-{index}").touch()
    deadline = time.monotonic() + timeout
    while len(list(folder.glob("ready-*"))) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(folder.glob('ready-*')))} of {count} ready")
        time.sleep(0.05)


def run_worker(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    import keras

    result = {"model": work_model, "trial": work_trial}[spec["task"]](spec)
    from study import backend

    devices = backend.configure()
    result["device"] = {"gpus": devices.gpus, "names": devices.gpu_names, **backend.versions()}
    result["capability"] = devices.capability
    result["forbidden_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN)
    result["imported"] = imported_packages()
    result["keras_backend"] = keras.backend.backend()
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


# --- The driver: data, workers, the budget, the JSON -----------------------------------


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def _start(spec: dict, folder: Path, name: str, env: dict) -> tuple[subprocess.Popen, Path]:
    spec = {**spec, "out": str(folder / f"{name}.result.json")}
    path = folder / f"{name}.spec.json"
    path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "study.gpu_bench", "--worker", str(path)]
    log = open(folder / f"{name}.log", "w")  # noqa: SIM115  Closed with the process.
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    process.log = log
    return process, Path(spec["out"])


def _finish(process, out: Path, budget: Budget) -> dict:
    try:
        process.wait(timeout=max(1.0, budget.left()))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return {"error": "cut off: out of the time budget"}
    finally:
        process.log.close()
    if process.returncode != 0 or not out.exists():
        tail = Path(process.log.name).read_text()[-1500:]
        return {"error": f"exit {process.returncode}: {tail}"}
    return json.loads(out.read_text())


def run_workers(specs: list[dict], folder: Path, name: str, budget: Budget, share=1.0, env=None):
    """Runs the workers at once, each with `share` of the GPU's memory (and `env` over
    this process's environment); their results, and the wall-clock time (time.time) at
    which they were launched."""
    from study.backend import jax_memory_env

    env = {**os.environ, **jax_memory_env(share if share < 1 else None), **(env or {})}
    launched = time.time()
    started = [_start(spec, folder, f"{name}-{i}", env) for i, spec in enumerate(specs)]
    return [_finish(process, out, budget) for process, out in started], launched


def _trained(row: dict) -> int:
    return row["images_per_epoch"] * len(row["epoch_ends"])


def steady_rate(rows: list[dict]) -> float | None:
    """Images/s of all trials together while every one of them ran past its first epoch:
    from the last first-epoch report to the first last-epoch report, each trial's epochs
    that lie wholly in that window; None if there is no such epoch."""
    window = (max(row["epoch_ends"][0] for row in rows), min(row["epoch_ends"][-1] for row in rows))
    total = 0.0
    for row in rows:
        ends = row["epoch_ends"]
        inside = [
            i for i in range(1, len(ends)) if ends[i - 1] >= window[0] and ends[i] <= window[1]
        ]
        if not inside:
            return None
        seconds = sum(ends[i] - ends[i - 1] for i in inside)
        total += len(inside) * row["images_per_epoch"] / seconds
    return total


def aggregate(rows: list[dict], since: float | None = None) -> dict:
    """Trials that ran at once: the images they trained over the wall time from their
    common start (their barrier, or `since`: their launch) to the last one's end; beside
    it, the steady rate while all of them ran, and each trial's own."""
    done = [row for row in rows if "error" not in row and row.get("epoch_ends")]
    result = {
        "trials": len(rows),
        "images_per_second": None,
        "steady_images_per_second": None,
        "wall_seconds": None,
        "per_trial_images_per_second": [row.get("images_per_second") for row in rows],
        "startup_seconds": [row.get("startup_seconds") for row in rows],
        "compile_seconds": [row.get("compile_seconds") for row in rows],
        "peak_gib_per_trial": [
            row["peak_bytes"] / 2**30 if row.get("peak_bytes") else None for row in rows
        ],
        "errors": [row["error"][:300] for row in rows if "error" in row],
    }
    if len(done) == len(rows) and done:
        began = since if since is not None else min(row["started_at"] for row in done)
        wall = max(row["ended_at"] for row in done) - began
        result["wall_seconds"] = wall
        result["images_per_second"] = sum(_trained(row) for row in done) / wall
        result["steady_images_per_second"] = steady_rate(done)
    return result


def run_gpu_bench(plan: Plan, out: Path, budget: Budget, echo=print) -> dict:
    from study import synthetic
    from study.search_config import load_study

    began = time.monotonic()
    results = {"plan": asdict(plan), "targets": TARGETS, "sections": {}}

    def save(section: str, value) -> None:
        results["sections"][section] = value
        results["seconds"] = time.monotonic() - began
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        echo(f"[{results['seconds']:5.0f} s] {section} done")

    with tempfile.TemporaryDirectory(prefix="gpu-bench") as temp:
        folder = Path(temp)
        # One compilation cache for every worker: the later ones read what the first wrote.
        os.environ[CACHE_VARIABLE] = str(folder / "cache")
        source = synthetic.write_cifar(
            folder / "data" / "cifar-100-python.tar.gz", plan.dataset, *plan.per_class
        )
        overrides = [f"data.dataset={plan.dataset}", *plan.overrides, *GPU_SETTINGS]
        overrides.append(f"training.steps_per_execution={plan.steps_per_execution}")
        overrides.append(f"training.epochs={plan.epochs}")
        study_overrides = [
            f"data.dataset={plan.dataset}", *plan.study_overrides, *GPU_SETTINGS,
            f"training.steps_per_execution={plan.steps_per_execution}",
            f"training.epochs={plan.study_epochs}",
        ]  # fmt: skip
        default = str(CI.parent / "configs" / "default.yaml")
        for config, values in ((None, overrides), (default, study_overrides)):
            load_study(config, values, check_space=False)  # A bad plan fails here.
        base = {"data": str(source), "overrides": overrides}
        results["data"] = {"images": sum(plan.per_class) * 100, "seconds": time.monotonic() - began}
        echo(f"[{time.monotonic() - began:5.0f} s] data written: {results['data']['images']:,}")

        sizes = {"run_seconds": plan.run_seconds, "runs": plan.runs}
        [model], _ = run_workers(
            [{**base, "task": "model", "sizes": sizes}], folder, "model", budget
        )
        save("model", model)
        trial_spec = {**base, "task": "trial", "run_dir": str(folder / "trial")}
        [trial], _ = run_workers([trial_spec], folder, "trial", budget)
        save("trial", trial)
        study = {}
        study_spec = {
            "config": default, "data": str(source), "overrides": study_overrides,
            "task": "trial",
        }  # fmt: skip
        for count in plan.study:
            if budget.left() < 30:
                study[str(count)] = {"skipped": "out of the time budget"}
                continue
            specs = [
                {**study_spec, "run_dir": str(folder / f"study{count}-{i}")} for i in range(count)
            ]
            # No compilation cache: a study's trials differ in what they compile.
            rows, launched = run_workers(
                specs, folder, f"study{count}", budget, 1 / count, {CACHE_VARIABLE: "off"}
            )
            study[str(count)] = aggregate(rows, since=launched)
            save("study", study)
        save("study", study)
        packing = {"1": aggregate([trial])}
        for count in plan.packing:
            if budget.left() < 30:
                packing[str(count)] = {"skipped": "out of the time budget"}
                continue
            barrier = folder / f"barrier-{count}"
            barrier.mkdir()
            specs = [
                {**trial_spec, "run_dir": str(folder / f"pack{count}-{i}"),
                 "barrier": str(barrier), "index": i, "count": count}
                for i in range(count)
            ]  # fmt: skip
            rows, _ = run_workers(specs, folder, f"pack{count}", budget, share=1 / count)
            packing[str(count)] = aggregate(rows)
            save("packing", packing)
        save("packing", packing)
        imported = {
            package
            for section in results["sections"].values()
            for row in _rows(section)
            for package in row.get("imported", [])
        }
        results["missing_on_gpu_machine"] = missing_on_machine(
            sorted(imported | set(imported_packages()))
        )
    results["targets_met"] = targets_met(results)
    out.write_text(json.dumps(results, indent=2))
    return results


def _rows(section: dict) -> list[dict]:
    """The worker results a section holds (one, or one per trial count)."""
    if "imported" in section or "error" in section:
        return [section]
    return [row for row in section.values() if isinstance(row, dict) and "imported" in row]


def targets_met(results: dict) -> dict:
    sections = results["sections"]
    one = sections.get("trial", {}).get("images_per_second")
    packed = [row.get("images_per_second") for row in sections.get("packing", {}).values()]
    best = max((rate for rate in packed if rate), default=None)
    return {
        "one_trial": bool(one and one >= TARGETS["one_trial"]),
        "packed": bool(best and best >= TARGETS["packed"]),
    }


def _gib(value) -> str:
    return f"{value:.1f} GiB" if value else "-"


def _trials_at_once(row: dict) -> str:
    """A row of trials that ran at once: aggregate and steady images/s, wall time."""
    total, steady = row["images_per_second"], row["steady_images_per_second"]
    steady_text = f"{steady:,.0f}" if steady else "-"
    return f"{total:,.0f} images/s over {row['wall_seconds']:.1f} s (steady {steady_text})"


def _seconds(values) -> str:
    known = [value for value in values if value is not None]
    return ", ".join(f"{value:.1f}" for value in known) or "-"


def format_table(results: dict) -> str:
    sections = results["sections"]
    lines = ["study.gpu_bench (Keras on JAX; no TensorFlow, no Ray)"]
    device = next((s["device"] for s in sections.values() if "device" in s), None)
    if device:
        names = ", ".join(device["names"]) or "no GPU"
        lines.append(f"{names}; Keras {device['keras']}, JAX {device['jax']}")
    model = sections.get("model", {})
    steps = results.get("plan", {}).get("steps_per_execution", 16)
    lines.append(f"1. model alone ({model.get('policy', '-')}, {steps} steps per execution):")
    for row in model.get("rows", []):
        rate = row["images_per_second"]
        if row.get("notebook"):
            lines.append(
                f"   the notebook's recipe (batch {row['batch_size']}, float32, "
                f"{row['optimizer']}): {rate:,.0f} images/s"
            )
            continue
        augment = "with augmentation" if row["augment"] else "no augmentation  "
        lines.append(f"   batch {row['batch_size']}, {augment}: {rate:,.0f} images/s")
    if "numpy_augment_images_per_second" in model:
        rate = model["numpy_augment_images_per_second"]
        lines.append(
            f"   the same augmentation with NumPy on one host thread: {rate:,.0f} images/s"
        )
    if "error" in model:
        lines.append(f"   failed: {model['error'][:200]}")
    trial = sections.get("trial", {})
    if "images_per_second" in trial:
        by_epoch = ", ".join(f"{rate:,.0f}" for rate in trial["images_per_second_by_epoch"])
        lines.append(
            f"2. local trial: {trial['images_per_second']:,.0f} images/s after epoch 1 "
            f"(by epoch {by_epoch}); {trial['seconds']:.0f} s in all; start-up "
            f"{_seconds([trial.get('startup_seconds')])} s, compilation "
            f"{_seconds([trial.get('compile_seconds')])} s; peak "
            f"{_gib(trial['peak_bytes'] and trial['peak_bytes'] / 2**30)}"
        )
    elif trial:
        lines.append(f"2. local trial failed: {trial.get('error', '')[:200]}")
    lines.append(
        "3. trials at once on one GPU, started together with their data loaded: all the images "
        "they trained over the wall time to the last one's end (the steady rate while all "
        "ran; per trial; peak memory)"
    )
    for count, row in sections.get("packing", {}).items():
        if "skipped" in row:
            lines.append(f"   {count}: skipped ({row['skipped']})")
            continue
        if not row["images_per_second"]:
            lines.append(f"   {count}: failed {row['errors'][:1]}")
            continue
        rates = ", ".join(
            f"{rate:,.0f}" if rate else "-" for rate in row["per_trial_images_per_second"]
        )
        peaks = ", ".join(_gib(peak) for peak in row["peak_gib_per_trial"])
        lines.append(f"   {count}: {_trials_at_once(row)} ({rates}; {peaks})")
    plan = results.get("plan", {})
    lines.append(
        f"4. a study's trials (configs/default.yaml, {plan.get('study_epochs')} epochs) "
        "launched together, start-up and compilation counted: images trained over the wall "
        "time from launch to the last one's end (steady; start-up and compilation s)"
    )
    for count, row in sections.get("study", {}).items():
        if "skipped" in row:
            lines.append(f"   {count}: skipped ({row['skipped']})")
        elif not row["images_per_second"]:
            lines.append(f"   {count}: failed {row['errors'][:1]}")
        else:
            lines.append(
                f"   {count}: {_trials_at_once(row)}; start-up {_seconds(row['startup_seconds'])}"
                f"; compilation {_seconds(row['compile_seconds'])}"
            )
    met = results.get("targets_met", {})
    lines.append(
        f"targets: one trial >= {TARGETS['one_trial']:,}: {met.get('one_trial')}; "
        f"packed >= {TARGETS['packed']:,}: {met.get('packed')}; {results.get('seconds', 0):.0f} s"
    )
    missing = results.get("missing_on_gpu_machine")
    if missing:
        lines.append(
            f"MISSING on the GPU machine, and not in .ci/gpu-wheels.txt: {', '.join(missing)}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    forbid_imports()
    parser = argparse.ArgumentParser(
        prog="python -m study.gpu_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("gpu-bench.json"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds (default 270)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker)
    echo = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.quick:  # Compiles in a third of the time; the compiled code runs slower.
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {QUICK_XLA_FLAGS}".strip()
    results = run_gpu_bench(QUICK if args.quick else FULL, args.out, Budget(args.budget), echo)
    print(format_table(results))
    print(f"wrote {args.out}")
    return 1 if results.get("missing_on_gpu_machine") else 0


if __name__ == "__main__":
    sys.exit(main())
