"""The confirmation phase: which configurations it picks, its intervals against a reference
computation, and a real run (study, then confirmation killed and resumed) on generated data."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from study import confirm, confirmation
from study.config import ConfigError
from study.search_config import load_study

from .conftest import run_cli

T_975 = {1: 12.706204736174698, 2: 4.302652729749464}  # Student's t, 97.5th percentile.


def _confirm_frame(runs: dict[str, list[float]], config_id="a") -> pd.DataFrame:
    rows = []
    for loss, accuracies in runs.items():
        for seed, accuracy in enumerate(accuracies, start=1):
            rows.append(
                {
                    "loss.name": loss,
                    "config_id": config_id,
                    "seed": seed,
                    "trial_id": f"{loss}-{seed}",
                    "status": "completed",
                    "epochs": 2,
                    "val_accuracy": accuracy + 0.01,
                    "val_loss": 1.0,
                    "test_accuracy": accuracy,
                    "test_loss": 1.0,
                }
            )
    return pd.DataFrame(rows)


def test_intervals_match_a_reference_computation():
    runs = {
        "categorical_crossentropy": [0.50, 0.53, 0.52],
        "hinge": [0.10, 0.09, 0.12],
        "focal": [0.515, 0.52, 0.50],
    }
    table, differences = confirmation.summary(_confirm_frame(runs))
    table = table.set_index("loss.name")
    for loss, values in runs.items():
        mean, sd = np.mean(values), np.std(values, ddof=1)
        half = T_975[2] * sd / math.sqrt(3)
        assert table.loc[loss, "mean_test_accuracy"] == pytest.approx(mean)
        assert table.loc[loss, "ci_low"] == pytest.approx(mean - half)
        assert table.loc[loss, "ci_high"] == pytest.approx(mean + half)
    differences = differences.set_index("loss.name")
    assert set(differences.versus) == {"categorical_crossentropy"}
    reference = runs["categorical_crossentropy"]
    for loss in ("hinge", "focal"):
        a, b = runs[loss], reference
        va, vb = np.var(a, ddof=1) / 3, np.var(b, ddof=1) / 3
        df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)  # Welch-Satterthwaite
        # Two differences at once: Bonferroni gives each 97.5%, so together they hold 95%.
        half = scipy_stats.t.ppf(1 - 0.05 / 2 / 2, df) * math.sqrt(va + vb)
        difference = np.mean(a) - np.mean(b)
        assert differences.loc[loss, "difference"] == pytest.approx(difference)
        assert differences.loc[loss, "ci_low"] == pytest.approx(difference - half)
        assert differences.loc[loss, "ci_high"] == pytest.approx(difference + half)
        p = 2 * scipy_stats.t.sf(abs(difference) / math.sqrt(va + vb), df)
        assert differences.loc[loss, "p_value"] == pytest.approx(p)
        assert differences.loc[loss, "p_bonferroni"] == pytest.approx(min(1, 2 * p))
    # Hinge is far worse: resolved. Focal is within noise of cross-entropy: not resolved.
    assert differences.loc["hinge", "resolved"] and not differences.loc["focal", "resolved"]
    text = confirmation.format_summary(*confirmation.summary(_confirm_frame(runs)))
    assert "hinge - categorical_crossentropy" in text and "not resolved" in text
    assert "Bonferroni-corrected for 2 comparisons" in text


def test_the_correction_keeps_resolved_meaning_resolved():
    """A gap that one comparison resolves is not resolved when it is one of many: the
    intervals widen with the number of comparisons, as Bonferroni asks."""
    pair = {"categorical_crossentropy": [0.50, 0.52, 0.51], "focal": [0.47, 0.485, 0.49]}
    one = confirmation.summary(_confirm_frame(pair))[1].set_index("loss.name")
    many = {**pair, **{f"other{i}": [0.2, 0.21, 0.22] for i in range(5)}}
    six = confirmation.summary(_confirm_frame(many))[1].set_index("loss.name")
    assert one.loc["focal", "resolved"] and not six.loc["focal", "resolved"]
    assert six.loc["focal", "ci_low"] < one.loc["focal", "ci_low"]


def test_a_zero_spread_interval_is_undefined_not_zero_width():
    """Seeds that all give the same accuracy (a seed ignored, say) estimate no spread: the
    interval is undefined and says so; it never claims certainty, nor resolves anything."""
    runs = {"categorical_crossentropy": [0.5, 0.5, 0.5], "hinge": [0.4, 0.4, 0.4]}
    table, differences = confirmation.summary(_confirm_frame(runs))
    assert table.ci_low.isna().all() and table.ci_high.isna().all()
    assert not differences.resolved.any()
    text = confirmation.format_summary(table, differences)
    assert "[no interval: every seed gave the same]" in text


def test_a_diverged_seed_is_counted_and_said_not_hidden():
    """A seed that diverged has no test accuracy: the mean is over the others, and the
    table and its printed line say how many diverged (a real run: hinge, 1 of 3 seeds).
    A value whose every seed diverged stays in the table, with no mean."""
    runs = {
        "categorical_crossentropy": [0.5, 0.52, 0.51],
        "hinge": [0.33, 0.32, 0.0],
        "mean_squared_error": [0.4, 0.0],
    }
    frame = _confirm_frame(runs)
    diverged = frame.trial_id.isin(["hinge-3", "mean_squared_error-2"])
    frame.loc[diverged, ["status", "val_accuracy", "test_accuracy"]] = ["diverged", None, None]
    focal = _confirm_frame({"focal": [0.0, 0.0]}).assign(
        status="diverged", val_accuracy=None, test_accuracy=None
    )
    table, differences = confirmation.summary(pd.concat([frame, focal], ignore_index=True))
    table = table.set_index("loss.name")
    assert table.loc["hinge", "seeds"] == 2 and table.loc["hinge", "diverged_seeds"] == 1
    assert table.loc["hinge", "mean_test_accuracy"] == pytest.approx(0.325)
    assert table.loc["categorical_crossentropy", "diverged_seeds"] == 0
    assert table.loc["focal", "seeds"] == 0 and table.loc["focal", "diverged_seeds"] == 2
    assert np.isnan(table.loc["focal", "mean_test_accuracy"])
    assert table.index[-1] == "focal"  # After every value with a mean.
    assert set(differences["loss.name"]) == {"hinge", "mean_squared_error"}  # Not focal.
    text = confirmation.format_summary(table.reset_index(), differences)
    assert "2 seeds, 1 diverged (not in the mean), config a" in text
    assert "focal" in text and "every seed diverged (2 of 2)" in text
    assert "[no interval: one seed]  1 seed, 1 diverged (not in the mean)" in text


def test_each_loss_keeps_the_configuration_best_on_validation():
    frame = pd.concat(
        [
            _confirm_frame({"hinge": [0.2, 0.2]}, "good"),
            _confirm_frame({"hinge": [0.3, 0.3]}, "bad").assign(val_accuracy=0.1),
        ]
    )
    table, _ = confirmation.summary(frame)
    # "bad" tests better, but the choice is made on validation, never on the test set.
    assert table.config_id.tolist() == ["good"]
    assert table.mean_test_accuracy.iloc[0] == pytest.approx(0.2)


def test_selection_takes_full_budget_trials_by_validation(tmp_path):
    space = "search.space.loss.name={choice: [categorical_crossentropy, hinge, focal]}"
    study = load_study(None, ["training.epochs=4", space, "search.num_samples=3"])
    base = {"loss.name": "categorical_crossentropy", "optimizer.learning_rate": 1e-3}
    trials = pd.DataFrame(
        [
            {**base, "trial_id": "a", "status": "completed", "epochs_run": 4},
            {**base, "trial_id": "b", "status": "completed", "epochs_run": 4},
            {**base, "trial_id": "c", "status": "early_stopped", "epochs_run": 2},
            {**base, "loss.name": "hinge", "trial_id": "d", "status": "early_stopped"},
        ]
    ).assign(best_val_accuracy=[0.4, 0.5, 0.9, 0.3], epochs_run=[4, 4, 2, 1])
    trials.loc[1, "optimizer.learning_rate"] = 3e-4
    trials.to_csv(tmp_path / "trials.csv", index=False)
    candidates, notes = confirm.select(study, tmp_path, top_per_loss=1)
    assert [c["config_id"] for c in candidates] == ["b"]
    assert candidates[0]["config"]["optimizer"]["learning_rate"] == pytest.approx(3e-4)
    assert notes == [
        "loss.name=hinge: none of its 1 trials ran all 4 epochs; not confirmed",
        "loss.name=focal: no trial in the study; not confirmed",
    ]
    two, _ = confirm.select(study, tmp_path, top_per_loss=2)
    assert [c["config_id"] for c in two] == ["b", "a"]
    trials.assign(epochs_run=1).to_csv(tmp_path / "trials.csv", index=False)
    with pytest.raises(ConfigError, match="no trial .* ran the full 4 epochs"):
        confirm.select(study, tmp_path, top_per_loss=1)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--confirm"], "error: --confirm: name the finished study with --name"),
        (["--confirm", "--name", "nope"], "error: --name: no study at"),
        (["--confirm", "--name", "x", "--set", "seed=1"], "error: --confirm: uses the study's"),
        (["--confirm", "--name", "x", "--seeds", "1"], "error: --seeds: 1; at least 2"),
        (["--confirm", "--name", "x", "--top-per-loss", "0"], "error: --top-per-loss: 0"),
    ],
)
def test_confirm_refuses_bad_input(tmp_path, args, expected):
    result = run_cli("study.run", *args, "--storage-path", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(expected)


@pytest.mark.study
def test_seed_grid_then_confirmation_killed_and_resumed(confirmed_study):
    """configs/seed.yaml as a grid study over 2 of its losses (narrow, 2 epochs), then
    2 losses x 2 seeds of confirmation, its driver killed after the first run, resumed
    (the `confirmed_study` fixture, tests/studies.py)."""
    done = confirmed_study
    assert done.study.returncode == 0, done.study.stderr[-3000:]
    folder = done.folder
    trials = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    assert sorted(trials["loss.name"]) == ["categorical_crossentropy", "hinge"]
    assert set(trials.status) == {"completed"} and set(trials.epochs_run) == {2}
    before = done.before
    assert (before.status == "completed").sum() < 4, "killed too late to test the resume"

    assert done.again.returncode == 2 and "add --resume to continue it" in done.again.stderr
    resumed = done.resumed
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    runs = pd.read_csv(folder / "confirm.csv", dtype={"trial_id": str, "config_id": str})
    assert list(runs.columns) == ["loss.name", *confirm.RUN_COLUMNS]
    assert len(runs) == 4 and set(runs.status) == {"completed"}
    assert set(runs.epochs) == {2}
    assert runs.groupby("loss.name").seed.apply(sorted).tolist() == [[1, 2], [1, 2]]
    # Each seed trained its own model: a seed that was ignored would repeat every figure.
    for _, group in runs.groupby("loss.name"):
        assert group.val_loss.nunique() == 2 and group.test_loss.nunique() == 2
    # Each loss's configuration is its grid trial; the runs finished before the kill stand.
    ids = dict(zip(trials["loss.name"], trials.trial_id, strict=True))
    assert all(ids[row["loss.name"]] == row["config_id"] for row in runs.to_dict("records"))
    finished = before[before.status == "completed"]
    kept = runs.merge(finished, on=["trial_id", "test_accuracy"])
    assert len(kept) == len(finished)
    # The printed table is the reference computation over confirm.csv.
    for loss, group in runs.groupby("loss.name"):
        values = group.test_accuracy.to_numpy()
        mean = values.mean()
        half = T_975[1] * values.std(ddof=1) / math.sqrt(2)
        interval = f"[{mean - half:.4f}, {mean + half:.4f}]"
        if values[0] == values[1]:  # Two seeds alike (hinge at chance, say): no spread.
            interval = "[no interval: every seed gave the same]"
        assert f"{loss:32s} {mean:.4f}  {interval}" in resumed.stdout
    # Calibration on the test set, each run's figures checked against what else it wrote.
    for run in runs.to_dict("records"):
        bins = json.loads(run["reliability"])
        count, correct = np.array(bins["count"]), np.array(bins["correct"])
        # The ECE again from the run's own bins: the sum of |correct - confidence| / N.
        gap = np.abs(correct - np.array(bins["confidence"])).sum() / count.sum()
        assert run["test_ece"] == pytest.approx(gap, abs=1e-5)
        assert correct.sum() / count.sum() == pytest.approx(run["test_accuracy"], abs=1e-6)
        assert 0 <= run["test_brier"] <= 2 and run["test_nll"] > 0
        if run["loss.name"] == "categorical_crossentropy":  # Its loss is that NLL.
            assert run["test_nll"] == pytest.approx(run["test_loss"], rel=1e-3)
    # seed.yaml validates on the test set: no split to fit a temperature on.
    assert runs.temperature.isna().all() and runs.test_ece_scaled.isna().all()
    assert "(no temperature: this study validates on the test set" in resumed.stdout
    assert "ECE (15 bins):" in resumed.stdout
    assert runs.epochs_to_90.between(1, 2).all()


def test_calibration_and_speed_get_intervals_and_corrected_differences():
    """ECE and epochs to 90% of each loss's chosen configuration, mean over seeds with its
    t interval, and the differences to cross-entropy, Bonferroni-corrected per figure."""
    frame = _confirm_frame(
        {
            "categorical_crossentropy": [0.50, 0.52, 0.51],
            "hinge": [0.30, 0.32, 0.31],
            "focal": [0.50, 0.51, 0.52],
        }  # fmt: skip
    )
    ece = {"categorical_crossentropy": [0.10, 0.12, 0.11], "hinge": [0.40, 0.42, 0.41],
           "focal": [0.05, 0.06, 0.04]}  # fmt: skip
    frame["test_ece"] = [value for loss in ece for value in ece[loss]]
    frame["epochs_to_90"] = [3, 4, 3, 8, 9, 8, 2, 2, 3]
    frame["temperature"] = [1.5] * 9
    frame["test_ece_scaled"] = None  # As where no split was there to fit it on.
    table, differences = confirmation.calibration_summary(frame)
    assert set(table.figure) == {"test_ece", "epochs_to_90", "temperature"}
    row = table[(table.figure == "test_ece") & (table["loss.name"] == "hinge")].iloc[0]
    values = np.array(ece["hinge"])
    half = scipy_stats.t.ppf(0.975, 2) * values.std(ddof=1) / np.sqrt(3)
    assert row["mean"] == pytest.approx(0.41) and row.ci_high == pytest.approx(0.41 + half)
    found = differences[differences.figure == "test_ece"].set_index("loss.name")
    # Two comparisons: each at 97.5%; Welch's interval of hinge - cross-entropy.
    welch = scipy_stats.ttest_ind(values, ece["categorical_crossentropy"], equal_var=False)
    low, high = welch.confidence_interval(0.975)
    assert found.loc["hinge", "difference"] == pytest.approx(0.30)
    assert (found.loc["hinge", "ci_low"], found.loc["hinge", "ci_high"]) == pytest.approx(
        (low, high)
    )
    assert found.loc["hinge", "resolved"] and found.loc["hinge", "versus"] == (
        "categorical_crossentropy"
    )
    text = confirmation.format_calibration(table, differences)
    assert "ECE (15 bins):" in text and "epochs to 90% of final val accuracy:" in text
    assert "ECE after temperature scaling" not in text  # No run has it.


def test_epochs_to_reach_90_percent_of_the_final_accuracy():
    from study.confirm import epochs_to_reach

    epochs = [
        {"trial_id": "a", "epoch": 1, "val_accuracy": 0.20},
        {"trial_id": "a", "epoch": 2, "val_accuracy": 0.46},
        {"trial_id": "a", "epoch": 3, "val_accuracy": 0.40},
        {"trial_id": "a", "epoch": 3, "val_accuracy": 0.99, "rerun": 1},  # Not counted.
        {"trial_id": "a", "epoch": 4, "val_accuracy": 0.50},
        {"trial_id": "b", "epoch": 1, "val_accuracy": 0.10},
    ]
    assert epochs_to_reach(epochs, "a") == 2  # 0.46 >= 0.9 * 0.50.
    assert epochs_to_reach(epochs, "b") == 1
    assert epochs_to_reach(epochs, "c") is None
