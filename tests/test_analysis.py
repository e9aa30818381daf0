"""The analysis report and the best-trials notebook, on a real results folder from a tiny
study (generated data, narrow model)."""

import json
import os
import re
import shutil
from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from analysis import results
from analysis.report import write_report
from analysis.results import NOTEBOOK, leaderboard, load

from .conftest import REPO, isolated_ray, run_cli, study_args, write_study_config

FIGURES = [
    "leaderboard",
    "learning_curves",
    "loss_optimizer",
    "hyperparameters",
    "asha",
    "importance",
    "parallel_coordinates",
    "mistakes",
]


@pytest.fixture(scope="module")
def study_folder(tmp_path_factory, cifar10_tarball):
    """A finished study with checkpoints, made once for this module. FIFO, so that every
    trial runs the full budget and every figure can be drawn; ASHA's effects are tested
    on an edited copy below and in test_study.py."""
    root = tmp_path_factory.mktemp("analysis")
    # A joint search (not stratified): the analysis reads both kinds; importance needs a
    # study with several full-budget trials. The stratified kind is read in test_study.py.
    config = write_study_config(root / "study.yaml", num_samples=6, scheduler="fifo", stratify=None)
    with isolated_ray() as env:
        result = run_cli(
            "study.run",
            *study_args(config, cifar10_tarball, root, "tiny"),
            "--no-dashboard",
            env=env,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "tiny"


def _is_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        width, height = image.size
        assert width > 200 and height > 150
        assert np.asarray(image.convert("L")).std() > 5  # Not a blank canvas.


def test_report_writes_every_figure_and_embeds_it(study_folder, tmp_path):
    report = write_report(study_folder, tmp_path)
    text = report.read_text()
    for name in FIGURES:
        _is_png(tmp_path / f"{name}.png")
        assert f"]({name}.png)" in text
    assert "COMPLETE trials, which ran the full budget" in text
    assert "No confirmation yet" in text and "confirmation.png" not in text
    assert "mean_test_accuracy" not in leaderboard(load(study_folder))
    # Per-class accuracy, against the trial's own record: over the 50 validation images it
    # is the accuracy the report prints, which the trial reported for that checkpoint.
    per_class = pd.read_csv(tmp_path / "per_class_accuracy.csv")
    assert len(per_class) == 10 and per_class.images.sum() == 50
    overall = (per_class.accuracy * per_class.images).sum() / 50
    found = re.search(
        r"From `(trial_(\w+)/checkpoint_\d+)/model.keras`: validation accuracy ([0-9.]+) on 50",
        text,
    )
    assert float(found[3]) == pytest.approx(overall, abs=5e-5)
    epoch = json.loads((study_folder / found[1] / "state.json").read_text())["epoch"]
    epochs = pd.read_csv(study_folder / "epochs.csv", dtype={"trial_id": str})
    reported = epochs[(epochs.trial_id == found[2]) & (epochs.epoch == epoch)].val_accuracy
    assert overall == pytest.approx(reported.iloc[-1], abs=1e-6)


def test_leaderboard_numbers_come_from_trials_csv(study_folder):
    trials = pd.read_csv(study_folder / "trials.csv", dtype={"trial_id": str})
    board = leaderboard(load(study_folder)).set_index("loss.name")
    expected = trials.groupby("loss.name").best_val_accuracy.max()
    # Every loss of the space is listed; those with a full-budget trial ranked (FIFO: all).
    assert set(board.index) == {
        "categorical_crossentropy",
        "hinge",
        "mean_squared_logarithmic_error",
    }
    ranked = board[board["rank"].notna()]
    assert set(ranked.index) == set(expected.index)
    assert ranked["rank"].tolist() == list(range(1, len(expected) + 1))
    assert ranked.best_val_accuracy.is_monotonic_decreasing
    for loss, value in expected.items():
        count = (trials["loss.name"] == loss).sum()
        assert board.loc[loss, "best_val_accuracy"] == pytest.approx(value)
        best = trials.loc[trials[trials["loss.name"] == loss].best_val_accuracy.idxmax()]
        assert board.loc[loss, "best_trial"] == best.trial_id
        assert board.loc[loss, "trials"] == board.loc[loss, "full_budget_trials"] == count
        assert board.loc[loss, "epochs_spent"] == count * 4
    # The study is on CIFAR-10: the notebook's CIFAR-100 numbers are not put beside it.
    assert "notebook_test_accuracy" not in board


def test_a_loss_without_a_full_budget_trial_is_listed_apart(study_folder, tmp_path):
    """Early-stopped trials are not compared with full-budget ones: their loss is shown,
    with what it spent, and not ranked."""
    copy = tmp_path / "stopped"
    shutil.copytree(study_folder, copy, ignore=shutil.ignore_patterns("trial_*"))
    trials = pd.read_csv(copy / "trials.csv", dtype={"trial_id": str})
    loss = trials["loss.name"].iloc[-1]
    stopped = trials["loss.name"] == loss
    trials.loc[stopped, ["status", "epochs_run"]] = ["early_stopped", 1]
    trials.loc[stopped, "best_val_accuracy"] = 0.99  # Better than all: still not ranked.
    trials.to_csv(copy / "trials.csv", index=False)
    board = leaderboard(load(copy)).set_index("loss.name")
    count = stopped.sum()
    assert np.isnan(board.loc[loss, "rank"]) and board.loc[loss, "full_budget_trials"] == 0
    assert board.loc[loss, "trials"] == count
    assert board["rank"].dropna().tolist() == list(range(1, trials["loss.name"].nunique()))
    text = write_report(copy, tmp_path / "out").read_text()
    line = f"**Not ranked: {loss}** (none of its {count} trials ran all 4 epochs; {count} epochs"
    assert line in text
    assert f"| {loss}" not in text.split("## Leaderboard")[1].split("**Not ranked")[0]


def test_notebook_figures_stand_beside_a_cifar100_study(study_folder, tmp_path):
    copy = tmp_path / "c100"
    shutil.copytree(study_folder, copy, ignore=shutil.ignore_patterns("trial_*"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["data"]["dataset"] = "cifar100"
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    board = leaderboard(load(copy)).set_index("loss.name")
    for loss in board.index:
        np.testing.assert_equal(
            board.loc[loss, "notebook_test_accuracy"], NOTEBOOK.get(loss, np.nan)
        )
    # The notebook's published figures, not the constant restated.
    assert board.loc["categorical_crossentropy", "notebook_test_accuracy"] == 0.5275
    assert board.loc["mean_squared_logarithmic_error", "notebook_test_accuracy"] == 0.4608
    assert board.loc["hinge", "notebook_test_accuracy"] == 0.0897


def _stop_early(folder, count):
    """Edits a results folder as if ASHA had stopped `count` trials after epoch 1."""
    trials = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    stopped = trials.trial_id[:count]
    trials.loc[trials.trial_id.isin(stopped), ["status", "epochs_run"]] = ["early_stopped", 1]
    epochs = epochs[~epochs.trial_id.isin(stopped) | (epochs.epoch == 1)]
    trials.to_csv(folder / "trials.csv", index=False)
    epochs.to_csv(folder / "epochs.csv", index=False)
    return set(stopped)


def test_asha_savings_and_full_budget_only_importance(study_folder, tmp_path):
    from analysis.figures import importances

    copy = tmp_path / "asha"
    shutil.copytree(study_folder, copy)
    _stop_early(copy, 2)
    trials = pd.read_csv(copy / "trials.csv")
    text = write_report(copy, tmp_path / "out").read_text()
    spent, budget = int(trials.epochs_run.sum()), len(trials) * 4
    assert f"{spent} epochs run of the {budget}" in text
    assert f"ASHA saved {1 - spent / budget:.0%}" in text
    # Importance is read from the study's own Optuna record, within each loss, from its
    # COMPLETE (full-budget) trials.
    found = importances(load(study_folder))
    assert list(found) == [None]  # A joint search: one Optuna study.
    count, scores, _ = found[None]
    assert count == 6 and set(scores) == {"loss.name", "optimizer.name", "optimizer.learning_rate"}
    assert sum(scores.values()) == pytest.approx(1.0)


def test_asha_rungs_per_loss_and_a_slow_starter_are_named(study_folder, tmp_path):
    """The study read as ASHA's (rungs at epochs 1 and 2 of 4), two trials stopped at the
    first rung, and a confirmation of another trial of the same loss: per loss, the
    trials stopped at each rung; and the loss named a slow starter where its confirmed
    configuration scored below a trial that ASHA stopped at the first rung."""
    from analysis import learning

    copy = tmp_path / "slow"
    shutil.copytree(study_folder, copy, ignore=shutil.ignore_patterns("trial_*"))
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["search"].update(scheduler="asha", grace_period=1, reduction_factor=2)
    (copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    stopped = _stop_early(copy, 2)
    trials = pd.read_csv(copy / "trials.csv", dtype={"trial_id": str})
    epochs = pd.read_csv(copy / "epochs.csv", dtype={"trial_id": str})
    # The confirmed one: a full-budget trial of the first stopped trial's loss, its epoch 1
    # made worse than the stopped one's.
    first = trials[trials.trial_id.isin(stopped)].iloc[0]
    loss = first["loss.name"]
    candidates = trials[(trials["loss.name"] == loss) & (trials.status == "completed")]
    if candidates.empty:  # Its only trial was stopped: make another loss's its partner.
        candidates = trials[trials.status == "completed"]
        trials.loc[trials.trial_id == candidates.trial_id.iloc[0], "loss.name"] = loss
        trials.to_csv(copy / "trials.csv", index=False)
    confirmed = candidates.trial_id.iloc[0]
    at_one = (epochs.trial_id == first.trial_id) & (epochs.epoch == 1)
    mine = (epochs.trial_id == confirmed) & (epochs.epoch == 1)
    epochs.loc[at_one, "val_accuracy"] = 0.5
    epochs.loc[mine, "val_accuracy"] = 0.2
    epochs.to_csv(copy / "epochs.csv", index=False)
    rows = [
        {"loss.name": loss, "config_id": confirmed, "seed": seed, "trial_id": f"c{seed}",
         "status": "completed", "epochs": 4, "val_accuracy": 0.4, "val_loss": 1.0,
         "test_accuracy": 0.4 + seed / 100, "test_loss": 1.0}
        for seed in (1, 2)
    ]  # fmt: skip
    pd.DataFrame(rows).to_csv(copy / "confirm.csv", index=False)
    results = load(copy)
    assert learning.rungs(results) == [1, 2]
    table = learning.stopped_at_rungs(results).set_index("loss.name")
    for value, group in pd.read_csv(copy / "trials.csv").groupby("loss.name"):
        assert table.loc[value, "stopped at epoch 1"] == group.trial_id.isin(stopped).sum()
        assert table.loc[value, "stopped at epoch 2"] == 0
        assert table.loc[value, "full budget"] == (group.epochs_run == 4).sum()
    [line] = learning.slow_starters(results)
    assert line.startswith(f"{loss} starts slowly: at the first rung (epoch 1)")
    assert re.search(r"scored 0\.2000, below [12] of the [12] trials that ASHA stopped", line)
    report = write_report(copy, tmp_path / "out").read_text()
    assert "What ASHA did per loss.name: its trials stopped at each rung." in report
    assert f"**Slow starter: {loss} starts slowly" in report


def test_missing_pieces_give_a_partial_report(study_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(study_folder, copy)
    for checkpoint in copy.glob("trial_*/checkpoint_*"):
        shutil.rmtree(checkpoint)
    trials = pd.read_csv(copy / "trials.csv", dtype={"trial_id": str})
    trials.loc[0, "status"] = "running"
    trials.to_csv(copy / "trials.csv", index=False)
    text = write_report(copy).read_text()
    assert "still running: this report is partial" in text
    assert "No checkpoint of this trial in the folder" in text
    assert (copy / "leaderboard.png").exists()


@pytest.mark.parametrize("contents", [None, "empty", "no_trials"])
def test_wrong_folders_are_one_line_errors(tmp_path, study_folder, contents):
    folder = tmp_path / "study"
    if contents == "empty":
        folder.mkdir()
    elif contents == "no_trials":
        folder.mkdir()
        shutil.copy(study_folder / "config.yaml", folder)
        (folder / "trials.csv").write_text("")
    result = run_cli("analysis.report", folder)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


def test_notebook_runs_headlessly(study_folder, tmp_path):
    notebook = nbformat.read(REPO / "analysis" / "best_trials.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
    assert notebook.cells[0].source.startswith("# The study to look at")
    notebook.cells[0].source = f"RESULTS_DIR = {str(study_folder)!r}\nDATA_DIR = None"
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()  # Raises CellExecutionError if any cell fails.
    printed = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "no confirmation yet" in printed
    # The accuracy it prints from the best checkpoint is the one the trial reported for
    # that checkpoint's epoch (the model gets the uint8 images it was trained on).
    checkpoint = Path(re.search(r"checkpoint: (\S+)", printed).group(1))
    epoch = json.loads((checkpoint.parent / "state.json").read_text())["epoch"]
    trial_id = checkpoint.parent.parent.name.removeprefix("trial_")
    epochs = pd.read_csv(study_folder / "epochs.csv", dtype={"trial_id": str})
    reported = epochs[(epochs.trial_id == trial_id) & (epochs.epoch == epoch)].val_accuracy
    printed_accuracy = float(re.search(r"validation accuracy: ([0-9.]+)", printed).group(1))
    assert printed_accuracy == pytest.approx(reported.iloc[-1], abs=5e-5)
    assert printed_accuracy > 0.2  # 10 classes: chance is 0.1.


def test_the_notebook_opened_from_analysis_finds_the_newest_study(study_folder, tmp_path):
    """As a user opens it: from the analysis/ folder of a project whose results/ holds two
    studies, with nothing set; it opens the one written to last."""
    project = tmp_path / "project"
    (project / "analysis").mkdir(parents=True)
    shutil.copy(REPO / "analysis" / "best_trials.ipynb", project / "analysis")
    for name in ("older", "newer"):
        shutil.copytree(study_folder, project / "results" / name)
    older = project / "results" / "older" / "trials.csv"
    os.utime(older, (older.stat().st_atime, older.stat().st_mtime - 3600))
    notebook = nbformat.read(project / "analysis" / "best_trials.ipynb", as_version=4)
    assert "RESULTS_DIR = None" in notebook.cells[0].source
    notebook.cells = notebook.cells[:5]  # The study and its leaderboard.
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": project / "analysis"}},
    )  # fmt: skip
    client.execute()
    printed = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert f"study: {project / 'results' / 'newer'}" in printed


def test_confirmation_in_the_report_and_leaderboard(study_folder, tmp_path):
    """A confirm.csv beside the study: the leaderboard gains test means with 95% t
    intervals (checked against the formula), the report a section, verdicts and a figure."""
    copy = tmp_path / "confirmed"
    shutil.copytree(study_folder, copy, ignore=shutil.ignore_patterns("trial_*"))
    trials = pd.read_csv(copy / "trials.csv", dtype={"trial_id": str})
    best = trials.loc[trials.groupby("loss.name").best_val_accuracy.idxmax()]
    accuracies = {
        "categorical_crossentropy": [0.50, 0.52, 0.51],
        "hinge": [0.11, 0.08, 0.10],
        "mean_squared_logarithmic_error": [0.505, 0.52, 0.50],
    }
    rows = [
        {
            "loss": loss, "config_id": trial_id, "seed": seed, "trial_id": f"{loss[:4]}{seed}",
            "status": "completed", "epochs": 4, "val_accuracy": accuracy, "val_loss": 1.0,
            "test_accuracy": accuracy, "test_loss": 1.0, "test_ece": 0.3 - accuracy / 2,
            "test_nll": 2.0, "test_brier": 0.6, "temperature": 1.4,
            "test_ece_scaled": 0.05, "test_nll_scaled": 1.8, "epochs_to_90": seed + 1,
            # 10 test images in the top two bins: 8 right at 0.9, then 2 wrong at 0.95.
            "reliability": json.dumps({
                "count": [0] * 13 + [8, 2], "correct": [0] * 13 + [8, 0],
                "confidence": [0] * 13 + [7.2, 1.9],
            }),
        }
        for loss, trial_id in zip(best["loss.name"], best.trial_id, strict=True)
        for seed, accuracy in enumerate(accuracies[loss], start=1)
    ]  # fmt: skip
    # A fourth seed of cross-entropy diverged: no test accuracy, not in its mean, but said.
    (reference,) = best.trial_id[best["loss.name"] == "categorical_crossentropy"]
    rows.append(
        {**rows[0], "config_id": reference, "seed": 4, "trial_id": "cate4", "status": "diverged"}
        | dict.fromkeys(["epochs", "val_accuracy", "val_loss", "test_accuracy", "test_loss"])
    )
    # Written as confirm.csv files were before their first column was named by the compared
    # key ("loss.name"): such files read alike.
    pd.DataFrame(rows).to_csv(copy / "confirm.csv", index=False)
    board = leaderboard(load(copy)).set_index("loss.name")
    t_975 = 4.302652729749464  # Student's t, 2 degrees of freedom
    for loss in best["loss.name"]:
        values = np.array(accuracies[loss])
        half = t_975 * values.std(ddof=1) / np.sqrt(3)
        assert board.loc[loss, "mean_test_accuracy"] == pytest.approx(values.mean())
        assert board.loc[loss, "test_ci_low"] == pytest.approx(values.mean() - half)
        assert board.loc[loss, "test_ci_high"] == pytest.approx(values.mean() + half)
        assert board.loc[loss, "seeds"] == 3
        assert board.loc[loss, "diverged_seeds"] == (loss == "categorical_crossentropy")
    report = write_report(copy, tmp_path / "out").read_text()
    _is_png(tmp_path / "out" / "confirmation.png")
    assert "](confirmation.png)" in report and "Welch" in report
    assert "re-trained with 4 seeds" in report
    assert "not in the mean: categorical_crossentropy 1 of 4." in report
    if "hinge" in set(best["loss.name"]):  # The baseline makes cross-entropy certain.
        assert "hinge - categorical_crossentropy" in report
        assert "is resolved: hinge is worse than categorical_crossentropy" in report
    # Calibration and speed beside accuracy, and a reliability diagram per loss.
    assert "### Calibration and speed" in report and "ECE after temperature scaling" in report
    assert "epochs to 90% of final val accuracy" in report and "](reliability.png)" in report
    _is_png(tmp_path / "out" / "reliability.png")


def test_predictions_feed_each_model_the_input_it_was_saved_with(tmp_path):
    """Models now scale uint8 images themselves; those saved before took [0, 1] floats."""
    import keras

    from analysis import best_model

    images = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    keras.utils.set_random_seed(0)
    legacy = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            keras.layers.Flatten(),
            # Biases make the argmax depend on the input's scale.
            keras.layers.Dense(5, bias_initializer=keras.initializers.Constant([0, 2, 4, 6, 8])),
        ]
    )
    legacy.save(tmp_path / "legacy.keras")
    expected = np.asarray(legacy(images.astype("float32") / 255)).argmax(1)
    predicted = best_model.predict(tmp_path / "legacy.keras", images)
    np.testing.assert_array_equal(predicted, expected)
    assert not np.array_equal(expected, np.asarray(legacy(images.astype("float32"))).argmax(1))
    current = keras.Sequential([keras.Input((32, 32, 3), dtype="uint8"), keras.layers.Flatten()])
    assert best_model.model_input(current, images) is images


def test_importance_figures_have_one_title_and_few_readable_axes(
    study_folder, monkeypatch, tmp_path
):
    """Optuna's own titles were drawn under ours, and a parallel-coordinates plot of every
    searched key was a tangle of labels: one title each, at most PARALLEL_KEYS axes, and
    category names short enough not to run into the next axis."""
    from analysis import figures

    drawn = {}
    save = figures._save

    def keep(figure, out, name):
        drawn[name] = figure
        return save(figure, out, name)

    monkeypatch.setattr(figures, "_save", keep)
    figures.importance(load(study_folder), tmp_path)
    for name, figure in drawn.items():
        for axis in figure.axes:
            titles = [axis.get_title(loc) for loc in ("left", "center", "right")]
            assert sum(bool(t) for t in titles) <= 1, (name, titles)
    main = drawn["parallel_coordinates"].axes[0]
    assert len(main.get_xticklabels()) <= figures.PARALLEL_KEYS + 1  # The metric's axis too.
    for axis in drawn["parallel_coordinates"].axes:
        assert all(len(label.get_text()) <= 14 for label in axis.get_yticklabels())


def test_dead_trials_are_counted_by_optimizer_and_learning_rate_decade():
    trials = pd.DataFrame(
        {
            "trial_id": list("abcde"),
            "status": ["dead", "completed", "dead", "early_stopped", "dead"],
            "optimizer.name": ["adam", "adam", "adam", "sgd", "sgd"],
            "optimizer.learning_rate": [2e-3, 5e-4, 1.5e-3, 0.05, 0.2],
        }
    )
    table = results.dead_by_band(trials)
    assert table.to_dict("records") == [
        {"optimizer": "adam", "learning_rate_band": "[1e-03, 1e-02)", "trials": 2, "dead": 2},
        {"optimizer": "sgd", "learning_rate_band": "[1e-01, 1e+00)", "trials": 1, "dead": 1},
    ]
    line = results.format_dead(trials)
    assert line.endswith("adam [1e-03, 1e-02): 2 of 2; sgd [1e-01, 1e+00): 1 of 1")
    assert results.format_dead(trials.assign(status="completed")) is None


def test_time_shares_against_a_hand_count():
    trials = pd.DataFrame(
        {"trial_id": ["a", "b"], "startup_seconds": [10.0, 14.0], "compile_seconds": [20.0, None]}
    )
    epochs = pd.DataFrame({"trial_id": ["a", "a", "a", "b"], "epoch_seconds": [25, 5, 5, 6]})
    shares = results.time_shares(trials, epochs)
    # Starting 24 s; compiling 20 s (b stopped after one epoch: none measured); training
    # the epochs' 41 s less the 20 s of compiling inside them.
    assert shares == {"starting": 24.0, "compiling": 20.0, "training": 21.0}
    line = results.format_time_shares(trials, epochs)
    assert line.startswith("trial time: 65 s over 2 trials: starting 37%, compiling 31%, ")
