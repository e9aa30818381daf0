"""python -m study.bench.survey: how much of a search space trains a living network.

Samples configurations from a config's search space (uniformly at random, log-uniform
where the space says so, seeded; every key the space lists, the loss among them), trains
each as a local trial on the given data for about `--steps` optimizer steps (whole
epochs, at least two), and tells
whether its network learned: a trial that diverged or died (study/health.py) is dead, and
so is one whose training and validation accuracy both sat inside the chance band in its
last two epochs (the same rule, here without its minimum of steps: the survey asks what
the run learned, however short). Prints a table, one row a configuration, and the count;
`--out` writes the rows as JSON.

It imports neither TensorFlow nor Ray of itself, so it runs on a GPU machine with Keras
on JAX (`KERAS_BACKEND=jax`), where `--workers N` trains N configurations at once, each
with its share of the GPU's memory.

    python -m study.bench.survey --data-dir ../shared/data/cifar-10-sample.tar.gz \\
        --set data.dataset=cifar10 --samples 20
"""

import argparse
import json
import math
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from study.config import ConfigError, from_params
from study.console import native_stderr_filtered
from study.data import DataError
from study.health import DEAD, chance_band
from study.search_config import DefineByRun, StudyConfig, default_config, load_study

DEFAULT_CONFIG = default_config()
# Shown per row, beside the loss: the keys that most often decide whether a network lives.
SHOWN = ("optimizer.name", "optimizer.learning_rate", "model.batch_norm", "training.batch_size")


class _RandomDraw:
    """The part of an Optuna trial that `DefineByRun` asks: uniform draws (log-uniform
    where asked), seeded; so that the survey needs no Optuna (the GPU machine has none)."""

    def __init__(self, rng):
        self.rng = rng

    def suggest_categorical(self, name, choices):
        return choices[int(self.rng.integers(len(choices)))]

    def suggest_int(self, name, low, high):
        return int(self.rng.integers(low, high + 1))

    def suggest_float(self, name, low, high, log=False):
        if log:
            return float(math.exp(self.rng.uniform(math.log(low), math.log(high))))
        return float(self.rng.uniform(low, high))


def sample(study: StudyConfig, count: int, seed: int) -> list[dict]:
    """`count` configurations of the space (values of its keys), drawn at random."""
    import numpy as np

    draw = _RandomDraw(np.random.default_rng(seed))
    define = DefineByRun(study.search)
    return [define(draw) for _ in range(count)]


