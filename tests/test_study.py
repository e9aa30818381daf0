"""The study end to end, on CPU: real Ray, real processes, generated data, a narrow model.

Slow (each starts Ray): about a minute per study on 2 cores.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import yaml
from ray import tune

from analysis.results import comparison, format_comparison

from .conftest import (
    REPO,
    free_port,
    quick_xla_flags,
    read_trials,
    require_jax,
    run_cli,
    saved_state,
    start_cli,
    study_args,
    wait_for,
    write_study_config,
)

pytestmark = pytest.mark.study


@pytest.fixture
def study_config(tmp_path):
    return lambda **search: write_study_config(tmp_path / "study.yaml", **search)


def run_study(config, data, storage, name, *args, env, timeout=600):
    return run_cli(
        "study.run", *study_args(config, data, storage, name), *args, env=env, timeout=timeout
    )


def _max_overlap(trials: pd.DataFrame) -> int:
    events = sorted([(t, 1) for t in trials.started_at] + [(t, -1) for t in trials.ended_at])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_study_searches_stops_early_and_writes_its_tables(shared_study):
    """The shared study (tests/studies.py): 6 tiny trials of 3 losses under ASHA, one
    trial's worker killed with no retries left."""
    result, folder, victim = shared_study, shared_study.folder, shared_study.victim
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Ray dashboard: http://127.0.0.1:" in result.stdout
    assert "ray get-auth-token" in result.stdout
    trials = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    assert len(trials) == 6 and trials.trial_id.is_unique
    assert trials.set_index("trial_id").status[victim] == "error"
    assert set(trials.status) <= {"completed", "early_stopped", "error"}
    # ASHA stopped some trials: fewer epochs than running all six to the end.
    assert "early_stopped" in set(trials.status)
    assert trials.epochs_run.sum() < 6 * 4
    assert len(epochs) == trials.epochs_run.sum() and epochs.rerun.sum() == 0
    for trial in trials.itertuples():
        rows = epochs[epochs.trial_id == trial.trial_id]
        assert rows.epoch.tolist() == list(range(1, trial.epochs_run + 1))
        assert trial.best_val_accuracy == pytest.approx(rows.val_accuracy.max())
    assert "test_accuracy" not in trials  # The search never touches the test set.
    # The notebook's baseline ran first; then Optuna proposed other configurations.
    first = trials.sort_values("started_at").iloc[0]
    assert (first["loss.name"], first["optimizer.name"]) == ("categorical_crossentropy", "adam")
    assert first["optimizer.learning_rate"] == pytest.approx(1e-3)
    assert (
        trials[["loss.name", "optimizer.name", "optimizer.learning_rate"]]
        .drop_duplicates()
        .shape[0]
        == 6
    )
    # Stratified by loss: two trials each, each loss with its own Optuna study, whose
    # record says how each trial ended.
    assert "trials per loss.name (6 in all): categorical_crossentropy 2, hinge 2," in result.stdout
    assert trials["loss.name"].value_counts().to_dict() == dict.fromkeys(
        set(trials["loss.name"]), 2
    )
    states = {"completed": "COMPLETE", "early_stopped": "PRUNED", "error": "FAIL"}
    storage = f"sqlite:///{folder}/optuna.db"
    for loss, group in trials.groupby("loss.name"):
        stored = optuna.load_study(study_name=f"{folder.name}/{loss}", storage=storage)
        assert stored.metric_names == ["val_accuracy"]
        by_id = {t.user_attrs["ray_trial_id"]: t for t in stored.trials}
        assert set(by_id) == set(group.trial_id)
        for trial in group.itertuples():
            assert by_id[trial.trial_id].state.name == states[trial.status]
            rows = epochs[epochs.trial_id == trial.trial_id]
            assert by_id[trial.trial_id].intermediate_values == dict(
                zip(rows.epoch, rows.val_accuracy, strict=True)
            )
            if trial.status == "completed":
                assert by_id[trial.trial_id].value == pytest.approx(trial.best_val_accuracy)
    assert yaml.safe_load((folder / "config.yaml").read_text())["search"]["num_samples"] == 6
    # Ray's own views show what each trial ran: every searched key once, as trained.
    frame = tune.ExperimentAnalysis(str(folder)).dataframe().set_index("trial_id")
    assert not [c for c in frame.columns if c.startswith(("config/optimizer/", "config/loss/"))]
    for trial in trials.to_dict("records"):
        for key in ("loss.name", "optimizer.name", "optimizer.learning_rate", "training.epochs"):
            assert frame.loc[trial["trial_id"], f"config/{key}"] == trial[key], key
    # The final table is the comparison of trials.csv: every loss, ranked by its best
    # full-budget trial.
    expected = format_comparison(comparison(trials, "loss.name", 4), "loss.name", 4)
    assert expected in result.stdout
    # Each trial's start-up and compilation, and where the trials' time went in all.
    assert (trials.startup_seconds > 0).all()
    # Measured from a trial's second epoch: ASHA may have stopped some after their first.
    measured = trials.compile_seconds.dropna()
    assert (measured >= 0).all() and len(measured) == (trials.epochs_run >= 2).sum()
    starting, compiling = trials.startup_seconds.sum(), trials.compile_seconds.sum()
    total = starting + epochs.epoch_seconds.sum()
    assert (
        f"trial time: {total:,.0f} s over 6 trials: starting {starting / total:.0%}, "
        f"compiling {compiling / total:.0%}, " in result.stdout
    )


