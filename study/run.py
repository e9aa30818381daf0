"""Command line: `python -m study.run` runs a study; `--local` runs one trial in-process.

Arguments are parsed and checked here, before Ray or TensorFlow start; the work is done by
library functions that tests call directly. Exit codes: 0 done, 2 bad input (one line on
stderr), 3 the local trial diverged or died (its network learned nothing: study/health.py),
130 the study was interrupted (resume it).
`--confirm --name NAME` re-trains a finished study's best configurations over seeds.
`--logger mlflow|wandb` (repeatable) logs every run to those trackers as well.
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

from study import backend
from study.config import ConfigError
from study.data import DataError
from study.files import (
    CONFIG_FILE,
    EPOCHS_FILE,
    MODEL_FILE,
    RESULT_FILE,
    check_folder,
)
from study.health import DEAD
from study.search_config import default_config, load_study
from study.storage import is_uri

# Without --config: the study defaults, with the search space (works from any directory
# with the editable install that the README uses).
DEFAULT_CONFIG = default_config()

HELP = """\
Which loss, optimizer and regularisation train this CIFAR CNN best? A study searches them
with Optuna on Ray Tune, every loss with an equal share of trials, and stops weak trials
early (ASHA); results go to results/NAME/.

  python -m study.run --config configs/laptop.yaml       a study on this machine
  python -m study.run --gpus 4                           the full study (configs/default.yaml)
  python -m study.run --resume --name NAME               continue (or grow, --num-samples)
  python -m study.run --confirm --name NAME --seeds 3    re-train each loss's best over seeds
  python -m study.run --local --config configs/smoke.yaml   one trial in this process

Exit codes: 0 done, 2 bad input (one line naming the field), 3 a local trial diverged or
died (learned nothing), 130 interrupted (the resume command is printed)."""

LOCAL_FILES = (CONFIG_FILE, EPOCHS_FILE, RESULT_FILE, MODEL_FILE)
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


class _Parser(argparse.ArgumentParser):
    """A bad flag is bad input like any other: one line on stderr and exit code 2."""

    def error(self, message):
        raise ConfigError(message)


def _resource_count(text: str) -> float:
    """GPUs or CPUs: a finite number >= 0 (fractions pack trials on a GPU)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def _budget(text: str) -> float:
    """A wall-clock budget: 2h, 90m, 1h30m, 45s or seconds; more than 0."""
    from study.console import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the budget must be more than 0")
    return seconds


def parse_args(argv=None) -> argparse.Namespace:
    parser = _Parser(
        prog="python -m study.run",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--local", action="store_true", help="run one trial in this process")
    parser.add_argument(
        "--config", type=Path, help="a YAML file in configs/ (default: configs/default.yaml)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set optimizer.learning_rate=0.01 (repeatable)",
    )
    parser.add_argument(
        "--data-dir", help="the CIFAR tarball, a folder holding it, or its extracted folder"
    )
    parser.add_argument(
        "--storage-path",
        default="results",
        help="where run folders go: a folder, or a bucket every node reaches (s3://BUCKET/PATH)",
    )
    parser.add_argument("--name", help="the run folder's name (default: config name and time)")
    parser.add_argument(
        "--logger",
        dest="loggers",
        action="append",
        default=[],
        choices=["mlflow", "wandb"],
        help="also log every run to MLflow or W&B (repeatable; TensorBoard files always)",
    )
    study = parser.add_argument_group("study (without --local)")
    study.add_argument("--gpus", type=_resource_count, default=0, help="GPUs the study may use")
    study.add_argument(
        "--gpus-per-trial", type=_resource_count, help="fractions pack trials on a GPU"
    )
    study.add_argument("--cpus-per-trial", type=_resource_count, help="CPUs reserved per trial")
    study.add_argument("--address", help="join a Ray cluster: auto, or ray://HOST:10001")
    study.add_argument("--resume", action="store_true", help="continue the study --name")
    study.add_argument("--searcher", choices=["optuna", "random"], help="override the config")
    study.add_argument("--scheduler", choices=["asha", "fifo"], help="override the config")
    study.add_argument(
        "--num-samples", type=int, help="override search.num_samples; with --resume, grow to it"
    )
    study.add_argument(
        "--time-budget",
        type=_budget,
        help="stop cleanly (resumable) after this wall-clock time: 2h, 90m, 45s",
    )
    study.add_argument(
        "--dashboard-host", default="127.0.0.1", help="0.0.0.0 exposes the dashboard (warned)"
    )
    study.add_argument("--no-dashboard", action="store_true", help="start Ray without it")
    confirm = parser.add_argument_group("confirmation (after a study)")
    confirm.add_argument(
        "--confirm",
        action="store_true",
        help="re-train each loss's best configurations of the study --name over seeds, then test",
    )
    confirm.add_argument("--seeds", type=int, default=3, help="seeds per configuration (>= 2)")
    confirm.add_argument(
        "--top-per-loss", type=int, default=1, help="configurations per loss, by validation"
    )
    return parser.parse_args(argv)


def _run_dir(args) -> Path:
    stem = args.config.stem if args.config else "default"
    name = args.name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"--name: {name!r} must be a plain folder name")
    if is_uri(args.storage_path):
        raise ConfigError(
            f"--storage-path: {args.storage_path}: --local writes its run folder on this "
            "machine; give a local folder (a study takes a bucket)"
        )
    run_dir = Path(args.storage_path) / name
    check_folder(run_dir)
    if run_dir.exists():
        raise ConfigError(f"--name: {run_dir} already exists; choose another --name")
    return run_dir


