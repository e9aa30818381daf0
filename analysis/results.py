"""Reads a study's results folder: the files the study wrote, never live Ray state.

Works on a folder copied from a cluster, with no Ray running. What is missing (no
finished trial yet, no checkpoints, no Optuna study) is noted, not fatal.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from study.config import METRIC, row_config
from study.confirm import CONFIRM_FILE, summary
from study.search_config import StudyConfig, load_study

# The 2020 notebook's test accuracies, one run each, measured on the set it validated on.
NOTEBOOK = {
    "categorical_crossentropy": 0.5275,
    "mean_squared_logarithmic_error": 0.4608,
    "hinge": 0.0897,
}
BEST = f"best_{METRIC}"


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
        """Trials that ran every epoch: ASHA's early-stopped ones are left out."""
        return self.reported[self.reported.epochs_run >= self.max_epochs]


def load(folder: str | Path) -> StudyResults:
    folder = Path(folder)
    if not folder.is_dir():
        raise AnalysisError(f"{folder}: no such folder")
    missing = [n for n in ("config.yaml", "trials.csv") if not (folder / n).is_file()]
    if missing:
        raise AnalysisError(f"{folder}: not a study's results folder (no {', '.join(missing)})")
    config = load_study(folder / "config.yaml")
    trials = _read_csv(folder / "trials.csv")
    if trials.empty:
        raise AnalysisError(f"{folder}: trials.csv lists no trials")
    epochs = _read_csv(folder / "epochs.csv")
    if BEST not in trials:
        trials[BEST] = np.nan
    confirm = _read_csv(folder / CONFIRM_FILE)
    results = StudyResults(folder, config, trials, epochs, confirm=confirm)
    _note_gaps(results)
    return results


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_csv(path, dtype={"trial_id": str, "gpu_ids": str, "config_id": str})


def _note_gaps(results: StudyResults) -> None:
    statuses = results.trials.status.value_counts().to_dict()
    unfinished = statuses.get("running", 0) + statuses.get("pending", 0)
    unfinished += statuses.get("restarting", 0)
    if unfinished:
        results.notes.append(f"{unfinished} trials were still running: this report is partial.")
    if len(results.trials) < results.config.search.num_samples:
        results.notes.append(
            f"{len(results.trials)} of {results.config.search.num_samples} trials have started."
        )
    if results.reported.empty:
        results.notes.append("No trial has reported an epoch yet.")
    elif results.full_budget.empty:
        results.notes.append("No trial has run the full epoch budget yet.")


def confirmation(results: StudyResults) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per loss, mean test accuracy over seeds with its 95% interval; and the differences
    to cross-entropy (study/confirm.py). Both empty before a confirmation has run."""
    if results.confirm.empty:
        return pd.DataFrame(), pd.DataFrame()
    return summary(results.confirm)


def leaderboard(results: StudyResults) -> pd.DataFrame:
    """Per loss: the best trial by validation accuracy, and the mean and spread over trials
    that share its configuration (several seeds, or repeats). After a confirmation, its
    test accuracy over seeds, with the 95% interval."""
    reported = results.reported
    if reported.empty:
        return pd.DataFrame()
    data = results.config.trial.data
    # The notebook's numbers are CIFAR-100 (fine labels): no comparison on other data.
    notebook = NOTEBOOK if (data.dataset, data.label_mode) == ("cifar100", "fine") else {}
    keys = [k for k in results.searched if k in reported and k != "seed"]
    rows = []
    for loss, group in reported.groupby("loss.name"):
        best = group.loc[group[BEST].idxmax()]
        same = group
        for key in keys:
            same = same[(same[key] == best[key]) | (same[key].isna() & pd.isna(best[key]))]
        rows.append(
            {
                "loss": loss,
                "trials": len(group),
                "best_trial": best.trial_id,
                BEST: best[BEST],
                "runs_of_best_config": len(same),
                f"mean_{METRIC}": same[BEST].mean(),
                f"std_{METRIC}": same[BEST].std(ddof=1) if len(same) > 1 else np.nan,
                "notebook_test_accuracy": notebook.get(loss, np.nan),
            }
        )
    board = pd.DataFrame(rows)
    confirmed, _ = confirmation(results)
    if not confirmed.empty:
        confirmed = confirmed.rename(
            columns={
                "config_id": "confirmed_config",
                "ci_low": "test_ci_low",
                "ci_high": "test_ci_high",
            }
        ).drop(columns=["mean_val_accuracy"])
        board = board.merge(confirmed, on="loss", how="left")
    return board.sort_values(BEST, ascending=False, ignore_index=True)


def best_trial(results: StudyResults) -> pd.Series | None:
    reported = results.reported
    return None if reported.empty else reported.loc[reported[BEST].idxmax()]


def trial_config(results: StudyResults, trial_id: str) -> dict:
    """A trial's full config, as its trials.csv row records it (dotted keys)."""
    row = results.trials.set_index("trial_id").loc[trial_id]
    config = row_config(results.config.trial.to_dict(), row)
    flat = {}
    for section, values in config.items():
        if isinstance(values, dict):
            flat |= {f"{section}.{key}": value for key, value in values.items()}
        else:
            flat[section] = values
    return flat


def latest_checkpoint(results: StudyResults, trial_id: str) -> Path | None:
    """The trial's newest `checkpoint_*/model.keras`, if Ray kept one in this folder."""
    checkpoints = sorted(
        (results.folder / f"trial_{trial_id}").glob("checkpoint_*/model.keras"),
        key=lambda p: p.parent.name,
    )
    return checkpoints[-1] if checkpoints else None


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
