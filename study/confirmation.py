"""The confirmation's answer, from confirm.csv: per compared value (the loss, or the key
the study stratified by) the mean test accuracy over seeds with its 95% t interval, and
each value's difference to the reference with Welch's interval, Bonferroni-corrected for
the number of differences. `python -m study.run --confirm` prints it; the report and the
leaderboard show it."""

from pathlib import Path

import numpy as np
import pandas as pd

from study import stats
from study.files import EPOCHS_TO_90

REFERENCE_LOSS = "categorical_crossentropy"  # The baseline's loss: what others are compared to.
# How a run can end without a result: its seeds are listed, not averaged.
LOST = ("diverged", "dead")


def lost_seeds(row: dict) -> int:
    return sum(int(row.get(f"{status}_seeds", 0) or 0) for status in LOST)


def lost_text(row: dict) -> str:
    """The seeds a summary row lost, in words: "1 diverged, 2 dead"."""
    counts = [(int(row.get(f"{status}_seeds", 0) or 0), status) for status in LOST]
    return ", ".join(f"{count} {status}" for count, status in counts if count)


def reference_value(study, key: str):
    """What every other value is compared with: the baseline's value of the key (for the
    loss, cross-entropy where there is no baseline); None: the best."""
    return study.search.baseline.get(key, REFERENCE_LOSS if key == "loss.name" else None)


def read_confirm(path: Path) -> pd.DataFrame:
    """confirm.csv; files written before it named the compared key say `loss`."""
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    confirm = pd.read_csv(path, dtype={"config_id": str, "trial_id": str})
    return confirm.rename(columns={"loss": "loss.name"})


def chosen_runs(confirm: pd.DataFrame, key: str = "loss.name") -> dict:
    """Per compared value: (its configuration with the best mean validation accuracy over
    seeds, that configuration's finished runs, its lost runs). Chosen by validation: the
    test set only reports."""
    done = confirm[confirm.status == "completed"].dropna(subset=["test_accuracy"])
    lost_runs = confirm[confirm.status.isin(LOST)]
    chosen = {}
    for value, group in confirm.groupby(key, sort=False):
        finished = done[done[key] == value]
        if finished.empty:  # Every seed was lost (or none has finished): no mean to give.
            config_id = group.config_id.iloc[0]
        else:
            config_id = finished.groupby("config_id", sort=False).val_accuracy.mean().idxmax()
        runs = finished[finished.config_id == config_id]
        lost = lost_runs[(lost_runs[key] == value) & (lost_runs.config_id == config_id)]
        if not (runs.empty and lost.empty):
            chosen[value] = (config_id, runs, lost)
    return chosen