def _table_cells(stdout: str, row_word: str, column: str) -> list[str]:
    """The cells of `column` in the rows holding `row_word` of the last progress table."""
    table = stdout[stdout.rindex("| Trial name") :].split("\n\n")[0].splitlines()
    header = [cell.strip() for cell in table[0].split("|")]
    rows = [[cell.strip() for cell in line.split("|")] for line in table[2:] if "|" in line]
    return [row[header.index(column)] for row in rows if row_word in row]


def test_the_default_config_study_on_jax_shows_a_left_out_key_as_empty(
    tmp_path, cifar10_tarball, ray_env
):
    """configs/default.yaml (the main job's config), shrunk: its best trial is a hinge trial,
    which label smoothing's condition leaves out. Ray's progress table looked that key up
    in the best trial's config and crashed the driver; now the key is there, empty.

    Run with KERAS_BACKEND=jax on the driver: the trial, in its Ray worker, trains on JAX
    (a small study on the other backend, where one study is all the test needs)."""
    require_jax()
    shrink = [
        "data.dataset=cifar10", "data.train_subset=200", "data.test_subset=50",
        "data.validation_size=50", "model.width=0.0625", "training.epochs=2",
        "search.space.loss.name={choice: [hinge, categorical_crossentropy, focal]}",
        "search.baseline.loss.name=hinge", "search.stratify=null",
        # Whole batches: none larger than the 150 training images.
        "search.space.training.batch_size={choice: [32, 64]}",
    ]  # fmt: skip
    result = run_cli(
        "study.run", "--config", REPO / "configs" / "default.yaml", "--data-dir", cifar10_tarball,
        *(arg for item in shrink for arg in ("--set", item)), "--num-samples", "1",
        "--storage-path", tmp_path, "--name", "default", "--no-dashboard",
        env={**ray_env, "KERAS_BACKEND": "jax", "XLA_FLAGS": quick_xla_flags()},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert (
        "'loss.name': 'hinge'" in result.stdout and "'loss.label_smoothing': None" in result.stdout
    )
    assert _table_cells(result.stdout, "hinge", "label_smoothing") == [""]
    trials = pd.read_csv(tmp_path / "default" / "trials.csv", dtype={"trial_id": str})
    assert trials["loss.label_smoothing"].isna().all()  # Empty in every view alike.
    assert len(trials) == 1 and trials.status.tolist() == ["completed"]
    assert trials.best_val_accuracy.iloc[0] > 0.1  # Above chance for 10 classes.
    results = tmp_path / "default" / f"trial_{trials.trial_id.iloc[0]}" / "result.json"
    reports = [json.loads(line) for line in results.read_text().splitlines()]
    assert {report["keras_backend"] for report in reports} == {"jax"}


def test_logical_gpus_set_concurrency_and_devices(
    tmp_path, study_config, cifar10_tarball, ray_cluster, ray_env
):
    """A head with 2 (logical) GPUs: a GPU per trial runs 2 trials at once, one on each;
    half a GPU each packs 4, two on each GPU; asking for more GPUs than it has is refused."""
    port = free_port()
    ray_cluster(
        "--head", f"--port={port}", "--num-cpus=4", "--num-gpus=2", "--include-dashboard=false"
    )
    address = f"127.0.0.1:{port}"
    # Five epochs, so that every trial is still running when the last one starts.
    common = ["--address", address, "--gpus", "2", "--set", "training.epochs=5"]

    config = study_config(num_samples=2, scheduler="fifo", stratify=None)
    result = run_study(
        config, cifar10_tarball, tmp_path, "whole", *common, "--gpus-per-trial", "1", env=ray_env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "whole" / "trials.csv", dtype={"gpu_ids": str})
    assert sorted(trials.gpu_ids) == ["0", "1"]
    assert _max_overlap(trials) == 2

    config = study_config(num_samples=4, scheduler="fifo", stratify=None)
    result = run_study(
        config, cifar10_tarball, tmp_path, "halves", *common, "--gpus-per-trial", "0.5", env=ray_env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "halves" / "trials.csv", dtype={"gpu_ids": str})
    assert _max_overlap(trials) == 4
    assert sorted(trials.gpu_ids.value_counts()) == [2, 2]

    result = run_study(config, cifar10_tarball, tmp_path, "toomany", "--address", address,
                       "--gpus", "4", env=ray_env)  # fmt: skip
    assert result.returncode == 2
    assert "--gpus: asked for 4, but the cluster has 2" in result.stderr
    assert not (tmp_path / "toomany").exists()


class _Freeze:
    """Called until true: once a trial has finished and another is midway, stops (SIGSTOP)
    every running trial's worker, then says whether Tune's saved state has caught up with
    each (its last epoch there is the one trials.csv has) and has stayed so for two seconds
    since the last worker was stopped: a result that a worker sent just before it stopped
    reaches the driver's tables first, Tune's state later. It also needs a `victim`: a
    running trial past epoch 1 whose checkpoint in Tune's state is its newest on disk (a
    worker stopped mid-report has written a newer one that Tune never registered); if
    there is none, the workers go on (SIGCONT) and it tries again."""

    def __init__(self, folder):
        self.folder, self.stopped, self.since, self.victim = folder, set(), None, None

    def __call__(self) -> bool:
        trials = read_trials(self.folder)
        running = trials[trials.status == "running"]
        if not self.stopped and not (
            (trials.status == "completed").any()
            and running.epochs_run.between(2, 4).any()  # Two epochs to spare.
        ):
            return False  # Not yet: a trial has finished and another is midway.
        for pid in set(running.pid.dropna().astype(int)) - self.stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            self.stopped.add(pid)
            self.since = None
        state = saved_state(self.folder)
        if not all(
            trial.trial_id in state and state[trial.trial_id][1] == trial.epochs_run
            for trial in running.itertuples()
        ):
            self.since = None
            return False
        self.since = self.since or time.monotonic()
        if time.monotonic() - self.since < 2:
            return False
        victims = [
            trial
            for trial in running.itertuples()
            if trial.epochs_run >= 2
            and state[trial.trial_id][2] == _newest_checkpoint(self.folder, trial.trial_id)
        ]
        if victims:
            self.victim = victims[0]
            return True
        for pid in self.stopped:  # None to take: go on, and try again.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.stopped, self.since = set(), None
        return False


def _newest_checkpoint(folder, trial_id) -> str:
    return max(path.name for path in (folder / f"trial_{trial_id}").glob("checkpoint_*"))


def test_interrupted_then_killed_study_resumes_exactly(
    tmp_path, study_config, cifar10_tarball, ray_env
):
    """Ctrl-C, then a resume that is SIGKILLed with a checkpoint then lost, then a resume.

    The kill is made deterministic: the trials' workers are stopped, Tune's saved state is
    awaited until it holds every reported epoch, then the driver and the workers are killed.
    So every trial ends with epochs 1..6 exactly once, and nothing reruns, except the one
    trial whose named checkpoint is then deleted: it falls back to its previous checkpoint
    (epoch 1 still once) and runs again, marked rerun, the epochs after it."""
    config = study_config(num_samples=4, scheduler="fifo")
    folder = tmp_path / "killed"
    resume = ["--resume", "--name", "killed", "--storage-path", tmp_path, "--no-dashboard"]

    # Ctrl-C (SIGINT to the driver's process group): a clean stop that says how to resume.
    log = tmp_path / "interrupted.log"
    with open(log, "w") as output:
        driver = start_cli(
            "study.run", *study_args(config, cifar10_tarball, tmp_path, "killed"),
            "--no-dashboard", "--set", "training.epochs=6", env=ray_env, output=output,
        )  # fmt: skip
        try:
            wait_for(lambda: (read_trials(folder).epochs_run >= 1).any(), interval=0.2)
            os.killpg(driver.pid, signal.SIGINT)
            assert driver.wait(timeout=120) == 130
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    command = f"python -m study.run --resume --name killed --storage-path {tmp_path}"
    assert f"interrupted; continue with: {command}" in log.read_text()

    # Resumed, then killed once a trial has finished and another is past epoch 2.
    driver = start_cli("study.run", *resume, env=ray_env)
    try:
        freeze = _Freeze(folder)
        wait_for(freeze, interval=0.2)
        os.killpg(driver.pid, signal.SIGKILL)
        for pid in freeze.stopped:  # As a machine that went down takes its trials with it.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    epochs_before = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    # Lose the checkpoint that Tune's state names for one running trial, its newest (it has
    # an older one).
    victim = freeze.victim
    named = saved_state(folder)[victim.trial_id][2]
    shutil.rmtree(folder / f"trial_{victim.trial_id}" / named)

    result = run_cli("study.run", *resume, env=ray_env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "only resume studies from folders you trust" in result.stderr
    after = read_trials(folder).set_index("trial_id")
    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    assert len(after) == 4 and set(after.status) == {"completed"}
    # Nothing reported before the interruption or the kill was lost.
    kept = epochs.merge(epochs_before, on=["trial_id", "epoch", "rerun"], how="inner")
    assert len(kept) == len(epochs_before)
    for trial_id, rows in epochs.groupby("trial_id"):
        assert sorted(rows[rows.rerun == 0].epoch) == list(range(1, 7)), trial_id
        if trial_id != victim.trial_id:
            assert (rows.rerun == 0).all(), trial_id  # Exactly once each: nothing ran again.
    # The victim went on from its previous checkpoint: the epoch after it ran again.
    rows = epochs[epochs.trial_id == victim.trial_id]
    assert (rows.epoch == 1).sum() == 1
    assert sorted(rows[rows.rerun == 1].epoch) == [victim.epochs_run]
    warned = [line for line in result.stderr.splitlines() if "checkpoint" in line]
    assert "warning" in after, (victim.trial_id, named, warned)
    assert "is gone from storage; restored from" in after.loc[victim.trial_id, "warning"]
    # Still a stratified study: each loss its share, each with its own Optuna record.
    assert sorted(after["loss.name"].value_counts()) == [1, 1, 2]
    storage = f"sqlite:///{folder}/optuna.db"
    stored = [
        trial
        for name in optuna.study.get_all_study_names(storage)
        for trial in optuna.load_study(study_name=name, storage=storage).trials
    ]
    assert sorted(t.user_attrs["ray_trial_id"] for t in stored) == sorted(after.index)
    assert {t.state.name for t in stored} == {"COMPLETE"}


def _optuna_trials(folder) -> dict[str, list]:
    """Each Optuna study of a stratified study: its trials, in Optuna's order."""
    storage = f"sqlite:///{folder}/optuna.db"
    return {
        name: optuna.load_study(study_name=name, storage=storage).trials
        for name in optuna.study.get_all_study_names(storage)
    }


def _stop_at_the_budget(folder, command: list, env, log_dir) -> tuple[int, str, str]:
    """Runs the study to its time budget with the stop landing mid-study whatever the
    machine's speed: once a trial has completed, every running trial's worker is stopped
    (SIGSTOP) until the budget runs out. Returns the exit code, stdout and stderr."""
    out, err = log_dir / "budget.out", log_dir / "budget.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        driver = subprocess.Popen(
            [sys.executable, "-m", "study.run", *command],
            cwd=REPO, stdout=stdout, stderr=stderr, env=env, start_new_session=True,
        )  # fmt: skip
        stopped: set[int] = set()

        def freeze_once_one_completed() -> bool:
            trials = read_trials(folder)
            if (trials.status == "completed").any() and "pid" in trials:
                running = trials[(trials.status == "running") & trials.pid.notna()]
                for pid in set(running.pid.astype(int)) - stopped:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGSTOP)
                    stopped.add(pid)
            return driver.poll() is not None

        try:
            wait_for(freeze_once_one_completed, timeout=600, interval=0.2)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
    return driver.returncode, out.read_text(), err.read_text()


