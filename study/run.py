"""Command line: `python -m study.run --local ...` runs one trial in this process.

Arguments are parsed and checked here, before TensorFlow is imported; the work is done by
library functions that tests call directly. Exit codes: 0 done, 2 bad input (one line on
stderr), 3 the trial diverged.
"""

import argparse
import os
import sys
import time
from pathlib import Path

from study.config import ConfigError, load_config
from study.data import DataError

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m study.run", description=__doc__)
    parser.add_argument("--local", action="store_true", help="run one trial in this process")
    parser.add_argument("--config", type=Path, help="a YAML file in configs/ (default: defaults)")
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
        "--storage-path", type=Path, default=Path("results"), help="where run folders go"
    )
    parser.add_argument("--name", help="the run folder's name (default: config name and time)")
    return parser.parse_args(argv)


def _run_dir(args) -> Path:
    stem = args.config.stem if args.config else "default"
    name = args.name or f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not name or "/" in name or name in (".", ".."):
        raise ConfigError(f"--name: {name!r} must be a plain folder name")
    run_dir = args.storage_path / name
    if run_dir.exists():
        raise ConfigError(f"--name: {run_dir} already exists; choose another --name")
    return run_dir


def run_local_command(args) -> int:
    from study import data as data_lib

    values = {} if args.data_dir is None else {"data.data_dir": args.data_dir}
    config = load_config(args.config, args.overrides, values)
    data_lib.resolve_path(config.data.dataset, config.data.data_dir)
    run_dir = _run_dir(args)

    data = data_lib.load_cifar(config.data.dataset, config.data.data_dir, config.data.label_mode)
    data_lib.split(data, config.data, seed=config.data.split_seed)  # Sizes checked up front.

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Keep TensorFlow's start-up quiet.
    from study.local import run_local

    print(f"run folder: {run_dir}")
    summary = run_local(config, data, run_dir)
    print(
        f"{summary['status']}: wrote config.yaml, epochs.csv, result.json, model.keras to {run_dir}"
    )
    if summary["status"] == "diverged":
        print(f"diverged: {summary['message']}", file=sys.stderr)
        return EXIT_DIVERGED
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.local:
            return run_local_command(args)
        raise ConfigError("the distributed study is not available yet; use --local")
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
