"""The report's figures, each from the results tables alone; every function saves one PNG.

Each returns the path it wrote, or None with a reason when the study has too little for it.
Losses keep one colour across all figures.
"""

import warnings
import zlib
from pathlib import Path

import matplotlib
import matplotlib.patches
import matplotlib.ticker

matplotlib.use("Agg")  # Files only; also headless machines and notebooks' inline backend.

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.results import BEST, StudyResults, comparison, confirmation, leaderboard  # noqa: E402
from study.config import METRIC  # noqa: E402
from study.confirmation import lost_seeds, lost_text  # noqa: E402
from study.losses import LOSSES  # noqa: E402
from study.search_config import OPTUNA_FILE  # noqa: E402

COLOURS = dict(zip(LOSSES, plt.get_cmap("tab10").colors, strict=False))
MARKERS = dict(zip(LOSSES, "osDX^vP*", strict=True))


# Fewer full-budget trials than this say nothing about which keys matter.
MIN_IMPORTANCE_TRIALS = 4
# More axes than this make parallel coordinates a tangle of labels: the most important.
PARALLEL_KEYS = 6


class Skipped(Exception):
    """A figure that this study cannot support yet; the message says why."""


def _save(figure, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def colour(value):
    """A loss keeps its colour in every figure; other compared values take tab10's in turn."""
    if value in COLOURS:
        return COLOURS[value]
    colours = plt.get_cmap("tab10").colors
    return colours[zlib.crc32(str(value).encode()) % len(colours)]  # The same in every run.


def _word(key: str) -> str:
    """How a figure names a compared key: "loss" for loss.name, else the key itself."""
    return "loss" if key == "loss.name" else key


def leaderboard_figure(results: StudyResults, out: Path) -> Path:
    board, key = leaderboard(results), results.key
    if board.empty or board[BEST].isna().all():
        raise Skipped(f"no trial has run all {results.max_epochs} epochs")
    figure, axis = plt.subplots(figsize=(9, 0.6 * len(board) + 1.8))
    rows = np.arange(len(board))[::-1]
    axis.barh(
        rows + 0.2,
        board[BEST].fillna(0),
        height=0.4,
        color=[colour(value) for value in board[key]],
        label="best validation accuracy of a full-budget trial (this study)",
    )
    for row, entry in zip(rows, board.to_dict("records"), strict=True):
        if pd.isna(entry["rank"]):
            axis.text(0.01, row + 0.2, "not ranked: no full-budget trial", va="center")
    if "mean_test_accuracy" in board:  # After the confirmation phase.
        mean = board.mean_test_accuracy
        axis.barh(
            rows - 0.2,
            mean,
            height=0.4,
            color="lightgrey",
            edgecolor=[colour(value) for value in board[key]],
            xerr=[mean - board.test_ci_low, board.test_ci_high - mean],
            capsize=3,
            label="test accuracy over seeds, 95% interval (confirmation)",
        )
    if "notebook_test_accuracy" in board:  # Only beside a CIFAR-100 study of the losses.
        notebook = board.notebook_test_accuracy
        has = notebook.notna().to_numpy()
        axis.scatter(
            notebook[has],
            rows[has],
            marker="|",
            s=400,
            color="black",
            zorder=3,
            label="2020 notebook, CIFAR-100 test (1 run)",
        )
    axis.set_yticks(rows, board[key])
    axis.set_xlabel("accuracy")
    axis.set_xlim(0, 1)
    axis.set_title(f"Leaderboard: the best full-budget trial of each {_word(key)}")
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, fontsize="small")
    return _save(figure, out, "leaderboard")


def confirmation_figure(results: StudyResults, out: Path) -> Path:
    """Test accuracy per compared value: each seed a dot, the mean and its 95% interval."""
    table, _ = confirmation(results)
    if table.empty:
        raise Skipped("no confirmation run has finished")
    runs, key = results.confirm, results.key
    figure, axis = plt.subplots(figsize=(9, 0.7 * len(table) + 1.8))
    rows = np.arange(len(table))[::-1]
    for row, entry in zip(rows, table.to_dict("records"), strict=True):
        value = entry[key]
        chosen = runs[(runs[key] == value) & (runs.config_id == entry["config_id"])]
        values = chosen.test_accuracy.dropna()
        jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
        style = {"color": colour(value), "marker": MARKERS.get(value, "o")}
        axis.scatter(values, row + np.asarray(jitter), alpha=0.6, s=30, **style)
        mean = entry["mean_test_accuracy"]
        if lost_seeds(entry):
            said = "every seed lost" if np.isnan(mean) else f"+{lost_text(entry)}"
            axis.annotate(
                said,
                (1, row),
                xycoords=("axes fraction", "data"),
                ha="right",
                va="center",
                color="tab:red",
                xytext=(-4, 0),
                textcoords="offset points",
            )
        axis.errorbar(
            mean,
            row,
            xerr=[[mean - entry["ci_low"]], [entry["ci_high"] - mean]],
            color="black",
            capsize=6,
            marker="|",
            markersize=18,
        )
    axis.set_yticks(rows, table[key])
    axis.set_xlabel("test accuracy")
    axis.set_title("Confirmation: each seed a dot; the mean and its 95% t interval in black")
    axis.grid(axis="x", alpha=0.3)
    return _save(figure, out, "confirmation")


