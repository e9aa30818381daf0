"""python -m study.gpu_bench: the trial's speed on a GPU machine with JAX, no TensorFlow, no Ray.

Keras runs on JAX (this module sets KERAS_BACKEND=jax) and nothing it runs may import
TensorFlow or Ray: an import of either fails here as it would on such a machine. On
synthetic data of full size in the official format (50,000 + 10,000 images), sections
in turn, the JSON rewritten after each one, so that a run cut off still reports:

1. model    training images/s of the network alone at full width, batch 512, mixed
            precision, 16 steps per execution, with and without augmentation;
2. trial    a 3-epoch local trial (what `python -m study.run --local` runs): images/s;
3. packing  2 and 4 local trials at once on the one GPU (the trial of section 2 is the
            row of 1): aggregate images/s and each process's peak GPU memory.

Each measurement runs in a process of its own with its share of the GPU's memory; the
first compilation of each program is cached on disk for the others. `--budget` seconds
(default 270) skips what would not finish in time. `--quick` shrinks everything to check
on a CPU that it runs (CI does); its figures mean nothing.
"""

import argparse
import importlib.abc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

FORBIDDEN = ("tensorflow", "ray")
TARGETS = {"one_trial": 30_000, "packed": 50_000}


class _Absent(importlib.abc.MetaPathFinder):
    """Makes the forbidden packages absent, as on the GPU machine (where they are)."""

    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in FORBIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (study.gpu_bench runs without it)")
        return None


def forbid_imports() -> None:
    """Before Keras is imported: JAX for Keras, and neither TensorFlow nor Ray."""
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if not any(isinstance(finder, _Absent) for finder in sys.meta_path):
        sys.meta_path.insert(0, _Absent())


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
    steps_per_execution: int = 16  # a GPU trial's; the quick run's fewer warm up sooner


# Validation 5,456 leaves 44,544 = 87 x 512 training images, and 5,456 = 4 x 1,364: whole
# batches only, so each program compiles for one batch shape (a partial batch compiles
# again, seconds on a GPU). The test subset, 9,548 = 7 x 1,364, likewise.
FULL = Plan(
    dataset="cifar100",
    per_class=(500, 100),
    overrides=(
        "model.width=1.0", "training.batch_size=512", "training.eval_batch_size=1364",
        "data.validation_size=5456", "data.test_subset=9548",
    ),
    batch_size=512, epochs=3, run_seconds=2.0, runs=3, packing=(2, 4),
)  # fmt: skip
QUICK = Plan(
    dataset="cifar100",
    per_class=(6, 2),
    overrides=(
        "model.width=0.0625", "training.batch_size=50", "training.eval_batch_size=100",
        "data.validation_size=100", "data.test_subset=100",
    ),
    batch_size=50, epochs=2, run_seconds=0.2, runs=2, packing=(2,), steps_per_execution=2,
)  # fmt: skip
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0"
# Mixed precision, compilation and several steps per execution (the plan's), as a trial on
# a GPU has them; forced, so that the quick run on a CPU takes the same path.
GPU_SETTINGS = ("training.mixed_precision=true", "training.jit_compile=true")


# --- Workers: one measurement each, in a process of its own ------------------------------


def _load(spec: dict):
    from study import data as data_lib
    from study.config import load_config

    config = load_config(None, spec["overrides"])
    data = data_lib.load_cifar(config.data.dataset, spec["data"], config.data.label_mode)
    return config, data


