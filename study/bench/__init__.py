"""python -m study.bench: where a trial's time goes on this machine, as a table and JSON.

Everything runs on synthetic CIFAR data of the real shape and format (study/synthetic.py),
so the benchmark needs no download. It runs on the Keras backend of the process
(KERAS_BACKEND), as the trial does. Five sections, a module each:

1. model     training images/s of the configured network by precision, compilation (XLA
             or jit), batch size, steps per execution and augmentation: after a warm-up,
             the median of runs.
2. pipeline  images/s of the trial's input alone and inside Keras's training loop, its
             ratio to the model's rate, and augmentation in the model against in the input.
3. overhead  the same training three ways: a bare `model.fit`, the local mode, one Ray Tune
             trial, in rounds that rotate their order. Steady-state images/s over whole
             epoch cycles (training, validation, checkpoint, report), the first epoch
             (tracing) and the last left out; and the share of each cycle that the
             trial's own checkpoint and report took, as an accounted ratio.
4. startup   loading the official-format tarball at two data sizes, and a Tune trial's
             launch to its first training step with data of each size.
5. packing   GPU only: aggregate images/s with 1, 2 and 4 trials per GPU.

Besides them: common.py (sizes, targets, timing helpers), tune_runs.py (the Tune runs of
sections 3 to 5), run.py (the whole benchmark), table.py (its table) and cli.py (the
command line).

Keras (and its backend) is imported where it is used, not with these modules: a Tune
worker that unpickles a trial function from here then imports it inside the trial, as in
a study, and study.gpu_bench uses the model section without TensorFlow or Ray.
"""

from study.bench.cli import main, options_from, parse_args
from study.bench.common import (
    CPU_WIDTH,
    SIZES,
    TARGETS,
    Sizes,
    steady_rates,
)
from study.bench.model import (
    Prepared,
    Variant,
    model_variants,
    prepare_model,
    section_model,
    time_run,
)
from study.bench.overhead import (
    overhead_config,
    run_bare,
    run_local_mode,
    summarise_overhead,
)
from study.bench.packing import gpu_target_check
from study.bench.pipeline import _augmentation_choice, numpy_flip_shift, section_pipeline
from study.bench.run import Options, _scaling, run_bench
from study.bench.startup import measure_load, write_data_sets
from study.bench.table import format_table

# What tests, study.gpu_bench and users import from study.bench.
__all__ = [
    "CPU_WIDTH",
    "SIZES",
    "TARGETS",
    "Options",
    "Prepared",
    "Sizes",
    "Variant",
    "_augmentation_choice",
    "_scaling",
    "format_table",
    "gpu_target_check",
    "main",
    "measure_load",
    "model_variants",
    "numpy_flip_shift",
    "options_from",
    "overhead_config",
    "parse_args",
    "prepare_model",
    "run_bare",
    "run_bench",
    "run_local_mode",
    "section_model",
    "section_pipeline",
    "steady_rates",
    "summarise_overhead",
    "time_run",
    "write_data_sets",
]