def trial_epochs(results: StudyResults, trial_id: str) -> pd.DataFrame:
    """A trial's epochs; where an epoch ran again after a restore, its last run."""
    rows = results.epochs[results.epochs.trial_id == trial_id]
    return rows.drop_duplicates("epoch", keep="last").sort_values("epoch")


def _best_per_loss(results: StudyResults) -> pd.DataFrame:
    """The best full-budget trial of each loss (the leaderboard's choice), as trials rows."""
    table = comparison(results.trials, "loss.name", results.max_epochs)
    chosen = table.best_trial.dropna()
    return results.trials.set_index("trial_id").loc[chosen].reset_index()


def learning_curves(results: StudyResults, out: Path) -> Path:
    best = _best_per_loss(results)
    if best.empty or results.epochs.empty:
        raise Skipped(f"no trial has run all {results.max_epochs} epochs")
    figure, (accuracy, loss) = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")
    for _, trial in best.iterrows():
        loss_name = trial["loss.name"]
        rows = trial_epochs(results, trial.trial_id)
        style = {"color": COLOURS[loss_name], "marker": MARKERS[loss_name], "markersize": 4}
        accuracy.plot(rows.epoch, rows.val_accuracy, label=loss_name, **style)
        # Losses of different kinds have different scales: show each relative to its start.
        loss.plot(rows.epoch, rows.val_loss / rows.val_loss.iloc[0], label=loss_name, **style)
    accuracy.set(
        xlabel="epoch",
        ylabel="validation accuracy",
        title="Validation accuracy, best full-budget trial of each loss",
    )
    loss.set(
        xlabel="epoch",
        ylabel="validation loss / its epoch-1 value",
        title="Validation loss, relative to epoch 1 (scales differ by loss)",
    )
    accuracy.legend(fontsize="small", title="loss")
    for axis in (accuracy, loss):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axis.ticklabel_format(axis="y", useOffset=False)
    return _save(figure, out, "learning_curves")


def loss_optimizer_heatmap(results: StudyResults, out: Path) -> Path:
    reported = results.reported
    if reported.empty:
        raise Skipped("no trial has reported an epoch")
    table = reported.pivot_table(
        index="loss.name", columns="optimizer.name", values=BEST, aggfunc="max"
    )
    figure, axis = plt.subplots(figsize=(1.6 * table.shape[1] + 3, 0.55 * table.shape[0] + 1.5))
    image = axis.imshow(table.to_numpy(dtype=float), cmap="viridis", vmin=0, aspect="auto")
    for (i, j), value in np.ndenumerate(table.to_numpy(dtype=float)):
        text = "no trial" if np.isnan(value) else f"{value:.3f}"
        # Dark text on the light half of the colour scale, white on the dark half.
        light = np.isnan(value) or image.norm(value) > 0.5
        axis.text(j, i, text, ha="center", va="center", color="k" if light else "white")
    axis.set_xticks(range(table.shape[1]), table.columns)
    axis.set_yticks(range(table.shape[0]), table.index)
    axis.set(xlabel="optimizer", ylabel="loss", title="Best validation accuracy, loss x optimizer")
    figure.colorbar(image, ax=axis, label="best validation accuracy")
    return _save(figure, out, "loss_optimizer")


