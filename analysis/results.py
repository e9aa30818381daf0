"""Reads a study's results folder: the files the study wrote, never live Ray state.

Works on a folder copied from a cluster, with no Ray running. What is missing (no
finished trial yet, no checkpoints, no Optuna study) is noted, not fatal.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from analysis.confirmation import read_confirm, summary
from study import storage
from study.config import (
    COMPILE_SECONDS,
    METRIC,
    STARTUP_SECONDS,
    ConfigError,
    config_values,
    flatten,
    from_params,
)
from study.confirm import reference_value
from study.results import CONFIRM_FILE, STUDY_FILES
from study.search_config import StudyConfig, load_study
from study.statuses import DEAD, ORPHANED

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
        entry = self.config.search.space.get(self.key)
        return list(entry.choice) if entry is not None and entry.kind == "choice" else []


def load(folder: str | Path) -> StudyResults:
    """A study's results from its folder, or from its bucket (`s3://BUCKET/PATH/NAME`),
    whose files are fetched first into results/NAME here (study/storage.py)."""
    source = str(folder)
    if storage.is_uri(source):
        folder = _fetched(source)
    folder = Path(folder)
    if not folder.is_dir():
        raise AnalysisError(f"{folder}: no such folder")
    missing = [n for n in ("config.yaml", "trials.csv") if not (folder / n).is_file()]
    if missing:
        raise AnalysisError(f"{folder}: not a study's results folder (no {', '.join(missing)})")
    config = load_study(folder / "config.yaml")
    trials = read_table(folder / "trials.csv")
    if trials.empty:
        raise AnalysisError(f"{folder}: trials.csv lists no trials")
    epochs = read_table(folder / "epochs.csv")
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
        if (folder / "config.yaml").is_file() and (folder / "trials.csv").is_file()
    }
    if not studies:
        looked = ", ".join(str(Path(root)) for root in roots)
        raise AnalysisError(f"no study in {looked}; give the study's folder or its bucket")
    return max(studies, key=lambda folder: (folder / "trials.csv").stat().st_mtime)


def _fetched(uri: str) -> Path:
    """The study at `uri`, its own files fetched into its local folder."""
    try:
        storage.check(uri, "the study")
        folder = storage.local_folder(uri)
        storage.fetch(uri, folder, STUDY_FILES)
    except (ConfigError, OSError) as error:
        raise AnalysisError(str(error).splitlines()[0]) from None
    if not (folder / "config.yaml").is_file():
        raise AnalysisError(f"{uri}: not a study's results folder (no config.yaml)")
    return folder


def read_table(path: Path) -> pd.DataFrame:
    """A study's CSV table, or an empty frame where there is none (yet)."""
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_csv(path, dtype={"trial_id": str, "gpu_ids": str, "config_id": str})


def _note_gaps(results: StudyResults) -> None:
    statuses = results.trials.status.value_counts().to_dict()
    unfinished = statuses.get("running", 0) + statuses.get("pending", 0)
    unfinished += statuses.get("restarting", 0)
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


def compared_key(search) -> str:
    """What the study compares: the key it stratified by, else the loss."""
    return search.stratify or "loss.name"


def full_budget(trials: pd.DataFrame, max_epochs: int) -> pd.DataFrame:
    """The trials that completed every epoch with a result: the only ones compared (ASHA's
    early-stopped, diverged and failed trials are left out)."""
    done = trials[(trials.status == "completed") & (trials.epochs_run >= max_epochs)]
    return done.dropna(subset=[BEST])


