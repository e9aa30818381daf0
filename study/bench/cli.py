"""python -m study.bench: where a trial's time goes on this machine, as a table and JSON.

The command line: it parses, then runs the sections (study/bench/run.py) and prints the
table (study/bench/table.py).
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from study import backend
from study.bench.common import CPU_WIDTH, GPU_TARGET_BATCH, SIZES, with_values
from study.bench.run import Options, run_bench
from study.bench.table import format_table
from study.config import ConfigError
from study.search_config import load_study


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
        help=f"measure against the GPU goals: full width, batch {GPU_TARGET_BATCH}, mixed and XLA",
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