def hyperparameters(results: StudyResults, out: Path) -> Path:
    reported = results.reported
    keys = [
        k
        for k in ("optimizer.learning_rate", "model.conv_dropout", "model.dense_dropout")
        if k in reported and reported[k].nunique() > 1
    ]
    if not keys:
        raise Skipped("neither learning rate nor dropout varies across trials")
    figure, axes = plt.subplots(
        1, len(keys), figsize=(5 * len(keys), 4.2), squeeze=False, layout="constrained"
    )
    full = reported.epochs_run >= results.max_epochs
    for axis, key in zip(axes[0], keys, strict=True):
        for loss, group in reported.groupby("loss.name"):
            done = full[group.index]
            kwargs = {"color": COLOURS[loss], "marker": MARKERS[loss]}
            axis.scatter(group.loc[done, key], group.loc[done, BEST], label=loss, **kwargs)
            axis.scatter(
                group.loc[~done, key],
                group.loc[~done, BEST],
                facecolors="none",
                edgecolors=COLOURS[loss],
                marker=MARKERS[loss],
            )
        axis.set(xlabel=key, ylabel="best validation accuracy")
        if key.endswith("learning_rate"):
            axis.set_xscale("log")
        axis.grid(alpha=0.3)
    figure.legend(
        *axes[0][0].get_legend_handles_labels(),
        loc="outside lower center",
        ncol=4,
        fontsize="small",
        title="loss (hollow markers: stopped early by ASHA)",
    )
    figure.suptitle("Learning rate and dropout against accuracy")
    return _save(figure, out, "hyperparameters")


def asha(results: StudyResults, out: Path) -> tuple[Path, dict]:
    trials = results.trials.sort_values(
        "started_at" if "started_at" in results.trials else "trial_id"
    )
    spent = int(trials.epochs_run.fillna(0).sum())
    budget = len(trials) * results.max_epochs
    figure, axis = plt.subplots(figsize=(9, 0.22 * len(trials) + 1.8))
    colours = {
        "completed": "tab:green",
        "early_stopped": "tab:orange",
        "diverged": "tab:red",
        "dead": "tab:purple",
        "error": "black",
        "running": "tab:blue",
    }
    rows = np.arange(len(trials))[::-1]
    axis.barh(
        rows, trials.epochs_run.fillna(0), color=[colours.get(s, "grey") for s in trials.status]
    )
    axis.axvline(results.max_epochs, color="black", linestyle="--", linewidth=1)
    handles = [
        matplotlib.patches.Patch(color=colour, label=status)
        for status, colour in colours.items()
        if status in set(trials.status)
    ]
    axis.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    key = results.key
    labels = [f"{row['trial_id']}  {row.get(key, '')}" for row in trials.to_dict("records")]
    axis.set_yticks(rows, labels, fontsize="x-small")
    rungs = f", each {_word(key)} on its own rungs" if results.config.search.stratify else ""
    axis.set(
        xlabel="epochs reached",
        ylabel=f"trial and its {_word(key)}, in order of start",
        title=f"What ASHA did{rungs}: {spent} of {budget} epochs run\n"
        f"({spent / budget:.0%} of running every trial to the end)",
    )
    axis.legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    summary = {"epochs_spent": spent, "epochs_full_budget": budget}
    return _save(figure, out, "asha"), summary


def optuna_studies(results: StudyResults) -> dict:
    """The study's Optuna studies from its optuna.db: one per stratum (`<name>/<value>`),
    or one for a joint search; keyed by the stratum's value (None if joint)."""
    import optuna

    path = results.folder / OPTUNA_FILE
    if not path.is_file():
        raise Skipped(f"no {OPTUNA_FILE} in the folder (a grid study has none)")
    storage = f"sqlite:///{path}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = {}
    for name in optuna.study.get_all_study_names(storage):
        study = optuna.load_study(study_name=name, storage=storage)
        stratum = study.user_attrs.get("stratify", {}).get(results.config.search.stratify)
        studies[stratum] = study
    return studies


def importances(results: StudyResults) -> dict:
    """fANOVA importance (Optuna's) of the searched keys within each stratum, from its own
    Optuna record: its COMPLETE trials, which ran the full budget (ASHA's stopped ones are
    PRUNED). Across strata the stratifying key is fixed by design, so each has its own."""
    import optuna

    found = {}
    for stratum, study in optuna_studies(results).items():
        complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
        varied = {key for trial in complete for key in trial.params}
        if len(complete) < MIN_IMPORTANCE_TRIALS or not varied:
            continue
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        comparable = _comparable(complete, results.config.search.space)
        scores = optuna.importance.get_param_importances(comparable, evaluator=evaluator)
        found[stratum] = (len(complete), scores, comparable)
    if not found:
        raise Skipped(
            f"no {'stratum' if results.config.search.stratify else 'study'} has "
            f"{MIN_IMPORTANCE_TRIALS} full-budget trials to compare"
        )
    return found