def comparison(trials: pd.DataFrame, key: str, max_epochs: int, values=()) -> pd.DataFrame:
    """Per value of `key` (the loss, or what the study stratified by): its trials, those
    that ran the full budget, the epochs it spent, and its best full-budget trial with
    that trial's best validation accuracy. Values with a full-budget trial are ranked by
    it; the others follow, unranked (rank empty): an early-stopped or diverged trial has
    not been compared. `values` lists values that may have no trial at all."""
    rows = []
    # An orphaned trial is not one of the study's (study/statuses.py): its share went to
    # another trial.
    trials = trials[trials.status != ORPHANED] if "status" in trials else trials
    for value in dict.fromkeys([*values, *trials.get(key, pd.Series(dtype=object))]):
        group = trials[trials[key] == value] if key in trials else trials.iloc[:0]
        full = full_budget(group, max_epochs)
        best = full.loc[full[BEST].idxmax()] if len(full) else None
        rows.append(
            {
                key: value,
                "trials": len(group),
                "full_budget_trials": len(full),
                "diverged": int((group.status == "diverged").sum()),
                "dead": int((group.status == DEAD).sum()),
                "epochs_spent": int(group.epochs_run.fillna(0).sum()),
                "best_trial": None if best is None else best.trial_id,
                BEST: np.nan if best is None else float(best[BEST]),
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table.assign(rank=pd.Series(dtype=float))
    ranked = table[table.full_budget_trials > 0].sort_values(BEST, ascending=False)
    ranked = ranked.assign(rank=np.arange(1, len(ranked) + 1))
    unranked = table[table.full_budget_trials == 0].assign(rank=np.nan)
    table = pd.concat([ranked, unranked], ignore_index=True)
    return table[["rank", *rows[0]]]


def ended_without_result(row: dict) -> str:
    """How many of a comparison row's trials diverged or died, in words ('' for none)."""
    counts = [(row.get(status, 0), status) for status in ("diverged", DEAD)]
    return ", ".join(f"{count} {status}" for count, status in counts if count)


def learning_rate_band(rate: float) -> str:
    """The decade a learning rate lies in, as [1e-04, 1e-03)."""
    low = math.floor(math.log10(rate) + 1e-9)
    return f"[{10.0**low:.0e}, {10.0 ** (low + 1):.0e})"


def dead_by_band(trials: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer and learning-rate decade, the trials and how many of them died (their
    network learned nothing: study/health.py); only the groups with a dead trial."""
    columns = ["optimizer.name", "optimizer.learning_rate"]
    if trials.empty or "status" not in trials or not set(columns) <= set(trials):
        return pd.DataFrame(columns=["optimizer", "learning_rate_band", "trials", DEAD])
    bands = trials.assign(
        optimizer=trials["optimizer.name"],
        learning_rate_band=trials["optimizer.learning_rate"].map(learning_rate_band),
        is_dead=trials.status == DEAD,
    )
    table = bands.groupby(["optimizer", "learning_rate_band"], sort=True).agg(
        trials=("is_dead", "size"), dead=("is_dead", "sum")
    )
    return table[table[DEAD] > 0].reset_index().rename(columns={"dead": DEAD})


def format_dead(trials: pd.DataFrame) -> str | None:
    """One line on where the dead trials were, by optimizer and learning rate; None if
    none died."""
    table = dead_by_band(trials)
    if table.empty:
        return None
    groups = "; ".join(
        f"{row['optimizer']} {row['learning_rate_band']}: {row[DEAD]} of {row['trials']}"
        for row in table.to_dict("records")
    )
    return f"dead trials (learned nothing) by optimizer and learning rate: {groups}"


def time_shares(trials: pd.DataFrame, epochs: pd.DataFrame) -> dict | None:
    """Where the trials' time went: starting (each process's start to its first step),
    compiling (each first epoch's time beyond a steady one) and training (the rest of the
    epochs, validation included), in seconds summed over trials; None before any epoch."""
    if epochs.empty or "epoch_seconds" not in epochs:
        return None
    starting = float(trials.get(STARTUP_SECONDS, pd.Series(dtype=float)).sum())
    compiling = float(trials.get(COMPILE_SECONDS, pd.Series(dtype=float)).sum())
    epoch_seconds = float(epochs.epoch_seconds.sum())
    return {
        "starting": starting,
        "compiling": compiling,
        "training": max(epoch_seconds - compiling, 0.0),
    }


def format_time_shares(trials: pd.DataFrame, epochs: pd.DataFrame) -> str | None:
    """The shares of `time_shares` in one line."""
    shares = time_shares(trials, epochs)
    if shares is None:
        return None
    total = sum(shares.values())
    parts = ", ".join(f"{name} {seconds / total:.0%}" for name, seconds in shares.items())
    return (
        f"trial time: {total:,.0f} s over {len(trials)} trials: {parts} (starting: a trial's "
        "process start to its first step; compiling: its first epoch beyond its second)"
    )


def format_comparison(table: pd.DataFrame, key: str, max_epochs: int) -> str:
    """The comparison as the study prints it at its end."""
    ranked = table[table["rank"].notna()]
    lines = [f"Per {key}, ranked by the best {METRIC} of a trial that ran all {max_epochs} epochs:"]
    if not ranked.empty:
        shown = ranked.assign(rank=ranked["rank"].astype(int))
        lines.append(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for row in table[table["rank"].isna()].to_dict("records"):
        value, trials = row[key], row["trials"]
        why = "no trial" if trials == 0 else f"{trials} trials, none ran all {max_epochs} epochs"
        if lost := ended_without_result(row):
            why += f" ({lost})"
        lines.append(f"not ranked: {value}: {why}")
    return "\n".join(lines)


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
        if not (local / "model.keras").is_file():
            storage.fetch_folder(storage.join(trial, names[-1]), local)
        return local / "model.keras"
    checkpoints = sorted(
        (results.folder / f"trial_{trial_id}").glob("checkpoint_*/model.keras"),
        key=lambda p: p.parent.name,
    )
    return checkpoints[-1] if checkpoints else None


def dump(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False)
