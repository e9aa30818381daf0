"""The confirmation's answer, from confirm.csv: per compared value (the loss, or the key
the study stratified by) the mean test accuracy over seeds with its 95% t interval, and
each value's difference to the reference with Welch's interval, Bonferroni-corrected for
the number of differences. `python -m study.run --confirm` prints it; the report and the
leaderboard show it."""

from pathlib import Path

import numpy as np
import pandas as pd

from analysis import stats

REFERENCE_LOSS = "categorical_crossentropy"  # The baseline's loss: what others are compared to.
# How a run can end without a result: its seeds are listed, not averaged.
LOST = ("diverged", "dead")


def lost_seeds(row: dict) -> int:
    return sum(int(row.get(f"{status}_seeds", 0) or 0) for status in LOST)


def lost_text(row: dict) -> str:
    """The seeds a summary row lost, in words: "1 diverged, 2 dead"."""
    counts = [(int(row.get(f"{status}_seeds", 0) or 0), status) for status in LOST]
    return ", ".join(f"{count} {status}" for count, status in counts if count)


def read_confirm(path: Path) -> pd.DataFrame:
    """confirm.csv; files written before it named the compared key say `loss`."""
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    confirm = pd.read_csv(path, dtype={"config_id": str, "trial_id": str})
    return confirm.rename(columns={"loss": "loss.name"})


def summary(
    confirm: pd.DataFrame, key: str = "loss.name", reference=REFERENCE_LOSS
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per compared value: its configuration with the best mean validation accuracy over
    seeds, and that configuration's mean test accuracy with a 95% t interval. Then each
    value's difference to `reference` (or to the best value), with Welch's interval,
    Bonferroni-corrected for the number of differences: together they hold with 95%
    confidence, so `resolved` (the interval excludes 0) keeps its meaning however many
    values are compared."""
    done = confirm[confirm.status == "completed"].dropna(subset=["test_accuracy"])
    lost_runs = confirm[confirm.status.isin(LOST)]
    rows, runs = [], {}
    for value, group in confirm.groupby(key, sort=False):
        finished = done[done[key] == value]
        if finished.empty:  # Every seed was lost (or none has finished): no mean to give.
            config_id = group.config_id.iloc[0]
            chosen, mean, low, high = finished, np.nan, np.nan, np.nan
        else:
            by_config = finished.groupby("config_id", sort=False).val_accuracy.mean()
            config_id = by_config.idxmax()  # Chosen by validation: the test set only reports.
            chosen = finished[finished.config_id == config_id]
            mean, low, high = stats.mean_interval(chosen.test_accuracy)
            runs[value] = chosen.test_accuracy.to_numpy()
        lost = lost_runs[(lost_runs[key] == value) & (lost_runs.config_id == config_id)]
        if finished.empty and lost.empty:
            continue
        rows.append(
            {
                key: value,
                "config_id": config_id,
                "seeds": len(chosen),
                # A diverged or dead seed has no test accuracy: not in the mean, but said.
                **{f"{status}_seeds": int((lost.status == status).sum()) for status in LOST},
                "mean_val_accuracy": chosen.val_accuracy.mean(),
                "mean_test_accuracy": mean,
                "ci_low": low,
                "ci_high": high,
            }
        )
    table = pd.DataFrame(rows)
    if table.empty:
        return table, pd.DataFrame()
    table = table.sort_values(
        "mean_test_accuracy", ascending=False, na_position="last", ignore_index=True
    )
    if not runs:
        return table, pd.DataFrame()
    reference = reference if reference in runs else table[key].iloc[0]
    others = [value for value in table[key] if value != reference and value in runs]
    level = 1 - (1 - stats.LEVEL) / max(len(others), 1)  # Bonferroni.
    differences = []
    for value in others:
        difference, low, high, p = stats.welch_difference(runs[value], runs[reference], level)
        differences.append(
            {
                key: value,
                "versus": reference,
                "difference": difference,
                "ci_low": low,
                "ci_high": high,
                "p_value": p,
                "p_bonferroni": float(np.minimum(1.0, p * len(others))),
                "resolved": bool(low > 0 or high < 0),  # NaN compares False: not resolved.
            }
        )
    return table, pd.DataFrame(differences)


def format_summary(table: pd.DataFrame, differences: pd.DataFrame, key="loss.name") -> str:
    if table.empty:
        return "no confirmation run has finished"
    lines = [f"Test accuracy per {key}, mean over seeds with its {stats.LEVEL:.0%} interval:"]
    for row in table.to_dict("records"):
        lost = lost_seeds(row)
        if not row["seeds"]:
            kinds = [status for status in LOST if row.get(f"{status}_seeds")]
            how = f"lost ({lost_text(row)})"
            if len(kinds) == 1:
                how = f"{kinds[0]} ({lost} of {lost})"
            lines.append(f"  {row[key]!s:32s} every seed {how}, config {row['config_id']}")
            continue
        interval = f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
        if row["seeds"] == 1:
            interval = "[no interval: one seed]"
        elif np.isnan(row["ci_low"]):  # All seeds alike: no spread to estimate from.
            interval = "[no interval: every seed gave the same]"
        seeds = f"{row['seeds']} seed{'s' * (row['seeds'] > 1)}" + (
            f", {lost_text(row)} (not in the mean)" if lost else ""
        )
        lines.append(
            f"  {row[key]!s:32s} {row['mean_test_accuracy']:.4f}  {interval}  "
            f"{seeds}, config {row['config_id']}"
        )
    if not differences.empty:
        lines.append(
            f"Differences, with Welch's intervals Bonferroni-corrected for {len(differences)} "
            f"comparisons (together {stats.LEVEL:.0%}):"
        )
    for row in differences.to_dict("records"):
        verdict = "resolved" if row["resolved"] else "not resolved (the interval holds 0)"
        lines.append(
            f"  {row[key]} - {row['versus']}: {row['difference']:+.4f} [{row['ci_low']:+.4f}, "
            f"{row['ci_high']:+.4f}], {verdict}"
        )
    return "\n".join(lines)
