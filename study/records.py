"""The study's own results tables, kept up to date by a Ray Tune callback on the driver.

`trials.csv` has one row per trial (its config values, status, epochs run, best and last
validation accuracy, test metrics where it finished, where it ran); `epochs.csv` one row
per reported epoch. Both are rewritten atomically after every event, so a crash loses
nothing already reported, and both are read back when a study resumes. An epoch that a
trial runs again after restoring an older checkpoint gets a new row with `rerun` = 1.
"""

import contextlib
import time
from pathlib import Path

import pandas as pd
from ray import tune

from study import results
from study.config import METRIC, TIMINGS, flatten, from_params
from study.health import DEAD

TRIALS_FILE = "trials.csv"
EPOCHS_FILE = "epochs.csv"
EPOCH_COLUMNS = (
    "epoch",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "learning_rate",
    "images_per_second",
    "epoch_seconds",
    "test_loss",
    "test_accuracy",
)
PLACEMENT = ("node_id", "node_ip", "hostname", "pid", "gpu_ids")


def error_file(trial) -> str:
    """Where a failed trial's traceback lies in the study's folder: Ray writes error.txt
    into the driver's staging copy of the trial's folder, then copies it to storage."""
    return str(Path(trial.path, Path(trial.error_file).name)) if trial.error_file else ""


def error_reason(trial) -> str:
    """Why a trial failed, in a few words: the last line of its traceback (the exception),
    its first sentence if long, from the driver's copy of error.txt."""
    with contextlib.suppress(OSError, TypeError):
        lines = Path(trial.error_file).read_text().strip().splitlines()
        reason = lines[-1].strip() if lines else ""
        return reason if len(reason) <= 120 else reason.split(". ")[0][:120]
    return ""


def _read(path: Path) -> list[dict]:
    if not path.exists() or path.stat().st_size == 0:
        return []
    # Ids like 12345_00000 would otherwise parse as numbers (Python allows "_" in ints).
    frame = pd.read_csv(path, dtype={"trial_id": str, "config_id": str})
    return [{k: v for k, v in row.items() if pd.notna(v)} for row in frame.to_dict("records")]


class StudyRecorder(tune.Callback):
    """Writes trials.csv and epochs.csv into the study's results folder as trials report."""

    def __init__(self, results_dir: Path, max_epochs: int, base: dict | None = None):
        self.results_dir = Path(results_dir)
        self.max_epochs = max_epochs
        self.base = base or {}  # The study's base config, under each trial's values.
        self.trials: dict[str, dict] = {}
        self.epochs: list[dict] = []
        self._load()

    def setup(self, **info):
        # A resumed study restores this callback as pickled when the study began; the
        # tables on disk are what it has reported since.
        self._load()

    def _load(self) -> None:
        """Continues the tables of an interrupted study."""
        self.trials = {row["trial_id"]: row for row in _read(self.results_dir / TRIALS_FILE)}
        self.epochs = _read(self.results_dir / EPOCHS_FILE)

    def _row(self, trial) -> dict:
        if trial.trial_id not in self.trials:
            values = flatten(from_params(trial.config, getattr(self, "base", {})).to_dict())
            # A key that the search's condition left out is empty, as in Tune's own views.
            values |= {key: None for key, value in trial.config.items() if value is None}
            self.trials[trial.trial_id] = {
                "trial_id": trial.trial_id,
                "status": "pending",
                "epochs_run": 0,
                "restarts": 0,
                **values,
            }
        return self.trials[trial.trial_id]

    def _save(self) -> None:
        results.write_csv(self.results_dir / TRIALS_FILE, list(self.trials.values()))
        results.write_csv(self.results_dir / EPOCHS_FILE, self.epochs)

    def on_trial_start(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["status"] = "running"
        row.setdefault("started_at", time.time())
        self._save()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        row = self._row(trial)
        row.update({key: result[key] for key in (*PLACEMENT, *TIMINGS) if key in result})
        if result.get("warning"):  # A checkpoint that could not be restored, say.
            row["warning"] = result["warning"]
        if result.get("diverged"):
            row.update(status="diverged", message=result["diverged"])
            self._save()
            return
        epoch = int(result["epoch"])
        rerun = any(r["trial_id"] == trial.trial_id and r["epoch"] == epoch for r in self.epochs)
        # A restored trial reports its last epoch again where its driver died after it: that
        # epoch ran once, and has its row unless the driver died before writing it.
        if not (rerun and result.get("replayed")):
            self.epochs.append(
                {
                    "trial_id": trial.trial_id,
                    **{key: result[key] for key in EPOCH_COLUMNS if key in result},
                    "rerun": int(rerun),
                }
            )
        row["status"] = "running"
        if result.get(DEAD):  # Its network learned nothing: stopped after this epoch.
            row.update(status=DEAD, message=result[DEAD])
        row["epochs_run"] = epoch
        row["last_val_accuracy"] = result[METRIC]
        row["last_val_loss"] = result.get("val_loss")
        if result[METRIC] >= row.get("best_val_accuracy", float("-inf")):
            row.update(best_val_accuracy=result[METRIC], best_epoch=epoch)
        for key in ("test_accuracy", "test_loss"):
            if key in result:
                row[key] = result[key]
        self._save()

    def on_trial_recover(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row.update(status="restarting", restarts=row.get("restarts", 0) + 1)
        self._save()

    def on_trial_complete(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row["ended_at"] = time.time()
        if row["status"] not in ("diverged", DEAD):
            finished = row.get("epochs_run", 0) >= self.max_epochs
            row["status"] = "completed" if finished else "early_stopped"
        self._save()

    def on_trial_error(self, iteration, trials, trial, **info):
        row = self._row(trial)
        row.update(status="error", ended_at=time.time())
        row["message"] = f"{error_reason(trial)} (traceback: {error_file(trial)})"
        self._save()
