"""The study end to end, on CPU: real Ray, real processes, generated data, a narrow model.

Slow (each starts Ray): about a minute per study on 2 cores.
"""

import json
import os
import signal
import sys

import optuna
import pandas as pd
import pytest
import yaml

from .conftest import (
    free_port,
    read_trials,
    require_jax,
    run_cli,
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


def test_study_searches_stops_early_and_writes_its_tables(
    tmp_path, study_config, cifar10_tarball, ray_env
):
    result = run_study(study_config(), cifar10_tarball, tmp_path, "tiny", env=ray_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Ray dashboard: http://127.0.0.1:" in result.stdout
    assert "ray get-auth-token" in result.stdout
    folder = tmp_path / "tiny"
    trials = pd.read_csv(folder / "trials.csv", dtype={"trial_id": str})
    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    assert len(trials) == 6 and trials.trial_id.is_unique
    assert set(trials.status) <= {"completed", "early_stopped"}
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
    stored = optuna.load_study(study_name="tiny", storage=f"sqlite:///{folder}/optuna.db")
    assert len(stored.trials) == 6
    assert yaml.safe_load((folder / "config.yaml").read_text())["search"]["num_samples"] == 6
    # The final table: the best trial of each loss.
    for loss in set(trials["loss.name"]):
        assert loss in result.stdout


def test_a_study_runs_on_jax(tmp_path, study_config, cifar10_tarball, ray_env):
    """KERAS_BACKEND=jax on the driver: every trial, in its Ray worker, trains on JAX."""
    require_jax()
    env = {**ray_env, "KERAS_BACKEND": "jax"}
    config = study_config(num_samples=3, scheduler="fifo")
    result = run_study(config, cifar10_tarball, tmp_path, "jax", "--no-dashboard", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "jax" / "trials.csv", dtype={"trial_id": str})
    assert len(trials) == 3 and set(trials.status) == {"completed"}
    assert (trials.best_val_accuracy > 0.1).all()  # Above chance for 10 classes.
    for trial_id in trials.trial_id:
        results = (tmp_path / "jax" / f"trial_{trial_id}" / "result.json").read_text()
        reports = [json.loads(line) for line in results.splitlines()]
        assert {report["keras_backend"] for report in reports} == {"jax"}, trial_id


def test_logical_gpus_set_concurrency_and_devices(
    tmp_path, study_config, cifar10_tarball, ray_cluster, ray_env
):
    port = free_port()
    ray_cluster(
        "--head", f"--port={port}", "--num-cpus=8", "--num-gpus=4", "--include-dashboard=false"
    )
    address = f"127.0.0.1:{port}"
    # Five epochs, so that every trial is still running when the last one starts.
    common = ["--address", address, "--gpus", "4", "--set", "training.epochs=5"]

    config = study_config(num_samples=4, scheduler="fifo")
    result = run_study(
        config, cifar10_tarball, tmp_path, "whole", *common, "--gpus-per-trial", "1", env=ray_env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "whole" / "trials.csv", dtype={"gpu_ids": str})
    assert sorted(trials.gpu_ids) == ["0", "1", "2", "3"]
    assert _max_overlap(trials) == 4

    config = study_config(num_samples=8, scheduler="fifo")
    result = run_study(
        config, cifar10_tarball, tmp_path, "halves", *common, "--gpus-per-trial", "0.5", env=ray_env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "halves" / "trials.csv", dtype={"gpu_ids": str})
    assert _max_overlap(trials) == 8
    assert sorted(trials.gpu_ids.value_counts()) == [2, 2, 2, 2]

    result = run_study(
        config,
        cifar10_tarball,
        tmp_path,
        "toomany",
        "--address",
        address,
        "--gpus",
        "8",
        env=ray_env,
    )
    assert result.returncode == 2
    assert "--gpus: asked for 8, but the cluster has 4" in result.stderr
    assert not (tmp_path / "toomany").exists()


def test_two_node_cluster_runs_trials_on_both(
    tmp_path, study_config, cifar10_tarball, two_nodes, ray_env
):
    address = two_nodes
    config = study_config(num_samples=4, scheduler="fifo")
    result = run_study(
        config, cifar10_tarball, tmp_path, "nodes", "--address", address, env=ray_env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "nodes" / "trials.csv")
    assert trials.node_id.nunique() == 2


def test_interrupted_then_killed_study_resumes_without_losing_or_repeating_work(
    tmp_path, study_config, cifar10_tarball, ray_env
):
    config = study_config(num_samples=5, scheduler="fifo")
    folder = tmp_path / "killed"
    resume = [
        sys.executable, "-m", "study.run", "--resume", "--name", "killed",
        "--storage-path", str(tmp_path), "--no-dashboard",
    ]  # fmt: skip

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
    epochs_interrupted = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    assert len(epochs_interrupted) >= 1

    # Resumed, then SIGKILLed: no chance to clean up at all.
    driver = start_cli(*resume[2:], env=ray_env)
    try:
        wait_for(
            lambda: (
                ((t := read_trials(folder)).status == "completed").sum() >= 1
                and ((t.status == "running") & (t.epochs_run >= 2)).any()
            )
        )
        before = read_trials(folder)
        epochs_before = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)

    result = run_cli(*resume[2:], env=ray_env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "only resume studies from folders you trust" in result.stderr
    after = read_trials(folder)
    epochs = pd.read_csv(folder / "epochs.csv", dtype={"trial_id": str})
    assert len(after) == 5 and set(after.status) == {"completed"}
    # Nothing reported before the interruption or the kill was lost.
    for earlier in (epochs_interrupted, epochs_before):
        kept = epochs.merge(earlier, on=["trial_id", "epoch", "rerun"], how="inner")
        assert len(kept) == len(earlier)
    # Finished trials keep their six epochs. Tune saves its own state every few seconds, so
    # a trial that finished just before the SIGKILL may run its last epochs again, from its
    # last checkpoint that Tune knew of; those rows are flagged rerun = 1, never epoch 1.
    for trial_id in before.loc[before.status == "completed", "trial_id"]:
        rows = epochs[epochs.trial_id == trial_id]
        assert sorted(rows[rows.rerun == 0].epoch) == list(range(1, 7))
        assert (rows.epoch == 1).sum() == 1
    # Interrupted trials went on from their checkpoint, not from epoch 1.
    for trial_id in before.loc[before.status == "running", "trial_id"]:
        rows = epochs[epochs.trial_id == trial_id]
        assert (rows.epoch == 1).sum() == 1
        assert sorted(set(rows.epoch)) == list(range(1, 7))
        reruns = rows[rows.rerun == 1]
        assert len(reruns) <= 1  # At most the epoch after the last checkpoint Ray kept.


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "search.metric=val_loss"], "error: search.metric: unknown metric 'val_loss'"),
        (
            ["--set", "search.space.model.width={uniform: [0, 1]}"],
            "error: search.space.model.width",
        ),
        (["--set", "search.space={}"], "error: search.space: empty"),
        (["--gpus-per-trial", "1"], "error: --gpus-per-trial: the study has no GPUs"),
    ],
)
def test_bad_study_input_exits_2_before_ray_starts(
    tmp_path, study_config, cifar10_tarball, args, expected, ray_env
):
    result = run_study(
        study_config(), cifar10_tarball, tmp_path, "bad", *args, timeout=120, env=ray_env
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bad").exists()


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