def test_a_time_budget_stops_cleanly_and_a_finished_study_grows(
    tmp_path, study_config, cifar10_tarball, ray_env
):
    """`--time-budget` stops a study the way Ctrl-C does, every table whole and the study
    resumable; a plain --resume finishes it; `--resume --num-samples` grows the finished
    study, each loss's share growing and its Optuna study going on from its trials. Each
    run logs to MLflow, where a trial stays one run however often the study resumes."""
    from mlflow import MlflowClient

    config = study_config(num_samples=4, scheduler="fifo")
    folder = tmp_path / "bounded"
    args = [*study_args(config, cifar10_tarball, tmp_path, "bounded"), "--no-dashboard"]
    args += ["--logger", "mlflow"]
    # MLflow's default store: the study folder's SQLite file.
    env = {k: v for k, v in ray_env.items() if not k.startswith("MLFLOW_")}
    code, stdout, stderr = _stop_at_the_budget(
        folder, [*args, "--time-budget", "45s"], env, tmp_path
    )
    assert code == 0, stderr[-3000:]
    assert "time budget of 45s spent: stopping the study" in stdout
    command = f"python -m study.run --resume --name bounded --storage-path {tmp_path}"
    assert f"stopped at its time budget (45s); continue with: {command}" in stdout
    assert "Stop signal received" not in stderr  # Ray's words for Ctrl-C: not what happened.
    stopped = read_trials(folder)
    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    assert 1 <= (stopped.status == "completed").sum() < 4
    for trial in stopped.itertuples():  # Whole: every reported epoch, once.
        rows = epochs[epochs.trial_id == trial.trial_id]
        assert rows.epoch.tolist() == list(range(1, trial.epochs_run + 1)), trial.trial_id

    resume = ["--resume", "--name", "bounded", "--storage-path", tmp_path, "--no-dashboard"]
    resume += ["--logger", "mlflow"]
    result = run_cli("study.run", *resume, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    finished = read_trials(folder)
    assert len(finished) == 4 and set(finished.status) == {"completed"}
    assert set(stopped.trial_id) <= set(finished.trial_id)
    before = {name: len(trials) for name, trials in _optuna_trials(folder).items()}

    result = run_cli("study.run", *resume, "--num-samples", "6", env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trials per loss.name (6 in all): categorical_crossentropy 2, hinge 2, " in result.stdout
    grown = read_trials(folder).set_index("trial_id")
    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    assert len(grown) == 6 and set(grown.status) == {"completed"}
    assert sorted(grown["loss.name"].value_counts()) == [2, 2, 2]  # From 2, 1, 1.
    for trial_id, rows in epochs[epochs.rerun == 0].groupby("trial_id"):
        assert rows.epoch.tolist() == [1, 2, 3, 4], trial_id  # Each epoch once.
    assert yaml.safe_load((folder / "config.yaml").read_text())["search"]["num_samples"] == 6
    # The new trials were asked of the same Optuna studies, after the ones they held.
    for name, trials in _optuna_trials(folder).items():
        ids = [t.user_attrs["ray_trial_id"] for t in trials]
        assert [t.number for t in trials] == list(range(len(trials)))
        assert set(ids) == set(grown.index[grown["loss.name"] == name.split("/")[1]])
        assert set(ids[: before[name]]) <= set(finished.trial_id)
        assert {t.state.name for t in trials} == {"COMPLETE"}
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("bounded").experiment_id])
    assert sorted(run.data.tags["ray_trial_id"] for run in runs) == sorted(grown.index)
    for run in runs:  # One run per trial, through the stop and both resumes.
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert sorted(set(steps)) == [1, 2, 3, 4]


def test_more_gpus_than_the_machine_has(tmp_path, study_config, cifar10_tarball, ray_env):
    result = run_study(
        study_config(),
        cifar10_tarball,
        tmp_path,
        "gpus",
        "--gpus",
        "4",
        "--no-dashboard",
        timeout=300,
        env=ray_env,
    )
    assert result.returncode == 2
    assert "error: --gpus: asked for 4, but the cluster has 0" in result.stderr
    assert not (tmp_path / "gpus").exists()
