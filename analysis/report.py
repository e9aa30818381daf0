"""`python -m analysis.report RESULTS_DIR [--out DIR] [--data-dir PATH]`: a study's report.

Reads only the files the study wrote and writes PNG figures and a `report.md` that embeds
them. A study still running, or one without checkpoints, gives a partial report with
notes; a folder that holds no study is a one-line error and exit code 2.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analysis import figures, learning, reliability
from analysis.results import (
    BEST,
    AnalysisError,
    StudyResults,
    best_trial,
    confirmation,
    dead_by_band,
    dump,
    format_time_shares,
    latest_checkpoint,
    leaderboard,
    load,
    trial_config,
)
from study.config import METRIC
from study.confirm import reference_value
from study.confirmation import (
    BESIDE_ACCURACY,
    NO_SPLIT,
    calibration_summary,
    lost_seeds,
)
from study.data import DataError

IMPORTANCE_NOTE = (
    "Optuna's fANOVA, read from the study's own `optuna.db`: its COMPLETE trials, which ran "
    "the full budget. ASHA's early-stopped trials are PRUNED there (their epochs kept as "
    "intermediate values); mixing them in would credit whatever made trials fast starters "
    "rather than good finishers. In a stratified study each value of the stratifying key "
    "has its own study and its own importance: across them that key is fixed by design."
)


def _table(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False, floatfmt=".4f") if not frame.empty else "(none)"


def _figure(lines: list[str], title: str, make, *args, heading=True) -> object:
    if heading:
        lines.append(f"\n## {title}\n")
    try:
        made = make(*args)
    except figures.Skipped as reason:
        lines.append(f"\n_Not drawn: {reason}._")
        return None
    paths = made[0] if isinstance(made, tuple) else made
    for path in paths if isinstance(paths, list) else [paths]:
        lines.append(f"\n![{path.stem.replace('_', ' ')}]({path.name})")
    return made


def _best_trial_section(results: StudyResults, out: Path, data_dir, lines: list[str]) -> None:
    lines.append("\n## The best trial\n")
    best = best_trial(results)
    if best is None:
        lines.append("_No trial has reported an epoch yet._")
        return
    config = trial_config(results, best.trial_id)
    lines.append(
        f"Trial `{best.trial_id}` ({best['loss.name']}, {best['optimizer.name']}): best "
        f"{METRIC} {best[BEST]:.4f} at epoch {int(best.best_epoch)}, status {best.status}."
    )
    lines.append(f"\n```yaml\n{dump(config)}```")
    curves = figures.trial_epochs(results, best.trial_id)
    if not curves.empty:
        lines.append("\n" + _table(curves.drop(columns=["trial_id"], errors="ignore")))
    checkpoint = latest_checkpoint(results, best.trial_id)
    if checkpoint is None:
        lines.append("\n_No checkpoint of this trial in the folder: no per-class results._")
        return
    from analysis import best_model

    try:
        splits = best_model.load_splits(config, data_dir)
    except DataError as error:
        lines.append(f"\n_No per-class results: the data could not be read ({error})._")
        return
    # The validation split it was chosen on: the test set is the confirmation's alone.
    try:
        predictions = best_model.predict(checkpoint, splits.x_val)
    except AnalysisError as error:
        lines.append(f"\n_No per-class results: {error}._")
        return
    per_class = best_model.per_class_accuracy(splits.y_val, predictions, splits.class_names)
    per_class.to_csv(out / "per_class_accuracy.csv", index=False)
    accuracy = (predictions == splits.y_val).mean()
    lines.append(
        f"\nFrom `{checkpoint.relative_to(results.folder)}`: validation accuracy "
        f"{accuracy:.4f} on {len(splits.y_val)} images (all classes in "
        "`per_class_accuracy.csv`)."
    )
    lines.append("\nBest classes:\n\n" + _table(per_class.head(5)))
    lines.append("\nWorst classes:\n\n" + _table(per_class.tail(5)))
    path = best_model.mistakes_figure(
        splits.x_val, splits.y_val, predictions, splits.class_names, out
    )
    lines.append(f"\n![Misclassified validation images]({path.name})")


def _leaderboard_section(results: StudyResults, lines: list[str]) -> None:
    key, epochs = results.key, results.max_epochs
    lines.append(f"\n## Leaderboard by {key}\n")
    board = leaderboard(results)
    if results.config.search.stratify:
        shares = ", ".join(f"{v} {n}" for v, n in results.config.search.shares().items())
        lines.append(
            f"Stratified by {key}: each value had its own share of the trials ({shares}), "
            "its own searcher model and its own ASHA rungs.\n"
        )
    lines.append(
        f"Ranked by the best {METRIC} of a trial that ran all {epochs} epochs: a trial that "
        "ASHA stopped, or that diverged or died, has not been compared.\n"
    )
    ranked = board[board["rank"].notna()].astype({"rank": int})
    lines.append(_table(ranked))
    for row in board[board["rank"].isna()].to_dict("records"):
        why = "no trial" if not row["trials"] else f"none of its {row['trials']} trials ran all"
        why = why if not row["trials"] else f"{why} {epochs} epochs"
        diverged = f", {row['diverged']} diverged" if row["diverged"] else ""
        diverged += f", {row['dead']} dead" if row["dead"] else ""
        lines.append(
            f"\n- **Not ranked: {row[key]}** ({why}{diverged}; {row['epochs_spent']} epochs spent)"
        )
    stopped = learning.stopped_at_rungs(results)
    if not stopped.empty:
        lines.append(
            f"\nWhat ASHA did per {key}: its trials stopped at each rung.\n\n{_table(stopped)}"
        )
    for line in learning.slow_starters(results):
        lines.append(f"\n- **Slow starter: {line}.**")
    dead = dead_by_band(results.trials)
    if not dead.empty:
        lines.append(
            "\nDead trials (their network learned nothing: both accuracies at chance for "
            f"`training.dead_patience` epochs), by optimizer and learning rate:\n\n{_table(dead)}"
        )
    if shares := format_time_shares(results.trials, results.epochs):
        lines.append(f"\nWhere the trials' time went: {shares.removeprefix('trial time: ')}.")
    lines.append(
        "\nThe notebook's figures are one run each, measured on the test set it also "
        "validated on. The search ranks on a validation split and never touches the test "
        "set; test accuracy comes only from the confirmation phase, over seeds."
    )


def _confirmation_section(results: StudyResults, out: Path, lines: list[str]) -> None:
    lines.append("\n## Confirmation over seeds (test set)\n")
    table, differences = confirmation(results)
    if table.empty:
        lines.append(
            "_No confirmation yet. `python -m study.run --confirm --name "
            f"{results.folder.name}` re-trains each loss's best configuration over seeds "
            "and tests it; only then is a difference between losses an answer._"
        )
        return
    key = results.key
    lines.append(
        f"Each {key}'s best configuration (by validation) re-trained with "
        f"{int((table.seeds + table.diverged_seeds + table.dead_seeds).max())} seeds at the "
        "full budget and "
        "tested once per seed. "
        "Mean test accuracy with its 95% Student's t interval:\n"
    )
    lines.append(_table(table))
    lost = [row for row in table.to_dict("records") if lost_seeds(row)]
    if lost:
        said = ", ".join(
            f"{row[key]} {lost_seeds(row)} of {row['seeds'] + lost_seeds(row)}" for row in lost
        )
        lines.append(
            "\nSeeds that diverged or died (learned nothing; the table's diverged_seeds and "
            f"dead_seeds) have no test accuracy and are not in the mean: {said}. A "
            "configuration that fails on some seeds is less reliable than its mean says."
        )
    left_out = [value for value in results.values if value not in set(table[key])]
    if left_out:
        lines.append(
            f"\nNot confirmed (no full-budget trial in the study): {', '.join(map(str, left_out))}."
        )
    if not differences.empty:
        versus = differences.versus.iloc[0]
        lines.append(
            f"\nDifferences to {versus}, with Welch's intervals, Bonferroni-corrected for "
            f"the {len(differences)} comparisons made at once (each at "
            f"{1 - 0.05 / len(differences):.2%}, so that together they hold with 95%: "
            "*resolved* keeps its meaning however many values are compared). Welch, not a "
            "paired test: a seed fixes initialisation and data order only between "
            "configurations with the same model and batch size, which a search's best "
            "configurations rarely share; Welch holds either way (conservative where pairing "
            "would hold) and does not assume equal variances.\n"
        )
        lines.append(_table(differences))
        for row in differences.to_dict("records"):
            if row["resolved"]:
                direction = "better" if row["difference"] > 0 else "worse"
                verdict = f"is resolved: {row[key]} is {direction} than {versus}"
            else:
                verdict = "is not resolved: the interval holds 0; more seeds could tell"
            lines.append(
                f"\n- {row[key]} - {versus}: {row['difference']:+.4f} "
                f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}] {verdict}."
            )
    _figure(lines, "Confirmation", figures.confirmation_figure, results, out, heading=False)
    _calibration_section(results, out, lines)


def _calibration_section(results: StudyResults, out: Path, lines: list[str]) -> None:
    key = results.key
    table, differences = calibration_summary(
        results.confirm, key, reference_value(results.config, key)
    )
    if table.empty:
        return
    lines.append(
        "\n### Calibration and speed\n\nAccuracy is where losses differ least; how far their "
        "probabilities can be trusted differs more. Per run, on the test set: the expected "
        "calibration error (15 equal-width bins of the top probability; the sum over bins "
        "of the bin's share of images times |its accuracy - its mean confidence|), the "
        "negative log-likelihood and the Brier score (the sum over classes of the squared "
        "difference to the one-hot label, mean over images). Every loss's probabilities are "
        "the softmax of the network's class scores (for the hinge and square losses, whose "
        "scores are no probabilities, the same rule). Temperature scaling divides the scores "
        "by one temperature fitted on the validation split alone (NLL), then the ECE and "
        "NLL are measured again. Epochs to 90%: the epochs a run needed to reach 90% of its "
        "own final validation accuracy. Means over the chosen configuration's seeds with "
        "95% t intervals:\n"
    )
    wide = table.assign(
        value=[_with_interval(row) for row in table.to_dict("records")],
        figure=table.figure.map(BESIDE_ACCURACY),
    ).pivot(index=key, columns="figure", values="value")
    lines.append(wide.reset_index().to_markdown(index=False))
    if results.config.trial.data.validation == "test":
        lines.append(f"\n_No temperature-scaled figures: {NO_SPLIT}._")
    if not differences.empty:
        resolved = differences[differences.resolved]
        said = "; ".join(
            f"{BESIDE_ACCURACY[row['figure']]}: {row[key]} - {row['versus']} "
            f"{row['difference']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]"
            for row in resolved.to_dict("records")
        )
        lines.append(
            "\nDifferences to the reference, Welch's intervals Bonferroni-corrected per figure "
            f"as accuracy's are; resolved: {said or 'none'}."
        )
    _figure(lines, "Reliability", reliability.reliability_figure, results, out, heading=False)


def _with_interval(row: dict) -> str:
    if np.isnan(row["ci_low"]):
        return f"{row['mean']:.4f}"
    return f"{row['mean']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"


def write_report(folder: Path | str, out: Path | None = None, data_dir: str | None = None) -> Path:
    """Writes the figures and report.md into `out` (default: the results folder; for a
    study in a bucket, the local folder its files were fetched into)."""
    results = load(folder)
    out = Path(out or results.folder)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Study report: {results.folder.name}\n"]
    lines += [f"> **Note:** {note}" for note in results.notes]
    counts = results.trials.status.value_counts().to_dict()
    lines.append(
        f"\n{len(results.trials)} trials ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
        f"up to {results.max_epochs} epochs each; ranked by {METRIC}."
    )
    _leaderboard_section(results, lines)
    _figure(lines, "Leaderboard", figures.leaderboard_figure, results, out, heading=False)
    _confirmation_section(results, out, lines)
    _figure(lines, "Learning curves", figures.learning_curves, results, out)
    _figure(lines, "Loss x optimizer", figures.loss_optimizer_heatmap, results, out)
    _figure(lines, "Learning rate and dropout", figures.hyperparameters, results, out)
    made = _figure(lines, "What ASHA did", figures.asha, results, out)
    if made:
        spent, budget = made[1]["epochs_spent"], made[1]["epochs_full_budget"]
        lines.append(
            f"\n{spent} epochs run of the {budget} that running every trial to the end "
            f"would have cost: ASHA saved {1 - spent / budget:.0%}."
        )
    lines.append(f"\n## Hyper-parameter importance and parallel coordinates\n\n{IMPORTANCE_NOTE}")
    _figure(lines, "Importance", figures.importance, results, out, heading=False)
    _best_trial_section(results, out, data_dir, lines)
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.report", description=__doc__)
    parser.add_argument(
        "results_dir", help="a study's folder or bucket: <storage>/<name>, or s3://BUCKET/PATH/NAME"
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write (default: the study folder; for a bucket, results/NAME here)",
    )
    parser.add_argument("--data-dir", help="CIFAR data for the best trial's per-class results")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.results_dir, args.out, args.data_dir)
    except AnalysisError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
