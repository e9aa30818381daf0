"""Runs `python -m study.bench` (study/bench/cli.py)."""

import sys

from study.bench.cli import main

sys.exit(main())