def epochs_for(config, train_images: int, steps: int) -> int:
    """Whole epochs for about `steps` optimizer steps at the config's batch size; at least
    two, so that the rule has two epochs to judge."""
    per_epoch = max(train_images // config.training.batch_size, 1)
    return max(2, math.ceil(steps / per_epoch))


def verdict(summary: dict, history: list[dict], num_classes: int, images: dict) -> str:
    """dead (it diverged, died, or sat at chance in its last two epochs), learning, or
    error (it crashed: not counted either way)."""
    if summary["status"] == "error":
        return "error"
    if summary["status"] in ("diverged", DEAD):
        return DEAD
    train_band = chance_band(num_classes, images["train"])
    validation_band = chance_band(num_classes, images["validation"])
    last = history[-2:]
    at_chance = all(
        row["accuracy"] <= train_band and row["val_accuracy"] <= validation_band for row in last
    )
    return DEAD if at_chance else "learning"


# --- One configuration, in a worker process ------------------------------------------

_DATA = {}


def _load(dataset: str, data_dir: str, label_mode: str):
    from study import data as data_lib

    key = (dataset, data_dir, label_mode)
    if key not in _DATA:
        _DATA[key] = data_lib.load_cifar(dataset, data_dir, label_mode)
    return _DATA[key]


def run_one(job: dict) -> dict:
    """Trains job["config"] (a nested config dict) as a local trial; its row."""
    import keras

    from study import data as data_lib
    from study.config import validate
    from study.local import run_local

    keras.config.disable_traceback_filtering()  # A crash's row says where, in full.
    config = validate(job["config"])
    data = _load(config.data.dataset, config.data.data_dir, config.data.label_mode)
    splits = data_lib.split(data, config.data, seed=config.data.split_seed)
    images = {"train": len(splits.y_train), "validation": len(splits.y_val)}
    trained = len(splits.y_train) // config.training.batch_size * config.training.batch_size
    with tempfile.TemporaryDirectory(prefix="survey-") as folder:
        try:
            summary = run_local(config, data, Path(folder) / "run", echo=lambda line: None)
        except Exception as error:  # One configuration's crash is a row, not the survey's end.
            import traceback

            message = "".join(traceback.format_exception(error))[-3000:]
            summary = {"status": "error", "message": message}
        rows = _history(Path(folder) / "run")
    return {
        "index": job["index"],
        "values": job["values"],
        "status": summary["status"],
        "message": summary["message"],
        "epochs": len(rows),
        "accuracy": rows[-1]["accuracy"] if rows else math.nan,
        "val_accuracy": rows[-1]["val_accuracy"] if rows else math.nan,
        "best_val_accuracy": summary.get("best_val_accuracy"),
        "verdict": verdict(summary, rows, config.data.num_classes, {**images, "train": trained}),
    }


def _history(run_dir: Path) -> list[dict]:
    import csv

    path = run_dir / "epochs.csv"
    if not path.is_file():
        return []
    with open(path) as file:
        return [
            {key: float(row[key]) for key in ("epoch", "accuracy", "val_accuracy")}
            for row in csv.DictReader(file)
        ]


# --- The driver ------------------------------------------------------------------------


def jobs(study: StudyConfig, samples: list[dict], steps: int, train_images: int) -> list[dict]:
    base = study.trial.to_dict()
    made = []
    for index, values in enumerate(samples):
        config = from_params(values, base)
        epochs = epochs_for(config, train_images, steps)
        config = from_params({**values, "training.epochs": epochs}, base)
        made.append({"index": index, "values": values, "config": config.to_dict()})
    return made


def run_survey(
    study: StudyConfig, samples: list[dict], steps: int, workers: int, echo=print, done=None
):
    """Trains every sample, `workers` at a time; the rows in the samples' order. `echo`
    gets each row as it comes."""
    from study import data as data_lib

    config = study.trial.data
    data = _load(config.dataset, config.data_dir, config.label_mode)
    train_images = len(data_lib.split(data, config, seed=config.split_seed).y_train)
    todo = jobs(study, samples, steps, train_images)
    if workers > 1:
        # Each worker process with its share of a GPU's memory (JAX; TensorFlow grows).
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / workers:.3f}")
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        # A process per configuration: JAX keeps state that a second trial in a process trips on.
        context = get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
            rows = [_echoed(future.result(), echo, done) for future in as_completed(
                [pool.submit(run_one, job) for job in todo]
            )]  # fmt: skip
    else:
        rows = [_echoed(run_one(job), echo, done) for job in todo]
    return sorted(rows, key=lambda row: row["index"])


def _echoed(row: dict, echo, done: list | None) -> dict:
    if done is not None:
        done.append(row)
    echo(format_row(row))
    return row


def format_row(row: dict) -> str:
    values = row["values"]
    shown = "  ".join(f"{key.split('.')[-1]}={_short(values.get(key))}" for key in SHOWN)
    return (
        f"{row['index']:>3}  {values.get('loss.name', '-'):<31} {shown}  "
        f"{row['epochs']} epochs: accuracy {row['accuracy']:.3f}, val {row['val_accuracy']:.3f}"
        f"  {row['status']:<9} -> {row['verdict']}"
    )


def _short(value) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)


def format_count(rows: list[dict]) -> str:
    dead = [row for row in rows if row["verdict"] == DEAD]
    judged = [row for row in rows if row["verdict"] != "error"]
    share = len(dead) / len(judged) if judged else 0.0
    crashed = len(rows) - len(judged)
    errors = f"; {crashed} crashed (not counted)" if crashed else ""
    return f"dead: {len(dead)} of {len(judged)} sampled configurations ({share:.0%}){errors}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m study.bench.survey", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-dir", required=True, help="the CIFAR tarball or its folder")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="the sampler's seed")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per trial")
    parser.add_argument("--workers", type=int, default=1, help="trials at once")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        data_dir = {"data.data_dir": str(Path(args.data_dir).resolve())}
        study = load_study(args.config, args.set, data_dir)
        if args.samples < 1 or args.steps < 1 or args.workers < 1:
            raise ConfigError("--samples, --steps, --workers: each must be >= 1")
        samples = sample(study, args.samples, args.seed)
        done = []

        def echo(line: str) -> None:  # Each row as it comes, and the JSON so far.
            print(line, flush=True)
            if args.out:
                args.out.write_text(json.dumps(done, indent=2, default=str))

        with native_stderr_filtered():  # TensorFlow's start-up lines, where it runs.
            rows = run_survey(study, samples, args.steps, args.workers, echo, done)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_count(rows))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