def _comparable(trials, space):
    """The trials in a new in-memory study, each key's distribution widened to every range
    that `by` gives it: Optuna only compares a key whose distribution is the same in every
    trial, and would leave out a learning rate whose range follows the optimizer."""
    import optuna

    study = optuna.create_study(direction="maximize")
    for trial in trials:
        distributions = {
            key: _distribution(space[key]) if key in space else distribution
            for key, distribution in trial.distributions.items()
        }
        study.add_trial(
            optuna.trial.create_trial(
                params=trial.params, distributions=distributions, value=trial.value
            )
        )
    return study


def _distribution(entry):
    import optuna

    if entry.kind == "choice":
        return optuna.distributions.CategoricalDistribution(entry.choice)
    ranges = [entry.bounds, *(entry.ranges or {}).values()]
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if entry.kind == "integer":
        return optuna.distributions.IntDistribution(int(low), int(high))
    return optuna.distributions.FloatDistribution(low, high, log=entry.kind == "loguniform")


def importance(results: StudyResults, out: Path) -> list[Path]:
    found = importances(results)
    key = results.config.search.stratify
    figure, axes = plt.subplots(
        1, len(found), figsize=(4.5 * len(found) + 1, 5), squeeze=False, layout="constrained"
    )
    for axis, (stratum, (count, scores, _)) in zip(axes[0], found.items(), strict=True):
        names = list(scores)[::-1]
        axis.barh(names, [scores[name] for name in names], color=colour(stratum))
        axis.set_xlim(0, 1)
        axis.set_xlabel("importance (fANOVA)")
        where = "all trials" if stratum is None else f"{key} = {stratum}"
        axis.set_title(f"{where}\n({count} full-budget trials)", fontsize="medium")
    figure.suptitle(f"Which hyper-parameters mattered for {METRIC}")
    left_out = (
        set(results.searched) - {key} - {k for _, scores, _ in found.values() for k in scores}
    )
    if left_out:
        figure.text(
            0.5, -0.03, f"Not compared (a condition leaves them out of some trials, or they "
            f"did not vary): {', '.join(sorted(left_out))}", ha="center", fontsize="small",
        )  # fmt: skip
    paths = [_save(figure, out, "importance")]
    paths.append(_parallel_coordinates(results, found, out))
    return paths


def _parallel_coordinates(results: StudyResults, found: dict, out: Path) -> Path:
    """Optuna's parallel coordinates of the stratum with the most full-budget trials, over
    its six most important keys (more make a tangle of labels)."""
    import optuna
    from optuna.visualization import matplotlib as optuna_plots

    stratum = max(found, key=lambda value: found[value][0])
    _, scores, study = found[stratum]
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    params = list(scores)[:PARALLEL_KEYS]
    axis = optuna_plots.plot_parallel_coordinate(study, params=params)
    figure = axis.figure
    figure.set_size_inches(2.4 * (len(params) + 1) + 1.5, 5.5)
    axis.set_title("", loc="left")  # Optuna's own title, drawn over ours otherwise.
    axis.set_title("")
    key = results.config.search.stratify
    where = "" if stratum is None else f", {key} = {stratum}"
    figure.suptitle(
        f"Parallel coordinates: the {len(params)} most important keys of the full-budget "
        f"trials{where}, coloured by {METRIC}"
    )
    shortened = {}
    for each in figure.axes:  # Long category names would run into the next axis.
        labels = [label.get_text() for label in each.get_yticklabels()]
        if any(len(label) > 14 for label in labels):
            shortened |= {_short(label): label for label in labels if _short(label) != label}
            each.set_yticks(each.get_yticks(), [_short(label) for label in labels])
        each.tick_params(labelsize="small")
        if each.get_ylabel() == "Objective Value":  # Optuna's colour bar.
            each.set_ylabel(METRIC)
    axis.set_xticks(
        axis.get_xticks(), [METRIC, *[t.get_text() for t in axis.get_xticklabels()][1:]]
    )
    plt.setp(axis.get_xticklabels(), rotation=15, ha="right")
    if shortened:
        names = ", ".join(f"{short} = {name}" for short, name in sorted(shortened.items()))
        figure.text(0.5, -0.04, names, ha="center", fontsize="small")
    return _save(figure, out, "parallel_coordinates")


def _short(label: str) -> str:
    """A category name that fits beside its axis: mean_squared_logarithmic_error -> msle."""
    if len(label) <= 14 or "_" not in label:
        return label[:14]
    return "".join(word[0] for word in label.split("_"))
