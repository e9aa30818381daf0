"""What a run prints: the study's own lines, without the libraries' start-up noise.

The driver of a study never imports TensorFlow, so its console holds Ray's table, the
study's progress lines and its errors. Here the rest is kept off it: Ray's and Optuna's
informational start-up lines, MLflow's database set-up, and the lines that TensorFlow's
native code writes to stderr when it loads (absl's pre-init notice, oneDNN, the CUDA
probe), which no Python setting silences.
"""

import contextlib
import logging
import os
import re
import sys
import threading

# Native start-up lines: absl's notice, any INFO line of absl's format, and the warnings
# and errors of the CUDA probe and the oneDNN/CPU feature notes (on a machine without a
# GPU, "failed call to cuInit" is how TensorFlow finds that out).
NATIVE_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|I\d{4} [\d:.]+ +\d+ \S+:\d+\]"
    r"|[WE]\d{4} [\d:.]+ +\d+ (cuda_\w+|cudart_stub|cpu_feature_guard|port|dso_loader)\.cc:\d+\]"
)

# What Ray's core writes on the driver when Ray's own W&B callback starts its logging actor
# (it hands the actor a queue: https://github.com/ray-project/ray/issues/53727).
RAY_NOISE = re.compile(
    r"\[[^\]]+\] core_worker\.cc:\d+: Actor with class name: '[\w.<>]*Wandb\w*Actor'"
)

# Ray's own lines that the study replaces with its own: on an interrupt (Ctrl-C, or the
# time budget) the study prints how to continue, and it names errored trials and the file
# holding each traceback at the end. Ray's results of an interrupted study also note each
# trial that had not reported yet.
RAY_REPLACED = {
    "ray.tune.tune": ("Stop signal received", "Experiment has been interrupted", "Trials did not"),
    "ray.tune.analysis.experiment_analysis": ("Failed to fetch metrics",),
}


class _Without(logging.Filter):
    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_libraries() -> None:
    """Only warnings and errors from the libraries a run drives (Ray, Optuna, MLflow)."""
    for name, starts in RAY_REPLACED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(each, _Without) for each in logger.filters):
            logger.addFilter(_Without(starts))
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets it as it loads.
    for name in ("mlflow", "alembic", "optuna"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with contextlib.suppress(ImportError):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # Its own handler and level.


@contextlib.contextmanager
def native_stderr_filtered(noise: re.Pattern = NATIVE_NOISE):
    """Passes every line written to this process's stderr (file descriptor 2, where native
    libraries write) through, as it comes, except lines that match `noise`."""
    sys.stderr.flush()
    saved = os.dup(2)
    read, write = os.pipe()
    lines, out = os.fdopen(read, "rb"), os.fdopen(os.dup(saved), "wb", 0)  # The thread's.
    os.dup2(write, 2)
    os.close(write)

    def forward():
        with lines, out:
            for line in lines:
                if not noise.match(line.decode(errors="replace")):
                    out.write(line)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # Closes the pipe's last writer: the thread sees the end.
        os.close(saved)
        thread.join(timeout=5)


def duration(seconds: float) -> str:
    """3h05m, 4m10s, 12s."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def parse_duration(text: str) -> float:
    """Seconds from `2h`, `90m`, `1h30m`, `45s` or a plain number of seconds."""
    text = text.strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", text)
    if not text or parts is None:
        raise ValueError(f"{text!r} is not a duration such as 2h, 90m, 1h30m or 45s")
    hours, minutes, seconds = (float(part or 0) for part in parts.groups())
    return hours * 3600 + minutes * 60 + seconds
