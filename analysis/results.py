"""Reads a study's results folder: the files the study wrote, never live Ray state.

Works on a folder copied from a cluster, with no Ray running. What is missing (no
finished trial yet, no checkpoints, no Optuna study) is noted, not fatal.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from study import storage
from study.config import ConfigError, config_values, flatten, from_params
from study.confirmation import read_confirm, reference_value, summary
from study.files import (
    CONFIG_FILE,
    CONFIRM_FILE,
    EPOCHS_FILE,
    MODEL_FILE,
    STUDY_FILES,
    TRIALS_FILE,
)
from study.search_config import StudyConfig, load_study
from study.statuses import ORPHANED, UNFINISHED
from study.tables import (  # noqa: F401  The comparison tables, as this module gave them.
    BEST,
    compared_key,
    compared_values,
    comparison,
    dead_by_band,
    ended_without_result,
    format_comparison,
    format_dead,
    format_time_shares,
    full_budget,
    read_table,
    time_shares,
)

# The 2020 notebook's test accuracies, one run each, measured on the set it validated on.
NOTEBOOK = {
    "categorical_crossentropy": 0.5275,
    "mean_squared_logarithmic_error": 0.4608,
    "hinge": 0.0897,
}


class AnalysisError(ValueError):
    """A folder that holds no study; the message is one line."""


@dataclass
class StudyResults:
    """What a study wrote, as tables."""

    folder: Path
    config: StudyConfig
    trials: pd.DataFrame
    epochs: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    # confirm.csv: the confirmation phase's runs over seeds, with test metrics; or empty.
    confirm: pd.DataFrame = field(default_factory=pd.DataFrame)
    # Where the study lives: `folder`, or the bucket whose files `folder` holds a copy of.
    source: str = ""

    @property
    def max_epochs(self) -> int:
        return self.config.trial.training.epochs

    @property
    def searched(self) -> list[str]:
        return list(self.config.search.space)

    @property
    def reported(self) -> pd.DataFrame:
        """Trials that reported at least one epoch."""
        return self.trials.dropna(subset=[BEST])

    @property
    def full_budget(self) -> pd.DataFrame:
        return full_budget(self.trials, self.max_epochs)

    @property
    def key(self) -> str:
        """What the study compares: the key it stratified by, else the loss."""
        return compared_key(self.config.search)

    @property
    def values(self) -> list:
        """The compared key's values in the search space (some may have no trial)."""
        return compared_values(self.config.search)


def load(folder: str | Path) -> StudyResults:
    """A study's results from its folder, or from its bucket (`s3://BUCKET/PATH/NAME`),
    whose files are fetched first into results/NAME here (study/storage.py)."""
    source = str(folder)
    if storage.is_uri(source):
        folder = _fetched(source)
    folder = Path(folder)
    if not folder.is_dir():
        raise AnalysisError(f"{folder}: no such folder")
    missing = [n for n in (CONFIG_FILE, TRIALS_FILE) if not (folder / n).is_file()]
    if missing:
        raise AnalysisError(f"{folder}: not a study's results folder (no {', '.join(missing)})")
    config = load_study(folder / CONFIG_FILE)
    trials = read_table(folder / TRIALS_FILE)
    if trials.empty:
        raise AnalysisError(f"{folder}: trials.csv lists no trials")
    epochs = read_table(folder / EPOCHS_FILE)
    if BEST not in trials:
        trials[BEST] = np.nan
    confirm = read_confirm(folder / CONFIRM_FILE)
    results = StudyResults(folder, config, trials, epochs, confirm=confirm, source=source)
    _note_gaps(results)
    return results


def newest_study(roots=None) -> Path:
    """The study most recently written to under a results/ folder: the one where the
    command runs, the one beside it (a notebook opened from analysis/ runs there), and
    the project's own. What the notebook opens when it is given no study."""
    project = Path(__file__).resolve().parents[1]
    roots = roots or [Path.cwd() / "results", Path.cwd().parent / "results", project / "results"]
    studies = {
        folder.resolve()
        for root in roots
        for folder in (Path(root).glob("*") if Path(root).is_dir() else [])
        if (folder / CONFIG_FILE).is_file() and (folder / TRIALS_FILE).is_file()
    }
    if not studies:
        looked = ", ".join(str(Path(root)) for root in roots)
        raise AnalysisError(f"no study in {looked}; give the study's folder or its bucket")
    return max(studies, key=lambda folder: (folder / TRIALS_FILE).stat().st_mtime)


