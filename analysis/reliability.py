"""Reliability diagrams of the confirmation: per compared value, the test accuracy against
the confidence in each of 15 equal-width bins, over the chosen configuration's seeds."""

import json
from pathlib import Path

import numpy as np

from analysis.figures import Skipped, _save, colour, plt
from analysis.results import StudyResults
from study.calibration import N_BINS, RELIABILITY
from study.confirmation import chosen_runs


def pooled_bins(runs) -> dict[str, np.ndarray]:
    """Seeds' reliability bins added up: counts, correct counts, summed confidences."""
    total = {name: np.zeros(N_BINS) for name in ("count", "correct", "confidence")}
    for text in runs[RELIABILITY].dropna():
        for name, values in json.loads(text).items():
            total[name] += np.asarray(values, dtype=float)
    return total


def reliability_figure(results: StudyResults, out: Path) -> Path:
    confirm = results.confirm
    if confirm.empty or RELIABILITY not in confirm or confirm[RELIABILITY].isna().all():
        raise Skipped("no confirmation run recorded its reliability bins")
    chosen = {
        value: runs for value, (_, runs, _) in chosen_runs(confirm, results.key).items()
        if not runs.empty
    }  # fmt: skip
    columns = min(4, len(chosen))
    rows = -(-len(chosen) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False, sharey=True
    )
    edges = np.linspace(0, 1, N_BINS + 1)
    for axis, (value, runs) in zip(axes.flat, chosen.items(), strict=False):
        bins = pooled_bins(runs)
        seen = bins["count"] > 0
        accuracy = np.divide(bins["correct"], bins["count"], where=seen, out=np.zeros(N_BINS))
        axis.bar(edges[:-1][seen], accuracy[seen], width=1 / N_BINS, align="edge",
                 color=colour(value), edgecolor="white", label="accuracy")  # fmt: skip
        confidence = np.divide(bins["confidence"], bins["count"], where=seen, out=np.zeros(N_BINS))
        axis.plot(confidence[seen], accuracy[seen], "k.", markersize=4)
        axis.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ece = runs["test_ece"].mean() if "test_ece" in runs else np.nan
        axis.set(title=f"{value}\nECE {ece:.3f}, {len(runs)} seeds", xlim=(0, 1), ylim=(0, 1))
        axis.title.set_fontsize("small")
        axis.set_xlabel("confidence")
    for axis in axes.flat[len(chosen) :]:
        axis.axis("off")
    for axis in axes[:, 0]:
        axis.set_ylabel("accuracy")
    figure.suptitle("Reliability on the test set: accuracy per confidence bin (dashed: perfect)")
    figure.tight_layout()
    return _save(figure, out, "reliability")
