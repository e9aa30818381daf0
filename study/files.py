"""The study's own files: their names, and writing them atomically (a temporary file,
then a rename over the old one).

A process killed while writing leaves the previous complete file, never half of a new one.
"""

import csv
import io
import json
import os
import tempfile
from pathlib import Path

from study.config import ConfigError

# The study's own files in its folder (beside Ray's experiment state and trial folders).
CONFIG_FILE = "config.yaml"  # The resolved config: trial sections and search.
TRIALS_FILE = "trials.csv"  # One row per trial.
EPOCHS_FILE = "epochs.csv"  # One row per reported epoch.
OPTUNA_FILE = "optuna.db"  # The Optuna studies (SQLite), one per stratum.
CONFIRM_DIR = "confirm"  # The confirmation's Ray experiment, with its own tables.
CONFIRM_FILE = "confirm.csv"  # One row per confirmation run.
MODEL_FILE = "model.keras"  # A checkpoint's model (weights and optimizer state).
RESULT_FILE = "result.json"  # How a local run ended.
# A confirmation run's epochs to reach 90% of its own final validation accuracy: how fast
# a loss learns, beside how well (a column of confirm.csv).
EPOCHS_TO_90 = "epochs_to_90"
STUDY_FILES = (
    CONFIG_FILE, TRIALS_FILE, EPOCHS_FILE, OPTUNA_FILE, CONFIRM_FILE,
    f"{CONFIRM_DIR}/{TRIALS_FILE}", f"{CONFIRM_DIR}/{EPOCHS_FILE}",
)  # fmt: skip

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are shared.
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: dict) -> None:
    write_text(path, json.dumps(payload, indent=2, default=float) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    """Writes rows as CSV; the columns are the union of the rows' keys, in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def check_folder(folder: Path) -> None:
    """Refuses, in one line, a study or run folder that this file system cannot hold (a
    name over its length limit, a parent it may not read), where Path.exists raises."""
    try:
        Path(folder).exists()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ConfigError(f"--storage-path, --name: cannot use {folder}: {reason}") from None