def corrected_differences(samples: dict, reference, key: str, order) -> pd.DataFrame:
    """Each value's difference to `reference` (or, where it has no runs, to the first of
    `order`) with Welch's interval, Bonferroni-corrected for the number of differences:
    together they hold with 95% confidence, so `resolved` (the interval excludes 0) keeps
    its meaning however many values are compared."""
    if not samples:
        return pd.DataFrame()
    reference = reference if reference in samples else next(v for v in order if v in samples)
    others = [value for value in order if value != reference and value in samples]
    level = 1 - (1 - stats.LEVEL) / max(len(others), 1)  # Bonferroni.
    rows = []
    for value in others:
        difference, low, high, p = stats.welch_difference(samples[value], samples[reference], level)
        rows.append(
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
    return pd.DataFrame(rows)


def summary(
    confirm: pd.DataFrame, key: str = "loss.name", reference=REFERENCE_LOSS
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per compared value: its chosen configuration (`chosen_runs`) and that
    configuration's mean test accuracy over seeds with a 95% t interval; then each value's
    difference to `reference` (`corrected_differences`)."""
    rows, samples = [], {}
    for value, (config_id, runs, lost) in chosen_runs(confirm, key).items():
        mean, low, high = stats.mean_interval(runs.test_accuracy)
        if not runs.empty:
            samples[value] = runs.test_accuracy.to_numpy()
        rows.append(
            {
                key: value,
                "config_id": config_id,
                "seeds": len(runs),
                # A diverged or dead seed has no test accuracy: not in the mean, but said.
                **{f"{status}_seeds": int((lost.status == status).sum()) for status in LOST},
                "mean_val_accuracy": runs.val_accuracy.mean(),
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
    return table, corrected_differences(samples, reference, key, list(table[key]))


# What the confirmation reports beside accuracy, per run of confirm.csv: calibration on
# the test set (study/calibration.py) and how fast the run learned. Lower is better for
# each but the temperature, which only says how over-confident (> 1) the scores were.
BESIDE_ACCURACY = {
    "test_ece": "ECE (15 bins)",
    "test_nll": "NLL",
    "test_brier": "Brier",
    "temperature": "temperature",
    "test_ece_scaled": "ECE after temperature scaling",
    "test_nll_scaled": "NLL after temperature scaling",
    EPOCHS_TO_90: "epochs to 90% of final val accuracy",
}


# Why a config that validates on the test set (configs/seed.yaml) has no scaled figures.
NO_SPLIT = (
    "this study validates on the test set, so there is no split to fit a temperature on "
    "without fitting it to the test set itself"
)


def calibration_summary(
    confirm: pd.DataFrame, key: str = "loss.name", reference=REFERENCE_LOSS
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """For each figure of BESIDE_ACCURACY present in `confirm`, per compared value: the mean
    over the chosen configuration's seeds with its 95% t interval (rows `key`, `figure`,
    `mean`, `ci_low`, `ci_high`, `seeds`); and each value's difference to `reference`,
    Bonferroni-corrected as accuracy's are. A figure no run has (the scaled ones of a
    config that validates on the test set: no split to fit a temperature on) is left
    out."""
    chosen = chosen_runs(confirm, key)
    rows, differences = [], []
    for figure in BESIDE_ACCURACY:
        if figure not in confirm or confirm[figure].isna().all():
            continue
        samples = {}
        for value, (_, runs, _) in chosen.items():
            values = runs[figure].dropna().to_numpy(dtype=float)
            if not len(values):
                continue
            samples[value] = values
            mean, low, high = stats.mean_interval(values)
            rows.append({key: value, "figure": figure, "mean": mean, "ci_low": low,
                         "ci_high": high, "seeds": len(values)})  # fmt: skip
        found = corrected_differences(samples, reference, key, list(chosen))
        if not found.empty:
            differences.append(found.assign(figure=figure))
    table = pd.DataFrame(rows)
    found = pd.concat(differences, ignore_index=True) if differences else pd.DataFrame()
    return table, found


def format_calibration(table: pd.DataFrame, differences: pd.DataFrame, key="loss.name") -> str:
    """The calibration and speed figures per value, each with its interval, then the
    differences that are resolved."""
    if table.empty:
        return ""
    lines = [
        f"Beside accuracy, per {key} (test set; mean over seeds with its "
        f"{stats.LEVEL:.0%} interval; lower is better but for the temperature):"
    ]
    for figure, rows in table.groupby("figure", sort=False):
        lines.append(f"  {BESIDE_ACCURACY[figure]}:")
        for row in rows.to_dict("records"):
            interval = (
                "[no interval]"
                if np.isnan(row["ci_low"])
                else f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
            )
            lines.append(f"    {row[key]!s:32s} {row['mean']:.4f}  {interval}")
    resolved = differences[differences.resolved] if not differences.empty else differences
    if not differences.empty:
        lines.append(
            "  Resolved differences (Welch, Bonferroni-corrected per figure, together 95%): "
            + (
                "; ".join(
                    f"{BESIDE_ACCURACY[r['figure']]}: {r[key]} - {r['versus']} "
                    f"{r['difference']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
                    for r in resolved.to_dict("records")
                )
                or "none"
            )
        )
    return "\n".join(lines)


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
