"""The study's comparison tables, from its own files: what a study compares, the
per-value comparison at the full budget, where the dead trials were, and where the
trials' time went. The end of a study prints them, the report and the notebook show them:
base layer, no Ray, no Keras."""

import math
from pathlib import Path

import numpy as np
import pandas as pd

from study.config import COMPILE_SECONDS, METRIC, STARTUP_SECONDS
from study.statuses import COMPLETED, DEAD, DIVERGED, ORPHANED

BEST = f"best_{METRIC}"


def read_table(path: Path) -> pd.DataFrame:
    """A study's CSV table, or an empty frame where there is none (yet)."""
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    return pd.read_csv(path, dtype={"trial_id": str, "gpu_ids": str, "config_id": str})


def compared_key(search) -> str:
    """What the study compares: the key it stratified by, else the loss."""
    return search.stratify or "loss.name"


def compared_values(search) -> list:
    """The compared key's values in the search space (some may have no trial yet)."""
    entry = search.space.get(compared_key(search))
    return list(entry.choice) if entry is not None and entry.kind == "choice" else []


def full_budget(trials: pd.DataFrame, max_epochs: int) -> pd.DataFrame:
    """The trials that completed every epoch with a result: the only ones compared (ASHA's
    early-stopped, diverged and failed trials are left out)."""
    done = trials[(trials.status == COMPLETED) & (trials.epochs_run >= max_epochs)]
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
                "diverged": int((group.status == DIVERGED).sum()),
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
    counts = [(row.get(status, 0), status) for status in (DIVERGED, DEAD)]
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
