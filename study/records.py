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

from study import files
from study.calibration import RELIABILITY, RUN_FIGURES
from study.config import METRIC, TIMINGS, flatten, from_params
from study.files import EPOCHS_FILE, TRIALS_FILE
from study.statuses import DEAD, ORPHANED, UNFINISHED

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
ORPHAN_MESSAGE = (
    "its driver died before Tune saved this trial in its state; Tune does not run it on, "
    "and a new trial takes its share"
)


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


def _ignore(*args, **kwargs) -> None:
    return None


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
        # The tables on disk are what the study has reported so far (a resumed study).
        self._load()
        self.reconciled = False

    def on_step_begin(self, iteration, trials, **info):
        """At a resumed study's first step, closes each trial the tables hold as unfinished
        but Tune's restored state does not know: the driver died after it recorded the
        trial and before Tune saved its state. Tune never runs it on, and its share goes
        to a new trial; it is closed as orphaned, never left running."""
        if getattr(self, "reconciled", True):
            return
        self.reconciled = True
        known = {trial.trial_id for trial in trials}
        orphans = [
            row
            for row in self.trials.values()
            if row.get("status") in UNFINISHED and row["trial_id"] not in known
        ]
        for row in orphans:
            row.update(status=ORPHANED, ended_at=time.time(), message=ORPHAN_MESSAGE)
        if orphans:
            self._save()

    def __setstate__(self, state):
        # Each run of the driver makes its recorder (study/tuning.py's this_run). One
        # unpickled from Tune's state is from a study begun before that: it records
        # nothing, or every result would be written twice.
        self.__dict__.update(state)
        for hook in ("setup", *(name for name in dir(tune.Callback) if name.startswith("on_"))):
            setattr(self, hook, _ignore)

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
        files.write_csv(self.results_dir / TRIALS_FILE, list(self.trials.values()))
        files.write_csv(self.results_dir / EPOCHS_FILE, self.epochs)

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
        for key in ("test_accuracy", "test_loss", *RUN_FIGURES, RELIABILITY):
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