def _values(args) -> dict:
    # Absolute, so the saved config still finds the data from another directory.
    return {} if args.data_dir is None else {"data.data_dir": str(Path(args.data_dir).resolve())}


def _options(args, name: str):
    """Where the study lives and what it may use, from the command line."""
    from study.tuning import StudyOptions

    return StudyOptions(
        name=name,
        storage_path=str(args.storage_path),
        address=args.address,
        gpus=args.gpus,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial,
        resume=args.resume,
        dashboard_host=args.dashboard_host,
        dashboard=not args.no_dashboard,
        loggers=tuple(args.loggers),
        time_budget=args.time_budget,
        # On --resume, --num-samples grows the study (study.tuning.grown).
        num_samples=args.num_samples if args.resume and not args.confirm else None,
    )


def run_study_command(args) -> int:
    from study.tuning import run_study

    overrides = list(args.overrides)
    flags = ["searcher", "scheduler"] + ([] if args.resume else ["num_samples"])
    for flag in flags:
        if getattr(args, flag) is not None:
            overrides.append(f"search.{flag}={getattr(args, flag)}")
    if args.resume and (args.config or overrides or args.data_dir):
        raise ConfigError("--resume: continues with the study's saved config; drop --config/--set")
    study = load_study(args.config, overrides, _values(args))
    stem = args.config.stem if args.config else "default"
    if args.resume and not args.name:
        raise ConfigError("--resume: name the study to continue with --name")
    name = args.name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return run_study(study, _options(args, name))


def run_confirm_command(args) -> int:
    from study.confirm import run_confirm

    if not args.name:
        raise ConfigError("--confirm: name the finished study with --name")
    if args.config or args.overrides or args.data_dir or args.local:
        raise ConfigError("--confirm: uses the study's saved config; drop --config/--set/--local")
    return run_confirm(_options(args, args.name), args.seeds, args.top_per_loss)


def run_local_command(args) -> int:
    from study import data as data_lib
    from study.trackers import check_trackers

    if args.time_budget is not None:
        raise ConfigError("--time-budget: bounds a study or --confirm, not one --local trial")
    config = load_study(args.config, args.overrides, _values(args), check_space=False).trial
    data_lib.resolve_path(config.data.dataset, config.data.data_dir)
    run_dir = _run_dir(args)
    trackers = check_trackers(args.loggers, run_dir, run_dir.name)

    data = data_lib.load_cifar(config.data.dataset, config.data.data_dir, config.data.label_mode)
    splits = data_lib.split(data, config.data, seed=config.data.split_seed)  # Sizes checked
    data_lib.check_batch_size(splits, config.training.batch_size)  # up front.

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TensorFlow's start-up quiet.
    from study.console import native_stderr_filtered

    print(f"run folder: {run_dir}", flush=True)
    with native_stderr_filtered():  # What TensorFlow's native code says as it loads.
        from study.local import run_local

        summary = run_local(config, data, run_dir, trackers=trackers)
    # A trial that diverged or died before its first checkpoint has no model.keras.
    wrote = [name for name in LOCAL_FILES if (run_dir / name).is_file()]
    print(f"{summary['status']}: wrote {', '.join(wrote)} to {run_dir}")
    for line in trackers.lines():
        print(line)
    if summary["status"] in ("diverged", DEAD):
        print(f"{summary['status']}: {summary['message']}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        backend.configured_name()  # An unsupported KERAS_BACKEND is refused before any work.
        if args.confirm:
            return run_confirm_command(args)
        if args.config is None and not args.resume and DEFAULT_CONFIG.is_file():
            args.config = DEFAULT_CONFIG
        if args.local:
            return run_local_command(args)
        return run_study_command(args)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