def work_model(spec: dict) -> dict:
    """The network alone on a fixed batch, with augmentation off and on."""
    import keras

    from study import backend, bench
    from study import data as data_lib
    from study.trainable import configure_devices

    config, data = _load(spec)
    devices = configure_devices(config)  # As the trial would: memory, precision.
    keras.mixed_precision.set_global_policy("float32")
    images = len(data_lib.split(data, config.data, seed=config.data.split_seed).y_train)
    steps_per_epoch = -(-images // config.training.batch_size)  # The trial's schedule.
    sizes = replace(bench.SIZES["gpu"], **spec["sizes"])
    rows = []
    training = config.training
    for augment in (False, True):
        variant = bench.Variant(
            True, True, training.batch_size, training.steps_per_execution, augment
        )
        prepared = bench.prepare_model(
            config, data, variant, sizes, devices["policy"], steps_per_epoch
        )
        runs = [bench.time_run(prepared) for _ in range(sizes.runs)]
        rows.append({**asdict(variant), "images_per_second": statistics.median(runs), "runs": runs})
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
    """A local trial, as `--local` runs it; under `barrier`, it starts with the others."""
    from study import backend
    from study.local import run_local

    config, data = _load(spec)
    if spec.get("barrier"):
        _wait_for_all(Path(spec["barrier"]), spec["index"], spec["count"])
    started = time.perf_counter()
    summary = run_local(config, data, Path(spec["run_dir"]), echo=lambda line: None)
    seconds = time.perf_counter() - started
    epochs = _epochs(Path(spec["run_dir"]))
    rates = [row["images_per_second"] for row in epochs]
    return {
        "status": summary["status"],
        "seconds": seconds,
        "images_per_second_by_epoch": rates,
        # Epoch 1 compiles (or reads the compilation cache); the later ones are steady.
        "images_per_second": statistics.median(rates[1:] or rates),
        "epoch_seconds": [row["epoch_seconds"] for row in epochs],
        "val_accuracy": epochs[-1]["val_accuracy"] if epochs else None,
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


def run_workers(specs: list[dict], folder: Path, name: str, budget: Budget, share=1.0):
    """Runs the workers at once, each with `share` of the GPU's memory; their results."""
    from study.backend import jax_memory_env

    env = {**os.environ, **jax_memory_env(share if share < 1 else None)}
    started = [_start(spec, folder, f"{name}-{i}", env) for i, spec in enumerate(specs)]
    return [_finish(process, out, budget) for process, out in started]


def _aggregate(rows: list[dict]) -> dict:
    rates = [row.get("images_per_second") for row in rows]
    peaks = [row.get("peak_bytes") for row in rows]
    return {
        "trials": len(rows),
        "images_per_second": sum(rates) if all(rates) else None,
        "per_trial_images_per_second": rates,
        "peak_gib_per_trial": [peak / 2**30 if peak else None for peak in peaks],
        "errors": [row["error"][:300] for row in rows if "error" in row],
    }


def run_gpu_bench(plan: Plan, out: Path, budget: Budget, echo=print) -> dict:
    from study import synthetic
    from study.config import load_config

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
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(folder / "jax-cache")
        os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        source = synthetic.write_cifar(
            folder / "data" / "cifar-100-python.tar.gz", plan.dataset, *plan.per_class
        )
        overrides = [f"data.dataset={plan.dataset}", *plan.overrides, *GPU_SETTINGS]
        overrides.append(f"training.steps_per_execution={plan.steps_per_execution}")
        overrides.append(f"training.epochs={plan.epochs}")
        load_config(None, overrides)  # A bad plan fails here, not in every worker.
        base = {"data": str(source), "overrides": overrides}
        results["data"] = {"images": sum(plan.per_class) * 100, "seconds": time.monotonic() - began}
        echo(f"[{time.monotonic() - began:5.0f} s] data written: {results['data']['images']:,}")

        sizes = {"run_seconds": plan.run_seconds, "runs": plan.runs}
        [model] = run_workers([{**base, "task": "model", "sizes": sizes}], folder, "model", budget)
        save("model", model)
        trial_spec = {**base, "task": "trial", "run_dir": str(folder / "trial")}
        [trial] = run_workers([trial_spec], folder, "trial", budget)
        save("trial", trial)
        packing = {"1": _aggregate([trial])}
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
            rows = run_workers(specs, folder, f"pack{count}", budget, share=1 / count)
            packing[str(count)] = _aggregate(rows)
            save("packing", packing)
        save("packing", packing)
    results["targets_met"] = targets_met(results)
    out.write_text(json.dumps(results, indent=2))
    return results


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
        augment = "with augmentation" if row["augment"] else "no augmentation  "
        rate = row["images_per_second"]
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
            f"(by epoch {by_epoch}); {trial['seconds']:.0f} s in all; peak "
            f"{_gib(trial['peak_bytes'] and trial['peak_bytes'] / 2**30)}"
        )
    elif trial:
        lines.append(f"2. local trial failed: {trial.get('error', '')[:200]}")
    lines.append("3. trials at once on one GPU: aggregate images/s (per trial; peak memory)")
    for count, row in sections.get("packing", {}).items():
        if "skipped" in row:
            lines.append(f"   {count}: skipped ({row['skipped']})")
            continue
        rates = ", ".join(
            f"{rate:,.0f}" if rate else "-" for rate in row["per_trial_images_per_second"]
        )
        peaks = ", ".join(_gib(peak) for peak in row["peak_gib_per_trial"])
        total = row["images_per_second"]
        lines.append(
            f"   {count}: {total:,.0f} ({rates}; {peaks})"
            if total
            else f"   {count}: failed {row['errors'][:1]}"
        )
    met = results.get("targets_met", {})
    lines.append(
        f"targets: one trial >= {TARGETS['one_trial']:,}: {met.get('one_trial')}; "
        f"packed >= {TARGETS['packed']:,}: {met.get('packed')}; {results.get('seconds', 0):.0f} s"
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