def _fetched(uri: str) -> Path:
    """The study at `uri`, its own files fetched into its local folder."""
    try:
        storage.check(uri, "the study")
        folder = storage.local_folder(uri)
        storage.fetch(uri, folder, STUDY_FILES)
    except (ConfigError, OSError) as error:
        raise AnalysisError(str(error).splitlines()[0]) from None
    if not (folder / CONFIG_FILE).is_file():
        raise AnalysisError(f"{uri}: not a study's results folder (no config.yaml)")
    return folder


def _note_gaps(results: StudyResults) -> None:
    statuses = results.trials.status.value_counts().to_dict()
    unfinished = sum(statuses.get(status, 0) for status in UNFINISHED)
    if unfinished:
        results.notes.append(f"{unfinished} trials were still running: this report is partial.")
    orphaned = statuses.get(ORPHANED, 0)
    started = len(results.trials) - orphaned
    if started < results.config.search.num_samples:
        results.notes.append(
            f"{started} of {results.config.search.num_samples} trials have started."
        )
    if orphaned:
        results.notes.append(
            f"{orphaned} trials are orphaned: recorded by a driver that died before Tune "
            "saved them; each one's share went to a new trial, and they are not compared."
        )
    if results.reported.empty:
        results.notes.append("No trial has reported an epoch yet.")
    elif results.full_budget.empty:
        results.notes.append("No trial has run the full epoch budget yet.")


def confirmation(results: StudyResults) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per compared value, mean test accuracy over seeds with its 95% interval; and the
    differences to the reference (study/confirm.py). Both empty before a confirmation."""
    if results.confirm.empty:
        return pd.DataFrame(), pd.DataFrame()
    return summary(results.confirm, results.key, reference_value(results.config, results.key))


def leaderboard(results: StudyResults) -> pd.DataFrame:
    """The comparison of what the study compares (`comparison`: per value, its trials,
    full-budget trials, epochs spent and best full-budget trial); beside the losses of a
    CIFAR-100 study the notebook's figures; after a confirmation, each value's mean test
    accuracy over seeds with its 95% interval."""
    key = results.key
    board = comparison(results.trials, key, results.max_epochs, results.values)
    data = results.config.trial.data
    if key == "loss.name" and (data.dataset, data.label_mode) == ("cifar100", "fine"):
        # The notebook's numbers are CIFAR-100 (fine labels): no comparison on other data.
        board["notebook_test_accuracy"] = [NOTEBOOK.get(loss, np.nan) for loss in board[key]]
    confirmed, _ = confirmation(results)
    if not confirmed.empty:
        confirmed = confirmed.rename(
            columns={
                "config_id": "confirmed_config",
                "ci_low": "test_ci_low",
                "ci_high": "test_ci_high",
            }
        ).drop(columns=["mean_val_accuracy"])
        board = board.merge(confirmed, on=key, how="left")
    return board


def best_trial(results: StudyResults) -> pd.Series | None:
    """The best full-budget trial of the study, else the best trial that reported."""
    trials = results.full_budget if not results.full_budget.empty else results.reported
    return None if trials.empty else trials.loc[trials[BEST].idxmax()]


def trial_config(results: StudyResults, trial_id: str) -> dict:
    """The config a trial trained with, as dotted keys: its trials.csv row over the base."""
    row = results.trials.set_index("trial_id").loc[trial_id]
    base = results.config.trial.to_dict()
    return flatten(from_params(config_values(row, base), base).to_dict())


def latest_checkpoint(results: StudyResults, trial_id: str) -> Path | None:
    """The trial's newest `checkpoint_*/model.keras`, if Ray kept one in this folder (or
    in the study's bucket, fetched from there)."""
    if storage.is_uri(results.source):
        trial = storage.join(results.source, f"trial_{trial_id}")
        names = [name for name in storage.listing(trial) if name.startswith("checkpoint_")]
        if not names:
            return None
        local = results.folder / f"trial_{trial_id}" / names[-1]
        if not (local / MODEL_FILE).is_file():
            storage.fetch_folder(storage.join(trial, names[-1]), local)
        return local / MODEL_FILE
    checkpoints = sorted(
        (results.folder / f"trial_{trial_id}").glob("checkpoint_*/model.keras"),
        key=lambda p: p.parent.name,
    )
    return checkpoints[-1] if checkpoints else None


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
